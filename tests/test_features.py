"""Attention sinks, sliding windows and logit soft-capping in the float64
reference, the schedule emulation and the NumPy front end, against a naive
softmax written here; and their validation. (GPU kernels: test_gpu_use.py.)"""

import math

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
    (dict(sinks="abcd"), ValueError, r"sinks: expected shape \(4,\)"),
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
