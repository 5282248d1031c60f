"""Property tests of the work decompositions in :mod:`cupy_lean.schedule`.

Every quantity is recomputed here from DESIGN.md's definitions (units in
``(b, h)`` order, ``tiles(b) = ceil(kv_len / tile_size)``, the stream-K split
into ``max_tiles`` / ``max_tiles - 1`` tiles per CTA) and checked against the
schedule the package builds.
"""

import math
import re

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import cupy_lean
from cupy_lean import head_schedule, lean_schedule, num_splits_heuristic, split_schedule
from cupy_lean.schedule import combine_row_blocks, merge_batches, uniform_variant
from cupy_lean.schedule import lean_cta_of_tile, tiles_per_sequence

# ------------------------------------------------------------------ strategies

lens_st = st.lists(st.integers(0, 300), min_size=0, max_size=5)
heads_st = st.integers(1, 4)
tile_st = st.one_of(st.sampled_from([1, 2, 3, 7, 16, 32, 64, 128]), st.integers(1, 80))
# 1 CTA, a few (usually fewer than the tiles), many (usually more than the tiles).
ctas_st = st.one_of(st.just(1), st.integers(1, 12), st.integers(1, 5000))
splits_st = st.one_of(st.just(1), st.integers(2, 9))

# Edge cases from DESIGN.md, shared by the @given tests below. Tile size 16:
# length 0, 1, tile-1, tile, tile+1; more CTAs than tiles; one CTA; a CTA that
# crosses several whole units; empty batch; all sequences empty.
EDGE = [
    ([0], 1, 16, 4),
    ([1], 1, 16, 4),
    ([15], 2, 16, 3),
    ([16], 2, 16, 3),
    ([17], 2, 16, 3),
    ([16, 17, 15, 1, 0], 3, 16, 5),
    ([17, 1], 2, 16, 1000),  # more CTAs than tiles
    ([300, 5, 0, 77], 3, 16, 1),  # one CTA
    ([5, 1, 1, 1, 9], 1, 1, 2),  # CTA 0 crosses three whole units
    ([], 2, 16, 7),  # batch 0
    ([0, 0, 0], 4, 16, 7),  # every unit empty
    ([300, 300, 300, 300, 300], 4, 1, 5000),  # many tiles, many CTAs
    ([33, 0, 64], 2, 32, 5),  # total divisible by CTAs: every CTA heavy
]


def with_edges(examples):
    def deco(f):
        for ex in examples:
            f = example(*ex)(f)
        return f

    return deco


# ------------------------------------------------------------------ helpers

def expected_unit_tiles(lens, heads_kv, tile_size):
    tps = [math.ceil(n / tile_size) for n in lens]
    return [t for t in tps for _ in range(heads_kv)]


def check_common(s, lens, heads_kv, tile_size):
    """Invariants shared by all schedules: unit bookkeeping, exact coverage of
    every tile of every unit, partial flags, contributors, slots."""
    lens = list(lens)
    ut = expected_unit_tiles(lens, heads_kv, tile_size)
    nunits = len(lens) * heads_kv
    assert s.batch == len(lens)
    assert s.heads_kv == heads_kv and s.tile_size == tile_size
    assert s.num_units == nunits
    np.testing.assert_array_equal(s.kv_lens, np.asarray(lens, dtype=np.int64).reshape(-1))
    np.testing.assert_array_equal(s.tiles_per_seq, [math.ceil(n / tile_size) for n in lens])
    np.testing.assert_array_equal(s.unit_tiles, ut)
    np.testing.assert_array_equal(s.unit_start, np.concatenate([[0], np.cumsum(ut)[:-1]]) if ut else [])
    assert s.total_tiles == sum(ut)

    seg = s.segments
    assert seg.dtype.names == ("cta", "unit", "batch", "head", "tile_begin", "tile_end",
                               "partial", "slot")
    # Ordered by CTA.
    assert np.all(np.diff(seg["cta"]) >= 0)
    assert np.all((seg["cta"] >= 0) & (seg["cta"] < max(s.num_ctas, 1)))

    # Coverage: every tile of every unit exactly once, one count array per unit.
    cover = [np.zeros(n, dtype=np.int64) for n in ut]
    for r in seg:
        u = int(r["unit"])
        assert 0 <= u < nunits
        assert (int(r["batch"]), int(r["head"])) == divmod(u, heads_kv)
        tb, te = int(r["tile_begin"]), int(r["tile_end"])
        assert 0 <= tb < te <= ut[u], "segments are non-empty and inside their unit"
        cover[u][tb:te] += 1
    for u, c in enumerate(cover):
        assert np.all(c == 1), f"unit {u}: tile coverage {c.tolist()}"

    # Empty units have no segments and no contributors.
    empty = [u for u, n in enumerate(ut) if n == 0]
    assert not np.isin(seg["unit"], empty).any()
    assert s.contributors.shape == (nunits,)
    assert np.all(s.contributors[empty] == 0) if empty else True

    # Contributors = number of partial segments per unit.
    expect = np.zeros(nunits, dtype=np.int64)
    for r in seg[seg["partial"]]:
        expect[int(r["unit"])] += 1
    np.testing.assert_array_equal(s.contributors, expect)
    np.testing.assert_array_equal(s.partial_units(), np.nonzero(expect)[0])

    # Slots: -1 exactly for the non-partial segments, distinct otherwise.
    part = seg["partial"]
    assert np.all(seg["slot"][~part] == -1)
    assert np.all(seg["slot"][part] >= 0)
    assert len(np.unique(seg["slot"][part])) == int(part.sum())

    # tiles_per_cta agrees with the segments.
    per = np.zeros(s.num_ctas, dtype=np.int64)
    for r in seg:
        per[int(r["cta"])] += int(r["tile_end"] - r["tile_begin"])
    np.testing.assert_array_equal(s.tiles_per_cta(), per)
    assert per.sum() == s.total_tiles
    return ut


# ------------------------------------------------------------------ lean

