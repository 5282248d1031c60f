"""The segment store's warp merge (store_segment with several warps per row),
mirrored in Python for every warp layout, head_dim and K/V element size: in
each pass every warp's (row, column) value lands in its own scratch float,
inside the consumed K/V stage, and the reduction's float4 read of (warp,
row, columns d..d+3) finds exactly those four values. fp8 specs merge in two
column passes inside the consumed stage (a stage of bytes holds half the
floats), or, on a CTA's last segment, in one pass over the first two stages.
Every store and load of the scratch is free of shared-memory bank conflicts
(each phase of a warp's access, 16 lanes of 8 bytes or 8 of 16, touches a
bank at most once). The source lines the mirror follows are checked
verbatim."""

import pytest

from cupy_lean import kernels as K
from kernel_mirror import assert_in_kernel

MIRRORED = [
    "template <int PASSES>",
    "if (!HAS_FP8 || last)",
    "store_merged<1>(p, ps, s, st, slot, HAS_FP8 ? sh.scratch(0) : scr, stat_m, stat_l, rows, wn, lane);",
    "store_merged<2>(p, ps, s, st, slot, scr, stat_m, stat_l, rows, wn, lane);",
    "constexpr int DP = D / PASSES;",
    "constexpr int XP = D / 8 / PASSES;",
    "constexpr int SWZ = (DP / 2 - 1) & (7 << 2);",
    "float* mine = scr + wn * ROWS_Q * DP;",
    "for (int x = pass * XP; x < (pass + 1) * XP; ++x) {",
    "const int f2 = x * 4 + (lane & 3) - pass * (DP / 2);  // their float2 within the pass's row",
    "auto row_xor = [](int row) { return HAS_FP8 ? (row & 1) << 3 : (row & 7) << 2 & SWZ; };",
    "*reinterpret_cast<float2*>(mine + row * DP + 2 * (f2 ^ row_xor(row))) =",
    "for (int k = 0; k < XP / 2; ++k) {",
    "const int i = pass * XP / 2 + k;",
    "const int col = acc_pair(st.acc, 2 * i, hf, lane, v);",
    "acc_pair(st.acc, 2 * i + 1, hf, lane, w);",
    "const int f2 = (col >> 1) - pass * (DP / 2);",
    "*reinterpret_cast<float4*>(mine + row * DP + 2 * (f2 ^ row_xor(row))) =",
    "make_float4(v[0] * f, v[1] * f, w[0] * f, w[1] * f);",
    "const int f2 = (d >> 1) ^ row_xor(row);",
    "const float4 x = *reinterpret_cast<const float4*>(scr + (j * ROWS_Q + row) * DP + 2 * f2);",
    "emit<4>(p, ps, s.b, s.h, row, pass * DP + d, sum, M, L, s.partial, slot);",
    "return x * 8 + (lane & 3) * 2;",
    "return 16 * j + 4 * (lane & 3) + 2 * e;",
    "static constexpr int KV_STAGE = 2 * TILE * D * KV_ELEM;",
]


def test_mirrored_lines_are_in_the_kernel():
    assert_in_kernel(MIRRORED)


def _col(fp8, x, lane):
    if not fp8:
        return x * 8 + (lane & 3) * 2
    j, e = x >> 1, x & 1
    return 16 * j + 4 * (lane & 3) + 2 * e


def _spec(fp8, d, mt, tile):
    return K.Spec("f16", d, mt, tile, 2, False, K.FEATURES["fp8_e4m3"] if fp8 else 0)


# the layouts with several warps per row (one warp per row writes from registers: no merge), each with
# the passes it merges in and the K/V stages its scratch may span: 16-bit one pass in one stage; fp8 two
# passes in one stage, or (the CTA's last segment) one pass over two
LAYOUTS = [(fp8, d, mt, tile) for fp8 in (False, True) for d in (64, 128, 256) for mt in (1, 2, 4, 8)
           for tile in (16, 32, 64, 128) if _spec(fp8, d, mt, tile).warps_n > 1]
MERGING = [(fp8, d, mt, tile, passes, stages) for fp8, d, mt, tile in LAYOUTS
           for passes, stages in (((2, 1), (1, 2)) if fp8 else ((1, 1),))]


def test_some_layouts_merge_and_some_do_not():
    assert 0 < len(LAYOUTS) < 2 * 3 * 4 * 4
    assert any(fp8 for fp8, *_ in LAYOUTS) and not all(fp8 for fp8, *_ in LAYOUTS)


