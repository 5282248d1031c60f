"""Workspace lifetime on the host side (no GPU needed): a plan that is
dropped frees its eager workspace in stream order, and the kernels' 32-bit
tile count is guarded. Streams and events are stand-ins that record what was
asked of them; the GPU tests check the same on a device."""

import gc
import threading

import pytest

from cupy_lean import _plan


class Stream:
    def __init__(self, ptr, capturing=False):
        self.ptr, self.capturing = ptr, capturing
        self.waited = []  # the events' streams (and threads)


class Event:
    def __init__(self, **kwargs):
        self.on = None
        self.synchronized = 0

    def record(self, stream):
        self.on = stream if stream.ptr != 2 else (stream, threading.get_ident())

    def synchronize(self):
        self.synchronized += 1


class Device:
    def __init__(self, device):
        self.device = device

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class FakeCupy:
    class cuda:
        Event = Event
        Device = Device


LEGACY, PTDS = Stream(0), Stream(2)  # one object each, as CuPy's Stream.null / Stream.ptds


@pytest.fixture
def fake_streams(monkeypatch):
    legacy = {"blocked": False}
    monkeypatch.setattr(_plan, "_cp", FakeCupy)
    monkeypatch.setattr(_plan, "_capture_id", lambda s: 7 if s.capturing else None)
    monkeypatch.setattr(_plan, "_legacy_blocked", lambda: legacy["blocked"])
    monkeypatch.setattr(_plan, "_deferred", [])
    monkeypatch.setattr(_plan, "_kept", [])
    LEGACY.waited.clear()
    PTDS.waited.clear()

    def wait_event(stream, ev):
        stream.waited.append(ev.on)

    monkeypatch.setattr(Stream, "wait_event", wait_event, raising=False)
    return legacy


def _bare_plan(user_ws=False):
    p = _plan.Plan.__new__(_plan.Plan)
    p._user_ws, p.device = user_ws, 0
    p._ws = p._ws_stream = p._ws_thread = p._stream = p._stream_thread = None
    p._last_ev = p._ptds_ev = None
    p._set_aside = []
    return p


def _dropped_plan(ws, alloc, used, user_ws=False, set_aside=(), alloc_thread=None, used_thread=None, used_ev=None):
    """A plan as the launch path leaves it, then dropped."""
    me = threading.get_ident()
    p = _bare_plan(user_ws)
    p._ws, p._ws_stream, p._ws_thread = ws, alloc, alloc_thread or me
    p._stream, p._stream_thread, p._last_ev = used, used_thread or me, used_ev
    p._set_aside = list(set_aside)
    del p
    gc.collect()


def test_a_workspace_last_used_on_another_stream_is_freed_behind_that_launch(fake_streams):
    a, b = Stream(11), Stream(22)
    _dropped_plan(object(), a, b)
    assert a.waited == [b] and b.waited == []  # the allocating stream waits for an event on the last one


def test_a_workspace_used_where_it_was_allocated_needs_no_event(fake_streams):
    a = Stream(11)
    _dropped_plan(object(), a, a)
    _dropped_plan(object(), LEGACY, Stream(1))  # the legacy stream under its two handles
    _dropped_plan(object(), a, None)  # never launched
    _dropped_plan(None, None, None)  # nothing allocated
    assert a.waited == [] and LEGACY.waited == [] and _plan._deferred == []


def test_another_wrapper_of_a_stream_counts_as_another_stream(fake_streams):
    """Two objects with one handle: ordered anyway (an object holds its
    handle, so equal handles of two objects may be a reused one)."""
    a = Stream(11)
    _dropped_plan(object(), a, Stream(11))
    assert len(a.waited) == 1


def test_a_caller_workspace_is_left_to_the_caller(fake_streams):
    a, b = Stream(11), Stream(22)
    _dropped_plan(object(), a, b, user_ws=True)
    assert a.waited == []


