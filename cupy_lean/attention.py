"""Front end: normalise arrays, validate into a signature, dispatch (NumPy ->
float64 reference; GPU -> a cached :class:`~cupy_lean.plan.Plan`)."""

from __future__ import annotations

import dataclasses
import sys
from typing import Optional

import numpy as np

from . import _arrays, _cache, reference
from . import _plan
from . import kernels as _K
from ._arrays import host_ints as _host_ints, to_cpu as _to_cpu, to_gpu as _to_gpu, where as _where
from ._arrays import torch_fp8_storage as _torch_fp8_storage
from . import validation as _validation

__all__ = ["attention", "plan", "merge_states", "Config"]


def attention(q, k, v, *, kv_lens=None, block_table=None, scale=None, return_lse=False, out=None, lse=None,
              schedule="lean", num_ctas=None, tile_size=None, kv_layout="NHD", validate=False, sinks=None,
              window_left=None, softcap=None, batch_invariant=False, kv_dtype=None, k_scale=None, v_scale=None,
              q_lens=None):
    """Decode attention: one new query token per sequence over its KV cache.

    For every sequence ``b`` and query head ``i`` (KV head ``i // group``,
    ``group = heads_q / heads_kv``)::

        out[b, i] = softmax(scale * k[b, :L, i // group] @ q[b, i]) @ v[b, :L, i // group]

    with ``L = kv_lens[b]``. NumPy inputs run the float64 reference on the CPU
    (the result is cast to q's dtype); GPU inputs (CuPy, or any object with
    ``__cuda_array_interface__`` / CUDA ``__dlpack__``, such as PyTorch and JAX
    arrays) run the fused LeanAttention kernel on CuPy's current stream and
    return CuPy arrays.

    Parameters
    ----------
    q : array, shape (batch, heads_q, head_dim) or (batch, q_len, heads_q, head_dim)
        Query of the newest token of each sequence; or of its last ``q_len``
        tokens (speculative decoding), causal at the end of the cache: query
        ``i`` sees keys ``[0, kv_len - q_len + i]`` (none where that is
        negative: zero ``out``, ``-inf`` ``lse``), and ``out`` / ``lse``
        get the ``q_len`` axis (GPU: ``q_len`` 1 to 8 and ``q_len x heads_q /
        heads_kv`` at most 128, the rows of a KV head computed together).
    q_lens : array of int, shape (batch,), optional
        With a 4-D ``q``, a ragged batch: sequence ``b`` has ``q_lens[b]``
        query tokens (0 to ``q_len``), the first ``q_lens[b]`` entries of
        ``q``'s axis 1, query ``i`` seeing keys ``[0, kv_len - q_lens[b] +
        i]``. The padding tokens past ``q_lens[b]`` see no key: their ``out``
        rows are zero and their ``lse`` ``-inf`` (the sink's logit with
        ``sinks``). The GPU reads no key or value of a sequence with
        ``q_lens[b] = 0``, and with a window none before the first key of
        its own first token. A GPU array is read at launch (CUDA graphs replay new
        values); its values are clamped to ``[0, q_len]`` on the GPU, checked
        with ``validate=True``; host values are always checked.
    k, v : array, shape (batch, seqlen, heads_kv, head_dim)
        Dense KV cache, any strides with unit stride on the last axis: a
        ``(batch, heads_kv, seqlen, head_dim)`` cache passed as
        ``.transpose(0, 2, 1, 3)`` works without a copy. With ``block_table``,
        the paged cache ``(num_pages, page_size, heads_kv, head_dim)``.
    kv_lens : array of int, shape (batch,), optional
        Length of each sequence, in ``[0, capacity]`` (``seqlen``, or
        ``max_pages * page_size`` when paged). Default: every sequence is
        ``seqlen`` long. Required with ``block_table``. A length of 0 gives
        zeros and ``lse = -inf``. int32 on the GPU avoids a conversion.
    block_table : array of int, shape (batch, max_pages), optional
        Page indices of each sequence's cache, in order; pages may be in any
        order in the cache. Only the first ``ceil(kv_lens[b] / page_size)``
        entries of row ``b`` are read.
    scale : float, optional
        Softmax scale, default ``1 / sqrt(head_dim)``. Any finite number;
        the scaled scores ``scale * q.k`` must stay finite in the arithmetic
        of the path (float32 on the GPU, float64 on the CPU): a score that
        overflows gives NaN rows, as softmax over infinite scores does.
    return_lse : bool
        Also return the log-sum-exp (natural log) of the scaled scores, as
        float32: where it passes float32's range (huge scales or sinks) it
        is +-inf while ``out`` stays correct.
    out : array, shape (batch, heads_q, head_dim), optional
        (``(batch, q_len, heads_q, head_dim)`` for a 4-D ``q``.) Written in
        place and returned (q's dtype, same device); a PyTorch tensor comes
        back as the CuPy (GPU) or NumPy (CPU) array that views its memory.
    schedule : {"lean", "split", "head"}
        ``"lean"``: stream-K over all tiles, one launch (the product). When
        every sequence has the same length (no ``kv_lens`` and dense ``k``
        and ``v``, or a batch of one sequence) and no stream-K option is given (``num_ctas``; in
        :func:`plan` and :class:`Config` also ``ctas_per_sm``,
        ``min_tiles_per_cta``, a ``merge_balance`` other than 0), the lean plan runs its
        split-K variant instead where a streaming model says it is as fast
        (:func:`cupy_lean.schedule.uniform_variant`; ``describe()`` says
        which ran; ``cupy_lean.kernels.TUNING["uniform_variants"] = False``
        turns this off for plans made afterwards). ``"split"``: FlashDecoding (fixed chunks per unit,
        then a combine launch). ``"head"``: FlashAttention-2 (one CTA per
        unit). All three give the same result up to rounding; they exist to
        compare.
    num_ctas : int, optional
        Grid size override (lean: persistent CTAs, default
        ``kernels.default_ctas_per_sm`` per SM, at most one per tile; split:
        total CTAs, ``num_splits = num_ctas // units``; ignored by head). ``schedule``, ``num_ctas`` and
        ``tile_size`` shape the GPU's work only: on NumPy inputs they change
        nothing (nor do the GPU's head_dim, group and page-size limits apply).
    tile_size : int, optional
        KV tokens per tile, one of 16, 32, 64, 128 (a compile-time parameter);
        default by head_dim and group for the device (``plan(...).describe()``
        shows it; on an H100 with groups up to 16: 128 at head_dim 64 and 128,
        64 at 256), with two rules of the lean schedule: dense calls of many
        equal-length units (``kernels.many_unit_config``) and, at head_dim
        64, several sequences with ``kv_lens`` or pages
        (``kernels.varied_length_tile``: 64).
    kv_layout : {"NHD", "HND"}
        Axis order of ``k`` and ``v``: ``"NHD"`` (default) tokens before
        heads as above; ``"HND"`` heads before tokens, ``(batch, heads_kv,
        seqlen, head_dim)`` dense or ``(num_pages, heads_kv, page_size,
        head_dim)`` paged. Either is read in place, without a copy.
    lse : array of float32, shape (batch, heads_q), optional
        (``(batch, q_len, heads_q)`` for a 4-D ``q``.) Written in place with
        the log-sum-exp and returned (implies ``return_lse``).
    sinks : array, shape (heads_q,), optional
        Attention sinks: one learned logit per query head that joins the
        softmax denominator with a zero value vector (as in gpt-oss); ``lse``
        includes it, and a sequence with no keys gives zeros and ``lse =
        sink``. ``-inf`` is no sink for that head. Folded in once per query
        row, at the final merge, so every decomposition supports it.
    window_left : int, optional
        Sliding window: the query sees only its last ``window_left + 1``
        keys (``None`` or -1: the whole sequence); tiles outside the window
        are never read, so a windowed call costs what the window costs.
    softcap : float, optional
        Logit soft-capping: scores become ``softcap * tanh(score /
        softcap)`` after scaling (``None``: off). A per-call value: calls
        with another value get another plan, never a stale one.
    kv_dtype : {"e4m3", "e5m2"}, optional
        Read ``uint8`` k and v as fp8 (``float8_e4m3fn`` / ``float8_e5m2``
        arrays, NumPy (ml_dtypes) or PyTorch, need no ``kv_dtype``). On the
        GPU the bytes are converted in the kernel; ``q`` and ``out`` stay
        fp16 / bf16. At head_dim 64, with an even number of adjacent KV
        heads in pages of one token and the default schedule options
        (``kernels.pair_heads`` has every condition), the GPU reads two
        neighbouring KV heads as one of head_dim 128 (full 128-byte rows),
        each query padded by zeros in the other head's half: there a NaN
        or infinite stored key of one head also gives NaN in the other
        head's rows (``0 x inf``). ``kernels.TUNING["fp8_pair_heads_max_page"]
        = 0`` (before the plan is made) turns that off.
    k_scale, v_scale : float or array of shape (heads_kv,), optional
        fp8 caches hold ``value / scale``; default 1. The output is in q's
        dtype: with a large ``v_scale`` an fp16 output past 65504 is inf
        (bf16 reaches about 3e38). A call in head pairs (above) given an
        array of shape ``(heads_kv,)`` (other than one value broadcast with
        stride 0) runs without pairs (a second plan, made at its first such
        call); a number or a GPU array of shape () keeps them.
    batch_invariant : bool
        A sequence's ``out`` and ``lse`` are bitwise the same whatever its
        batch-mates, its position in the batch and the grid: every unit is
        split into ``kernels.TUNING["invariant_splits"]`` (16) chunks of its
        own tiles whatever the batch, merged in chunk order
        (:func:`invariant_decomposition`; it needs a workspace of 16 partial
        states per unit). ``schedule="head"`` (or the setting 0) runs one
        CTA per unit instead: no workspace, slower with few units, other
        bits. ``schedule`` must be ``"lean"`` (the default) or ``"head"``,
        and ``num_ctas`` None. The bits also depend on the call's
        ``q_len`` (a 4-D ``q``'s second axis, which shapes the kernel):
        with ``q_lens``, compare sequences among calls of one ``q_len``.
    validate : bool
        Check the *values* of ``kv_lens`` and ``block_table`` that live on the
        GPU with a small kernel, then synchronise to raise ``ValueError`` on a
        bad one. Default ``False``: a call does not synchronise; the kernel
        clamps lengths to ``[0, capacity]`` and treats page indices outside
        ``[0, num_pages)`` as empty pages, so it never reads outside its
        arrays, and the result of a sequence with a bad value is that of the
        clamped input. Values given on the host (NumPy, lists) are always
        checked, without a synchronisation, except a host ``block_table``
        with ``kv_lens`` on the GPU: the pages in use depend on lengths the
        host does not see, so that table is checked as GPU values are, with
        ``validate=True``.

    Returns
    -------
    out : array, shape (batch, heads_q, head_dim), q's dtype
        (``(batch, q_len, heads_q, head_dim)`` for a 4-D ``q``)
    lse : array of float32, shape (batch, heads_q)
        (``(batch, q_len, heads_q)`` for a 4-D ``q``). Only with
        ``return_lse=True``.

    Raises
    ------
    ValueError, TypeError
        For bad shapes, dtypes, strides, lengths, page indices, scale,
        schedule, tile size or CTA count; the message names the argument, what
        was expected and what was given.

    Notes
    -----
    GPU calls keep one launch plan per signature (shapes, strides, dtypes,
    pointer alignment, options) and device; a call with a known signature
    costs a dictionary lookup and a launch (with optional features too,
    from the second call with the same arguments, when ``sinks``,
    ``q_lens`` and array scales are CuPy arrays, ``window_left`` an int,
    ``softcap`` and scalar scales floats and ``kv_dtype`` a str; other
    types are validated on every call). Calls are safe from several
    streams and threads (launches that share a plan's workspace are ordered
    on the GPU) and can be captured into CUDA graphs: each captured launch gets
    a workspace of its own, so any number of graphs can be captured one after
    another and replayed in any order or concurrently. Inside a capture, pass
    ``kv_lens`` / ``block_table`` (and ``q_lens``, per-head fp8 scales) as
    GPU arrays (their values are read at replay, so lengths may change
    between replays) and ``out=`` (and ``lse=``) arrays that outlive the
    graph.
    """
    nd = _arrays._CUPY_NDARRAY
    if nd is None and "cupy" in sys.modules:  # (CuPy imported by the caller: its arrays can take the hot path
        nd = _arrays.cupy_ndarray()           # from a process's first call)
    if kv_layout == "HND" and nd is not None and type(k) is nd and type(v) is nd and k.ndim == v.ndim == 4:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # NHD views, no copy
        kv_layout = "NHD"
    if (kv_layout == "NHD" and nd is not None and type(q) is nd and type(k) is nd and type(v) is nd
            and (out is None or type(out) is nd) and (lse is None or type(lse) is nd) and validate is False
            and (kv_lens is None or type(kv_lens) is nd) and (block_table is None or type(block_table) is nd)
            and (scale is None or type(scale) is float) and type(return_lse) is bool
            and type(schedule) is str and (num_ctas is None or type(num_ctas) is int)
            and (tile_size is None or type(tile_size) is int)  # (others: validated below, then named)
            and type(batch_invariant) is bool):
        # Hot path: CuPy arrays whose signature has a plan (validated when the
        # plan was built).
        sig = _plan.signature(q, k, v, out, kv_lens, block_table, scale, schedule, num_ctas, tile_size)
        plain = (sinks is None and window_left is None and softcap is None and kv_dtype is None and k_scale is None
                 and v_scale is None and q_lens is None)
        hot = None
        if plain and not batch_invariant:
            psig = sig
        else:
            # ... and calls with optional features (sinks, a window, a soft-cap, an fp8 cache, q_lens)
            # or batch_invariant=True whose arguments, of simple types, were validated for this
            # signature by an earlier call: the signature that call launched (its features; an invariant
            # call's decomposition, which follows TUNING too, hence TUNING's key in its key)
            rk = () if plain else _raw_features(nd, sinks, window_left, softcap, kv_dtype, k_scale, v_scale, q_lens)
            hot = None if rk is None else ((sig, rk, _K.TUNING.key) if batch_invariant else (sig, rk))
            psig = None if hot is None else _LAUNCHED.get(hot)
        if psig is not None:
            p = _cache.get(_plan.plan_key(_device(), psig))
            if p is not None and (lse is None or p._lse_ok(lse)):
                want = return_lse or lse is not None
                if q_lens is not None:  # (per call: its values are the GPU's; its form is checked)
                    q_lens = _plan.check_q_lens(q_lens, p.meta.batch, p.q_len, False)
                scales = None if kv_dtype is None else _plan.gpu_fp8_scales(k_scale, v_scale, p.meta.heads_kv)
                res_out, res_lse = p._launch(q, k, v, kv_lens, block_table, out, lse, want, sinks, q_lens, scales)
                return (res_out, res_lse) if want else res_out
        if hot is not None:
            res, used = _attention_checked(q, k, v, kv_lens, block_table, scale, return_lse, out, lse, schedule,
                                           num_ctas, tile_size, kv_layout, validate, sinks, window_left, softcap,
                                           batch_invariant, kv_dtype, k_scale, v_scale, q_lens)
            # the same call again: validated, so hot (a feature call launches its own signature with its
            # features; an invariant one may launch another decomposition)
            if used is not None and (batch_invariant or used._replace(features=None) == sig):
                _remember_launch(hot, used)
            return res
    elif (nd is not None and type(q) is not nd and validate is False and type(return_lse) is bool
          and type(batch_invariant) is bool and hasattr(q, "__dlpack__") and not isinstance(q, np.ndarray)):
        # Arrays of another library (PyTorch, JAX): viewed as CuPy arrays (DLPack, no copy), as the
        # validating path would; on the GPU the call then takes the hot path above when its plan exists
        k2, v2, kv_dtype2 = _torch_fp8_storage(k, v, kv_dtype)
        # PyTorch CUDA tensors on CuPy's device and stream: viewed from their pointers (no exchange)
        views = _arrays.torch_views((q, k2, v2, kv_lens, block_table, out, lse, sinks, q_lens, k_scale, v_scale),
                                    _device)
        if views is not None:
            gpu, (q2, k2, v2, lens2, table2, out2, lse2, sinks, q_lens, k_scale, v_scale) = True, views
        else:
            gpu, q2, k2, v2, lens2, table2, out2, lse2 = _normalise(q, k2, v2, kv_lens, block_table, out, lse)
        if gpu and type(q2) is nd:  # (a subclass of CuPy's array stays as it is: validated, no loop)
            # GPU sinks, q_lens and scale arrays viewed alike (host ones stay: their values are checked)
            sinks, q_lens, k_scale, v_scale = (
                _to_gpu(x, name) if x is not None and type(x) is not nd and _where(x) == "gpu" else x
                for x, name in ((sinks, "sinks"), (q_lens, "q_lens"), (k_scale, "k_scale"), (v_scale, "v_scale")))
            return attention(q2, k2, v2, kv_lens=lens2, block_table=table2, scale=scale, return_lse=return_lse,
                             out=out2, lse=lse2, schedule=schedule, num_ctas=num_ctas, tile_size=tile_size,
                             kv_layout=kv_layout, validate=False, sinks=sinks, window_left=window_left,
                             softcap=softcap, batch_invariant=batch_invariant, kv_dtype=kv_dtype2, k_scale=k_scale,
                             v_scale=v_scale, q_lens=q_lens)
    return _attention_slow(q, k, v, kv_lens, block_table, scale, return_lse, out, lse, schedule, num_ctas,
                           tile_size, kv_layout, validate, sinks, window_left, softcap, batch_invariant,
                           kv_dtype, k_scale, v_scale, q_lens)


