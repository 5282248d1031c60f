"""Mistakes a user makes in calling the NumPy-reachable API (a ragged
list, None for an array, an fp8 cache of the wrong rank with scales, an
empty batch's ``q_lens=[]``, lengths past int64 or given as floats): each
raises an error that names the argument, or works as its neighbours do.
None of these need a GPU."""

import numpy as np
import pytest

import cupy_lean
from cupy_lean import distributed, reference


def _qkv(batch=2, seqlen=50, heads_kv=2, group=4, d=16, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, heads_kv * group, d)).astype(np.float32)
    k = rng.standard_normal((batch, seqlen, heads_kv, d)).astype(np.float32)
    v = rng.standard_normal((batch, seqlen, heads_kv, d)).astype(np.float32)
    return q, k, v


def test_a_ragged_list_of_lengths_or_pages_is_refused_naming_it():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"kv_lens: expected a rectangular array of integers, got a ragged"):
        cupy_lean.attention(q, k, v, kv_lens=[[1, 2], [3]])
    kp, vp = k.reshape(10, 10, 2, 16), v.reshape(10, 10, 2, 16)
    with pytest.raises(ValueError, match=r"block_table: expected a rectangular array of integers, got a ragged"):
        cupy_lean.attention(q, kp, vp, kv_lens=[30, 5], block_table=[[0, 1, 2, 3], [4]])
    with pytest.raises(ValueError, match=r"rows of shapes \[\(2,\), \(1,\)\]"):
        cupy_lean.attention(q, kp, vp, kv_lens=[30, 5], block_table=[np.array([0, 1]), np.array([2])])
    with pytest.raises(ValueError, match=r"kv_lens: expected a rectangular array"):
        cupy_lean.lean_schedule([[1, 2], [3]], 1, tile_size=16, num_ctas=4)


@pytest.mark.parametrize("bad", [None, "abc", {"a": 1}, {1, 2}])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_a_non_array_is_refused_as_such_naming_it(bad, which):
    q, k, v = _qkv()
    args = {"q": q, "k": k, "v": v}
    args[which] = bad
    with pytest.raises(TypeError, match=rf"^{which}: expected an array, got {type(bad).__name__}"):
        cupy_lean.attention(args["q"], args["k"], args["v"])
    with pytest.raises(TypeError, match=rf"^{which}: expected an array, got {type(bad).__name__}"):
        reference.attention(args["q"], args["k"], args["v"])


def test_an_fp8_cache_of_the_wrong_rank_is_blamed_on_k_not_on_its_scales():
    q, k, v = _qkv()
    k8, v8 = k[0].astype(np.uint8), v[0].astype(np.uint8)  # 3-D: the batch axis forgotten
    for fn in (cupy_lean.attention, reference.attention):
        with pytest.raises(ValueError, match=r"^k: expected 4 dimensions"):
            fn(q, k8, v8, kv_dtype="e4m3", k_scale=[1.0, 1.0])
    k2 = k.astype(np.uint8)
    v3 = np.zeros(k.shape[:2] + (3, k.shape[3]), np.uint8)  # v of another head count, v_scale sized for it
    for fn in (cupy_lean.attention, reference.attention):
        with pytest.raises(ValueError, match=r"^v: expected the shape of k"):
            fn(q, k2, v3, kv_dtype="e4m3", v_scale=[1.0, 1.0, 1.0])
    # the right rank with a wrong scale still names the scale
    with pytest.raises(ValueError, match=r"^k_scale: expected a number or an array of shape \(2,\)"):
        cupy_lean.attention(q, k.astype(np.uint8), v.astype(np.uint8), kv_dtype="e4m3", k_scale=[1.0, 1.0, 1.0])


def test_an_empty_batch_takes_an_empty_list_of_query_tokens():
    q, k, v = _qkv()
    q4 = q[:, None].repeat(3, axis=1)
    for fn in (cupy_lean.attention, reference.attention):
        out = fn(q4[:0], k[:0], v[:0], q_lens=[])
        out = out[0] if isinstance(out, tuple) else out
        assert out.shape == (0, 3, 8, 16)
        out = fn(q4[:0], k[:0], v[:0], kv_lens=[], q_lens=[])
        out = out[0] if isinstance(out, tuple) else out
        assert out.shape == (0, 3, 8, 16)


