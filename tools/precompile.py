"""Compile kernel specs in parallel into CuPy's on-disk kernel cache, so that
later processes (the GPU tests, the benchmark) load them instead of compiling
one after another. Needs a GPU (CuPy compiles for the current device).

Usage: python tools/precompile.py [--all-tiles] [--jobs N] [--features 0,1,7] [--dtypes f16]
       [--head-dims 64,128]
"""

import argparse
import concurrent.futures
import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _specs(all_tiles, features=(0,), dtypes=("f16", "bf16"), head_dims=None):
    from cupy_lean import kernels as K

    out = []
    for dtype in dtypes:
        for d in head_dims or K.HEAD_DIMS:
            for mt in K.M_TILES:
                for paged in (False, True):
                    for tile in ((None,) + K.TILE_SIZES if all_tiles else (None,)):
                        for f in features:
                            try:
                                out.append(K.make_spec(dtype, d, mt * 16, paged, tile, **({"features": f} if f else {})))
                            except ValueError:
                                pass
    return sorted(set(out), key=lambda s: s.name)


def _compile(spec):
    import cupy as cp

    from cupy_lean import kernels as K

    mod = cp.RawModule(code=K._source_of(spec), options=K.compile_options(spec))
    mod.compile()
    return spec.name


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--all-tiles", action="store_true", help="also every tile size override")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 4)
    ap.add_argument("--features", default="0", help="comma-separated feature bit masks (default 0)")
    ap.add_argument("--dtypes", default="f16,bf16")
    ap.add_argument("--head-dims", default=None, help="comma-separated (default all)")
    a = ap.parse_args()
    specs = _specs(a.all_tiles, tuple(int(x) for x in a.features.split(",")), tuple(a.dtypes.split(",")),
                   tuple(int(x) for x in a.head_dims.split(",")) if a.head_dims else None)
    t0 = time.time()
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(a.jobs, mp_context=ctx) as pool:
        for _ in pool.map(_compile, specs):
            pass
    from cupy_lean import kernels as K
    import cupy as cp

    mod = cp.RawModule(code=K._source_of(None), options=K.compile_options(None))
    mod.compile()
    print(f"precompiled {len(specs)} specs in {time.time() - t0:.0f} s with {a.jobs} processes")


if __name__ == "__main__":
    main()