def test_a_capturing_stream_defers_the_free_until_the_capture_ends(fake_streams):
    a, b = Stream(11), Stream(22, capturing=True)
    ws = object()
    _dropped_plan(ws, a, b)
    assert a.waited == [] and [j[0][0] for j in _plan._deferred] == [ws]  # an event on b would join its capture
    _plan.retry_deferred_frees()
    assert a.waited == [] and len(_plan._deferred) == 1  # still capturing
    b.capturing = False
    _plan.retry_deferred_frees()
    assert a.waited == [b] and _plan._deferred == []


def test_the_legacy_stream_waits_only_while_no_blocking_stream_captures(fake_streams):
    """A workspace from the legacy default stream (CuPy's default), last used
    on another: while a blocking stream captures, queueing a wait on the
    legacy stream would invalidate that capture, so the free waits."""
    b = Stream(22)
    fake_streams["blocked"] = True
    _dropped_plan(object(), LEGACY, b)
    assert LEGACY.waited == [] and len(_plan._deferred) == 1
    fake_streams["blocked"] = False
    _plan.retry_deferred_frees()
    assert LEGACY.waited == [b] and _plan._deferred == []


def test_workspaces_set_aside_for_a_capture_are_ordered_after_their_own_stream(fake_streams):
    """A workspace set aside when its stream began a capture is ordered
    after that stream (once the capture ends), the current one after the
    plan's last stream."""
    me = threading.get_ident()
    a, b, c = Stream(11), Stream(22, capturing=True), Stream(33)
    old, new = object(), object()
    _dropped_plan(new, c, a, set_aside=[(old, a, me, b, me, None)])
    assert c.waited == [a]  # the current workspace: allocated on c, last used on a
    assert [j[0][0] for j in _plan._deferred] == [old]
    b.capturing = False
    _plan.retry_deferred_frees()
    assert a.waited == [b]


def test_per_thread_default_streams_of_two_threads(fake_streams):
    """The per-thread default stream is one handle (2) and one CuPy object in
    every thread, but a stream per thread: a workspace allocated on thread
    1's and last used on thread 2's is ordered with the event thread 2
    recorded after its launch, and only thread 1 can queue that wait."""
    me = threading.get_ident()
    other = me + 1
    ev = Event()
    ev.on = "after thread 2's launch"
    ws = object()
    _dropped_plan(ws, PTDS, PTDS, alloc_thread=me, used_thread=other, used_ev=ev)
    assert PTDS.waited == ["after thread 2's launch"] and ev.synchronized == 0  # this thread allocated it
    _dropped_plan(ws, PTDS, PTDS, alloc_thread=other, used_thread=me, used_ev=None)
    # only thread `other` could queue a wait on its stream: this thread waits on the host for an event
    # it records after its own last use, and nothing is deferred
    assert len(PTDS.waited) == 1 and _plan._deferred == []
    _dropped_plan(ws, Stream(11), PTDS, used_thread=other, used_ev=None)  # nothing was queued there
    assert _plan._deferred == [] and _plan._kept == []
    _dropped_plan(object(), PTDS, PTDS, alloc_thread=me, used_thread=me)  # one thread's stream: no event
    a = Stream(11)
    _dropped_plan(object(), a, PTDS, used_thread=other, used_ev=ev)
    assert a.waited == ["after thread 2's launch"]


def test_eager_launches_from_two_threads_on_their_default_streams_are_ordered(fake_streams):
    """_order_after_previous: the per-thread default stream of another
    thread is another stream; the wait uses the event recorded after that
    thread's launch (this thread cannot record on that thread's stream)."""
    p = _bare_plan()
    me = threading.get_ident()
    p._stream, p._stream_thread = PTDS, me + 1
    p._last_ev = Event()
    p._last_ev.on = "thread 2's launch"
    assert p._order_after_previous(PTDS, me, FakeCupy) is False
    assert PTDS.waited == ["thread 2's launch"] and p._stream_thread == me
    assert p._order_after_previous(PTDS, me, FakeCupy) is False and len(PTDS.waited) == 1  # same thread now
    b = Stream(22)
    assert p._order_after_previous(b, me, FakeCupy) is False
    assert b.waited == [(PTDS, me)]  # recorded on this thread's default stream


