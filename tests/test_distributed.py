"""Context-parallel decode over simulated ranks on the CPU: every rank a
thread with its shard of the cache, the all-gather a barrier; the merged
result against the unsharded reference, bitwise the same on every rank
whatever the arrival order. (NCCL itself needs GPUs: test_gpu_use.py.)"""

import random
import threading
import time

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from cupy_lean import distributed, reference
from test_reference import make_problem


class ThreadGroup:
    """``world_size`` threads exchanging arrays through a barrier."""

    def __init__(self, world_size):
        self.world_size = world_size
        self._slots = [None] * world_size
        self._barrier = threading.Barrier(world_size)

    def member(self, rank):
        group = self

        class Member:
            def __init__(self):
                self.rank, self.world_size = rank, group.world_size

            def all_gather(self, x):
                time.sleep(random.random() * 0.01)  # arrive in any order
                group._slots[rank] = np.array(x)
                group._barrier.wait()
                out = np.stack(group._slots)
                group._barrier.wait()  # nobody overwrites a slot before all have read
                return out

        return Member()


def shard_cache(k, v, lens, world):
    """Each rank's dense shard: its positions of every sequence, packed."""
    starts, lengths = distributed.shard_ranges(lens, world)
    shards = []
    for r in range(world):
        cap = max(int(lengths[r].max()), 1)
        ks = np.zeros((k.shape[0], cap) + k.shape[2:], k.dtype)
        vs = np.zeros_like(ks)
        for b in range(k.shape[0]):
            s, n = int(starts[r, b]), int(lengths[r, b])
            ks[b, :n], vs[b, :n] = k[b, s:s + n], v[b, s:s + n]
        shards.append((ks, vs, lengths[r]))
    return shards


def run_ranks(q, shards, world):
    """Every rank's ``distributed.attention(..., return_lse=True)`` over its
    shard, each on a thread of one ThreadGroup; the results in rank order."""
    group = ThreadGroup(world)
    results = [None] * world

    def run(r):
        ks, vs, ln = shards[r]
        results[r] = distributed.attention(q, ks, vs, kv_lens=ln, group=group.member(r), return_lse=True)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@given(st.lists(st.integers(0, 90), min_size=1, max_size=4), st.integers(1, 5), st.integers(1, 2),
       st.integers(0, 10**6))
@example([3, 0, 50], 4, 2, 1)
def test_sharded_attention_equals_the_unsharded_one(lens, world, hkv, seed):
    q, k, v, lens = make_problem(lens, hkv, 3, 16, seed)
    k, v = np.nan_to_num(k), np.nan_to_num(v)
    q, k, v = (x.astype(np.float32) for x in (q, k, v))
    results = run_ranks(q, shard_cache(k, v, lens, world), world)
    want_o, want_l = reference.attention(q, k, v, kv_lens=lens)
    for out, lse in results:
        assert np.array_equal(np.asarray(out), np.asarray(results[0][0]))  # every rank: the same bits
        assert np.array_equal(np.asarray(lse), np.asarray(results[0][1]))
        np.testing.assert_allclose(np.asarray(out, np.float64), want_o, rtol=2e-5, atol=2e-6)
        assert np.array_equal(np.isneginf(np.asarray(lse)), np.isneginf(want_l))
        fin = np.isfinite(want_l)
        np.testing.assert_allclose(np.asarray(lse, np.float64)[fin], want_l[fin], rtol=2e-5, atol=2e-6)


def test_shard_ranges_cover_every_position_once():
    starts, lengths = distributed.shard_ranges([10, 3, 0, 7], 4)
    assert lengths.sum(axis=0).tolist() == [10, 3, 0, 7]
    assert lengths[:, 1].tolist() == [1, 1, 1, 0]  # a sequence shorter than the world: empty shards
    assert (starts[1:] == starts[:-1] + lengths[:-1]).all()
    with pytest.raises(ValueError, match="world_size: expected an integer >= 1, got 0"):
        distributed.shard_ranges([5], 0)
    with pytest.raises(ValueError, match="kv_lens: expected lengths >= 0"):
        distributed.shard_ranges([5, -1], 2)


