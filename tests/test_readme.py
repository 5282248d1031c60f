"""The README's examples run as written (the NumPy one everywhere, the CuPy
and PyTorch ones on a GPU)."""

import pathlib
import re

import pytest

README = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def _block(marker):
    found = [b for b in BLOCKS if marker in b]
    assert found, f"no README example with {marker!r}"
    return found[0]


def test_numpy_example_runs_on_the_cpu():
    ns = {}
    exec(_block("import numpy as np"), ns)
    out, lse = ns["out"], ns["lse"]
    assert out.shape == (3, 8, 64) and lse.shape == (3, 8)
    assert (out[2] == 0).all() and (lse[2] == float("-inf")).all()


def _gpu():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("marker", ["import cupy as cp", "import torch"])
def test_gpu_examples_run(marker):
    if marker == "import torch":
        pytest.importorskip("torch")
    ns = {}
    exec(_block(marker), ns)
    out = ns["out"]
    assert tuple(out.shape) == (4, 32, 128)


def test_results_prose_matches_the_results_file():
    import json

    data = json.loads((pathlib.Path(__file__).resolve().parent.parent / "bench/results/bench_full.json").read_text())
    # the fixed sweep of round shapes is history now (docs/results_history.md, linked from the README)
    assert "docs/results_history.md" in README
    history = (pathlib.Path(__file__).resolve().parent.parent / "docs/results_history.md").read_text()
    stated = re.search(r"read ceiling measured in the same process: \*\*([0-9.]+) TB/s\*\*", history)
    assert stated, "docs/results_history.md no longer states the read ceiling of the fixed sweep"
    assert float(stated.group(1)) == round(data["read_ceiling_tbps"], 2)


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu(), reason="needs a CUDA GPU")
def test_kernel_experiments_example_runs(capsys):
    exec(_block("cupy_lean.Config("), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.endswith(" us") for line in lines)


def test_features_example_runs_on_the_cpu():
    ns = {}
    exec(_block("sinks = np.full"), ns)
    assert ns["out"].shape == (2, 8, 64) and ns["lse"].shape == (2, 8)
