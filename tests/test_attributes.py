"""Attribute names that only a GPU run would reach: every ``self.NAME`` a
class of the package reads, and every ``p._NAME`` the front end calls on a
plan, is defined (a method or class attribute, or assigned to ``self``
somewhere in the class). A renamed or deleted method otherwise surfaces as an
AttributeError on the GPU only (it once did: ``Plan._lse_ok``)."""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "cupy_lean"


def _classes():
    for path in sorted(PKG.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                yield path.name, node


def _defined(cls):
    names = set()
    for item in cls.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(item.name)
        elif isinstance(item, ast.Assign):
            names.update(t.id for t in item.targets if isinstance(t, ast.Name))
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            names.add(item.target.id)
    for node in ast.walk(cls):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for t in targets:
            for el in (t.elts if isinstance(t, ast.Tuple) else [t]):
                if isinstance(el, ast.Attribute) and isinstance(el.value, ast.Name) and el.value.id == "self":
                    names.add(el.attr)
    return names


def _bases_known(cls):
    """Only classes without bases (or with object / NamedTuple-like bases
    whose attributes we cannot see) are checked strictly."""
    return not cls.bases


CASES = [(f, c) for f, c in _classes() if _bases_known(c)]


@pytest.mark.parametrize("path,cls", CASES, ids=[f"{f}:{c.name}" for f, c in CASES])
def test_every_self_attribute_read_is_defined(path, cls):
    defined = _defined(cls)
    missing = set()
    for node in ast.walk(cls):
        if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load)
                and isinstance(node.value, ast.Name) and node.value.id == "self"
                and node.attr not in defined and not node.attr.startswith("__")):
            missing.add(node.attr)
    assert not missing, f"{path}: {cls.name} reads undefined attributes {sorted(missing)}"


def test_front_end_calls_existing_plan_methods():
    plan_cls = next(c for f, c in _classes() if f == "_plan.py" and c.name == "Plan")
    defined = _defined(plan_cls)
    tree = ast.parse((PKG / "attention.py").read_text())
    used = {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "p"}
    assert used, "the front end no longer calls plan methods through `p`: update this test"
    assert used <= defined, f"attention.py calls Plan attributes that do not exist: {sorted(used - defined)}"