def test_a_previous_stream_that_cannot_take_an_event_sets_the_workspace_aside(fake_streams):
    me = threading.get_ident()
    p = _bare_plan()
    ws = object()
    p._ws, p._ws_stream, p._ws_thread, p._stream, p._stream_thread = ws, LEGACY, me, LEGACY, me
    fake_streams["blocked"] = True  # a blocking stream is capturing
    b = Stream(22)
    assert p._order_after_previous(b, me, FakeCupy) is True
    assert p._ws is None and p._set_aside == [(ws, LEGACY, me, LEGACY, me, None)] and b.waited == []
    q = _bare_plan(user_ws=True)
    q._ws, q._stream, q._stream_thread = ws, LEGACY, me
    with pytest.raises(RuntimeError, match="workspace: the plan's previous eager launch was on a stream that is "
                                           "now capturing"):
        q._order_after_previous(b, me, FakeCupy)
    p._set_aside.clear()
    q._ws = None


def test_a_stream_that_cannot_be_ordered_keeps_its_workspace(fake_streams, monkeypatch):
    def broken(stream, ev):
        raise RuntimeError("invalid resource handle")

    monkeypatch.setattr(Stream, "wait_event", broken, raising=False)
    ws = object()
    _dropped_plan(ws, Stream(11), Stream(22))
    assert _plan._kept == [ws]


def test_a_plan_that_failed_to_build_is_collected_quietly(fake_streams):
    p = _plan.Plan.__new__(_plan.Plan)  # no attributes: __init__ raised before setting them
    del p
    gc.collect()


@pytest.mark.parametrize("paged", [False, True])
def test_tile_counts_past_32_bits_are_refused_naming_the_cache(paged):
    _plan.check_tile_count(2**15, 2**16 - 1, 16, paged)  # 2**31 - 2**15 tiles: fine
    name = "block_table" if paged else "k"
    with pytest.raises(ValueError, match=rf"{name}: 32768 sequences of up to 65536 tiles of 16 tokens "
                                         r"may hold 2147483648 tiles, expected fewer than 2\*\*31"):
        _plan.check_tile_count(2**15, 2**16, 16, paged)


# ---------------------------------------------------------------- the cache

class _Plan:
    """A cache entry standing in for a plan (``nbytes``: its cache_bytes)."""

    def __init__(self, captured=False, nbytes=0):
        self.captured = captured
        self.cache_bytes = nbytes


@pytest.fixture
def small_cache(monkeypatch):
    from cupy_lean import _cache

    monkeypatch.setattr(_cache, "_entries", {})
    monkeypatch.setattr(_cache, "_retained", [])
    monkeypatch.setattr(_cache, "_num_plans", 0)
    monkeypatch.setattr(_cache, "_num_plan_bytes", 0)
    monkeypatch.setattr(_cache, "MAX_PLANS", 2)
    monkeypatch.setattr(_cache, "MAX_PLAN_BYTES", 2 << 30)
    return _cache


@pytest.fixture
def byte_cache(small_cache):
    """A cache capped at 100 bytes of plans (and 1024 plans)."""
    small_cache.MAX_PLANS = 1024
    small_cache.MAX_PLAN_BYTES = 100
    return small_cache


def _plans_in(c):
    return [k[2] for k in c._entries if k[0] == "plan"]


def _consistent(c):
    plans = [v for k, v in c._entries.items() if k[0] == "plan"]
    return c._num_plans == len(plans) and c.plan_bytes() == sum(p.cache_bytes for p in plans)


def test_the_cache_builds_once_and_evicts_its_oldest_plan(small_cache):
    import weakref

    c = small_cache
    built = []
    first = c.get_or_build(("plan", 0, "a"), lambda: built.append("a") or _Plan())
    assert c.get_or_build(("plan", 0, "a"), lambda: built.append("again") or _Plan()) is first
    c.get_or_build(("spec", 0, "s"), lambda: "kernels")  # not a plan: never counted or evicted
    gone = weakref.ref(first)
    del first
    c.get_or_build(("plan", 0, "b"), _Plan)
    c.get_or_build(("plan", 0, "c"), _Plan)  # a third plan: "a", the oldest, goes
    assert built == ["a"]
    assert c.get(("plan", 0, "a")) is None and gone() is None  # released, not kept
    assert c.get(("plan", 0, "b")) is not None and c.get(("spec", 0, "s")) == "kernels"


