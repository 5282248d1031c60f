"""GPU tests of what users do: CUDA graphs captured one after another and
replayed concurrently, plans, every array library, custom scales, odd
layouts, big batches, many-contributor reductions. Outputs are prefilled with
NaN so that a row the kernel never writes cannot pass.

Skipped cleanly without a CUDA GPU.
"""

import contextlib
import os
import sys

import numpy as np
import pytest

import cupy_lean
from cupy_lean import reference

from test_gpu import BF16, GPU, check_close, make_inputs, to_gpu

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")]

if GPU:
    import cupy as cp


def _nan_like(shape, dtype):
    return cp.full(shape, cp.nan, dtype=dtype)


# kernels.TUNING for tests of head lanes (no head pairs) and of head pairs (wherever kernels.pair_heads'
# other conditions hold), independent of the defaults
NO_PAIRS = dict(fp8_pair_heads_max_page=0, fp8_pair_heads_dense=False)
PAIRS = dict(fp8_pair_heads_max_page=1 << 20, fp8_pair_heads_dense=True)


@contextlib.contextmanager
def _inside_a_capture():
    """A capture on a fresh non-blocking stream (after the device is idle) for
    the block, ended whatever the block raised (a capture left open breaks
    every later test)."""
    cp.cuda.Device().synchronize()
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        s.begin_capture()
        try:
            yield s
        finally:
            s.end_capture()


def _run_in_a_fresh_process(script, **env_vars):
    """Runs ``script`` with this checkout's package in a new Python process
    with ``env_vars`` set; asserts it exits 0 and prints "ok" last."""
    import subprocess
    import sys

    env = dict(os.environ, **env_vars)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def _assert_out_lse(out, lse, ro, rl, out_tol=4e-3, lse_tol=4e-3):
    """GPU ``out`` / ``lse`` against the reference's: every output finite and
    within ``out_tol``, -inf exactly where the reference has it, the finite
    lse within ``lse_tol``."""
    g = cp.asnumpy(out).astype(np.float64)
    assert np.isfinite(g).all() and np.abs(g - ro).max() < out_tol
    gl = cp.asnumpy(lse).astype(np.float64)
    assert np.array_equal(np.isneginf(gl), np.isneginf(rl))
    fin = np.isfinite(rl)
    assert np.abs(gl[fin] - rl[fin]).max() < lse_tol


def _bits(x):
    x = cp.ascontiguousarray(x)
    return x.view(cp.uint16 if x.dtype.itemsize == 2 else cp.uint32)


