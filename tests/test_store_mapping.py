"""The segment store's warp merge (store_segment with several warps per row),
mirrored in Python for every warp layout, head_dim and K/V element size: in
each pass every warp's (row, column) value lands in its own scratch float,
inside the consumed K/V stage, and the reduction's float4 read of (warp,
row, columns d..d+3) finds exactly those four values. fp8 specs merge in two
column passes inside the consumed stage (a stage of bytes holds half the
floats), or, on a CTA's last segment, in one pass over the first two stages.
The source lines the mirror follows are checked verbatim."""

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
    "const int f2 = (HAS_FP8 ? col >> 1 : x * 4 + (lane & 3)) - pass * (DP / 2);",
    "*reinterpret_cast<float2*>(mine + row * DP + 2 * (f2 ^ ((row & 7) << 2 & SWZ))) =",
    "const int f2 = (d >> 1) ^ ((row & 7) << 2 & SWZ);",
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
            for lane in range(32):
                for hf in range(2):
                    row = wm * 16 + (lane >> 2) + 8 * hf
                    for x in range(p * xp, (p + 1) * xp):
                        col = _col(fp8, x, lane)
                        f2 = ((col >> 1) if fp8 else x * 4 + (lane & 3)) - p * (dp // 2)
                        base = w * rows_q * dp + row * dp + 2 * (f2 ^ ((row & 7) << 2 & swz))
                        for i in range(2):
                            assert base + i not in written, (p, warp, lane, hf, x)
                            assert 0 <= base + i < stage_floats
                            written[base + i] = (w, row, col + i)
        assert len(written) == wn * rows_q * dp
        for j in range(wn):
            for row in range(rows_q):
                for d4 in range(0, dp, 4):
                    f2 = (d4 >> 1) ^ ((row & 7) << 2 & swz)
                    at = (j * rows_q + row) * dp + 2 * f2
                    assert [written[at + i] for i in range(4)] == [(j, row, p * dp + d4 + i) for i in range(4)]