def test_a_lowered_limit_evicts_down_to_it_at_the_next_plan(small_cache):
    """MAX_PLANS lowered below the plans held: the next plan evicts the
    oldest ones until the cache holds MAX_PLANS (not one per new plan)."""
    c = small_cache
    c.MAX_PLANS = 5
    for name in "abcde":
        c.get_or_build(("plan", 0, name), _Plan)
    c.MAX_PLANS = 1
    c.get_or_build(("plan", 0, "f"), _Plan)
    assert [k[2] for k in c._entries if k[0] == "plan"] == ["f"] and c._num_plans == 1


def test_plans_that_graphs_were_captured_from_outlive_eviction_and_clear(small_cache):
    c = small_cache
    captured = c.get_or_build(("plan", 0, "a"), lambda: _Plan(captured=True))
    c.get_or_build(("plan", 0, "b"), _Plan)
    c.get_or_build(("plan", 0, "c"), _Plan)
    assert c.get(("plan", 0, "a")) is None and c._retained == [captured]
    again = c.get_or_build(("plan", 0, "d"), lambda: _Plan(captured=True))
    c.clear()
    assert c.size() == 0 and c._retained == [captured, again]


def test_clear_cache_is_public_and_drops_plans_and_kernels(small_cache):
    """cupy_lean.clear_cache(): every cached plan (and its workspace) and
    kernel module dropped and released; captured plans kept; no GPU needed."""
    import weakref

    import cupy_lean

    c = small_cache
    assert "clear_cache" in cupy_lean.__all__ and cupy_lean.clear_cache.__doc__
    plain = c.get_or_build(("plan", 0, "a"), _Plan)
    captured = c.get_or_build(("plan", 0, "b"), lambda: _Plan(captured=True))
    c.get_or_build(("spec", 0, "s"), lambda: "kernels")
    gone = weakref.ref(plain)
    del plain
    cupy_lean.clear_cache()
    assert c.size() == 0 and gone() is None and c._retained == [captured] and c._num_plans == 0


def test_the_cache_evicts_its_oldest_plans_past_the_byte_cap(byte_cache):
    """Past MAX_PLAN_BYTES the oldest plans go (as few as needed, kernels
    never), and are released."""
    import weakref

    c = byte_cache
    c.get_or_build(("spec", 0, "s"), lambda: "kernels")
    first = c.get_or_build(("plan", 0, "a"), lambda: _Plan(nbytes=40))
    gone = weakref.ref(first)
    del first
    c.get_or_build(("plan", 0, "b"), lambda: _Plan(nbytes=30))
    c.get_or_build(("plan", 0, "c"), lambda: _Plan(nbytes=30))  # 100: at the cap, all kept
    assert _plans_in(c) == ["a", "b", "c"] and c.plan_bytes() == 100
    c.get_or_build(("plan", 0, "d"), lambda: _Plan(nbytes=20))  # 120: "a" (40) goes
    assert _plans_in(c) == ["b", "c", "d"] and c.plan_bytes() == 80 and gone() is None
    c.get_or_build(("plan", 0, "e"), lambda: _Plan(nbytes=70))  # 150: "b" and "c" go
    assert _plans_in(c) == ["d", "e"] and c.plan_bytes() == 90 and _consistent(c)
    assert c.get(("spec", 0, "s")) == "kernels" and c._retained == []