def _assert_bitwise(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert bool(cp.array_equal(_bits(a), _bits(b))), "results differ bitwise"


# ---------------------------------------------------------------- CUDA graphs

def _graph_case(rng, kind, hq, hkv, d, lens, page_size=16):
    lens = np.asarray(lens, dtype=np.int32)
    layout = {"dense": "dense", "ragged": "dense", "paged": "paged"}[kind]
    q, k, v, lens, table = make_inputs(rng, len(lens), hq, hkv, d, np.float16, lens, layout, page_size=page_size)
    return dict(q=to_gpu(q), k=to_gpu(k), v=to_gpu(v), lens=cp.asarray(lens), table=to_gpu(table),
                host=(q, k, v, lens, table))


def _other_lengths(rng, lens, cap, page_size=None, table=None):
    """New lengths for a replay, within what each sequence owns."""
    new = rng.integers(0, cap + 1, size=len(lens)).astype(np.int32)
    new[0] = 0 if len(new) > 1 else max(1, int(new[0]))
    if table is not None:
        owned = (table >= 0).sum(axis=1) * page_size
        new = np.minimum(new, owned).astype(np.int32)
    return new


def _replay_nan_prefilled(runs):
    """NaN-fill each ``(graph, out, lse)`` of ``runs``' out and lse, then
    replay the graphs one after another on a fresh non-blocking stream and
    wait for them."""
    for _, out, lse in runs:
        out.fill(cp.nan)
        lse.fill(cp.nan)
    cp.cuda.Device().synchronize()  # the writes above are on the default stream (see _capture)
    s = cp.cuda.Stream(non_blocking=True)
    for g, _, _ in runs:
        g.launch(s)
    s.synchronize()


def _capture_plans(plans, q, qd, kd, vd, **kw):
    """One graph per plan of ``plans``, captured one after another (``_capture``),
    each running ``plan.run(qd, kd, vd, **kw)`` into its own NaN-filled out
    and lse of ``q``'s shape; returns ``[(graph, out, lse), ...]`` for
    ``_replay_nan_prefilled``."""
    runs = []
    for plan in plans:
        out = _nan_like(q.shape, q.dtype)
        lse = cp.full(q.shape[:2], cp.nan, dtype=cp.float32)
        runs.append((_capture(lambda plan=plan, out=out, lse=lse: plan.run(qd, kd, vd, out=out, lse=lse, **kw)),
                     out, lse))
    return runs


def _capture(call):
    """Capture ``call()`` on a fresh non-blocking stream (after one eager call
    there); the stream is dropped afterwards.

    A non-blocking stream is not ordered after work on the legacy default
    stream, where the inputs were written: without the synchronisation the
    eager call (and any replay) can read inputs, or have its output
    overwritten by a NaN prefill, that the default stream has not finished
    with. That race in a test harness was the cause of the "unwritten rows"
    of graphs captured after the first one."""
    cp.cuda.Device().synchronize()
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        call()
        s.synchronize()
        s.begin_capture()
        try:
            call()
        finally:
            g = s.end_capture()  # also when call() raised: a capture left open breaks every later test
    s.synchronize()
    del s
    return g


@pytest.mark.parametrize("empty", [False, True])
def test_graph_keeps_the_lse_and_out_it_allocated(empty):
    """An ``lse`` (and ``out``) that attention() allocates inside a capture
    (return_lse=True, no lse= / out=) stays allocated as long as the plan:
    a caller that drops them and allocates again gets other memory, so the
    replays do not write into the new arrays. Also for a call with nothing to
    stream (a dense cache of 0 tokens: the outputs are filled, no kernel of
    ours)."""
    rng = np.random.default_rng(31 + empty)
    q, k, v, lens, _ = make_inputs(rng, 3, 8, 2, 64, np.float16, [300, 5, 77], "dense")
    qd, kd, vd = to_gpu(q), to_gpu(k), to_gpu(v)
    kw = {"kv_lens": cp.asarray(lens.astype(np.int32))}
    if empty:
        kd = vd = cp.zeros((3, 0, 2, 64), dtype=cp.float16)
        kw = {}
    held = {}

    def call():
        held["out"], held["lse"] = cupy_lean.attention(qd, kd, vd, return_lse=True, **kw)

    g = _capture(call)
    ptrs = {held["out"].data.ptr, held["lse"].data.ptr}
    held.clear()  # the caller drops both
    fresh = [cp.full((3, 8), 7.0, dtype=cp.float32) for _ in range(4)] + \
        [cp.full((3, 8, 64), 7.0, dtype=cp.float16) for _ in range(4)]  # a freed block of that size comes back first
    assert not ptrs & {a.data.ptr for a in fresh}
    g.launch(cp.cuda.get_current_stream())
    cp.cuda.Device().synchronize()
    assert all(bool((a == 7).all()) for a in fresh)


def test_plan_run_takes_host_inputs_as_plan_does():
    """plan() and Plan.run() take host inputs alike: sinks as NumPy float64,
    a NumPy block_table and kv_lens as a list, given to both, run (run()
    refused them as signature mismatches: the sinks' float64 against the
    plan's float32 copy, the table on the host against the plan's GPU copy,
    the list sent to the GPU against the plan's host lengths); NaN-prefilled
    out against the reference; a bad host table entry named by run()."""
    rng = np.random.default_rng(77)
    b, hq, hkv, d = 3, 8, 2, 64
    q, k, v, lens, table = make_inputs(rng, b, hq, hkv, d, np.float16, [300, 5, 77], "paged")
    qd, kd, vd = to_gpu(q), to_gpu(k), to_gpu(v)
    sinks = rng.standard_normal(hq)  # float64, on the host
    lens_list = [int(x) for x in lens]
    out = _nan_like(q.shape, q.dtype)
    p = cupy_lean.plan(qd, kd, vd, kv_lens=lens_list, block_table=table, sinks=sinks, out=out)
    lse = cp.full(q.shape[:2], cp.nan, dtype=cp.float32)
    p.run(qd, kd, vd, kv_lens=lens_list, block_table=table, sinks=sinks, out=out, lse=lse, return_lse=True)
    ro, rl = reference.attention(q, k, v, kv_lens=lens, block_table=table, sinks=sinks)
    _assert_out_lse(out, lse, ro, rl)
    bad = table.copy()
    bad[0, 0] = 10**6
    with pytest.raises(ValueError, match=r"block_table\[0, 0\] = 1000000"):
        p.run(qd, kd, vd, kv_lens=lens_list, block_table=bad, sinks=sinks, out=out)


@pytest.mark.parametrize("kw, err, msg", [
    (dict(num_ctas=[4]), TypeError, r"num_ctas: expected an integer, got list \[4\]"),
    (dict(tile_size=[64]), TypeError, r"tile_size: expected an integer, got list \[64\]"),
    (dict(schedule=["lean"]), ValueError, r"schedule: expected one of .*got \['lean'\]"),
    (dict(num_ctas=np.array(4)), TypeError, r"num_ctas: expected an integer, got ndarray"),
])
def test_unhashable_options_on_gpu_arrays_are_named(kw, err, msg):
    """Options of a type the plan cache cannot hash (a list, a NumPy array)
    with CuPy arrays get the argument's own error, as on the NumPy path, not
    a bare "unhashable type" from the cache lookup; also after a plan of the
    same arrays is cached."""
    q, k, v, lens, _ = make_inputs(np.random.default_rng(5), 2, 4, 2, 64, np.float16, [10, 7], "dense")
    qd, kd, vd = to_gpu(q), to_gpu(k), to_gpu(v)
    cupy_lean.attention(qd, kd, vd)  # the plan of these arrays in the cache
    with pytest.raises(err, match=msg):
        cupy_lean.attention(qd, kd, vd, **kw)


def test_validate_inside_a_capture_is_refused_naming_it():
    """validate=True synchronises to read the GPU's values back, which a
    capture does not allow: refused with a message naming validate (not a
    raw CUDA capture error), the capture still ends cleanly, and the same
    call captures with validate=False."""
    q, k, v, lens, _ = make_inputs(np.random.default_rng(8), 2, 4, 2, 64, np.float16, [10, 7], "dense")
    qd, kd, vd = to_gpu(q), to_gpu(k), to_gpu(v)
    ld = cp.asarray(lens)
    out = cp.empty(q.shape, dtype=q.dtype)
    cupy_lean.attention(qd, kd, vd, kv_lens=ld, out=out, validate=True)  # eager: checked
    with pytest.raises(ValueError, match=r"validate: True reads the GPU's kv_lens"):
        _capture(lambda: cupy_lean.attention(qd, kd, vd, kv_lens=ld, out=out, validate=True))
    g = _capture(lambda: cupy_lean.attention(qd, kd, vd, kv_lens=ld, out=out))
    out.fill(cp.nan)
    g.launch(cp.cuda.get_current_stream())
    cp.cuda.Device().synchronize()
    got = cp.asnumpy(out).astype(np.float64)
    assert np.isfinite(got).all() and np.abs(got - reference.attention(q, k, v, kv_lens=lens)[0]).max() < 4e-3


def test_graphs_captured_in_sequence():
    """Eight graphs captured one after another on fresh streams (dense,
    ragged and paged; lean and split; shapes repeated so memory and stream
    handles get reused). Every replay, first with lengths other than the
    capture's, equals an eager call bitwise; then all graphs are replayed again
    in reverse order, and two at once on two streams."""
    rng = np.random.default_rng(70)
    specs = [("paged", "lean", 64, 8, 128, rng.integers(1000, 20000, 32)),
             ("paged", "split", 64, 8, 128, None),
             ("ragged", "lean", 32, 8, 128, np.clip(rng.lognormal(np.log(6000), 0.75, 24), 1, 30000).astype(int)),
             ("ragged", "split", 32, 8, 128, None),
             ("dense", "lean", 28, 4, 64, np.full(5, 3001)),
             ("paged", "lean", 64, 8, 128, rng.integers(1000, 20000, 32)),  # case 0's signature again
             ("dense", "split", 28, 4, 64, np.full(5, 3001)),
             ("ragged", "lean", 16, 2, 256, rng.integers(1, 9000, 7))]
    graphs = []
    case = None
    for kind, sched, hq, hkv, d, lens in specs:
        if lens is not None or case is None:
            del case
            case = _graph_case(rng, kind, hq, hkv, d, lens)
        c = case
        out = _nan_like(c["q"].shape, c["q"].dtype)
        lse = cp.full(c["q"].shape[:2], cp.nan, dtype=cp.float32)

        def call(c=c, out=out, lse=lse, sched=sched):
            cupy_lean.attention(c["q"], c["k"], c["v"], kv_lens=c["lens"], block_table=c["table"], out=out, lse=lse,
                                schedule=sched)

        g = _capture(call)
        graphs.append((g, c, out, lse, sched))
        _replay_and_compare(rng, graphs[-1])
    for item in reversed(graphs):  # bitwise against eager calls (each graph met the reference above)
        _replay_and_compare(rng, item, reference=False)
    # two graphs replayed concurrently on two streams
    (ga, ca, oa, la, sa), (gb, cb, ob, lb, sb) = graphs[0], graphs[5]
    assert ca is not cb
    s1, s2 = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    ref = []
    for c, s in ((ca, sa), (cb, sb)):
        ref.append(cupy_lean.attention(c["q"], c["k"], c["v"], kv_lens=c["lens"], block_table=c["table"],
                                       return_lse=True, schedule=s))
    cp.cuda.Device().synchronize()
    for o, l in ((oa, la), (ob, lb)):
        o.fill(cp.nan)
        l.fill(cp.nan)
    cp.cuda.Device().synchronize()
    for _ in range(3):
        ga.launch(s1)
        gb.launch(s2)
    s1.synchronize()
    s2.synchronize()
    _assert_bitwise(oa, ref[0][0])
    _assert_bitwise(la, ref[0][1])
    _assert_bitwise(ob, ref[1][0])
    _assert_bitwise(lb, ref[1][1])


def _replay_and_compare(rng, item, reference=True):
    """Replay a graph twice with new lengths into NaN-prefilled outputs: each
    replay equals an eager call bitwise; the last one is also checked
    against the float64 reference (``reference``; a second pass over the
    same graphs skips that CPU-heavy check) on at most four of its sequences:
    the first (empty after the first batch), the longest, the last and one
    drawn (every row is already held bitwise to the eager call, which the
    rest of the suite holds to the reference; the whole batch's reference
    took most of the GPU suite's longest test)."""
    g, c, out, lse, sched = item
    q, k, v, lens0, table = c["host"]
    for attempt in range(2):
        new = _other_lengths(rng, lens0, int(lens0.max()), k.shape[1] if table is not None else None, table)
        c["lens"][...] = cp.asarray(new)
        out.fill(cp.nan)
        lse.fill(cp.nan)
        cp.cuda.Device().synchronize()  # the writes above are on the default stream (see _capture)
        s = cp.cuda.Stream(non_blocking=True)
        g.launch(s)
        s.synchronize()
        eo, el = cupy_lean.attention(c["q"], c["k"], c["v"], kv_lens=c["lens"], block_table=c["table"],
                                     return_lse=True, schedule=sched)
        cp.cuda.Device().synchronize()
        assert not bool(cp.isnan(out).any()), "a graph replay left output rows unwritten"
        _assert_bitwise(out, eo)
        _assert_bitwise(lse, el)
    if reference:
        idx = np.unique([0, int(np.argmax(new)), len(new) - 1, int(rng.integers(len(new)))])
        o = cp.asnumpy(out)[idx]
        if table is None:
            check_close(o, None, q[idx], k[idx], v[idx], new[idx], None, np.float16)
        else:  # the page pool whole, the sampled sequences' rows of the block table
            check_close(o, None, q[idx], k, v, new[idx], table[idx], np.float16)
    c["lens"][...] = cp.asarray(lens0)


def test_graphs_replay_after_the_cache_evicted_their_plans(monkeypatch):
    """With a cache of one plan, graphs captured from two signatures, then
    eager calls of three more, each on two streams in turn, evict every
    plan the graphs came from. The graphs still replay into NaN-prefilled
    outputs and equal eager calls bitwise (their plans and workspaces are
    kept); the plans evicted with nothing captured go, their workspaces
    freed behind their last launch."""
    from cupy_lean import _cache

    monkeypatch.setattr(_cache, "MAX_PLANS", 1)
    rng = np.random.default_rng(72)
    graphs = []
    for kind, hq, hkv, d, lens in (("ragged", 32, 8, 128, rng.integers(1, 7000, 9)),
                                   ("paged", 16, 2, 64, rng.integers(1, 5000, 5))):
        c = _graph_case(rng, kind, hq, hkv, d, lens)
        out = _nan_like(c["q"].shape, c["q"].dtype)
        lse = cp.full(c["q"].shape[:2], cp.nan, dtype=cp.float32)

        def call(c=c, out=out, lse=lse):
            cupy_lean.attention(c["q"], c["k"], c["v"], kv_lens=c["lens"], block_table=c["table"], out=out,
                                lse=lse)

        graphs.append((_capture(call), c, out, lse, "lean"))
    streams = [cp.cuda.Stream(non_blocking=True) for _ in range(2)]
    for i in range(3):
        c = _graph_case(rng, "ragged", 8, 2, 128, rng.integers(1, 3000, 3 + i))
        q, k, v, lens, _ = c["host"]
        cp.cuda.Device().synchronize()
        for s in streams:
            with s:
                out = cp.full(c["q"].shape, cp.nan, cp.float16)
                cupy_lean.attention(c["q"], c["k"], c["v"], kv_lens=c["lens"], out=out)
                s.synchronize()
            check_close(out, None, q, k, v, lens, None, np.float16)
    assert sum(key[0] == "plan" for key in list(_cache._entries)) == 1  # the graphs' plans were evicted
    assert len(_cache._retained) >= 2
    for item in graphs:
        _replay_and_compare(rng, item)


def test_batch_invariant_plans_of_many_batch_sizes_stay_under_a_lowered_byte_cap(monkeypatch):
    """batch_invariant=True over 24 batch sizes (a plan each, its workspace
    growing with the batch) with _cache.MAX_PLAN_BYTES lowered to three of
    the largest plan: after every call the cache's byte total is the sum of
    its plans' cache_bytes and under the cap, the evicted plans are released
    (their workspaces freed), and every output, also of sizes called again
    after their plan was evicted, matches the reference."""
    import gc
    import weakref

    from cupy_lean import _cache
    from cupy_lean import kernels as K

    rng = np.random.default_rng(83)
    n = 24
    q, k, v, L, _ = make_inputs(rng, n, 32, 8, 128, np.float16, rng.integers(1, 3000, n), "dense")
    qd, kd, vd, Ld = to_gpu(q), to_gpu(k), to_gpu(v), cp.asarray(L)

    def invariant_plans():
        return [p for key, p in list(_cache._entries.items()) if key[0] == "plan" and p.signature.invariant]

    def call(b):
        out = _nan_like((b, 32, 128), cp.float16)
        cupy_lean.attention(qd[:b], kd[:b], vd[:b], kv_lens=Ld[:b], out=out, batch_invariant=True)
        check_close(out, None, q[:b], k[:b], v[:b], L[:b], None, np.float16)

    with K.tuning(invariant_splits=16):  # (split-K: a workspace of partial states per plan)
        _cache.clear()
        call(n)
        (largest,) = invariant_plans()
        cap = 3 * largest.cache_bytes
        assert largest.cache_bytes >= 2 * largest.workspace_bytes > 0
        del largest
        _cache.clear()
        monkeypatch.setattr(_cache, "MAX_PLAN_BYTES", cap)
        refs = []
        for b in list(range(1, n + 1)) + [1, 2, n]:
            call(b)
            plans = [p for key, p in list(_cache._entries.items()) if key[0] == "plan"]
            assert _cache.plan_bytes() == sum(p.cache_bytes for p in plans) <= cap
            refs += [weakref.ref(p) for p in invariant_plans()]
            del plans
        held = {id(p) for p in invariant_plans()}
        assert len(held) < n  # plans were evicted
        gc.collect()
        assert all(r() is None or id(r()) in held for r in refs)  # the evicted ones released
        _cache.clear()


def test_plan_run_describe_and_workspace():
    rng = np.random.default_rng(71)
    q, k, v, lens, table = make_inputs(rng, 3, 32, 8, 128, np.float16, [5000, 17, 0], "paged", page_size=16)
    qd, kd, vd, ld, td = to_gpu(q), to_gpu(k), to_gpu(v), cp.asarray(lens), to_gpu(table)
    out = _nan_like(q.shape, q.dtype)
    p = cupy_lean.plan(qd, kd, vd, kv_lens=ld, block_table=td, out=out)
    text = p.describe()
    assert f"grid: {p.grid}" in text and p.spec.name in text and "workspace" in text
    assert p.workspace_bytes > 0
    res = p.run(qd, kd, vd, kv_lens=ld, block_table=td, out=out)
    assert res is out
    check_close(out, None, q, k, v, lens, table, np.float16)
    ref = cupy_lean.attention(qd, kd, vd, kv_lens=ld, block_table=td)
    _assert_bitwise(out, ref)
    # a caller-owned workspace
    ws = cp.empty(p.workspace_bytes + 1000, dtype=cp.uint8)
    p2 = cupy_lean.plan(qd, kd, vd, kv_lens=ld, block_table=td, out=out, workspace=ws)
    out.fill(cp.nan)
    p2.run(qd, kd, vd, kv_lens=ld, block_table=td, out=out)
    _assert_bitwise(out, ref)
    with pytest.raises(ValueError, match="workspace"):
        cupy_lean.plan(qd, kd, vd, kv_lens=ld, block_table=td, workspace=cp.empty(16, dtype=cp.uint8))
    # arrays of another signature are refused, naming the field
    with pytest.raises(ValueError, match=r"^q: the plan was made for"):
        p.run(qd[:2], kd, vd, kv_lens=ld, block_table=td, out=out)


def test_tuning_change_applies_to_a_signature_already_called():
    """The same call before, inside and after ``kernels.tuning(pdl=False)``:
    the call inside uses a plan made under that value (plans are cached per
    call signature and TUNING values), the call after finds the first plan
    again; every output matches the reference."""
    from cupy_lean import _cache, _plan
    from cupy_lean import kernels as K

    rng = np.random.default_rng(12)
    q, k, v, L, _ = make_inputs(rng, 3, 8, 2, 128, np.float16, [300, 77, 1], "dense")
    qd, kd, vd, ld = to_gpu(q), to_gpu(k), to_gpu(v), cp.asarray(L)
    ro, _ = reference.attention(q, k, v, kv_lens=L)
    plans = []
    for pdl in (True, False, True):
        with K.tuning(pdl=pdl):
            out = _nan_like(q.shape, q.dtype)
            cupy_lean.attention(qd, kd, vd, kv_lens=ld, out=out)
            sig = _plan.signature(qd, kd, vd, out, ld, None, None, "lean", None, None)
            plans.append(_cache.get(_plan.plan_key(cp.cuda.runtime.getDevice(), sig)))
        g = cp.asnumpy(out).astype(np.float64)
        assert np.isfinite(g).all() and np.abs(g - ro).max() < 4e-3
    if not plans[0].pdl:
        pytest.skip("no programmatic dependent launch on this device")
    assert plans[1] is not plans[0] and not plans[1].pdl
    assert plans[2] is plans[0]


def test_plan_graphs_replayed_concurrently():
    """Two graphs captured from one plan replay at the same time on two
    streams: each captured launch has its own workspace."""
    rng = np.random.default_rng(72)
    q, k, v, lens, table = make_inputs(rng, 2, 32, 4, 128, np.float16, [20000, 9000], "dense")
    qd, kd, vd, ld = to_gpu(q), to_gpu(k), to_gpu(v), cp.asarray(lens)
    outs = [_nan_like(q.shape, q.dtype) for _ in range(2)]
    p = cupy_lean.plan(qd, kd, vd, kv_lens=ld, out=outs[0])
    gs = [_capture(lambda o=o: p.run(qd, kd, vd, kv_lens=ld, out=o)) for o in outs]
    ref = cupy_lean.attention(qd, kd, vd, kv_lens=ld)
    cp.cuda.Device().synchronize()
    streams = [cp.cuda.Stream(non_blocking=True) for _ in gs]
    for o in outs:
        o.fill(cp.nan)
    cp.cuda.Device().synchronize()
    for _ in range(4):
        for g, s in zip(gs, streams):
            g.launch(s)
    for s in streams:
        s.synchronize()
    for o in outs:
        _assert_bitwise(o, ref)


def test_streams_forked_inside_one_capture_get_their_own_workspaces():
    """One capture, two branches (a stream forked with an event and joined
    back) each launching the same plan: the branches may run at the same time,
    so they must not share unit counters and partial states."""
    rng = np.random.default_rng(73)
    q, k, v, lens, table = make_inputs(rng, 2, 32, 4, 128, np.float16, [20000, 9000], "dense")
    qd, kd, vd, ld = to_gpu(q), to_gpu(k), to_gpu(v), cp.asarray(lens)
    outs = [_nan_like(q.shape, q.dtype) for _ in range(2)]
    p = cupy_lean.plan(qd, kd, vd, kv_lens=ld, out=outs[0])
    ref = p.run(qd, kd, vd, kv_lens=ld, out=cp.empty_like(outs[0]))
    cp.cuda.Device().synchronize()
    main, side = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    with main:
        main.begin_capture()
        try:
            fork = cp.cuda.Event(disable_timing=True)
            fork.record(main)
            side.wait_event(fork)
            with side:
                p.run(qd, kd, vd, kv_lens=ld, out=outs[1])
            p.run(qd, kd, vd, kv_lens=ld, out=outs[0])
            join = cp.cuda.Event(disable_timing=True)
            join.record(side)
            main.wait_event(join)
        finally:
            g = main.end_capture()
    for _ in range(3):
        for o in outs:
            o.fill(cp.nan)
        cp.cuda.Device().synchronize()
        g.launch(main)
        main.synchronize()
        for o in outs:
            _assert_bitwise(o, ref)


def test_host_index_arrays_refused_inside_a_capture():
    """A host kv_lens, block_table or sinks is copied by each call: inside a
    capture it is refused, naming it (a replay would read a reused staging
    buffer); the capture is left usable."""
    rng = np.random.default_rng(74)
    q, k, v, lens, table = make_inputs(rng, 2, 8, 2, 64, np.float16, [300, 40], "paged")
    args = (to_gpu(q), to_gpu(k), to_gpu(v))
    cupy_lean.attention(*args, kv_lens=lens, block_table=table)  # eagerly: accepted
    s = cp.cuda.Stream(non_blocking=True)
    for kw, name in ((dict(kv_lens=lens, block_table=cp.asarray(table)), "kv_lens"),
                     # all empty: refused too (not a graph that writes zeros whatever the array holds later)
                     (dict(kv_lens=np.zeros_like(lens), block_table=cp.asarray(table)), "kv_lens"),
                     (dict(kv_lens=cp.asarray(lens), block_table=table), "block_table"),
                     (dict(kv_lens=cp.asarray(lens), block_table=cp.asarray(table),
                           sinks=np.zeros(8, np.float32)), "sinks")):
        cupy_lean.attention(*args, **kw)  # compiles and prepares the plan outside the capture
        cp.cuda.Device().synchronize()
        with s:
            s.begin_capture()
            try:
                with pytest.raises(ValueError, match=f"{name}: inside a CUDA graph capture pass GPU arrays"):
                    cupy_lean.attention(*args, **kw)
            finally:
                s.end_capture()


def test_plan_run_refuses_another_device():
    rng = np.random.default_rng(77)
    q, k, v, lens, table = make_inputs(rng, 2, 8, 2, 64, np.float16, [300, 40], "dense")
    args = (to_gpu(q), to_gpu(k), to_gpu(v))
    p = cupy_lean.plan(*args, kv_lens=cp.asarray(lens))
    p.run(*args, kv_lens=cp.asarray(lens))
    p.device = p.device + 1  # as if made under another device
    with pytest.raises(ValueError, match="device: the plan was made on device"):
        p.run(*args, kv_lens=cp.asarray(lens))


def test_broadcast_kv_lens_is_read_per_sequence():
    """kv_lens as a stride-0 broadcast view (one length for every sequence):
    each sequence gets that length, not memory past the one element."""
    rng = np.random.default_rng(75)
    q, k, v, lens, table = make_inputs(rng, 5, 8, 2, 64, np.float16, [700] * 5, "dense")
    one = cp.asarray(np.int32(333)).reshape(1)
    lens_view = cp.broadcast_to(one, (5,))
    assert lens_view.strides == (0,)
    out = _nan_like(q.shape, q.dtype)
    cupy_lean.attention(to_gpu(q), to_gpu(k), to_gpu(v), kv_lens=lens_view, out=out)
    check_close(out, None, q, k, v, np.full(5, 333, np.int32), None, np.float16)


def test_four_dimensional_out_with_a_strided_last_axis_is_refused():
    rng = np.random.default_rng(76)
    q3, k, v, lens, table = make_inputs(rng, 2, 8, 2, 64, np.float16, [300, 40], "dense")
    q = to_gpu(rng.standard_normal((2, 3, 8, 64)).astype(np.float16))
    big = cp.zeros((2, 3, 8, 128), dtype=cp.float16)
    with pytest.raises(ValueError, match="out: expected unit stride on the last axis"):
        cupy_lean.attention(q, to_gpu(k), to_gpu(v), kv_lens=cp.asarray(lens), out=big[..., ::2])
    with pytest.raises(ValueError, match="out: expected unit stride on the last axis"):
        cupy_lean.plan(q, to_gpu(k), to_gpu(v), kv_lens=cp.asarray(lens), out=big[..., ::2])


def test_counters_rearmed_after_outside_writes_and_failed_launches(monkeypatch):
    """Unit counters left part-way (every partial unit one arrival short, as
    a foreign write into a caller's workspace could leave them) make a
    launch reduce units early: Plan.rearm() zeroes them, and a launch call
    that raised re-arms its workspace before the next launch."""
    from cupy_lean import _plan

    rng = np.random.default_rng(75)
    q, k, v, lens, table = make_inputs(rng, 4, 32, 4, 128, np.float16, [7001, 3, 12000, 999], "dense")
    qd, kd, vd, ld = to_gpu(q), to_gpu(k), to_gpu(v), cp.asarray(lens)
    out = _nan_like(q.shape, q.dtype)
    ref = cupy_lean.attention(qd, kd, vd, kv_lens=ld, num_ctas=61)
    ws = cp.zeros(cupy_lean.plan(qd, kd, vd, kv_lens=ld, num_ctas=61, out=out).workspace_bytes, dtype=cp.uint8)
    p = cupy_lean.plan(qd, kd, vd, kv_lens=ld, num_ctas=61, workspace=ws, out=out)
    sched = cupy_lean.lean_schedule(lens, 4, tile_size=p.tile, num_ctas=61)
    partial = sched.partial_units()
    assert len(partial) >= 4
    p.run(qd, kd, vd, kv_lens=ld, out=out)
    _assert_bitwise(out, ref)
    counters = ws[:p.counter_bytes].view(cp.uint32)
    assert int(counters.max()) == 0  # reset by the reducers

    def spoil():
        left = np.zeros(counters.shape, np.uint32)
        left[partial] = sched.contributors[partial] - 1
        counters[...] = cp.asarray(left)
        ws[p.counter_bytes:].view(cp.float32).fill(cp.nan)
        out.fill(cp.nan)

    spoil()
    p.run(qd, kd, vd, kv_lens=ld, out=out)  # the test's premise: such counts give a wrong answer
    assert cp.isnan(out).any() or not cp.array_equal(out.view(cp.uint16), ref.view(cp.uint16))
    spoil()
    p.rearm()
    p.run(qd, kd, vd, kv_lens=ld, out=out)
    _assert_bitwise(out, ref)
    # a launch call that raises: the next launch re-arms first
    spoil()
    real = _plan._driver
    calls = []

    class Failing:
        def __getattr__(self, name):
            return getattr(real, name)

        def launchKernel(self, *args):
            calls.append(args)
            raise RuntimeError("injected launch failure")

    def failing_launch(*args):  # the programmatic launches (sm_90+) go through cuLaunchKernelEx
        calls.append(args)
        raise RuntimeError("injected launch failure")

    programmatic = p._attn_launch
    monkeypatch.setattr(_plan, "_driver", Failing())
    if programmatic is not None:
        p._attn_launch = failing_launch
    # a refused programmatic launch warns and retries plainly, which fails too
    warns = pytest.warns(RuntimeWarning, match="injected") if programmatic is not None else contextlib.nullcontext()
    with pytest.raises(RuntimeError, match="injected"), warns:
        p.run(qd, kd, vd, kv_lens=ld, out=out)
    monkeypatch.setattr(_plan, "_driver", real)
    p._attn_launch = programmatic
    assert calls
    p.run(qd, kd, vd, kv_lens=ld, out=out)
    _assert_bitwise(out, ref)


def test_config_object_plans_what_the_arguments_plan():
    rng = np.random.default_rng(76)
    q, k, v, lens, table = make_inputs(rng, 3, 24, 3, 128, np.float16, [3001, 17, 999], "paged", page_size=32)
    args = (to_gpu(q), to_gpu(k), to_gpu(v))
    kw = dict(kv_lens=cp.asarray(lens), block_table=to_gpu(table))
    a = cupy_lean.plan(*args, **kw, config=cupy_lean.Config(tile_size=32, stages=3, num_ctas=50))
    b = cupy_lean.plan(*args, **kw, tile_size=32, stages=3, num_ctas=50)
    assert a.describe() == b.describe() and a.spec.tile == 32 and a.spec.stages == 3 and a.grid == 50
    _assert_bitwise(a.run(*args, **kw), b.run(*args, **kw))
    m = cupy_lean.plan(*args, **kw, config=cupy_lean.Config(min_tiles_per_cta=8))
    assert "at most one CTA per 8 tiles" in m.describe()
    check_close(m.run(*args, **kw), None, q, k, v, lens, table, np.float16)
    s = cupy_lean.plan(*args, **kw, config=cupy_lean.Config(schedule="split", num_ctas=30))
    assert s.num_splits == 30 // 9  # 9 units
    check_close(s.run(*args, **kw), None, q, k, v, lens, table, np.float16)


@pytest.mark.parametrize("layout,hq,hkv,lens", [("paged", 49, 1, [24050]), ("dense", 104, 2, [3103]),
                                                  ("dense", 8, 8, [30001]), ("paged", 40, 2, [20000, 7, 0, 513])])
def test_merge_balance_bounds_the_pieces_and_stays_exact(layout, hq, hkv, lens):
    """Large groups on few units: a plan with merge_balance=1 holds at least
    the balanced number of tiles of the longest unit in every range, and it
    and the default plan (no floor) match the reference; NaN-prefilled
    outputs catch unwritten rows."""
    from cupy_lean.schedule import merge_balanced_tiles

    rng = np.random.default_rng(sum(lens) + hq)
    d = 256 if hq == 104 else 128
    q, k, v, L, table = make_inputs(rng, len(lens), hq, hkv, d, np.float16, lens, layout, page_size=16)
    args = (to_gpu(q), to_gpu(k), to_gpu(v))
    kw = dict(kv_lens=cp.asarray(L), block_table=to_gpu(table))
    template = _nan_like(q.shape, q.dtype)
    p = cupy_lean.plan(*args, **kw, out=template, config=cupy_lean.Config(merge_balance=1))
    assert p.merge_balance == 1 and "merge balance" in p.describe()
    off = cupy_lean.plan(*args, **kw, out=template)
    assert off.merge_balance == 0 and "merge balance" not in off.describe()
    floor = merge_balanced_tiles(-(-max(lens) // p.spec.tile), 1, 16 * p.spec.m_tiles, p.spec.tile)
    sched = cupy_lean.lean_schedule(L, hkv, tile_size=p.spec.tile, num_ctas=p.grid, merge_balance=1,
                                    state_rows=16 * p.spec.m_tiles)
    assert floor > 1 and sched.num_ctas > 1 and sched.tiles_per_cta().min() >= floor - 1
    for plan in (p, off):
        out = _nan_like(q.shape, q.dtype)
        lse = cp.full(q.shape[:2], cp.nan, dtype=cp.float32)
        plan.run(*args, **kw, out=out, lse=lse)
        check_close(out, lse, q, k, v, L, table, np.float16)


@pytest.mark.parametrize("splits", [0, 16])
def test_batch_invariant_is_bitwise_whatever_the_batch(splits):
    """A sequence's out and lse are bitwise the same alone, inside batches
    of other sizes, at other positions, dense and paged; with the head
    decomposition (invariant_splits 0) and with split-K of a fixed chunk
    count per unit (kernels.TUNING["invariant_splits"], 16 by default)."""
    from cupy_lean import _cache
    from cupy_lean import kernels as K

    _cache.clear()  # (plans of earlier tests would be counted below)
    with K.tuning(invariant_splits=splits):
        _batch_invariant_bitwise()
        plans = [v for key, v in list(_cache._entries.items()) if key[0] == "plan" and v.signature.invariant]
        if splits:  # the invariant plans ran split-K of `splits` chunks, one combine CTA per unit
            assert plans and all(p.num_splits == splits and p.combine_blocks == 1 for p in plans)
        else:
            assert not plans


def _batch_invariant_bitwise():
    rng = np.random.default_rng(77)
    lens = [9000, 17, 3001, 0, 40000, 555]
    for layout in ("dense", "paged"):
        q, k, v, L, table = make_inputs(rng, len(lens), 32, 8, 128, np.float16, lens, layout, page_size=16)

        def run(idx):
            kw = dict(kv_lens=cp.asarray(L[idx]), return_lse=True, batch_invariant=True)
            if layout == "paged":
                return cupy_lean.attention(to_gpu(q[idx]), to_gpu(k), to_gpu(v), block_table=to_gpu(table[idx]), **kw)
            return cupy_lean.attention(to_gpu(q[idx]), to_gpu(k[idx]), to_gpu(v[idx]), **kw)

        full = run(np.arange(len(lens)))
        check_close(full[0], full[1], q, k, v, L, table, np.float16)
        for idx in ([0], [4], [4, 0], [5, 4, 3, 2, 1, 0], [2, 2, 4]):
            out, lse = run(np.array(idx))
            for j, b in enumerate(idx):
                _assert_bitwise(out[j], full[0][b])
                assert cp.array_equal(lse[j].view(cp.uint32), full[1][b].view(cp.uint32))


@pytest.mark.parametrize("splits", [0, 16])
def test_batch_invariant_with_features_is_bitwise_whatever_the_batch(splits):
    """batch_invariant=True with two query tokens per sequence, sinks, a
    sliding window, soft-capping and an fp8 (e4m3) cache, bf16 q: each
    sequence's out and lse are bitwise the same alone and in other batches,
    and close to the reference."""
    import ml_dtypes

    from cupy_lean import kernels as K

    rng = np.random.default_rng(78)
    lens = np.array([7000, 40, 2500, 0, 19000])
    q3, k, v, L, _ = make_inputs(rng, len(lens), 16, 4, 128, np.float16, list(lens), "dense")
    q = np.stack([q3, q3[::-1]], axis=1).astype(BF16)  # (batch, 2, heads_q, head_dim)
    k8 = k.astype(ml_dtypes.float8_e4m3fn)
    v8 = v.astype(ml_dtypes.float8_e4m3fn)
    sinks = rng.normal(size=16).astype(np.float32)
    feats = dict(sinks=cp.asarray(sinks), window_left=3000, softcap=30.0, kv_dtype="e4m3")

    def run(idx):
        return cupy_lean.attention(cp.asarray(q[idx]), cp.asarray(k8.view(np.uint8)[idx]),
                                   cp.asarray(v8.view(np.uint8)[idx]), kv_lens=cp.asarray(L[idx]),
                                   return_lse=True, batch_invariant=True, **feats)

    with K.tuning(invariant_splits=splits):
        full = run(np.arange(len(lens)))
        ro, rl = reference.attention(q, k8, v8, kv_lens=L, sinks=sinks, window_left=3000, softcap=30.0)
        _assert_out_lse(full[0], full[1], ro, rl, 2e-2 * max(1.0, np.abs(ro).max()),
                        2e-3 * max(1.0, np.abs(rl[np.isfinite(rl)]).max()))
        for idx in ([0], [4], [4, 0], [3, 1, 2, 0, 4], [2, 2]):
            out, lse = run(np.array(idx))
            for j, b in enumerate(idx):
                _assert_bitwise(out[j], full[0][b])
                assert cp.array_equal(lse[j].view(cp.uint32), full[1][b].view(cp.uint32))


def _fp8_cache(rng, k, fmt, per_head):
    """fp8 storage of k (value / scale, rounded by ml_dtypes), its uint8
    view and the scale (a number or one per KV head)."""
    import ml_dtypes

    f8 = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}[fmt]
    hkv = k.shape[2]
    sc = rng.uniform(0.5, 2.0, hkv) if per_head else 0.75
    k8 = (k.astype(np.float32) / np.broadcast_to(sc, (hkv,))[None, None, :, None]).astype(f8)
    return k8, k8.view(np.uint8), sc


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("layout", ["dense", "paged"])
@pytest.mark.parametrize("sched", ["lean", "split", "head"])
@pytest.mark.parametrize("dt", ["float16", "bfloat16"])
def test_gpu_fp8_cache_matches_the_reference(fmt, layout, sched, dt):
    """K and V as fp8 bytes (uint8 with kv_dtype), scales per KV head for K
    (a GPU array) and per tensor for V, q and out in fp16 / bf16, every
    decomposition; NaN-prefilled outputs."""
    rng = np.random.default_rng(101 + len(fmt) + len(layout) + len(sched))
    lens = [9000, 17, 0, 3001, 777]
    npdt = np.float16 if dt == "float16" else BF16
    q, k, v, L, table = make_inputs(rng, len(lens), 32, 8, 128, np.float16, lens, layout, page_size=16)
    k8, ku8, ks = _fp8_cache(rng, k, fmt, True)
    v8, vu8, vs = _fp8_cache(rng, v, fmt, False)
    qd = q.astype(npdt)
    ro, rl = reference.attention(qd, k8, v8, kv_lens=L, block_table=table, k_scale=ks, v_scale=vs)
    out = cp.asarray(np.full(q.shape, np.nan, dtype=npdt))
    lse = cp.full(q.shape[:2], cp.nan, dtype=cp.float32)
    cupy_lean.attention(to_gpu(qd), cp.asarray(ku8), cp.asarray(vu8), kv_lens=cp.asarray(L), block_table=to_gpu(table),
                        kv_dtype=fmt, k_scale=cp.asarray(ks), v_scale=vs, schedule=sched,
                        num_ctas=None if sched == "head" else 97, out=out, lse=lse)
    fin = np.isfinite(rl)
    _assert_out_lse(out, lse, ro, rl, (4e-3 if dt == "float16" else 2e-2) * max(1.0, np.abs(ro).max()),
                    2e-3 * max(1.0, np.abs(rl[fin]).max()))


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("hq,hkv", [(6, 2), (20, 1), (50, 1)])
@pytest.mark.parametrize("dt", ["float16", "bfloat16"])
@pytest.mark.parametrize("layout,tile", [("dense", None), ("paged", 32)])
def test_gpu_fp8_every_head_dim_and_query_tiles(d, hq, hkv, dt, layout, tile):
    """fp8 K/V (e4m3, one scale per KV head) at every head_dim with 1, 2 and 4
    query tiles per unit: the MMAs read the bytes straight from the ring, so
    each head_dim's byte swizzle and each warp layout is exercised; a grid
    that cuts units (partial states merged), a default and an explicit tile;
    NaN-prefilled outputs and lse against the float64 reference."""
    rng = np.random.default_rng(13 * d + hq + (tile or 0))
    lens = [2049, 1, 0, 333, 130]
    q, k, v, L, table = make_inputs(rng, len(lens), hq, hkv, d, np.float16, lens, layout, page_size=16)
    npdt = np.float16 if dt == "float16" else BF16
    k8, ku8, ks = _fp8_cache(rng, k, "e4m3", True)
    v8, vu8, vs = _fp8_cache(rng, v, "e4m3", True)
    qd = (q * 2.0).astype(npdt)
    ro, rl = reference.attention(qd, k8, v8, kv_lens=L, block_table=table, k_scale=ks, v_scale=vs)
    out = _nan_like(q.shape, npdt)
    lse = cp.full(q.shape[:2], cp.nan, dtype=cp.float32)
    cupy_lean.attention(to_gpu(qd), cp.asarray(ku8), cp.asarray(vu8), kv_lens=cp.asarray(L), block_table=to_gpu(table),
                        kv_dtype="e4m3", k_scale=cp.asarray(ks), v_scale=cp.asarray(vs), num_ctas=23,
                        tile_size=tile, out=out, lse=lse)
    fin = np.isfinite(rl)
    _assert_out_lse(out, lse, ro, rl, (4e-3 if dt == "float16" else 2e-2) * max(1.0, np.abs(ro).max()),
                    2e-3 * max(1.0, np.abs(rl[fin]).max()))


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("hq,hkv", [(6, 2), (50, 1)])
@pytest.mark.parametrize("dt", ["float16", "bfloat16"])
@pytest.mark.parametrize("fmt,layout,tile", [("e4m3", "dense", None), ("e5m2", "paged", 32)])
def test_gpu_fp8_wide_k_reads_match_the_reference(d, hq, hkv, dt, fmt, layout, tile):
    """TUNING["fp8_wide_k_reads"]: 16-byte K reads, q's columns regrouped per
    64 and the wide ring swizzle, at every head_dim with 1 and 4 query tiles
    (bf16 rows scaled per row across a row's groups), both fp8 formats, dense
    and paged, a grid that cuts units; NaN-prefilled out and lse against the
    float64 reference, and the spec carries the wide bit."""
    rng = np.random.default_rng(17 * d + hq + (tile or 0))
    lens = [2049, 1, 0, 333, 130]
    q, k, v, L, table = make_inputs(rng, len(lens), hq, hkv, d, np.float16, lens, layout, page_size=16)
    npdt = np.float16 if dt == "float16" else BF16
    k8, ku8, ks = _fp8_cache(rng, k, fmt, True)
    v8, vu8, vs = _fp8_cache(rng, v, fmt, True)
    qd = (q * 2.0).astype(npdt)
    ro, rl = reference.attention(qd, k8, v8, kv_lens=L, block_table=table, k_scale=ks, v_scale=vs)
    out = _nan_like(q.shape, npdt)
    lse = cp.full(q.shape[:2], cp.nan, dtype=cp.float32)
    args = (to_gpu(qd), cp.asarray(ku8), cp.asarray(vu8))
    kw = dict(kv_lens=cp.asarray(L), block_table=to_gpu(table), kv_dtype=fmt, k_scale=cp.asarray(ks),
              v_scale=cp.asarray(vs), num_ctas=23, tile_size=tile)
    from cupy_lean import kernels

    with kernels.tuning(fp8_wide_k_reads=True):
        pl = cupy_lean.plan(*args, out=out, kv_lens=kw["kv_lens"], block_table=kw["block_table"], kv_dtype=fmt,
                            num_ctas=23, tile_size=tile)
        assert pl.spec.features & kernels.FEATURES["fp8_wide_k"], pl.spec.name
        cupy_lean.attention(*args, out=out, lse=lse, **kw)
    fin = np.isfinite(rl)
    _assert_out_lse(out, lse, ro, rl, (4e-3 if dt == "float16" else 2e-2) * max(1.0, np.abs(ro).max()),
                    2e-3 * max(1.0, np.abs(rl[fin]).max()))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_fp8_bf16_query_rows_of_any_magnitude(fmt, d):
    """bf16 q over an fp8 cache: the fp8 MMAs run in fp16, each query row
    brought into fp16's range by its own power of two. Rows of one unit at
    magnitudes from 1e-30 to 1e30 (far outside fp16), a row of zeros, a row
    with one element far above the others, 20 query heads (two query tiles:
    the row factors of the second tile's warps); units cut by the grid (partial states merged);
    NaN-prefilled outputs and lse against the float64 reference."""
    rng = np.random.default_rng(211 + d + len(fmt))
    lens = [1500, 130, 1]
    hq, hkv = 20, 1
    q, k, v, L, _ = make_inputs(rng, len(lens), hq, hkv, d, np.float16, lens, "dense")
    mags = np.array([1e-30, 1e-3, 1.0, 7.0, 3e4, 1e5, 1e30, 0.0, 2.0, 1e-20] * 2)
    qf = q.astype(np.float64) / np.sqrt(d) * mags[None, :, None]
    qf[1, 2, 5] = 1e3  # one element 2^14 above its row (not more: a near-tie of keys would then turn on
    # the other columns' O(1) share of a ~1e6 logit, below float32's resolution there)
    qd = qf.astype(np.float32).astype(BF16)
    k8, ku8, ks = _fp8_cache(rng, k, fmt, True)
    v8, vu8, vs = _fp8_cache(rng, v, fmt, False)
    ro, rl = reference.attention(qd, k8, v8, kv_lens=L, k_scale=ks, v_scale=vs, scale=1.0)
    out = _nan_like(q.shape, BF16)
    lse = cp.full(q.shape[:2], cp.nan, dtype=cp.float32)
    cupy_lean.attention(to_gpu(qd), cp.asarray(ku8), cp.asarray(vu8), kv_lens=cp.asarray(L), kv_dtype=fmt,
                        k_scale=cp.asarray(ks), v_scale=vs, scale=1.0, num_ctas=17, out=out, lse=lse)
    g = cp.asnumpy(out).astype(np.float64)
    assert np.isfinite(g).all()
    assert np.abs(g - ro).max() < 2e-2 * max(1.0, np.abs(ro).max())
    gl = cp.asnumpy(lse).astype(np.float64)
    # lse relative to its own size: the 1e30 row's logits are ~1e30
    assert (np.abs(gl - rl) <= 2e-3 * np.maximum(1.0, np.abs(rl))).all()


@pytest.mark.parametrize("hq,dt", [(8, "float16"), (50, "bfloat16")])
def test_gpu_fp8_head_dim_256_tile_128(hq, dt):
    """fp8 at head_dim 256 with 128-token tiles, a configuration that fits
    only since fp8 specs keep no separate float scratch (the segment store
    merges through the consumed stage in two column passes): one and four
    query tiles, a grid that cuts units; NaN-prefilled outputs and lse."""
    rng = np.random.default_rng(401 + hq)
    lens = [3001, 129, 0, 700]
    q, k, v, L, table = make_inputs(rng, len(lens), hq, 1, 256, np.float16, lens, "dense")
    npdt = np.float16 if dt == "float16" else BF16
    k8, ku8, ks = _fp8_cache(rng, k, "e4m3", True)
    v8, vu8, vs = _fp8_cache(rng, v, "e4m3", True)
    qd = q.astype(npdt)
    ro, rl = reference.attention(qd, k8, v8, kv_lens=L, k_scale=ks, v_scale=vs)
    out = _nan_like(q.shape, npdt)
    lse = cp.full(q.shape[:2], cp.nan, dtype=cp.float32)
    cupy_lean.attention(to_gpu(qd), cp.asarray(ku8), cp.asarray(vu8), kv_lens=cp.asarray(L), kv_dtype="e4m3",
                        k_scale=cp.asarray(ks), v_scale=cp.asarray(vs), num_ctas=19, tile_size=128, out=out, lse=lse)
    fin = np.isfinite(rl)
    _assert_out_lse(out, lse, ro, rl, (4e-3 if dt == "float16" else 2e-2) * max(1.0, np.abs(ro).max()),
                    2e-3 * max(1.0, np.abs(rl[fin]).max()))


def test_gpu_fp8_bit_move_conversion_in_a_fresh_process():
    """The e4m3 conversion of GPUs before sm_89 (bit moves, value / 256 with
    the 256 restored in the scales), forced on this GPU through
    kernels.FP8_BITMOVES_ENV in a fresh process: every head_dim, 1 and 4 query
    tiles, bf16 q, a grid that cuts units."""
    script = r"""
import numpy as np, cupy as cp, ml_dtypes, cupy_lean
from cupy_lean import reference
rng = np.random.default_rng(17)
worst = 0.0
for d, hq, hkv, dt in ((64, 20, 1, np.float16), (128, 8, 2, ml_dtypes.bfloat16), (256, 50, 1, np.float16)):
    lens = np.array([1500, 0, 97, 640], np.int32)
    q = rng.standard_normal((4, hq, d)).astype(dt)
    k = rng.standard_normal((4, 1500, hkv, d)).astype(ml_dtypes.float8_e4m3fn)
    v = rng.standard_normal((4, 1500, hkv, d)).astype(ml_dtypes.float8_e4m3fn)
    out = cp.full(q.shape, cp.nan, dtype=q.dtype)
    cupy_lean.attention(cp.asarray(q), cp.asarray(k.view(np.uint8)), cp.asarray(v.view(np.uint8)),
                        kv_lens=cp.asarray(lens), kv_dtype="e4m3", k_scale=0.5, v_scale=2.0, num_ctas=23, out=out)
    ref, _ = reference.attention(q, k, v, kv_lens=lens, k_scale=0.5, v_scale=2.0)
    g = cp.asnumpy(out).astype(np.float64)
    assert np.isfinite(g).all()
    tol = (4e-3 if dt == np.float16 else 2e-2) * max(1.0, np.abs(ref).max())
    err = float(np.abs(g - ref).max())
    assert err < tol, (d, err, tol)
print("ok")
"""
    from cupy_lean import kernels as K

    _run_in_a_fresh_process(script, **{K.FP8_BITMOVES_ENV: "1"})


@pytest.mark.parametrize("units_per_sm,fmt,dt", [(1.5, "e4m3", "float16"), (3.2, "e5m2", "bfloat16"),
                                                  (3.2, "e4m3", "float16")])
def test_gpu_fp8_many_units_take_their_config_two_graphs(units_per_sm, fmt, dt):
    """A dense head_dim-64 fp8 batch of equal lengths with more units than
    SMs takes the many-units configuration (one CTA per unit, 64- or 32-token
    tiles by the units per SM; kernels.TUNING["many_units_d64_with_fp8"]) as a
    16-bit call does, and the default tile with the switch off. Both plans
    against the reference (NaN-prefilled out and lse, scales per KV head),
    each captured in a graph one after another and replayed into NaN-filled
    outputs: the same bits as their eager calls."""
    from cupy_lean import kernels as K

    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    hq, hkv, d, n = 16, 4, 64, 1111
    B = int(units_per_sm * sms) // hkv + 1
    rng = np.random.default_rng(int(10 * units_per_sm) + len(fmt) + len(dt))
    npdt = np.float16 if dt == "float16" else BF16
    q, k, v, L, _ = make_inputs(rng, B, hq, hkv, d, np.float16, [n] * B, "dense")
    k8, ku8, ks = _fp8_cache(rng, k, fmt, True)
    v8, vu8, vs = _fp8_cache(rng, v, fmt, True)
    qd = q.astype(npdt)
    args = (to_gpu(qd), cp.asarray(ku8), cp.asarray(vu8))
    scales = dict(k_scale=cp.asarray(ks, dtype=cp.float32), v_scale=cp.asarray(vs, dtype=cp.float32))
    ro, rl = reference.attention(qd, k8, v8, k_scale=ks, v_scale=vs)
    tol = (4e-3 if dt == "float16" else 2e-2) * max(1.0, np.abs(ro).max())
    plans = [cupy_lean.plan(*args, kv_dtype=fmt, out=_nan_like(q.shape, npdt))]
    with K.tuning(many_units_d64_with_fp8=False):
        plans.append(cupy_lean.plan(*args, kv_dtype=fmt, out=_nan_like(q.shape, npdt)))
    on, off = plans
    bits, smem = on.spec.features, K.device_smem_limit()

    def occupancy(tile):
        return K.kernels_for(K.make_spec(dt, d, hq // hkv, False, tile, features=bits, smem_limit=smem)).occupancy

    want = K.many_unit_config(d, hq // hkv, B * hkv, n, K.device_sm_count(), False, True, bits, occupancy)
    assert on.many_units == (want is not None), on.describe()
    if want is not None:
        assert (on.spec.tile, on.one_cta_per_unit) == want and on.grid == on.units == B * hkv, on.describe()
    if sms >= 100:  # an H100 or H200: one wave holds them (two tile-64 CTAs per SM, five tile-32)
        assert want == ((64, True) if units_per_sm < 2 else (32, True)), on.describe()
    assert not off.many_units and off.spec.tile == K.make_spec(dt, d, hq // hkv, False, features=bits,
                                                               smem_limit=smem).tile
    outs = [(_nan_like(q.shape, npdt), cp.full(q.shape[:2], cp.nan, dtype=cp.float32)) for _ in plans]
    for p, (o, lse) in zip(plans, outs):
        p.run(*args, out=o, lse=lse, **scales)
        _assert_out_lse(o, lse, ro, rl, tol, 2e-3 * max(1.0, np.abs(rl).max()))
    eager = [(_bits(o).copy(), _bits(lse).copy()) for o, lse in outs]
    graphs = [_capture(lambda p=p, o=o, lse=lse: p.run(*args, out=o, lse=lse, **scales))
              for p, (o, lse) in zip(plans, outs)]
    for (o, lse), g, (eo, el) in zip(outs, graphs, eager):
        o.fill(cp.nan)
        lse.fill(cp.nan)
        g.launch()
        cp.cuda.get_current_stream().synchronize()
        assert cp.array_equal(_bits(o), eo) and cp.array_equal(_bits(lse), el)


def test_gpu_fp8_many_units_rule_stops_at_the_unit_cap():
    """The plan passes a unit's tokens to the fp8 many-units rule: a dense
    head_dim-64 fp8 batch of one unit per SM takes it at
    TUNING["many_units_d64_fp8_max_unit_bytes"] of K and V per unit and
    keeps the default tile one token past it, where a 16-bit batch of the
    same shape still takes it (plans only; zero-filled inputs)."""
    from cupy_lean import kernels as K

    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    hq, hkv, d = 8, 4, 64
    B = -(-sms // hkv)
    at = K.TUNING["many_units_d64_fp8_max_unit_bytes"] // (2 * d)
    for n, takes in ((at, True), (at + 1, False)):
        q = cp.zeros((B, hq, d), dtype=cp.float16)
        k8 = cp.zeros((B, n, hkv, d), dtype=cp.uint8)
        p8 = cupy_lean.plan(q, k8, k8, kv_dtype="e4m3", out=cp.empty_like(q))
        assert p8.many_units == takes and p8.one_cta_per_unit == takes, (n, p8.describe())
        del k8
        k16 = cp.zeros((B, n, hkv, d), dtype=cp.float16)
        assert cupy_lean.plan(q, k16, k16, out=cp.empty_like(q)).many_units
        del k16


@pytest.mark.parametrize("fmt,dt", [("e4m3", "float16"), ("e5m2", "bfloat16")])
@pytest.mark.parametrize("layout,page_size,lens,hq,hkv,count", [
    ("dense", 16, [6001, 6001, 6001], 16, 2, None),          # equal lengths: the lean plan's split-K variant
    ("dense", 16, [50000], 12, 6, None),                     # one sequence, few units: the combine launch
    ("ragged", 16, [9000, 17, 0, 3001, 777, 1], 8, 4, None),
    ("paged", 32, [4097, 0, 1, 2500, 130], 48, 4, None),
    ("paged", 1, [700, 3, 1234], 24, 8, None),                # a page per row (page_rows)
    ("ragged", 16, [2000 + 37 * i for i in range(300)], 6, 2, None),  # a batch of 300
    # odd numbers of KV heads: as many lanes (or a divisor, 9 of 27)
    ("dense", 16, [3001, 3001], 21, 7, None),
    ("ragged", 16, [5000, 0, 1, 2222], 15, 5, None),
    ("paged", 16, [3000, 77, 0, 1500], 9, 3, None),
    ("dense", 16, [2500, 2500], 27, 27, None),
    # counts forced (TUNING["fp8_head_lanes_count"]): odd lanes of two heads, lanes of three, one head a lane
    ("dense", 16, [40000], 12, 6, 3),
    ("paged", 16, [3000, 77, 0, 1500], 18, 9, 3),
    ("ragged", 16, [9000, 17, 0, 3001, 777, 1], 12, 6, 2),
    ("ragged", 16, [2000 + 37 * i for i in range(300)], 12, 4, 2),  # a batch of 300, two heads a lane
])
def test_gpu_fp8_head_lanes_match_the_reference(fmt, dt, layout, page_size, lens, hq, hkv, count):
    """kernels.head_lanes: an fp8 head_dim-64 NHD cache of two KV heads or
    more runs as lanes of its heads side by side (the rule's count, or one
    forced); every decomposition the plan can take (equal lengths, the
    combine launch, stream-K with merges), dense, ragged and paged (a page
    per row too), per head scales for K and V, sinks, a window and a
    soft-cap, a strided out, NaN-prefilled out and lse against the float64
    reference, and two graphs captured one after another."""
    from cupy_lean import kernels as K

    rng = np.random.default_rng(71 + len(lens) + hq + page_size)
    lay = "paged" if layout == "paged" else "dense"
    q, k, v, L, table = make_inputs(rng, len(lens), hq, hkv, 64, np.float16, lens, lay, page_size=page_size)
    npdt = np.float16 if dt == "float16" else BF16
    k8, ku8, ks = _fp8_cache(rng, k, fmt, True)
    v8, vu8, vs = _fp8_cache(rng, v, fmt, True)
    qd = (q * 2.0).astype(npdt)
    sinks = rng.standard_normal(hq).astype(np.float32)
    kv_lens = None if layout == "dense" else L
    tol = (4e-3 if dt == "float16" else 2e-2)
    args = (to_gpu(qd), cp.asarray(ku8), cp.asarray(vu8))
    kw = dict(kv_lens=None if kv_lens is None else cp.asarray(kv_lens), block_table=to_gpu(table), kv_dtype=fmt)
    scales = dict(k_scale=cp.asarray(ks, dtype=cp.float32), v_scale=cp.asarray(vs, dtype=cp.float32))
    with K.tuning(fp8_head_lanes=True, fp8_head_lanes_count=count, **NO_PAIRS):
        nhd = (hkv * 64, hkv * 64, 64, 1)
        want = count or K.head_lanes(fmt, 64, hkv, nhd, nhd, sms=K.device_sm_count())
        assert want > 1
        for feats in ({}, dict(sinks=sinks, window_left=1500, softcap=20.0)):
            ro, rl = reference.attention(qd, k8, v8, kv_lens=kv_lens, block_table=table, k_scale=ks, v_scale=vs,
                                         **feats)
            gfeats = {n: (cp.asarray(x) if isinstance(x, np.ndarray) else x) for n, x in feats.items()}
            pl = cupy_lean.plan(*args, **kw, out=_nan_like(q.shape, npdt), **gfeats)
            assert pl.lanes == want and pl.spec.features & K.FEATURES["head_lanes"], pl.describe()
            assert f"head lanes: {want} lanes" in pl.describe()
            wide = _nan_like((len(lens), hq, 128), npdt)
            out = wide[:, :, 32:96]  # a strided out: rows 256 bytes apart
            lse = cp.full(q.shape[:2], cp.nan, dtype=cp.float32)
            cupy_lean.attention(*args, **kw, **scales, **gfeats, out=out, lse=lse)
            fin = np.isfinite(rl)
            _assert_out_lse(out, lse, ro, rl, tol * max(1.0, np.abs(ro).max()), 2e-3 * max(1.0, np.abs(rl[fin]).max()))
            assert bool(cp.isnan(wide[:, :, :32]).all()) and bool(cp.isnan(wide[:, :, 96:]).all())
        ro, rl = reference.attention(qd, k8, v8, kv_lens=kv_lens, block_table=table, k_scale=ks, v_scale=vs)
        plans = [cupy_lean.plan(*args, **kw, out=_nan_like(q.shape, npdt)) for _ in range(2)]
        runs = []
        for plan in plans:
            out = _nan_like(q.shape, npdt)
            lse = cp.full(q.shape[:2], cp.nan, dtype=cp.float32)
            runs.append((_capture(lambda plan=plan, out=out, lse=lse: plan.run(
                *args, kv_lens=kw["kv_lens"], block_table=kw["block_table"], out=out, lse=lse, **scales)), out, lse))
        for graph, out, lse in runs:
            out.fill(cp.nan)
            lse.fill(cp.nan)
        for graph, out, lse in runs:
            graph.launch()
        cp.cuda.get_current_stream().synchronize()
        fin = np.isfinite(rl)
        for graph, out, lse in runs:
            _assert_out_lse(out, lse, ro, rl, tol * max(1.0, np.abs(ro).max()), 2e-3 * max(1.0, np.abs(rl[fin]).max()))
    # one KV head, or K with heads apart (HND): no lanes
    with K.tuning(fp8_head_lanes=True, fp8_head_lanes_count=None, **NO_PAIRS):
        assert cupy_lean.plan(*args[:1], args[1][:, :, :1], args[2][:, :, :1], kv_lens=kw["kv_lens"],
                              block_table=kw["block_table"], kv_dtype=fmt).lanes == 1
        if layout != "paged" or page_size > 1:  # (pages of one row: HND is NHD, lanes rightly)
            hk, hv = (cp.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in args[1:])
            assert cupy_lean.plan(args[0], hk, hv, kv_lens=kw["kv_lens"], block_table=kw["block_table"],
                                  kv_dtype=fmt, kv_layout="HND").lanes == 1


@pytest.mark.parametrize("fmt,dt,page_size,hq,hkv", [
    ("e4m3", "float16", 64, 10, 1),    # one KV head: no lanes
    ("e5m2", "bfloat16", 16, 12, 4),   # four lanes
    ("e4m3", "bfloat16", 1, 8, 2),     # a page per row
])
def test_gpu_fp8_paged_varied_lengths_take_tile_64(fmt, dt, page_size, hq, hkv):
    """kernels.varied_length_tile with TUNING["fp8_varied_lengths_tile"]
    "paged" (the default): a paged fp8 head_dim-64 cache of several
    sequences runs 64-token tiles (two CTAs per SM) and describe() says so;
    the same lengths in a ragged cache keep 128-token tiles (True: those
    too). NaN-prefilled out and lse against the float64 reference, then two
    graphs captured one after another, replayed with new lengths."""
    from cupy_lean import kernels as K

    rng = np.random.default_rng(211 + page_size + hkv)
    lens = [4095, 0, 535, 1, 2429, 4678, 513, 1579]
    npdt = np.float16 if dt == "float16" else BF16
    for layout in ("paged", "dense"):
        q, k, v, L, table = make_inputs(rng, len(lens), hq, hkv, 64, np.float16, lens, layout, page_size=page_size)
        k8, ku8, ks = _fp8_cache(rng, k, fmt, True)
        v8, vu8, vs = _fp8_cache(rng, v, fmt, False)
        qd = q.astype(npdt)
        args = (to_gpu(qd), cp.asarray(ku8), cp.asarray(vu8))
        kw = dict(kv_lens=cp.asarray(L), block_table=to_gpu(table))
        scales = dict(k_scale=cp.asarray(ks, dtype=cp.float32), v_scale=vs)
        tol = 4e-3 if dt == "float16" else 2e-2
        for mode in ("paged", True):
            with K.tuning(fp8_varied_lengths_tile=mode, **NO_PAIRS):
                pl = cupy_lean.plan(*args, **kw, kv_dtype=fmt, out=_nan_like(q.shape, npdt))
                takes = layout == "paged" or mode is True
                assert pl.varied_lengths_tile == takes and pl.spec.tile == (64 if takes else 128), pl.describe()
                assert pl.lanes == hkv and (pl.ctas_per_sm == 2 or not takes), pl.describe()
                assert ("varied_length_tile" in pl.describe()) == takes
                ro, rl = reference.attention(qd, k8, v8, kv_lens=L, block_table=table, k_scale=ks, v_scale=vs)
                out = _nan_like(q.shape, npdt)
                lse = cp.full(q.shape[:2], cp.nan, dtype=cp.float32)
                pl.run(*args, **kw, **scales, out=out, lse=lse)
                fin = np.isfinite(rl)
                _assert_out_lse(out, lse, ro, rl, tol * max(1.0, np.abs(ro).max()),
                                2e-3 * max(1.0, np.abs(rl[fin]).max()))
                if not takes:
                    continue
                plans = [pl, cupy_lean.plan(*args, **kw, kv_dtype=fmt, out=_nan_like(q.shape, npdt))]
                runs = _capture_plans(plans, qd, *args, **kw, **scales)
                new = _other_lengths(rng, L, int(L.max()) if table is not None else k.shape[1], page_size, table)
                kw["kv_lens"][...] = cp.asarray(new)
                _replay_nan_prefilled(runs)
                ro, rl = reference.attention(qd, k8, v8, kv_lens=new, block_table=table, k_scale=ks, v_scale=vs)
                fin = np.isfinite(rl)
                for _, o, l in runs:
                    _assert_out_lse(o, l, ro, rl, tol * max(1.0, np.abs(ro).max()),
                                    2e-3 * max(1.0, np.abs(rl[fin]).max()))
                kw["kv_lens"][...] = cp.asarray(L)


def test_gpu_fp8_with_query_tokens_window_sinks_plans_and_graphs():
    """fp8 with several query tokens, a window and sinks; a plan run twice
    with other scales; a CUDA graph replay; errors name the argument."""
    rng = np.random.default_rng(103)
    lens = [5000, 3, 0, 1234]
    _, k, v, L, table = make_inputs(rng, len(lens), 16, 4, 64, np.float16, lens, "paged", page_size=32)
    q = rng.standard_normal((len(lens), 3, 16, 64)).astype(np.float16)
    sinks = rng.standard_normal(16).astype(np.float32)
    k8, ku8, ks = _fp8_cache(rng, k, "e4m3", True)
    v8, vu8, vs = _fp8_cache(rng, v, "e4m3", True)
    args = (cp.asarray(q), cp.asarray(ku8), cp.asarray(vu8))
    kw = dict(kv_lens=cp.asarray(L), block_table=to_gpu(table))
    for scale_k, nq in ((ks, None), (ks * 2, np.array([3, 1, 0, 2], dtype=np.int32))):
        ro, rl = reference.attention(q, k8, v8, kv_lens=L, block_table=table, k_scale=scale_k, v_scale=vs,
                                     window_left=700, sinks=sinks, q_lens=nq)
        out = _nan_like(q.shape, q.dtype)
        lse = cp.full(q.shape[:3], cp.nan, dtype=cp.float32)
        cupy_lean.attention(*args, **kw, kv_dtype="e4m3", k_scale=scale_k, v_scale=vs, window_left=700,
                            sinks=cp.asarray(sinks), out=out, lse=lse, q_lens=None if nq is None else cp.asarray(nq))
        _assert_out_lse(out, lse, ro, rl, 4e-3, 2e-3 * max(1.0, np.abs(rl[np.isfinite(rl)]).max()))
    p = cupy_lean.plan(*args, **kw, kv_dtype="e4m3", out=_nan_like(q.shape, q.dtype))
    assert "fp8 e4m3" in p.describe()
    assert p.lanes > 1, p.describe()  # (head_dim 64, 4 KV heads: the query tokens in head lanes)
    ro, _ = reference.attention(q, k8, v8, kv_lens=L, block_table=table, k_scale=ks, v_scale=vs)
    out = _nan_like(q.shape, q.dtype)
    ksd, vsd = cp.asarray(ks, dtype=cp.float32), cp.asarray(vs, dtype=cp.float32)
    graph = _capture(lambda: p.run(*args, **kw, out=out, k_scale=ksd, v_scale=vsd))
    out.fill(cp.nan)
    graph.launch()
    cp.cuda.get_current_stream().synchronize()
    assert np.abs(cp.asnumpy(out).astype(np.float64) - ro).max() < 4e-3
    # scalar scales are passed by value: a graph replays them; host arrays are refused inside a capture
    out2 = _nan_like(q.shape, q.dtype)
    ro2, _ = reference.attention(q, k8, v8, kv_lens=L, block_table=table, k_scale=0.5, v_scale=2.0)
    graph2 = _capture(lambda: p.run(*args, **kw, out=out2, k_scale=0.5, v_scale=2.0))
    out2.fill(cp.nan)
    graph2.launch()
    cp.cuda.get_current_stream().synchronize()
    assert np.abs(cp.asnumpy(out2).astype(np.float64) - ro2).max() < 4e-3
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        s.begin_capture()
        try:
            with pytest.raises(ValueError, match="k_scale: inside a CUDA graph capture pass GPU arrays"):
                p.run(*args, **kw, out=out2, k_scale=ks, v_scale=vsd)
        finally:
            s.end_capture()
    with pytest.raises(ValueError, match="k_scale, v_scale: only with an fp8 KV cache"):
        cupy_lean.attention(args[0], cp.asarray(k), cp.asarray(v), **kw, k_scale=2.0)
    with pytest.raises(ValueError, match="kv_dtype: an fp8 cache on the GPU is uint8 storage"):
        cupy_lean.attention(*args, **kw, k_scale=2.0)
    with pytest.raises(ValueError, match="k_scale: expected finite values > 0"):
        cupy_lean.attention(*args, **kw, kv_dtype="e4m3", k_scale=-1.0)
    with pytest.raises(TypeError, match="k: kv_dtype='e5m2' on the GPU reads uint8 storage"):
        cupy_lean.attention(args[0], cp.asarray(k), cp.asarray(v), **kw, kv_dtype="e5m2")


@pytest.mark.parametrize("d,hkv", [(128, 2), (64, 6)])
def test_gpu_fp8_from_pytorch_float8(d, hkv):
    """A PyTorch float8 cache through DLPack; at head_dim 64 with an even
    head count the call runs its heads in lanes (kernels.head_lanes)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(104)
    q, k, v, L, _ = make_inputs(rng, 2, 4 * hkv, hkv, d, np.float16, [3000, 77], "dense")
    k8, ku8, ks = _fp8_cache(rng, k, "e4m3", False)
    v8, vu8, vs = _fp8_cache(rng, v, "e4m3", False)
    tk = torch.from_numpy(ku8).cuda().view(torch.float8_e4m3fn)
    tv = torch.from_numpy(vu8).cuda().view(torch.float8_e4m3fn)
    tq = torch.from_numpy(q).cuda()
    tl = torch.from_numpy(L.astype(np.int32)).cuda()
    got = cupy_lean.attention(tq, tk, tv, kv_lens=tl, k_scale=ks, v_scale=vs)
    ro, _ = reference.attention(q, k8, v8, kv_lens=L, k_scale=ks, v_scale=vs)
    assert np.abs(cp.asnumpy(cp.asarray(got)).astype(np.float64) - ro).max() < 4e-3
    p = cupy_lean.plan(tq, tk, tv, kv_lens=tl)  # the format comes from the tensors
    assert "fp8 e4m3" in p.describe()
    assert (p.lanes > 1) == (d == 64), p.describe()
    got = p.run(tq, tk, tv, kv_lens=tl, k_scale=ks, v_scale=vs)
    assert np.abs(cp.asnumpy(cp.asarray(got)).astype(np.float64) - ro).max() < 4e-3


@pytest.mark.parametrize("fmt,dt,layout,page_size,lens,hq,hkv,q_len", [
    ("e4m3", "float16", "paged", 1, [700, 3, 0, 1234], 24, 8, 0),          # a page per row
    ("e5m2", "bfloat16", "paged", 1, [20 + 7 * i for i in range(300)], 4, 2, 0),  # a batch of 300
    ("e4m3", "bfloat16", "paged", 16, [4097, 0, 1, 2500, 130], 48, 4, 3),  # 3 query tokens, ragged q_lens
    ("e4m3", "float16", "dense", 16, [6001, 6001, 6001], 16, 2, 0),        # equal lengths: split-K variant
    ("e5m2", "float16", "ragged", 16, [9000, 17, 0, 3001, 777, 1], 12, 6, 0),
    ("e4m3", "bfloat16", "dense", 16, [50000], 10, 10, 0),                 # one sequence, group 1
])
def test_gpu_fp8_head_pairs_match_the_reference(fmt, dt, layout, page_size, lens, hq, hkv, q_len):
    """kernels.pair_heads: an fp8 head_dim-64 cache of an even number of
    adjacent KV heads runs as a head_dim-128 call of head pairs (q padded,
    each output row's half copied out): dense, ragged, paged (a page per
    row too), a batch of 300, several query tokens with ragged q_lens;
    scales by value and as a GPU array of shape (); sinks, a window and a
    soft-cap; out a strided slice of a NaN-filled array (the rest stays
    NaN) and a NaN-filled lse, against the float64 reference. Per-head
    scale arrays run the plan without pairs, also correct. Two graphs
    captured one after another on two plans, replayed NaN-prefilled."""
    from cupy_lean import kernels as K

    rng = np.random.default_rng(313 + len(lens) + hq + page_size + q_len)
    lay = "paged" if layout == "paged" else "dense"
    q3, k, v, L, table = make_inputs(rng, len(lens), hq, hkv, 64, np.float16, lens, lay, page_size=page_size)
    npdt = np.float16 if dt == "float16" else BF16
    q = rng.standard_normal((len(lens), q_len, hq, 64)).astype(np.float16) if q_len else q3
    qd = (q * 2.0).astype(npdt)
    k8, ku8, ks = _fp8_cache(rng, k, fmt, False)  # one scale (0.75)
    v8, vu8, vs = _fp8_cache(rng, v, fmt, False)
    kh8, khu8, ksh = _fp8_cache(rng, k, fmt, True)  # one per KV head
    kv_lens = None if layout == "dense" else L
    q_lens = rng.integers(0, q_len + 1, size=len(lens)).astype(np.int32) if q_len else None
    sinks = rng.standard_normal(hq).astype(np.float32)
    tol = 4e-3 if dt == "float16" else 2e-2
    args = (to_gpu(qd), cp.asarray(ku8), cp.asarray(vu8))
    kw = dict(kv_lens=None if kv_lens is None else cp.asarray(kv_lens), block_table=to_gpu(table), kv_dtype=fmt)
    qkw = {} if q_lens is None else dict(q_lens=cp.asarray(q_lens))
    rq = {} if q_lens is None else dict(q_lens=q_lens)
    lse_shape = qd.shape[:-1]

    def check(out, lse, ro, rl):
        fin = np.isfinite(rl)
        _assert_out_lse(out, lse, ro, rl, tol * max(1.0, np.abs(ro).max()),
                        2e-3 * max(1.0, np.abs(rl[fin]).max()) if fin.any() else 1.0)

    with K.tuning(**PAIRS):
        for feats in ({}, dict(sinks=sinks, window_left=1500, softcap=20.0)):
            gfeats = {n: (cp.asarray(x) if isinstance(x, np.ndarray) else x) for n, x in feats.items()}
            pl = cupy_lean.plan(*args, **kw, out=_nan_like(qd.shape, npdt), **gfeats)
            assert pl.paired and pl.lanes == 1 and pl.spec.head_dim == 128, pl.describe()
            assert "head pairs" in pl.describe() and pl.units == len(lens) * hkv // 2
            ro, rl = reference.attention(qd, k8, v8, kv_lens=kv_lens, block_table=table, k_scale=ks, v_scale=vs,
                                         **rq, **feats)
            wide = _nan_like(qd.shape[:-1] + (128,), npdt)
            out = wide[..., 32:96]  # a strided out: rows 256 bytes apart
            lse = cp.full(lse_shape, cp.nan, dtype=cp.float32)
            cupy_lean.attention(*args, **kw, **qkw, **gfeats, k_scale=float(ks),
                                v_scale=cp.asarray(vs, dtype=cp.float32), out=out, lse=lse)
            check(out, lse, ro, rl)
            assert bool(cp.isnan(wide[..., :32]).all()) and bool(cp.isnan(wide[..., 96:]).all())
            # the plan itself, and with per-head K scales (the plan without pairs launches)
            out, lse = _nan_like(qd.shape, npdt), cp.full(lse_shape, cp.nan, dtype=cp.float32)
            rfeats = {"sinks": gfeats["sinks"]} if feats else {}  # (the window and soft-cap: the plan's)
            pl.run(*args, kv_lens=kw["kv_lens"], block_table=kw["block_table"], **qkw, **rfeats, k_scale=ks,
                   v_scale=vs, out=out, lse=lse)
            check(out, lse, ro, rl)
            rh, rlh = reference.attention(qd, kh8, v8, kv_lens=kv_lens, block_table=table, k_scale=ksh, v_scale=vs,
                                          **rq, **feats)
            out, lse = _nan_like(qd.shape, npdt), cp.full(lse_shape, cp.nan, dtype=cp.float32)
            pl.run(args[0], cp.asarray(khu8), args[2], kv_lens=kw["kv_lens"], block_table=kw["block_table"], **qkw,
                   **rfeats, k_scale=cp.asarray(ksh, dtype=cp.float32), v_scale=vs, out=out, lse=lse)
            check(out, lse, rh, rlh)
            assert pl._unpaired is not None and not pl._unpaired.paired
        # two graphs captured one after another, each on a plan of its own
        ro, rl = reference.attention(qd, k8, v8, kv_lens=kv_lens, block_table=table, k_scale=ks, v_scale=vs, **rq)
        plans = [cupy_lean.plan(*args, **kw, out=_nan_like(qd.shape, npdt)) for _ in range(2)]
        runs = []
        for plan in plans:
            assert plan.paired
            out = _nan_like(qd.shape, npdt)
            lse = cp.full(lse_shape, cp.nan, dtype=cp.float32)
            runs.append((_capture(lambda plan=plan, out=out, lse=lse: plan.run(
                *args, kv_lens=kw["kv_lens"], block_table=kw["block_table"], **qkw, out=out, lse=lse,
                k_scale=float(ks), v_scale=float(vs))), out, lse))
        _replay_nan_prefilled(runs)
        for _, out, lse in runs:
            check(out, lse, ro, rl)
    # the same call without pairs agrees with the paired one
    with K.tuning(**NO_PAIRS):
        assert not cupy_lean.plan(*args, **kw, out=_nan_like(qd.shape, npdt)).paired
        plain = cupy_lean.attention(*args, **kw, **qkw, k_scale=float(ks), v_scale=float(vs))
    with K.tuning(**PAIRS):
        paired = cupy_lean.attention(*args, **kw, **qkw, k_scale=float(ks), v_scale=float(vs))
    d = cp.abs(plain.astype(cp.float32) - paired.astype(cp.float32))
    assert bool(cp.isfinite(paired).all()) and float(d.max()) < 2 * tol


def test_gpu_fp8_head_pairs_only_where_they_apply():
    """No head pairs for an odd number of KV heads, heads apart (HND),
    16-bit caches, head_dim 128, an option fixing the configuration (a tile
    size, num_ctas, another schedule), or a page size over the limit; the
    rule's default (TUNING) pairs pages of one token."""
    from cupy_lean import kernels as K

    rng = np.random.default_rng(331)
    lens = [900, 5, 0, 2000]

    def plan_of(hq, hkv, d=64, layout="paged", page_size=1, fp8=True, **opts):
        q, k, v, L, table = make_inputs(rng, len(lens), hq, hkv, d, np.float16, lens, layout, page_size=page_size)
        kk, vv = (cp.asarray(x.view(np.uint16).astype(np.uint8)) if fp8 else cp.asarray(x) for x in (k, v))
        kw = dict(kv_lens=cp.asarray(L), block_table=to_gpu(table))
        if opts.pop("hnd", False):
            kk, vv = (cp.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in (kk, vv))
            kw["kv_layout"] = "HND"
        return cupy_lean.plan(cp.asarray(q), kk, vv, kv_dtype="e4m3" if fp8 else None, **kw, **opts)

    with K.tuning(**PAIRS):
        assert plan_of(8, 4).paired
        assert not plan_of(6, 3).paired  # odd
        assert not plan_of(8, 4, hnd=True, page_size=4).paired  # heads apart
        assert not plan_of(8, 4, fp8=False).paired
        assert not plan_of(8, 4, d=128).paired
        assert not plan_of(8, 4, tile_size=64).paired
        assert not plan_of(8, 4, num_ctas=40).paired
        assert not plan_of(8, 4, schedule="split").paired
    with K.tuning(fp8_pair_heads_max_page=8, fp8_pair_heads_dense=False):
        assert plan_of(8, 4, page_size=8).paired
        assert not plan_of(8, 4, page_size=16).paired
        assert not plan_of(8, 4, layout="dense").paired
    # the defaults: pages of one token only
    assert plan_of(8, 4).paired and not plan_of(8, 4, page_size=16).paired
    assert not plan_of(8, 4, layout="dense").paired


def test_gpu_fp8_head_pairs_layouts_and_a_captured_unpaired_launch():
    """Head pairs with a heads-major q and out (transposed views) and an HND
    cache of one-token pages (the same memory as NHD); then per-head GPU
    scales captured in a graph through attention() (the plan without pairs
    launches inside the capture), the plan cache cleared and other memory
    allocated: the graph still replays correctly into its NaN-prefilled
    out (its plan and workspace were kept)."""
    import gc

    from cupy_lean import kernels as K

    rng = np.random.default_rng(347)
    lens = [1500, 1, 0, 777, 3001]
    B, hq, hkv = len(lens), 12, 4
    q, k, v, L, table = make_inputs(rng, B, hq, hkv, 64, np.float16, lens, "paged", page_size=1)
    k8, ku8, _ = _fp8_cache(rng, k, "e4m3", False)
    v8, vu8, _ = _fp8_cache(rng, v, "e4m3", False)
    ksh = rng.uniform(0.5, 2.0, hkv)
    kh8 = (k.astype(np.float32) / ksh[None, None, :, None]).astype(k8.dtype)
    kw = dict(kv_lens=cp.asarray(L), block_table=to_gpu(table), kv_dtype="e4m3")
    qh = cp.asarray(np.ascontiguousarray(q.transpose(1, 0, 2))).transpose(1, 0, 2)  # heads-major
    hk, hv = (cp.asarray(np.ascontiguousarray(x.transpose(0, 2, 1, 3))) for x in (ku8, vu8))  # HND pages
    ro, rl = reference.attention(q, k8, v8, kv_lens=L, block_table=table, k_scale=0.75, v_scale=0.75)
    with K.tuning(**PAIRS):
        pl = cupy_lean.plan(qh, hk, hv, **kw, kv_layout="HND", out=_nan_like((hq, B, 64), np.float16).transpose(1, 0, 2))
        assert pl.paired, pl.describe()
        outh = _nan_like((hq, B, 64), np.float16).transpose(1, 0, 2)
        lse = cp.full((B, hq), cp.nan, dtype=cp.float32)
        cupy_lean.attention(qh, hk, hv, **kw, kv_layout="HND", k_scale=0.75, v_scale=0.75, out=outh, lse=lse)
        _assert_out_lse(outh, lse, ro, rl, 4e-3, 2e-3 * max(1.0, np.abs(rl[np.isfinite(rl)]).max()))
        # per-head K scales in a graph (through attention()'s cache), then the cache cleared
        rh, rlh = reference.attention(q, kh8, v8, kv_lens=L, block_table=table, k_scale=ksh, v_scale=0.75)
        args = (cp.asarray(q), cp.asarray(kh8.view(np.uint8)), cp.asarray(vu8))
        kss = cp.asarray(ksh, dtype=cp.float32)
        out = _nan_like(q.shape, np.float16)
        lse = cp.full((B, hq), cp.nan, dtype=cp.float32)
        graph = _capture(lambda: cupy_lean.attention(*args, **kw, k_scale=kss, v_scale=0.75, out=out, lse=lse))
        cupy_lean.clear_cache()
        gc.collect()
        junk = [cp.full((1 << 20,), 7, dtype=cp.float32) for _ in range(8)]  # memory the pool hands out again
        _replay_nan_prefilled([(graph, out, lse)])
        del junk
        _assert_out_lse(out, lse, rh, rlh, 4e-3, 2e-3 * max(1.0, np.abs(rlh[np.isfinite(rlh)]).max()))


def test_gpu_fp8_head_pairs_from_pytorch_two_graphs():
    """A serving user's paged fp8 cache of one-token pages at head_dim 64
    in head pairs: PyTorch float8_e4m3fn pages, a bf16 q, torch int32
    kv_lens and block table, k_scale a torch scalar tensor and v_scale a
    float, a custom softmax scale, ``out`` a strided slice of a NaN-filled
    tensor, two CUDA graphs captured one after another on the same plan:
    both write every row of their own slice and nothing else."""
    torch = pytest.importorskip("torch")
    import ml_dtypes
    from cupy_lean import kernels as K

    rng = np.random.default_rng(337)
    lens0 = [2049, 0, 1, 700, 4096, 33]
    q, k, v, lens, table = make_inputs(rng, len(lens0), 12, 4, 64, BF16, lens0, "paged", page_size=1)
    k8 = (k.astype(np.float32) / 1.5).astype(ml_dtypes.float8_e4m3fn)
    v8 = (v.astype(np.float32) / 0.75).astype(ml_dtypes.float8_e4m3fn)
    tq = torch.from_numpy(q.view(np.int16)).cuda().view(torch.bfloat16)
    tk, tv = (torch.from_numpy(x.view(np.uint8)).cuda().view(torch.float8_e4m3fn) for x in (k8, v8))
    tl, tt = torch.from_numpy(lens).cuda(), torch.from_numpy(table).cuda()
    scale = 0.09
    bigs = [torch.full((len(lens0), 12, 3 * 64), float("nan"), dtype=torch.bfloat16, device="cuda")
            for _ in range(2)]
    cols = slice(64, 128)
    run_kw = dict(kv_lens=tl, block_table=tt, k_scale=torch.tensor(1.5, device="cuda"), v_scale=0.75)
    with K.tuning(**PAIRS):
        p = cupy_lean.plan(tq, tk, tv, out=bigs[0][:, :, cols], scale=scale, kv_lens=tl, block_table=tt)
    assert p.paired and "fp8 e4m3" in p.describe(), p.describe()
    kd = k8.astype(np.float32) * np.float32(1.5)
    vd = v8.astype(np.float32) * np.float32(0.75)
    _replay_two_graphs_into_slices(torch, p, (tq, tk, tv), (q, kd, vd), scale, bigs, cols, run_kw,
                                   dict(kv_lens=lens, block_table=table))


def test_gpu_fp8_paged_tile_64_from_pytorch_strided_out_two_graphs():
    """A serving user's paged fp8 cache at head_dim 64, which takes the
    64-token tile (TUNING["fp8_varied_lengths_tile"] "paged") in two lanes:
    PyTorch float8_e5m2 pages, a bf16 q, torch int32 kv_lens and block
    table, per-head K scales as a torch tensor, a custom softmax scale,
    ``out`` a strided slice of a NaN-filled tensor, two CUDA graphs captured
    one after another on the same plan: both write every row of their own
    slice and nothing else."""
    torch = pytest.importorskip("torch")
    import ml_dtypes

    rng = np.random.default_rng(113)
    lens0 = [2049, 0, 1, 700, 4096, 33]
    q, k, v, lens, table = make_inputs(rng, len(lens0), 12, 2, 64, BF16, lens0, "paged", page_size=16)
    ks = rng.uniform(0.5, 2.0, 2)
    k8 = (k.astype(np.float32) / ks[None, None, :, None]).astype(ml_dtypes.float8_e5m2)
    v8 = (v.astype(np.float32) / 0.75).astype(ml_dtypes.float8_e5m2)
    tq = torch.from_numpy(q.view(np.int16)).cuda().view(torch.bfloat16)
    tk, tv = (torch.from_numpy(x.view(np.uint8)).cuda().view(torch.float8_e5m2) for x in (k8, v8))
    tl, tt = torch.from_numpy(lens).cuda(), torch.from_numpy(table).cuda()
    tks = torch.tensor(ks, dtype=torch.float32, device="cuda")
    scale = 0.09
    bigs = [torch.full((len(lens0), 12, 3 * 64), float("nan"), dtype=torch.bfloat16, device="cuda")
            for _ in range(2)]
    cols = slice(64, 128)
    run_kw = dict(kv_lens=tl, block_table=tt, k_scale=tks, v_scale=0.75)
    p = cupy_lean.plan(tq, tk, tv, out=bigs[0][:, :, cols], scale=scale, kv_lens=tl, block_table=tt)
    assert "fp8 e5m2" in p.describe()
    assert p.varied_lengths_tile and p.spec.tile == 64 and p.lanes == 2, p.describe()
    kd = k8.astype(np.float32) * ks.astype(np.float32)[None, None, :, None]  # the values the kernel reads (exact in float32)
    vd = v8.astype(np.float32) * np.float32(0.75)
    _replay_two_graphs_into_slices(torch, p, (tq, tk, tv), (q, kd, vd), scale, bigs, cols, run_kw,
                                   dict(kv_lens=lens, block_table=table))


def _nccl():
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CuPy warns when libnccl is missing
            from cupy.cuda import nccl

            nccl.get_version()
        return nccl
    except Exception:
        return None


@pytest.mark.skipif(_nccl() is None, reason="CuPy without NCCL")
def test_distributed_single_rank_nccl_and_devices():
    """The NCCL paths with one rank (what one GPU allows): the all-gather
    of one shard, merged, equals the plain call; so does the one-process
    multi-device path on one device."""
    from cupy_lean import distributed

    nccl = _nccl()
    rng = np.random.default_rng(92)
    q, k, v, lens, _ = make_inputs(rng, 3, 16, 4, 128, np.float16, [5000, 0, 77], "dense")
    qd, kd, vd, ld = to_gpu(q), to_gpu(k), to_gpu(v), cp.asarray(lens)
    plain = cupy_lean.attention(qd, kd, vd, kv_lens=ld, return_lse=True)
    comm = nccl.NcclCommunicator(1, nccl.get_unique_id(), 0)
    got = distributed.attention(qd, kd, vd, kv_lens=ld, group=distributed.NcclGroup(comm, 0, 1), return_lse=True)
    _assert_bitwise(got[0], plain[0])
    dev = cp.cuda.runtime.getDevice()
    res = distributed.attention_devices([dict(device=dev, q=qd, k=kd, v=vd, kv_lens=ld)], return_lse=True)
    out, lse = res[0]
    assert float(cp.abs(out.astype(cp.float32) - plain[0].astype(cp.float32)).max()) < 2e-3
    assert cp.array_equal(cp.isneginf(lse), cp.isneginf(plain[1]))


@pytest.mark.parametrize("layout", ["dense", "paged"])
@pytest.mark.parametrize("sched", ["lean", "split", "head"])
@pytest.mark.parametrize("q_len,extra", [(2, {}), (4, dict(window_left=300)), (3, dict(sinks=True, softcap=10.0))])
def test_gpu_query_tokens_match_the_reference(layout, sched, q_len, extra):
    """q of shape (batch, q_len, heads_q, head_dim), causal at the end of each
    sequence, through every decomposition."""
    rng = np.random.default_rng(93 + q_len)
    lens = [9000, 2, 0, 3001, 64, 777]
    q3, k, v, L, table = make_inputs(rng, len(lens), 16, 4, 128, np.float16, lens, layout, page_size=16)
    q = rng.standard_normal((len(lens), q_len, 16, 128)).astype(np.float16)
    kw, host_kw = dict(extra), dict(extra)
    if extra.get("sinks"):
        sinks = rng.standard_normal(16).astype(np.float32)
        kw["sinks"], host_kw["sinks"] = cp.asarray(sinks), sinks
    out = _nan_like(q.shape, q.dtype)
    lse = cp.full(q.shape[:3], cp.nan, dtype=cp.float32)
    cupy_lean.attention(to_gpu(q), to_gpu(k), to_gpu(v), kv_lens=cp.asarray(L), block_table=to_gpu(table), out=out,
                        lse=lse, schedule=sched, num_ctas=None if sched == "head" else 97, **kw)
    _assert_out_lse(out, lse, *reference.attention(q, k, v, kv_lens=L, block_table=table, **host_kw))


@pytest.mark.parametrize("layout", ["dense", "paged"])
@pytest.mark.parametrize("sched", ["lean", "split", "head"])
@pytest.mark.parametrize("extra", [{}, dict(window_left=300, sinks=True)])
def test_gpu_ragged_query_tokens_match_the_reference(layout, sched, extra):
    """q_lens (a ragged batch of query tokens) through every decomposition:
    padding tokens get zeros and -inf (or the sink), the others the causal
    decode; then a CUDA graph replayed with new q_lens values."""
    rng = np.random.default_rng(95)
    lens = [9000, 2, 0, 3001, 64, 777]
    q3, k, v, L, table = make_inputs(rng, len(lens), 16, 4, 128, np.float16, lens, layout, page_size=16)
    q = rng.standard_normal((len(lens), 4, 16, 128)).astype(np.float16)
    kw, host_kw = dict(extra), dict(extra)
    if extra.get("sinks"):
        sinks = rng.standard_normal(16).astype(np.float32)
        kw["sinks"], host_kw["sinks"] = cp.asarray(sinks), sinks
    args = (to_gpu(q), to_gpu(k), to_gpu(v))
    gkw = dict(kv_lens=cp.asarray(L), block_table=to_gpu(table), schedule=sched,
               num_ctas=None if sched == "head" else 97, **kw)
    out = _nan_like(q.shape, q.dtype)
    lse = cp.full(q.shape[:3], cp.nan, dtype=cp.float32)
    qn = cp.asarray(np.array([4, 1, 3, 0, 2, 4], dtype=np.int32))

    def check(nq):
        _assert_out_lse(out, lse, *reference.attention(q, k, v, kv_lens=L, block_table=table, q_lens=nq, **host_kw))

    cupy_lean.attention(*args, **gkw, out=out, lse=lse, q_lens=qn)
    check(cp.asnumpy(qn))
    graph = _capture(lambda: cupy_lean.attention(*args, **gkw, out=out, lse=lse, q_lens=qn))
    qn[...] = cp.asarray(np.array([0, 4, 1, 2, 3, 1], dtype=np.int32))
    out.fill(cp.nan)
    lse.fill(cp.nan)
    graph.launch()
    cp.cuda.get_current_stream().synchronize()
    check(cp.asnumpy(qn))
    with pytest.raises(ValueError, match="q_lens: expected values in"):
        cupy_lean.attention(*args, **gkw, q_lens=cp.asarray(np.full(6, 5, np.int32)), validate=True)


def test_gpu_one_query_token_in_four_dimensions_is_the_plain_call():
    rng = np.random.default_rng(99)
    q, k, v, L, _ = make_inputs(rng, 3, 32, 8, 64, np.float16, [5000, 1, 300], "dense")
    args = (to_gpu(k), to_gpu(v))
    a = cupy_lean.attention(to_gpu(q)[:, None], *args, kv_lens=cp.asarray(L), return_lse=True)
    b = cupy_lean.attention(to_gpu(q), *args, kv_lens=cp.asarray(L), return_lse=True)
    assert a[0].shape == (3, 1, 32, 64) and a[1].shape == (3, 1, 32)
    assert float(cp.abs(a[0][:, 0].astype(cp.float32) - b[0].astype(cp.float32)).max()) < 2e-3


_FEATURE_SETS = [dict(sinks=True), dict(window_left=700), dict(softcap=8.0),
                 dict(sinks=True, window_left=2500, softcap=20.0)]


@pytest.mark.parametrize("layout", ["dense", "paged"])
@pytest.mark.parametrize("sched", ["lean", "split", "head"])
@pytest.mark.parametrize("fs", range(len(_FEATURE_SETS)))
def test_gpu_features_match_the_reference(layout, sched, fs):
    """Sinks, sliding window and soft-cap through every decomposition, dense
    and paged, with an empty sequence and lengths shorter than the window."""
    rng = np.random.default_rng(79 + fs)
    lens = [9000, 17, 0, 3001, 64, 777]
    q, k, v, L, table = make_inputs(rng, len(lens), 32, 8, 128, np.float16, lens, layout, page_size=16)
    kw = dict(_FEATURE_SETS[fs])
    host_kw = dict(kw)
    if kw.get("sinks"):
        sinks = rng.standard_normal(32).astype(np.float32) * 2
        sinks[3] = -np.inf
        kw["sinks"], host_kw["sinks"] = cp.asarray(sinks), sinks
    out = _nan_like(q.shape, q.dtype)
    got, lse = cupy_lean.attention(to_gpu(q), to_gpu(k), to_gpu(v), kv_lens=cp.asarray(L),
                                   block_table=to_gpu(table), out=out, return_lse=True, schedule=sched,
                                   num_ctas=None if sched == "head" else 97, **kw)
    _assert_out_lse(got, lse, *reference.attention(q, k, v, kv_lens=L, block_table=table, **host_kw))


def test_gpu_features_in_a_graph_with_new_lengths():
    rng = np.random.default_rng(90)
    lens = np.array([5000, 300, 2600], np.int32)
    q, k, v, L, table = make_inputs(rng, 3, 16, 2, 64, np.float16, lens, "paged", page_size=32)
    sinks = cp.asarray(rng.standard_normal(16).astype(np.float32))
    qd, kd, vd, td, ld = to_gpu(q), to_gpu(k), to_gpu(v), to_gpu(table), cp.asarray(L)
    out = _nan_like(q.shape, q.dtype)
    kw = dict(kv_lens=ld, block_table=td, sinks=sinks, window_left=1000, softcap=15.0)
    graph = _capture(lambda: cupy_lean.attention(qd, kd, vd, out=out, **kw))
    new = np.array([4000, 0, 2500], np.int32)
    ld[...] = cp.asarray(new)
    out.fill(cp.nan)
    cp.cuda.Device().synchronize()
    graph.launch()
    cp.cuda.Device().synchronize()
    eager = cupy_lean.attention(qd, kd, vd, **kw)
    _assert_bitwise(out, eager)
    ro, _ = reference.attention(q, k, v, kv_lens=new, block_table=table, sinks=cp.asnumpy(sinks), window_left=1000,
                                softcap=15.0)
    assert np.abs(cp.asnumpy(out).astype(np.float64) - ro).max() < 4e-3


def _poison_outside_the_window(k, v, lens, table, start, poison):
    """Copies of a cache with ``poison`` in every slot a windowed call has no
    use for: each sequence's keys and values before ``start[b]`` and at or
    past ``lens[b]`` (dense), or (paged) those slots of its pages and every
    page no table entry inside a window holds; the table entries of pages
    wholly before the window point at one extra page of poison, as a serving
    engine's recycled pages may. Returns ``(k, v, table)``."""
    k, v = k.copy(), v.copy()
    if table is None:
        for b, n in enumerate(lens):
            for x in (k, v):
                x[b, :start[b]] = poison
                x[b, n:] = poison
        return k, v, None
    ps, held = k.shape[1], np.zeros(k.shape[0], bool)
    tab = table.copy()
    for b, n in enumerate(lens):
        for j in range(-(-int(n) // ps)):
            lo, page = j * ps, table[b, j]
            if lo + ps <= start[b]:
                tab[b, j] = k.shape[0]  # the extra page below
                continue
            held[page] = True
            for x in (k, v):
                x[page, :max(0, start[b] - lo)] = poison
                x[page, max(0, n - lo):] = poison
    for x in (k, v):
        x[~held] = poison
    k = np.concatenate([k, np.full_like(k[:1], poison)])
    v = np.concatenate([v, np.full_like(v[:1], poison)])
    return k, v, tab


@pytest.mark.parametrize("layout", ["dense", "paged"])
@pytest.mark.parametrize("kv", ["float16", "bfloat16", "e4m3"])
@pytest.mark.parametrize("sched,q_len,ragged", [("lean", 1, False), ("split", 3, False), ("head", 2, False),
                                                ("lean", 4, True)])
def test_gpu_window_reads_nothing_outside_it(layout, kv, sched, q_len, ragged):
    """A sliding-window call reads only its window: with NaN in every key
    and value before each sequence's window and past its length, and the
    pages wholly before the window pointing at a page of NaN, the output and
    lse are those of the clean cache (a NaN read anywhere would spread to
    its rows). With ``q_lens`` each sequence's window is that of its own
    first token, and a sequence of no tokens reads nothing."""
    rng = np.random.default_rng(211 + q_len)
    lens, wl = [9000, 700, 1, 0, 2345, 530], 500
    dt = BF16 if kv == "bfloat16" else np.float16
    _, k, v, L, table = make_inputs(rng, len(lens), 16, 4, 128, dt, lens, layout, page_size=16, cap_extra=37)
    q = rng.standard_normal((len(lens), q_len, 16, 128)).astype(dt)
    nq = np.array([4, 1, 0, 2, 3, 4], np.int32) if ragged else None
    if kv == "e4m3":
        k_ref, k_st, ks = _fp8_cache(rng, k, "e4m3", True)
        v_ref, v_st, vs = _fp8_cache(rng, v, "e4m3", True)
        extra, poison = dict(kv_dtype="e4m3", k_scale=ks, v_scale=vs), 0x7F  # 0x7F: e4m3 NaN
    else:
        k_ref, k_st, v_ref, v_st, extra, poison = k, k, v, v, {}, np.nan
    ro, rl = reference.attention(q, k_ref, v_ref, kv_lens=L, block_table=table, window_left=wl, q_lens=nq, **extra)
    start = reference.window_start(L, wl, q_len if nq is None else nq)
    assert start[0] > 16 and start[1] % 16 != 0  # whole pages and a part of one before the window
    if nq is not None:  # later than q_len's start (sequence 1), and all of sequence 2 (no tokens)
        assert start[1] == reference.window_start(L, wl, q_len)[1] + 3 and start[2] == L[2] == 1
    k_st, v_st, tab = _poison_outside_the_window(k_st, v_st, L, table, start, poison)
    out = _nan_like(q.shape, q.dtype)
    lse = cp.full(q.shape[:3], cp.nan, dtype=cp.float32)
    cupy_lean.attention(to_gpu(q), to_gpu(k_st), to_gpu(v_st), kv_lens=cp.asarray(L), block_table=to_gpu(tab),
                        window_left=wl, schedule=sched, out=out, lse=lse,
                        q_lens=None if nq is None else cp.asarray(nq), **extra)
    tol = 1.6e-2 if kv == "bfloat16" else 4e-3
    _assert_out_lse(out, lse, ro, rl, tol, tol)


@pytest.mark.parametrize("layout", ["dense", "paged", "dense_no_kv_lens"])
@pytest.mark.parametrize("kv", ["float16", "e4m3"])
@pytest.mark.parametrize("sched", ["lean", "split", "head"])
def test_gpu_sequence_of_no_query_tokens_reads_nothing(layout, kv, sched):
    """Without a window, a sequence with q_lens[b] = 0 reads no key or
    value: with its whole cache NaN (and past every length), its rows are
    padding (zero, lse the sink's logit) and the other sequences' rows are
    the clean cache's; also with no kv_lens (every sequence full; lean as
    stream-K over 45 CTAs, whose scan caches the lengths)."""
    rng = np.random.default_rng(223)
    full = layout == "dense_no_kv_lens"
    lens, nq = ([1500] * 5 if full else [1500, 900, 33, 0, 700]), np.array([3, 0, 2, 0, 0], np.int32)
    dt = np.float16
    _, k, v, L, table = make_inputs(rng, len(lens), 16, 4, 128, dt, lens, "dense" if full else layout,
                                    page_size=16, cap_extra=0 if full else 21)
    q = rng.standard_normal((len(lens), 3, 16, 128)).astype(dt)
    sinks = rng.standard_normal(16).astype(np.float32)
    if kv == "e4m3":
        k_ref, k_st, ks = _fp8_cache(rng, k, "e4m3", False)
        v_ref, v_st, vs = _fp8_cache(rng, v, "e4m3", False)
        extra, poison = dict(kv_dtype="e4m3", k_scale=ks, v_scale=vs), 0x7F
    else:
        k_ref, k_st, v_ref, v_st, extra, poison = k, k, v, v, {}, np.nan
    ro, rl = reference.attention(q, k_ref, v_ref, kv_lens=L, block_table=table, sinks=sinks, q_lens=nq, **extra)
    start = reference.window_start(L, None, nq)
    assert start.tolist() == [0, L[1], 0, L[3], L[4]] and (L[0] == L[3]) == full
    k_st, v_st, tab = _poison_outside_the_window(k_st, v_st, L, table, start, poison)
    out = _nan_like(q.shape, q.dtype)
    lse = cp.full(q.shape[:3], cp.nan, dtype=cp.float32)
    cupy_lean.attention(to_gpu(q), to_gpu(k_st), to_gpu(v_st), kv_lens=None if full else cp.asarray(L),
                        block_table=to_gpu(tab),
                        schedule=sched, out=out, lse=lse, sinks=cp.asarray(sinks), q_lens=cp.asarray(nq),
                        num_ctas=45 if full and sched == "lean" else None,  # stream-K (not the uniform variant)
                        **extra)
    _assert_out_lse(out, lse, ro, rl, 4e-3, 4e-3)
    assert np.all(cp.asnumpy(out)[[1, 3, 4]] == 0)
    assert np.allclose(cp.asnumpy(lse)[1], sinks[None, :], rtol=1e-6)


# ---------------------------------------------------------------- array libraries

def _lib_case(seed=73, dtype=np.float16):
    rng = np.random.default_rng(seed)
    return make_inputs(rng, 3, 16, 4, 128, dtype, [700, 1, 2500], "dense")


@pytest.mark.parametrize("dt", ["float16", "bfloat16"])
def test_torch_tensors_zero_copy(dt):
    torch = pytest.importorskip("torch")
    npdt = np.float16 if dt == "float16" else BF16
    q, k, v, lens, table = _lib_case(dtype=npdt)
    tdt = getattr(torch, dt)
    tq, tk, tv = (torch.from_numpy(x.view(np.int16)).cuda().view(tdt) for x in (q, k, v))
    tl = torch.from_numpy(lens).cuda()
    tout = torch.full(tuple(q.shape), float("nan"), dtype=tdt, device="cuda")
    out, lse = cupy_lean.attention(tq, tk, tv, kv_lens=tl, out=tout, return_lse=True)
    torch.cuda.synchronize()
    assert out.dtype == npdt
    assert out.data.ptr == tout.data_ptr()  # written in place, no copy
    check_close(out, lse, q, k, v, lens, table, npdt)
    assert not torch.isnan(tout.float()).any()


@pytest.mark.parametrize("dt", ["float16", "bfloat16"])
def test_jax_arrays(dt):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        pytest.skip("JAX sees no GPU")
    npdt = np.float16 if dt == "float16" else BF16
    q, k, v, lens, table = _lib_case(seed=74, dtype=npdt)
    jq, jk, jv = (jax.device_put(jnp.asarray(x), gpus[0]) for x in (q, k, v))
    jl = jax.device_put(jnp.asarray(lens), gpus[0])
    for x in (jq, jk, jv, jl):
        x.block_until_ready()
    out, lse = cupy_lean.attention(jq, jk, jv, kv_lens=jl, return_lse=True)
    assert out.dtype == npdt
    check_close(out, lse, q, k, v, lens, table, npdt)


def test_unnamed_two_byte_type_is_refused():
    q, k, v, lens, table = _lib_case(seed=75)
    qd = to_gpu(q).view(np.dtype("V2"))
    with pytest.raises(TypeError, match="q:"):
        cupy_lean.attention(qd, to_gpu(k), to_gpu(v))


def test_numpy_path_matches_reference():
    q, k, v, lens, table = _lib_case(seed=76)
    out, lse = cupy_lean.attention(q, k, v, kv_lens=lens, return_lse=True)
    ro, rl = reference.attention(q, k, v, kv_lens=lens)
    assert isinstance(out, np.ndarray)
    assert np.abs(out.astype(np.float64) - ro).max() < 1e-3


# ---------------------------------------------------------------- arguments users pass

@pytest.mark.parametrize("scale", [0.01, 0.5])
def test_custom_scale(scale):
    rng = np.random.default_rng(77)
    q, k, v, lens, table = make_inputs(rng, 3, 32, 8, 128, np.float16, [3000, 65, 1], "dense")
    if scale == 0.5:  # peaked: one key dominates each row
        k[0, 100] = q[0, :8] * 2
    out = _nan_like(q.shape, q.dtype)
    _, lse = cupy_lean.attention(to_gpu(q), to_gpu(k), to_gpu(v), kv_lens=cp.asarray(lens), scale=scale,
                                 out=out, return_lse=True)
    check_close(out, lse, q, k, v, lens, table, np.float16, scale=scale)


@pytest.mark.parametrize("tile", [16, 32, 64, 128])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_every_tile_size(tile, d):
    rng = np.random.default_rng(78 + tile + d)
    q, k, v, lens, table = make_inputs(rng, 3, 12, 3, d, BF16, [tile * 7 + 3, tile - 1, 1], "paged", page_size=7)
    out = _nan_like(q.shape, q.dtype)
    try:
        _, lse = cupy_lean.attention(to_gpu(q), to_gpu(k), to_gpu(v), kv_lens=cp.asarray(lens),
                                     block_table=to_gpu(table), tile_size=tile, out=out, return_lse=True)
    except ValueError as exc:  # a tile too large for shared memory says so
        assert "tile_size" in str(exc) and "shared memory" in str(exc)
        return
    check_close(out, lse, q, k, v, lens, table, BF16)


def test_strided_and_misaligned_out_keeps_its_border():
    rng = np.random.default_rng(79)
    q, k, v, lens, table = make_inputs(rng, 3, 8, 2, 64, np.float16, [900, 0, 33], "dense")
    big = cp.full((3, 10, 64 + 3), cp.nan, dtype=cp.float16)
    view = big[:, 1:9, 1:65]  # strided rows, pointer off by 2 bytes
    out = cupy_lean.attention(to_gpu(q), to_gpu(k), to_gpu(v), kv_lens=cp.asarray(lens), out=view)
    assert out is view
    check_close(view, None, q, k, v, lens, table, np.float16)
    border = big.copy()
    border[:, 1:9, 1:65] = 0
    assert int(cp.isnan(border).sum()) == 3 * (10 * 67 - 8 * 64)
    # inside a graph too: the copy back from the aligned temporary is captured
    qd, kd, vd, ld = to_gpu(q), to_gpu(k), to_gpu(v), cp.asarray(lens)
    g = _capture(lambda: cupy_lean.attention(qd, kd, vd, kv_lens=ld, out=view))
    view.fill(cp.nan)
    g.launch(cp.cuda.Stream.null)  # the default stream: ordered after the fill
    cp.cuda.Device().synchronize()
    check_close(view, None, q, k, v, lens, table, np.float16)


def test_misaligned_qkv_views():
    rng = np.random.default_rng(80)
    q, k, v, lens, table = make_inputs(rng, 2, 8, 2, 64, np.float16, [500, 70], "dense")
    def shifted(x):
        flat = cp.zeros(x.size + 8, dtype=x.dtype)
        flat[1:1 + x.size] = cp.asarray(x).ravel()
        return flat[1:1 + x.size].reshape(x.shape)  # pointer 2 bytes off 16-byte alignment
    out = _nan_like(q.shape, q.dtype)
    cupy_lean.attention(shifted(q), shifted(k), shifted(v), kv_lens=cp.asarray(lens), out=out)
    check_close(out, None, q, k, v, lens, table, np.float16)


def test_int64_and_noncontiguous_block_table():
    rng = np.random.default_rng(81)
    q, k, v, lens, table = make_inputs(rng, 3, 16, 4, 128, np.float16, [400, 33, 1000], "paged", page_size=16)
    qd, kd, vd = to_gpu(q), to_gpu(k), to_gpu(v)
    ref = cupy_lean.attention(qd, kd, vd, kv_lens=cp.asarray(lens), block_table=to_gpu(table))
    t64 = cp.asarray(table.astype(np.int64))
    wide = cp.full((table.shape[0], 2 * table.shape[1]), -7, dtype=cp.int32)
    wide[:, ::2] = cp.asarray(table)
    for tb, kl in ((t64, cp.asarray(lens.astype(np.int64))), (wide[:, ::2], cp.asarray(lens))):
        out = _nan_like(q.shape, q.dtype)
        cupy_lean.attention(qd, kd, vd, kv_lens=kl, block_table=tb, out=out)
        _assert_bitwise(out, ref)
    check_close(ref, None, q, k, v, lens, table, np.float16)


def test_batch_300_past_the_length_cache():
    rng = np.random.default_rng(82)
    lens = rng.integers(0, 300, 300)
    q, k, v, lens, table = make_inputs(rng, 300, 8, 2, 64, np.float16, lens, "dense")
    out = _nan_like(q.shape, q.dtype)
    _, lse = cupy_lean.attention(to_gpu(q), to_gpu(k), to_gpu(v), kv_lens=cp.asarray(lens), out=out,
                                 return_lse=True, num_ctas=97)
    check_close(out, lse, q, k, v, lens, table, np.float16)


def test_unit_with_many_contributors(monkeypatch):
    """One KV head, group 128, 128k tokens, stream-K (a batch of one sequence
    may take the split-K variant: turned off here): every CTA of the grid
    contributes to the one unit (100+ partial states merged)."""
    from cupy_lean import kernels as K

    monkeypatch.setitem(K.TUNING, "uniform_variants", False)
    rng = np.random.default_rng(83)
    n = 131072 - 5
    q, k, v, lens, table = make_inputs(rng, 1, 128, 1, 128, np.float16, [n], "dense")
    out = _nan_like(q.shape, q.dtype)
    p = cupy_lean.plan(to_gpu(q), to_gpu(k), to_gpu(v), kv_lens=cp.asarray(lens), out=out)
    assert p.grid >= 100 and p.decomposition == K.Decomposition.STREAM_K
    _, lse = cupy_lean.attention(to_gpu(q), to_gpu(k), to_gpu(v), kv_lens=cp.asarray(lens), out=out,
                                 return_lse=True)
    ro, rl = reference.attention(q, k, v, kv_lens=lens)
    got = cp.asnumpy(out).astype(np.float64)
    assert np.isfinite(got).all()
    assert np.abs(got - ro).max() < 2e-3
    assert np.abs(cp.asnumpy(lse) - rl).max() < 2e-3


def test_deterministic_and_schedules_agree_with_nan_prefill():
    rng = np.random.default_rng(84)
    q, k, v, lens, table = make_inputs(rng, 5, 32, 8, 128, np.float16, [9000, 0, 1, 4097, 130], "paged",
                                       page_size=32)
    args = (to_gpu(q), to_gpu(k), to_gpu(v))
    kw = dict(kv_lens=cp.asarray(lens), block_table=to_gpu(table))
    res = {}
    for sched in ("lean", "split", "head"):
        outs = []
        for _ in range(3):
            o = _nan_like(q.shape, q.dtype)
            l = cp.full(q.shape[:2], cp.nan, dtype=cp.float32)
            cupy_lean.attention(*args, **kw, out=o, lse=l, schedule=sched)
            outs.append((o, l))
        for o, l in outs[1:]:
            _assert_bitwise(o, outs[0][0])
            _assert_bitwise(l, outs[0][1])
        res[sched] = outs[0]
        check_close(outs[0][0], outs[0][1], q, k, v, lens, table, np.float16)
    # the three decompositions agree with each other within rounding
    for a in ("split", "head"):
        d = cp.abs(res[a][0].astype(cp.float32) - res["lean"][0].astype(cp.float32)).max()
        assert float(d) < 2e-3
        dl = cp.abs(res[a][1] - res["lean"][1])
        assert float(cp.nan_to_num(dl, posinf=0).max()) < 1e-4


@pytest.mark.parametrize("layout", ["dense", "paged"])
def test_kv_layout_hnd_reads_in_place(layout):
    rng = np.random.default_rng(85)
    q, k, v, lens, table = make_inputs(rng, 3, 16, 4, 128, np.float16, [700, 0, 33], layout, page_size=16)
    qd, ld, td = to_gpu(q), cp.asarray(lens), to_gpu(table)
    ref = cupy_lean.attention(qd, to_gpu(k), to_gpu(v), kv_lens=ld, block_table=td)
    kh = cp.asarray(np.ascontiguousarray(k.transpose(0, 2, 1, 3)))
    vh = cp.asarray(np.ascontiguousarray(v.transpose(0, 2, 1, 3)))
    for _ in range(2):  # the second call takes the cached plan
        out = _nan_like(q.shape, q.dtype)
        cupy_lean.attention(qd, kh, vh, kv_lens=ld, block_table=td, out=out, kv_layout="HND")
        _assert_bitwise(out, ref)
    p = cupy_lean.plan(qd, kh, vh, kv_lens=ld, block_table=td, kv_layout="HND")
    _assert_bitwise(p.run(qd, kh, vh, kv_lens=ld, block_table=td), ref)


def test_package_bench_command_runs():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "cupy_lean", "bench", "--lens", "3000,5,0", "--cold-l2",
                        "--tile-sizes", "32", "--num-ctas", "7", "--page-size", "16", "--repeats", "2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    for label in ("schedule=lean", "schedule=split", "schedule=head", "tile_size=32", "num_ctas=7"):
        assert label in r.stdout


def test_paged_cache_with_a_page_stride_past_two_gigabytes():
    """Pages 2**31 + 2048 bytes apart (a view into a larger pool): the loader
    steps pages in 32 bits, so the plan reads such a cache through a
    contiguous copy; the result is that of the same pages packed."""
    if cp.cuda.Device().mem_info[0] < 6 * 2**30:
        pytest.skip("needs 6 GB of free GPU memory")
    rng = np.random.default_rng(78)
    ps, d, pages = 16, 64, 2
    row = 2**30 + 1024  # fp16 elements between pages: 2**31 + 2048 bytes
    pool = cp.zeros((pages, row), dtype=cp.float16)
    kv = rng.standard_normal((pages, ps, 1, d)).astype(np.float16)
    pool[:, :ps * d] = cp.asarray(kv.reshape(pages, ps * d))
    k = pool[:, :ps * d].reshape(pages, ps, 1, d)
    assert k.strides[0] == row * 2
    q = rng.standard_normal((1, 4, d)).astype(np.float16)
    lens = np.array([27], np.int32)
    table = np.array([[1, 0]], np.int32)
    out = _nan_like(q.shape, q.dtype)
    cupy_lean.attention(to_gpu(q), k, k, kv_lens=cp.asarray(lens), block_table=cp.asarray(table), out=out)
    check_close(out, None, q, kv, kv, lens, table, np.float16)


def test_one_token_cache_with_an_odd_token_stride():
    """A cache of one token per sequence whose (unused) token stride is 2
    bytes: the rows past each tile's token are addressed from the array's
    start, never from that stride (a misaligned copy source)."""
    from cupy.lib.stride_tricks import as_strided

    rng = np.random.default_rng(79)
    b, hkv, d = 2, 2, 64
    kv = rng.standard_normal((b, 1, hkv, d)).astype(np.float16)
    base = cp.zeros(b * hkv * d + 64, dtype=cp.float16)
    k = as_strided(base, shape=(b, 1, hkv, d), strides=(hkv * d * 2, 2, d * 2, 2))
    k[...] = cp.asarray(kv)
    q = rng.standard_normal((b, 4 * hkv, d)).astype(np.float16)
    lens = np.array([1, 1], np.int32)
    out = _nan_like(q.shape, q.dtype)
    cupy_lean.attention(to_gpu(q), k, k, kv_lens=cp.asarray(lens), out=out)
    cp.cuda.Device().synchronize()
    check_close(out, None, q, kv, kv, lens, None, np.float16)


@pytest.mark.parametrize("d,hq,hkv", [(64, 4, 4), (128, 16, 2), (256, 8, 1)])
def test_split_with_empty_chunks_over_a_nan_workspace(d, hq, hkv):
    """Split-K chunks without tiles (sequences shorter than the chunk count,
    or empty) publish empty states; the merge reads every state's
    accumulators, so a caller's workspace full of NaN bytes (or inf left by
    an earlier call) must not reach the output. 33 chunks per unit also
    makes the merge's lanes split the states of small groups."""
    rng = np.random.default_rng(d + hq)
    lens = [0, 1, 70, 33 * 64 + 5]
    q, k, v, lens, _ = make_inputs(rng, len(lens), hq, hkv, d, np.float16, lens, "dense")
    qd, kd, vd, ld = to_gpu(q), to_gpu(k), to_gpu(v), cp.asarray(np.array(lens, np.int32))
    units = len(lens) * hkv
    out = _nan_like(q.shape, q.dtype)
    probe = cupy_lean.plan(qd, kd, vd, kv_lens=ld, out=out, schedule="split", num_ctas=33 * units)
    assert probe.num_splits == 33
    ws = cp.full(probe.workspace_bytes, 0xFF, dtype=cp.uint8)  # every float a NaN
    p = cupy_lean.plan(qd, kd, vd, kv_lens=ld, out=out, schedule="split", num_ctas=33 * units, workspace=ws)
    lse = cp.full((len(lens), hq), cp.nan, dtype=cp.float32)
    p.run(qd, kd, vd, kv_lens=ld, out=out, lse=lse)
    assert not bool(cp.isnan(out).any()) and not bool(cp.isnan(lse).any())
    check_close(out, lse, q, k, v, lens, None, np.float16)


@pytest.mark.parametrize("q_len", [0, 2])
def test_split_combine_over_row_blocks_with_a_short_last_block(q_len):
    """The combine spreads a unit's rows over CTAs when one CTA would merge
    them in several load rounds: 11 rows per unit (22 with two query
    tokens) over blocks of 2 or 3 rows whose last is short (132 SMs). Every
    element of out and lse (NaN-prefilled) is written and equals the
    reference."""
    from cupy_lean.schedule import combine_row_blocks

    rng = np.random.default_rng(41 + q_len)
    lens, hq, hkv, d, ns = [5000, 3001, 7], 55, 5, 128, 40
    q3, k, v, L, _ = make_inputs(rng, len(lens), hq, hkv, d, np.float16, lens, "dense")
    q = q3 if not q_len else rng.standard_normal((len(lens), q_len, hq, d)).astype(np.float16)
    units, rows = len(lens) * hkv, (hq // hkv) * max(q_len, 1)
    args = (to_gpu(q), to_gpu(k), to_gpu(v))
    out = _nan_like(q.shape, q.dtype)
    lse = cp.full(q.shape[:-1], cp.nan, dtype=cp.float32)
    p = cupy_lean.plan(*args, kv_lens=cp.asarray(L), out=out, schedule="split", num_ctas=ns * units)
    assert p.num_splits == ns
    assert p.combine_blocks == combine_row_blocks(units, rows, p.num_sms, ns, d, p.threads)
    if p.num_sms >= 100:
        per = -(-rows // p.combine_blocks)
        assert p.combine_blocks > 1 and rows % per != 0  # a short last block
        assert "CTAs per unit (its rows split over them)" in p.describe()
    p.run(*args, kv_lens=cp.asarray(L), out=out, lse=lse)
    _assert_out_lse(out, lse, *reference.attention(q, k, v, kv_lens=L))


def _model_variant(p):
    """The decomposition schedule.uniform_variant gives plan ``p``'s shape on
    its device's grid (what an equal-length lean plan must run)."""
    from cupy_lean import kernels as K
    from cupy_lean.schedule import uniform_variant

    kern = p.kernels
    grid = kern.ctas_per_sm * kern.num_sms
    return uniform_variant(p.units, p.max_unit_tiles, grid, kern.num_sms,
                           tile_us=p.tile_us, state_bytes=4 * p.slot_stride,
                           **K.uniform_model_args(p.meta.head_dim, kern.num_sms, kern.hbm_bytes_per_us),
                           unit_rows=p.meta.group,
                           head_dim=p.meta.head_dim, threads=p.threads)


@pytest.mark.parametrize("b, hq, hkv, d, n, split", [(55, 12, 2, 128, 870, True), (11, 26, 2, 64, 2497, True),
                                                     (4, 9, 3, 128, 841, True), (12, 80, 10, 64, 700, None)])
def test_dense_default_takes_the_uniform_variant(b, hq, hkv, d, n, split, monkeypatch):
    """Dense calls (no kv_lens: every sequence has the same length): the lean
    plan runs the split-K variant schedule.uniform_variant picks for the
    device's grid, says so in describe(), and gives the result of stream-K
    (forced by a knob) up to rounding; NaN-prefilled outputs, graph replay."""
    from cupy_lean import kernels as K

    rng = np.random.default_rng(b * n)
    q, k, v, lens, _ = make_inputs(rng, b, hq, hkv, d, np.float16, [n] * b, "dense")
    qd, kd, vd = to_gpu(q), to_gpu(k), to_gpu(v)
    out = _nan_like(q.shape, q.dtype)
    p = cupy_lean.plan(qd, kd, vd, out=out)
    kern = p.kernels
    assert 0 < p.tile_us < 1 and kern.hbm_bytes_per_us > 1e5
    if kern.num_sms > b * hkv:  # fewer units than SMs: the default tile and the model
        assert not p.many_units, p.describe()
    want = _model_variant(p)
    assert p.uniform_variant == want
    if split and kern.num_sms >= 100:  # these take a split-K variant on an H100 or H200 (model and measured)
        assert want > 0
    if want:
        assert p.grid == p.units * want and p.num_splits == want and "split-K variant" in p.describe()
    lse = cp.empty(q.shape[:2], dtype=cp.float32)
    graph_out = _nan_like(q.shape, q.dtype)
    g = _capture(lambda: p.run(qd, kd, vd, out=graph_out, lse=lse, return_lse=True))
    graph_out.fill(cp.nan)  # what the replay alone writes
    lse.fill(cp.nan)
    cp.cuda.Device().synchronize()
    g.launch(cp.cuda.get_current_stream())
    cp.cuda.Device().synchronize()
    ro, rl = reference.attention(q, k, v)
    _assert_out_lse(graph_out, lse, ro, rl)
    monkeypatch.setitem(K.TUNING, "uniform_variants", False)
    sk = cupy_lean.plan(qd, kd, vd, out=out)
    assert sk.uniform_variant == 0 and sk.decomposition == K.Decomposition.STREAM_K
    out2 = _nan_like(q.shape, q.dtype)
    lse2 = cp.full(q.shape[:2], cp.nan, dtype=cp.float32)
    sk.run(qd, kd, vd, out=out2, lse=lse2, return_lse=True)
    _assert_out_lse(out2, lse2, ro, rl)
    assert float(cp.abs(out2.astype(cp.float32) - graph_out.astype(cp.float32)).max()) < 2e-3


def _plan_runs_its_model_variant(qd, kd, vd, q, ro, rl, label):
    """A dense plan made under the current TUNING runs the variant
    schedule.uniform_variant gives it and matches the reference (out
    NaN-prefilled, ``ro`` / ``rl`` the reference's out and lse)."""
    out = _nan_like(q.shape, q.dtype)
    p = cupy_lean.plan(qd, kd, vd, out=out)
    assert p.uniform_variant == _model_variant(p), (label, p.describe())
    lse = cp.full(q.shape[:2], cp.nan, dtype=cp.float32)
    p.run(qd, kd, vd, out=out, lse=lse, return_lse=True)
    _assert_out_lse(out, lse, ro, rl)
    return p


def test_uniform_saturation_is_read_when_a_plan_is_made():
    """kernels.TUNING["uniform_saturation"] sets the equal-length model's
    saturating fraction for plans made under it: 47 sequences of one KV head
    (head_dim 64, 41 tiles of 128 tokens) split in two chunks (94 CTAs) on
    a 132-SM GPU at 0.7, stream-K at 1.0 (94 CTAs then stream at 94/132 of
    the bandwidth); each plan runs what schedule.uniform_variant says under
    its value, and both give the reference's result (NaN-prefilled out)."""
    from cupy_lean import kernels as K

    rng = np.random.default_rng(4741)
    b, hq, hkv, d, n = 47, 5, 1, 64, 41 * 128 - 91
    q, k, v, lens, _ = make_inputs(rng, b, hq, hkv, d, np.float16, [n] * b, "dense")
    qd, kd, vd = to_gpu(q), to_gpu(k), to_gpu(v)
    ro, rl = reference.attention(q, k, v)
    got = {}
    for sat in (0.7, 1.0):
        with K.tuning(uniform_model="saturation", uniform_saturation=sat):
            p = _plan_runs_its_model_variant(qd, kd, vd, q, ro, rl, sat)
            got[sat] = p.uniform_variant
    if p.kernels.num_sms == 132 and p.kernels.ctas_per_sm == 1 and not p.many_units:
        assert got == {0.7: 2, 1.0: 0}, got
    with pytest.raises(ValueError, match=r'TUNING\["uniform_saturation"\] must be a number in \(0, 1\]'):
        with K.tuning(uniform_model="saturation", uniform_saturation=1.5):  # refused where it is set
            cupy_lean.plan(qd, kd, vd, out=_nan_like(q.shape, q.dtype))


def test_uniform_rates_model_is_read_when_a_plan_is_made():
    """The default equal-length model ("rates": measured partial-grid times
    and per-CTA rates) decides the plan's decomposition, and a change of its
    TUNING table applies to plans made after it: a table that prices every
    partial grid (fewer CTAs than SMs) at 2x stream-K's time gives stream-K
    on a grid of one CTA per SM, one that prices them at 1x splits the 47
    d64 sequences. Both match the reference; a bad
    table is refused naming its key."""
    from cupy_lean import kernels as K

    rng = np.random.default_rng(4742)
    b, hq, hkv, d, n = 47, 5, 1, 64, 41 * 128 - 91
    q, k, v, lens, _ = make_inputs(rng, b, hq, hkv, d, np.float16, [n] * b, "dense")
    qd, kd, vd = to_gpu(q), to_gpu(k), to_gpu(v)
    ro, rl = reference.attention(q, k, v)
    assert K.TUNING["uniform_model"] == "rates"
    got = {}
    for name, rel in (("default", None), ("slow", 2.0), ("flat", 1.0)):
        tables = dict(K.TUNING["partial_grid_time"])
        if rel is not None:
            tables[str(d)] = [[0.1, rel], [0.99, rel], [1.0, 1.0]]  # stream-K on every SM stays at 1
        with K.tuning(partial_grid_time=tables, cta_stream_gbs={"64": 1e6, "128": 1e6, "256": 1e6} if rel else
                      K.TUNING["cta_stream_gbs"]):
            p = _plan_runs_its_model_variant(qd, kd, vd, q, ro, rl, name)
            got[name] = p.uniform_variant
    assert got["flat"] > 0, got
    if p.kernels.ctas_per_sm == 1:  # (with two CTAs per SM a split of 5 fills every SM: rel 1 there)
        assert got["slow"] == 0, got
    with K.tuning(partial_grid_time={"64": [[0.5, 1.0], [0.4, 1.0]]}):
        with pytest.raises(ValueError, match=r'TUNING\["partial_grid_time"\] must map head_dim 64'):
            cupy_lean.plan(qd, kd, vd, out=_nan_like(q.shape, q.dtype))


@pytest.mark.parametrize("layout, hq, hkv, d, cap, page", [("dense", 28, 7, 128, 5382, 16),
                                                        ("paged", 15, 1, 256, 6751, 16),
                                                        ("paged", 21, 3, 64, 2049, 1),
                                                        ("paged", 55, 5, 64, 3001, 64)])
def test_one_sequence_takes_the_equal_length_variant(layout, hq, hkv, d, cap, page, monkeypatch):
    """A batch of one sequence (kv_lens on the GPU; dense or paged): every
    unit has the same length, so the lean plan runs the variant
    schedule.uniform_variant picks from the capacity, as for a dense call,
    and describe() says why. Two graphs captured one after another (the
    variant and stream-K forced by a knob) are replayed, NaN-prefilled, with
    lengths other than the capture's (0, 1, shorter than a chunk, odd, the
    capacity): each replay equals the reference and the two agree up to
    rounding."""
    from cupy_lean import kernels as K

    rng = np.random.default_rng(cap + d + page)
    q, k, v, lens, table = make_inputs(rng, 1, hq, hkv, d, np.float16, [cap], layout, page_size=page)
    qd, kd, vd, td = to_gpu(q), to_gpu(k), to_gpu(v), to_gpu(table)
    ld = cp.asarray(lens)
    template = _nan_like(q.shape, q.dtype)  # the plans are made for an out of this layout
    p = cupy_lean.plan(qd, kd, vd, kv_lens=ld, block_table=td, out=template)
    want = _model_variant(p)
    assert p.equal_lengths and p.uniform_variant == want and not p.many_units
    name = cp.cuda.runtime.getDeviceProperties(p.device)["name"].decode()
    if "H100" in name or "H200" in name:  # a split-K variant there (model and measured)
        assert want > 1
    if want > 1:
        assert p.grid == p.units * want and "one sequence: the lean plan's split-K" in p.describe()
    monkeypatch.setitem(K.TUNING, "uniform_variants", False)
    sk = cupy_lean.plan(qd, kd, vd, kv_lens=ld, block_table=td, out=template)
    assert sk.uniform_variant == 0 and sk.decomposition == K.Decomposition.STREAM_K
    runs = _capture_plans((p, sk), q, qd, kd, vd, kv_lens=ld, block_table=td)
    tile = p.tile
    for n in (0, 1, tile - 1, 3 * tile + 5, cap):
        ld[...] = n
        _replay_nan_prefilled(runs)
        ro, rl = reference.attention(q, k, v, kv_lens=np.array([n], np.int32), block_table=table)
        for _, out, lse in runs:
            if n:
                _assert_out_lse(out, lse, ro, rl)
            else:  # an empty sequence: zero output, lse -inf
                assert not bool(cp.any(out != 0)) and bool(cp.all(cp.isneginf(lse)))
        assert float(cp.abs(runs[0][1].astype(cp.float32) - runs[1][1].astype(cp.float32)).max()) < 2e-3


def test_one_sequence_with_features_two_graphs_into_strided_slices():
    """What a serving user does with one long sequence: page size 1, sinks,
    a sliding window, soft-capping and a custom scale through attention(),
    two graphs captured one after another writing into the two halves of
    one NaN-filled array (strided outs), replayed after the length changes:
    each half equals an eager call bitwise and the reference; the plan runs
    the one-sequence variant (on an H100/H200)."""
    rng = np.random.default_rng(97)
    hq, hkv, d, n = 24, 4, 128, 7001
    q, k, v, L, table = make_inputs(rng, 1, hq, hkv, d, np.float16, [n], "paged", page_size=1)
    sinks = cp.asarray(rng.standard_normal(hq).astype(np.float32))
    qd, kd, vd, td, ld = to_gpu(q), to_gpu(k), to_gpu(v), to_gpu(table), cp.asarray(L)
    kw = dict(kv_lens=ld, block_table=td, sinks=sinks, window_left=3000, softcap=20.0, scale=0.05)
    big = _nan_like((1, hq, 2 * d), q.dtype)
    halves = [big[:, :, :d], big[:, :, d:]]
    p = cupy_lean.plan(qd, kd, vd, out=halves[0], **kw)
    name = cp.cuda.runtime.getDeviceProperties(p.device)["name"].decode()
    if "H100" in name or "H200" in name:
        assert p.uniform_variant > 1 and "one sequence" in p.describe(), p.describe()
    graphs = [_capture(lambda o=o: cupy_lean.attention(qd, kd, vd, out=o, **kw)) for o in halves]
    for new in (5003, 1, 2999, 0):
        ld[...] = new
        big.fill(cp.nan)
        cp.cuda.Device().synchronize()  # the writes above are on the default stream (see _capture)
        s = cp.cuda.Stream(non_blocking=True)
        for g in graphs:
            g.launch(s)
        s.synchronize()
        eager = cupy_lean.attention(qd, kd, vd, **kw)
        ro, _ = reference.attention(q, k, v, kv_lens=np.array([new], np.int32), block_table=table,
                                    sinks=cp.asnumpy(sinks), window_left=3000, softcap=20.0, scale=0.05)
        for h in halves:
            _assert_bitwise(h, eager)
            assert np.abs(cp.asnumpy(h).astype(np.float64) - ro).max() < 4e-3


def _many_unit_rule(d, group, units, n, one_cta_per_unit=True):
    """What kernels.many_unit_config gives a dense bf16 call of equal lengths
    on this device, asked with the occupancy of each tile it considers (not
    of the plan's choice)."""
    from cupy_lean import kernels as K

    def occupancy(tile):
        return K.kernels_for(K.make_spec("bf16", d, group, False, tile, smem_limit=K.device_smem_limit())).occupancy

    return K.many_unit_config(d, group, units, n, K.device_sm_count(), False, True, 0, occupancy,
                              one_cta_per_unit=one_cta_per_unit)


def _cupy_stream(torch_stream):
    """The CuPy stream of a torch stream, as the README shows: from_external
    (CuPy 14, a torch stream with ``__cuda_stream__``) or ExternalStream."""
    if hasattr(cp.cuda.Stream, "from_external") and hasattr(torch_stream, "__cuda_stream__"):
        return cp.cuda.Stream.from_external(torch_stream)
    return cp.cuda.ExternalStream(torch_stream.cuda_stream)


def _replay_two_graphs_into_slices(torch, p, tensors, host, scale, bigs, cols, run_kw=None, ref_kw=None):
    """Capture ``p.run`` into ``big[:, :, cols]`` of each of two tensors (two
    CUDA graphs, one after the other), NaN-fill the tensors, replay both:
    each slice equals the reference (float32 of the ``host`` q, k, v, this
    ``scale``; ``ref_kw``: its kv_lens and block_table) and the rest of each
    tensor is never written. ``run_kw``: more arguments of ``p.run``."""
    tq, tk, tv = tensors
    torch.cuda.synchronize()
    gs = [_capture(lambda o=t[:, :, cols]: p.run(tq, tk, tv, out=o, **(run_kw or {}))) for t in bigs]
    for t in bigs:
        t.fill_(float("nan"))
    torch.cuda.synchronize()
    for g in gs:
        g.launch(cp.cuda.get_current_stream())
    cp.cuda.Device().synchronize()
    ro, _ = reference.attention(*(x.astype(np.float32) for x in host), scale=scale, **(ref_kw or {}))
    for t in bigs:
        got = t.float().cpu().numpy()
        rest = np.ones(got.shape[-1], bool)
        rest[cols] = False
        assert np.isnan(got[:, :, rest]).all()
        assert np.isfinite(got[:, :, cols]).all() and np.abs(got[:, :, cols] - ro).max() < 2e-2


def test_dense_variant_from_torch_bf16_strided_out_two_graphs():
    """What a serving user does with a dense cache: PyTorch bf16 tensors,
    ``out`` a strided slice of a larger tensor, a custom scale, and two CUDA
    graphs captured one after another on the same plan (the dense default
    takes the split-K variant here: 4 units of 122 tiles). Both replays
    write every row of their own ``out`` (NaN-prefilled) and nothing else."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(77)
    q, k, v, lens, _ = make_inputs(rng, 2, 14, 2, 64, BF16, [15587, 15587], "dense")
    tq, tk, tv = (torch.from_numpy(x.view(np.int16)).cuda().view(torch.bfloat16) for x in (q, k, v))
    scale = 0.07
    bigs = [torch.full((2, 14, 2 * 64), float("nan"), dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    outs = [t[:, :, 64:] for t in bigs]  # strided: row stride 128 elements
    p = cupy_lean.plan(tq, tk, tv, out=outs[0], scale=scale)
    if p.kernels.num_sms >= 100:
        assert p.uniform_variant > 1
    _replay_two_graphs_into_slices(torch, p, (tq, tk, tv), (q, k, v), scale, bigs, slice(64, None))


def test_torch_graph_capture_on_torch_stream_two_graphs():
    """A PyTorch user capturing with torch.cuda.graph: the kernels on torch's
    capture stream through cupy.cuda.Stream.from_external (as the README says),
    torch tensors in and out, ragged lengths on the GPU, two graphs one after
    the other on one plan; the inputs rewritten by torch before the replays.
    Torch's current stream is the capturing one, so the DLPack exchange keeps
    its synchronisation (an edge inside the graph). Every row of each
    NaN-prefilled out is written and equals the reference."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(78)
    lens = [3001, 17, 0, 999]
    q, k, v, L, _ = make_inputs(rng, len(lens), 21, 3, 128, np.float16, lens, "dense")
    tq, tk, tv = (torch.from_numpy(x).cuda() for x in (q, k, v))
    tl = torch.from_numpy(np.asarray(L, np.int32)).cuda()
    outs = [torch.full(q.shape, float("nan"), dtype=torch.float16, device="cuda") for _ in range(2)]
    p = cupy_lean.plan(tq, tk, tv, kv_lens=tl, out=outs[0])
    side = torch.cuda.Stream()
    with torch.cuda.stream(side), _cupy_stream(side):
        p.run(tq, tk, tv, kv_lens=tl, out=outs[0])  # eager once on the stream (workspaces made outside a capture)
    torch.cuda.synchronize()
    graphs = []
    for o in outs:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            with _cupy_stream(torch.cuda.current_stream()):
                p.run(tq, tk, tv, kv_lens=tl, out=o)
        graphs.append(g)
    q2 = rng.standard_normal(q.shape).astype(np.float16)
    tq.copy_(torch.from_numpy(q2).cuda())
    for o in outs:
        o.fill_(float("nan"))
    for g in graphs:
        g.replay()
    torch.cuda.synchronize()
    ro, _ = reference.attention(q2, k, v, kv_lens=L)
    for o in outs:
        got = o.float().cpu().numpy()
        assert np.isfinite(got).all() and np.abs(got - ro).max() < 4e-3


@pytest.mark.parametrize("units_per_sm", [1.5, 3.2])
def test_many_units_from_torch_bf16_strided_out_two_graphs(units_per_sm):
    """The many-units configuration (head_dim 64, one CTA per unit at tile 64
    or 32 by the units per SM) as a serving user drives it: PyTorch bf16
    tensors, ``out`` a strided slice of a larger tensor, a custom scale, and
    two CUDA graphs captured one after another on the same plan. Both
    replays write every row of their own ``out`` (NaN-prefilled) and
    nothing else."""
    torch = pytest.importorskip("torch")
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    hq, hkv, d, n = 20, 4, 64, 1237
    B = int(units_per_sm * sms) // hkv
    rng = np.random.default_rng(79)
    q, k, v, lens, _ = make_inputs(rng, B, hq, hkv, d, BF16, [n] * B, "dense")
    tq, tk, tv = (torch.from_numpy(x.view(np.int16)).cuda().view(torch.bfloat16) for x in (q, k, v))
    scale = 0.11
    bigs = [torch.full((B, hq, 2 * d), float("nan"), dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    outs = [t[:, :, :d] for t in bigs]  # strided: row stride 2 x head_dim
    p = cupy_lean.plan(tq, tk, tv, out=outs[0], scale=scale)

    want = _many_unit_rule(d, hq // hkv, B * hkv, n)
    assert p.many_units == (want is not None), p.describe()
    if want is not None:
        assert (p.spec.tile, p.one_cta_per_unit) == want, p.describe()
        assert p.grid == p.units == B * hkv, p.describe()
    if sms >= 100:  # an H100 or H200 (three CTAs per SM at tile 64, five at tile 32)
        assert want == ((64, True) if units_per_sm < 2 else (32, True))
    _replay_two_graphs_into_slices(torch, p, (tq, tk, tv), (q, k, v), scale, bigs, slice(0, d))


@pytest.mark.parametrize("d,hq,hkv,n,waves,knob", [
    (64, 128, 8, 559, 1, None), (64, 36, 3, 3001, 1, None), (64, 32, 8, 701, 3, None),
    (64, 16, 8, 559, 6, None), (64, 16, 8, 1093, 6, None), (64, 32, 8, 559, 3, {"ctas_per_sm": 2}),
    (128, 24, 3, 389, 1, None), (128, 16, 16, 641, 1, None)])
def test_many_units_take_their_config(d, hq, hkv, n, waves, knob):
    """A dense batch of equal lengths with more units than SMs (``waves``
    times the SMs, about) gets the configuration of many units
    (kernels.many_unit_config, asked with the device's occupancy): at
    head_dim 64 one CTA per unit at tile 64 or 32 by the units per SM,
    falling through to the short-unit rule (or the default) when one wave
    cannot hold the units or a stream-K option is given; at head_dim 128
    32-token tiles up to short_unit_tokens. bf16 from NumPy, NaN-prefilled
    out and lse against the reference, and the same bits from a graph
    replay."""
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    B = -(-waves * sms // hkv) + 3
    rng = np.random.default_rng(d + n + waves)
    q, k, v, lens, _ = make_inputs(rng, B, hq, hkv, d, BF16, [n] * B, "dense")
    out = _nan_like(q.shape, BF16)
    lse = cp.full(q.shape[:2], cp.nan, dtype=cp.float32)
    qg, kg, vg = to_gpu(q), to_gpu(k), to_gpu(v)
    p = cupy_lean.plan(qg, kg, vg, out=out, **(knob or {}))

    want = _many_unit_rule(d, hq // hkv, B * hkv, n, one_cta_per_unit=knob is None)
    assert p.many_units == (want is not None), p.describe()
    if want is not None:
        assert (p.spec.tile, p.one_cta_per_unit) == want, p.describe()
    assert ("many_unit_config" in p.describe()) == p.many_units
    if p.one_cta_per_unit:
        assert p.uniform_variant == 1 and p.grid == p.units == B * hkv, p.describe()
    if sms >= 100:  # an H100 or H200: what the rule gives there (five tile-32, three tile-64 CTAs per SM)
        exp = {(64, 1): (64, True), (64, 3): (32, True), (128, 1): (32, False) if n <= 640 else None}
        exp[(64, 6)] = (32, False) if n <= 640 else None
        assert want == ((32, False) if knob else exp[(d, waves)]), (want, p.describe())
    p.run(qg, kg, vg, out=out, lse=lse)
    check_close(out, lse, q, k, v, np.asarray(lens), None, BF16)
    first = cp.asnumpy(out).copy()
    out.fill(cp.nan)
    s = cp.cuda.Stream(non_blocking=True)
    cp.cuda.Device().synchronize()
    with s:
        s.begin_capture()
        try:
            p.run(qg, kg, vg, out=out, lse=lse)
        finally:
            g = s.end_capture()
        g.launch()
    s.synchronize()
    assert np.array_equal(cp.asnumpy(out).view(np.uint16), first.view(np.uint16))


@pytest.mark.parametrize("layout, page, feats, hkv", [("dense", 16, False, 2), ("paged", 16, True, 1),
                                                      ("paged", 1, False, 1)])
def test_few_units_merged_by_a_combine_launch(layout, page, feats, hkv, monkeypatch):
    """A ragged batch of few units for the grid (3 sequences, 1 KV head, lengths
    on the GPU): the lean plan keeps stream-K and merges the partial units by
    a combine launch (kernels.TUNING["merge_launch_pieces"]). Two graphs
    captured one after another (that plan, and the in-kernel merge forced by
    the knob) are replayed, NaN-prefilled, with lengths that make a unit
    whole in one CTA, empty, or cut into many pieces, changed between
    replays (a unit's record from the previous replay must not be reused):
    each replay equals the reference, with sinks, a window and soft-capping
    in one case, 2 KV heads in another. A stream-K knob (num_ctas) keeps the
    in-kernel merge."""
    from cupy_lean import kernels as K

    rng = np.random.default_rng(31 + page)
    hq, d, lens0 = 36, 128, [9001, 6007, 4000]
    q, k, v, lens, table = make_inputs(rng, 3, hq, hkv, d, np.float16, lens0, layout, page_size=page)
    qd, kd, vd, td = to_gpu(q), to_gpu(k), to_gpu(v), to_gpu(table)
    ld = cp.asarray(lens)
    kw, plan_kw, ref_kw = dict(kv_lens=ld, block_table=td), {}, {}
    if feats:
        sinks = rng.standard_normal(hq).astype(np.float32)
        kw["sinks"] = cp.asarray(sinks)
        plan_kw = dict(window_left=2500, softcap=15.0)
        ref_kw = dict(sinks=sinks, **plan_kw)
    template = _nan_like(q.shape, q.dtype)
    p = cupy_lean.plan(qd, kd, vd, out=template, **kw, **plan_kw)
    assert p.decomposition == K.Decomposition.STREAM_K and p.grid >= K.TUNING["merge_launch_pieces"] * p.units
    assert p.merge_launch and "merged by a combine launch" in p.describe(), p.describe()
    assert not cupy_lean.plan(qd, kd, vd, out=template, num_ctas=p.grid, **kw, **plan_kw).merge_launch
    monkeypatch.setitem(K.TUNING, "merge_launch_pieces", 0)
    inkernel = cupy_lean.plan(qd, kd, vd, out=template, **kw, **plan_kw)
    assert not inkernel.merge_launch and "by their last contributor" in inkernel.describe()
    runs = _capture_plans((p, inkernel), q, qd, kd, vd, **kw)
    for new in ([1, 6007, 0], [9001, 0, 3999], [17, 5000, 4000], [0, 0, 0], [9001, 6007, 4000]):
        ld[...] = cp.asarray(new, dtype=cp.int32)
        _replay_nan_prefilled(runs)
        ro, rl = reference.attention(q, k, v, kv_lens=np.array(new, np.int32), block_table=table, **ref_kw)
        for _, out, lse in runs:
            if np.isfinite(rl).any():
                _assert_out_lse(out, lse, ro, rl)
            else:  # every sequence empty, no sinks: zero output, lse -inf
                assert not bool(cp.any(out != 0)) and bool(cp.all(cp.isneginf(lse)))


def test_few_units_merge_launch_with_query_tokens_and_a_dirty_workspace():
    """The merge launch with 3 query tokens per sequence (ragged q_lens) from a
    plan given a caller's workspace filled with 0xFF bytes (the unit records
    and slots are written before they are read): the reference's rows
    (padding tokens zeros and lse -inf), then a graph replayed with new
    lengths and q_lens."""
    rng = np.random.default_rng(211)
    lens = [7000, 2, 0, 3100]
    hq, hkv, d = 12, 2, 128
    _, k, v, L, table = make_inputs(rng, len(lens), hq, hkv, d, np.float16, lens, "paged", page_size=16)
    q = rng.standard_normal((len(lens), 3, hq, d)).astype(np.float16)
    args = (to_gpu(q), to_gpu(k), to_gpu(v))
    ld, qn = cp.asarray(L), cp.asarray(np.array([3, 1, 2, 3], np.int32))
    kw = dict(kv_lens=ld, block_table=to_gpu(table))
    out = _nan_like(q.shape, q.dtype)
    lse = cp.full(q.shape[:3], cp.nan, dtype=cp.float32)
    need = cupy_lean.plan(*args, **kw, out=out).workspace_bytes
    ws = cp.full(need, 0xFF, dtype=cp.uint8)
    p = cupy_lean.plan(*args, **kw, out=out, workspace=ws)
    assert p.merge_launch and p.meta_bytes == 8 * p.units, p.describe()
    p.run(*args, **kw, out=out, lse=lse, q_lens=qn)
    _assert_out_lse(out, lse, *reference.attention(q, k, v, kv_lens=L, block_table=table, q_lens=cp.asnumpy(qn)))
    graph = _capture(lambda: p.run(*args, **kw, out=out, lse=lse, q_lens=qn))
    new_l, new_q = np.array([3, 2, 0, 3099], np.int32), np.array([1, 2, 3, 2], np.int32)  # within each table
    ld[...], qn[...] = cp.asarray(new_l), cp.asarray(new_q)
    _replay_nan_prefilled([(graph, out, lse)])
    _assert_out_lse(out, lse, *reference.attention(q, k, v, kv_lens=new_l, block_table=table, q_lens=new_q))


@pytest.mark.parametrize("in_kernel", [False, True])
def test_runtime_split_flips_between_replays(monkeypatch, in_kernel):
    """With the merge launch (or, ``in_kernel``, without it and with
    TUNING["runtime_split_in_kernel"]: the chunks merged by each unit's last
    arriving chunk, 44 of them through the merge tree), each launch runs
    split-K in one wave or stream-K as its lengths on the GPU decide
    (schedule.runtime_split_chunks). Two graphs captured one after another
    (the runtime choice, and stream-K alone) replayed, NaN-prefilled, over
    lengths on both sides of the rule (skewed: stream-K; even: split), an
    empty batch and sinks: each equals the reference, and the two agree."""
    from cupy_lean import kernels as K
    from cupy_lean.schedule import runtime_split_chunks, runtime_split_slack

    rng = np.random.default_rng(41)
    hq, hkv, d, lens0 = 24, 1, 128, [30001, 30001, 30001]
    q, k, v, lens, table = make_inputs(rng, 3, hq, hkv, d, np.float16, lens0, "paged", page_size=16)
    sinks = rng.standard_normal(hq).astype(np.float32)
    qd, kd, vd, td, ld = to_gpu(q), to_gpu(k), to_gpu(v), to_gpu(table), cp.asarray(lens)
    kw = dict(kv_lens=ld, block_table=td, sinks=cp.asarray(sinks))
    template = _nan_like(q.shape, q.dtype)
    # a slack of 192 KB (24 tiles of 16 tokens at head_dim 128): the rule's parameter, not only its default
    monkeypatch.setitem(K.TUNING, "runtime_split_slack_bytes", 192 * 1024)
    if in_kernel:  # the in-kernel path with the merge launch's factor: the lengths below fall on both sides
        monkeypatch.setitem(K.TUNING, "merge_launch_pieces", 0)
        monkeypatch.setitem(K.TUNING, "runtime_split_in_kernel", True)
        monkeypatch.setitem(K.TUNING, "runtime_split_in_kernel_scale", 1)
    p = cupy_lean.plan(qd, kd, vd, out=template, tile_size=16, **kw)
    assert p.merge_launch != in_kernel and p.runtime_split and "split-K in one wave" in p.describe(), p.describe()
    assert p.split_slack_tiles == runtime_split_slack(16, d, 2, 192 * 1024) == 24 and p.split_scale == 1
    assert p.split_cap_tiles == K.launch_split_cap(p.merge_launch, 16, d, 2)  # the cap its launches get
    assert not in_kernel or p.grid // 3 >= 16  # chunks per unit: the kernel's merge tree (MERGE_TREE_FROM)
    monkeypatch.setitem(K.TUNING, "runtime_split", False)
    sk = cupy_lean.plan(qd, kd, vd, out=template, tile_size=16, **kw)
    assert sk.merge_launch != in_kernel and not sk.runtime_split
    runs = _capture_plans((p, sk), q, qd, kd, vd, **kw)
    sides = set()
    for new in ([30001, 1, 0], [3000, 2990, 3001], [0, 0, 0], [17, 5000, 30001], [4000, 4000, 4000], [1, 1, 1]):
        sides.add(runtime_split_chunks(new, hkv, 16, p.grid, split_slack_tiles=p.split_slack_tiles,
                                       split_scale=p.split_scale,
                                 split_cap_tiles=p.split_cap_tiles) > 0)
        ld[...] = cp.asarray(new, dtype=cp.int32)
        _replay_nan_prefilled(runs)
        ro, rl = reference.attention(q, k, v, kv_lens=np.array(new, np.int32), block_table=table, sinks=sinks)
        for _, out, lse in runs:
            _assert_out_lse(out, lse, ro, rl)
        assert float(cp.abs(runs[0][1].astype(cp.float32) - runs[1][1].astype(cp.float32)).max()) < 2e-3
    assert sides == {True, False}


@pytest.mark.parametrize("case", range(10))
def test_in_kernel_runtime_split_matches_the_reference(monkeypatch, case):
    """TUNING["runtime_split_in_kernel"]: a default plan of varied lengths
    with fewer than merge_launch_pieces CTAs per unit (19-66 units) runs
    split-K in one wave where its lengths favour it, the chunks merged by
    each unit's last arriving chunk. Random ragged and paged batches (every
    head_dim, groups 1-8, fp16 and bf16, page sizes 1/16/64, sinks on some,
    an empty sequence on some). Two of three cases draw lengths of at most
    ns = grid // units tiles, where the rule always takes the split (one
    tile per chunk, 2 or more chunks per unit); the others one long
    sequence among short ones. The plan is made, then the lengths on the
    GPU changed and the call run NaN-prefilled: out and lse equal the
    reference, and the NumPy rule says which decomposition ran."""
    from cupy_lean import kernels as K
    from cupy_lean.schedule import runtime_split_chunks

    monkeypatch.setitem(K.TUNING, "runtime_split_in_kernel", True)
    rng = np.random.default_rng(900 + case)
    d = int(rng.choice([64, 128, 256]))
    g = int(rng.integers(1, 9))
    B = int(rng.integers(3, 7))
    lo = 50 if d == 64 else 19  # units: under 8 CTAs each on head_dim 64's grids of 2-3 CTAs per SM too
    hkv = int(rng.integers(-(-lo // B), 66 // B + 1))
    cap = 901  # 7 tiles of 128 tokens and 5 more: room for any split case below
    layout = "paged" if case % 2 else "dense"
    dtype = BF16 if case % 4 == 1 else np.float16
    q, k, v, lens, table = make_inputs(rng, B, hkv * g, hkv, d, dtype, [cap] * B, layout,
                                       page_size=int(rng.choice([1, 16, 64])))
    sinks = rng.standard_normal(hkv * g).astype(np.float32) if case % 5 == 0 else None
    ld = cp.asarray(lens)
    kw = dict(kv_lens=ld, block_table=None if table is None else cp.asarray(table),
              sinks=None if sinks is None else cp.asarray(sinks))
    qd, kd, vd = to_gpu(q), to_gpu(k), to_gpu(v)
    out = _nan_like(q.shape, q.dtype)
    lse = cp.full(q.shape[:2], cp.nan, dtype=cp.float32)
    p = cupy_lean.plan(qd, kd, vd, out=out, **kw)
    assert p.decomposition == K.Decomposition.STREAM_K and not p.merge_launch and p.runtime_split, p.describe()
    ns = p.grid // p.units
    assert 1 <= ns < K.TUNING["merge_launch_pieces"]
    if case % 3:  # 2..ns tiles per sequence (at least 2: the chunks of a unit are merged)
        top = max(2, min(ns, cap // p.tile)) * p.tile
        new = rng.integers(p.tile + 1, top + 1, B)
        if case % 3 == 2:
            new[int(rng.integers(B))] = 0
    else:
        new = rng.integers(1, 3 * p.tile, B)
        new[int(rng.integers(B))] = cap
    new = new.astype(np.int32)
    ld[...] = cp.asarray(new)
    p.run(qd, kd, vd, out=out, lse=lse, **kw)
    split = runtime_split_chunks(new, hkv, p.tile, p.grid, split_slack_tiles=p.split_slack_tiles,
                                 split_scale=p.split_scale,
                                 split_cap_tiles=p.split_cap_tiles)
    assert (p.split_scale, p.split_slack_tiles) == (K.TUNING["runtime_split_in_kernel_scale"], 0)
    if case % 3:
        assert split == ns, (new, split)  # the split ran (the kernel takes the rule's decision)
    ro, rl = reference.attention(q, k, v, kv_lens=new, block_table=table, sinks=sinks)
    _assert_out_lse(out, lse, ro, rl, out_tol=2e-2 if dtype == BF16 else 4e-3)


@pytest.mark.parametrize("dtype,layout", [(np.float16, "dense"), (BF16, "paged")])
def test_in_kernel_split_by_its_factor_two_graphs(dtype, layout):
    """The in-kernel merge's rule (TUNING["runtime_split_in_kernel_scale"],
    2): 21 sequences, one KV head, head_dim 128. Lengths are chosen from the
    plan's grid so that the split's busiest CTA streams more than stream-K's
    plus one tile but at most twice it (the default takes the split, the
    merge launch's rule would not), and lengths with a longer sequence where
    it streams more than twice (stream-K). A graph of the default plan and
    one of the same plan with the factor 1 are captured one after another
    and replayed NaN-prefilled over both sets: each equals the reference."""
    from cupy_lean import kernels as K
    from cupy_lean.schedule import runtime_split_chunks

    rng = np.random.default_rng(77)
    B, hq, hkv, d, cap = 21, 4, 1, 128, 8192
    q, k, v, lens, table = make_inputs(rng, B, hq, hkv, d, dtype, [cap] * B, layout, page_size=16)
    ld = cp.asarray(lens)
    kw = dict(kv_lens=ld, block_table=None if table is None else cp.asarray(table))
    qd, kd, vd = to_gpu(q), to_gpu(k), to_gpu(v)
    p = cupy_lean.plan(qd, kd, vd, out=_nan_like(q.shape, q.dtype), **kw)
    assert not p.merge_launch and p.runtime_split and (p.split_scale, p.split_slack_tiles) == (2, 0), p.describe()
    assert p.split_cap_tiles == K.launch_split_cap(False, p.tile, d, 2) < 1 << 30, p.describe()
    with K.tuning(runtime_split_in_kernel_scale=1):
        p1 = cupy_lean.plan(qd, kd, vd, out=_nan_like(q.shape, q.dtype), **kw)
    assert (p1.split_scale, p1.split_slack_tiles) == (1, 0) and p1.grid == p.grid

    def decide(new, plan):
        return runtime_split_chunks(new, hkv, plan.tile, plan.grid, split_slack_tiles=plan.split_slack_tiles,
                                    split_scale=plan.split_scale,
                                    split_cap_tiles=plan.split_cap_tiles)

    # Short sequences of 10-24 tiles: stream-K's busiest CTA streams at least
    # two tiles on grids of up to 200 CTAs (head_dim 128 runs one CTA per
    # SM), so twice it is more than it plus one tile (with one tile per CTA
    # the two rules agree and no length tells them apart).
    short = rng.integers(10 * p.tile, 24 * p.tile, B - 1)
    factor_only = far = None
    for long_len in range(p.tile, cap + 1, p.tile // 2):
        new = np.append(short, long_len).astype(np.int32)
        if factor_only is None and decide(new, p) and not decide(new, p1) and \
                runtime_split_chunks(new, hkv, p.tile, p.grid, split_slack_tiles=1) == 0:
            factor_only = new
        if factor_only is not None and not decide(new, p):
            far = new
            break
    assert factor_only is not None and far is not None, (p.grid, p.tile)
    runs = _capture_plans((p, p1), q, qd, kd, vd, **kw)
    for new in (factor_only, far):
        ld[...] = cp.asarray(new)
        _replay_nan_prefilled(runs)
        ro, rl = reference.attention(q, k, v, kv_lens=new, block_table=table)
        for _, out, lse in runs:
            _assert_out_lse(out, lse, ro, rl, out_tol=2e-2 if dtype == BF16 else 4e-3)


# (head_dim, layout, page size, q dtype, K/V, feature) of each split-prefetch case
_PREFETCH_CASES = [(64, "strided", 16, "fp16", "fp16", None), (128, "paged", 16, "bf16", "bf16", None),
                   (256, "dense", 16, "fp16", "fp16", "window"), (64, "dense", 16, "fp16", "e4m3", None),
                   (128, "paged", 64, "fp16", "fp16", "q_len"), (256, "paged", 1, "bf16", "e4m3", None)]


def _prefetch_lengths(rng, B, hkv, tile, grid, cap, window=None):
    """The split-prefetch test's two length sets for a plan of ``grid`` CTAs
    and ``tile``-token tiles: ``split``, every sequence (one empty) of
    ``3 x ns`` tiles (ns = grid // units; fewer where the cache is short),
    so that the split's chunks have up to 3 tiles (the prefetch covers
    ``stages - 1`` of them) and both launch-time rules take the split (with
    a sliding window: sequences longer than it, none empty, each unit
    streaming the window); and ``keep``, one sequence of ``cap`` tokens among short ones
    (stream-K)."""
    ns = grid // (B * hkv)
    n = max(1, min(3 * ns, cap // tile))
    if window is not None:  # the window starts after key 0; no empty sequence (the units stay even)
        split = rng.integers(window + 2, cap + 1, B)
    else:
        split = rng.integers((n - 1) * tile + 1, n * tile + 1, B)
        split[int(rng.integers(B))] = 0
    keep = rng.integers(1, 3 * tile, B)
    keep[int(rng.integers(B))] = cap
    return split.astype(np.int32), keep.astype(np.int32)


@pytest.mark.parametrize("case", range(len(_PREFETCH_CASES)))
def test_split_prefetch_changes_nothing(case):
    """TUNING["split_prefetch"] / ["split_prefetch_paged"]: each CTA
    prefetches into L2 the first tiles the launch-time split would give it.
    Random ragged and paged batches of 20-40 units: every head_dim, dense,
    strided (HND) and paged caches (page sizes 1, 16 and 64), fp16, bf16
    and fp8 e4m3 K/V (dense and paged), a sliding window with soft-cap, 3
    query tokens, an empty sequence. On lengths where the split is taken
    (chunks of up to 3 tiles) and where stream-K is kept, NaN-prefilled out
    and lse of the plans made with the prefetch by lines, off and by bulk
    prefetches are bitwise equal, and equal the reference."""
    from cupy_lean import kernels as K
    from cupy_lean.schedule import runtime_split_chunks

    d, layout, page, qdt, kvdt, feature = _PREFETCH_CASES[case]
    rng = np.random.default_rng(1300 + case)
    B, hkv, g = int(rng.integers(5, 9)), int(rng.integers(4, 6)), int(rng.integers(1, 7))
    dtype = BF16 if qdt == "bf16" else np.float16
    cap = 4096
    q, k, v, lens, table = make_inputs(rng, B, hkv * g, hkv, d, dtype, [cap] * B, layout, page_size=page)
    feats, host = {}, {}
    window = 3000 if feature == "window" else None
    if window is not None:
        feats = host = dict(window_left=window, softcap=20.0)
    if feature == "q_len":  # 3 query tokens per sequence
        q = np.stack([q, q[::-1], q * 0.5], axis=1).astype(q.dtype)
    if kvdt == "e4m3":
        k8, ku8, ks = _fp8_cache(rng, k, "e4m3", True)
        v8, vu8, vs = _fp8_cache(rng, v, "e4m3", False)
        k, v = k8, v8
        kd, vd = cp.asarray(ku8), cp.asarray(vu8)
        feats = dict(kv_dtype="e4m3", k_scale=cp.asarray(ks), v_scale=vs)
        host = dict(k_scale=ks, v_scale=vs)
    else:
        kd, vd = to_gpu(k), to_gpu(v)
    ld = cp.asarray(lens)
    kw = dict(kv_lens=ld, block_table=None if table is None else cp.asarray(table))
    run_kw = {key: val for key, val in feats.items() if key in ("k_scale", "v_scale")}  # run's, not plan's
    plan_kw = {key: val for key, val in feats.items() if key not in run_kw}
    qd = to_gpu(q)
    plans = []
    for on in (1, 0, 2):  # by lines, none, by bulk prefetches
        with K.tuning(split_prefetch=on, split_prefetch_paged=on):
            plans.append(cupy_lean.plan(qd, kd, vd, out=_nan_like(q.shape, q.dtype), **kw, **plan_kw))
    p = plans[0]
    assert p.decomposition == K.Decomposition.STREAM_K and p.runtime_split, p.describe()
    taken = []
    for new in _prefetch_lengths(rng, B, hkv, p.tile, p.grid, cap, window):
        ld[...] = cp.asarray(new)
        got = []
        for plan in plans:
            out = _nan_like(q.shape, q.dtype)
            lse = cp.full(q.shape[:-1], cp.nan, dtype=cp.float32)
            plan.run(qd, kd, vd, out=out, lse=lse, **kw, **run_kw)
            got.append((out, lse))
        for other in got[1:]:
            _assert_bitwise(got[0][0], other[0])
            _assert_bitwise(got[0][1], other[1])
        ro, rl = reference.attention(q, k, v, kv_lens=new, block_table=table, **host)
        fin = np.isfinite(rl)
        _assert_out_lse(got[0][0], got[0][1], ro, rl,
                        (2e-2 if dtype == BF16 else 4e-3) * max(1.0, np.abs(ro).max()),
                        4e-3 * max(1.0, np.abs(rl[fin]).max()))
        seen = new if window is None else np.minimum(new, window + 1)  # the keys a unit streams
        taken.append(runtime_split_chunks(seen, hkv, p.tile, p.grid, split_slack_tiles=p.split_slack_tiles,
                                          split_scale=p.split_scale,
                                 split_cap_tiles=p.split_cap_tiles))
    assert taken[0] > 0 and taken[1] == 0, (taken, p.describe())  # the rule split the first set only
    key = "split_prefetch_paged" if layout == "paged" else "split_prefetch"
    with pytest.raises(ValueError, match=f'"{key}"\\] must be 0, 1 or 2, got 3'), K.tuning(**{key: 3}):
        cupy_lean.plan(qd, kd, vd, **kw, **plan_kw)  # (refused where it is set)


@pytest.mark.parametrize("sched,tuning,B,hkv", [
    ("lean", {}, 3, 2),  # few units: the merge launch (and split-K in one wave when the lengths favour it)
    ("lean", {"merge_launch_pieces": 0}, 3, 2),  # few units, merged in the kernel by the last contributor
    ("lean", {}, 24, 4),  # many sequences: stream-K merged in the kernel
    ("split", {}, 3, 2),  # split-K and its combine launch
    ("head", {}, 5, 2)])
def test_programmatic_launches_back_to_back(monkeypatch, sched, tuning, B, hkv):
    """On sm_90 and newer a plan launches its kernels with programmatic
    dependent launch: each may be scheduled while the kernel before it runs,
    and waits for it before touching memory. Four calls of one plan back to
    back on one stream (sharing its workspace: counters, partial states,
    unit records), each on other queries and lengths, with a CuPy kernel
    between two of them, eagerly and as one captured graph replayed
    NaN-prefilled: every output and lse equals, bitwise, the same plan
    launched without the attribute and synchronised after each call, and the
    reference."""
    from cupy_lean import kernels as K

    for key, value in tuning.items():
        monkeypatch.setitem(K.TUNING, key, value)
    rng = np.random.default_rng(44)
    hq, d, cap = 8 * hkv, 128, 6000
    q, k, v, _, table = make_inputs(rng, B, hq, hkv, d, np.float16, [cap] * B, "paged", page_size=16)
    qs = [rng.standard_normal(q.shape).astype(np.float16) for _ in range(4)]
    lens = [np.full(B, cap, np.int32), rng.integers(0, cap + 1, B).astype(np.int32),
            np.array([cap] + [1] * (B - 1), np.int32), rng.integers(0, 40, B).astype(np.int32)]
    kd, vd, td = to_gpu(k), to_gpu(v), to_gpu(table)
    qd, ld = [to_gpu(x) for x in qs], [cp.asarray(x) for x in lens]
    template = _nan_like(q.shape, q.dtype)
    p = cupy_lean.plan(qd[0], kd, vd, kv_lens=ld[0], block_table=td, schedule=sched, out=template)
    assert p.pdl == (int(cp.cuda.Device().compute_capability) >= 90), p.describe()
    monkeypatch.setitem(K.TUNING, "pdl", False)
    plain = cupy_lean.plan(qd[0], kd, vd, kv_lens=ld[0], block_table=td, schedule=sched, out=template)
    assert not plain.pdl and plain.grid == p.grid
    expect = []
    for i in range(4):
        expect.append(plain.run(qd[i], kd, vd, kv_lens=ld[i], block_table=td, out=_nan_like(q.shape, q.dtype),
                                return_lse=True))
        cp.cuda.Device().synchronize()
    outs = [_nan_like(q.shape, q.dtype) for _ in range(4)]
    lses = [cp.full(q.shape[:2], cp.nan, dtype=cp.float32) for _ in range(4)]
    between = cp.zeros(1 << 20, dtype=cp.float32)

    def calls():
        for i in range(4):
            p.run(qd[i], kd, vd, kv_lens=ld[i], block_table=td, out=outs[i], lse=lses[i])
            if i == 1:
                cp.add(between, 1.0, out=between)  # a plain CuPy kernel between two programmatic launches

    g = _capture(calls)  # one eager pass, then the capture
    for i in range(4):
        _assert_bitwise(outs[i], expect[i][0])
        _assert_bitwise(lses[i], expect[i][1])
    for o, l in zip(outs, lses):
        o.fill(cp.nan)
        l.fill(cp.nan)
    _replay_nan_prefilled([(g, outs[0], lses[0])])  # the graph once, all outputs NaN-filled
    for i in range(4):
        _assert_bitwise(outs[i], expect[i][0])
        _assert_bitwise(lses[i], expect[i][1])
        ro, rl = reference.attention(qs[i], k, v, kv_lens=lens[i], block_table=table)
        _assert_out_lse(outs[i], lses[i], ro, rl)


def test_programmatic_launch_refused_falls_back_to_plain_launches():
    """Where the driver refuses the programmatic launch outside a capture, the
    call warns once, launches plainly (same bits) and the plan stays plain;
    inside a capture the error is raised (the capture is spoilt: no retry)."""
    rng = np.random.default_rng(45)
    q, k, v, lens, table = make_inputs(rng, 3, 16, 2, 128, np.float16, [5000, 17, 2000], "paged")
    qd, kd, vd, td, ld = to_gpu(q), to_gpu(k), to_gpu(v), to_gpu(table), cp.asarray(lens)
    template = _nan_like(q.shape, q.dtype)
    expect = cupy_lean.plan(qd, kd, vd, kv_lens=ld, block_table=td, out=template).run(
        qd, kd, vd, kv_lens=ld, block_table=td, out=_nan_like(q.shape, q.dtype))
    calls = []

    def refused(*args):
        calls.append(args)
        raise RuntimeError("refused by a test")

    def fresh_plan():
        from cupy_lean import _cache

        _cache.clear()
        p = cupy_lean.plan(qd, kd, vd, kv_lens=ld, block_table=td, out=template)
        if not p.pdl:
            pytest.skip("no programmatic dependent launch on this device")
        p._attn_launch = refused
        return p

    p = fresh_plan()
    with pytest.warns(RuntimeWarning, match="refused by a test"):
        out = p.run(qd, kd, vd, kv_lens=ld, block_table=td, out=_nan_like(q.shape, q.dtype))
    _assert_bitwise(out, expect)
    assert not p.pdl and p._attn_launch is None and len(calls) == 1
    out = p.run(qd, kd, vd, kv_lens=ld, block_table=td, out=_nan_like(q.shape, q.dtype))  # plain, no warning
    _assert_bitwise(out, expect)
    p = fresh_plan()
    out = _nan_like(q.shape, q.dtype)
    with _inside_a_capture():
        with pytest.raises(RuntimeError, match="refused by a test"):
            p.run(qd, kd, vd, kv_lens=ld, block_table=td, out=out)
    assert p.pdl and len(calls) == 2  # not dropped inside a capture


def test_torch_kernels_around_programmatic_launches_in_one_graph():
    """A model layer's order on one torch stream, as a serving user captures
    it: a torch kernel writes q (and the new lengths) right before each
    attention call, and a torch kernel reads the output right after; three
    layers in one torch.cuda.graph, bf16, paged, with sinks. With
    programmatic dependent launch (sm_90+) our kernels may be scheduled
    during torch's kernel before them, and must still see its writes; the
    kernel after them must see theirs. Each layer's result, NaN-prefilled,
    equals the reference of its own q and lengths."""
    torch = pytest.importorskip("torch")
    import ml_dtypes

    rng = np.random.default_rng(79)
    B, hq, hkv, d, cap = 4, 16, 2, 128, 4000
    q, k, v, _, table = make_inputs(rng, B, hq, hkv, d, np.float32, [cap] * B, "paged", page_size=16)
    bf = ml_dtypes.bfloat16
    k, v = k.astype(bf), v.astype(bf)
    tk, tv = (torch.from_numpy(x.astype(np.float32)).cuda().to(torch.bfloat16) for x in (k, v))  # exact
    tt = torch.from_numpy(table).cuda()
    sinks = rng.standard_normal(hq).astype(np.float32)
    ts = torch.from_numpy(sinks).cuda()
    layers = 3
    qs = [rng.standard_normal((B, hq, d)).astype(np.float32) for _ in range(layers)]
    lens = [rng.integers(0, cap + 1, B).astype(np.int32) for _ in range(layers)]
    lens[1][0] = 0
    src_q = [torch.from_numpy(x).cuda() for x in qs]  # fp32: the torch kernel before converts
    src_l = [torch.from_numpy(x).cuda() for x in lens]
    tq = torch.empty((B, hq, d), dtype=torch.bfloat16, device="cuda")
    tl = torch.empty(B, dtype=torch.int32, device="cuda")
    out = torch.empty((B, hq, d), dtype=torch.bfloat16, device="cuda")
    results = [torch.full((B, hq, d), float("nan"), dtype=torch.float32, device="cuda") for _ in range(layers)]
    tq.copy_(src_q[0])
    tl.copy_(src_l[0])
    p = cupy_lean.plan(tq, tk, tv, kv_lens=tl, block_table=tt, sinks=ts, out=out)
    if int(cp.cuda.Device().compute_capability) >= 90:
        assert p.pdl, p.describe()

    def model():
        for i in range(layers):
            tq.copy_(src_q[i])  # torch kernels right before the call write its q and lengths
            tl.copy_(src_l[i])
            with _cupy_stream(torch.cuda.current_stream()):
                p.run(tq, tk, tv, kv_lens=tl, block_table=tt, sinks=ts, out=out)
            results[i].copy_(out)  # a torch kernel right after reads its output

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        model()  # eager once (workspaces made outside the capture)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        model()
    for r in results:
        r.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    for i in range(layers):
        qb = qs[i].astype(bf)
        ro, _ = reference.attention(qb, k, v, kv_lens=lens[i], block_table=table, sinks=sinks)
        got = results[i].cpu().numpy()
        assert np.isfinite(got).all() and np.abs(got - ro).max() < 2e-2, i


@pytest.mark.parametrize("layout, page, lens, hq, hkv, dt", [
    ("ragged", 16, [3001, 17, 0, 1290, 64], 12, 3, np.float16),
    ("paged", 16, [700, 2049, 33], 16, 1, BF16),
    ("paged", 1, [129, 5, 1000, 77], 8, 2, np.float16),
    ("paged", 64, [4097, 1], 6, 6, BF16)])
def test_varied_lengths_at_head_dim_64_take_tile_64(layout, page, lens, hq, hkv, dt):
    """Several sequences with kv_lens or pages at head_dim 64 get the tile of
    kernels.varied_length_tile (64 tokens, two CTAs per SM), and describe()
    says so; one sequence, or a tile given, keeps the default. NaN-prefilled
    out and lse against the reference, and a graph replay with new lengths."""
    rng = np.random.default_rng(sum(lens) + hq)
    d = 64
    q, k, v, lens, table = make_inputs(rng, len(lens), hq, hkv, d, dt, lens,
                                       "paged" if layout == "paged" else "dense", page_size=page)
    qg, kg, vg, tg, lg = to_gpu(q), to_gpu(k), to_gpu(v), to_gpu(table), cp.asarray(lens)
    out = _nan_like(q.shape, dt)
    lse = cp.full(q.shape[:2], cp.nan, dtype=cp.float32)
    p = cupy_lean.plan(qg, kg, vg, kv_lens=lg, block_table=tg, out=out)
    assert p.varied_lengths_tile and p.spec.tile == 64 and not p.many_units, p.describe()
    assert "varied_length_tile" in p.describe()
    p.run(qg, kg, vg, kv_lens=lg, block_table=tg, out=out, lse=lse)
    check_close(out, lse, q, k, v, lens, table, dt)
    # a graph of the plan, replayed with other lengths (within what each sequence owns)
    g = _capture(lambda: p.run(qg, kg, vg, kv_lens=lg, block_table=tg, out=out, lse=lse))
    new = _other_lengths(rng, lens, k.shape[1] if table is None else int(lens.max()), page, table)
    lg[...] = cp.asarray(new)
    _replay_nan_prefilled([(g, out, lse)])
    check_close(out, lse, q, k, v, new, table, dt)
    # one sequence, or a tile given: not this rule
    one = cupy_lean.plan(qg[:1], kg if table is not None else kg[:1], vg if table is not None else vg[:1],
                         kv_lens=lg[:1], block_table=None if tg is None else tg[:1], out=out[:1])
    assert not one.varied_lengths_tile, one.describe()
    given = cupy_lean.plan(qg, kg, vg, kv_lens=lg, block_table=tg, out=out, tile_size=128)
    assert not given.varied_lengths_tile and given.spec.tile == 128, given.describe()


def test_varied_length_tile_from_torch_bf16_paged_strided_out_two_graphs():
    """The head_dim 64 tile of varied lengths as a serving user meets it:
    PyTorch bf16 paged cache, kv_lens and block_table as torch int32
    tensors, a custom scale, ``out`` a strided slice of a larger tensor, two
    CUDA graphs captured one after another on the same plan: both write
    every row of their own ``out`` (NaN-prefilled) and nothing else."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(97)
    lens0 = [1537, 3, 0, 700, 2049, 31]
    q, k, v, lens, table = make_inputs(rng, len(lens0), 12, 2, 64, BF16, lens0, "paged", page_size=16)
    tq, tk, tv = (torch.from_numpy(x.view(np.int16)).cuda().view(torch.bfloat16) for x in (q, k, v))
    tl, tt = torch.from_numpy(lens).cuda(), torch.from_numpy(table).cuda()
    scale = 0.09
    bigs = [torch.full((len(lens0), 12, 3 * 64), float("nan"), dtype=torch.bfloat16, device="cuda")
            for _ in range(2)]
    cols = slice(64, 128)
    run_kw = dict(kv_lens=tl, block_table=tt)
    p = cupy_lean.plan(tq, tk, tv, out=bigs[0][:, :, cols], scale=scale, **run_kw)
    assert p.varied_lengths_tile and p.spec.tile == 64, p.describe()
    _replay_two_graphs_into_slices(torch, p, (tq, tk, tv), (q, k, v), scale, bigs, cols, run_kw,
                                   dict(kv_lens=lens, block_table=table))


# ------------------------------------------------- what a captured call leaves behind

@pytest.mark.parametrize("extra", ["int64_lens", "int64_q_lens", "fp8_scales_f64"])
def test_conversions_inside_a_capture_leave_no_freed_memory_written_by_replays(extra):
    """int64 kv_lens (PyTorch's default integer), int64 q_lens and float64
    per-head fp8 scales are converted inside the capture. Every buffer the
    graph writes must stay owned by the plan: arrays allocated after the
    capture (which the memory pool serves from freed blocks first) keep
    their contents over replays, and the replays stay right."""
    rng = np.random.default_rng(91)
    B, hq, hkv, d = 6, 8, 2, 128
    lens_h = rng.integers(1, 3000, B).astype(np.int64)
    q, k, v, _, _ = make_inputs(rng, B, hq, hkv, d, np.float16, lens_h.astype(np.int32), "dense")
    # int64 lengths on the GPU are converted at every launch; the other variants keep them int32, so that
    # only their own conversion is under test
    kw = dict(kv_lens=cp.asarray(lens_h if extra == "int64_lens" else lens_h.astype(np.int32)))
    q_g, k_g, v_g = to_gpu(q), to_gpu(k), to_gpu(v)
    if extra == "int64_q_lens":
        q2 = np.stack([q, q * 0.5], axis=1)
        q_g = to_gpu(q2)
        kw["q_lens"] = cp.asarray(np.array([2, 1, 0, 2, 1, 2], np.int64))
    if extra == "fp8_scales_f64":
        k8 = cp.ascontiguousarray(k_g.view(cp.uint8)[..., 1::2])
        v8 = cp.ascontiguousarray(v_g.view(cp.uint8)[..., 1::2])
        k_g, v_g = k8, v8
        # float64 scales of shape (): cast and spread to (heads_kv,) float32 at every launch
        kw.update(kv_dtype="e5m2", k_scale=cp.asarray(0.5), v_scale=cp.asarray(2.0))
    out = cp.full(q_g.shape, cp.nan, q_g.dtype)

    def call():
        cupy_lean.attention(q_g, k_g, v_g, out=out, **kw)

    cp.cuda.Device().synchronize()
    cs = cp.cuda.Stream(non_blocking=True)
    with cs:
        call()
        cs.synchronize()
        # no free blocks left from earlier work (a new stream may reuse an old stream's handle, and
        # with it that arena): what the pool serves after the capture is what the capture freed
        cp.get_default_memory_pool().free_all_blocks()
        cs.begin_capture()
        try:
            call()
        finally:
            g = cs.end_capture()
        # what the memory pool hands out next on this stream (its arena holds what the capture freed):
        # small blocks, filled with a sentinel
        keep = [cp.full(n, 7, dtype) for n in (B, hkv, 2 * B) for dtype in (cp.int64, cp.int32, cp.float32,
                                                                            cp.float64) for _ in range(4)]
        cs.synchronize()
    cp.cuda.Device().synchronize()
    ref = None
    for _ in range(3):
        out.fill(cp.nan)
        cp.cuda.Device().synchronize()
        s = cp.cuda.Stream(non_blocking=True)
        g.launch(s)
        s.synchronize()
        got = cp.asnumpy(out)
        assert np.isfinite(got[..., :]).any() and not np.isnan(got).any()
        ref = got if ref is None else ref
        np.testing.assert_array_equal(got, ref)  # replays agree bitwise
    for x in keep:
        assert bool((x == 7).all()), "a replay wrote into memory the pool had handed out after the capture"
    eager = cp.full(q_g.shape, cp.nan, q_g.dtype)
    cupy_lean.attention(q_g, k_g, v_g, out=eager, **kw)
    np.testing.assert_array_equal(cp.asnumpy(eager), ref)


def test_arrays_on_another_device_are_refused_naming_them():
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    rng = np.random.default_rng(3)
    q, k, v, lens, _ = make_inputs(rng, 2, 8, 2, 128, np.float16, [100, 50], "dense")
    with cp.cuda.Device(1):
        q1 = cp.asarray(q)
    k0, v0 = cp.asarray(k), cp.asarray(v)
    with pytest.raises(ValueError, match="q: the array is on device 1, the current device is 0"):
        cupy_lean.attention(q1, k0, v0)
    cupy_lean.attention(cp.asarray(q), k0, v0)  # a plan for device 0's arrays ...
    with pytest.raises(ValueError, match="q: the array is on device 1"):  # ... is not found for device 1's
        cupy_lean.attention(q1, k0, v0)


def test_caller_workspace_is_zeroed_before_a_launch_on_another_stream():
    """A plan with the caller's workspace zeroes its counters on the stream
    current when the plan is made; the first launch on another
    (non-blocking) stream is ordered after that zeroing."""
    rng = np.random.default_rng(5)
    q, k, v, lens, _ = make_inputs(rng, 3, 32, 4, 128, np.float16, [9000, 300, 5000], "dense")
    q_g, k_g, v_g, l_g = cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(lens)
    # a CTA count keeps stream-K's merge (its counters) in the kernel; the plans take out= (NaN-prefilled)
    kw = dict(kv_lens=l_g, num_ctas=40, out=cp.empty(q.shape, cp.float16))
    probe = cupy_lean.plan(q_g, k_g, v_g, **kw)
    assert not probe.merge_launch
    ws = cp.full(probe.workspace_bytes, 0xFF, dtype=cp.uint8)  # dirty counters
    cp.cuda.Device().synchronize()
    # the zeroing of the plan below queues behind ~50 ms of work on the current (legacy) stream, which
    # a non-blocking stream does not wait for unless the plan orders it
    spin = cp.RawKernel(r"""extern "C" __global__ void spin(long long n) {
        long long t0 = clock64(); while (clock64() - t0 < n) {} }""", "spin")
    spin((1,), (1,), (np.int64(100_000_000),))
    p = cupy_lean.plan(q_g, k_g, v_g, workspace=ws, **kw)
    assert not p.merge_launch
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        out = cp.full(q.shape, cp.nan, cp.float16)
        p.run(q_g, k_g, v_g, kv_lens=l_g, out=out)
        s.synchronize()
    cp.cuda.Device().synchronize()
    check_close(cp.asnumpy(out), None, q, k, v, lens, None, np.float16)


def test_a_dropped_plan_frees_its_workspace_behind_its_last_launch():
    """A plan's workspace comes from CuPy's pool on the stream of its first
    launch (a); its last launch runs on another stream (b), queued behind
    ~100 ms of work there. The plan is dropped at once, and stream a takes
    blocks of the workspace's size from the pool and fills them with 0x01
    bytes (counters of 16843009). The pool reuses a block on its allocating
    stream alone, ordered after that stream's work only: the drop must make
    a wait for b's launch, or the launch finds those counters, never merges
    its partial units, and leaves their rows NaN."""
    import gc

    from cupy_lean import kernels as K

    rng = np.random.default_rng(6)
    q, k, v, lens, _ = make_inputs(rng, 3, 32, 4, 128, np.float16, [9000, 300, 5000], "dense")
    q_g, k_g, v_g, l_g = cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(lens)
    # a CTA count keeps stream-K's merge (its counters) in the kernel; the plan takes out= (NaN-prefilled)
    kw = dict(kv_lens=l_g, num_ctas=40, out=cp.empty(q.shape, cp.float16))
    cp.cuda.Device().synchronize()
    a, b = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    p = cupy_lean.plan(q_g, k_g, v_g, **kw)
    assert not p.merge_launch and p.decomposition == K.Decomposition.STREAM_K
    nbytes = max(p.workspace_bytes, 256)
    with a:
        p.run(q_g, k_g, v_g, kv_lens=l_g, out=cp.empty(q.shape, cp.float16))  # the workspace (and the
        a.synchronize()                                                          # spare) allocated on a
    spin = cp.RawKernel(r"""extern "C" __global__ void spin(long long n) {
        long long t0 = clock64(); while (clock64() - t0 < n) {} }""", "spin")
    with b:
        out = cp.full(q.shape, cp.nan, cp.float16)
        spin((1,), (1,), (np.int64(200_000_000),))
        p.run(q_g, k_g, v_g, kv_lens=l_g, out=out)  # ordered after a; runs after the spin
    del p
    gc.collect()
    with a:
        blocks = [cp.empty(nbytes, dtype=cp.uint8) for _ in range(4)]
        for blk in blocks:
            blk.fill(1)
    b.synchronize()
    a.synchronize()
    check_close(cp.asnumpy(out), None, q, k, v, lens, None, np.float16)


def test_threads_on_their_per_thread_default_streams_share_a_plan_safely():
    """With CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1 (a fresh process) every
    thread's default stream is handle 2 and one CuPy object, but its own
    CUDA stream. Two threads calling with one signature (one plan, one
    eager workspace, its stream-K counters in the kernel) are ordered by
    the event each records after its launch: every result equals the
    single-thread one bitwise, into NaN-prefilled outputs."""
    script = r"""
import threading
import numpy as np, cupy as cp, cupy_lean
assert cp.cuda.get_current_stream().ptr == 2
rng = np.random.default_rng(23)
lens = np.array([9000, 300, 5000, 77], np.int32)
q = cp.asarray(rng.standard_normal((4, 32, 128)).astype(np.float16))
k = cp.asarray(rng.standard_normal((4, 9000, 4, 128)).astype(np.float16))
v = cp.asarray(rng.standard_normal((4, 9000, 4, 128)).astype(np.float16))
l = cp.asarray(lens)
ref = cupy_lean.attention(q, k, v, kv_lens=l, num_ctas=40)
cp.cuda.Device().synchronize()
bad = []

def work():
    outs = [cp.full(q.shape, cp.nan, dtype=cp.float16) for _ in range(60)]
    cp.cuda.get_current_stream().synchronize()
    for out in outs:
        cupy_lean.attention(q, k, v, kv_lens=l, num_ctas=40, out=out)
    cp.cuda.get_current_stream().synchronize()
    bad.extend(i for i, out in enumerate(outs) if not bool(cp.array_equal(out.view(cp.uint16), ref.view(cp.uint16))))

threads = [threading.Thread(target=work) for _ in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert not bad, f"{len(bad)} of 180 results differ"
print("ok")
"""
    _run_in_a_fresh_process(script, CUPY_CUDA_PER_THREAD_DEFAULT_STREAM="1")


def test_a_caller_workspace_plan_is_refused_inside_a_capture():
    """plan(workspace=...) zeroes the workspace when the plan is made; made
    inside a capture that zeroing would only run at replay: refused, naming
    the argument."""
    rng = np.random.default_rng(9)
    q, k, v, lens, _ = make_inputs(rng, 2, 8, 2, 128, np.float16, [300, 77], "dense")
    q_g, k_g, v_g = cp.asarray(q), cp.asarray(k), cp.asarray(v)
    ws = cp.zeros(cupy_lean.plan(q_g, k_g, v_g).workspace_bytes + 256, dtype=cp.uint8)
    with _inside_a_capture():
        with pytest.raises(ValueError, match="workspace: plan\\(workspace=...\\) zeroes"):
            cupy_lean.plan(q_g, k_g, v_g, workspace=ws)


def test_pinned_torch_out_and_jax_out_are_refused_naming_them():
    """A pinned (page-locked) host tensor as ``out=`` with CUDA inputs is a
    host array among GPU ones: refused, naming it (it used to be copied into
    a GPU temporary that the kernel wrote instead of the user's tensor). A
    JAX array is immutable: refused as ``out=``."""
    rng = np.random.default_rng(8)
    q, k, v, lens, _ = make_inputs(rng, 2, 8, 2, 128, np.float16, [300, 77], "dense")
    torch = pytest.importorskip("torch")
    tq, tk, tv = (torch.from_numpy(x).cuda() for x in (q, k, v))
    pinned = torch.empty(tuple(q.shape), dtype=torch.float16).pin_memory()
    with pytest.raises(TypeError, match="out on the CPU"):
        cupy_lean.attention(tq, tk, tv, out=pinned)
    try:
        import jax.numpy as jnp
    except Exception:
        return
    jout = jnp.zeros(q.shape, dtype=jnp.float16)
    with pytest.raises(TypeError, match="out: JAX arrays are immutable"):
        cupy_lean.attention(tq, tk, tv, out=jout)


def test_plan_run_checks_host_sink_values_as_attention_does():
    """Host sinks passed to Plan.run are value-checked (NaN, +inf refused,
    naming the entry) as attention() checks them; valid host sinks give
    attention()'s result."""
    rng = np.random.default_rng(10)
    q, k, v, lens, _ = make_inputs(rng, 2, 8, 2, 128, np.float16, [300, 77], "dense")
    q_g, k_g, v_g = cp.asarray(q), cp.asarray(k), cp.asarray(v)
    good = rng.normal(size=8).astype(np.float32)
    p = cupy_lean.plan(q_g, k_g, v_g, kv_lens=cp.asarray(lens), sinks=cp.asarray(good))
    for bad_value in (np.nan, np.inf):
        bad = good.copy()
        bad[3] = bad_value
        with pytest.raises(ValueError, match=r"sinks: expected finite values \(or -inf: no sink\), got sinks\[3\]"):
            p.run(q_g, k_g, v_g, kv_lens=cp.asarray(lens), sinks=bad)
    got = p.run(q_g, k_g, v_g, kv_lens=cp.asarray(lens), sinks=good)
    want = cupy_lean.attention(q_g, k_g, v_g, kv_lens=cp.asarray(lens), sinks=good)
    assert cp.array_equal(got, want)


@pytest.mark.parametrize("case", ["sinks_window_softcap", "fp8_paged", "qlens_sinks", "qlens_only", "invariant",
                                  "invariant_sinks"])
def test_gpu_feature_calls_take_the_hot_path_after_one_validated_call(case, monkeypatch):
    """A call with optional features (sinks, a window, a soft-cap, an fp8
    cache, q_lens) of simple argument types validates once; the same call
    again finds its plan without validating (counted here), reads the
    per-call values (sinks and q_lens in place, a new float k_scale, another
    sinks array of the same form) and matches the reference each time
    (NaN-prefilled out and lse); a bad float scale is still refused, a new
    window validates again, a graph captured from the hot call replays new
    sink values."""
    A = sys.modules["cupy_lean.attention"]  # (the module: cupy_lean.attention is the function)
    A._arrays.cupy_ndarray()  # (bound by a process's first GPU call; before it every call validates)

    calls = []
    checked = A._attention_checked
    monkeypatch.setattr(A, "_attention_checked", lambda *a, **k: (calls.append(1), checked(*a, **k))[1])
    rng = np.random.default_rng(7 + len(case))
    lens = [3001, 1, 0, 777, 1290]
    layout = "paged" if case == "fp8_paged" else "dense"
    d = 64 if case == "fp8_paged" else 128
    q, k, v, L, table = make_inputs(rng, len(lens), 8, 2, d, np.float16, lens, layout, page_size=16)
    if case.startswith("qlens"):
        q = rng.standard_normal((len(lens), 3, 8, d)).astype(np.float16)
    host = dict(kv_lens=L, block_table=table)
    gkw = dict(kv_lens=cp.asarray(L), block_table=to_gpu(table))
    kd, vd = to_gpu(k), to_gpu(v)
    sinks = rng.standard_normal(8).astype(np.float32)
    nq = np.array([3, 1, 0, 2, 3], dtype=np.int32)
    if case == "sinks_window_softcap":
        host.update(sinks=sinks, window_left=700, softcap=30.0)
        gkw.update(sinks=cp.asarray(sinks), window_left=700, softcap=30.0)
    elif case == "fp8_paged":
        k8, ku8, ks = _fp8_cache(rng, k, "e4m3", False)
        v8, vu8, vs = _fp8_cache(rng, v, "e4m3", True)
        k, v, kd, vd = k8, v8, cp.asarray(ku8), cp.asarray(vu8)
        host.update(k_scale=ks, v_scale=vs)
        gkw.update(kv_dtype="e4m3", k_scale=float(ks), v_scale=cp.asarray(vs, dtype=cp.float32))
    elif case == "qlens_sinks":
        host.update(sinks=sinks, q_lens=nq)
        gkw.update(sinks=cp.asarray(sinks), q_lens=cp.asarray(nq))
    elif case.startswith("invariant"):  # batch_invariant=True: the remembered decomposition
        gkw.update(batch_invariant=True)
        if case == "invariant_sinks":
            host.update(sinks=sinks)
            gkw.update(sinks=cp.asarray(sinks))
    else:  # q_lens alone: no features in the plan, the lengths per call
        host.update(q_lens=nq)
        gkw.update(q_lens=cp.asarray(nq))
    qd = cp.asarray(q)

    def check(**changes):
        h = dict(host, **changes)
        ro, rl = reference.attention(q, k, v, **h)
        out = _nan_like(q.shape, q.dtype)
        lse = cp.full(q.shape[:-1], cp.nan, dtype=cp.float32)
        cupy_lean.attention(qd, kd, vd, **gkw, out=out, lse=lse)
        _assert_out_lse(out, lse, ro, rl, 4e-3 * max(1.0, np.abs(ro).max()),
                        2e-3 * max(1.0, np.abs(rl[np.isfinite(rl)]).max()))

    check()
    assert len(calls) == 1
    check()
    assert len(calls) == 1, "the same call again validated"
    if case == "fp8_paged":
        gkw["k_scale"] = float(ks) * 0.6
        check(k_scale=ks * 0.6)
        with pytest.raises(ValueError, match="k_scale"):
            cupy_lean.attention(qd, kd, vd, **dict(gkw, k_scale=-1.0), out=_nan_like(q.shape, q.dtype))
        gkw["v_scale"][...] = cp.asarray(vs * 1.5, dtype=cp.float32)  # read by the kernel at launch
        check(k_scale=ks * 0.6, v_scale=vs * 1.5)
        assert len(calls) == 1
        return
    if case.startswith("invariant"):
        # the hot call's bits are the validating path's (validate=True: the values checked, no lookup)
        outs = []
        for validate in (False, True):
            outs.append((_nan_like(q.shape, q.dtype), cp.full(q.shape[:-1], cp.nan, dtype=cp.float32)))
            cupy_lean.attention(qd, kd, vd, **gkw, out=outs[-1][0], lse=outs[-1][1], validate=validate)
        assert len(calls) == 2
        assert cp.array_equal(outs[0][0], outs[1][0]) and cp.array_equal(outs[0][1], outs[1][1])
        with cupy_lean.kernels.tuning(invariant_splits=4):  # another decomposition: validated once
            check()
            check()
            assert len(calls) == 3
        check()  # back: the first decomposition, still remembered
        assert len(calls) == 3
        return
    if case == "qlens_only":
        nq2 = np.array([1, 3, 2, 0, 1], dtype=np.int32)
        gkw["q_lens"][...] = cp.asarray(nq2)
        host["q_lens"] = nq2
        check()
        assert len(calls) == 1
        with pytest.raises(ValueError, match="q_lens"):  # its form is still checked per call
            cupy_lean.attention(qd, kd, vd, **dict(gkw, q_lens=cp.zeros(4, dtype=cp.int32)),
                                out=_nan_like(q.shape, q.dtype))
        return
    new = rng.standard_normal(8).astype(np.float32)
    gkw["sinks"][...] = cp.asarray(new)  # the same array, new values
    host["sinks"] = new
    if case == "qlens_sinks":
        nq2 = np.array([1, 3, 2, 0, 1], dtype=np.int32)
        gkw["q_lens"][...] = cp.asarray(nq2)
        host["q_lens"] = nq2
    check()
    other = rng.standard_normal(8).astype(np.float32)
    gkw["sinks"], host["sinks"] = cp.asarray(other), other  # another array of the same form
    check()
    assert len(calls) == 1
    if case == "sinks_window_softcap":
        gkw["window_left"], host["window_left"] = 200, 200  # other features: validated (once)
        check()
        check()
        assert len(calls) == 2
        out = _nan_like(q.shape, q.dtype)
        graph = _capture(lambda: cupy_lean.attention(qd, kd, vd, **gkw, out=out))
        assert len(calls) == 2
        last = rng.standard_normal(8).astype(np.float32)
        gkw["sinks"][...] = cp.asarray(last)
        out.fill(cp.nan)
        graph.launch()
        cp.cuda.get_current_stream().synchronize()
        ro, _ = reference.attention(q, k, v, **dict(host, sinks=last))
        g = cp.asnumpy(out).astype(np.float64)
        assert np.isfinite(g).all() and np.abs(g - ro).max() < 4e-3 * max(1.0, np.abs(ro).max())


def test_gpu_torch_calls_take_the_hot_path(monkeypatch):
    """PyTorch tensors (bf16 q/k/v, GPU int32 kv_lens, a NaN-filled out, then
    a strided slice of a larger out, sinks on the GPU) are viewed through
    DLPack and, from the second call of a signature, launch without
    validating (counted here); lengths changed in place are read per call;
    every call matches the reference and the slice's other columns stay NaN."""
    torch = pytest.importorskip("torch")
    A = sys.modules["cupy_lean.attention"]  # (the module: cupy_lean.attention is the function)
    A._arrays.cupy_ndarray()  # (bound by a process's first GPU call; before it every call validates)

    calls = []
    checked = A._attention_checked
    monkeypatch.setattr(A, "_attention_checked", lambda *a, **k: (calls.append(1), checked(*a, **k))[1])
    rng = np.random.default_rng(31)
    lens = [1500, 7, 0, 640, 2049]
    hq, hkv, d = 12, 3, 128
    q, k, v, L, _ = make_inputs(rng, len(lens), hq, hkv, d, BF16, lens, "dense")
    tq, tk, tv = (torch.from_numpy(x.view(np.int16)).cuda().view(torch.bfloat16) for x in (q, k, v))
    tl = torch.from_numpy(L).cuda()
    sinks = rng.standard_normal(hq).astype(np.float32)
    ts = torch.from_numpy(sinks).cuda()

    def run(out, use_sinks):
        kw = dict(sinks=ts) if use_sinks else {}
        cupy_lean.attention(tq, tk, tv, kv_lens=tl, out=out, scale=0.07, **kw)
        torch.cuda.synchronize()
        ro, _ = reference.attention(q, k, v, kv_lens=tl.cpu().numpy(), scale=0.07, **(dict(sinks=sinks) if use_sinks else {}))
        got = out.float().cpu().numpy()
        assert np.isfinite(got).all() and np.abs(got - ro).max() < 2e-2 * max(1.0, np.abs(ro).max())

    for use_sinks in (False, True):
        before = len(calls)
        out = torch.full((len(lens), hq, d), float("nan"), dtype=torch.bfloat16, device="cuda")
        run(out, use_sinks)
        run(out.fill_(float("nan")), use_sinks)
        assert len(calls) == before + 1, "the same torch call again validated"
    tl[1] = 900  # in place: read by the next call
    big = torch.full((len(lens), hq, 2 * d), float("nan"), dtype=torch.bfloat16, device="cuda")
    run(big[:, :, :d], False)  # a strided out: a new signature, validated once
    run(big[:, :, :d].fill_(float("nan")), False)
    assert len(calls) == 3
    assert torch.isnan(big[:, :, d:]).all()


def test_gpu_torch_tensors_on_cupys_stream_are_viewed_without_an_exchange(monkeypatch):
    """PyTorch CUDA tensors on CuPy's stream are viewed from their pointers
    (CuPy's DLPack import is not called: it raises here): fp16 and bf16 q /
    k / v, GPU kv_lens, sinks, and a strided slice of a NaN-filled wider
    out, which is written and whose other columns stay NaN. On a PyTorch
    side stream the exchange orders the streams (the import is called) and
    the result is the same. A view keeps its tensor's memory alive."""
    torch = pytest.importorskip("torch")
    from cupy_lean import _arrays

    rng = np.random.default_rng(45)
    lens = [700, 1, 0, 1234]
    hq, hkv, d = 8, 2, 64
    real_import = cp.from_dlpack
    for dt, tdt in ((np.float16, torch.float16), (BF16, torch.bfloat16)):
        q, k, v, L, _ = make_inputs(rng, len(lens), hq, hkv, d, dt, lens, "dense")
        tq, tk, tv = (torch.from_numpy(x.view(np.int16)).cuda().view(tdt) for x in (q, k, v))
        tl = torch.from_numpy(L).cuda()
        sinks = rng.standard_normal(hq).astype(np.float32)
        ts = torch.from_numpy(sinks).cuda()
        ro, _ = reference.attention(q, k, v, kv_lens=L, sinks=sinks, scale=0.1)
        tol = 2e-2 * max(1.0, np.abs(ro).max())
        for side in (False, True):
            big = torch.full((len(lens), hq, 2 * d), float("nan"), dtype=tdt, device="cuda")
            out = big[:, :, d // 2:d // 2 + d]
            imported = []
            monkeypatch.setattr(cp, "from_dlpack", lambda x, *a, **kw: (imported.append(1), real_import(x, *a, **kw))[1])
            stream = torch.cuda.Stream() if side else torch.cuda.current_stream()
            with torch.cuda.stream(stream):
                cupy_lean.attention(tq, tk, tv, kv_lens=tl, sinks=ts, scale=0.1, out=out)
            torch.cuda.synchronize()
            monkeypatch.setattr(cp, "from_dlpack", real_import)
            assert bool(imported) == side, (dt, side, len(imported))
            got = big.float().cpu().numpy()
            mid = got[:, :, d // 2:d // 2 + d]
            assert np.isfinite(mid).all() and np.abs(mid - ro).max() < tol
            assert np.isnan(got[:, :, :d // 2]).all() and np.isnan(got[:, :, d // 2 + d:]).all()
    t = torch.arange(1000, dtype=torch.float32, device="cuda")
    view = _arrays.torch_views((t,), cp.cuda.runtime.getDevice)[0]
    del t
    torch.cuda.empty_cache()
    torch.empty(1000, dtype=torch.float32, device="cuda").fill_(-1.0)  # would reuse freed memory
    torch.cuda.synchronize()
    assert cp.asnumpy(view).tolist() == list(range(1000))


def test_gpu_plan_run_views_torch_tensors_on_cupys_stream(monkeypatch):
    """Plan.run with PyTorch tensors on CuPy's stream views them from their
    pointers (CuPy's DLPack import raises here) and writes a NaN-filled
    torch out as attention() would."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(46)
    lens = [300, 77, 0]
    q, k, v, L, _ = make_inputs(rng, len(lens), 8, 2, 128, np.float16, lens, "dense")
    tq, tk, tv, tl = (torch.from_numpy(x).cuda() for x in (q, k, v, L))
    tout = torch.full(tuple(q.shape), float("nan"), dtype=torch.float16, device="cuda")
    p = cupy_lean.plan(*(cp.from_dlpack(x) for x in (tq, tk, tv)), kv_lens=cp.from_dlpack(tl),
                       out=cp.from_dlpack(tout), scale=0.2)

    def no_import(*a, **kw):
        raise AssertionError("CuPy's DLPack import was called")

    monkeypatch.setattr(cp, "from_dlpack", no_import)
    p.run(tq, tk, tv, kv_lens=tl, out=tout)
    torch.cuda.synchronize()
    ro, _ = reference.attention(q, k, v, kv_lens=L, scale=0.2)
    got = tout.float().cpu().numpy()
    assert np.isfinite(got).all() and np.abs(got - ro).max() < 4e-3 * max(1.0, np.abs(ro).max())
