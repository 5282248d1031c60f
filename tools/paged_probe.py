"""Paged vs dense throughput at one shape, for diagnosis: page sizes, page
order, tile sizes. python tools/paged_probe.py"""

import sys

import numpy as np

sys.path.insert(0, ".")
sys.path.insert(0, "tools")
import cupy as cp  # noqa: E402

import cupy_lean  # noqa: E402
from quick_timing import graph_time  # noqa: E402


def main():
    rng = np.random.default_rng(0)
    B, hq, hkv, d, n = 32, 32, 8, 128, 8192
    lens = np.full(B, n, np.int32)
    kv_bytes = 2 * B * n * hkv * d * 2
    q = cp.asarray(rng.standard_normal((B, hq, d)).astype(np.float16))
    k = cp.random.standard_normal((B, n, hkv, d), dtype=cp.float32).astype(cp.float16)
    v = cp.random.standard_normal((B, n, hkv, d), dtype=cp.float32).astype(cp.float16)
    dl = cp.asarray(lens)
    sets = [(q, k, v)]
    for tile in (None, 32, 128):
        us = graph_time(lambda q, k, v: cupy_lean.attention(q, k, v, kv_lens=dl, validate=False, tile_size=tile), sets)
        print(f"dense kv_lens tile={tile}: {us:.1f} us {kv_bytes / us / 1e6:.2f} TB/s", flush=True)
    for ps in (16, 64, 256):
        for shuffle in (False, True):
            npages = B * n // ps
            kp = k.reshape(npages, ps, hkv, d)
            vp = v.reshape(npages, ps, hkv, d)
            order = np.arange(npages)
            if shuffle:
                order = rng.permutation(npages)
            inv = np.empty_like(order)
            inv[order] = np.arange(npages)
            table = cp.asarray(inv.reshape(B, n // ps).astype(np.int32))
            for tile in (None, 128):
                us = graph_time(lambda q, kk, vv: cupy_lean.attention(q, kp, vp, kv_lens=dl, block_table=table,
                                                                      validate=False, tile_size=tile), sets)
                print(f"paged ps={ps} shuffled={shuffle} tile={tile}: {us:.1f} us {kv_bytes / us / 1e6:.2f} TB/s",
                      flush=True)


if __name__ == "__main__":
    main()