def test_the_cache_evicts_the_least_recently_used_plans_first(byte_cache):
    """A plan looked up (the hot path's get, or get_or_build) after others
    were built outlives them: eviction goes by last use, not by age; both
    caps alike, and no tick is left behind for an evicted or cleared key."""
    c = byte_cache
    for name in "abc":
        c.get_or_build(("plan", 0, name), lambda: _Plan(nbytes=30))
    assert c.get(("plan", 0, "a")) is not None  # "a" used last now: "b" is the least recent
    c.get_or_build(("plan", 0, "d"), lambda: _Plan(nbytes=30))  # 120 > 100: "b" goes
    assert _plans_in(c) == ["a", "c", "d"] and _consistent(c)
    c.get_or_build(("plan", 0, "c"), lambda: _Plan(nbytes=99))  # found: marks "c", builds nothing
    c.get_or_build(("plan", 0, "e"), lambda: _Plan(nbytes=30))  # "a" then ... down to 100: "a" goes
    assert _plans_in(c) == ["c", "d", "e"]
    ticks = [c._entries[("plan", 0, k)]._cache_tick for k in "dce"]
    assert ticks[0] < ticks[1] < ticks[2]  # each plan carries its last use: d built, c found, e built
    c.MAX_PLAN_BYTES, c.MAX_PLANS = 1 << 30, 2
    c.get(("plan", 0, "d"))
    c.get_or_build(("plan", 0, "f"), lambda: _Plan(nbytes=1))  # the count cap: "c" and "e" go, "d" stays
    assert _plans_in(c) == ["d", "f"] and _consistent(c)
    c.get_or_build(("spec", 0, "s"), lambda: "kernels")
    assert c.get(("spec", 0, "s")) == "kernels"  # kernels are not tracked (a str takes no tick)
    c.clear()
    assert c.size() == 0 and c.plan_bytes() == 0


def test_a_plan_larger_than_the_byte_cap_is_kept_alone(byte_cache):
    c = byte_cache
    c.get_or_build(("plan", 0, "a"), lambda: _Plan(nbytes=10))
    big = c.get_or_build(("plan", 0, "b"), lambda: _Plan(nbytes=500))
    assert _plans_in(c) == ["b"] and c.get(("plan", 0, "b")) is big and c.plan_bytes() == 500
    c.get_or_build(("plan", 0, "c"), lambda: _Plan(nbytes=1))  # the big one is the oldest now
    assert _plans_in(c) == ["c"] and c.plan_bytes() == 1 and _consistent(c)


def test_plans_that_graphs_were_captured_from_outlive_byte_eviction_uncounted(byte_cache):
    c = byte_cache
    captured = c.get_or_build(("plan", 0, "a"), lambda: _Plan(captured=True, nbytes=60))
    c.get_or_build(("plan", 0, "b"), lambda: _Plan(nbytes=30))
    c.get_or_build(("plan", 0, "c"), lambda: _Plan(nbytes=30))
    assert _plans_in(c) == ["b", "c"] and c._retained == [captured] and c.plan_bytes() == 60
    c.get_or_build(("plan", 0, "d"), lambda: _Plan(nbytes=10))  # 70: nothing more goes
    assert _plans_in(c) == ["b", "c", "d"] and c._retained == [captured] and _consistent(c)


def test_both_caps_hold_together_and_clear_resets_both_totals(byte_cache):
    c = byte_cache
    c.MAX_PLANS = 3
    for name in "abcd":  # the count cap evicts "a"
        c.get_or_build(("plan", 0, name), lambda: _Plan(nbytes=10))
    assert _plans_in(c) == ["b", "c", "d"] and c.plan_bytes() == 30 and _consistent(c)
    c.get_or_build(("plan", 0, "e"), lambda: _Plan(nbytes=95))  # both: "b" by count, "c" and "d" by bytes
    assert _plans_in(c) == ["e"] and _consistent(c)
    kept = c.get_or_build(("plan", 0, "f"), lambda: _Plan(captured=True, nbytes=1))
    c.clear()
    assert c.size() == 0 and c._num_plans == 0 and c.plan_bytes() == 0 and c._retained == [kept]
    c.get_or_build(("plan", 0, "g"), lambda: _Plan(nbytes=100))  # counted from zero again
    assert _plans_in(c) == ["g"] and c.plan_bytes() == 100 and _consistent(c)