# (signature without features, raw feature arguments[, TUNING's key for batch_invariant=True]) -> the
# signature an earlier call with those arguments was validated into and launched (attention()'s hot path
# for feature and invariant calls); the plan itself stays in the package's plan cache (a miss there: the
# validating path again)
_LAUNCHED = {}
_LAUNCHED_MAX = 4096


def _remember_launch(hot, sig):
    if len(_LAUNCHED) >= _LAUNCHED_MAX:
        _LAUNCHED.clear()
    _LAUNCHED[hot] = sig


def _array_key(nd, x):
    """A GPU array's entry in a raw feature key (its form and device, as a
    signature holds an index array's, not its values, which the kernel
    reads), or None when it is not a CuPy array."""
    return _plan._meta(x) if type(x) is nd else None


def _raw_features(nd, sinks, window_left, softcap, kv_dtype, k_scale, v_scale, q_lens):
    """The optional-feature arguments of a call as a hashable key, or None
    when any is of a type the hot path does not take (those calls validate
    every time): ``sinks`` / ``q_lens`` / array scales as CuPy arrays (by
    form and device), ``window_left`` an int, ``softcap`` a float,
    ``kv_dtype`` a str, scales floats. Two calls with the same key and the
    same array signature validate alike."""
    key = []
    for x in (sinks, q_lens):
        if x is None:
            key.append(None)
        else:
            a = _array_key(nd, x)
            if a is None:
                return None
            key.append(a)
    for x, kind in ((window_left, int), (softcap, float), (kv_dtype, str)):
        if x is not None and type(x) is not kind:
            return None
        key.append(x)
    for x in (k_scale, v_scale):  # floats (checked per call) or GPU arrays (read by the kernel)
        if x is None or type(x) is float:
            key.append(None if x is None else "f")
        else:
            a = _array_key(nd, x)
            if a is None:
                return None
            key.append(a)
    return tuple(key)


