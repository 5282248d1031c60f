"""Attention sinks, sliding windows and logit soft-capping in the float64
reference, the schedule emulation and the NumPy front end, against a naive
softmax written here; and their validation. (GPU kernels: test_gpu_use.py.)"""

import math

import sys

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import cupy_lean
from cupy_lean import lean_schedule, reference, split_schedule
from test_reference import close, make_paged, make_problem


def naive(q, kd, vd, lens, scale=None, sinks=None, window_left=None, softcap=None):
    """One (sequence, query head) at a time: the keys the query sees, the
    scores (soft-capped), then the softmax with the sink as one more logit of
    value zero."""
    q, kd, vd = (np.asarray(x, dtype=np.float64) for x in (q, kd, vd))
    batch, hq, d = q.shape
    group = hq // kd.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = np.zeros((batch, hq, d))
    lse = np.full((batch, hq), -np.inf)
    for b in range(batch):
        n = int(lens[b])
        lo = 0 if window_left is None else max(0, n - 1 - window_left)
        for i in range(hq):
            h = i // group
            s = [scale * float(np.dot(kd[b, t, h], q[b, i])) for t in range(lo, n)]
            if softcap is not None:
                s = [softcap * math.tanh(x / softcap) for x in s]
            vals = [vd[b, t, h] for t in range(lo, n)]
            if sinks is not None and sinks[i] != -np.inf:
                s.append(float(sinks[i]))
                vals.append(np.zeros(d))
            if not s:
                continue
            top = max(s)
            w = np.exp(np.array(s) - top)
            out[b, i] = (w / w.sum()) @ np.array(vals)
            lse[b, i] = top + math.log(w.sum())
    return out, lse


@given(st.lists(st.integers(0, 70), min_size=1, max_size=4), st.integers(1, 2), st.integers(1, 3),
       st.one_of(st.none(), st.integers(0, 40)), st.one_of(st.none(), st.floats(0.5, 30)),
       st.booleans(), st.integers(0, 10**6))
@example([0, 1, 64], 2, 3, 0, None, True, 1)
@example([33, 0], 1, 1, 5, 1.0, False, 2)
def test_reference_matches_naive(lens, hkv, group, window, cap, with_sinks, seed):
    q, k, v, lens = make_problem(lens, hkv, group, 16, seed)
    rng = np.random.default_rng(seed)
    sinks = None
    if with_sinks:
        sinks = rng.standard_normal(hkv * group) * 2
        sinks[0] = -np.inf  # no sink for that head
    out, lse = reference.attention(q, k, v, kv_lens=lens, sinks=sinks, window_left=window, softcap=cap)
    ro, rl = naive(q, k, v, lens, sinks=sinks, window_left=window, softcap=cap)
    close(out, ro)
    close(lse, rl)


def test_sink_of_an_empty_sequence_and_window_zero():
    q, k, v, lens = make_problem([0, 9], 1, 2, 16, 3)
    sinks = np.array([0.5, -2.0])
    out, lse = reference.attention(q, k, v, kv_lens=lens, sinks=sinks)
    assert np.all(out[0] == 0) and np.array_equal(lse[0], sinks)
    out, lse = reference.attention(q, k, v, kv_lens=lens, window_left=0)  # only the newest key
    s = (q[1] @ k[1, 8, 0]) / 4.0
    np.testing.assert_allclose(out[1], np.broadcast_to(v[1, 8, 0], (2, 16)), rtol=1e-12)
    np.testing.assert_allclose(lse[1], s, rtol=1e-12)


def test_window_past_the_length_is_the_whole_sequence_and_paged_agrees():
    q, k, v, lens = make_problem([40, 17, 3], 2, 2, 16, 5)
    full = reference.attention(q, k, v, kv_lens=lens)
    wide = reference.attention(q, k, v, kv_lens=lens, window_left=100)
    close(wide[0], full[0])
    close(wide[1], full[1])
    kp, vp, table = make_paged(k, v, lens, 8, 5)
    dense = reference.attention(q, k, v, kv_lens=lens, window_left=6, softcap=3.0)
    paged = reference.attention(q, kp, vp, kv_lens=lens, block_table=table, window_left=6, softcap=3.0)
    close(paged[0], dense[0])
    close(paged[1], dense[1])


