"""Float64 reference of decode attention, in NumPy.

Everything here is plain NumPy in float64 and written for clarity, not speed:
it is the ground truth that every kernel path is tested against.

* :func:`attention` — softmax attention of one query token per sequence over a
  dense, ragged or paged KV cache.
* :func:`merge_states` — merge results computed over disjoint parts of the same
  sequences, given their log-sum-exp.
* :func:`emulate` — run a :class:`~cupy_lean.schedule.Schedule`'s decomposition:
  one partial state per segment, each unit's partial states reduced in CTA
  order, exactly as the kernels do.
"""

from __future__ import annotations

import numpy as np

__all__ = ["attention", "merge_states", "emulate", "gather_kv", "partial_state", "scores", "add_sink",
           "finalize", "window_start"]


def _f64(x):
    return np.asarray(x).astype(np.float64)


def gather_kv(k, v, b, length, block_table=None):
    """K and V of sequence ``b``, first ``length`` tokens, as float64 arrays of
    shape ``(length, heads_kv, head_dim)``. A ``length`` past the sequence's
    capacity (the dense cache's ``seqlen``, or ``block_table``'s pages x
    ``page_size``), a ``b`` outside the batch or a page of those tokens
    outside the cache raises ValueError."""
    from .validation import _check_int

    if isinstance(length, np.ndarray) and length.ndim == 0:
        length = length[()]
    if isinstance(b, np.ndarray) and b.ndim == 0:
        b = b[()]
    batch = k.shape[0] if block_table is None else np.shape(block_table)[0]
    b = _check_int(b, "b", 0, batch - 1)  # no negative index from the end
    cap = k.shape[1] * (1 if block_table is None else np.shape(block_table)[1])
    length = _check_int(length, "length", 0, cap)  # TypeError for a non-integer, ValueError past cap
    if block_table is None:
        return _f64(k[b, :length]), _f64(v[b, :length])
    page_size = k.shape[1]
    npages = -(-length // page_size)
    pages = np.asarray(block_table[b, :npages], dtype=np.int64)
    bad = np.flatnonzero((pages < 0) | (pages >= k.shape[0]))
    if bad.size:
        raise ValueError(f"block_table: sequence {b}'s page {bad[0]} (of its first {length} tokens) is "
                         f"{pages[bad[0]]}, expected 0 <= page < {k.shape[0]} (the cache's pages)")
    kb = _f64(k[pages]).reshape(-1, k.shape[2], k.shape[3])[:length]
    vb = _f64(v[pages]).reshape(-1, v.shape[2], v.shape[3])[:length]
    return kb, vb


def _default_lens(k, block_table, batch, kv_lens):
    if kv_lens is not None:
        return np.asarray(kv_lens, dtype=np.int64)
    if block_table is not None:
        raise ValueError("kv_lens: required with a paged cache (block_table given)")
    return np.full(batch, k.shape[1], dtype=np.int64)


def scores(qg, kt, scale, softcap=None):
    """Scaled scores ``scale * q @ k^T`` of rows ``qg`` (g, D) against tokens
    ``kt`` (n, D); with ``softcap``, ``softcap * tanh(score / softcap)``."""
    s = (qg @ kt.T) * scale
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    return s


def partial_state(qg, kt, vt, scale, softcap=None):
    """Online-softmax state of query rows ``qg`` (g, D) over tokens ``kt``, ``vt``
    (n, D): returns ``(m, l, acc)`` with ``m`` the row max of the scores
    (:func:`scores`), ``l = sum(exp(s - m))`` and ``acc = exp(s - m) @ v``
    (unnormalised)."""
    g = qg.shape[0]
    if kt.shape[0] == 0:
        return np.full(g, -np.inf), np.zeros(g), np.zeros((g, vt.shape[1]))
    s = scores(qg, kt, scale, softcap)
    m = s.max(axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.exp(s - m[:, None])
    return m, p.sum(axis=1), p @ vt


def merge_partial(states):
    """Merge ``(m, l, acc)`` states in the given order. Empty states (``l == 0``)
    are skipped, so an all-empty list gives ``l == 0``."""
    m_tot = None
    for m, l, acc in states:
        if m_tot is None:
            m_tot, l_tot, acc_tot = m.copy(), l.copy(), acc.copy()
            continue
        with np.errstate(invalid="ignore"):
            m_new = np.maximum(m_tot, m)
            safe = np.where(np.isneginf(m_new), 0.0, m_new)
            a = np.exp(m_tot - safe)
            c = np.exp(m - safe)
        l_tot = l_tot * a + l * c
        acc_tot = acc_tot * a[:, None] + acc * c[:, None]
        m_tot = m_new
    return m_tot, l_tot, acc_tot


def add_sink(m, l, acc, sink):
    """Fold an attention sink into a state: one more logit ``sink`` (per row)
    in the softmax denominator, with a zero value vector."""
    sink = np.broadcast_to(np.asarray(sink, dtype=np.float64), m.shape)
    m_new = np.maximum(m, sink)
    safe = np.where(np.isneginf(m_new), 0.0, m_new)
    with np.errstate(invalid="ignore"):
        a = np.exp(m - safe)
    return m_new, l * a + np.exp(sink - safe), acc * a[:, None]


def finalize(m, l, acc):
    """Normalise a state: ``out = acc / l``, ``lse = m + log(l)``; rows with
    ``l == 0`` give zeros and ``-inf``."""
    empty = l == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(empty[:, None], 0.0, acc / np.where(empty, 1.0, l)[:, None])
        lse = np.where(empty, -np.inf, m + np.log(np.where(empty, 1.0, l)))
    return out, lse


def _checked(q, k, v, kv_lens, block_table, scale, sinks=None, window_left=None, softcap=None, kv_dtype=None,
             k_scale=None, v_scale=None):
    """The arguments as NumPy arrays, validated exactly as
    :func:`cupy_lean.attention` validates them (same code, same messages).
    An fp8 cache comes back as its fp8 view, with its scales in ``f``."""
    from ._arrays import host_ints, to_cpu
    from .validation import check_host_values, fp8_cache, fp8_scales, validate, validate_features

    q, k, v = to_cpu(q, "q"), to_cpu(k, "k"), to_cpu(v, "v")
    fp8 = fp8_cache(k, v, kv_dtype, k_scale, v_scale)
    if fp8 is not None:
        k, v = fp8
    lens = None if kv_lens is None else host_ints(kv_lens, "kv_lens")
    table = None if block_table is None else host_ints(block_table, "block_table")
    m = validate(q, k, v, lens, table, scale, None, "lean", None, None, False)
    check_host_values(m, lens, table)
    f = validate_features(m, None if sinks is None else to_cpu(sinks, "sinks"), window_left, softcap, False)
    f.kv_scales = None if fp8 is None else fp8_scales(k_scale, v_scale, m.heads_kv)  # (as the GPU path does)
    return q, k, v, lens, table, m.scale, f


def window_start(lens, window_left, q_len=1):
    """First key position the queries of each sequence see: ``max(0, len -
    q_len - window_left)`` (the first of ``q_len`` query tokens sees keys
    up to ``len - q_len``), or 0 without a window (``window_left`` None or
    -1, as in :func:`cupy_lean.attention`).

    ``q_len`` is one count for every sequence (at least 1) or, for a ragged
    batch, each sequence's own (``q_lens``, each at least 0); a sequence of
    no query tokens sees no key, and its start is ``len``. So ``lens -
    window_start(lens, window_left, q_lens)`` are the lengths the GPU kernel
    walks (and :func:`emulate` takes a schedule of). ``lens``: integers >= 0,
    one per sequence. Raises ValueError for a negative length, a
    ``window_left`` below -1 or a count below its minimum, TypeError for
    lengths or counts that are not integers."""
    from .schedule import _as_lens
    from .validation import _check_int

    lens = _as_lens(lens, "lens")
    if np.ndim(q_len) == 0:
        q_len = np.int64(_check_int(q_len, "q_len", 1))
    else:
        q_len = np.asarray(q_len)
        if q_len.shape != lens.shape or q_len.dtype.kind not in "iu":
            raise (ValueError if q_len.dtype.kind in "iu" else TypeError)(
                f"q_len: expected one integer or integers of shape {lens.shape} (q_lens), got "
                f"{q_len.dtype} {q_len.shape}")
        if (q_len < 0).any():
            i = int(np.argmax(q_len < 0))
            raise ValueError(f"q_len: expected counts of at least 0, got q_len[{i}] = {int(q_len[i])}")
        q_len = q_len.astype(np.int64)
    if window_left is None or _check_int(window_left, "window_left", -1) == -1:
        start = np.zeros_like(lens)
    else:
        start = np.maximum(lens - q_len - int(window_left), 0)
    return np.where(q_len == 0, lens, start)


def attention(q, k, v, *, kv_lens=None, block_table=None, scale=None, sinks=None, window_left=None,
              softcap=None, kv_dtype=None, k_scale=None, v_scale=None, q_lens=None):
    """Float64 decode attention.

    The arguments are validated as :func:`cupy_lean.attention` validates them
    (lengths in ``[0, capacity]``, ``heads_q`` a multiple of ``heads_kv``,
    page indices in range, ...): ``ValueError`` / ``TypeError`` name the
    argument, what was expected and what was given.

    Parameters
    ----------
    q : array, shape (batch, heads_q, head_dim) or (batch, q_len, heads_q, head_dim)
        With ``q_len`` query tokens per sequence, the last ``q_len`` positions
        of the sequence: query ``i`` sees keys ``[0, kv_len - q_len + i]``
        (causal), and ``out`` / ``lse`` get the ``q_len`` axis too.
    q_lens : array of int, shape (batch,), optional
        With a 4-D ``q``: sequence ``b`` has ``q_lens[b]`` query tokens (0 to
        ``q_len``), the first ``q_lens[b]`` of axis 1; query ``i`` sees keys
        ``[0, kv_len - q_lens[b] + i]``. Tokens past ``q_lens[b]`` are padding:
        they see no key (``out`` zero, ``lse`` ``-inf``, or the sink's logit).
    k, v : array, shape (batch, seqlen, heads_kv, head_dim), or with
        ``block_table`` the paged cache (num_pages, page_size, heads_kv, head_dim)
        fp8 (``float8_e4m3fn`` / ``float8_e5m2``, or ``uint8`` with
        ``kv_dtype``) holds ``value / scale``, with ``k_scale`` / ``v_scale``
        a number or one per KV head.
    kv_lens : array of int, shape (batch,), optional
        Default: every sequence is ``seqlen`` long (dense only).
    block_table : array of int, shape (batch, max_pages), optional
    scale : float, optional
        Default ``1 / sqrt(head_dim)``.
    sinks : array, shape (heads_q,), optional
        One logit per query head added to the softmax denominator (with a
        zero value vector); ``lse`` includes it.
    window_left : int, optional
        The query sees only its last ``window_left + 1`` keys.
    softcap : float, optional
        Scores become ``softcap * tanh(score / softcap)`` (after scaling).

    Returns
    -------
    out : ndarray of float64, shape (batch, heads_q, head_dim)
    lse : ndarray of float64, shape (batch, heads_q)
        Natural-log log-sum-exp of the scores (and the sink); ``-inf`` where
        ``kv_len == 0`` and there is no sink (and ``out`` is zero there).
    """
    from ._arrays import to_cpu

    qa = to_cpu(q, "q")
    if q_lens is not None and qa.ndim != 4:
        raise ValueError(f"q_lens: needs q of shape (batch, q_len, heads_q, head_dim), got q of shape "
                         f"{tuple(qa.shape)}")
    if qa.ndim == 4:  # q_len query tokens: query i is a decode over the first kv_len - q_len + 1 + i keys
        if qa.shape[1] < 1:
            raise ValueError(f"q: expected q_len >= 1 query tokens on axis 1, got shape {tuple(qa.shape)}")
        # every argument checked once, as for one query token (kv_lens against the cache, ...); each
        # token's lengths below are derived from those values
        _, kk, _, lens0, _, _, _ = _checked(qa[:, 0], k, v, kv_lens, block_table, scale, sinks, window_left,
                                            softcap, kv_dtype, k_scale, v_scale)
        full = _default_lens(kk, block_table, qa.shape[0], lens0).astype(np.int64)
        ql = qa.shape[1]
        nq = _query_tokens(q_lens, qa.shape[0], ql)
        res = [attention(qa[:, i], k, v,
                         kv_lens=None if full is None else np.where(i < nq, np.clip(full - nq + 1 + i, 0, None), 0),
                         block_table=block_table, scale=scale, sinks=sinks, window_left=window_left,
                         softcap=softcap, kv_dtype=kv_dtype, k_scale=k_scale, v_scale=v_scale)
               for i in range(ql)]
        return np.stack([r[0] for r in res], axis=1), np.stack([r[1] for r in res], axis=1)
    q, k, v, kv_lens, block_table, scale, f = _checked(q, k, v, kv_lens, block_table, scale, sinks,
                                                       window_left, softcap, kv_dtype, k_scale, v_scale)
    batch, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    lens = _default_lens(k, block_table, batch, kv_lens)
    start = window_start(lens, f.window_left)
    qf = _f64(q)
    out = np.zeros((batch, hq, d))
    lse = np.full((batch, hq), -np.inf)
    for b in range(batch):
        n = int(lens[b])
        kb, vb = gather_kv(k, v, b, n, block_table)
        kb, vb = kb[start[b]:], vb[start[b]:]
        if f.kv_scales is not None:  # fp8: the cache holds value / scale
            kb, vb = kb * f.kv_scales[0][None, :, None], vb * f.kv_scales[1][None, :, None]
        for h in range(hkv):
            rows = slice(h * g, (h + 1) * g)
            state = partial_state(qf[b, rows], kb[:, h], vb[:, h], scale, f.softcap)
            if f.sinks is not None:
                state = add_sink(*state, f.sinks[rows])
            out[b, rows], lse[b, rows] = finalize(*state)
    return out, lse


def _short(x, n=8):
    """The first ``n`` entries of an integer array, for a message."""
    x = [int(i) for i in np.asarray(x).ravel()]
    return str(x[:n])[:-1] + (", ...]" if len(x) > n else "]")


def _query_tokens(q_lens, batch, q_len):
    """Query tokens of each sequence: ``q_lens`` checked (integers of shape
    ``(batch,)`` in ``[0, q_len]``) as int64, or ``q_len`` for all."""
    from ._arrays import host_ints

    if q_lens is None:
        return np.full(batch, q_len, dtype=np.int64)
    nq = host_ints(q_lens, "q_lens")
    if nq.shape != (batch,) or nq.dtype.kind not in "iu":
        raise (TypeError if nq.dtype.kind not in "iu" else ValueError)(
            f"q_lens: expected integers of shape ({batch},), got {nq.dtype} {tuple(nq.shape)}")
    from .validation import check_range

    check_range(nq, 0, q_len, "q_lens", "q_len")
    return nq.astype(np.int64)


def merge_states(outs, lses):
    """Merge attention results over disjoint parts of the same sequences.

    Parameters
    ----------
    outs : array, shape (parts, ..., head_dim)
        Normalised outputs of each part.
    lses : array, shape (parts, ...)
        Natural-log log-sum-exp of each part; ``-inf`` marks an empty part.

    Returns
    -------
    out : float64 ndarray, shape (..., head_dim)
    lse : float64 ndarray, shape (...)
        As if attention had run over the union of the parts. Rows where every
        part is empty give zeros and ``-inf``.
    """
    from ._arrays import to_cpu
    from .validation import validate_merge

    outs, lses = to_cpu(outs, "outs"), to_cpu(lses, "lses")
    validate_merge(outs, lses, False)
    o = _f64(outs)
    s = _f64(lses)
    m = s.max(axis=0)
    safe = np.where(np.isneginf(m), 0.0, m)
    w = np.exp(s - safe)  # exp(-inf) = 0 for empty parts
    tot = w.sum(axis=0)
    empty = tot == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (w[..., None] * np.where(np.isneginf(s)[..., None], 0.0, o)).sum(axis=0)
        out = np.where(empty[..., None], 0.0, out / np.where(empty, 1.0, tot)[..., None])
        lse = np.where(empty, -np.inf, safe + np.log(np.where(empty, 1.0, tot)))
    return out, lse


def _check_coverage(schedule):
    """Raises ValueError naming the first unit whose segments do not cover
    its tiles exactly once (a tile left out, walked twice, or past the
    unit's end) or that is not the unit its batch and head name: a schedule
    edited by hand would otherwise give attention over the wrong keys."""
    segs = schedule.segments
    ts = schedule.tile_size
    tiles = (np.asarray(schedule.kv_lens, dtype=np.int64) + ts - 1) // ts
    ranges = {}
    for s in segs:
        b, h, u = int(s["batch"]), int(s["head"]), int(s["unit"])
        if not (0 <= b < schedule.batch and 0 <= h < schedule.heads_kv) or u != b * schedule.heads_kv + h:
            raise ValueError(f"schedule: a segment names unit {u} with batch {b} and head {h}, expected unit "
                             f"batch x {schedule.heads_kv} + head with batch < {schedule.batch}")
        ranges.setdefault(u, []).append((int(s["tile_begin"]), int(s["tile_end"])))
    for u in range(schedule.batch * schedule.heads_kv):
        n = int(tiles[u // schedule.heads_kv])
        at = 0
        for t0, t1 in sorted(ranges.get(u, [])):
            if t0 != at or t1 <= t0:
                break
            at = t1
        else:
            if at == n:
                continue
        got = sorted(ranges.get(u, []))
        raise ValueError(f"schedule: the segments of unit {u} (batch {u // schedule.heads_kv}, head "
                         f"{u % schedule.heads_kv}) cover tiles {got}, expected each of its {n} tiles "
                         f"[0, {n}) once")


def emulate(schedule, q, k, v, *, kv_lens=None, block_table=None, scale=None, sinks=None, window_left=None,
            softcap=None, return_partials=False, q_lens=None, kv_dtype=None, k_scale=None, v_scale=None):
    """Run a schedule's decomposition in float64.

    Every segment of ``schedule`` is computed on its own as an online-softmax
    state; a segment that covers its whole unit is normalised straight into the
    output, and each partial unit's states are merged in CTA order (for
    ``split``, chunk order), as the kernels do; a ``lean`` unit cut into
    many pieces in groups first (:func:`cupy_lean.schedule.merge_group_size`
    with ``scratch_floats = tile_size x head_dim``) unless the schedule's
    ``merge_launch`` merges them all at once.

    ``schedule`` must have been built for the same ``heads_kv`` and for the
    lengths the kernel walks: ``kv_lens - window_start(kv_lens,
    window_left, q_len)`` (tiles start at the window's first key; without a
    window and ``q_lens``, ``kv_lens`` itself). With ``q_lens`` pass them
    for ``q_len``, window or not: each sequence's window starts at its own
    first token's, and a sequence of no tokens walks no key. Sinks are folded in once per unit, at
    the final merge. A 4-D ``q`` (``q_len`` query tokens, optionally ragged
    through ``q_lens``) makes a unit's rows ``q_len x group``, token-major,
    each with its own causal limit, as in the kernel; ``kv_dtype`` /
    ``k_scale`` / ``v_scale`` read an fp8 cache as :func:`attention` does.
    With ``return_partials=True`` the per-slot states are returned as a third
    value (a dict ``slot -> (m, l, acc)``, natural-log ``m``): each
    contributor's own state (in the kernel's workspace, after a two-level
    merge, a group's first slot holds the group's merged state instead).
    A schedule whose segments do not cover each unit's tiles exactly once
    (edited by hand) raises ValueError naming the unit.
    """
    from ._arrays import to_cpu
    from .schedule import Schedule, merge_group_size

    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule: expected a cupy_lean.Schedule (lean_schedule, split_schedule, "
                        f"head_schedule), got {type(schedule).__name__}")
    q = to_cpu(q, "q")
    if q.ndim not in (3, 4):
        raise ValueError(f"q: expected 3 dimensions (batch, heads_q, head_dim) or 4 (batch, q_len, heads_q, "
                         f"head_dim), got shape {tuple(q.shape)}")
    if q_lens is not None and q.ndim != 4:
        raise ValueError(f"q_lens: needs q of shape (batch, q_len, heads_q, head_dim), got q of shape "
                         f"{tuple(q.shape)}")
    multi = q.ndim == 4
    if multi and q.shape[1] < 1:
        raise ValueError(f"q: expected q_len >= 1 query tokens on axis 1, got shape {tuple(q.shape)}")
    # the arrays and options checked as attention() checks them (as for one query token)
    _, k, v, kv_lens, block_table, scale, f = _checked(q[:, 0] if multi else q, k, v, kv_lens, block_table, scale,
                                                       sinks, window_left, softcap, kv_dtype, k_scale, v_scale)
    if f.kv_scales is not None:  # fp8: the cache holds value / scale
        k = k.astype(np.float64) * f.kv_scales[0][None, None, :, None]
        v = v.astype(np.float64) * f.kv_scales[1][None, None, :, None]
    window_left, softcap = f.window_left, f.softcap
    hkv = k.shape[2]
    qm = q if multi else q[:, None]
    batch, ql, hq, d = qm.shape
    if schedule.heads_kv != hkv or schedule.batch != batch:
        raise ValueError(f"schedule: built for batch={schedule.batch}, heads_kv={schedule.heads_kv}, the arrays "
                         f"have batch={batch}, heads_kv={hkv}")
    lens = _default_lens(k, block_table, batch, kv_lens)
    nq = _query_tokens(q_lens, batch, ql)
    start = window_start(lens, window_left, nq)
    if not np.array_equal(lens - start, schedule.kv_lens):
        what = "kv_lens" if window_left is None and q_lens is None else "walked lengths (kv_lens - window_start)"
        raise ValueError(f"schedule: built for kv_lens {_short(schedule.kv_lens)}, the call's {what} are "
                         f"{_short(lens - start)}")
    _check_coverage(schedule)
    sink = f.sinks
    g = hq // hkv
    ts = schedule.tile_size
    qf = _f64(qm)
    out = np.zeros((batch, ql, hq, d))
    lse = np.full((batch, ql, hq), -np.inf)
    toks = np.repeat(np.arange(ql), g)  # unit row r: query token r // g, head r % g of the unit
    heads = np.tile(np.arange(g), ql)

    def rows_of(b, h):
        return qf[b, toks, h * g + heads]

    def state_of(b, h, kb, vb, t0, t1):
        """The unit's rows over keys [t0, t1), each row within its causal and window limits."""
        if not multi:
            return partial_state(rows_of(b, h), kb[t0:t1, h], vb[t0:t1, h], scale, softcap)
        parts = []
        for r in range(ql * g):
            i = int(toks[r])
            hi = int(lens[b]) - int(nq[b]) + i  # last key this token sees
            lo = 0 if window_left is None else hi - int(window_left)
            a, e = max(t0, lo, 0), min(t1, hi + 1) if i < nq[b] else t0
            parts.append(partial_state(rows_of(b, h)[r:r + 1], kb[a:max(a, e), h], vb[a:max(a, e), h], scale,
                                       softcap))
        return tuple(np.concatenate([p[j] for p in parts]) for j in range(3))

    def put(b, h, state):
        if sink is not None:
            state = add_sink(*state, sink[h * g + heads])
        o, ls = finalize(*state)
        out[b, toks, h * g + heads], lse[b, toks, h * g + heads] = o, ls

    cache = {}
    slots = {}
    by_unit = {}
    for s in schedule.segments:
        b, h, u = int(s["batch"]), int(s["head"]), int(s["unit"])
        if b not in cache:
            cache[b] = gather_kv(k, v, b, int(lens[b]), block_table)
        kb, vb = cache[b]
        t0 = int(start[b]) + int(s["tile_begin"]) * ts
        t1 = min(int(start[b]) + int(s["tile_end"]) * ts, int(lens[b]))
        state = state_of(b, h, kb, vb, t0, t1)
        if s["partial"]:
            slots[int(s["slot"])] = state
            by_unit.setdefault(u, []).append((int(s["cta"]), int(s["slot"])))
        else:
            put(b, h, state)
    for u, parts in by_unit.items():
        b, h = divmod(u, hkv)
        parts.sort()  # CTA order, whatever order they were produced in
        states = [slots[sl] for _, sl in parts]
        # the kernel's two-level merge of many pieces (stream-K's, or the launch-time split's chunks)
        if (schedule.kind == "lean" or schedule.launch_split) and not schedule.merge_launch:
            size = merge_group_size(len(states), ql * g, ts * d)
            if size:
                states = [merge_partial(states[i:i + size]) for i in range(0, len(states), size)]
        put(b, h, merge_partial(states))
    if sink is not None:  # units without tiles: the sink alone
        for b in np.nonzero(lens - start == 0)[0]:
            for h in range(hkv):
                n = ql * g
                put(b, h, (np.full(n, -np.inf), np.zeros(n), np.zeros((n, d))))
    if not multi:
        out, lse = out[:, 0], lse[:, 0]
    if return_partials:
        return out, lse, slots
    return out, lse
