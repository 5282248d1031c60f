"""The thread mapping of the kernel's one-pass merge (reduce_unit), mirrored
in Python over every shipped spec, group and state count: every element of
every row is written once, by the thread that read all of its states; every
(element, state) pair is read once; every thread of a warp runs the same
number of state batches (a warp vote sits inside that loop); the rows a
thread writes in place are read by no other thread. The source lines the
mirror follows are checked verbatim, so a change there fails here first."""

import pytest

from cupy_lean import kernels as K
from cupy_lean.schedule import merge_batches
from kernel_mirror import assert_in_kernel

MIRRORED = [
    "constexpr int RED_LOADS = D >= 128 ? 16 : 8;",
    "while (lanes < 32 && 2 * lanes * E <= NT && 8 * 2 * lanes <= n) lanes *= 2;",
    "const int ept = (E * lanes + NT - 1) / NT;",
    "constexpr int CH = decltype(chunk)::value, TPR = PER_ROW / CH, U = RED_LOADS / CH;",
    "const int q = threadIdx.x / lanes, col = q % TPR, rows_per_pass = NT / lanes / TPR;",
    "const int E = (row_hi - row_lo) * PER_ROW;",
    "for (int r0 = row_lo; r0 < row_hi; r0 += rows_per_pass) {",
    "const int row = r0 + q / TPR;",
    "const bool live = row < row_hi;",
    "const int per = (g + gridDim.y - 1) / gridDim.y, lo = blockIdx.y * per;",
    "if (lo >= g) return;",
    "-1, lo, min(g, lo + per)",  # the combine's rows [lo, min(g, lo + per))
    "for (int j0 = 0; j0 < n; j0 += U * lanes) {",
    "const int j = j0 + lane + u * lanes;",
    "emit<4>(p, ps, b, h, row, 4 * (col + TPR * c), acc[c], M, L, to_slot, out_slot);",
]


def test_mirrored_lines_are_in_the_kernel():
    assert_in_kernel(MIRRORED)


def merge_mapping(head_dim, threads, g, n, lo=0, hi=None):
    """(writes, reads, trips): writes[(row, col4)] = thread, reads[(row,
    col4, state)] = thread, trips[thread] = state batches; rows [lo, hi)."""
    D, NT = head_dim, threads
    hi = g if hi is None else hi
    red_loads = 16 if D >= 128 else 8
    per_row = D // 4
    E = (hi - lo) * per_row
    lanes = 1
    while lanes < 32 and 2 * lanes * E <= NT and 8 * 2 * lanes <= n:
        lanes *= 2
    ept = (E * lanes + NT - 1) // NT
    ch = 8 if ept > 4 else 4 if ept > 2 else 2 if ept > 1 else 1
    tpr, u_batch = per_row // ch, red_loads // ch
    writes, reads, trips = {}, {}, {}
    for t in range(NT):
        lane = t & (lanes - 1)
        q = t // lanes
        col, rows_per_pass = q % tpr, NT // lanes // tpr
        trips[t] = 0
        for r0 in range(lo, hi, rows_per_pass):
            row = r0 + q // tpr
            live = row < hi
            for j0 in range(0, n, u_batch * lanes):
                trips[t] += 1
                for u in range(u_batch):
                    j = j0 + lane + u * lanes
                    if live and j < n:
                        for c in range(ch):
                            key = (row, 4 * (col + tpr * c), j)
                            assert key not in reads, ("read twice", key)
                            reads[key] = t
            if live and lane == 0:
                for c in range(ch):
                    key = (row, 4 * (col + tpr * c))
                    assert key not in writes, ("written twice", key)
                    writes[key] = t
    return writes, reads, trips, lanes


def _cases():
    seen = set()
    for spec in K.shipped_specs():
        key = (spec.head_dim, spec.threads, spec.m_tiles)
        if key in seen:
            continue
        seen.add(key)
        rows = 16 * spec.m_tiles
        for g in sorted({1, 2, 3, rows // 2 + 1, rows - 1, rows} - {0}):
            for n in (1, 2, 7, 16, 17, 33, 64, 129):
                yield spec.head_dim, spec.threads, g, n


@pytest.mark.parametrize("head_dim,threads,g,n", list(_cases()))
def test_merge_mapping_covers_once_and_keeps_warps_together(head_dim, threads, g, n):
    writes, reads, trips, lanes = merge_mapping(head_dim, threads, g, n)
    cols = range(0, head_dim, 4)
    assert set(writes) == {(r, c) for r in range(g) for c in cols}
    assert set(reads) == {(r, c, j) for r in range(g) for c in cols for j in range(n)}
    for w0 in range(0, threads, 32):  # a warp: one trip count (the __any_sync inside the loop)
        assert len({trips[t] for t in range(w0, w0 + 32)}) == 1
    for (r, c, j), t in reads.items():  # lanes share an element: the writer is one of its lane group
        assert t // lanes == writes[(r, c)] // lanes
    assert max(trips.values()) == merge_batches(g, n, head_dim, threads)  # the host's count of load rounds


def _combine_cases():
    for head_dim, threads, g, n in _cases():
        if n in (2, 33) and g > 1:
            for blocks in sorted({2, 3, g} & set(range(2, g + 1))):
                yield head_dim, threads, g, n, blocks


@pytest.mark.parametrize("head_dim,threads,g,n,blocks", list(_combine_cases()))
def test_combine_row_blocks_cover_every_row_once(head_dim, threads, g, n, blocks):
    """The split-K combine's grid.y blocks: block y merges rows [y per, min(g,
    (y + 1) per)) (a block past the last row exits); together every element
    of every row is written once and every (element, state) read once, and
    each block keeps its warps on one trip count."""
    per = -(-g // blocks)
    writes, reads = {}, {}
    for y in range(blocks):
        lo = y * per
        if lo >= g:
            continue
        w, r, trips, _ = merge_mapping(head_dim, threads, g, n, lo, min(g, lo + per))
        assert not set(w) & set(writes) and not set(r) & set(reads)
        writes.update(w)
        reads.update(r)
        for w0 in range(0, threads, 32):
            assert len({trips[t] for t in range(w0, w0 + 32)}) == 1
        assert max(trips.values()) == merge_batches(min(g, lo + per) - lo, n, head_dim, threads)
    cols = range(0, head_dim, 4)
    assert set(writes) == {(r, c) for r in range(g) for c in cols}
    assert set(reads) == {(r, c, j) for r in range(g) for c in cols for j in range(n)}
