"""The fp8 score path's fragment mapping, mirrored in NumPy: the query rows as
load_q lays them out (swizzled 16-byte chunks), prepare_q_fp8's regrouping of
column pairs (and, for bf16 q, its per-row power-of-two conversion to fp16),
the ldmatrix that gives a warp its A registers, the 32-bit K reads from the
fp8 ring (swz8) and the m16n8k16 MMA's register semantics. Every (row, token)
score must equal the dot product of that row and that key, for each head_dim
and for rows and tokens of every warp. The source lines the mirror follows
are checked verbatim, so a change there fails here first."""

import numpy as np
import pytest

from kernel_mirror import assert_in_kernel

MIRRORED = [
    "__device__ __forceinline__ int swz(int r, int ch) { return r * D + ((ch ^ (r & 7)) << 3); }",
    "constexpr int FP8_ROWS_PER_LINE = D >= 128 ? 1 : 128 / D;",
    "constexpr int FP8_SWZ_MASK = (KCPR < 8 ? KCPR : 8) - 1;",
    "return r * D + ((ch ^ ((r / FP8_ROWS_PER_LINE) & FP8_SWZ_MASK)) << 4);",
    "const int r = e / BLOCKS, kk = e % BLOCKS;",
    "uint4* lo = reinterpret_cast<uint4*>(qs + swz(r, 2 * kk));",
    "uint4* hi = reinterpret_cast<uint4*>(qs + swz(r, 2 * kk + 1));",
    "*lo = make_uint4(w[0], w[2], w[4], w[6]);",
    "*hi = make_uint4(w[1], w[3], w[5], w[7]);",
    "const int sh2 = min(14 - (ex - 127), 126);",
    "return __uint_as_float((u32)(127 - sh2) << 23);",
    "if (kk == 0) q_scale[r] = inv;",
    "ldsm_x4(a0, a1, a2, a3, smem_u32(qs + swz(wm * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, kk * 2 + (lane >> 4))));",
    "const u32 w = *reinterpret_cast<const u32*>(kb + swz8(tokw + nb * 8 + (lane >> 2), kk) + 4 * (lane & 3));",
    "mma16816<false>(s[nb], a0, a1, a2, a3, fp8x2_to_f16x2<0, 1>(w), fp8x2_to_f16x2<2, 3>(w));",
    "const int r = (threadIdx.x >> 5) / WN * 16 + ((threadIdx.x & 31) >> 2);",
    "const u32 t = __byte_perm(w, 0u, 0x3120);  // bytes 0, 2 in the low half, 1, 3 in the high",
    "even = fp8x2_to_f16x2<0, 1>(t);",
    "odd = fp8x2_to_f16x2<2, 3>(t);",
    "asm(\"{.reg .b16 lo, hi;\\n\\tmov.b32 {lo, hi}, %1;\\n\\tcvt.rn.f16x2.e4m3x2 %0, hi;}\" : \"=r\"(r) : \"r\"(w));",
]


def test_mirrored_lines_are_in_the_kernel():
    assert_in_kernel(MIRRORED)


def swz(d, r, ch):
    return r * d + ((ch ^ (r & 7)) << 3)  # elements (2 bytes)


