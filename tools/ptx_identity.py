"""Whether a kernel-source change alters the code, without a GPU: NVRTC
compiles a grid of specs to PTX (sm_90) and a hash of each (comments left
out) is saved, or compared with a saved run.

    python tools/ptx_identity.py save before.json     # on the old source
    python tools/ptx_identity.py compare before.json  # on the new: specs whose PTX differs

The grid: fp16 and bf16 q, head_dim 64 / 128 / 256, groups 8 and 16, dense
and paged, no feature, e4m3, e5m2 and (head_dim 64) e4m3 with head lanes,
the default tile and tiles 64 and 32, and fp16 q with several query
tokens and a window (alone, with sinks and soft-cap, with e4m3) at the
default tile (126 specs, about 2.5 minutes on 16 cores). A refactor whose
PTX is byte-identical on all of them needs no new GPU run; one that
differs does.
"""

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cupy_lean import kernels as K  # noqa: E402


def grid():
    out = set()
    for dt in ("f16", "bf16"):
        for d in (64, 128, 256):
            for group in (8, 16):
                for paged in (False, True):
                    for f in (0, K.FEATURES["fp8_e4m3"], K.FEATURES["fp8_e5m2"],
                              K.FEATURES["fp8_e4m3"] | K.FEATURES["head_lanes"]):
                        if f & K.FEATURES["head_lanes"] and d != 64:
                            continue
                        for tile in (None, 64, 32):
                            out.add(K.make_spec(dt, d, group, paged, tile, None, features=f))
    # the optional features' paths (several query tokens, window, sinks, soft-cap; with fp8), default tile
    F = K.FEATURES
    for d in (64, 128, 256):
        for paged in (False, True):
            for f in (F["qlen"] | F["window"], F["qlen"] | F["window"] | F["sinks"] | F["softcap"],
                      F["qlen"] | F["window"] | F["fp8_e4m3"]):
                out.add(K.make_spec("f16", d, 16, paged, None, None, features=f))
    return sorted(out, key=lambda s: s.name)


def digest(spec):
    ptx = K.compile_ptx(spec, "sm_90")
    body = "\n".join(line for line in ptx.splitlines() if not line.startswith("//"))
    return spec.name, hashlib.sha1(body.encode()).hexdigest()


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("save", "compare"):
        raise SystemExit(__doc__)
    old = None
    if sys.argv[1] == "compare":  # read the saved run before the minutes of compiling
        try:
            with open(sys.argv[2]) as f:
                old = json.load(f)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"compare: cannot read the saved run {sys.argv[2]}: {exc}")
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as ex:
        now = dict(ex.map(digest, grid()))
    if sys.argv[1] == "save":
        with open(sys.argv[2], "w") as f:
            json.dump(now, f, indent=0)
        print(f"{len(now)} specs saved to {sys.argv[2]}")
        return
    differ = sorted(k for k in now if k in old and old[k] != now[k])
    only = sorted(set(now) ^ set(old))
    print(f"{len(now)} specs: {len(differ)} differ" + (f", {len(only)} in one run only" if only else ""))
    for k in differ:
        print("  differs:", k)
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
