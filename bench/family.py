"""The family of decode shapes that speed is judged on.

``draw(n, seed)`` draws ``n`` shapes at random (NumPy only, so the list, the
K/V bytes and the floors are known without a GPU):

* head_dim 64, 128 or 256; group (query heads per KV head) 1 to 16, every
  integer; heads_kv 1 to 32; batch 1 to 64 (log-uniform);
* K/V bytes log-uniform between 4 MB and 3 GB (fp16), the mean length
  following from them; lengths between 512 and 180k tokens, never a multiple
  of 8 (so of no tile or page size);
* layouts: ``dense`` (one length, ``kv_lens=None``), ``ragged`` (a dense
  cache with ``kv_lens``) and ``paged`` (page size 1, 16, 32 or 64, pages in
  a shuffled order); ragged and paged lengths drawn uniform, lognormal or
  Pareto around the mean.

The seed is printed with every run; a run without ``--seed`` draws a fresh
one, so no configuration can be fitted to a fixed list.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from typing import List

import numpy as np

from bench.cases import Case

__all__ = ["draw", "new_seed", "MIN_LEN", "MAX_LEN", "MIN_BYTES", "MAX_BYTES"]

HEAD_DIMS = (64, 128, 256)
MIN_LEN, MAX_LEN = 512, 180_000
MIN_BYTES, MAX_BYTES = 4e6, 3e9
MAX_ALLOC = 4e9  # a ragged dense cache (batch x longest) over this is drawn again
LAYOUTS = ("dense", "ragged", "paged")
PAGE_SIZES = (1, 16, 32, 64)
SPREADS = ("uniform", "lognormal", "pareto")


def new_seed() -> int:
    """A fresh seed (printed by the benchmark so a run can be repeated)."""
    return secrets.randbelow(2**31)


def _log_uniform_int(rng, lo, hi):
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def _not_round(rng, n):
    """``n`` moved off multiples of 8 (so of every tile and page size)."""
    if n % 8 == 0:
        n += int(rng.integers(1, 8))
    return n


def _lengths(rng, batch, mean, spread):
    if batch == 1:
        return np.array([int(round(mean))])
    if spread == "uniform":
        x = rng.uniform(0.25, 1.75, batch)
    elif spread == "lognormal":
        x = rng.lognormal(0.0, 0.8, batch)
    else:  # Pareto: a few long sequences among many short ones
        x = rng.pareto(1.3, batch) + 0.2
    x = x / x.mean() * mean
    return np.clip(np.rint(x), MIN_LEN, MAX_LEN).astype(np.int64)


def _one(rng, index, groups=(1, 16)) -> Case:
    for _ in range(1000):
        d = int(rng.choice(HEAD_DIMS))
        group = int(rng.integers(groups[0], groups[1] + 1))
        hkv = _log_uniform_int(rng, 1, 32)
        batch = _log_uniform_int(rng, 1, 64)
        target = math.exp(rng.uniform(math.log(MIN_BYTES), math.log(MAX_BYTES)))
        mean = target / (2 * batch * hkv * d * 2)
        if not MIN_LEN <= mean <= MAX_LEN:
            continue
        layout = str(rng.choice(LAYOUTS))
        if layout == "dense":
            lens = [_not_round(rng, int(round(mean)))] * batch
            page, spread = 16, "uniform"
        else:
            spread = str(rng.choice(SPREADS))
            lens = [_not_round(rng, int(x)) for x in _lengths(rng, batch, mean, spread)]
            page = int(rng.choice(PAGE_SIZES)) if layout == "paged" else 16
        lens = [min(x, MAX_LEN - 1) for x in lens]  # MAX_LEN - 1 is odd
        case = Case("", batch, group * hkv, hkv, d, tuple(lens), layout, "", page_size=page)
        if not MIN_BYTES <= case.kv_bytes() <= MAX_BYTES or case.alloc_bytes() > MAX_ALLOC:
            continue
        hq = group * hkv
        tag = f"{layout}" + (f"{page}" if layout == "paged" else "") + ("" if layout == "dense" else f"_{spread}")
        name = f"f{index:02d}_b{batch}_h{hq}x{hkv}_d{d}_{tag}_{lens[0] if layout == 'dense' else sum(lens)}"
        return dataclasses.replace(case, name=name, family=f"family {layout}")
    raise RuntimeError("family: no shape drawn within the limits")  # pragma: no cover


def draw(n: int, seed: int, groups=(1, 16)) -> List[Case]:
    """``n`` shapes of the family from ``seed`` (the same seed gives the
    same shapes). ``groups``: the range of query heads per KV head, inclusive
    (the benchmark's family is 1 to 16; tuning also measures larger groups)."""
    if not 1 <= groups[0] <= groups[1]:
        raise ValueError(f"groups: expected 1 <= low <= high, got {groups}")
    rng = np.random.default_rng(seed)
    return [_one(rng, i, groups) for i in range(n)]
