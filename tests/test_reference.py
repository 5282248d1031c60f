"""The float64 reference, the schedule emulation and the NumPy front end,
against a naive softmax written here.

The naive attention works on a dense float64 copy of the cache, one
(sequence, query head) at a time; paged caches are built from that dense copy
with shuffled page order, random page sizes, NaN-filled junk pages and NaN
tails, so reading anything outside the sequence shows up as NaN.
"""

import math
import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import cupy_lean
from cupy_lean import head_schedule, lean_schedule, reference, split_schedule

BF16 = np.dtype(ml_dtypes.bfloat16)

# ------------------------------------------------------------------ naive reference


def naive_attention(q, kd, vd, lens, scale=None):
    """Textbook softmax attention in float64 on a dense cache
    ``(batch, seqlen, heads_kv, head_dim)``; query head ``i`` reads KV head
    ``i // group``. Returns ``out``, natural-log ``lse``."""
    q = np.asarray(q).astype(np.float64)
    kd = np.asarray(kd).astype(np.float64)
    vd = np.asarray(vd).astype(np.float64)
    batch, hq, d = q.shape
    group = hq // kd.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    out = np.zeros((batch, hq, d))
    lse = np.full((batch, hq), -np.inf)
    for b in range(batch):
        n = int(lens[b])
        if n == 0:
            continue
        for i in range(hq):
            h = i // group
            scores = np.array([scale * float(np.dot(kd[b, t, h], q[b, i])) for t in range(n)])
            top = scores.max()
            w = np.exp(scores - top)
            out[b, i] = (w / w.sum()) @ vd[b, :n, h]
            lse[b, i] = top + math.log(w.sum())
    return out, lse


def make_problem(lens, heads_kv, group, head_dim, seed, pad=0, dtype=np.float64):
    """q and a dense cache with ``seqlen = max(lens) + pad``; tokens past each
    sequence's length are NaN (they must never be read)."""
    rng = np.random.default_rng(seed)
    batch = len(lens)
    seqlen = max(lens, default=0) + pad
    hq = heads_kv * group
    q = rng.standard_normal((batch, hq, head_dim))
    k = rng.standard_normal((batch, seqlen, heads_kv, head_dim))
    v = rng.standard_normal((batch, seqlen, heads_kv, head_dim))
    for b, n in enumerate(lens):
        k[b, n:] = np.nan
        v[b, n:] = np.nan
    lens = np.asarray(lens, dtype=np.int64).reshape(-1)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), lens