def swz8(d, r, ch):
    kcpr = d // 16
    rows_per_line = 1 if d >= 128 else 128 // d
    mask = min(kcpr, 8) - 1
    return r * d + ((ch ^ ((r // rows_per_line) & mask)) << 4)  # bytes


def prepare(qs, d, rows):
    """prepare_q_fp8's regrouping, on the Q slot as uint32 words."""
    words = qs.view(np.uint32)
    for r in range(rows):
        for kk in range(d // 16):
            lo, hi = swz(d, r, 2 * kk) // 2, swz(d, r, 2 * kk + 1) // 2  # word offsets
            w = np.concatenate([words[lo:lo + 4], words[hi:hi + 4]]).copy()
            words[lo:lo + 4] = w[0::2]
            words[hi:hi + 4] = w[1::2]


def ldsm_x4(slot, addr):
    """ldmatrix .x4 (no transpose): lane L gives the row address (in
    elements) of row L % 8 of matrix L // 8; lane t receives word t % 4 of
    row t // 4 of each matrix. Returns regs[lane][matrix] as element pairs."""
    out = np.zeros((32, 4, 2), np.float64)
    for t in range(32):
        for m in range(4):
            a = addr[8 * m + t // 4] + 2 * (t % 4)
            out[t, m] = slot[a:a + 2]
    return out


def scores(q, k, d, wm_count, wn, tw):
    """The kernel's S for every warp (wm, wn), as a [rows, tokens] array."""
    rows, tile = 16 * wm_count, wn * tw
    slot = np.zeros(rows * d, np.float64)
    for r in range(rows):  # load_q: chunk ch of row r at swz(r, ch)
        for ch in range(d // 8):
            slot[swz(d, r, ch):swz(d, r, ch) + 8] = q[r, 8 * ch:8 * ch + 8]
    as16 = slot.astype(np.float16)
    prepare(as16, d, rows)
    slot = as16.astype(np.float64)
    ring = np.zeros(tile * d, np.float64)  # K bytes as values, swz8 layout
    for r in range(tile):
        for ch in range(d // 16):
            ring[swz8(d, r, ch):swz8(d, r, ch) + 16] = k[r, 16 * ch:16 * ch + 16]
    s = np.zeros((rows, tile))
    for wm in range(wm_count):
        for wn_i in range(wn):
            tokw = wn_i * tw
            for kk in range(d // 16):
                addr = [swz(d, wm * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, kk * 2 + (lane >> 4)) for lane in range(32)]
                a = ldsm_x4(slot, addr)
                for nb in range(tw // 8):
                    def k_bytes(lane):
                        w0 = swz8(d, tokw + nb * 8 + (lane >> 2), kk) + 4 * (lane & 3)
                        return ring[w0:w0 + 4]
                    s[wm * 16:wm * 16 + 16, tokw + nb * 8:tokw + nb * 8 + 8] += mma(a, k_bytes)
    return s


def mma(a, k_bytes):
    """One m16n8k16 MMA's product A @ B from its lanes' registers: a[lane]
    the four A registers (element pairs), k_bytes(lane) the four K values
    whose pairs <0, 1> and <2, 3> form the lane's two B registers."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for lane in range(32):
        g, q4 = lane >> 2, lane & 3
        wbytes = k_bytes(lane)
        # A registers a0..a3: (g, 2q..), (g+8, 2q..), (g, 2q+8..), (g+8, 2q+8..)
        A[g, 2 * q4:2 * q4 + 2] = a[lane, 0]
        A[g + 8, 2 * q4:2 * q4 + 2] = a[lane, 1]
        A[g, 2 * q4 + 8:2 * q4 + 10] = a[lane, 2]
        A[g + 8, 2 * q4 + 8:2 * q4 + 10] = a[lane, 3]
        # B: b0 = bytes <0, 1> at k 2q, 2q+1; b1 = bytes <2, 3> at k 2q+8, 2q+9; column g
        B[2 * q4:2 * q4 + 2, g] = wbytes[0:2]
        B[2 * q4 + 8:2 * q4 + 10, g] = wbytes[2:4]
    return A @ B


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("wm_count,wn,tw", [(1, 2, 16), (2, 1, 32), (1, 1, 16)])
def test_fp8_scores_pair_each_row_with_each_key(d, wm_count, wn, tw):
    rng = np.random.default_rng(d + 7 * wn + tw)
    rows, tile = 16 * wm_count, wn * tw
    # small integers: every product and sum exact, so the check is equality
    q = rng.integers(-8, 9, (rows, d)).astype(np.float64)
    k = rng.integers(-8, 9, (tile, d)).astype(np.float64)
    np.testing.assert_array_equal(scores(q, k, d, wm_count, wn, tw), q @ k.T)


def bf16_row_to_fp16(row_bits):
    """prepare_q_fp8's bf16 path on one row of bf16 bit patterns (uint16):
    (fp16 values, the row's factor 2^-e)."""
    f32 = (row_bits.astype(np.uint32) << 16).view(np.float32)
    mx = int((np.abs(f32).view(np.uint32)).max())
    ex = mx >> 23
    sh2 = min(14 - (ex - 127), 126)
    f = np.uint32((127 + sh2) << 23).view(np.float32)
    inv = np.uint32((127 - sh2) << 23).view(np.float32)
    return (f32 * f).astype(np.float16), inv


@pytest.mark.parametrize("magnitude", [2.0 ** -130, 1e-30, 1e-3, 1.0, 3.0e4, 1e6, 2e37])
def test_bf16_rows_become_fp16_exactly_in_range(magnitude):
    import ml_dtypes

    rng = np.random.default_rng(int(np.log2(magnitude) + 200))
    x = (rng.standard_normal(128) * magnitude).astype(np.float32).astype(ml_dtypes.bfloat16)
    bits = x.view(np.uint16)
    h, inv = bf16_row_to_fp16(bits)
    assert np.isfinite(h).all() and np.abs(h).max() < 2.0 ** 15 + 1
    back = h.astype(np.float64) * float(inv)
    exact = np.abs(x.astype(np.float64)) >= np.abs(x.astype(np.float64)).max() * 2.0 ** -28
    if np.abs(x.astype(np.float64)).max() >= 2.0 ** -100:  # rows of normal size reach [2^14, 2^15)
        assert 2.0 ** 14 <= np.abs(h.astype(np.float64)).max() < 2.0 ** 15
        np.testing.assert_array_equal(back[exact], x.astype(np.float64)[exact])
    np.testing.assert_allclose(back, x.astype(np.float64), rtol=2.0 ** -8, atol=np.abs(x.astype(np.float64)).max() * 2.0 ** -24)


def test_bf16_rows_of_zeros_and_infinities():
    import ml_dtypes

    z = np.zeros(64, ml_dtypes.bfloat16).view(np.uint16)
    h, inv = bf16_row_to_fp16(z)
    assert (h == 0).all() and np.isfinite(inv) and inv > 0
    x = np.ones(64, np.float32)
    x[3] = np.inf
    h, inv = bf16_row_to_fp16(x.astype(ml_dtypes.bfloat16).view(np.uint16))
    assert np.isinf(h[3]) and np.isfinite(inv)


def byte_perm(x, y, sel):
    """CUDA's __byte_perm: result byte i is byte (sel >> 4 i) & 7 of y:x."""
    src = [(x >> (8 * i)) & 0xFF for i in range(4)] + [(y >> (8 * i)) & 0xFF for i in range(4)]
    return sum(src[(sel >> (4 * i)) & 7] << (8 * i) for i in range(4))


def test_one_permutation_gives_the_even_and_odd_byte_pairs():
    """fp8x4_to_f16x2_even_odd: the pair (b0, b2) in the low half and (b1,
    b3) in the high half, each with its first byte low, as the two-call form
    (fp8x2_to_f16x2<0, 2> and <1, 3>) pairs them."""
    rng = np.random.default_rng(5)
    for w in rng.integers(0, 2 ** 32, 64, dtype=np.uint64).tolist():
        t = byte_perm(w, 0, 0x3120)
        b = [(w >> (8 * i)) & 0xFF for i in range(4)]
        assert t & 0xFFFF == b[0] | (b[2] << 8)  # converted as it is: <0, 1> of t
        assert t >> 16 == b[1] | (b[3] << 8)  # the high half: <2, 3> of t


# ---------------------------------------------------------------- FP8_WIDE_K (TUNING["fp8_wide_k_reads"])

MIRRORED_WIDE = [
    "if (FP8_WIDE_K && D >= 128) return r * D + ((ch ^ (((r & 1) << 2) | ((r >> 1) & 3))) << 4);",
    "const int r = e / GROUPS, j = e % GROUPS;",
    "const uint4 a = *reinterpret_cast<const uint4*>(qs + swz(r, 8 * j + c));",
    "make_uint4(cv(w[c]), cv(w[8 + c]), cv(w[16 + c]), cv(w[24 + c]));",
    "smem_u32(qs + swz(wm * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, (4 * j + i) * 2 + (lane >> 4))));",
    "const uint4 u = *reinterpret_cast<const uint4*>(kb + swz8(tokw + nb * 8 + (lane >> 2), 4 * j + (lane & 3)));",
    "mma16816<false>(s[nb], a[i][0], a[i][1], a[i][2], a[i][3], fp8x2_to_f16x2<0, 1>(w[i]),",
    "fp8x2_to_f16x2<2, 3>(w[i]));",
    "for (int kk = 0; kk < (FP8_WIDE_K ? 0 : D / 16); ++kk) {",
    "if (FP8_WIDE_K) return prepare_q_fp8_wide(qs, q_scale);",
]


def test_wide_mirrored_lines_are_in_the_kernel():
    assert_in_kernel(MIRRORED_WIDE)


def swz8_wide(d, r, ch):
    if d >= 128:
        return r * d + ((ch ^ (((r & 1) << 2) | ((r >> 1) & 3))) << 4)
    return swz8(d, r, ch)


def prepare_wide(qs, d, rows):
    """prepare_q_fp8_wide's regrouping, on the Q slot as uint32 words."""
    words = qs.view(np.uint32)
    for r in range(rows):
        for j in range(d // 64):
            offs = [swz(d, r, 8 * j + c) // 2 for c in range(8)]  # word offsets of the group's chunks
            w = np.concatenate([words[o:o + 4] for o in offs]).copy()
            for c in range(8):
                words[offs[c]:offs[c] + 4] = w[[c, 8 + c, 16 + c, 24 + c]]


def scores_wide(q, k, d, wm_count, wn, tw):
    """The kernel's S with FP8_WIDE_K, as a [rows, tokens] array."""
    rows, tile = 16 * wm_count, wn * tw
    slot = np.zeros(rows * d, np.float64)
    for r in range(rows):
        for ch in range(d // 8):
            slot[swz(d, r, ch):swz(d, r, ch) + 8] = q[r, 8 * ch:8 * ch + 8]
    as16 = slot.astype(np.float16)
    prepare_wide(as16, d, rows)
    slot = as16.astype(np.float64)
    ring = np.full(tile * d, np.nan)
    for r in range(tile):
        for ch in range(d // 16):
            ring[swz8_wide(d, r, ch):swz8_wide(d, r, ch) + 16] = k[r, 16 * ch:16 * ch + 16]
    assert not np.isnan(ring).any()  # the layout is a permutation of the tile's bytes
    s = np.zeros((rows, tile))
    for wm in range(wm_count):
        for wn_i in range(wn):
            tokw = wn_i * tw
            for j in range(d // 64):
                a = [ldsm_x4(slot, [swz(d, wm * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, (4 * j + i) * 2 + (lane >> 4))
                                    for lane in range(32)]) for i in range(4)]
                for nb in range(tw // 8):
                    for i in range(4):
                        def k_bytes(lane):  # word i of the lane's 16-byte read
                            u0 = swz8_wide(d, tokw + nb * 8 + (lane >> 2), 4 * j + (lane & 3))
                            return ring[u0 + 4 * i:u0 + 4 * i + 4]
                        s[wm * 16:wm * 16 + 16, tokw + nb * 8:tokw + nb * 8 + 8] += mma(a[i], k_bytes)
    return s


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("wm_count,wn,tw", [(1, 2, 16), (2, 1, 32), (1, 1, 16)])
def test_wide_fp8_scores_pair_each_row_with_each_key(d, wm_count, wn, tw):
    rng = np.random.default_rng(d + 7 * wn + tw + 1)
    rows, tile = 16 * wm_count, wn * tw
    q = rng.integers(-8, 9, (rows, d)).astype(np.float64)
    k = rng.integers(-8, 9, (tile, d)).astype(np.float64)
    np.testing.assert_array_equal(scores_wide(q, k, d, wm_count, wn, tw), q @ k.T)


def banks(byte_offsets):
    """The most distinct 4-byte words that 16-byte reads at these byte
    offsets put on one shared-memory bank (1: conflict-free)."""
    per_bank = {}
    for off in byte_offsets:
        for b in range(off, off + 16, 4):
            per_bank.setdefault((b // 4) % 32, set()).add(b // 4)
    return max(len(v) for v in per_bank.values())


@pytest.mark.parametrize("d", [64, 128, 256])
def test_wide_k_reads_and_v_ldmatrix_are_conflict_free(d):
    """Each quarter-warp's 16-byte K reads (lanes 8h..8h+7: rows 2h, 2h+1 of
    8, chunks 4j..4j+3) touch every bank once, and each ldmatrix matrix of V
    (8 consecutive rows, one chunk) as well: the wide swizzle keeps both."""
    for base in (0, 8, 40):
        for j in range(d // 64):
            for h in range(4):
                offs = [swz8_wide(d, base + 2 * h + (lane >> 2), 4 * j + (lane & 3)) for lane in range(8)]
                assert banks(offs) == 1, (d, base, j, h)
        for ch in range(d // 16):
            offs = [swz8_wide(d, base + r, ch) for r in range(8)]
            assert banks(offs) == 1, (d, base, ch)
