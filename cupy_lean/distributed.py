"""Context-parallel decode: a KV cache sharded by position over ranks.

When a sequence's cache outgrows one GPU, each rank (one GPU) holds a
contiguous range of every sequence's positions. Every rank computes the
attention of the full query over its shard, with its log-sum-exp; the ranks
then exchange their ``(out, lse)`` pairs (an all-gather, a few hundred KB
against gigabytes of cache) and each merges them in rank order with
:func:`cupy_lean.merge_states`. The result is identical on every rank and
does not depend on which rank finished first.

* :func:`shard_ranges` — where each rank's shard of each sequence starts
  and how long it is (an even split by position; empty shards allowed).
* :func:`attention` — this rank's shard in, the merged output out, through a
  *group*: any object with ``rank``, ``world_size`` and ``all_gather(x)``
  (returning the ``world_size`` arrays stacked in rank order).
* :class:`NcclGroup` — such a group over an NCCL communicator
  (``cupy.cuda.nccl``), one process per GPU.
* :func:`attention_devices` — one process driving several GPUs: the shards
  on their devices, an NCCL all-gather among them, the merge on each.

Only the merge of ``(out, lse)`` crosses GPUs: the lean kernel runs on each
shard unchanged (dense or paged, ragged shard lengths, empty shards).
"""

from __future__ import annotations

import numpy as np

from .schedule import _as_lens, _check_positive_int

__all__ = ["shard_ranges", "merge_ranks", "attention", "NcclGroup", "attention_devices"]


def shard_ranges(kv_lens, world_size):
    """Contiguous shards of every sequence by position.

    Returns ``(starts, lengths)``, int64 arrays of shape ``(world_size,
    batch)``: rank ``r`` holds positions ``[starts[r, b], starts[r, b] +
    lengths[r, b])`` of sequence ``b``. The first ``len % world_size`` ranks
    hold one position more; a sequence shorter than ``world_size`` leaves
    some shards empty."""
    lens = _as_lens(kv_lens, "kv_lens")  # integers >= 0, 1-D (TypeError for floats)
    world_size = _check_positive_int(world_size, "world_size")
    r = np.arange(world_size)[:, None]
    base, extra = lens // world_size, lens % world_size
    lengths = base[None, :] + (r < extra[None, :])
    starts = r * base[None, :] + np.minimum(r, extra[None, :])
    return starts.astype(np.int64), lengths.astype(np.int64)


def merge_ranks(outs, lses):
    """Merge the ranks' results, given stacked in rank order (``outs``:
    ``(world, batch, heads_q, head_dim)``, ``lses``: ``(world, batch,
    heads_q)``): :func:`cupy_lean.merge_states`, whose order is the stacking
    order, so every rank gets the same bits."""
    from .attention import merge_states

    return merge_states(outs, lses)


def _refuse_unshardable(q, kwargs):
    """What a shard cannot compute on its own: ``out`` / ``lse`` (the merge
    allocates), sinks (added once, to the merged result), and what depends on
    a key's position in the whole sequence, which a shard does not know (a
    window, the causal limits of several query tokens)."""
    for bad in ("out", "lse", "sinks"):
        if kwargs.get(bad) is not None:  # None: the default, nothing asked
            raise ValueError(f"{bad}: not supported by the sharded call (sinks: add them once, to the merged "
                             f"result; out/lse: the merge allocates), got {type(kwargs[bad]).__name__}")
    if kwargs.get("window_left") not in (None, -1):
        raise ValueError(f"window_left: not supported by the sharded call (each rank would apply the window "
                         f"to its own shard's length), got {kwargs['window_left']!r}")
    if kwargs.get("q_lens") is not None:
        raise ValueError("q_lens: not supported by the sharded call (one query token per sequence)")
    ndim = len(getattr(q, "shape", ()))
    if ndim != 3:
        raise ValueError(f"q: the sharded call takes one query token per sequence, shape (batch, heads_q, "
                         f"head_dim); got {ndim} dimensions, shape {tuple(getattr(q, 'shape', ()))}")