def test_a_lowered_byte_cap_evicts_down_to_it_at_the_next_plan(byte_cache):
    c = byte_cache
    c.MAX_PLAN_BYTES = 1000
    for name in "abcde":
        c.get_or_build(("plan", 0, name), lambda: _Plan(nbytes=100))
    c.MAX_PLAN_BYTES = 250
    assert c.plan_bytes() == 500  # nothing happens until the next plan
    c.get_or_build(("spec", 0, "s"), lambda: "kernels")  # (not a plan: no eviction)
    assert len(_plans_in(c)) == 5
    c.get_or_build(("plan", 0, "f"), lambda: _Plan(nbytes=50))
    assert _plans_in(c) == ["d", "e", "f"] and c.plan_bytes() == 250 and _consistent(c)  # at the cap: kept
    c.MAX_PLAN_BYTES = 10**6  # raised: nothing evicted
    c.get_or_build(("plan", 0, "g"), lambda: _Plan(nbytes=5000))
    assert _plans_in(c) == ["d", "e", "f", "g"] and _consistent(c)


def test_concurrent_builds_keep_the_totals_consistent(byte_cache):
    c = byte_cache
    c.MAX_PLANS, c.MAX_PLAN_BYTES = 50, 3000

    def work(t):
        for i in range(200):
            c.get_or_build(("plan", 0, (t, i % 120)), lambda i=i: _Plan(captured=i % 37 == 0, nbytes=7 + i % 90))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert _consistent(c) and c._num_plans <= 50 and c.plan_bytes() <= 3000


def test_a_plans_cache_bytes_are_its_workspace_and_spare_at_their_allocated_size(monkeypatch):
    """cache_bytes counts the eager workspace and the spare at the size
    _new_workspace allocates (at least 256 bytes each) before either
    exists, and nothing for a caller's workspace."""
    sizes = []

    class Cp:
        uint8 = "uint8"

        @staticmethod
        def zeros(n, dtype):
            sizes.append(n)

    for ws_bytes, want in ((100, 512), (256, 512), (4096 + 256, 2 * 4352), (3 << 28, 6 << 28)):
        p = _bare_plan()
        p.workspace_bytes = ws_bytes
        assert p.cache_bytes == want
        p._new_workspace(Cp)
        p._new_workspace(Cp)
        assert sum(sizes[-2:]) == want
        p._ws = None
    p = _bare_plan(user_ws=True)
    p.workspace_bytes = 4096
    assert p.cache_bytes == 0
    p._ws = None


def test_a_plan_evicted_by_bytes_frees_its_workspace_behind_its_last_launch(fake_streams, byte_cache):
    """Byte eviction drops the plan as count eviction does: its workspace,
    last used on another stream than the one it came from, is freed only
    after the allocating stream waits for that use."""
    me = threading.get_ident()
    a, b = Stream(11), Stream(22)
    c = byte_cache
    c.MAX_PLAN_BYTES = 3000

    def build():
        p = _bare_plan()
        p.workspace_bytes = 1000
        p.captured = False
        p._ws, p._ws_stream, p._ws_thread, p._stream, p._stream_thread = object(), a, me, b, me
        return p

    c.get_or_build(("plan", 0, "a"), build)
    assert c.plan_bytes() == 2000 and a.waited == []
    c.get_or_build(("plan", 0, "b"), lambda: _Plan(nbytes=1500))
    gc.collect()
    assert _plans_in(c) == ["b"] and a.waited == [b] and b.waited == []


def test_rearm_is_ordered_after_the_last_launch_and_refused_in_a_capture(fake_streams, monkeypatch):
    """rearm() zeroes the eager workspace's counters on the current stream
    after the plan's previous launch (on another stream here), becomes the
    previous use itself, and refuses to run inside a capture."""
    fills = []

    class Counters:
        def fill(self, value):
            fills.append(value)

    class WS:
        data = type("D", (), {"ptr": 4096})()

        def __getitem__(self, key):
            return Counters()

    cur = {"stream": Stream(33)}
    monkeypatch.setattr(FakeCupy.cuda, "get_current_stream", staticmethod(lambda: cur["stream"]), raising=False)
    me = threading.get_ident()
    p = _bare_plan()
    p._lock, p.counter_bytes, p._rearm = threading.Lock(), 256, {4096}
    b = Stream(22)
    p._ws, p._ws_stream, p._ws_thread, p._stream, p._stream_thread = WS(), b, me, b, me
    p.rearm()
    assert fills == [0] and cur["stream"].waited == [b] and p._stream is cur["stream"] and p._rearm == set()
    cur["stream"] = Stream(44, capturing=True)
    with pytest.raises(RuntimeError, match="rearm: CuPy's current stream is capturing a CUDA graph"):
        p.rearm()
    assert fills == [0]
    p._ws = None