def test_one_rank_is_the_plain_call_and_bad_arguments_are_named():
    q, k, v, lens = make_problem([9, 4], 1, 2, 16, 3)
    k, v = np.nan_to_num(k), np.nan_to_num(v)
    a = distributed.attention(q, k, v, kv_lens=lens)
    b = reference.attention(q, k, v, kv_lens=lens)[0]
    np.testing.assert_allclose(a, b, rtol=1e-12)
    with pytest.raises(ValueError, match="sinks: not supported by the sharded call"):
        distributed.attention(q, k, v, kv_lens=lens, sinks=np.zeros(2))
    # what depends on a key's position in the whole sequence is refused, even on one rank
    with pytest.raises(ValueError, match="window_left: not supported by the sharded call.*got 3"):
        distributed.attention(q, k, v, kv_lens=lens, window_left=3)
    with pytest.raises(ValueError, match="q_lens: not supported by the sharded call"):
        distributed.attention(q, k, v, kv_lens=lens, q_lens=np.ones(2, np.int32))
    with pytest.raises(ValueError, match=r"q: the sharded call .* got 4 dimensions, shape \(2, 1, 2, 16\)"):
        distributed.attention(q[:, None], k, v, kv_lens=lens)
    with pytest.raises(ValueError, match="window_left: not supported by the sharded call"):
        distributed.attention_devices([dict(device=0, q=q, k=k, v=v, kv_lens=lens)], window_left=3)
    for w in (None, -1):  # no window: the plain call
        np.testing.assert_allclose(distributed.attention(q, k, v, kv_lens=lens, window_left=w), b, rtol=1e-12)


@given(st.lists(st.integers(0, 60), min_size=1, max_size=3), st.integers(1, 4), st.integers(0, 10**6))
def test_sinks_folded_into_the_merged_result_as_the_docstring_says(lens, world, seed):
    """The sharded call refuses sinks and its docstring says how to add them
    to the merged result: out * sigmoid(lse - sink), lse = logaddexp(lse,
    sink); that equals the unsharded call with sinks (empty sequences
    included: zeros, lse = the sink)."""
    q, k, v, lens = make_problem(lens, 1, 3, 16, seed)
    k, v = np.nan_to_num(k), np.nan_to_num(v)
    sinks = np.random.default_rng(seed).normal(size=3) * 2
    results = run_ranks(q, shard_cache(k, v, lens, world), world)
    out, lse = (np.asarray(x, np.float64) for x in results[0])
    with np.errstate(over="ignore"):
        folded = out / (1.0 + np.exp(sinks - lse))[..., None]
    folded_lse = np.logaddexp(lse, sinks)
    want_o, want_l = reference.attention(q, k, v, kv_lens=lens, sinks=sinks)
    np.testing.assert_allclose(folded, want_o, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(folded_lse, want_l, rtol=2e-5, atol=2e-6)


def test_sharded_call_takes_the_defaults_and_checks_return_lse():
    """``out=None``, ``lse=None``, ``sinks=None`` are the defaults, not
    requests: accepted; ``return_lse`` must be a bool, as in the plain call."""
    q, k, v, lens = make_problem([9, 4], 1, 2, 16, 3)
    k, v = np.nan_to_num(k), np.nan_to_num(v)
    b = reference.attention(q, k, v, kv_lens=lens)[0]
    got = distributed.attention(q, k, v, kv_lens=lens, out=None, lse=None, sinks=None, q_lens=None)
    np.testing.assert_allclose(got, b, rtol=1e-12)
    with pytest.raises(TypeError, match="return_lse: expected True or False, got str 'no'"):
        distributed.attention(q, k, v, kv_lens=lens, return_lse="no")
    with pytest.raises(TypeError, match="return_lse: expected True or False, got int 1"):
        distributed.attention_devices([dict(device=0, q=q, k=k, v=v, kv_lens=lens)], return_lse=1)
    with pytest.raises(ValueError, match="out: not supported by the sharded call .*got ndarray"):
        distributed.attention(q, k, v, kv_lens=lens, out=np.empty_like(q))