@pytest.mark.parametrize("lens, match", [
    (np.array([2**63], np.uint64), r"kv_lens: expected lengths below 2\*\*63, got kv_lens\[0\] = 9223372036854775808"),
    (np.array([5, 2**64 - 1], np.uint64), r"kv_lens\[1\] = 18446744073709551615"),
    ([3, 2**70], r"kv_lens: expected lengths below 2\*\*63, got kv_lens\[1\] = 1180591620717411303424"),
    ([3, -(2**70)], r"kv_lens: expected lengths >= 0, got kv_lens\[1\] = -1180591620717411303424"),
])
def test_lengths_past_int64_are_reported_as_given(lens, match):
    with pytest.raises(ValueError, match=match):
        cupy_lean.lean_schedule(lens, 1, tile_size=16, num_ctas=4)


def test_lengths_as_python_integers_in_an_object_array_still_work():
    for lens in (np.array([10, 5], dtype=object), np.array([], dtype=object)):
        s = cupy_lean.lean_schedule(lens, 1, tile_size=16, num_ctas=4)
        assert s.total_tiles == (2 if len(lens) else 0)
    starts, lengths = distributed.shard_ranges(np.array([4, 2], dtype=object), 2)
    assert lengths.tolist() == [[2, 1], [2, 1]] and starts.tolist() == [[0, 0], [2, 1]]


def test_float_or_negative_lengths_are_refused_by_the_helpers_too():
    with pytest.raises(TypeError, match="kv_lens: expected an integer dtype, got float64"):
        distributed.shard_ranges([100.5, 7, 0], 2)
    with pytest.raises(ValueError, match=r"kv_lens: expected lengths >= 0, got kv_lens\[1\] = -1"):
        distributed.shard_ranges([5, -1], 2)
    with pytest.raises(TypeError, match="world_size: expected an integer >= 1, got '2'"):
        distributed.shard_ranges([5], "2")
    with pytest.raises(TypeError, match="lens: expected an integer dtype, got float64"):
        reference.window_start([10.7], 3)
    with pytest.raises(ValueError, match=r"lens: expected lengths >= 0, got lens\[0\] = -5"):
        reference.window_start([-5], 3)
    assert reference.window_start(np.array([10], np.int32), 3).tolist() == [6]


def test_gather_kv_refuses_a_length_past_the_capacity():
    _, k, v = _qkv()
    kb, vb = reference.gather_kv(k, v, 1, 50)
    assert kb.shape == (50, 2, 16) and np.array_equal(kb, k[1].astype(np.float64))
    with pytest.raises(ValueError, match=r"length: expected an integer in \[0, 50\].*got 60"):
        reference.gather_kv(k, v, 0, 60)
    with pytest.raises(TypeError, match=r"length: expected an integer, got float 5.0"):
        reference.gather_kv(k, v, 0, 5.0)
    assert reference.gather_kv(k, v, 0, np.array(5))[0].shape == (5, 2, 16)
    kp, vp = k.reshape(10, 10, 2, 16), v.reshape(10, 10, 2, 16)
    table = np.arange(10).reshape(2, 5)
    kb, _ = reference.gather_kv(kp, vp, 1, 43, table)
    assert np.array_equal(kb, kp[5:10].reshape(50, 2, 16)[:43].astype(np.float64))
    with pytest.raises(ValueError, match=r"length: expected an integer in \[0, 50\].*got 51"):
        reference.gather_kv(kp, vp, 1, 51, table)


def test_an_lse_past_float32_is_infinite_without_a_warning():
    q, k, v = _qkv()
    with np.errstate(all="raise"):  # a leaked overflow warning would raise here
        _, lse = cupy_lean.attention(q, k, v, scale=1e300, return_lse=True)
    assert np.isinf(lse).all()