def make_paged(k, v, lens, page_size, seed):
    """Scatter a dense cache into shuffled pages. Junk pages and the tails of
    last pages are NaN; unused trailing block_table entries are -1 or out of
    range."""
    rng = np.random.default_rng(seed + 1)
    batch, _, hkv, d = k.shape
    used = [-(-int(n) // page_size) for n in lens]
    max_pages = max(used + [1]) + int(rng.integers(0, 3))
    num_pages = sum(used) + int(rng.integers(0, 4))
    perm = rng.permutation(num_pages)
    kp = np.full((num_pages, page_size, hkv, d), np.nan, dtype=k.dtype)
    vp = np.full((num_pages, page_size, hkv, d), np.nan, dtype=v.dtype)
    table = np.where(rng.random((batch, max_pages)) < 0.5, -1, num_pages + 7).astype(np.int32)
    nxt = 0
    for b, n in enumerate(lens):
        for j in range(used[b]):
            pid = perm[nxt]
            nxt += 1
            table[b, j] = pid
            t0, t1 = j * page_size, min((j + 1) * page_size, int(n))
            kp[pid, : t1 - t0] = k[b, t0:t1]
            vp[pid, : t1 - t0] = v[b, t0:t1]
    return kp, vp, table


def close(a, b, rtol=1e-10, atol=1e-12):
    """allclose that also requires -inf exactly where expected."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    assert np.array_equal(np.isneginf(a), np.isneginf(b))
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def assert_empty_rows(out, lse, lens):
    for b, n in enumerate(lens):
        if n == 0:
            assert np.all(np.asarray(out[b], dtype=np.float64) == 0)
            assert np.all(np.isneginf(np.asarray(lse[b], dtype=np.float64)))


# ------------------------------------------------------------------ strategies

lens_st = st.lists(st.integers(0, 300), min_size=0, max_size=5)
lens1_st = st.lists(st.integers(0, 300), min_size=1, max_size=5)
heads_st = st.integers(1, 3)
group_st = st.sampled_from([1, 2, 4, 8])  # MHA, GQA, (with heads_kv 1) MQA
dim_st = st.sampled_from([8, 16, 32, 64])
seed_st = st.integers(0, 2**31 - 1)
scale_st = st.one_of(st.none(), st.sampled_from([0.05, 1.0, 4.0]))

# (lens, heads_kv, group, head_dim, scale, seed)
ATT_EDGE = [
    ([0], 1, 1, 8, None, 0),  # length 0
    ([1], 1, 4, 16, None, 1),  # length 1, MQA
    ([15, 16, 17], 2, 2, 8, None, 2),  # tile-1, tile, tile+1 (tile 16)
    ([63, 64, 65, 0], 2, 1, 64, None, 3),  # same for tile 64, MHA
    ([300, 0, 5, 1, 129], 3, 2, 32, 4.0, 4),  # ragged, large scale
    ([0, 0], 2, 2, 8, None, 5),  # every sequence empty
]


# ------------------------------------------------------------------ reference.attention

@given(lens_st, heads_st, group_st, dim_st, scale_st, seed_st)
@example([], 2, 2, 8, None, 0)  # batch 0
@example(*ATT_EDGE[0])
@example(*ATT_EDGE[1])
@example(*ATT_EDGE[2])
@example(*ATT_EDGE[3])
@example(*ATT_EDGE[4])
@example(*ATT_EDGE[5])
def test_reference_ragged(lens, heads_kv, group, head_dim, scale, seed):
    q, k, v, lens = make_problem(lens, heads_kv, group, head_dim, seed, pad=3)
    out, lse = reference.attention(q, k, v, kv_lens=lens, scale=scale)
    assert out.dtype == np.float64 and lse.dtype == np.float64
    assert out.shape == q.shape and lse.shape == q.shape[:2]
    ref_out, ref_lse = naive_attention(q, k, v, lens, scale)
    close(out, ref_out)
    close(lse, ref_lse)
    assert_empty_rows(out, lse, lens)
    assert np.all(np.isfinite(out))


@given(st.integers(0, 4), st.integers(0, 70), heads_st, group_st, dim_st, seed_st)
@example(1, 0, 1, 1, 8, 0)
@example(1, 1, 2, 2, 8, 0)
@example(3, 16, 1, 8, 16, 0)
@example(0, 5, 1, 1, 8, 0)
def test_reference_dense_default_lengths(batch, seqlen, heads_kv, group, head_dim, seed):
    q, k, v, lens = make_problem([seqlen] * batch, heads_kv, group, head_dim, seed)
    out, lse = reference.attention(q, k, v)
    ref_out, ref_lse = naive_attention(q, k, v, lens)
    close(out, ref_out)
    close(lse, ref_lse)


@given(lens_st, heads_st, group_st, dim_st, st.integers(1, 40), seed_st)
@example([0], 1, 1, 8, 16, 0)
@example([1], 1, 8, 8, 16, 0)
@example([15, 16, 17], 2, 2, 8, 16, 0)  # page boundaries
@example([300, 0, 7], 1, 4, 16, 1, 0)  # page size 1
@example([33, 32, 31], 2, 1, 32, 40, 0)  # one page per sequence
@example([], 1, 1, 8, 4, 0)
def test_reference_paged(lens, heads_kv, group, head_dim, page_size, seed):
    q, k, v, lens = make_problem(lens, heads_kv, group, head_dim, seed)
    kp, vp, table = make_paged(k, v, lens, page_size, seed)
    out, lse = reference.attention(q, kp, vp, kv_lens=lens, block_table=table)
    ref_out, ref_lse = naive_attention(q, k, v, lens)
    close(out, ref_out)
    close(lse, ref_lse)
    assert np.all(np.isfinite(out)), "junk pages / unused entries must not be read"
    assert_empty_rows(out, lse, lens)


def test_reference_paged_needs_lengths():
    q, k, v, lens = make_problem([3], 1, 1, 8, 0)
    kp, vp, table = make_paged(k, v, lens, 2, 0)
    with pytest.raises(ValueError, match="kv_lens"):
        reference.attention(q, kp, vp, block_table=table)


# ------------------------------------------------------------------ reference.emulate

def _build(kind, lens, heads_kv, tile_size, count):
    if kind == "lean":
        return lean_schedule(lens, heads_kv, tile_size=tile_size, num_ctas=count)
    if kind == "split":
        return split_schedule(lens, heads_kv, tile_size=tile_size, num_splits=count)
    return head_schedule(lens, heads_kv, tile_size=tile_size)


# (lens, heads_kv, group, head_dim, tile_size, count, paged, seed)
EMU_EDGE = [
    ([0], 1, 1, 8, 16, 4, False, 0),  # length 0
    ([1], 2, 2, 8, 16, 4, False, 0),  # length 1
    ([15, 16, 17], 2, 2, 8, 16, 3, False, 0),  # tile-1, tile, tile+1
    ([17, 1, 0], 2, 1, 8, 16, 1000, False, 0),  # more CTAs than tiles
    ([300, 5, 0, 77], 3, 2, 16, 16, 1, True, 0),  # one CTA, paged
    ([5, 1, 1, 1, 9], 1, 4, 8, 1, 2, False, 0),  # a CTA crossing whole units
    ([], 2, 2, 8, 16, 3, False, 0),  # batch 0
    ([0, 0, 0], 2, 2, 8, 16, 3, False, 0),  # all empty
    ([300, 299, 1, 64, 65], 2, 2, 16, 64, 7, True, 0),  # ragged, few CTAs
]


@pytest.mark.parametrize("kind", ["lean", "split", "head"])
@given(lens=lens_st, heads_kv=heads_st, group=group_st, head_dim=dim_st,
       tile_size=st.sampled_from([1, 3, 16, 32, 64]),
       count=st.one_of(st.just(1), st.integers(2, 9), st.integers(10, 2000)),
       paged=st.booleans(), seed=seed_st)
@example(*EMU_EDGE[0])
@example(*EMU_EDGE[1])
@example(*EMU_EDGE[2])
@example(*EMU_EDGE[3])
@example(*EMU_EDGE[4])
@example(*EMU_EDGE[5])
@example(*EMU_EDGE[6])
@example(*EMU_EDGE[7])
@example(*EMU_EDGE[8])
def test_emulate_equals_reference(kind, lens, heads_kv, group, head_dim, tile_size, count, paged, seed):
    if kind == "split":
        count = min(count, 9)  # num_splits
    q, k, v, lens = make_problem(lens, heads_kv, group, head_dim, seed, pad=2)
    kw = dict(kv_lens=lens)
    if paged:
        k, v, table = make_paged(k, v, lens, page_size=int(1 + seed % 20), seed=seed)
        kw["block_table"] = table
    sched = _build(kind, lens, heads_kv, tile_size, count)
    ref_out, ref_lse = reference.attention(q, k, v, **kw)
    out, lse, slots = reference.emulate(sched, q, k, v, return_partials=True, **kw)
    assert np.allclose(out, ref_out, rtol=1e-10, atol=1e-13)
    assert np.allclose(lse, ref_lse, rtol=1e-10, atol=1e-13)
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    assert_empty_rows(out, lse, lens)
    # One workspace state per partial segment, in the slots the schedule names.
    part = sched.segments[sched.segments["partial"]]
    assert sorted(slots) == sorted(int(s) for s in part["slot"])
    for m, l, acc in slots.values():
        assert m.shape == l.shape == (group,) and acc.shape == (group, head_dim)
        assert np.all(l > 0)


def test_emulate_rejects_a_schedule_built_for_other_arrays():
    q, k, v, lens = make_problem([5, 3], 2, 2, 8, 0)
    with pytest.raises(ValueError, match="kv_lens"):
        reference.emulate(lean_schedule([5, 4], 2, tile_size=2, num_ctas=3), q, k, v, kv_lens=lens)
    with pytest.raises(ValueError, match="heads_kv"):
        reference.emulate(lean_schedule([5, 3], 1, tile_size=2, num_ctas=3), q, k, v, kv_lens=lens)


# ------------------------------------------------------------------ merge_states

def _random_states(parts, rows, d, seed, p_empty):
    rng = np.random.default_rng(seed)
    outs = rng.standard_normal((parts, rows, d))
    lses = 5 * rng.standard_normal((parts, rows))
    empty = rng.random((parts, rows)) < p_empty
    lses[empty] = -np.inf
    outs[empty] = 0.0
    return outs, lses


def _pub_merge(outs, lses):
    return cupy_lean.merge_states(outs, lses)


@given(st.integers(1, 6), st.integers(1, 16), seed_st, st.sampled_from([0.0, 0.3, 1.0]))
@example(1, 1, 0, 0.0)
@example(4, 8, 1, 1.0)  # every part empty: zeros and -inf
@example(5, 3, 2, 0.5)
def test_merge_states_associative(rows, d, seed, p_empty):
    outs, lses = _random_states(3, rows, d, seed, p_empty)
    a, b, c = ((outs[i], lses[i]) for i in range(3))
    for merge, tol in ((reference.merge_states, dict(rtol=1e-12, atol=1e-12)),
                       (_pub_merge, dict(rtol=2e-5, atol=2e-5))):
        ab = merge(np.stack([a[0], b[0]]), np.stack([a[1], b[1]]))
        bc = merge(np.stack([b[0], c[0]]), np.stack([b[1], c[1]]))
        left = merge(np.stack([ab[0], c[0]]), np.stack([ab[1], c[1]]))
        right = merge(np.stack([a[0], bc[0]]), np.stack([a[1], bc[1]]))
        flat = merge(outs, lses)
        for x in (left, right):
            close(x[0], flat[0], **tol)
            close(x[1], flat[1], **tol)
        # A single part merges to itself; an all-empty row gives zeros, -inf.
        one = merge(outs[:1], lses[:1])
        close(one[0], outs[0], **tol)
        close(one[1], lses[0], **tol)
        dead = np.all(np.isneginf(lses), axis=0)
        assert np.all(flat[0][dead] == 0) and np.all(np.isneginf(flat[1][dead]))
        assert np.all(np.isfinite(flat[0]))


@given(lens_st, heads_st, group_st, dim_st, st.lists(st.integers(0, 310), max_size=4), seed_st)
@example([0], 1, 1, 8, [], 0)  # one part, empty sequence
@example([10, 0, 3], 2, 2, 8, [0], 1)  # an empty first part
@example([10, 5], 1, 4, 8, [5, 5, 5], 2)  # empty middle parts
@example([16, 17, 15], 2, 1, 16, [16], 3)
@example([300, 1, 0, 77, 150], 1, 8, 32, [1, 77, 299], 4)
def test_merge_states_equals_attention_over_concatenation(lens, heads_kv, group, head_dim, cuts, seed):
    q, k, v, lens = make_problem(lens, heads_kv, group, head_dim, seed)
    seqlen = k.shape[1]
    bounds = [0] + sorted(min(c, seqlen) for c in cuts) + [seqlen, seqlen]  # last part empty
    outs, lses = [], []
    for a, b in zip(bounds, bounds[1:]):
        part_lens = np.clip(lens - a, 0, b - a)
        o, s = reference.attention(q, k[:, a:b], v[:, a:b], kv_lens=part_lens)
        if b == a:
            assert np.all(o == 0) and np.all(np.isneginf(s)), "empty part: zeros, -inf"
        outs.append(o)
        lses.append(s)
    outs, lses = np.stack(outs), np.stack(lses)
    full_out, full_lse = naive_attention(q, k, v, lens)

    out, lse = reference.merge_states(outs, lses)
    close(out, full_out)
    close(lse, full_lse)
    assert_empty_rows(out, lse, lens)

    pout, plse = cupy_lean.merge_states(outs, lses)
    assert pout.dtype == np.float64 and plse.dtype == np.float32
    close(pout, full_out)
    close(plse, full_lse, rtol=2.0**-23, atol=1e-6)
    assert_empty_rows(pout, plse, lens)

    # float32 parts, as the GPU produces them.
    pout32, plse32 = cupy_lean.merge_states(outs.astype(np.float32), lses.astype(np.float32))
    assert pout32.dtype == np.float32 and plse32.dtype == np.float32
    close(pout32, full_out, rtol=1e-5, atol=1e-5)
    close(plse32, full_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32, np.float64])
def test_merge_states_public_dtypes(dtype):
    outs, lses = _random_states(3, 6, 16, 7, 0.3)
    lses = lses.astype(np.float32)
    ref_out, ref_lse = reference.merge_states(outs.astype(dtype), lses)
    out, lse = cupy_lean.merge_states(outs.astype(dtype), lses)
    assert out.dtype == np.dtype(dtype) and lse.dtype == np.float32
    assert out.shape == (6, 16) and lse.shape == (6,)
    eps = float(ml_dtypes.finfo(dtype).eps)
    close(out, ref_out, rtol=2 * eps, atol=2 * eps * np.abs(ref_out).max())
    close(lse, ref_lse, rtol=1e-6, atol=1e-5)


# ------------------------------------------------------------------ NaN

@given(lens1_st, heads_st, group_st, st.sampled_from(["q", "k", "v", "k_beyond", "v_beyond"]),
       seed_st)
@example([1], 1, 1, "q", 0)
@example([0, 5], 2, 2, "k", 0)
@example([16, 17, 15], 2, 2, "v", 0)
@example([3, 40], 1, 4, "k_beyond", 0)
@example([1, 0, 2], 3, 1, "v_beyond", 0)
def test_nan_stays_in_its_sequence(lens, heads_kv, group, where, seed):
    if max(lens) == 0:
        lens = lens + [1]
    rng = np.random.default_rng(seed)
    q, k, v, lens = make_problem(lens, heads_kv, group, 8, seed, pad=2)
    k = np.nan_to_num(k, nan=0.5)  # finite everywhere first
    v = np.nan_to_num(v, nan=0.5)
    b = int(rng.choice(np.nonzero(lens)[0]))
    h = int(rng.integers(heads_kv))
    j = int(rng.integers(8))
    group_rows = slice(h * group, (h + 1) * group)
    if where == "q":
        i = int(h * group + rng.integers(group))
        q[b, i, j] = np.nan
        hit = slice(i, i + 1)
    else:
        arr = k if where.startswith("k") else v
        if where.endswith("beyond"):
            t = int(rng.integers(lens[b], k.shape[1]))  # past kv_len: never read
            hit = None
        else:
            t = int(rng.integers(lens[b]))
            hit = group_rows
        arr[b, t, h, j] = np.nan

    clean = naive_attention(np.nan_to_num(q), np.nan_to_num(k), np.nan_to_num(v), lens)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing raises, not even a warning
        results = [reference.attention(q, k, v, kv_lens=lens),
                   cupy_lean.attention(q, k, v, kv_lens=lens, return_lse=True),
                   cupy_lean.attention(q.astype(np.float32), k.astype(np.float32),
                                       v.astype(np.float32), kv_lens=lens, return_lse=True)]
    for out, lse in results:
        out = np.asarray(out, dtype=np.float64)
        mask = np.zeros(out.shape[:2], dtype=bool)
        if hit is not None:
            mask[b, hit] = True
            assert np.isnan(out[b, hit]).any(axis=-1).all(), "NaN must reach the output"
            if where != "v":
                assert np.isnan(lse[b, hit]).all()
        # Everything else is untouched.
        assert np.all(np.isfinite(out[~mask]))
        tol = 1e-10 if out.dtype == np.float64 and lse.dtype == np.float64 else 1e-5
        np.testing.assert_allclose(out[~mask], clean[0][~mask], rtol=tol, atol=tol)
        np.testing.assert_allclose(np.asarray(lse, np.float64)[~mask], clean[1][~mask],
                                   rtol=tol, atol=tol)


def test_nan_in_merge_states_stays_in_its_row():
    outs, lses = _random_states(3, 4, 8, 0, 0.0)
    outs[1, 2, 5] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = cupy_lean.merge_states(outs, lses)
    assert np.isnan(out[2]).any()
    assert np.all(np.isfinite(np.delete(out, 2, axis=0)))
    assert np.all(np.isfinite(lse))


# ------------------------------------------------------------------ cupy_lean.attention (NumPy path)

def _eps_tiny(dtype):
    """Bound of one rounding to ``dtype``: relative eps, absolute smallest
    subnormal. float64 has no output rounding, only the float64 math itself."""
    if np.dtype(dtype) == np.float64:
        return 1e-12, 1e-15
    fi = ml_dtypes.finfo(dtype)
    return float(fi.eps), float(fi.smallest_subnormal)


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32, np.float64])
@given(lens=lens1_st, heads_kv=heads_st, group=group_st, head_dim=dim_st, paged=st.booleans(),
       seed=seed_st)
@example([0], 1, 1, 8, False, 0)
@example([1], 1, 8, 64, False, 0)
@example([15, 16, 17], 2, 2, 16, True, 0)
@example([63, 64, 65, 0, 300], 3, 1, 64, True, 0)
@example([0, 0], 2, 2, 8, True, 0)
def test_attention_numpy_dtypes(dtype, lens, heads_kv, group, head_dim, paged, seed):
    dtype = np.dtype(dtype)
    q, k, v, lens = make_problem(lens, heads_kv, group, head_dim, seed, pad=1, dtype=dtype)
    kw = dict(kv_lens=lens)
    dense_k, dense_v = k, v
    if paged:
        k, v, table = make_paged(k, v, lens, page_size=int(1 + seed % 17), seed=seed)
        kw["block_table"] = table
    ref_out, ref_lse = naive_attention(q, dense_k, dense_v, lens)

    out, lse = cupy_lean.attention(q, k, v, return_lse=True, **kw)
    assert isinstance(out, np.ndarray) and isinstance(lse, np.ndarray)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == np.float32 and lse.shape == q.shape[:2]
    # Exact math in float64, one rounding to the output dtype: within an ulp.
    eps, tiny = _eps_tiny(dtype)
    err = np.abs(out.astype(np.float64) - ref_out)
    assert np.all(err <= eps * np.abs(ref_out) + tiny), f"max error {err.max()}"
    close(lse, ref_lse, rtol=2.0**-23, atol=1e-6)
    assert_empty_rows(out, lse, lens)

    # Without return_lse: the same output alone.
    only = cupy_lean.attention(q, k, v, **kw)
    assert isinstance(only, np.ndarray)
    np.testing.assert_array_equal(only.astype(np.float64), out.astype(np.float64))

    # out= is written in place and returned.
    buf = np.full(q.shape, 7, dtype=dtype)
    res, lse2 = cupy_lean.attention(q, k, v, out=buf, return_lse=True, **kw)
    assert res is buf
    np.testing.assert_array_equal(buf.astype(np.float64), out.astype(np.float64))
    np.testing.assert_array_equal(lse2, lse)


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32])
@given(batch=st.integers(1, 4), heads_kv=heads_st, group=group_st, seqlen=st.integers(1, 70),
       head_dim=dim_st, seed=seed_st)
@example(1, 1, 1, 1, 8, 0)
@example(3, 2, 4, 17, 16, 0)
def test_attention_transposed_cache(dtype, batch, heads_kv, group, seqlen, head_dim, seed):
    """A (batch, heads_kv, seqlen, head_dim) cache passed as .transpose(0, 2, 1, 3)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, heads_kv * group, head_dim)).astype(dtype)
    kh = rng.standard_normal((batch, heads_kv, seqlen, head_dim)).astype(dtype)
    vh = rng.standard_normal((batch, heads_kv, seqlen, head_dim)).astype(dtype)
    k, v = kh.transpose(0, 2, 1, 3), vh.transpose(0, 2, 1, 3)
    assert not k.flags.c_contiguous or heads_kv == 1 or seqlen == 1
    lens = rng.integers(0, seqlen + 1, size=batch)
    out, lse = cupy_lean.attention(q, k, v, kv_lens=lens, return_lse=True)
    ref_out, ref_lse = naive_attention(q, k, v, lens)
    eps, tiny = _eps_tiny(dtype)
    assert out.dtype == np.dtype(dtype)
    assert np.all(np.abs(out.astype(np.float64) - ref_out) <= eps * np.abs(ref_out) + tiny)
    close(lse, ref_lse, rtol=2.0**-23, atol=1e-6)
    # The same as a contiguous copy, bit for bit.
    out_c = cupy_lean.attention(q, np.ascontiguousarray(k), np.ascontiguousarray(v), kv_lens=lens)
    np.testing.assert_array_equal(out.astype(np.float64), out_c.astype(np.float64))