_get_device = None


def _device():
    global _get_device
    if _get_device is None:
        import cupy

        _get_device = cupy.cuda.runtime.getDevice
    return _get_device()


def _check_bool(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def _normalise(q, k, v, kv_lens, block_table, out, lse):
    """Arrays on one device: CuPy views of GPU arrays (index arrays may stay
    on the host), NumPy arrays otherwise. Returns (gpu, arrays...)."""
    _arrays.refuse_immutable(out, "out")
    _arrays.refuse_immutable(lse, "lse")
    places = {n: _where(x) for n, x in (("q", q), ("k", k), ("v", v))}
    if out is not None:
        places["out"] = _where(out)
    if lse is not None:
        places["lse"] = _where(lse)
    gpu = "gpu" in places.values()
    if gpu and any(p != "gpu" for p in places.values()):
        desc = ", ".join(f"{n} on the {'GPU' if p == 'gpu' else 'CPU'}" for n, p in places.items())
        raise TypeError(f"{', '.join(places)}: expected arrays on one device, got {desc}")
    if gpu:
        try:
            cap = _arrays.foreign_capture_state(q, k, v, out, lse)  # asked once for the call's arrays
        except Exception:
            # CuPy cannot use the GPU the arrays claim (no driver, one older than CuPy's CUDA):
            # say what is missing rather than pass on a bare CUDA runtime error
            from .kernels import require_device

            require_device()
            raise
        q, k, v = _to_gpu(q, "q", cap), _to_gpu(k, "k", cap), _to_gpu(v, "v", cap)
        out = _to_gpu(out, "out", cap, output=True) if out is not None else None
        lse = _to_gpu(lse, "lse", cap, output=True) if lse is not None else None
        idx = []
        for x, name in ((kv_lens, "kv_lens"), (block_table, "block_table")):
            if x is None:
                idx.append(None)
            elif _where(x) == "gpu":
                idx.append(_to_gpu(x, name, cap))
            else:
                idx.append(_host_ints(x, name))
        kv_lens, block_table = idx
    else:
        q, k, v = _to_cpu(q, "q"), _to_cpu(k, "k"), _to_cpu(v, "v")
        out = out if (out is None or isinstance(out, (list, tuple))) else _to_cpu(out, "out")
        lse = lse if (lse is None or isinstance(lse, (list, tuple))) else _to_cpu(lse, "lse")
        kv_lens = None if kv_lens is None else _host_ints(kv_lens, "kv_lens")
        block_table = None if block_table is None else _host_ints(block_table, "block_table")
    return gpu, q, k, v, kv_lens, block_table, out, lse


def _attention_slow(q, k, v, kv_lens, block_table, scale, return_lse, out, lse, schedule, num_ctas, tile_size,
                    kv_layout, check_values, sinks=None, window_left=None, softcap=None, batch_invariant=False,
                    kv_dtype=None, k_scale=None, v_scale=None, q_lens=None):
    """The validating path of :func:`attention`: its result."""
    return _attention_checked(q, k, v, kv_lens, block_table, scale, return_lse, out, lse, schedule, num_ctas,
                              tile_size, kv_layout, check_values, sinks, window_left, softcap, batch_invariant,
                              kv_dtype, k_scale, v_scale, q_lens)[0]


def _attention_checked(q, k, v, kv_lens, block_table, scale, return_lse, out, lse, schedule, num_ctas, tile_size,
                       kv_layout, check_values, sinks, window_left, softcap, batch_invariant, kv_dtype, k_scale,
                       v_scale, q_lens):
    """The validating path: ``(result, sig)``, sig the signature of the plan
    that launched (None where none did: the CPU path)."""
    return_lse = _check_bool(return_lse, "return_lse") or lse is not None
    check_values = _check_bool(check_values, "validate")
    batch_invariant = _check_bool(batch_invariant, "batch_invariant")
    k, v, kv_dtype = _torch_fp8_storage(k, v, kv_dtype)
    gpu, q, k, v, lens, table, out, lse = _normalise(q, k, v, kv_lens, block_table, out, lse)
    k, v = _validation.kv_layout_views(k, v, kv_layout, table is not None)
    fp8 = kv_dtype is not None or k_scale is not None or v_scale is not None or str(k.dtype).startswith("float8")
    if q_lens is not None and q.ndim != 4:
        raise ValueError(f"q_lens: needs q of shape (batch, q_len, heads_q, head_dim), got q of shape "
                         f"{tuple(q.shape)}")
    if gpu:
        # (sinks and q_lens: where they are taken, _features and check_q_lens)
        _plan.check_devices(_device(), q=q, k=k, v=v, out=out, lse=lse, kv_lens=lens, block_table=table)
    kv8 = _gpu_fp8_format(k, kv_dtype, k_scale is not None or v_scale is not None) if gpu else None
    multi = gpu and q.ndim == 4  # several query tokens, GPU kernel
    if (q.ndim == 4 or fp8) and not gpu:
        return _cpu_general(q, k, v, lens, table, scale, return_lse, out, lse, schedule, num_ctas, tile_size,
                            sinks, window_left, softcap, batch_invariant, kv_dtype, k_scale, v_scale, q_lens), None
    if multi:
        m = _check_multi_query(q, k, v, lens, table, scale, out, lse, schedule, num_ctas, tile_size, kv8)
        if q_lens is not None:
            q_lens = _plan.check_q_lens(q_lens, m.batch, int(q.shape[1]), check_values)
    else:
        m = _validation.validate(q, k, v, lens, table, scale, out, schedule, num_ctas, tile_size, gpu, kv8)
        _validation.check_lse(lse, (m.batch, m.heads_q))
    feats = _features(m, sinks, window_left, softcap, gpu)
    feats.kv8 = kv8
    if batch_invariant:
        _validation.check_batch_invariant(schedule, num_ctas)
        if schedule != "head":  # (an explicit "head": one CTA per unit, no workspace)
            schedule, num_ctas = invariant_decomposition(m.batch * m.heads_kv)
    host_lens = lens if isinstance(lens, np.ndarray) else None
    host_table = table if isinstance(table, np.ndarray) else None
    if host_lens is not None or host_table is not None:
        _validation.check_host_values(m, host_lens, host_table)
    if not gpu:
        res_out, res_lse = _cpu_attention(q, k, v, lens, table, m, out, feats)
        if lse is not None:
            lse[...] = res_lse
            res_lse = lse
        return ((res_out, res_lse) if return_lse else res_out), None
    if host_table is not None:
        table = _to_gpu(host_table, "block_table")  # the kernel reads the table from the GPU
    fkey = _features_key(feats)
    sig = _plan.signature(q, k, v, out, lens, table, m.scale if scale is not None else None, schedule,
                          num_ctas, tile_size, features=fkey)
    if batch_invariant and schedule == "split":
        sig = sig._replace(invariant=True)
    p = _plan.get_plan(sig, lambda: m)
    on_gpu = (lens is not None and host_lens is None) or (table is not None and host_table is None)
    if check_values and m.batch and on_gpu:
        from . import _gpu

        if _plan.capturing():
            raise ValueError("validate: True reads the GPU's kv_lens / block_table values back to the host "
                             "(a synchronisation), which a CUDA graph capture does not allow; validate in an "
                             "eager call before capturing, and capture with validate=False")
        _gpu.device_check(m, lens, table)
    scales = None if kv8 is None else _plan.gpu_fp8_scales(k_scale, v_scale, m.heads_kv)
    res_out, res_lse = p._launch(q, k, v, lens, table, out, lse, return_lse, feats.sinks, q_lens, scales)
    return ((res_out, res_lse) if return_lse else res_out), sig


def _features_key(feats):
    """The signature entry of a call's optional semantics (None: none)."""
    if not feats.any():
        return None
    return (None if feats.sinks is None else _plan.sinks_meta(feats.sinks), feats.window_left, feats.softcap,
            feats.kv8)


@dataclasses.dataclass(frozen=True)
class Config:
    """A kernel configuration for :func:`plan`: the entry point of kernel
    experiments (swap a tile size, a schedule, a CTA count and measure).
    Every field left at None takes the default the plan would choose for
    the device (``plan(...).describe()`` shows it).

    Attributes
    ----------
    schedule : {"lean", "split", "head"}
        The decomposition: stream-K (the product; for equal lengths, a
        dense cache without ``kv_lens`` or one sequence, and no stream-K
        option set here, its split-K variant where faster, see
        :func:`attention`), FlashDecoding's split-K, or one CTA per unit.
    tile_size : int, optional
        KV tokens per tile: 16, 32, 64 or 128.
    stages : int, optional
        Depth of the copy pipeline, 2 to 6.
    ctas_per_sm : int, optional
        Lean: persistent CTAs per SM.
    num_ctas : int, optional
        Lean: the grid; split: ``units x num_splits`` (``num_splits =
        num_ctas // units``).
    min_tiles_per_cta : int, optional
        Lean: at most one CTA per this many tiles (fewer, longer ranges on
        small calls: fewer partial states to merge); default 1.
    merge_balance : int, optional
        Lean: 0, or ``a``: every CTA's range holds at least the tiles of
        :func:`cupy_lean.schedule.merge_balanced_tiles` for the longest
        sequence (computed on the GPU from ``kv_lens``), so that no unit is cut
        into more pieces than one CTA merges in about ``a`` times a range's
        stream. Default 0 (off: measured over family shapes, the floor now
        costs more streaming SMs than the merge time it saves).

    With none of the stream-K options above given (``ctas_per_sm``,
    ``num_ctas``, ``min_tiles_per_cta``, a ``merge_balance`` other than 0),
    a lean plan whose grid has at least 8 CTAs per unit merges stream-K's
    partial units by a second (combine) launch instead of in the kernel
    (``Plan.merge_launch``; docs/design.md); with any of them, in the kernel.
    These options are refused (``ValueError``) with the split and head
    schedules (``merge_balance`` 0, the default, passes).

    A configuration whose shared memory does not fit the device raises
    ``ValueError`` naming the limit when the plan is made.
    """

    schedule: str = "lean"
    tile_size: Optional[int] = None
    stages: Optional[int] = None
    ctas_per_sm: Optional[int] = None
    num_ctas: Optional[int] = None
    min_tiles_per_cta: Optional[int] = None
    merge_balance: Optional[int] = None

    def __post_init__(self):
        # the checks plan() makes, when the configuration is written rather than when it is used
        _validation.validate_options(self.schedule, self.num_ctas, self.tile_size)
        for name, low, high in (("stages", 2, 6), ("ctas_per_sm", 1, 32), ("min_tiles_per_cta", 1, 1 << 20),
                                ("merge_balance", 0, 1 << 10)):
            if getattr(self, name) is not None:
                _validation._check_int(getattr(self, name), name, low, high)
        _validation.check_lean_options(self.schedule, self.ctas_per_sm, self.min_tiles_per_cta, self.merge_balance)


def plan(q, k, v, *, kv_lens=None, block_table=None, scale=None, out=None, schedule="lean", num_ctas=None,
         tile_size=None, kv_layout="NHD", stages=None, ctas_per_sm=None, workspace=None, config=None,
         sinks=None, window_left=None, softcap=None, min_tiles_per_cta=None, kv_dtype=None):
    """Build a launch plan for calls like ``attention(q, k, v, ...)``.

    The plan is made from the arrays' metadata (shapes, strides, dtypes,
    pointer alignment, where ``kv_lens`` / ``block_table`` live) and the
    options; :meth:`Plan.run` then launches with any arrays of the same
    metadata, on CuPy's current stream, with no validation or host
    synchronisation. :meth:`Plan.describe` says what will launch (kernel,
    grid, decomposition, workspace) and ``Plan.workspace_bytes`` how much
    workspace a launch uses.

    Parameters
    ----------
    q, k, v, kv_lens, block_table, scale, out, schedule, num_ctas, tile_size, kv_layout
        As in :func:`attention` (GPU arrays; ``kv_lens`` may be a NumPy
        array, whose values are then checked at every run). ``out``: pass an
        array when the runs will pass ``out=`` arrays of that layout; None when
        they will let the plan allocate the output.
    stages : int, optional
        Pipeline depth of the kernel (2 to 6), for experiments; default by
        configuration.
    ctas_per_sm : int, optional
        Lean grid: CTAs per SM (default from the kernel's occupancy).
    sinks, window_left, softcap
        As in :func:`attention` (``sinks``: an array of the layout the runs
        will pass as ``run(..., sinks=...)``; its values are read at each
        run).
    min_tiles_per_cta : int, optional
        Lean: at most one CTA per this many tiles (see :class:`Config`).
    kv_dtype : {"e4m3", "e5m2"}, optional
        An fp8 cache: ``k`` and ``v`` are its uint8 storage (or PyTorch
        float8 tensors, whose format needs no ``kv_dtype``); the runs pass
        ``k_scale`` / ``v_scale`` (default 1).
    config : Config, optional
        The kernel configuration in one object (schedule, tile_size, stages,
        ctas_per_sm, num_ctas, min_tiles_per_cta, merge_balance); pass either
        it or those arguments, not both (``merge_balance`` only through it).
    workspace : cupy.ndarray, optional
        Caller-owned workspace of at least ``workspace_bytes`` bytes
        (contiguous, 256-byte aligned); its first bytes (unit counters) are
        zeroed now and are zero again after every completed launch. Launches
        that may overlap in time (two streams, two graphs replayed
        concurrently) must not share one. Default: the plan owns its
        workspaces, one for eager launches (ordered across streams) and one
        per captured launch.

    Returns
    -------
    Plan

    Notes
    -----
    :func:`attention` keeps one plan per signature and device in the
    package's cache; a plan from this function is the caller's, never shared
    with another call. To capture several CUDA graphs that may replay
    concurrently, one plan (or attention()) serves them all: each captured
    launch gets a workspace of its own; keep the plan alive as long as those
    graphs may replay (their workspaces go with it). Dropping a plan while
    its launches run is safe: its own workspace returns to CuPy's pool behind
    an event on its last launch.
    """
    if config is not None:
        if not isinstance(config, Config):
            raise TypeError(f"config: expected a cupy_lean.Config, got {type(config).__name__}")
        given = [n for n, val, default in (("schedule", schedule, "lean"), ("num_ctas", num_ctas, None),
                                          ("tile_size", tile_size, None), ("stages", stages, None),
                                          ("ctas_per_sm", ctas_per_sm, None),
                                          ("min_tiles_per_cta", min_tiles_per_cta, None)) if val != default]
        if given:
            raise ValueError(f"config: pass the configuration either as config= or as arguments, "
                             f"got both (config and {', '.join(given)})")
        schedule, num_ctas, tile_size = config.schedule, config.num_ctas, config.tile_size
        stages, ctas_per_sm = config.stages, config.ctas_per_sm
        min_tiles_per_cta = config.min_tiles_per_cta
    merge_balance = None if config is None else config.merge_balance
    _validation.check_lean_options(schedule, ctas_per_sm, min_tiles_per_cta, merge_balance)
    k, v, kv_dtype = _torch_fp8_storage(k, v, kv_dtype)
    gpu, q, k, v, lens, table, out, _ = _normalise(q, k, v, kv_lens, block_table, out, None)
    k, v = _validation.kv_layout_views(k, v, kv_layout, table is not None)
    if not gpu:
        raise TypeError("q: plan() needs GPU arrays (CuPy, or any with __cuda_array_interface__ / "
                        f"CUDA __dlpack__), got {type(q).__module__}.{type(q).__name__}")
    _plan.check_devices(_device(), q=q, k=k, v=v, out=out, kv_lens=lens, block_table=table)
    kv_dtype = _gpu_fp8_format(k, kv_dtype)
    if q.ndim == 4:
        m = _check_multi_query(q, k, v, lens, table, scale, out, None, schedule, num_ctas, tile_size, kv_dtype)
    else:
        m = _validation.validate(q, k, v, lens, table, scale, out, schedule, num_ctas, tile_size, True, kv_dtype)
    feats = _features(m, sinks, window_left, softcap, True)
    feats.kv8 = kv_dtype
    if stages is not None:
        _validation._check_int(stages, "stages", 2, 6)
    if ctas_per_sm is not None:
        _validation._check_int(ctas_per_sm, "ctas_per_sm", 1, 32)
    if min_tiles_per_cta is not None:
        _validation._check_int(min_tiles_per_cta, "min_tiles_per_cta", 1, 1 << 20)
    if merge_balance is not None:
        _validation._check_int(merge_balance, "merge_balance", 0, 1 << 10)
    if isinstance(table, np.ndarray):
        import cupy

        table = cupy.asarray(table)
    sig = _plan.signature(q, k, v, out, lens, table, m.scale if scale is not None else None, schedule,
                          num_ctas, tile_size, stages, ctas_per_sm, _features_key(feats), min_tiles_per_cta,
                          merge_balance)
    p = _plan.Plan(sig, m, workspace=workspace)
    p.kv_layout = kv_layout
    return p


MAX_Q_LEN = 8


def _gpu_fp8_format(k, kv_dtype, scales_given=False):
    """The fp8 format ("e4m3" | "e5m2") of a GPU call's K/V storage, or None
    for an fp16 / bf16 cache; errors name what is missing."""
    if kv_dtype is None and not scales_given:
        return None
    if kv_dtype is None:
        if k.dtype != np.uint8:
            raise ValueError(f"k_scale, v_scale: only with an fp8 KV cache (uint8 storage with kv_dtype=, or a "
                             f"PyTorch float8 tensor), got k of dtype {k.dtype}")
        raise ValueError(f"kv_dtype: an fp8 cache on the GPU is uint8 storage with kv_dtype='e4m3' or 'e5m2' "
                         f"(or a PyTorch float8 tensor), got k of dtype {k.dtype} and no kv_dtype")
    from .kernels import FP8_FEATURES

    if not isinstance(kv_dtype, str) or kv_dtype not in FP8_FEATURES:
        raise ValueError(f"kv_dtype: expected one of {tuple(FP8_FEATURES)}, got {kv_dtype!r}")
    return kv_dtype


def _check_multi_query(q, k, v, lens, table, scale, out, lse, schedule, num_ctas, tile_size, kv8=None):
    """Checks of a GPU call with q of shape (batch, q_len, heads_q,
    head_dim), whose q_len x group rows of a unit share one pass over its K
    and V. Returns the call's Meta."""
    from .kernels import MAX_GROUP

    q_len = int(q.shape[1])
    if not 1 <= q_len <= MAX_Q_LEN:
        raise ValueError(f"q: the GPU kernels support 1 to {MAX_Q_LEN} query tokens per sequence (axis 1), "
                         f"got {q_len}")
    m = _validation.validate(q[:, 0], k, v, lens, table, scale, None, schedule, num_ctas, tile_size, True, kv8)
    if m.group * q_len > MAX_GROUP:
        raise ValueError(f"q: q_len x heads_q / heads_kv must be at most {MAX_GROUP} on the GPU, got "
                         f"{q_len} x {m.group}")
    shape = (m.batch, q_len, m.heads_q, m.head_dim)
    _validation.check_out(out, shape, q.dtype)
    _validation.check_lse(lse, shape[:3])
    return m


def _features(m, sinks, window_left, softcap, gpu):
    """The call's optional semantics, validated; on the GPU path the sinks
    are a GPU array (host sinks are value-checked, then copied as float32)."""
    on_gpu = gpu and sinks is not None and _where(sinks) == "gpu"
    if sinks is not None:
        sinks = _to_gpu(sinks, "sinks") if on_gpu else _to_cpu(sinks, "sinks")
    if on_gpu:
        _plan.check_devices(_device(), sinks=sinks)
    feats = _validation.validate_features(m, sinks, window_left, softcap, on_gpu)
    if gpu and isinstance(feats.sinks, np.ndarray):
        feats.sinks = _to_gpu(feats.sinks.astype(np.float32), "sinks")
    return feats


def invariant_decomposition(units):
    """``(schedule, num_ctas)`` of a ``batch_invariant=True`` call of
    ``units`` units (batch x KV heads): with
    ``kernels.TUNING["invariant_splits"] = n`` (16 by default; n >= 2)
    ``("split", units * n)``: n chunks per unit whatever the batch, so each
    sequence's chunks, their partial states and their merge order depend on
    that sequence alone (the plan merges them with one combine CTA per
    unit); with 0 (or no units) ``("head", None)``, one CTA per unit. The
    bits differ between the two settings: compare results made under one.
    A batch so large that its ``units x n`` partial states reach 2**31
    floats is refused (ValueError) rather than run another way."""
    from .kernels import TUNING, _check_tuning_value

    n = TUNING["invariant_splits"]
    _check_tuning_value("invariant_splits", n)
    n = int(n)
    return ("split", units * n) if n >= 2 and units else ("head", None)


def _cpu_general(q, k, v, lens, table, scale, return_lse, out, lse, schedule, num_ctas, tile_size, sinks,
                 window_left, softcap, batch_invariant, kv_dtype, k_scale, v_scale, q_lens=None):
    """NumPy path of calls with several query tokens per sequence or an fp8
    cache: the reference validates and computes; the result is cast to q's
    dtype and written to ``out`` / ``lse`` when given."""
    _validation.validate_options(schedule, num_ctas, tile_size)  # the arrays: checked by the reference
    if batch_invariant:
        _validation.check_batch_invariant(schedule, num_ctas)
    if q.ndim in (3, 4):  # out and lse before any work (another q: the reference says what is wrong)
        _validation.check_out(out, q.shape, q.dtype)
        _validation.check_lse(lse, q.shape[:-1])
    with np.errstate(all="ignore"):
        o64, lse64 = reference.attention(q, k, v, kv_lens=lens, block_table=table, scale=scale, sinks=sinks,
                                         window_left=window_left, softcap=softcap, kv_dtype=kv_dtype,
                                         k_scale=k_scale, v_scale=v_scale, q_lens=q_lens)
    res = o64.astype(q.dtype)
    res_lse = lse64.astype(np.float32)
    for dst, src in ((out, res), (lse, res_lse)):
        if dst is not None:
            dst[...] = src
    res = out if out is not None else res
    res_lse = lse if lse is not None else res_lse
    return (res, res_lse) if return_lse else res


def _cpu_attention(q, k, v, lens, table, m, out, feats=None):
    feats = feats or _validation.Features()
    if m.batch == 0:
        o = np.zeros((0, m.heads_q, m.head_dim), dtype=q.dtype)
        lse = np.zeros((0, m.heads_q), dtype=np.float32)
    else:
        with np.errstate(all="ignore"):
            o64, lse64 = reference.attention(q, k, v, kv_lens=lens, block_table=table, scale=m.scale,
                                             sinks=feats.sinks, window_left=feats.window_left,
                                             softcap=feats.softcap)
            o = o64.astype(q.dtype)
            lse = lse64.astype(np.float32)  # (an lse past float32's range becomes +-inf, as on the GPU)
    if out is not None:
        out[...] = o
        o = out
    return o, lse


def merge_states(outs, lses):
    """Merge attention results computed over disjoint parts of the same KV
    sequences.

    Parameters
    ----------
    outs : array, shape (parts, ..., head_dim)
        Normalised attention outputs of each part, stacked on a leading axis
        (e.g. ``(parts, batch, heads, head_dim)``). float16, bfloat16 or
        float32 (NumPy also float64).
    lses : array, shape (parts, ...)
        Log-sum-exp (natural log) of each part, as returned with
        ``return_lse=True``; ``-inf`` marks an empty part.

    Returns
    -------
    out : array, shape (..., head_dim), outs' dtype
    lse : float32 array, shape (...)
        The attention result over the union of the parts. Where every part is
        empty: zeros and ``-inf``. NumPy in, NumPy out; GPU in, CuPy out (parts
        merged in order, deterministic).
    """
    where = {_where(outs), _where(lses)}
    gpu = "gpu" in where
    if gpu and where != {"gpu"}:
        raise TypeError("outs, lses: expected arrays on one device, got one on the GPU and one on the CPU")
    if gpu:
        outs, lses = _to_gpu(outs, "outs"), _to_gpu(lses, "lses")
    else:
        outs, lses = _to_cpu(outs, "outs"), _to_cpu(lses, "lses")
    _validation.validate_merge(outs, lses, gpu)
    if gpu:
        from . import _gpu

        _plan.check_devices(_device(), outs=outs, lses=lses)
        return _gpu.merge_states(outs, lses)
    with np.errstate(all="ignore"):
        o, s = reference.merge_states(outs, lses)
    return o.astype(outs.dtype), s.astype(np.float32)