@given(st.lists(st.integers(0, 300), min_size=1, max_size=5), st.integers(1, 3),
       st.one_of(st.none(), st.integers(0, 120)), st.sampled_from(["lean", "split"]),
       st.integers(1, 40), st.integers(0, 10**6))
@example([300, 0, 5], 2, 50, "lean", 7, 0)
def test_emulate_with_features_matches_the_reference(lens, hkv, window, kind, count, seed):
    """The decomposition over the window's tiles, partial states soft-capped,
    sinks folded once at the final merge: the reference's result."""
    q, k, v, lens = make_problem(lens, hkv, 2, 16, seed)
    sinks = np.random.default_rng(seed).standard_normal(hkv * 2)
    eff = lens - reference.window_start(lens, window)
    if kind == "lean":
        sched = lean_schedule(eff, hkv, tile_size=16, num_ctas=count)
    else:
        sched = split_schedule(eff, hkv, tile_size=16, num_splits=min(count, 9))
    got = reference.emulate(sched, q, k, v, kv_lens=lens, sinks=sinks, window_left=window, softcap=4.0)
    want = reference.attention(q, k, v, kv_lens=lens, sinks=sinks, window_left=window, softcap=4.0)
    close(got[0], want[0], rtol=1e-9, atol=1e-11)
    close(got[1], want[1], rtol=1e-9, atol=1e-11)


@given(st.lists(st.integers(0, 300), min_size=1, max_size=4), st.integers(1, 2), st.integers(1, 4),
       st.one_of(st.none(), st.integers(0, 120)), st.sampled_from(["lean", "split"]), st.integers(1, 40),
       st.booleans(), st.integers(0, 10**6))