def test_attention_default_lengths_and_scale():
    q, k, v, lens = make_problem([9, 9, 9], 2, 2, 16, 0)
    out, lse = cupy_lean.attention(q, k, v, return_lse=True)
    ref_out, ref_lse = naive_attention(q, k, v, lens)
    close(out, ref_out)
    close(lse, ref_lse, rtol=1e-7, atol=1e-6)
    out2, lse2 = cupy_lean.attention(q, k, v, scale=0.3, return_lse=True)
    ref_out2, ref_lse2 = naive_attention(q, k, v, lens, scale=0.3)
    close(out2, ref_out2)
    close(lse2, ref_lse2, rtol=1e-7, atol=1e-6)
    assert not np.allclose(out, out2)


@pytest.mark.parametrize(
    "opts",
    [dict(schedule="lean"), dict(schedule="split"), dict(schedule="head"),
     dict(schedule="lean", num_ctas=1, tile_size=16), dict(schedule="split", num_ctas=7),
     dict(tile_size=128)],
)
def test_attention_schedule_options_same_result_on_cpu(opts):
    q, k, v, lens = make_problem([0, 17, 300], 2, 4, 32, 3, dtype=np.float32)
    base = cupy_lean.attention(q, k, v, kv_lens=lens)
    np.testing.assert_array_equal(cupy_lean.attention(q, k, v, kv_lens=lens, **opts), base)