def test_the_legacy_stream_is_blocked_while_the_driver_says_so(monkeypatch):
    """_legacy_blocked asks the driver about the legacy stream:
    CUDA_ERROR_STREAM_CAPTURE_IMPLICIT (while a blocking stream captures) or
    a capturing status mean no work may be queued there; another error (no
    context current on the thread yet) asks the runtime instead."""
    answers = {"rc": 0, "status": 0}

    def is_capturing(handle, status):
        assert handle is None
        status._obj.value = answers["status"]
        return answers["rc"]

    monkeypatch.setattr(_plan, "_is_capturing", is_capturing)
    assert _plan._legacy_blocked() is False
    answers["rc"] = 906
    assert _plan._legacy_blocked() is True
    answers.update(rc=0, status=1)
    assert _plan._legacy_blocked() is True
    answers.update(rc=201, status=0)  # CUDA_ERROR_INVALID_CONTEXT

    class Null:
        capturing = False

        def is_capturing(self):
            return self.capturing

    null = Null()
    monkeypatch.setattr(_plan, "_cp", type("C", (), {"cuda": type("D", (), {"Stream": type("S", (), {"null": null})})}))
    assert _plan._legacy_blocked() is False
    null.capturing = True
    assert _plan._legacy_blocked() is True


def test_a_plan_evicted_before_its_first_capture_is_kept(small_cache):
    """The cache evicts a plan (not yet captured) while another thread is
    about to capture a launch of it: the capture, which sets ``captured``
    first, then finds the plan gone and keeps it."""
    c = small_cache
    plan = c.get_or_build(("plan", 0, "a"), _Plan)
    c.get_or_build(("plan", 0, "b"), _Plan)
    c.get_or_build(("plan", 0, "c"), _Plan)  # "a" evicted, not captured: dropped
    assert c._retained == []
    plan.captured = True
    c.keep_if_evicted(plan)
    c.keep_if_evicted(plan)  # once
    assert c._retained == [plan]
    held = c.get(("plan", 0, "c"))
    held.captured = True
    c.keep_if_evicted(held)  # still cached: the cache keeps it on eviction itself
    assert c._retained == [plan]


def test_a_set_aside_per_thread_stream_keeps_its_last_event(fake_streams):
    """This thread's per-thread default stream began a capture after the
    plan's last launch there: the workspace set aside keeps the event noted
    after that launch (another thread freeing it waits for it), and later
    notes record a new event object, not that one."""
    me = threading.get_ident()
    p = _bare_plan()
    ws, noted = object(), Event()
    p._ws, p._ws_stream, p._ws_thread, p._stream, p._stream_thread = ws, LEGACY, me, PTDS, me
    p._last_ev = p._ptds_ev = noted
    PTDS.capturing = True
    try:
        b = Stream(22)
        assert p._order_after_previous(b, me, FakeCupy) is True
    finally:
        PTDS.capturing = False
    assert p._set_aside == [(ws, LEGACY, me, PTDS, me, noted)] and p._ptds_ev is None and b.waited == []
    p._set_aside.clear()


def test_exit_releases_the_workspaces_kept_for_later(monkeypatch):
    """At exit the cache's handler drops the workspaces that wait for an
    ordered free too (while CUDA is still up)."""
    from cupy_lean import _cache

    monkeypatch.setattr(_plan, "_deferred", [("job", 0)])
    monkeypatch.setattr(_plan, "_kept", [object()])
    monkeypatch.setattr(_cache, "_entries", {})
    monkeypatch.setattr(_cache, "_retained", [])
    _cache._shutdown()
    assert _plan._deferred == [] and _plan._kept == []
