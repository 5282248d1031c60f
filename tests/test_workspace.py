"""Workspace lifetime on the host side (no GPU needed): a plan that is
dropped frees its eager workspace in stream order, and the kernels' 32-bit
tile count is guarded. Streams and events are stand-ins that record what was
asked of them; the GPU tests check the same on a device."""

import gc

import pytest

from cupy_lean import _plan


class Stream:
    def __init__(self, ptr, capturing=False):
        self.ptr, self.capturing = ptr, capturing
        self.waited = []


class Event:
    def __init__(self, **kwargs):
        self.on = None

    def record(self, stream):
        self.on = stream


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


@pytest.fixture
def fake_streams(monkeypatch):
    monkeypatch.setattr(_plan, "_cp", FakeCupy)
    monkeypatch.setattr(_plan, "_capture_id", lambda s: 7 if s.capturing else None)
    monkeypatch.setattr(_plan, "_deferred", [])
    monkeypatch.setattr(_plan, "_kept", [])

    def wait_event(stream, ev):
        stream.waited.append(ev.on)

    monkeypatch.setattr(Stream, "wait_event", wait_event, raising=False)


def _dropped_plan(ws, alloc, used, user_ws=False, set_aside=()):
    """A plan as the launch path leaves it, then dropped."""
    p = _plan.Plan.__new__(_plan.Plan)
    p._user_ws, p._ws, p._ws_stream, p._stream = user_ws, ws, alloc, used
    p._set_aside, p.device = list(set_aside), 0
    del p
    gc.collect()


def test_a_workspace_last_used_on_another_stream_is_freed_behind_that_launch(fake_streams):
    a, b = Stream(11), Stream(22)
    _dropped_plan(object(), a, b)
    assert a.waited == [b] and b.waited == []  # the allocating stream waits for an event on the last one


def test_a_workspace_used_where_it_was_allocated_needs_no_event(fake_streams):
    a = Stream(11)
    _dropped_plan(object(), a, Stream(11))  # the same stream (another wrapper of its handle)
    _dropped_plan(object(), a, None)  # never launched
    _dropped_plan(None, None, None)  # nothing allocated
    assert a.waited == [] and _plan._deferred == []


def test_a_caller_workspace_is_left_to_the_caller(fake_streams):
    a, b = Stream(11), Stream(22)
    _dropped_plan(object(), a, b, user_ws=True)
    assert a.waited == []


def test_a_capturing_stream_defers_the_free_until_the_capture_ends(fake_streams):
    a, b = Stream(11), Stream(22, capturing=True)
    ws = object()
    _dropped_plan(ws, a, b)
    assert a.waited == [] and [j[0] for j in _plan._deferred] == [ws]  # kept: an event on b would join its capture
    _plan.retry_deferred_frees()
    assert a.waited == [] and len(_plan._deferred) == 1  # still capturing
    b.capturing = False
    _plan.retry_deferred_frees()
    assert a.waited == [b] and _plan._deferred == []


def test_workspaces_set_aside_for_a_capture_are_ordered_after_their_own_stream(fake_streams):
    """A workspace set aside when its stream began a capture is ordered
    after that stream (once the capture ends), the current one after the
    plan's last stream."""
    a, b, c = Stream(11), Stream(22, capturing=True), Stream(33)
    old, new = object(), object()
    _dropped_plan(new, c, a, set_aside=[(old, a, b)])
    assert c.waited == [a]  # the current workspace: allocated on c, last used on a
    assert [j[0] for j in _plan._deferred] == [old]
    b.capturing = False
    _plan.retry_deferred_frees()
    assert a.waited == [b]


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
    """A cache entry standing in for a plan."""

    def __init__(self, captured=False):
        self.captured = captured


@pytest.fixture
def small_cache(monkeypatch):
    from cupy_lean import _cache

    monkeypatch.setattr(_cache, "_entries", {})
    monkeypatch.setattr(_cache, "_retained", [])
    monkeypatch.setattr(_cache, "_num_plans", 0)
    monkeypatch.setattr(_cache, "MAX_PLANS", 2)
    return _cache


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


def test_plans_that_graphs_were_captured_from_outlive_eviction_and_clear(small_cache):
    c = small_cache
    captured = c.get_or_build(("plan", 0, "a"), lambda: _Plan(captured=True))
    c.get_or_build(("plan", 0, "b"), _Plan)
    c.get_or_build(("plan", 0, "c"), _Plan)
    assert c.get(("plan", 0, "a")) is None and c._retained == [captured]
    again = c.get_or_build(("plan", 0, "d"), lambda: _Plan(captured=True))
    c.clear()
    assert c.size() == 0 and c._retained == [captured, again]