def attention(q, k, v, *, kv_lens, group=None, block_table=None, return_lse=False, **kwargs):
    """Decode attention over a KV cache sharded by position across ranks.

    Parameters
    ----------
    q : array, shape (batch, heads_q, head_dim)
        The full query, the same on every rank.
    k, v, block_table
        This rank's shard of the cache, as for :func:`cupy_lean.attention`
        (dense or paged).
    kv_lens : array of int, shape (batch,)
        Length of each sequence's shard on this rank (0: an empty shard).
    group : object, optional
        ``rank``, ``world_size`` and ``all_gather(x)`` (the ranks' ``x``
        stacked in rank order); :class:`NcclGroup` for NCCL. None: one rank.
    return_lse : bool
        Also return the merged log-sum-exp.
    **kwargs
        Passed to :func:`cupy_lean.attention` for the shard (``scale``,
        ``schedule``, ``softcap``, an fp8 cache, ...). Refused: ``out``,
        ``lse``, ``sinks`` (fold them into the merged result:
        ``out * sigmoid(lse - sink)``, ``lse = logaddexp(lse, sink)`` per
        query head), and what depends on a key's position in the whole
        sequence, which a shard does not know: a ``window_left`` other than
        None or -1, ``q_lens``, and a 4-D ``q`` (``None`` for ``out``,
        ``lse``, ``sinks`` and ``q_lens`` is their default, accepted).

    Returns
    -------
    out (and lse): the attention over the whole sequences, identical on every
    rank.
    """
    from .attention import _check_bool, attention as local_attention

    return_lse = _check_bool(return_lse, "return_lse")
    _refuse_unshardable(q, kwargs)
    out, lse = local_attention(q, k, v, kv_lens=kv_lens, block_table=block_table, return_lse=True, **kwargs)
    if group is None or group.world_size == 1:
        return (out, lse) if return_lse else out
    outs = group.all_gather(out)
    lses = group.all_gather(lse)
    merged, merged_lse = merge_ranks(outs, lses)
    return (merged, merged_lse) if return_lse else merged


_NCCL_TYPES = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "bfloat16": "NCCL_BFLOAT16"}


class NcclGroup:
    """A group over an NCCL communicator, one process per GPU.

    ``comm`` is a ``cupy.cuda.nccl.NcclCommunicator`` of ``world_size``
    ranks (built from a shared ``nccl.get_unique_id()`` the usual way);
    ``all_gather`` runs on CuPy's current stream."""

    def __init__(self, comm, rank, world_size):
        self.comm, self.rank, self.world_size = comm, int(rank), int(world_size)

    def all_gather(self, x):
        """Every rank's ``x`` (same shape and dtype on each: float16,
        bfloat16 or float32) stacked in rank order, shape
        ``(world_size,) + x.shape``, on CuPy's current stream."""
        import cupy as cp
        from cupy.cuda import nccl

        x = cp.ascontiguousarray(x)
        recv = cp.empty((self.world_size,) + x.shape, dtype=x.dtype)
        dt = getattr(nccl, _NCCL_TYPES[str(x.dtype)])
        self.comm.allGather(x.data.ptr, recv.data.ptr, x.size, dt, cp.cuda.get_current_stream().ptr)
        return recv


def attention_devices(shards, *, comms=None, return_lse=False, **kwargs):
    """One process driving several GPUs: ``shards`` is a list, in rank order,
    of dicts ``{"device": id, "q": ..., "k": ..., "v": ..., "kv_lens": ...,
    "block_table": ... (optional)}`` with each rank's arrays on its device.
    The shards run on their devices, an NCCL all-gather (``comms``: the
    communicators of ``cupy.cuda.nccl.NcclCommunicator.initAll(devices)``,
    made here when None) exchanges the ``(out, lse)`` pairs, and every device
    merges them. Returns the list of per-device results (identical).
    ``kwargs`` go to each shard's call and are refused as in
    :func:`attention` (sinks, a window, ``q_lens``, a 4-D ``q``, ``out``,
    ``lse``)."""
    from .attention import _check_bool

    return_lse = _check_bool(return_lse, "return_lse")
    for s in shards:
        _refuse_unshardable(s["q"], kwargs)
    import cupy as cp
    from cupy.cuda import nccl

    from .attention import attention as local_attention

    devices = [int(s["device"]) for s in shards]
    if len(set(devices)) != len(devices):
        raise ValueError(f"shards: expected one shard per device, got devices {devices}")
    if comms is None:
        comms = nccl.NcclCommunicator.initAll(devices)
    parts = []
    for s in shards:
        with cp.cuda.Device(s["device"]):
            parts.append(local_attention(s["q"], s["k"], s["v"], kv_lens=s["kv_lens"],
                                         block_table=s.get("block_table"), return_lse=True, **kwargs))
    world = len(shards)
    gathered = []
    for which in (0, 1):
        recvs = []
        nccl.groupStart()
        for dev, comm, part in zip(devices, comms, parts):
            with cp.cuda.Device(dev):
                x = cp.ascontiguousarray(part[which])
                recv = cp.empty((world,) + x.shape, dtype=x.dtype)
                comm.allGather(x.data.ptr, recv.data.ptr, x.size, getattr(nccl, _NCCL_TYPES[str(x.dtype)]),
                               cp.cuda.get_current_stream().ptr)
                recvs.append(recv)
        nccl.groupEnd()
        gathered.append(recvs)
    results = []
    for i, dev in enumerate(devices):
        with cp.cuda.Device(dev):
            o, l = merge_ranks(gathered[0][i], gathered[1][i])
            results.append((o, l) if return_lse else o)
    return results