# Zero-size arrays: NumPy >= 2 gives them all-zero strides, which an earlier
# version of the last-axis stride check rejected ("q: expected unit stride on
# the last axis (head_dim), got a stride of 0 elements").
@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32])
def test_attention_batch_zero(dtype):
    q = np.zeros((0, 4, 16), dtype=dtype)
    k = np.zeros((0, 5, 2, 16), dtype=dtype)
    out, lse = cupy_lean.attention(q, k, k, return_lse=True)
    assert out.shape == (0, 4, 16) and out.dtype == np.dtype(dtype)
    assert lse.shape == (0, 4) and lse.dtype == np.float32
    out2 = cupy_lean.attention(q, k, k, kv_lens=np.zeros(0, np.int32), out=np.empty_like(q))
    assert out2.shape == (0, 4, 16)


def test_attention_empty_cache():
    q = np.ones((2, 4, 16), dtype=np.float16)
    k = np.zeros((2, 0, 2, 16), dtype=np.float16)  # seqlen 0
    out, lse = cupy_lean.attention(q, k, k, return_lse=True)
    assert np.all(out == 0) and np.all(np.isneginf(lse))


def test_emulate_merge_launch_merges_all_pieces_at_once():
    """A lean schedule merged by the combine launch (``merge_launch``): the same
    segments and slots, each unit's pieces merged in one step in CTA order,
    equal to the reference; the in-kernel schedule's grouped merge of a unit
    of many pieces gives the same result up to rounding."""
    lens = np.array([200, 1, 0, 77])
    q, k, v, lens = make_problem(lens, 2, 3, 16, 5, pad=2)
    flat = lean_schedule(lens, 2, tile_size=2, num_ctas=90, merge_launch=True)
    tree = lean_schedule(lens, 2, tile_size=2, num_ctas=90)
    assert flat.merge_launch and not tree.merge_launch
    assert np.array_equal(flat.segments, tree.segments) and flat.contributors.max() >= 16
    ref_out, ref_lse = reference.attention(q, k, v, kv_lens=lens)
    out, lse = reference.emulate(flat, q, k, v, kv_lens=lens)
    assert np.allclose(out, ref_out, rtol=1e-10, atol=1e-13) and np.allclose(lse, ref_lse, rtol=1e-10, atol=1e-13)
    out2, _ = reference.emulate(tree, q, k, v, kv_lens=lens)
    assert np.allclose(out, out2, rtol=1e-10, atol=1e-13)