def test_a_pytorch_bfloat16_cpu_tensor_takes_the_numpy_path(monkeypatch):
    """NumPy's DLPack import refuses bfloat16, so a PyTorch CPU tensor of
    bf16 failed inside NumPy. A stand-in for torch (no torch in CI: its
    tensor's type lives in module "torch", refuses DLPack for bf16 as NumPy
    does, and views its bits as int16 as torch does) goes through the same
    steps as the real one (checked by hand with torch 2.13 CPU)."""
    import sys
    import types

    ml_dtypes = pytest.importorskip("ml_dtypes")  # a test dependency
    fake = types.ModuleType("torch")
    fake.int16 = "int16"

    class Tensor:
        def __init__(self, a):
            self._a, self.dtype = a, "torch.bfloat16"

        def __dlpack__(self, **kw):
            raise RuntimeError("Unsupported dtype in DLTensor.")  # NumPy's refusal of bf16

        def __dlpack_device__(self):
            return (1, 0)  # the CPU

        def view(self, dtype):
            assert dtype == "int16"
            return self._a.view(np.int16)

    Tensor.__module__ = "torch"
    monkeypatch.setitem(sys.modules, "torch", fake)
    q, k, v = _qkv()
    bq, bk, bv = (x.astype(ml_dtypes.bfloat16) for x in (q, k, v))
    out = cupy_lean.attention(Tensor(bq), Tensor(bk), Tensor(bv), kv_lens=[50, 7])
    assert out.dtype == ml_dtypes.bfloat16
    assert np.array_equal(out, cupy_lean.attention(bq, bk, bv, kv_lens=[50, 7]))


def test_gather_kv_refuses_a_sequence_or_page_outside_the_arrays():
    """``b`` outside the batch (no negative index from the end) and a used
    page outside the cache raise ValueError naming them, not IndexError or a
    silently wrapped page; pages past the length are not read."""
    _, k, v = _qkv()
    with pytest.raises(ValueError, match=r"b: expected an integer in \[0, 1\], got -1"):
        reference.gather_kv(k, v, -1, 5)
    with pytest.raises(ValueError, match=r"b: expected an integer in \[0, 1\], got 2"):
        reference.gather_kv(k, v, 2, 5)
    kp, vp = k.reshape(10, 10, 2, 16), v.reshape(10, 10, 2, 16)
    for page in (10, -1):
        table = np.array([[0, 1, page, 3, 4]])
        with pytest.raises(ValueError, match=rf"block_table: sequence 0's page 2 \(of its first 25 tokens\) is "
                                             rf"{page}, expected 0 <= page < 10"):
            reference.gather_kv(kp, vp, 0, 25, table)
        kb, _ = reference.gather_kv(kp, vp, 0, 20, table)  # pages 0 and 1 only
        assert np.array_equal(kb, kp[:2].reshape(20, 2, 16).astype(np.float64))
    with pytest.raises(ValueError, match=r"b: expected an integer in \[0, 0\], got 1"):
        reference.gather_kv(kp, vp, 1, 5, np.array([[0, 1]]))


class _Unreadable:
    """An array-like whose DLPack export and NumPy conversion both refuse
    (as a PyTorch tensor that requires grad or lives on the meta device)."""

    dtype = "fake.float32"
    shape = (2, 4, 16)

    def __dlpack__(self, **kw):
        raise RuntimeError("no export")

    def __array__(self, *a, **kw):
        raise RuntimeError("Can't call numpy() here")


def test_cpu_arrays_numpy_cannot_read_are_refused_naming_the_argument():
    """A producer's own refusal (PyTorch: requires grad, meta device, an fp8
    q, the conjugate bit) comes with the argument's name and the dtype."""
    q, k, v = _qkv()
    for name in ("q", "k", "out"):
        args = {**dict(q=q, k=k, v=v), name: _Unreadable()}
        with pytest.raises(TypeError, match=rf"^{name}: could not read test_user_mistakes._Unreadable of dtype "
                                            r"fake.float32 as a NumPy array on the CPU: Can't call numpy\(\) here"):
            cupy_lean.attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
    try:  # the same with PyTorch's tensors where it is installed (CI has no PyTorch)
        import torch
    except ImportError:
        return
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    cases = [("q", dict(q=tq.clone().requires_grad_(True))), ("k", dict(k=torch.empty(tk.shape, device="meta"))),
             ("out", dict(out=torch.empty(tq.shape, requires_grad=True)))]
    if hasattr(torch, "float8_e4m3fn"):
        cases.append(("q", dict(q=tq.to(torch.float8_e4m3fn))))
    for name, kw in cases:
        args = {**dict(q=tq, k=tk, v=tv), **kw}
        with pytest.raises(TypeError, match=rf"^{name}: could not read torch.Tensor of dtype torch\.\w+ as "
                                            r"a NumPy array on the CPU: "):
            cupy_lean.attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