@given(lens_st, heads_st, tile_st, ctas_st)
@with_edges(EDGE)
def test_lean_schedule(lens, heads_kv, tile_size, num_ctas):
    s = lean_schedule(lens, heads_kv, tile_size=tile_size, num_ctas=num_ctas)
    ut = check_common(s, lens, heads_kv, tile_size)
    total = sum(ut)
    assert s.kind == "lean" and s.num_splits == 0

    # Effective grid.
    ncta = min(total, num_ctas)
    assert s.num_ctas == ncta
    assert s.cta_start.shape == s.cta_end.shape == (ncta,)
    if ncta == 0:
        assert len(s.segments) == 0 and s.max_tiles == 0 and s.heavy_ctas == 0
        assert np.all(s.contributors == 0)
        return

    # Stream-K split, from DESIGN.md.
    max_tiles = -(-total // ncta)
    heavy = total - (max_tiles - 1) * ncta
    assert (s.max_tiles, s.heavy_ctas) == (max_tiles, heavy)
    assert 1 <= heavy <= ncta
    for c in range(ncta):
        if c < heavy:
            start, n = c * max_tiles, max_tiles
        else:
            start, n = heavy * max_tiles + (c - heavy) * (max_tiles - 1), max_tiles - 1
        assert (int(s.cta_start[c]), int(s.cta_end[c])) == (start, start + n)
    assert s.cta_start[0] == 0 and s.cta_end[-1] == total
    np.testing.assert_array_equal(s.cta_start[1:], s.cta_end[:-1])

    # Balance: heavy CTAs own max_tiles, the others max_tiles - 1.
    per = s.tiles_per_cta()
    assert per.max() - per.min() <= 1
    assert np.all(per[:heavy] == max_tiles)
    assert np.all(per[heavy:] == max_tiles - 1)
    assert np.all(per >= 1), "every effective CTA owns work"

    # Segments of each CTA: contiguous in the linear order, from cta_start to
    # cta_end; only the first and last can be partial; slots 2c / 2c + 1.
    seg = s.segments
    unit_start = np.concatenate([[0], np.cumsum(ut)[:-1]])
    for c in range(ncta):
        rows = seg[seg["cta"] == c]
        assert len(rows) >= 1
        lin = [(int(unit_start[r["unit"]] + r["tile_begin"]), int(unit_start[r["unit"]] + r["tile_end"]))
               for r in rows]
        assert lin[0][0] == s.cta_start[c] and lin[-1][1] == s.cta_end[c]
        for (a0, a1), (b0, b1) in zip(lin, lin[1:]):
            assert a1 == b0
        assert np.all(np.diff(rows["unit"]) > 0)
        for i, r in enumerate(rows):
            whole = r["tile_begin"] == 0 and r["tile_end"] == ut[int(r["unit"])]
            assert bool(r["partial"]) == (not whole)
            if 0 < i < len(rows) - 1:
                assert whole, f"CTA {c}: middle segment {i} must cover its unit"
            if r["partial"]:
                assert r["slot"] == 2 * c + (0 if i == 0 else 1)

    # A partial unit is made of consecutive CTAs, in CTA order, and never of a
    # single contributor.
    assert not np.any(s.contributors == 1)
    for u in s.partial_units():
        rows = seg[seg["unit"] == u]
        assert np.all(rows["partial"])
        np.testing.assert_array_equal(np.diff(rows["cta"]), 1)
        np.testing.assert_array_equal(rows["tile_begin"][1:], rows["tile_end"][:-1])
        assert len(rows) == s.contributors[u]
        # At most two partial segments per CTA in the whole schedule.
    counts = np.bincount(seg["cta"][seg["partial"]], minlength=ncta)
    assert counts.max(initial=0) <= 2


@given(st.integers(1, 3000), st.integers(1, 400))
@example(1, 1)
@example(7, 7)
@example(7, 8)
@example(7, 1000)
@example(1000, 7)
@example(1001, 1000)
def test_lean_cta_of_tile(total, num_ctas):
    ncta = min(total, num_ctas)
    s = lean_schedule([total], 1, tile_size=1, num_ctas=num_ctas)
    owner = lean_cta_of_tile(total, ncta, np.arange(total))
    expect = np.repeat(np.arange(ncta), s.cta_end - s.cta_start)
    np.testing.assert_array_equal(owner, expect)


# ------------------------------------------------------------------ split / head

@given(lens_st, heads_st, tile_st, splits_st)
@with_edges([(lens, h, ts, min(n, 9)) for lens, h, ts, n in EDGE])
@example([64, 1, 0, 33], 2, 16, 4)  # more splits than tiles in some units
def test_split_schedule(lens, heads_kv, tile_size, num_splits):
    s = split_schedule(lens, heads_kv, tile_size=tile_size, num_splits=num_splits)
    ut = check_common(s, lens, heads_kv, tile_size)
    nunits = len(ut)
    assert s.kind == ("head" if num_splits == 1 else "split")
    assert s.num_splits == num_splits
    assert s.num_ctas == nunits * num_splits
    assert s.heavy_ctas == 0
    chunk = [-(-n // num_splits) for n in ut]
    assert s.max_tiles == max(chunk, default=0)

    seg = s.segments
    # One CTA per (unit, chunk), at most one segment per CTA.
    assert len(np.unique(seg["cta"])) == len(seg)
    for c in range(s.num_ctas):
        u, j = divmod(c, num_splits)
        t0 = min(j * chunk[u], ut[u])
        t1 = min(t0 + chunk[u], ut[u])
        assert (int(s.cta_start[c]), int(s.cta_end[c])) == (t0, t1)
        rows = seg[seg["cta"] == c]
        if t1 == t0:
            assert len(rows) == 0
        else:
            (r,) = rows
            assert (int(r["unit"]), int(r["tile_begin"]), int(r["tile_end"])) == (u, t0, t1)
            # Split writes every chunk to the workspace (slot = CTA), head never.
            assert bool(r["partial"]) == (num_splits > 1)
            assert r["slot"] == (c if num_splits > 1 else -1)
    # Per-CTA work: at most one chunk.
    per = s.tiles_per_cta()
    for c in range(s.num_ctas):
        assert per[c] <= chunk[c // num_splits]


@given(lens_st, heads_st, tile_st)
@with_edges([(lens, h, ts) for lens, h, ts, _ in EDGE])
def test_head_schedule(lens, heads_kv, tile_size):
    s = head_schedule(lens, heads_kv, tile_size=tile_size)
    ut = check_common(s, lens, heads_kv, tile_size)
    assert s.kind == "head" and s.num_splits == 1
    assert s.num_ctas == len(ut)
    seg = s.segments
    assert not seg["partial"].any()
    assert np.all(s.contributors == 0)
    assert len(seg) == sum(1 for n in ut if n)
    np.testing.assert_array_equal(seg["cta"], seg["unit"])
    np.testing.assert_array_equal(s.tiles_per_cta(), ut)


@given(st.lists(st.integers(0, 10**6), max_size=6), st.integers(1, 4096))
@example([], 16)
@example([0, 1, 15, 16, 17], 16)
def test_tiles_per_sequence(lens, tile_size):
    np.testing.assert_array_equal(tiles_per_sequence(lens, tile_size),
                                  [math.ceil(n / tile_size) for n in lens])


# ------------------------------------------------------------------ num_splits_heuristic

def _spec_heuristic(num_units, max_unit_tiles, num_sms, max_splits):
    """The docstring of num_splits_heuristic, as a brute-force search."""
    if num_units <= 0 or max_unit_tiles <= 0 or num_units >= 0.8 * num_sms:
        return 1
    limit = max(1, min(max_splits, num_sms, max_unit_tiles))
    cands = [s for s in range(1, limit + 1)
             if s == 1 or -(-max_unit_tiles // s) != -(-max_unit_tiles // (s - 1))]
    eff = {}
    for s in cands:
        w = num_units * s / num_sms
        eff[s] = w / math.ceil(w)
    best = max(eff.values())
    return min(s for s in cands if eff[s] >= 0.85 * best)


@given(st.integers(-2, 300), st.integers(-1, 5000), st.integers(1, 264), st.integers(1, 128))
@example(0, 100, 132, 128)  # no units
@example(8, 0, 132, 128)  # empty units
@example(106, 1000, 132, 128)  # >= 80% of the SMs: no split
@example(105, 1000, 132, 128)
@example(1, 1, 132, 128)  # one tile: cannot split
@example(1, 10_000, 132, 128)
@example(8, 1000, 132, 128)
@example(3, 5, 132, 4)
def test_num_splits_heuristic(num_units, max_unit_tiles, num_sms, max_splits):
    r = num_splits_heuristic(num_units, max_unit_tiles, num_sms, max_splits)
    assert isinstance(r, int)
    assert 1 <= r <= max(1, min(max_splits, num_sms, max(max_unit_tiles, 1)))
    assert r == _spec_heuristic(num_units, max_unit_tiles, num_sms, max_splits)
    if num_units <= 0 or max_unit_tiles <= 0 or num_units >= 0.8 * num_sms:
        assert r == 1


def test_num_splits_heuristic_known_values():
    # B=1, 8 KV heads on a 132-SM H100 with a long context: 15 splits fill
    # 120 of 132 SMs (0.91), 14 only 112 (0.85 - just below the threshold).
    assert num_splits_heuristic(8, 1000, 132) == 15
    assert num_splits_heuristic(132, 1000, 132) == 1
    assert num_splits_heuristic(1, 1, 132) == 1
    assert num_splits_heuristic(1, 3, 132) == 3  # as many splits as tiles


# ------------------------------------------------------------------ argument checks

@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: lean_schedule([3, -1], 1, tile_size=4, num_ctas=2), ValueError, r"kv_lens.*-1"),
        (lambda: lean_schedule([3.0], 1, tile_size=4, num_ctas=2), TypeError, r"kv_lens.*float"),
        (lambda: lean_schedule([[3]], 1, tile_size=4, num_ctas=2), ValueError, r"kv_lens.*\(1, 1\)"),
        (lambda: lean_schedule([3], 0, tile_size=4, num_ctas=2), ValueError, r"heads_kv.*0"),
        (lambda: lean_schedule([3], 1, tile_size=0, num_ctas=2), ValueError, r"tile_size.*0"),
        (lambda: lean_schedule([3], 1, tile_size=4, num_ctas=0), ValueError, r"num_ctas.*0"),
        (lambda: lean_schedule([3], 1, tile_size=4, num_ctas=True), TypeError, r"num_ctas.*True"),
        (lambda: lean_schedule([3], 1, tile_size=4.0, num_ctas=2), TypeError, r"tile_size.*4\.0"),
        (lambda: split_schedule([3], 1, tile_size=4, num_splits=0), ValueError, r"num_splits.*0"),
    ],
)
def test_schedule_rejects_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------ describe / plot

def _field(text, name):
    m = re.search(rf"^{name}\s+(\S+)", text, flags=re.M)
    assert m, f"{name!r} missing from describe():\n{text}"
    return m.group(1)


@given(lens_st, heads_st, tile_st, ctas_st, st.sampled_from(["lean", "split", "head"]))
@with_edges([ex + ("lean",) for ex in EDGE] + [ex[:3] + (3, "split") for ex in EDGE[:3]])
def test_describe(lens, heads_kv, tile_size, num_ctas, kind):
    if kind == "lean":
        s = lean_schedule(lens, heads_kv, tile_size=tile_size, num_ctas=num_ctas)
    elif kind == "split":
        s = split_schedule(lens, heads_kv, tile_size=tile_size, num_splits=min(num_ctas, 9))
    else:
        s = head_schedule(lens, heads_kv, tile_size=tile_size)
    text = s.describe()
    assert isinstance(text, str)
    assert _field(text, "schedule") == s.kind
    assert int(_field(text, "batch")) == len(lens)
    assert int(_field(text, "heads_kv")) == heads_kv
    assert int(_field(text, "units")) == s.num_units
    assert int(_field(text, "tile_size")) == tile_size
    assert int(_field(text, "total_tiles")) == s.total_tiles
    assert int(_field(text, "num_ctas")) == s.num_ctas
    assert int(_field(text, "segments")) == len(s.segments)
    assert int(_field(text, "partial units")) == len(s.partial_units())
    if kind == "lean":
        assert int(_field(text, "max_tiles")) == s.max_tiles
        assert int(_field(text, "heavy_ctas")) == s.heavy_ctas
    else:
        assert int(_field(text, "num_splits")) == s.num_splits
    if s.num_ctas:
        per = s.tiles_per_cta()
        assert re.search(rf"tiles per CTA\s+min {per.min()}\s+max {per.max()}\b", text)
    if kind == "lean" and s.total_tiles:
        bal = float(_field(text, "balance"))
        assert bal == pytest.approx(s.total_tiles / (s.num_ctas * s.max_tiles), abs=1e-3)
        assert 0 < bal <= 1


@pytest.mark.parametrize(
    "make",
    [
        lambda: lean_schedule([300, 5, 0, 77], 3, tile_size=16, num_ctas=7),
        lambda: lean_schedule([0, 0], 2, tile_size=16, num_ctas=7),  # nothing to draw
        lambda: lean_schedule([3000] * 4, 8, tile_size=16, num_ctas=132),  # > max_ctas rows
        lambda: split_schedule([40, 7], 2, tile_size=16, num_splits=3),
        lambda: head_schedule([40, 7], 2, tile_size=16),
    ],
)
def test_plot_writes_png(make, tmp_path):
    s = make()
    path = tmp_path / "schedule.png"
    ret = s.plot(path)
    assert ret == path
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 1000


def test_public_names():
    for name in ("attention", "merge_states", "lean_schedule", "split_schedule", "head_schedule",
                 "num_splits_heuristic", "Schedule", "reference"):
        assert hasattr(cupy_lean, name)
    assert isinstance(lean_schedule([1], 1, tile_size=1, num_ctas=1), cupy_lean.Schedule)


def test_describe_and_plot_say_which_grid_they_assumed(tmp_path):
    s = cupy_lean.lean_schedule([300, 0, 5], 2, tile_size=16, num_ctas=20)
    assert "num_ctas          20  (2 CTAs per SM on 10 SMs)" in s.describe(grid_note="2 CTAs per SM on 10 SMs")
    pytest.importorskip("matplotlib")
    path = tmp_path / "s.png"
    s.plot(str(path), grid_note="2 CTAs per SM on 10 SMs")
    assert path.stat().st_size > 1000


@given(st.lists(st.integers(0, 3000), min_size=1, max_size=8), st.integers(1, 4), st.integers(1, 300),
       st.integers(1, 40))
@example([100], 1, 132, 8)
@example([0, 0], 2, 5, 3)
def test_min_tiles_per_cta_bounds_the_grid(lens, hkv, num_ctas, min_tiles):
    plain = lean_schedule(lens, hkv, tile_size=16, num_ctas=num_ctas)
    s = lean_schedule(lens, hkv, tile_size=16, num_ctas=num_ctas, min_tiles_per_cta=min_tiles)
    assert s.num_ctas == (min(num_ctas, max(1, s.total_tiles // min_tiles)) if s.total_tiles else 0)
    if s.num_ctas > 1:
        assert s.tiles_per_cta().min() >= min(min_tiles, plain.tiles_per_cta().max())
    assert s.num_ctas <= plain.num_ctas
    _assert_emulation_is_the_reference(s, lens, hkv)


def _assert_emulation_is_the_reference(sched, lens, hkv):
    """``sched`` (built for ``lens``) run by emulate gives the reference."""
    from cupy_lean import reference

    rng = np.random.default_rng(len(lens))
    q = rng.standard_normal((len(lens), hkv * 2, 8))
    k = rng.standard_normal((len(lens), max(max(lens), 1), hkv, 8))
    v = rng.standard_normal(k.shape)
    got = reference.emulate(sched, q, k, v, kv_lens=lens)
    want = reference.attention(q, k, v, kv_lens=lens)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-9, atol=1e-12)


def test_min_tiles_per_cta_is_checked():
    with pytest.raises(ValueError, match="min_tiles_per_cta: expected an integer >= 1, got 0"):
        lean_schedule([10], 1, tile_size=16, num_ctas=4, min_tiles_per_cta=0)


@given(st.integers(0, 200_000), st.integers(1, 64), st.sampled_from([16, 32, 64, 128, 256]),
       st.sampled_from([16, 32, 64, 128]))
def test_merge_balanced_tiles_is_the_smallest_square_root(longest, a, rows, tile):
    from cupy_lean.schedule import merge_balanced_tiles

    n = merge_balanced_tiles(longest, a, rows, tile)
    v = a * longest * rows
    assert n >= 1 and n * n * tile >= v
    assert n == 1 or (n - 1) * (n - 1) * tile < v


@given(st.integers(0, 2000), st.integers(1, 512), st.sampled_from([1024, 2048, 4096, 8192, 16384, 32768]))
@example(62, 12, 64 * 256)
@example(15, 16, 8192)
@example(16, 512, 1024)
def test_merge_group_size_bounds_the_serial_merge(n, rows, scratch):
    """The kernel's two-level merge: none below MERGE_TREE_FROM pieces; else
    groups of G >= 2 whose maxima and sums fit the scratch, G the ceiling of
    sqrt(n) unless the scratch caps it, so the last group and the unit merge
    together touch at most G + ceil(n / G) states."""
    from cupy_lean.schedule import MERGE_TREE_FROM, merge_group_size

    g = merge_group_size(n, rows, scratch)
    if n < MERGE_TREE_FROM or (scratch // rows - 2) // 2 < 2:
        assert g == 0
        return
    assert 2 <= g and (2 * g + 2) * rows <= scratch
    assert g <= math.isqrt(n - 1) + 1
    if (scratch // rows - 2) // 2 >= math.isqrt(n - 1) + 1:
        assert (g - 1) ** 2 < n <= g * g
        assert g + -(-n // g) <= 2 * math.isqrt(n) + 3


def _kernel_merge_protocol(sched, rows, scratch, rng):
    """The kernel's arrival-and-merge protocol (finish_segment's level loop)
    played over a lean schedule with contributors arriving in a random order:
    returns, per unit, the labels its final merge read, and the counters at
    the end. A state is labelled ("s", j) (contributor j's own) or ("g", q)
    (group q's merge, stored in place in its first member's slot)."""
    from cupy_lean.schedule import merge_group_size

    units = len(sched.kv_lens) * sched.heads_kv
    counters = np.zeros(units + 2 * sched.num_ctas, np.int64)
    owner = {}  # counter index -> (unit, level, first member): one group or unit each
    content, by_unit, final = {}, {}, {}
    for sg in sched.segments:
        if sg["partial"]:
            by_unit.setdefault(int(sg["unit"]), []).append((int(sg["cta"]), int(sg["slot"])))
    for u, parts in by_unit.items():
        parts.sort()
        first, n = parts[0][0], len(parts)
        assert [c for c, _ in parts] == list(range(first, first + n))
        for j, (c, sl) in enumerate(parts):
            content[sl] = ("s", j)

        def slot(j):
            return parts[0][1] if j == 0 else 2 * (first + j)  # Contributors::slot

        g = merge_group_size(n, rows, scratch)
        for j in rng.permutation(n):
            level = 0 if g else 1
            while True:
                q0 = int(j) // g * g if level == 0 else 0
                idx = units + slot(q0) if level == 0 else u
                assert owner.setdefault(idx, (u, level, q0)) == (u, level, q0)
                members = min(g, n - q0) if level == 0 else (-(-n // g) if g else n)
                counters[idx] += 1
                if counters[idx] != members:
                    break
                step = g if (level == 1 and g) else 1
                read = [slot(q0)] + [2 * (first + q0 + step) + (i - 1) * 2 * step for i in range(1, members)]
                labels = [content[x] for x in read]
                counters[idx] = 0  # the merger resets the counter
                if level == 1:
                    final[u] = labels
                    break
                assert labels == [("s", q0 + i) for i in range(members)]
                content[slot(q0)] = ("g", q0 // g)
                level = 1
    return by_unit, final, counters


@given(st.lists(st.integers(0, 5000), min_size=1, max_size=4), st.integers(1, 3), st.sampled_from([16, 32, 64]),
       st.integers(1, 300), st.sampled_from([1, 8, 16, 64]), st.sampled_from([64, 128, 256]), st.integers(0, 99))
@example([63828], 2, 64, 132, 16, 256, 0)
def test_two_level_merge_reads_every_state_once(lens, hkv, tile, num_ctas, rows, head_dim, seed):
    """Whatever order the contributors arrive in, every partial unit is
    merged exactly once, from every contributor's state exactly once
    (through its group's state from 16 pieces on), no two groups or units
    share a counter, the counters fit the workspace's (units + 2 x grid)
    and are all back at zero: the kernel's protocol, mirrored."""
    from cupy_lean.schedule import merge_group_size

    sched = lean_schedule(lens, hkv, tile_size=tile, num_ctas=num_ctas)
    by_unit, final, counters = _kernel_merge_protocol(sched, rows, tile * head_dim, np.random.default_rng(seed))
    assert set(final) == set(by_unit) and not counters.any()
    for u, parts in by_unit.items():
        n = len(parts)
        g = merge_group_size(n, rows, tile * head_dim)
        want = [("g", q) for q in range(-(-n // g))] if g else [("s", j) for j in range(n)]
        assert final[u] == want


def test_emulate_merges_a_unit_of_many_pieces_in_groups():
    """emulate follows the kernel's grouping (float64: the same result as one
    merge to rounding), and the grouping is what merge_group_size gives."""
    from cupy_lean import reference
    from cupy_lean.schedule import merge_group_size

    rng = np.random.default_rng(5)
    lens = np.array([3001, 2999])
    q = rng.standard_normal((2, 8, 64))
    k = rng.standard_normal((2, 3001, 1, 64))
    v = rng.standard_normal((2, 3001, 1, 64))
    sch = lean_schedule(lens, 1, tile_size=16, num_ctas=120)
    pieces = np.bincount(sch.segments["unit"][sch.segments["partial"].astype(bool)])
    assert pieces.min() >= 16 and merge_group_size(int(pieces.min()), 8, 16 * 64) >= 4
    out, lse = reference.emulate(sch, q, k, v, kv_lens=lens)
    ref, ref_lse = reference.attention(q, k, v, kv_lens=lens)
    assert np.abs(out - ref).max() < 1e-12 and np.abs(lse - ref_lse).max() < 1e-12


@given(st.lists(st.integers(0, 30000), min_size=1, max_size=6), st.integers(1, 4), st.integers(1, 300),
       st.sampled_from([1, 2, 8]), st.sampled_from([16, 64, 128]))
@example([24050], 1, 132, 1, 64)
def test_merge_balance_bounds_the_pieces_of_a_unit(lens, hkv, num_ctas, a, rows):
    """With the merge balance every range holds at least n tiles (the last
    CTAs one less: ranges differ by at most one), so the longest unit is cut
    into at most longest / (n - 1) + 1 pieces, and the schedule still
    computes the reference."""
    from cupy_lean.schedule import merge_balanced_tiles

    tile = 16
    plain = lean_schedule(lens, hkv, tile_size=tile, num_ctas=num_ctas)
    s = lean_schedule(lens, hkv, tile_size=tile, num_ctas=num_ctas, merge_balance=a, state_rows=rows)
    assert s.num_ctas <= plain.num_ctas
    if s.total_tiles:
        longest = int(s.unit_tiles.max())
        n = merge_balanced_tiles(longest, a, rows, tile)
        assert s.num_ctas == min(num_ctas, s.total_tiles, max(1, s.total_tiles // n))
        if s.num_ctas > 1:
            assert s.tiles_per_cta().min() >= min(n, plain.tiles_per_cta().max())
    lens_small = [x // 64 for x in lens]  # the same rule on a problem the reference computes quickly
    s2 = lean_schedule(lens_small, hkv, tile_size=1, num_ctas=num_ctas, merge_balance=a, state_rows=rows)
    _assert_emulation_is_the_reference(s2, lens_small, hkv)


def test_merge_balance_is_checked():
    with pytest.raises(ValueError, match="merge_balance: expected an integer >= 0, got -1"):
        lean_schedule([10], 1, tile_size=16, num_ctas=4, merge_balance=-1)
    for bad in (1.5, True, "2"):  # not an integer: TypeError, as the other integer arguments
        with pytest.raises(TypeError, match=f"merge_balance: expected an integer >= 0, got {type(bad).__name__}"):
            lean_schedule([10], 1, tile_size=16, num_ctas=4, merge_balance=bad)


# ------------------------------------------------------------------ uniform_variant

def _spec_variant_time(ctas, chunk, grid, tile_us, sat=0.8):
    """The docstring's streaming model in microseconds: waves of at most
    ``grid`` CTAs one after the other, a wave of w CTAs of ``chunk`` tiles
    costing ``chunk * max(w, sat * grid) * tile_us`` (tile_us 0: tiles)."""
    waves = [grid] * (ctas // grid) + ([ctas % grid] if ctas % grid else [])
    return sum(chunk * max(w, sat * grid) for w in waves) * (tile_us or 1)


@given(st.integers(-1, 400), st.integers(-1, 3000), st.integers(1, 300), st.integers(1, 264),
       st.sampled_from([0.0, 0.003, 0.01, 0.03, 0.1]), st.sampled_from([0, 272, 4128, 16 * 258 * 4, 128 * 258 * 4]),
       st.sampled_from([1, 2, 7, 12, 64]), st.sampled_from([None, 0.5, 0.7, 1.0]))
@example(2, 987, 132, 132, 0.0068, 12 * 258 * 4, 1, None)  # 59 chunks of 12 x 258 floats, one combine CTA: no split
@example(2, 987, 132, 132, 0.0068, 12 * 258 * 4, 12, None)  # the same over 12 combine CTAs per unit: split
@example(110, 7, 132, 132, 0.0, 0, 1, None)  # 110 units of 7 tiles: one wave, one CTA per unit
@example(180, 111, 132, 132, 0.0, 0, 1, None)  # 180 units: a second wave of 48 CTAs -> stream-K
@example(154, 26, 132, 132, 0.013, 0, 1, None)
@example(22, 20, 132, 132, 0.0, 0, 1, None)  # few units: split
@example(12, 7, 132, 132, 0.0, 0, 1, None)
@example(132, 5, 132, 132, 0.0, 0, 1, None)  # one CTA per unit fills the GPU exactly
@example(1, 1, 132, 132, 0.0, 0, 1, None)
@example(0, 10, 132, 132, 0.0, 0, 1, None)
@example(36, 8, 132, 132, 0.0137, 0, 1, None)  # a cut's cost decides: split although it streams 1.1x longer
@example(75, 13, 132, 132, 0.0136, 0, 1, None)  # the heuristic's 3 chunks need two waves: one CTA per unit or stream-K
@example(47, 14, 132, 132, 0.0068, 0, 1, None)  # 5 chunks (two waves) -> 2
@example(47, 1286, 132, 132, 0.0068, 0, 1, 0.7)  # 2 chunks per unit on 94 CTAs: saturating at 0.7 of the grid
@example(47, 1286, 132, 132, 0.0068, 0, 1, None)  # ... not at 0.8 (the default): stream-K
def test_uniform_variant(units, tiles, grid, num_sms, tile_us, state_bytes, rows, sat):
    kw = {} if sat is None else {"saturation": sat}
    sat = 0.8 if sat is None else sat  # the default
    v = uniform_variant(units, tiles, grid, num_sms, tile_us=tile_us, state_bytes=state_bytes, unit_rows=rows, **kw)
    assert isinstance(v, int)
    if units <= 0 or tiles <= 0:
        assert v == 0
        return
    ns = min(num_splits_heuristic(units, tiles, num_sms), max(1, grid // units))  # one wave at most
    def cta_bytes(n):  # what one combine CTA reads: every chunk's state of its share of the rows
        return n * state_bytes * -(-rows // combine_row_blocks(units, rows, num_sms, n)) / rows

    assert v in (0, 1, ns) and (v <= 1 or cta_bytes(v) <= 256 * 1024)
    assert units * v <= max(grid, units)  # a split's CTAs fit one wave
    total = units * tiles
    g = min(grid, total)
    sk = total / g * max(g, sat * grid) * (tile_us or 1)  # stream-K: one wave of g CTAs, equal shares
    limit = 1.02 * sk + (2.0 if tile_us else 0.0)
    cands = {n: _spec_variant_time(units * n, -(-tiles // n), grid, tile_us, sat) for n in (1, ns)
             if n == 1 or cta_bytes(n) <= 256 * 1024}  # a combine CTA reading more than 256 KB: no candidate
    best = min(cands.values())
    if v == 0:
        assert best > limit * (1 - 1e-12)
    else:
        assert math.isclose(cands[v], best) and cands[v] <= limit * (1 + 1e-12)
        assert v == 1 or cands[1] > best  # one CTA per unit on a tie


def test_uniform_variant_saturation():
    """The saturating fraction decides a split that fills part of the GPU:
    47 units of 1286 tiles on 132 SMs split in two chunks run 94 CTAs (0.71
    of the grid), as fast as stream-K's 132 when 0.7 of the grid saturates
    DRAM, 0.71 / 0.8 as fast when 0.8 does (the default: stream-K); the
    value is checked, here and as the TUNING key the plan reads."""
    assert uniform_variant(47, 1286, 132, 132, tile_us=0.0068, saturation=0.7) == 2
    assert uniform_variant(47, 1286, 132, 132, tile_us=0.0068) == 0
    assert uniform_variant(47, 1286, 132, 132, tile_us=0.0068, saturation=0.6) == 2
    for bad in (0, 0.0, -0.5, 1.5, True, "0.7", None):
        with pytest.raises(ValueError, match=r"saturation: expected a number in \(0, 1\], got"):
            uniform_variant(47, 1286, 132, 132, saturation=bad)
    from cupy_lean import kernels as K

    assert K.uniform_saturation() == K.TUNING["uniform_saturation"] == 0.8
    for bad in (0, 2, False, "x"):  # refused where it is set, nothing changed
        with pytest.raises(ValueError, match=r'TUNING\["uniform_saturation"\] must be a number in \(0, 1\]'):
            with K.tuning(uniform_saturation=bad):
                pass
        assert K.TUNING["uniform_saturation"] == 0.8
        dict.__setitem__(K.TUNING, "uniform_saturation", bad)  # past the check: its reader refuses it too
        try:
            with pytest.raises(ValueError, match=r'TUNING\["uniform_saturation"\] must be a number in \(0, 1\]'):
                K.uniform_saturation()
        finally:
            dict.__setitem__(K.TUNING, "uniform_saturation", 0.8)
    with K.tuning(uniform_saturation=1):
        assert K.uniform_saturation() == 1.0


def _rel_mirror(points, f, bound):
    """partial_grid_time's rule written out: the points made non-increasing
    in the fraction (each the largest time at or above it), linear between,
    scaled by first / f below the first, the last above; then at least 1 and
    at least bound / f."""
    fs = [p[0] for p in points]
    env = [max(r for _, r in points[i:]) for i in range(len(points))]
    if f <= fs[0]:
        r = env[0] * fs[0] / f
    else:
        r = float(np.interp(f, fs, env))
    return max(1.0, r, bound / f)


@given(st.integers(1, 400), st.integers(1, 3000), st.sampled_from([132, 264, 108]), st.sampled_from([64, 128, 256]),
       st.sampled_from([0.0, 0.003, 0.01, 0.03]), st.sampled_from([0.0, 0.3, 0.46, 0.7]))
@example(104, 34, 132, 64, 0.0098, 0.451)  # H100 b26 4/4 d64 4329: one CTA per unit 41.8 us, stream-K 46.8
@example(50, 1126, 132, 64, 0.0098, 0.451)  # H100 b10 25/5 d64 144k: stream-K 640.8 us, 2 chunks 671.6
@example(36, 795, 132, 256, 0.0196, 0.415)  # H100 b3 36/12 d256 50.8k: 3 chunks 598.4 us, stream-K 625.4
def test_uniform_variant_rates_model(units, tiles, grid, d, tile_us, bound):
    """With measured rates (kernels.TUNING["partial_grid_time"]) the model
    prices a wave of w CTAs at w x rel(min(1, w / SMs)) (the points were
    measured per SM: a grid of two CTAs per SM is full from one per SM on)
    and stream-K at its CTAs x rel, no slack: the variant returned is the cheapest candidate within
    stream-K's time + cut_us, one CTA per unit on a tie, else stream-K."""
    from cupy_lean import kernels as K

    points = K.TUNING["partial_grid_time"][str(d)]
    v = uniform_variant(units, tiles, grid, 132, tile_us=tile_us, partial_grid=points, cta_bound=bound, slack=0.0)
    ns = min(num_splits_heuristic(units, tiles, 132), max(1, grid // units))
    assert v in (0, 1, ns)

    def model(ctas, chunk):
        t, n = 0.0, ctas
        while n > 0:
            w = min(n, grid)
            t += chunk * w * _rel_mirror(points, min(1.0, w / 132), bound)  # the points are per SM
            n -= w
        return t * (tile_us or 1)

    total = units * tiles
    g = min(grid, total)
    limit = model(g, total / g) + (2.0 if tile_us else 0.0)
    cands = {n: model(units * n, -(-tiles // n)) for n in (1, ns)}
    best = min(cands.values())
    if v == 0:
        assert best > limit * (1 - 1e-12)
    else:
        assert math.isclose(cands[v], best) and cands[v] <= limit * (1 + 1e-12)
        assert v == 1 or cands[1] > best


def test_partial_grid_time_and_the_model_args():
    """partial_grid_time: non-increasing envelope of the points, linear
    between, CTA-rate scaling below the first; bad tables are refused. The
    plan's arguments (kernels.uniform_model_args) follow TUNING: the rates
    model by default, the saturation step on request, bad values named by
    their key."""
    from cupy_lean import kernels as K
    from cupy_lean.schedule import partial_grid_time

    pts = ((0.25, 1.5), (0.5, 1.0), (0.75, 1.1), (1.0, 1.0))
    assert partial_grid_time(pts, 0.5) == 1.1  # the dip at 0.75 lifts 0.5 to it: fewer CTAs are never cheaper
    assert partial_grid_time(pts, 0.125) == 3.0 and partial_grid_time(pts, 1.0) == 1.0
    assert math.isclose(partial_grid_time(pts, 0.875), 1.05)
    for bad in ((), ((0.5, 1.0), (0.5, 1.0)), ((0.0, 1.0),), ((1.5, 1.0),), ((0.5, -1.0),), ((0.5,),), "x", None):
        with pytest.raises(ValueError, match="partial_grid: expected"):
            partial_grid_time(bad, 0.5)
    with pytest.raises(ValueError, match="cta_bound: expected a finite number >= 0"):
        uniform_variant(10, 10, 132, 132, partial_grid=pts, cta_bound=-1)
    a = K.uniform_model_args(128, 132, 3.352e6)
    assert K.TUNING["uniform_model"] == "rates" and a["slack"] == 0.0
    assert a["partial_grid"] == tuple(map(tuple, K.TUNING["partial_grid_time"]["128"]))
    with K.tuning(partial_grid_time={128: [[1.0, 1.0]]}, cta_stream_gbs={128: 50}):  # int keys are taken too
        assert K.uniform_model_args(128, 132, 3.352e6)["partial_grid"] == ((1.0, 1.0),)
    assert math.isclose(a["cta_bound"], 0.9 * 3352 / (63.7 * 132))  # ~0.36 of an H100's SMs at head_dim 128
    with K.tuning(uniform_model="saturation", uniform_saturation=0.7):
        assert K.uniform_model_args(128, 132, 3.352e6) == {"saturation": 0.7}
    for key, val, msg in (("uniform_model", "steps", r'TUNING\["uniform_model"\] must be "rates" or "saturation"'),
                          ("partial_grid_time", {"64": []}, r'TUNING\["partial_grid_time"\] must be a dict'),
                          ("cta_stream_gbs", {"128": 0}, r'TUNING\["cta_stream_gbs"\] must be a dict .* positive'),
                          ("read_fraction", 1.5, r'TUNING\["read_fraction"\] must be a number in \(0, 1\]'),
                          ("read_fraction", True, r'TUNING\["read_fraction"\] must be a number in \(0, 1\]'),
                          ("cta_stream_gbs", {"128": True}, r'TUNING\["cta_stream_gbs"\] must be a dict'),
                          ("cta_stream_gbs", [1.0], r'TUNING\["cta_stream_gbs"\] must be a dict'),
                          ("cta_stream_gbs", {"128": 10**400}, r'TUNING\["cta_stream_gbs"\] must be a dict'),
                          ("partial_grid_time", [[1.0, 1.0]], r'TUNING\["partial_grid_time"\] must be a dict'),
                          ("partial_grid_time", {"128": [[1.0, 10**400]]}, r'TUNING\["partial_grid_time"\] must be')):
        with pytest.raises(ValueError, match=msg):  # refused where it is set, nothing changed
            with K.tuning(**{key: val}):
                pass
        assert K.uniform_model_args(128, 132, 3.352e6) == a
    # values of the right form that this head_dim's plan cannot use: refused by the reader, naming the key
    for key, val, msg in (("partial_grid_time", {"64": [[1.0, 1.0]]}, r'TUNING\["partial_grid_time"\] must map head_dim 128'),
                          ("partial_grid_time", {"128": [[1.5, 1.0]]}, r'TUNING\["partial_grid_time"\] must map'),
                          ("cta_stream_gbs", {"64": 50.0}, r"TUNING\[\"cta_stream_gbs\"\]\['128'\] must be a positive")):
        with K.tuning(**{key: val}):
            with pytest.raises(ValueError, match=msg):
                K.uniform_model_args(128, 132, 3.352e6)


def test_uniform_variant_rates_model_cases():
    """The rates model on measured shapes. H200 (4.8 TB/s, tools/grid_sweep.py;
    the cases the saturation step was fitted to, test_uniform_variant_cases):
    the same choices, the per-CTA bound deciding b18 40/4 d64 (72 CTAs stream
    slower than stream-K's 132 there). H100 (3.35 TB/s, tools/spec_sweep.py,
    seeds 29100101 / 29100303 / 20124321): long calls whose split fills
    0.73-0.85 of the SMs at head_dim 64 or 128 take stream-K (the split lost
    1-5% there), d256 and short calls keep their splits."""
    from cupy_lean import kernels as K

    def pick(u, t, d, hbm, tile=128):
        return uniform_variant(u, t, 132, 132, tile_us=2 * tile * d * 2 / hbm, **K.uniform_model_args(d, 132, hbm))

    h200, h100 = 4.8e6, 3.352e6
    assert pick(110, 7, 128, h200) == 1 and pick(100, 78, 64, h200) == 1
    assert pick(180, 111, 128, h200) == 0 and pick(154, 26, 64, h200) == 0
    assert pick(22, 20, 64, h200) == 5 and pick(36, 8, 128, h200) == 3
    assert pick(72, 56, 64, h200) == 0  # 72 CTAs at ~50 GB/s each: 3.6 of 4.3 TB/s
    assert pick(47, 14, 64, h200) == 2 and pick(75, 3, 64, h200) == 1
    assert pick(50, 1126, 64, h100) == 0  # 640.8 us against 671.6 split in 2
    assert pick(48, 257, 128, h100) == 0  # 266.8 against 281.2
    assert pick(36, 795, 256, h100, tile=64) == 3  # 598.4 against stream-K's 625.4
    assert pick(104, 34, 64, h100) == 1  # 41.8 against 46.8
    assert pick(28, 212, 256, h100, tile=64) == 4 and pick(12, 557, 256, h100, tile=64) == 10


def test_uniform_variant_cases():
    """Measured on an H200 (132 SMs, tools/grid_sweep.py; tile_us: one
    unit's 128-token tile at 4.8 TB/s): these shapes ran fastest (or within
    1%) with the variant the model picks."""
    d128, d64 = 2 * 128 * 128 * 2 / 4.8e6, 2 * 128 * 64 * 2 / 4.8e6
    assert uniform_variant(110, 7, 132, 132, tile_us=d128) == 1  # b55 12/2 d128 870: 15.8 us vs stream-K 20.7
    assert uniform_variant(100, 78, 132, 132, tile_us=d64) == 1  # b25 32/4 d64 9.9k: 60.7 vs 65.8
    assert uniform_variant(180, 111, 132, 132, tile_us=d128) == 0  # b18 80/10 d128 14k: head 1.11x slower
    assert uniform_variant(154, 26, 132, 132, tile_us=d64) == 0  # b11 126/14 d64 3.3k: 1.22x slower
    assert uniform_variant(22, 20, 132, 132, tile_us=d64) == num_splits_heuristic(22, 20, 132) == 5  # 9.9 vs 12.5
    assert uniform_variant(36, 8, 132, 132, tile_us=d128) == 3  # b9 44/4 d128 998: 12.3 vs 17.2
    assert uniform_variant(72, 56, 132, 132, tile_us=d64) != 1  # b18 40/4 d64 7k: head 1.07x slower
    # one wave at most (tools/spec_sweep.py --units 0.3,1.0, seeds 20124060-61): the heuristic's count
    # needs two waves; the one-wave count (2 here, 1 below) took 0.875 and 0.577 of its time
    assert num_splits_heuristic(47, 14, 132) == 5 and uniform_variant(47, 14, 132, 132, tile_us=d64) == 2
    assert num_splits_heuristic(75, 3, 132) == 3 and uniform_variant(75, 3, 132, 132, tile_us=d64) == 1
    d256 = 2 * 64 * 256 * 2 / 4.8e6
    # b1 24/2 d256 63k: 59 chunks of 12 x 258 floats per unit, 1.20x stream-K's time
    assert uniform_variant(2, 987, 132, 132, tile_us=d256) == num_splits_heuristic(2, 987, 132) == 59
    assert uniform_variant(2, 987, 132, 132, tile_us=d256, state_bytes=12 * 258 * 4) == 0
    # the same with the combine spreading each unit's 12 rows over 12 CTAs (61 KB each)
    assert uniform_variant(2, 987, 132, 132, tile_us=d256, state_bytes=12 * 258 * 4, unit_rows=12) == 59
    assert uniform_variant(2, 987, 132, 132, tile_us=d256, state_bytes=12 * 258 * 4, unit_rows=12, head_dim=256,
                           threads=128) == 59  # 30 rounds on one CTA: the rows spread over 12


@given(st.integers(1, 500), st.integers(1, 128), st.integers(1, 300), st.integers(1, 200),
       st.sampled_from([(0, 0), (64, 256), (128, 256), (256, 128), (64, 128)]))
@example(2, 12, 132, 65, (128, 256))  # 65 chunks: 9 rounds on one CTA -> 12 CTAs of one row
@example(15, 11, 132, 6, (128, 256))  # 6 chunks: one round -> one CTA per unit
@example(132, 8, 132, 40, (64, 256))
@example(500, 64, 132, 100, (256, 128))
def test_combine_row_blocks(units, rows, num_sms, states, dims):
    """CTAs per unit of the combine launch: one where a CTA merges the
    unit in one load round; else the finest even row split one wave of
    num_sms CTAs holds, at most one row per CTA, every CTA with rows."""
    head_dim, threads = dims
    n = combine_row_blocks(units, rows, num_sms, states, head_dim, threads)
    assert 1 <= n <= rows
    if head_dim and merge_batches(rows, states, head_dim, threads) <= 1:
        assert n == 1
        return
    assert n == 1 or units * n <= num_sms
    per = -(-rows // n)
    assert (n - 1) * per < rows  # the last CTA has rows
    cap = min(rows, max(1, num_sms // units))  # the most CTAs per unit one wave holds
    assert per == -(-rows // cap)  # as few rows per CTA as that allows


def test_merge_batches_cases():
    """Load rounds of one combine CTA (the kernel's reduce_unit): 16 float4
    loads in flight per thread at head_dim >= 128, 8 below."""
    assert merge_batches(12, 65, 128, 256) == 9  # 384 float4 a state, 2 a thread, 8 states a round
    assert merge_batches(1, 65, 128, 256) == 1  # one row: 8 lanes share it, 16 states each a round
    assert merge_batches(1, 129, 128, 256) == 2
    assert merge_batches(11, 12, 256, 128) == 6  # 704 float4 over 128 threads: 8 each, 2 states a round
    assert merge_batches(11, 6, 128, 256) == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(rows=0, num_states=2, head_dim=128, threads=256), "rows"),
    (dict(rows=4, num_states=0, head_dim=128, threads=256), "num_states"),
    (dict(rows=4, num_states=2, head_dim=0, threads=256), "head_dim"),
    (dict(rows=4, num_states=2, head_dim=128, threads=0), "threads"),
    (dict(rows=4, num_states=2, head_dim=48, threads=256), "multiples of 32"),
    (dict(rows=4, num_states=2, head_dim=128, threads=100), "multiples of 32"),
])
def test_merge_batches_validates(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        merge_batches(**kwargs)
    if kwargs["head_dim"] > 0:  # combine_row_blocks checks the same through it
        with pytest.raises((ValueError, TypeError), match=match):
            combine_row_blocks(3, kwargs["rows"], 132, kwargs["num_states"], kwargs["head_dim"], kwargs["threads"])


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_combine_row_blocks_validates(bad):
    for args, name in (((bad, 4, 132), "num_units"), ((4, bad, 132), "unit_rows"), ((4, 4, bad), "num_sms"),
                       ((4, 4, 132, bad), "num_states")):
        with pytest.raises((ValueError, TypeError), match=name):
            combine_row_blocks(*args)


def test_merges_by_launch_rule_and_the_schedule_flag():
    """The default plan's merge rule: the combine launch from ``pieces`` CTAs
    per unit on (0: never); lean_schedule records it, checks its type, and
    describe() says which merge runs."""
    from cupy_lean.schedule import merges_by_launch

    assert merges_by_launch(132, 16, 8) and not merges_by_launch(132, 17, 8)
    assert not merges_by_launch(132, 1, 0) and not merges_by_launch(132, 0, 8)
    with pytest.raises(TypeError, match="pieces"):
        merges_by_launch(132, 4, 8.0)
    s = lean_schedule([900, 5, 0], 2, tile_size=16, num_ctas=132, merge_launch=True)
    assert s.merge_launch and "by the combine launch" in s.describe()
    assert "in the kernel" in lean_schedule([900, 5, 0], 2, tile_size=16, num_ctas=132).describe()
    with pytest.raises(TypeError, match="merge_launch"):
        lean_schedule([900], 1, tile_size=16, num_ctas=8, merge_launch=1)


def test_runtime_split_chunks_rule():
    """The launch-time choice of split-K in one wave over stream-K (with the
    merge launch): split when its busiest CTA streams at most split_slack_tiles
    tiles more than stream-K's; the kernel's rule, mirrored (the GPU test replays
    lengths on both sides of it)."""
    from cupy_lean.schedule import runtime_split_chunks

    # 3 units, 132 CTAs: 44 chunks per unit
    assert runtime_split_chunks([3000, 2990, 3001], 1, 16, 132) == 44  # 188 tiles: 5 per chunk, 5 per CTA
    assert runtime_split_chunks([9001, 1, 0], 1, 16, 132) == 0  # 563 tiles: 13 per chunk against 5
    assert runtime_split_chunks([17, 5000, 9001], 1, 16, 132) == 0
    assert runtime_split_chunks([0, 0, 0], 1, 16, 132) == 0
    assert runtime_split_chunks([4000, 4000, 4000], 1, 16, 132) == 44
    # more units than CTAs: no split
    assert runtime_split_chunks([100] * 200, 1, 16, 132) == 0
    # a slack of 8 tiles: 13 per chunk against 5 is taken
    assert runtime_split_chunks([9001, 1, 0], 1, 16, 132, split_slack_tiles=8) == 44
    assert runtime_split_chunks([9001, 1, 0], 1, 16, 132, split_slack_tiles=7) == 0
    # the in-kernel merge's form: a factor on stream-K's busiest CTA, no slack
    assert runtime_split_chunks([9001, 1, 0], 1, 16, 132, split_slack_tiles=0, split_scale=2) == 0  # 13 > 10
    assert runtime_split_chunks([9001, 1, 0], 1, 16, 132, split_slack_tiles=3, split_scale=2) == 44  # 13 <= 13
    assert runtime_split_chunks([3000, 2990, 3001], 1, 16, 132, split_slack_tiles=0) == 44  # 5 <= 5
    # 376 tiles: 3 per stream-K CTA, 6 per chunk of the longest unit
    assert runtime_split_chunks([1000, 1000, 4000], 1, 16, 132, split_slack_tiles=0) == 0
    assert runtime_split_chunks([1000, 1000, 4000], 1, 16, 132, split_slack_tiles=2) == 0
    assert runtime_split_chunks([1000, 1000, 4000], 1, 16, 132, split_slack_tiles=0, split_scale=2) == 44
    # the cap on the factor's share: 6 <= min(2 x 3, 3 + cap) needs a cap of 3 tiles
    assert runtime_split_chunks([1000, 1000, 4000], 1, 16, 132, split_slack_tiles=0, split_scale=2,
                                split_cap_tiles=3) == 44
    assert runtime_split_chunks([1000, 1000, 4000], 1, 16, 132, split_slack_tiles=0, split_scale=2,
                                split_cap_tiles=2) == 0
    assert runtime_split_chunks([1000, 1000, 4000], 1, 16, 132, split_slack_tiles=1, split_scale=2,
                                split_cap_tiles=2) == 44  # the slack comes on top of the cap
    assert runtime_split_chunks([3000, 2990, 3001], 1, 16, 132, split_slack_tiles=0, split_scale=2,
                                split_cap_tiles=0) == 44  # 5 <= 5: a cap of 0 still splits at equal ranges
    for bad, err in ((-1, ValueError), ((1 << 30) + 1, ValueError), (1.0, TypeError)):
        with pytest.raises(err, match="split_cap_tiles"):
            runtime_split_chunks([9001, 1, 0], 1, 16, 132, split_cap_tiles=bad)
    with pytest.raises(ValueError, match="split_slack_tiles"):
        runtime_split_chunks([9001, 1, 0], 1, 16, 132, split_slack_tiles=-1)
    with pytest.raises(ValueError, match="split_scale: expected an integer >= 1, got 0"):
        runtime_split_chunks([9001, 1, 0], 1, 16, 132, split_scale=0)
    # the rule against a brute-force count of both decompositions' busiest CTAs
    rng = np.random.default_rng(5)
    for _ in range(300):
        b, hkv, tile, ctas = int(rng.integers(1, 6)), int(rng.integers(1, 4)), int(rng.choice([16, 64])), 132
        slack, scale = int(rng.integers(0, 30)), int(rng.integers(1, 4))
        cap = int(rng.choice([0, 1, 3, 10, 40, 1 << 30]))
        lens = rng.integers(0, 20000, b)
        ns = runtime_split_chunks(lens, hkv, tile, ctas, split_slack_tiles=slack, split_scale=scale,
                                  split_cap_tiles=cap)
        tiles = -(-lens // tile)
        total = int(tiles.sum()) * hkv
        if total == 0:
            assert ns == 0
            continue
        sk = lean_schedule(lens, hkv, tile_size=tile, num_ctas=ctas)
        split_busiest = -(-int(tiles.max()) // max(1, ctas // (b * hkv)))
        per = int(sk.tiles_per_cta().max())
        want = ctas // (b * hkv) >= 1 and split_busiest <= min(scale * per, per + cap) + slack
        assert (ns > 0) == want and (ns == 0 or ns == ctas // (b * hkv))


def test_runtime_split_slack_in_tiles():
    """The slack of the launch-time split is a byte budget of K and V per
    CTA counted in whole tiles of the kernel (at least one), so a smaller
    tile, a smaller head_dim or an fp8 cache allows more tiles."""
    from cupy_lean.kernels import TUNING
    from cupy_lean.schedule import runtime_split_slack

    kb = 1024
    assert runtime_split_slack(128, 64, 2, 192 * kb) == 6
    assert runtime_split_slack(128, 128, 2, 192 * kb) == 3
    assert runtime_split_slack(64, 256, 2, 192 * kb) == 3
    assert runtime_split_slack(128, 128, 1, 192 * kb) == 6  # fp8
    assert runtime_split_slack(16, 128, 2, 192 * kb) == 24
    assert runtime_split_slack(128, 256, 2, 192 * kb) == 1  # less than a tile: one
    assert runtime_split_slack(128, 64, 2, 0) == 1
    assert runtime_split_slack(128, 64, 2, 0, at_least=0) == 0  # the in-kernel merge's rule: no floor
    assert runtime_split_slack(16, 128, 2, 192 * kb, at_least=0) == 24
    for bad in (2, 1.0, True):
        with pytest.raises(ValueError, match="at_least: expected 0 or 1"):
            runtime_split_slack(128, 64, 2, 0, at_least=bad)
    assert runtime_split_slack(16, 64, 1, 1 << 62) == 1 << 30  # fits the kernel's int parameter
    assert TUNING["runtime_split_slack_bytes"] >= 0
    with pytest.raises(ValueError, match="slack_bytes"):
        runtime_split_slack(128, 64, 2, -1)
    with pytest.raises(TypeError, match="slack_bytes"):
        runtime_split_slack(128, 64, 2, 1.5)
    with pytest.raises(ValueError, match="head_dim"):
        runtime_split_slack(128, 0, 2, 192 * kb)
    # lean_schedule follows the slack it is given
    s1 = lean_schedule([9001, 1, 0], 1, tile_size=16, num_ctas=132, merge_launch=True, runtime_split=True)
    s8 = lean_schedule([9001, 1, 0], 1, tile_size=16, num_ctas=132, merge_launch=True, runtime_split=True,
                       split_slack_tiles=8)
    assert s1.kind == "lean" and s8.kind == "split"
    # and the factor it is given (13 tiles per chunk: 3 x 5 against stream-K's 5)
    s3 = lean_schedule([9001, 1, 0], 1, tile_size=16, num_ctas=132, runtime_split=True, split_slack_tiles=0,
                       split_scale=3)
    assert s3.kind == "split" and not s3.merge_launch


def test_lean_schedule_takes_the_plans_split_rule(monkeypatch):
    """lean_schedule's split_scale / split_slack_tiles default to a default
    plan's rule for its merge (kernels.launch_split_rule), so that the
    schedule is what the kernel runs; given values are range-checked as the
    kernel's int parameters need."""
    from cupy_lean import kernels as K

    lens = [1000, 1000, 4000]  # 376 tiles of 16: 3 per stream-K CTA, 6 per chunk of 44
    inner = lean_schedule(lens, 1, tile_size=16, num_ctas=132, runtime_split=True)
    assert inner.kind == "split" and inner.num_splits == 44 and not inner.merge_launch  # 6 <= 2 x 3
    launch = lean_schedule(lens, 1, tile_size=16, num_ctas=132, runtime_split=True, merge_launch=True)
    assert launch.kind == "lean" and launch.merge_launch  # 6 > 3 + 1
    one = lean_schedule(lens, 1, tile_size=16, num_ctas=132, runtime_split=True, split_scale=1)
    assert one.kind == "lean"  # the factor given, the slack the plan's (none in the kernel)
    monkeypatch.setitem(K.TUNING, "runtime_split_in_kernel_scale", 1)
    assert lean_schedule(lens, 1, tile_size=16, num_ctas=132, runtime_split=True).kind == "lean"
    for kw, msg in (({"split_scale": 65}, "split_scale: expected an integer from 1 to 64, got 65"),
                    ({"split_scale": 0}, "split_scale: expected an integer >= 1, got 0"),
                    ({"split_slack_tiles": (1 << 30) + 1}, "split_slack_tiles: expected an integer from 0 to 2"),
                    ({"split_slack_tiles": -1}, "split_slack_tiles: expected an integer >= 0, got -1")):
        with pytest.raises(ValueError, match=re.escape(msg)):
            lean_schedule(lens, 1, tile_size=16, num_ctas=132, runtime_split=True, **kw)
    with pytest.raises(TypeError, match="split_scale"):
        lean_schedule(lens, 1, tile_size=16, num_ctas=132, runtime_split=True, split_scale=2.0)


def test_launch_split_rule(monkeypatch):
    """A plan's rule for the launch-time split: with the merge launch stream-K's
    busiest CTA plus the byte slack in tiles (at least one); with the
    in-kernel merge TUNING["runtime_split_in_kernel_scale"] times it plus the
    byte slack in tiles (possibly none), which is checked."""
    from cupy_lean import kernels as K

    monkeypatch.setitem(K.TUNING, "runtime_split_slack_bytes", 0)
    assert K.launch_split_rule(True, 128, 128, 2) == (1, 1)
    assert K.launch_split_rule(False, 128, 128, 2) == (K.TUNING["runtime_split_in_kernel_scale"], 0)
    monkeypatch.setitem(K.TUNING, "runtime_split_slack_bytes", 192 * 1024)
    assert K.launch_split_rule(True, 16, 128, 2) == (1, 24)
    monkeypatch.setitem(K.TUNING, "runtime_split_in_kernel_scale", 3)
    assert K.launch_split_rule(False, 16, 128, 2) == (3, 24)
    for bad in (0, 65, 1.5, True):  # refused where it is set
        with pytest.raises(ValueError, match=r'TUNING\["runtime_split_in_kernel_scale"\] must be an integer '
                                             r'from 1 to 64, got ' + re.escape(repr(bad))):
            monkeypatch.setitem(K.TUNING, "runtime_split_in_kernel_scale", bad)
        assert K.TUNING["runtime_split_in_kernel_scale"] == 3
    assert K.launch_split_rule(True, 16, 128, 2) == (1, 24)  # the merge launch's rule does not read it


def test_launch_split_cap(monkeypatch):
    """The cap of the in-kernel rule: TUNING["runtime_split_in_kernel_cap_bytes"]
    of K and V in whole tiles (none at least; 2**30 at most, no cap), so a
    smaller tile, head_dim or an fp8 cache allows more tiles; the merge
    launch's rule (factor 1) has none. lean_schedule takes it by default."""
    from cupy_lean import kernels as K

    monkeypatch.setitem(K.TUNING, "runtime_split_in_kernel_cap_bytes", 256 * 1024)
    assert K.launch_split_cap(False, 64, 256, 2) == 4
    assert K.launch_split_cap(False, 64, 256, 1) == 8  # fp8
    assert K.launch_split_cap(False, 64, 64, 2) == 16
    assert K.launch_split_cap(False, 128, 128, 2) == 4
    assert K.launch_split_cap(True, 64, 256, 2) == 1 << 30
    monkeypatch.setitem(K.TUNING, "runtime_split_in_kernel_cap_bytes", 1000)
    assert K.launch_split_cap(False, 64, 256, 2) == 0
    monkeypatch.setitem(K.TUNING, "runtime_split_in_kernel_cap_bytes", 1 << 62)
    assert K.launch_split_cap(False, 16, 64, 1) == 1 << 30
    for bad in (-1, 1.5, None, True, "256"):
        with pytest.raises(ValueError, match=r'kernels.TUNING\["runtime_split_in_kernel_cap_bytes"\] must be an '
                                             r'integer >= 0, got ' + re.escape(repr(bad))):
            monkeypatch.setitem(K.TUNING, "runtime_split_in_kernel_cap_bytes", bad)  # refused where it is set
        assert K.launch_split_cap(False, 16, 64, 1) == 1 << 30
    monkeypatch.setitem(K.TUNING, "runtime_split_in_kernel_cap_bytes", 256 * 1024)
    with pytest.raises(ValueError, match="tile_size"):  # another argument's error names that argument
        K.launch_split_cap(False, 0, 256, 2)
    assert K.launch_split_cap(True, 64, 256, 2) == 1 << 30  # the merge launch's rule does not read it
    # lean_schedule's default: 376 tiles of 16 (3 per stream-K CTA, 6 per chunk): split under the factor 2
    # with a cap of 3 tiles or more (3 x 16 tokens x 128 x 2 x 2 bytes = 24 KB), stream-K below
    lens = [1000, 1000, 4000]
    monkeypatch.setitem(K.TUNING, "runtime_split_in_kernel_cap_bytes", 24 * 1024)
    assert lean_schedule(lens, 1, tile_size=16, num_ctas=132, runtime_split=True).kind == "split"
    monkeypatch.setitem(K.TUNING, "runtime_split_in_kernel_cap_bytes", 24 * 1024 - 1)
    assert lean_schedule(lens, 1, tile_size=16, num_ctas=132, runtime_split=True).kind == "lean"
    assert lean_schedule(lens, 1, tile_size=16, num_ctas=132, runtime_split=True, split_cap_tiles=3).kind == "split"
    with pytest.raises(ValueError, match="split_cap_tiles: expected an integer from 0 to 2"):
        lean_schedule(lens, 1, tile_size=16, num_ctas=132, runtime_split=True, split_cap_tiles=(1 << 30) + 1)


@given(st.lists(st.integers(0, 3000), min_size=1, max_size=5), st.integers(1, 3), st.sampled_from([16, 64]),
       st.integers(1, 140))
@example([3000, 2990, 3001], 1, 16, 132)
@example([1, 700, 0], 2, 16, 40)
@pytest.mark.parametrize("launch", [True, False])
def test_lean_schedule_with_the_runtime_split(launch, lens, hkv, tile, ctas):
    """lean_schedule(merge_launch=launch, runtime_split=True) is the schedule
    the kernel runs: the split-K in one wave exactly where
    runtime_split_chunks picks it (ns chunks per unit on consecutive CTAs,
    every tile once, a chunk covering its unit whole written directly, the
    others in slot 2 x cta), else the stream-K schedule, with its merge
    (the combine launch, or in the kernel: 44 chunks of a unit go through
    the merge tree); emulating it equals the reference."""
    from cupy_lean import reference
    from cupy_lean.kernels import launch_split_cap, launch_split_rule
    from cupy_lean.schedule import runtime_split_chunks

    scale, slack = launch_split_rule(launch, tile, 128, 2)  # what lean_schedule takes by default
    cap = launch_split_cap(launch, tile, 128, 2)
    ns = runtime_split_chunks(lens, hkv, tile, ctas, split_slack_tiles=slack, split_scale=scale, split_cap_tiles=cap)
    s = lean_schedule(lens, hkv, tile_size=tile, num_ctas=ctas, merge_launch=launch, runtime_split=True)
    sk = lean_schedule(lens, hkv, tile_size=tile, num_ctas=ctas, merge_launch=launch)
    assert s.merge_launch == launch
    if ns == 0:
        assert s.kind == "lean" and not s.launch_split and np.array_equal(s.segments, sk.segments)
        return
    units = len(lens) * hkv
    assert s.kind == "split" and s.launch_split and s.num_splits == ns and s.num_ctas == units * ns
    assert ("combine launch" if launch else "last chunk, in the kernel") in s.describe()
    seg = s.segments
    assert np.array_equal(seg["unit"], seg["cta"] // ns)  # unit u on CTAs u*ns .. u*ns + ns - 1
    covered = np.zeros(units, np.int64)
    np.add.at(covered, seg["unit"], seg["tile_end"] - seg["tile_begin"])
    assert np.array_equal(covered, s.unit_tiles)
    whole = (seg["tile_begin"] == 0) & (seg["tile_end"] == s.unit_tiles[seg["unit"]])
    assert np.array_equal(seg["partial"], ~whole)
    assert np.array_equal(seg["slot"], np.where(whole, -1, 2 * seg["cta"]))
    # the busiest CTA streams at most scale x stream-K's busiest + slack tiles (with the merge launch one
    # tile more, in the kernel twice)
    assert int(s.tiles_per_cta().max()) <= scale * int(sk.tiles_per_cta().max()) + slack
    rng = np.random.default_rng(len(lens) + ctas)
    B, d, g = len(lens), 16, 2
    cap = max(max(lens), 1)
    q = rng.standard_normal((B, hkv * g, d))
    k = rng.standard_normal((B, cap, hkv, d))
    v = rng.standard_normal((B, cap, hkv, d))
    lens_a = np.asarray(lens, np.int32)
    out, lse = reference.emulate(s, q, k, v, kv_lens=lens_a)
    ro, rl = reference.attention(q, k, v, kv_lens=lens_a)
    assert np.allclose(out, ro, atol=1e-10) and np.array_equal(np.isneginf(lse), np.isneginf(rl))


def test_lean_schedule_runtime_split_arguments():
    """The argument's type is checked; split_schedule's split-K is not a
    launch-time split (its chunks: slot cta, merged by the combine launch)."""
    assert not split_schedule([100, 7], 1, tile_size=16, num_splits=4).launch_split
    with pytest.raises(TypeError, match="runtime_split: expected a bool, got 1"):
        lean_schedule([100], 1, tile_size=16, num_ctas=8, merge_launch=True, runtime_split=1)


def test_runtime_split_rule_with_a_tile_floor():
    """A floor on stream-K's ranges (min_tiles_per_cta, or a merge balance)
    raises stream-K's busiest CTA, which the rule compares against, in the
    helper as in lean_schedule and the kernel."""
    from cupy_lean.schedule import merge_balanced_tiles, runtime_split_chunks

    lens, tile, ctas = [12739, 10222, 5395, 6156], 16, 132
    floor = merge_balanced_tiles(-(-12739 // tile), 1, 16, tile)
    assert floor > 1
    assert runtime_split_chunks(lens, 1, tile, ctas) == 0
    assert runtime_split_chunks(lens, 1, tile, ctas, floor) == ctas // 4
    s = lean_schedule(lens, 1, tile_size=tile, num_ctas=ctas, merge_balance=1, merge_launch=True,
                      runtime_split=True)
    assert s.kind == "split" and s.num_splits == ctas // 4
    with pytest.raises(ValueError, match="min_tiles_per_cta"):
        runtime_split_chunks(lens, 1, tile, ctas, 0)


def test_plot_writes_a_png_at_exactly_the_path_given(tmp_path):
    """No extension is added (the CLI prints the path it was given, which
    must be the file written), whatever the extension; a folder is refused."""
    pytest.importorskip("matplotlib")
    s = lean_schedule([100, 3], 2, tile_size=16, num_ctas=4)
    for name in ("noext", "picture.jpg"):
        path = tmp_path / name
        assert s.plot(str(path)) == str(path)
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noext", "picture.jpg"]
    with pytest.raises(ValueError, match="path: expected a file name for the PNG, got .*, which is a folder"):
        s.plot(tmp_path)
    with pytest.raises(ValueError, match="path: the folder .*nope of .* does not exist"):
        s.plot(tmp_path / "nope" / "x.png")
    with pytest.raises(TypeError, match="path: expected a file name .*got int 5"):
        s.plot(5)


def test_uniform_variant_names_a_count_or_time_that_is_not_one():
    """Non-integer counts and nan or negative times are refused naming them
    (a nan tile time made every comparison false: stream-K, silently)."""
    for kw, exc, msg in [(dict(grid=float("nan")), TypeError, "grid: expected an integer, got nan"),
                         (dict(num_units=1.0), TypeError, "num_units: expected an integer, got 1.0"),
                         (dict(num_sms=1.5), TypeError, "num_sms: expected an integer, got 1.5"),
                         (dict(tile_us=float("nan")), ValueError, "tile_us: expected a finite number >= 0, got nan"),
                         (dict(cut_us=-1.0), ValueError, "cut_us: expected a finite number >= 0, got -1.0"),
                         (dict(slack=-5), ValueError, "slack: expected a finite number >= -1, got -5"),
                         (dict(tile_us="0.1"), ValueError, "tile_us: expected a finite number >= 0, got '0.1'")]:
        args = {**dict(num_units=47, unit_tiles=1286, grid=132, num_sms=132, tile_us=0.0068), **kw}
        with pytest.raises(exc, match=msg):
            uniform_variant(**args)
    assert uniform_variant(0, 10, 132, 132) == 0 and uniform_variant(np.int64(47), 1286, 132, 132, tile_us=0.0068) == 0
    assert uniform_variant(-1, 10, 132, 132) == 0  # no units: stream-K's nothing, as test_uniform_variant holds