def _conflict_free(accesses, width):
    """Whether a warp's shared-memory access is free of bank conflicts:
    ``accesses`` maps each lane to its first float (4-byte word) of
    ``width`` words; the warp runs in phases of 128 bytes of lanes (16 lanes
    of 8 bytes, 8 of 16), each touching a bank (word % 32) at most once."""
    per_phase = 32 // width
    for ph in range(0, 32, per_phase):
        banks = [(a + i) % 32 for lane, a in accesses.items() if ph <= lane < ph + per_phase for i in range(width)]
        if len(banks) != len(set(banks)):
            return False
    return True


def _swizzle(fp8, row, swz):
    return (row & 1) << 3 if fp8 else (row & 7) << 2 & swz


def _writes(fp8, x_range, lane, row, dp, p):
    """(first float within the row, width, columns) of each store of a lane's
    row: fp8 one float4 per two pairs, 16-bit one float2 per pair."""
    if fp8:
        for i in range(x_range[0] // 2, x_range[1] // 2):
            col = _col(True, 2 * i, lane)
            assert _col(True, 2 * i + 1, lane) == col + 2
            yield 2 * (((col >> 1) - p * (dp // 2)) ^ _swizzle(True, row, 0)), 4, col
    else:
        swz = (dp // 2 - 1) & (7 << 2)
        for x in range(*x_range):
            yield 2 * ((x * 4 + (lane & 3) - p * (dp // 2)) ^ _swizzle(False, row, swz)), 2, _col(False, x, lane)


@pytest.mark.parametrize("fp8, d, mt, tile, passes, stages", MERGING)
def test_store_merge_mapping(fp8, d, mt, tile, passes, stages):
    spec = _spec(fp8, d, mt, tile)
    wn, rows_q = spec.warps_n, 16 * mt
    dp, xp = d // passes, d // 8 // passes
    swz = (dp // 2 - 1) & (7 << 2)
    stage_floats = stages * 2 * tile * d * (1 if fp8 else 2) // 4
    for p in range(passes):
        written = {}  # scratch float -> (warp wn, row, column)
        for warp in range(wn * mt):
            wm, w = warp // wn, warp % wn
            for hf in range(2):
                stores = {}  # the k-th store of the loop -> {lane: first float}
                for lane in range(32):
                    row = wm * 16 + (lane >> 2) + 8 * hf
                    for k, (at, width, col) in enumerate(_writes(fp8, (p * xp, (p + 1) * xp), lane, row, dp, p)):
                        base = w * rows_q * dp + row * dp + at
                        stores.setdefault(k, {})[lane] = base
                        for i in range(width):
                            assert base + i not in written, (p, warp, lane, hf, k)
                            assert 0 <= base + i < stage_floats
                            written[base + i] = (w, row, col + i)
                for k, lanes in stores.items():
                    assert _conflict_free(lanes, 4 if fp8 else 2), (p, warp, hf, k)
        assert len(written) == wn * rows_q * dp
        for j in range(wn):
            for row in range(rows_q):
                for d4 in range(0, dp, 4):
                    f2 = (d4 >> 1) ^ _swizzle(fp8, row, swz)
                    at = (j * rows_q + row) * dp + 2 * f2
                    assert [written[at + i] for i in range(4)] == [(j, row, p * dp + d4 + i) for i in range(4)]
        # the reduction's loads: thread e reads row e // (dp / 4), columns 4 (e % (dp / 4)) + 0..3 of warp j
        per_row = dp // 4
        for j in range(wn):
            for e0 in range(0, rows_q * per_row, 32):
                lanes = {}
                for lane in range(32):
                    row, d4 = divmod(e0 + lane, per_row)
                    if row < rows_q:
                        lanes[lane] = (j * rows_q + row) * dp + 2 * ((2 * d4) ^ _swizzle(fp8, row, swz))
                assert _conflict_free(lanes, 4), (p, j, e0)


def test_the_bank_model_sees_the_old_fp8_stores_conflict():
    """The mirror's bank check can fail: fp8's former float2 stores (the
    16-bit row swizzle, (row % 8) x 4 float2s, on fp8's columns 16i +
    4 (lane % 4) + 2e) were 2-way conflicted in a row of 128 floats."""
    old = {lane: (lane >> 2) * 128 + 2 * ((_col(True, 0, lane) >> 1) ^ ((lane >> 2) & 7) << 2) for lane in range(32)}
    assert not _conflict_free(old, 2)
    new = {lane: (lane >> 2) * 128 + 2 * ((_col(True, 0, lane) >> 1) ^ _swizzle(True, lane >> 2, 0)) for lane in range(32)}
    assert _conflict_free(new, 4)