@example([300, 0, 5], 2, 3, 50, "lean", 7, True, 0)
def test_emulate_with_query_tokens_matches_the_reference(lens, hkv, q_len, window, kind, count, ragged, seed):
    """q_len query tokens (optionally ragged) share a unit's tiles, each row
    with its own causal and window limits: the decomposition gives the
    reference's result, with sinks and soft-cap."""
    _, k, v, lens = make_problem(lens, hkv, 2, 16, seed)
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((len(lens), q_len, hkv * 2, 16))
    sinks = rng.standard_normal(hkv * 2)
    nq = rng.integers(0, q_len + 1, size=len(lens)) if ragged else None
    eff = lens - reference.window_start(lens, window, q_len if nq is None else nq)
    if kind == "lean":
        sched = lean_schedule(eff, hkv, tile_size=16, num_ctas=count)
    else:
        sched = split_schedule(eff, hkv, tile_size=16, num_splits=min(count, 9))
    kw = dict(kv_lens=lens, sinks=sinks, window_left=window, softcap=4.0, q_lens=nq)
    got = reference.emulate(sched, q, k, v, **kw)
    want = reference.attention(q, k, v, **kw)
    close(got[0], want[0], rtol=1e-9, atol=1e-11)
    close(got[1], want[1], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_emulate_reads_an_fp8_cache(fmt):
    from cupy_lean._dtypes import FP8_DTYPES

    q, k, v, lens = make_problem([50, 0, 9], 2, 3, 16, 6)
    k8 = np.nan_to_num(k).astype(FP8_DTYPES[fmt]).view(np.uint8)
    v8 = np.nan_to_num(v).astype(FP8_DTYPES[fmt]).view(np.uint8)
    sched = lean_schedule(lens, 2, tile_size=16, num_ctas=5)
    kw = dict(kv_lens=lens, kv_dtype=fmt, k_scale=np.array([0.5, 2.0]), v_scale=0.25)
    got = reference.emulate(sched, q, k8, v8, **kw)
    want = reference.attention(q, k8, v8, **kw)
    close(got[0], want[0], rtol=1e-9, atol=1e-11)
    close(got[1], want[1], rtol=1e-9, atol=1e-11)


def test_front_end_numpy_path_and_batch_invariant():
    q, k, v, lens = make_problem([20, 0, 7], 1, 4, 16, 9, dtype=np.float32)
    sinks = np.linspace(-1, 1, 4).astype(np.float32)
    out, lse = cupy_lean.attention(q, k, v, kv_lens=lens, return_lse=True, sinks=sinks, window_left=3,
                                   softcap=2.0)
    ro, rl = naive(q, k, v, lens, sinks=sinks, window_left=3, softcap=2.0)
    assert out.dtype == np.float32 and lse.dtype == np.float32
    np.testing.assert_allclose(out, ro, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, rl, rtol=1e-5, atol=1e-6)
    alone = cupy_lean.attention(q[:1], k[:1], v[:1], kv_lens=lens[:1], batch_invariant=True)
    together = cupy_lean.attention(q, k, v, kv_lens=lens, batch_invariant=True)
    assert np.array_equal(alone[0], together[0])


@pytest.mark.parametrize("kw,exc,match", [
    (dict(sinks=np.zeros(3)), ValueError, r"sinks: expected shape \(4,\) \(one logit per query head\), got \(3,\)"),
    (dict(sinks=np.zeros(4, np.int32)), TypeError, "sinks: expected a floating dtype, got int32"),
    (dict(sinks=np.array([0, np.nan, 0, 0])), ValueError, r"sinks: expected finite values .* sinks\[1\] = nan"),
    (dict(sinks="abcd"), TypeError, r"sinks: expected an array, got str 'abcd'"),
    (dict(sinks=np.array(list("abcd"))), TypeError, r"sinks: expected a floating dtype, got <U1"),
    (dict(window_left=-2), ValueError, r"window_left: expected an integer >= -1, got -2"),
    (dict(window_left=2.5), TypeError, "window_left: expected an integer, got float"),
    (dict(softcap=0.0), ValueError, r"softcap: expected a finite number > 0"),
    (dict(softcap=math.inf), ValueError, "softcap: expected a finite number > 0"),
    (dict(softcap=True), TypeError, "softcap: expected a real number, got bool"),
    (dict(batch_invariant=1), TypeError, "batch_invariant: expected True or False"),
    (dict(batch_invariant=True, schedule="split"), ValueError, "batch_invariant: needs schedule 'lean' or 'head'"),
])
def test_feature_arguments_are_validated(kw, exc, match):
    q, k, v, lens = make_problem([5, 3], 1, 4, 16, 1)
    with pytest.raises(exc, match=match):
        cupy_lean.attention(q, k, v, kv_lens=lens, **kw)


def test_window_minus_one_is_no_window_and_sinks_may_be_a_list():
    q, k, v, lens = make_problem([12, 4], 1, 2, 16, 2)
    a = cupy_lean.attention(q, k, v, kv_lens=lens, window_left=-1)
    b = cupy_lean.attention(q, k, v, kv_lens=lens)
    assert np.array_equal(a, b)
    c = cupy_lean.attention(q, k, v, kv_lens=lens, sinks=[0.5, -1.0])
    d = cupy_lean.attention(q, k, v, kv_lens=lens, sinks=np.array([0.5, -1.0]))
    assert np.array_equal(c, d)


# ---------------------------------------------------------------- several query tokens

@given(st.lists(st.integers(0, 60), min_size=1, max_size=3), st.integers(1, 5), st.integers(1, 2),
       st.one_of(st.none(), st.integers(0, 20)), st.booleans(), st.integers(0, 10**6))
@example([3, 0], 5, 1, None, False, 1)
def test_query_tokens_are_causal_decodes(lens, q_len, hkv, window, with_sinks, seed):
    """Query i of q_len sees keys [0, kv_len - q_len + i]: the decode of a
    sequence cut to kv_len - q_len + 1 + i keys (empty when that is <= 0)."""
    _, k, v, lens = make_problem(lens, hkv, 2, 16, seed)
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((len(lens), q_len, hkv * 2, 16))
    sinks = rng.standard_normal(hkv * 2) if with_sinks else None
    out, lse = reference.attention(q, k, v, kv_lens=lens, window_left=window, sinks=sinks)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    for i in range(q_len):
        cut = np.clip(lens - q_len + 1 + i, 0, None)
        ro, rl = naive(q[:, i], k, v, cut, sinks=sinks, window_left=window)
        close(out[:, i], ro)
        close(lse[:, i], rl)


def test_query_tokens_through_the_front_end_with_out_and_lse():
    q3, k, v, lens = make_problem([30, 4], 1, 4, 16, 4, dtype=np.float32)
    q = np.stack([q3, q3 * 0.5], axis=1)
    out = np.full(q.shape, np.nan, np.float32)
    lse = np.full(q.shape[:3], np.nan, np.float32)
    res, res_lse = cupy_lean.attention(q, k, v, kv_lens=lens, out=out, lse=lse)
    assert res is out and res_lse is lse and np.isfinite(out).all()
    last = cupy_lean.attention(q3 * 0.5, k, v, kv_lens=lens)
    np.testing.assert_allclose(out[:, 1], last, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 2, 4, 16\), got \(2, 4, 16\)"):
        cupy_lean.attention(q, k, v, kv_lens=lens, out=np.zeros((2, 4, 16), np.float32))
    with pytest.raises(ValueError, match="q: expected q_len >= 1"):
        cupy_lean.attention(q[:, :0], k, v, kv_lens=lens)


@given(st.lists(st.integers(0, 60), min_size=1, max_size=4), st.integers(1, 5), st.integers(1, 2),
       st.one_of(st.none(), st.integers(0, 20)), st.booleans(), st.integers(0, 10**6))
@example([3, 0, 40], 4, 1, None, True, 2)
def test_ragged_query_tokens_are_each_sequence_alone(lens, q_len, hkv, window, with_sinks, seed):
    """With q_lens, sequence b's first q_lens[b] tokens are the causal decode
    of a call with q_len = q_lens[b]; its padding tokens see no key (zero,
    -inf or the sink's logit)."""
    _, k, v, lens = make_problem(lens, hkv, 2, 16, seed)
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((len(lens), q_len, hkv * 2, 16))
    sinks = rng.standard_normal(hkv * 2) if with_sinks else None
    nq = rng.integers(0, q_len + 1, size=len(lens))
    out, lse = reference.attention(q, k, v, kv_lens=lens, window_left=window, sinks=sinks, q_lens=nq)
    for b in range(len(lens)):
        n = int(nq[b])
        if n:
            ro, rl = reference.attention(q[b:b + 1, :n], k[b:b + 1], v[b:b + 1], kv_lens=lens[b:b + 1],
                                         window_left=window, sinks=sinks)
            close(out[b, :n], ro[0])
            close(lse[b, :n], rl[0])
        assert (out[b, n:] == 0).all()
        want = np.broadcast_to(-np.inf if sinks is None else sinks, lse[b, n:].shape)
        close(lse[b, n:], want)
    full, full_lse = reference.attention(q, k, v, kv_lens=lens, window_left=window, sinks=sinks)
    same, same_lse = reference.attention(q, k, v, kv_lens=lens, window_left=window, sinks=sinks,
                                         q_lens=np.full(len(lens), q_len))
    assert np.array_equal(full, same) and np.array_equal(full_lse, same_lse)


def test_q_lens_is_checked():
    q3, k, v, lens = make_problem([30, 4], 1, 4, 16, 4, dtype=np.float32)
    q = np.stack([q3, q3], axis=1)
    with pytest.raises(ValueError, match=r"q_lens: expected values in \[0, 2\] \(q_len\), got q_lens\[0\] = 3"):
        cupy_lean.attention(q, k, v, kv_lens=lens, q_lens=[3, 0])
    with pytest.raises(ValueError, match=r"q_lens: expected integers of shape \(2,\)"):
        cupy_lean.attention(q, k, v, kv_lens=lens, q_lens=[1, 1, 1])
    for bad in ([1.0, 1.0], [True, False]):  # a wrong dtype is a TypeError, as for kv_lens
        with pytest.raises(TypeError, match=r"q_lens: expected integers of shape \(2,\), got (float64|bool)"):
            cupy_lean.attention(q, k, v, kv_lens=lens, q_lens=bad)
    with pytest.raises(ValueError, match="q_lens: needs q of shape"):
        cupy_lean.attention(q3, k, v, kv_lens=lens, q_lens=[1, 1])
    got = cupy_lean.attention(q, k, v, kv_lens=lens, q_lens=[1, 2])
    assert got.shape == q.shape and (got[0, 1] == 0).all()


# ---------------------------------------------------------------- fp8 caches

@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
@pytest.mark.parametrize("per_head", [False, True])
def test_fp8_cache_is_value_over_scale(name, per_head):
    from cupy_lean._dtypes import FP8_DTYPES

    q, k, v, lens = make_problem([50, 0, 9], 2, 3, 16, 6)
    lens_k = np.nan_to_num(k)
    lens_v = np.nan_to_num(v)
    ks = np.array([0.25, 0.5]) if per_head else 0.25
    vs = np.array([2.0, 4.0]) if per_head else 2.0
    dt = FP8_DTYPES[name]
    k8 = (lens_k / np.broadcast_to(ks, (2,))[None, None, :, None]).astype(dt)
    v8 = (lens_v / np.broadcast_to(vs, (2,))[None, None, :, None]).astype(dt)
    want = reference.attention(q, k8.astype(np.float64) * np.broadcast_to(ks, (2,))[None, None, :, None],
                               v8.astype(np.float64) * np.broadcast_to(vs, (2,))[None, None, :, None], kv_lens=lens)
    got = reference.attention(q, k8, v8, kv_lens=lens, k_scale=ks, v_scale=vs)
    close(got[0], want[0])
    close(got[1], want[1])
    raw = cupy_lean.attention(q.astype(np.float16), k8.view(np.uint8), v8.view(np.uint8), kv_lens=lens,
                              kv_dtype=name, k_scale=ks, v_scale=vs, return_lse=True)
    typed = cupy_lean.attention(q.astype(np.float16), k8, v8, kv_lens=lens, k_scale=ks, v_scale=vs,
                                return_lse=True)
    assert raw[0].dtype == np.float16 and np.array_equal(raw[0], typed[0]) and np.array_equal(raw[1], typed[1])


@pytest.mark.parametrize("kw,exc,match", [
    (dict(kv_dtype="e3m4"), ValueError, r"kv_dtype: expected one of \('e4m3', 'e5m2'\), got 'e3m4'"),
    (dict(kv_dtype="e4m3", raw=False), TypeError, "k: kv_dtype='e4m3' reads uint8 storage, got float64"),
    (dict(k_scale=0.0), ValueError, "k_scale: expected finite values > 0, got 0.0"),
    (dict(v_scale=np.array([1.0, np.nan])), ValueError, r"v_scale: expected finite values > 0, got v_scale\[1\] = nan"),
    (dict(k_scale=np.ones(3)), ValueError, r"k_scale: expected a number or an array of shape \(2,\)"),
    (dict(k_scale=True), TypeError, "k_scale: expected a number"),
    (dict(k_scale="1"), TypeError, "k_scale: expected a number"),
    (dict(k_scale=0.5, plain=True), ValueError, "k_scale: only with an fp8 KV cache"),
])
def test_fp8_arguments_are_validated(kw, exc, match):
    import ml_dtypes

    q, k, v, lens = make_problem([5, 3], 2, 2, 16, 1)
    k, v = np.nan_to_num(k), np.nan_to_num(v)
    raw, plain = kw.pop("raw", True), kw.pop("plain", False)
    if not plain:
        k8, v8 = k.astype(ml_dtypes.float8_e4m3fn), v.astype(ml_dtypes.float8_e4m3fn)
        k, v = (k8.view(np.uint8), v8.view(np.uint8)) if raw and "kv_dtype" in kw else (k8, v8)
        if not raw:
            k, v = np.nan_to_num(make_problem([5, 3], 2, 2, 16, 1)[1]), v
    with pytest.raises(exc, match=match):
        cupy_lean.attention(q, k, v, kv_lens=lens, **kw)


def test_huge_window_is_the_whole_sequence():
    """A window past the capacity (even past 2**32) sees every key: never a
    wrapped 32-bit value."""
    q, k, v, lens = make_problem([40, 7], 1, 2, 16, 8)
    full = cupy_lean.attention(q, k, v, kv_lens=lens)
    for w in (40, 2**31, 2**32 + 5):
        assert np.array_equal(cupy_lean.attention(q, k, v, kv_lens=lens, window_left=w), full)


def test_emulate_checks_q_lens_and_reads_window_minus_one_as_none():
    q3, k, v, lens = make_problem([40, 7], 1, 2, 16, 3)
    q = np.stack([q3, q3], axis=1)
    sched = lean_schedule(lens, 1, tile_size=16, num_ctas=3)
    with pytest.raises(ValueError, match=r"q_lens: expected values in \[0, 2\] \(q_len\)"):
        reference.emulate(sched, q, k, v, kv_lens=lens, q_lens=[3, 0])
    with pytest.raises(ValueError, match="q_lens: needs q of shape"):
        reference.emulate(sched, q3, k, v, kv_lens=lens, q_lens=[1, 1])
    a = reference.emulate(sched, q3, k, v, kv_lens=lens, window_left=-1)
    b = reference.attention(q3, k, v, kv_lens=lens)
    close(a[0], b[0], rtol=1e-9, atol=1e-11)


def test_window_start_takes_minus_one_as_no_window_and_refuses_below():
    """reference.window_start reads window_left as attention() does: None
    and -1 are no window (start 0); below -1 and q_len below 1 are
    refused naming the argument."""
    lens = np.array([5, 100, 0])
    for w in (None, -1):
        assert reference.window_start(lens, w).tolist() == [0, 0, 0]
        assert reference.window_start(lens, w, 3).tolist() == [0, 0, 0]
    assert reference.window_start(lens, 0).tolist() == [4, 99, 0]
    assert reference.window_start(lens, 3, 2).tolist() == [0, 95, 0]
    with pytest.raises(ValueError, match="window_left: expected an integer >= -1, got -2"):
        reference.window_start(lens, -2)
    with pytest.raises(ValueError, match="q_len: expected an integer >= 1, got 0"):
        reference.window_start(lens, 4, 0)


def test_window_start_of_a_ragged_batch_is_each_sequences_own():
    """With per-sequence counts (q_lens) the start is that of the
    sequence's own first token, and a sequence of no tokens starts at its
    length (it sees no key), window or not: lens - start are the lengths the
    kernel walks."""
    lens = np.array([100, 100, 100, 7, 0])
    nq = np.array([4, 1, 0, 2, 0])
    assert reference.window_start(lens, 10, nq).tolist() == [86, 89, 100, 0, 0]
    assert reference.window_start(lens, None, nq).tolist() == [0, 0, 100, 0, 0]
    assert reference.window_start(lens, -1, nq.astype(np.int32)).tolist() == [0, 0, 100, 0, 0]
    with pytest.raises(ValueError, match=r"q_len: expected counts of at least 0, got q_len\[1\] = -1"):
        reference.window_start(lens, 10, [1, -1, 0, 0, 0])
    with pytest.raises(ValueError, match=r"q_len: expected one integer or integers of shape \(5,\)"):
        reference.window_start(lens, 10, [1, 2])
    with pytest.raises(TypeError, match=r"q_len: expected one integer or integers of shape \(5,\) \(q_lens\), got "
                                        r"float64"):
        reference.window_start(lens, 10, np.ones(5))


def test_emulate_takes_a_ragged_schedule_of_each_sequences_own_window():
    """emulate() models the kernel's walk of a ragged batch: a schedule of
    the lengths from the q_len of q's axis is refused where a sequence has
    fewer tokens (its window starts later) or none (it reads nothing); the
    schedule of the q_lens lengths gives the reference's result."""
    q3, k, v, lens = make_problem([300, 90, 40], 1, 2, 16, 5)
    rng = np.random.default_rng(5)
    q = rng.standard_normal((3, 4, 2, 16))
    nq = np.array([4, 1, 0])
    old = lean_schedule(lens - reference.window_start(lens, 50, 4), 1, tile_size=16, num_ctas=5)
    with pytest.raises(ValueError, match=r"schedule: built for kv_lens \[54, 54, 40\], the call's walked lengths"):
        reference.emulate(old, q, k, v, kv_lens=lens, window_left=50, q_lens=nq)
    sched = lean_schedule(lens - reference.window_start(lens, 50, nq), 1, tile_size=16, num_ctas=5)
    assert sched.kv_lens.tolist() == [54, 51, 0]
    got = reference.emulate(sched, q, k, v, kv_lens=lens, window_left=50, q_lens=nq)
    want = reference.attention(q, k, v, kv_lens=lens, window_left=50, q_lens=nq)
    close(got[0], want[0], rtol=1e-9, atol=1e-11)
    close(got[1], want[1], rtol=1e-9, atol=1e-11)
    assert np.all(got[0][2] == 0) and np.all(got[1][2] == -np.inf)  # no tokens: padding rows only


def test_invariant_splits_decomposition_depends_on_each_sequence_alone():
    """TUNING["invariant_splits"] = n (16 by default): batch_invariant calls
    run split-K with n chunks per unit whatever the batch; the emulated
    kernel (chunk states merged in chunk order) gives each sequence the same
    bits alone, at another position, and in other batches. 0: the head
    decomposition."""
    from cupy_lean import kernels as K
    from cupy_lean.attention import invariant_decomposition

    assert K.TUNING["invariant_splits"] == 16 and invariant_decomposition(12) == ("split", 192)
    with K.tuning(invariant_splits=0):
        assert invariant_decomposition(12) == ("head", None)
    with K.tuning(invariant_splits=8):
        assert invariant_decomposition(12) == ("split", 96) and invariant_decomposition(0) == ("head", None)
    with K.tuning(invariant_splits=np.int64(4)):  # a NumPy integer is an integer
        assert invariant_decomposition(3) == ("split", 12)
    with pytest.raises(ValueError, match=r'TUNING\["invariant_splits"\] must be an integer >= 0, got -1'):
        K.TUNING["invariant_splits"] = -1  # refused where it is set
    assert K.TUNING["invariant_splits"] == 16
    lens = np.array([900, 17, 301, 0, 4000, 55])
    q, k, v, lens = make_problem(list(lens), 2, 3, 16, 5, dtype=np.float32)
    k, v = np.nan_to_num(k), np.nan_to_num(v)

    def run(idx, n=8):
        sched = split_schedule(lens[idx], 2, tile_size=16, num_splits=n)
        return reference.emulate(sched, q[idx], k[idx], v[idx], kv_lens=lens[idx])

    full_o, full_l = run(np.arange(len(lens)))
    for idx in ([0], [4], [4, 0], [5, 4, 3, 2, 1, 0], [2, 2, 4]):
        o, l = run(np.array(idx))
        for j, b in enumerate(idx):
            assert np.array_equal(o[j], full_o[b]) and np.array_equal(l[j], full_l[b], equal_nan=True)
    want_o, _ = reference.attention(q, k, v, kv_lens=lens)
    np.testing.assert_allclose(full_o, want_o, rtol=1e-12, atol=1e-12)


def test_raw_feature_key_of_the_hot_path():
    """attention()'s hot path for feature calls keys the raw arguments: GPU
    arrays (sinks, q_lens, array scales) by form and device, not values;
    window_left an int, softcap a float, kv_dtype a str, scales floats. Any
    other type gives no key (such calls validate every time), and arguments
    that validate differently give different keys."""
    from cupy_lean.attention import _raw_features

    class Data:
        device_id = 0

    class Nd:  # a stand-in for cupy.ndarray: the key reads shape, dtype, strides and the device
        def __init__(self, shape, dtype=np.float32, device=0):
            self.shape, self.dtype = shape, np.dtype(dtype)
            self.strides = (self.dtype.itemsize,) * len(shape)
            self.data = Data()
            self.data.device_id = device

    def key(**kw):
        args = dict(sinks=None, window_left=None, softcap=None, kv_dtype=None, k_scale=None, v_scale=None,
                    q_lens=None)
        args.update(kw)
        return _raw_features(Nd, **args)

    base = key(sinks=Nd((8,)), window_left=700, softcap=30.0)
    assert base is not None and hash(base) is not None
    assert key(sinks=Nd((8,)), window_left=700, softcap=30.0) == base  # another array of the same form
    for other in (dict(sinks=Nd((8,), np.float16), window_left=700, softcap=30.0),
                  dict(sinks=Nd((8,), device=1), window_left=700, softcap=30.0),
                  dict(sinks=Nd((4,)), window_left=700, softcap=30.0),
                  dict(sinks=Nd((8,)), window_left=701, softcap=30.0),
                  dict(sinks=Nd((8,)), window_left=700, softcap=20.0),
                  dict(sinks=Nd((8,)), window_left=700, softcap=30.0, q_lens=Nd((5,), np.int32))):
        assert key(**other) not in (None, base)
    fp8 = key(kv_dtype="e4m3", k_scale=0.5, v_scale=Nd((2,)))
    assert fp8 == key(kv_dtype="e4m3", k_scale=0.25, v_scale=Nd((2,)))  # float scales: checked per call
    assert fp8 != key(kv_dtype="e5m2", k_scale=0.5, v_scale=Nd((2,)))
    assert key(kv_dtype="e4m3") != fp8
    for bad in (dict(sinks=np.zeros(8, np.float32)), dict(sinks=[0.0] * 8), dict(window_left=np.int64(5)),
                dict(window_left=True), dict(softcap=30), dict(softcap=np.float64(30.0)), dict(kv_dtype=b"e4m3"),
                dict(kv_dtype="e4m3", k_scale=np.float32(0.5)), dict(kv_dtype="e4m3", v_scale=np.ones(2)),
                dict(q_lens=np.ones(5, np.int32))):
        assert key(**bad) is None, bad


def test_emulate_refuses_a_schedule_whose_segments_do_not_cover_each_unit_once():
    """A schedule edited by hand (a segment removed, duplicated, stretched, or
    naming another unit) is refused naming the unit; the untouched schedule
    emulates to the reference."""
    import dataclasses

    lens = [300, 45, 0, 129]
    q, k, v, L = make_problem(lens, 2, 3, 16, 5)
    sched = lean_schedule(L, 2, tile_size=16, num_ctas=7)
    want = reference.attention(q, k, v, kv_lens=L)
    got = reference.emulate(sched, q, k, v, kv_lens=L)
    close(got[0], want[0], rtol=1e-9, atol=1e-11)
    segs = sched.segments
    stretched = segs.copy()
    stretched["tile_end"][-1] += 1
    renamed = segs.copy()
    renamed["head"][0] = 1 - renamed["head"][0]
    for bad, msg in ((segs[1:], r"segments of unit \d+ \(batch \d+, head \d+\) cover tiles"),
                     (np.concatenate([segs, segs[:1]]), r"cover tiles .* expected each of its \d+ tiles"),
                     (stretched, r"cover tiles .* expected each of its \d+ tiles"),
                     (renamed, r"names unit \d+ with batch \d+ and head \d+")):
        tampered = dataclasses.replace(sched, segments=bad)
        with pytest.raises(ValueError, match=msg):
            reference.emulate(tampered, q, k, v, kv_lens=L)


def test_cupys_array_type_is_bound_once_cupy_is_imported():
    """attention() recognises CuPy arrays (its hot path) from a process's
    first call when the caller has imported CuPy (it used to learn the type
    only inside that first call's validating path); without CuPy imported it
    imports nothing."""
    import subprocess
    import sys

    code = ("import sys, numpy as np, cupy_lean\n"
            "from cupy_lean import _arrays\n"
            "q = np.ones((1, 2, 64), np.float32); k = np.ones((1, 5, 1, 64), np.float32)\n"
            "cupy_lean.attention(q, k, k)\n"
            "assert _arrays._CUPY_NDARRAY is None and 'cupy' not in sys.modules\n"
            "try:\n"
            "    import cupy\n"
            "except Exception:\n"
            "    print('ok'); raise SystemExit\n"
            "cupy_lean.attention(q, k, k)\n"
            "assert _arrays._CUPY_NDARRAY is cupy.ndarray\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_a_foreign_array_is_viewed_once_and_never_loops(monkeypatch):
    """attention()'s path for arrays of another library views them (as the
    validating path does) and calls itself once with the views; an array
    type that stays foreign after the view (a subclass of CuPy's array)
    goes to the validating path instead of calling itself again."""
    from cupy_lean import _arrays

    A = sys.modules["cupy_lean.attention"]

    class Nd:  # stands for cupy.ndarray
        pass

    class Sub(Nd):  # a subclass: "viewed" as itself
        __dlpack__ = None

    seen = []
    monkeypatch.setattr(_arrays, "_CUPY_NDARRAY", Nd)
    monkeypatch.setattr(A, "_normalise", lambda q, k, v, lens, table, out, lse: (True, q, k, v, lens, table, out, lse))
    monkeypatch.setattr(A, "_attention_slow", lambda *a, **kw: seen.append("slow") or "validated")
    assert A.attention(Sub(), Sub(), Sub()) == "validated" and seen == ["slow"]
