"""Instruction mix of the lean kernel's tile loop, from its SASS, without a GPU.

    python tools/sass_loop.py [--specs f16:128:8:dense,f16:128:8:dense:16 ...]

For each spec (dtype:head_dim:group:dense|paged[:features]): NVRTC compiles
the kernel to PTX for compute_90 (--arch sm_80: compute_80), ptxas assembles it, cuobjdump
disassembles it; the tile loop is the innermost backward branch whose body
holds every HMMA of the kernel. Prints the loop's static instruction count
(a loop body with branches: an upper bound of what one tile executes), its
HMMAs, the count per token of a warp, and the most frequent opcodes, split
at the loop's LDGDEPBAR (the commit of the next tile's copies) into the
loader part and the compute part.

Why: on an H200 the kernel issues ~0.56 warp instructions per scheduler per
cycle and an fp8 call takes an fp16 call's time (bench/NOTES.md, session
4): the instruction count per tile, not the bytes, sets the pace, and this
counts it on any machine.

Needs: NVRTC (cupy's wheel), ptxas (PTXAS=..., or on PATH, or under
CUDA_HOME / /usr/local/cuda) and cuobjdump (CUOBJDUMP=..., or on PATH; the
nvidia-cuda-cuobjdump wheel has one), which calls nvdisasm (on PATH or
NVDISASM_PATH; the nvidia-cuda-nvdisasm wheel). An older ptxas is given the
PTX with its .version lowered to what it reads (the kernel uses no newer
feature).

The count is static: blocks that the loop branches around on most tiles
count too. In the fp8 loops about 160 instructions after LDGDEPBAR are the
per-unit regrouping of q in shared memory (prepare_q_fp8, run when a tile
starts a unit), so the "compute part" of an fp8 loop overstates a tile's.
"""

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_SPECS = ("f16:128:8:dense", "f16:128:8:dense:16", "f16:64:8:dense", "f16:64:8:dense:16",
                 "f16:256:8:dense", "f16:256:8:dense:16", "f16:128:8:paged")


def _tool(name, env):
    if os.environ.get(env):
        return os.environ[env]
    found = shutil.which(name)
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"))):
        p = os.path.join(root, "bin", name)
        if root and os.path.exists(p):
            return p
    raise SystemExit(f"{name} not found: set {env}=/path/to/{name}")


def _spec(text):
    """The spec of ``dtype:head_dim:group:dense|paged[:features]``; a text
    of another form, or values make_spec refuses, raise SystemExit naming
    the text and what is wrong."""
    from cupy_lean import kernels as K

    form = "dtype:head_dim:group:dense|paged[:features], e.g. f16:128:4:dense"
    parts = text.strip().split(":")
    if len(parts) not in (4, 5) or parts[3] not in ("dense", "paged"):
        raise SystemExit(f"--specs: expected {form}, got {text!r}")
    try:
        d, group, features = int(parts[1]), int(parts[2]), int(parts[4]) if len(parts) == 5 else 0
    except ValueError:
        raise SystemExit(f"--specs: head_dim, group and features must be integers ({form}), got {text!r}") from None
    try:
        return K.make_spec(parts[0], d, group, parts[3] == "paged", features=features)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"--specs: {text!r}: {exc}") from None


def _ptx(spec, arch="sm_90"):
    from cupy_lean import kernels as K

    return K.compile_ptx(spec, arch)


def _assemble(ptx, ptxas, path, arch="sm_90", flags=()):
    """ptxas on ``ptx`` into ``path`` (``flags``: more ptxas options); an
    older ptxas gets the PTX with its .version lowered to what it reads."""
    src = path + ".ptx"
    for attempt in range(2):
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, f"-arch={arch}", *flags, src, "-o", path], capture_output=True, text=True)
        if r.returncode == 0:
            return
        m = re.search(r"current version is '(\d+\.\d+)'", r.stderr)
        if attempt or not m:
            raise SystemExit(r.stderr)
        ptx = re.sub(r"^\.version \d+\.\d+", f".version {m.group(1)}", ptx, count=1, flags=re.M)


def _instructions(cubin, entry, cuobjdump):
    out = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    part = next(f for f in out.split("Function : ") if f.startswith(entry))
    ins = []
    for line in part.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    return ins


def _tile_loop(ins):
    """The shortest backward-branch body holding the most HMMAs."""
    at = {a: i for i, (a, _) in enumerate(ins)}
    best = None
    for i, (a, text) in enumerate(ins):
        if "BRA" not in text:
            continue
        m = re.search(r"0x([0-9a-f]+)", text.split("BRA", 1)[1])
        if not m or int(m.group(1), 16) >= a or int(m.group(1), 16) not in at:
            continue
        body = ins[at[int(m.group(1), 16)]:i + 1]
        h = sum("HMMA" in t for _, t in body)
        if h and (best is None or h > best[0] or (h == best[0] and len(body) < len(best[1]))):
            best = (h, body)
    return best


def _opcode(text):
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", default=",".join(DEFAULT_SPECS),
                    help="comma-separated dtype:head_dim:group:dense|paged[:features] (features: kernels.FEATURES bits)")
    ap.add_argument("--top", type=int, default=10, help="opcodes listed per part")
    ap.add_argument("--arch", default="sm_90", help="sm_80 or sm_90 (default sm_90)")
    a = ap.parse_args(argv)
    ptxas, cuobjdump = _tool("ptxas", "PTXAS"), _tool("cuobjdump", "CUOBJDUMP")
    tmp = tempfile.mkdtemp(prefix="cupy_lean_sass_")
    for spec in [_spec(text) for text in a.specs.split(",")]:  # every text checked before compiling
        path = os.path.join(tmp, spec.name + ".cubin")
        _assemble(_ptx(spec, a.arch), ptxas, path, a.arch)
        ins = _instructions(path, spec.entry, cuobjdump)
        found = _tile_loop(ins)
        if found is None:
            print(f"{spec.name}: no loop with HMMA found")
            continue
        h, body = found
        tw = spec.tile // spec.warps_n
        cut = next((k for k, (_, t) in enumerate(body) if t.startswith("LDGDEPBAR")), len(body))
        spills = sum(_opcode(t) in ("STL", "LDL") for _, t in ins)
        loop_spills = sum(_opcode(t) in ("STL", "LDL") for _, t in body)
        print(f"{spec.name} ({a.arch}): tile loop {len(body)} instructions ({len(body) / tw:.1f} per token of a "
              f"warp), HMMA {h}; loader part {cut}, compute part {len(body) - cut}; local-memory (spill) "
              f"instructions {loop_spills} in the loop, {spills} in the kernel")
        for name, part in (("loader", body[:cut]), ("compute", body[cut:])):
            c = collections.Counter(_opcode(t) for _, t in part)
            print(f"    {name:8s}" + ", ".join(f"{k} {v}" for k, v in c.most_common(a.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
