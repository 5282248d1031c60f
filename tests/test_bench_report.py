"""The benchmark harness without a GPU: case bookkeeping, argument parsing,
and the report (derived numbers, targets, table, CSV, JSON, PNG) on
synthetic rows. Needs neither a CUDA device nor PyTorch."""

from __future__ import annotations

import csv
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import cases as C  # noqa: E402
from bench import report as R  # noqa: E402
from bench import run as bench_run  # noqa: E402
from bench import timing as T  # noqa: E402

CEIL = 3.0  # TB/s


def _row(case, dtype, method, device_us, status="ok", eager_us=None, **kw):
    r = {f: None for f in R.FIELDS}
    r.update(case.row_fields(2))
    r.update(dtype=dtype, method=method, kind="ours" if method in R.OURS else "peer", status=status,
             device_us=device_us if status == "ok" else None, eager_us=eager_us,
             n_copies=2, n_calls=10, max_abs_diff=0.0 if method == "lean" else 1e-3)
    r.update(kw)
    return r


def _fake_rows(lean_factor=1.02, peer_factor=1.3, split_factor=1.1, head_factor=4.0, eager=12.0,
               dtypes=("float16", "bfloat16")):
    """Rows where lean runs at lean_factor x bound + 2 us, the best peer
    peer_factor x slower than lean."""
    byname = {c.name: c for c in C.all_cases()}
    names = ["b1_h32x32_d128_1k", "b1_h32x8_d128_4k", "b1_h32x32_d128_512k", "b8_h32x8_d128_8k",
             "ragged_128k+31x1k", "paged_lognorm16"]
    rows = []
    for dt in dtypes:
        for n in names:
            c = byname[n]
            bound = c.kv_bytes(2) / (CEIL * 1e12) * 1e6
            lean = lean_factor * bound + 2.0
            rows.append(_row(c, dt, "lean", lean, eager_us=eager))
            rows.append(_row(c, dt, "split", lean * split_factor, eager_us=eager + 3))
            rows.append(_row(c, dt, "head", lean * head_factor, eager_us=eager + 1))
            if c.layout == "dense":
                rows.append(_row(c, dt, "sdpa-flash", lean * peer_factor * 1.1, eager_us=55.0))
                rows.append(_row(c, dt, "sdpa-cudnn", lean * peer_factor, eager_us=60.0))
            else:
                rows.append(_row(c, dt, "sdpa-flash", None, status="n/a", note="n/a: dense only"))
                rows.append(_row(c, dt, "sdpa-cudnn", None, status="n/a", note="n/a: dense only"))
            rows.append(_row(c, dt, "flashinfer", lean * peer_factor * 1.05, eager_us=30.0))
            rows.append(_row(c, dt, "flashinfer-tc", None, status="error", error="RuntimeError: boom"))
    return rows


def _meta():
    return {
        "gpu": {"name": "Fake H100", "sm_count": 132, "l2_bytes": 50 << 20},
        "versions": {"cupy": "14.2.0", "torch": "2.11.0", "flashinfer": "0.5.0", "cupy_lean": "0.1.0",
                     "cuda_runtime": "13.0"},
        "read_ceiling_tbps": CEIL,
        "read_ceiling": {"tbps": CEIL, "bytes": 2 << 30},
        "notes": [],
        "cases": [c.to_json() for c in C.all_cases()],
    }


def _by_name(targets):
    return {t["name"].split(" ")[0] + "|" + t["name"]: t for t in targets}


def _status(targets, needle):
    hits = [t for t in targets if needle in t["name"]]
    assert len(hits) == 1, (needle, [t["name"] for t in targets])
    return hits[0]["status"]


# ---------------------------------------------------------------------- cases

def test_case_list_and_bytes():
    cs = C.all_cases()
    assert len(cs) == 24
    c = {x.name: x for x in cs}["b1_h32x32_d128_512k"]
    assert c.kv_bytes(2) == 2 * 512 * 1024 * 32 * 128 * 2  # 8.6 GB
    assert abs(C.floor_us(c) - c.kv_bytes(2) / 3.07e12 * 1e6) < 1e-9
    short = C.select_cases(short=True)
    assert [x.name for x in short] == C.short_case_names()
    assert all("ragged" in x.name for x in C.select_cases(["ragged"]))
    # fixed seeds: the ragged batches do not change between runs
    assert C._ragged_lens() == C._ragged_lens()
    for x in cs:
        assert x.heads_q % x.heads_kv == 0 and x.head_dim in (64, 128, 256)
        assert len(x.lens) == x.batch


@pytest.mark.parametrize("name", ["paged_lognorm16", "ragged_unif64", "b8_h32x8_d128_8k"])
def test_page_lists(name):
    case = {x.name: x for x in C.all_cases()}[name]
    num_pages, table, indptr, indices, last = C.page_lists(case)
    npg = case.pages()
    assert indptr[0] == 0 and list(np.diff(indptr)) == list(npg)
    assert len(indices) == indptr[-1]
    assert np.all((last >= 1) & (last <= C.PAGE_SIZE))
    assert np.all((npg - 1) * C.PAGE_SIZE + last == np.asarray(case.lens))
    assert indices.min() >= 0 and indices.max() < num_pages
    if case.layout == "paged":
        assert sorted(indices.tolist()) == list(range(num_pages))  # every page once
        assert indices.tolist() != list(range(num_pages))  # shuffled
        for b in range(case.batch):
            assert table[b, : npg[b]].tolist() == indices[indptr[b]: indptr[b + 1]].tolist()
    else:
        assert table is None
        per = case.capacity // C.PAGE_SIZE
        for b in range(case.batch):
            seq = indices[indptr[b]: indptr[b + 1]]
            assert seq.tolist() == list(range(b * per, b * per + npg[b]))


def test_plan_copies_and_calls():
    cs = {x.name: x for x in C.all_cases()}
    small = cs["b1_h32x32_d128_1k"]
    n = C.plan_copies(small, 256e6, 40e9)
    assert n * small.kv_bytes() >= 200e6
    big = cs["b1_h32x32_d128_512k"]
    assert C.plan_copies(big, 256e6, 40e9) == 1
    assert C.plan_copies(big, 256e6, 5e9) == 1  # never 0
    for copies in (1, 2, 7, 16):
        for est in (1.0, 10.0, 3000.0):
            k = T.calls_per_graph(copies, est)
            assert k >= 2 and k % copies == 0


# ---------------------------------------------------------------------- arguments

def test_arguments():
    p = bench_run.build_parser()
    a = p.parse_args(["--short", "--time-budget", "60", "--out", "/tmp/x", "--no-peers"])
    assert a.short and a.time_budget == 60.0 and a.out == "/tmp/x" and a.no_peers
    assert bench_run.parse_dtypes(None, short=True) == ["float16"]
    assert bench_run.parse_dtypes(None, short=False) == ["float16", "bfloat16"]
    assert bench_run.parse_dtypes("bf16,fp16", short=False) == ["bfloat16", "float16"]
    with pytest.raises(SystemExit):
        bench_run.parse_dtypes("fp8", short=False)
    assert bench_run.parse_methods(None, no_peers=True) == ["lean", "split", "head"]
    assert bench_run.parse_methods("invariant,lean", no_peers=True) == ["lean", "invariant"]  # on request only
    assert bench_run.parse_methods("flashinfer,split,lean", no_peers=False) == ["lean", "split", "flashinfer"]
    with pytest.raises(SystemExit):
        bench_run.parse_methods("xformers", no_peers=False)


def test_list_runs_without_gpu(capsys):
    assert bench_run.main(["--list", "--cases", "paged"]) == 0
    out = capsys.readouterr().out
    assert "paged_unif64" in out and "ragged_unif64" not in out


# ---------------------------------------------------------------------- report

def test_finalize_derived_fields():
    rows = R.finalize(_fake_rows(), CEIL)
    r = next(x for x in rows if x["case"] == "b1_h32x32_d128_512k" and x["method"] == "lean"
             and x["dtype"] == "float16")
    bound = r["kv_bytes"] / (CEIL * 1e12) * 1e6
    assert r["bound_us"] == pytest.approx(bound)
    assert r["tbps"] == pytest.approx(r["kv_bytes"] / (r["device_us"] * 1e-6) / 1e12)
    assert r["frac_ceiling"] == pytest.approx(r["tbps"] / CEIL)
    assert r["best_peer"] == "sdpa-cudnn"
    assert r["speedup_vs_best_peer"] == pytest.approx(1.3)
    rg = next(x for x in rows if x["case"] == "paged_lognorm16" and x["method"] == "lean")
    assert rg["best_peer"] == "flashinfer"
    err = next(x for x in rows if x["method"] == "flashinfer-tc")
    assert err["tbps"] is None and err["speedup_vs_best_peer"] is None


def test_targets_pass():
    rows = R.finalize(_fake_rows(), CEIL)
    ts = R.evaluate_targets(rows)
    assert len(ts) == 7
    assert all(t["status"] == "PASS" for t in ts), R.format_targets(ts)


def test_targets_miss():
    # lean slow vs bound, slower than peers, head only 2x, split faster, eager slow
    rows = R.finalize(_fake_rows(lean_factor=1.5, peer_factor=0.9, split_factor=0.9, head_factor=2.0,
                                 eager=25.0), CEIL)
    ts = R.evaluate_targets(rows)
    assert all(t["status"] == "MISS" for t in ts), R.format_targets(ts)
    text = R.format_targets(ts)
    assert text.count("MISS") == 7


def test_targets_tie_and_na():
    rows = R.finalize(_fake_rows(peer_factor=0.985, dtypes=("float16",)), CEIL)
    ts = R.evaluate_targets(rows)
    assert _status(ts, "lean >= best peer") == "PASS"  # 0.985 counts as a tie
    assert _status(ts, "geomean speedup") == "MISS"
    # without peers: the peer targets are N/A, the others still evaluated
    rows = [r for r in _fake_rows(dtypes=("float16",)) if r["method"] in R.OURS]
    ts = R.evaluate_targets(R.finalize(rows, CEIL))
    assert _status(ts, "lean >= best peer") == "N/A"
    assert _status(ts, "FlashInfer") == "N/A"
    assert _status(ts, "3x head") == "PASS"


def test_write_all(tmp_path):
    pytest.importorskip("matplotlib")
    rows = _fake_rows()
    paths = R.write_all(str(tmp_path), "unit", _meta(), rows, plots=True)
    targets = paths.pop("targets")
    assert [t["status"] for t in targets] == ["PASS"] * 7
    for key in ("csv", "json", "speedup_png", "bandwidth_png"):
        assert os.path.isfile(paths[key]), paths
    for key in ("speedup_png", "bandwidth_png"):
        with open(paths[key], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(paths[key]) > 10_000
    with open(paths["csv"]) as f:
        got = list(csv.DictReader(f))
    assert len(got) == len(rows)
    assert list(got[0].keys()) == R.FIELDS
    with open(paths["json"]) as f:
        doc = json.load(f)
    assert doc["gpu"]["name"] == "Fake H100"
    assert doc["read_ceiling_tbps"] == CEIL
    for k in ("cupy", "torch", "flashinfer", "cupy_lean", "cuda_runtime"):
        assert k in doc["versions"]
    assert len(doc["rows"]) == len(rows)
    for r in doc["rows"]:
        for k in ("case", "method", "dtype", "kv_bytes", "device_us", "eager_us", "bound_us"):
            assert k in r
        assert r["bound_us"] == pytest.approx(r["kv_bytes"] / (CEIL * 1e12) * 1e6)
    keys = {(r["case"], r["method"], r["dtype"]) for r in doc["rows"]}
    assert len(keys) == len(doc["rows"])  # one row per (case, method, dtype)
    assert [t["status"] for t in doc["targets"]] == ["PASS"] * 7
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_table(tmp_path):
    rows = R.finalize(_fake_rows(), CEIL)
    text = R.format_table(rows, CEIL, "Fake H100")
    lines = text.splitlines()
    assert "read ceiling 3.00 TB/s" in lines[0]
    body = [ln for ln in lines if ln.startswith(("b1_", "b8_", "ragged", "paged"))]
    assert len(body) == 12  # 6 cases x 2 dtypes
    assert any("n/a" not in ln and "sdpa-cudnn" in ln for ln in body)
    assert "1 method(s) failed" not in text and "method(s) failed" in text
    assert max(len(ln) for ln in lines[:3 + len(body)]) < 140


def test_report_main_roundtrip(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    paths = R.write_all(str(tmp_path), "rt", _meta(), _fake_rows(), plots=False)
    assert R.main([paths["json"], "--plots", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith(("PASS", "MISS", "N/A"))
    assert len(os.listdir(tmp_path / "p")) == 2


# ---------------------------------------------------------------- the family

def test_family_draw_is_seeded_and_within_limits():
    from bench import family as F

    a = F.draw(60, 123)
    assert [c.name for c in a] == [c.name for c in F.draw(60, 123)]
    assert [c.name for c in a] != [c.name for c in F.draw(60, 124)]
    seen_layouts, seen_pages, seen_d = set(), set(), set()
    for c in a:
        assert c.head_dim in (64, 128, 256) and 1 <= c.group <= 16 and c.heads_q == c.group * c.heads_kv
        assert 1 <= c.heads_kv <= 32 and 1 <= c.batch <= 64 and len(c.lens) == c.batch
        assert all(F.MIN_LEN <= n <= F.MAX_LEN for n in c.lens)
        assert c.alloc_bytes() <= F.MAX_ALLOC
        assert all(n % 8 for n in c.lens)  # a multiple of no tile or page size
        assert F.MIN_BYTES <= c.kv_bytes() <= F.MAX_BYTES
        assert c.capacity % c.page_size == 0 and c.capacity >= c.max_len
        if c.layout == "dense":
            assert len(set(c.lens)) == 1
        seen_layouts.add(c.layout)
        seen_d.add(c.head_dim)
        if c.layout == "paged":
            seen_pages.add(c.page_size)
    assert seen_layouts == {"dense", "ragged", "paged"} and seen_d == {64, 128, 256}
    assert seen_pages == {1, 16, 32, 64}
    assert F.new_seed() != F.new_seed() or F.new_seed() != F.new_seed()


def test_family_summary_counts():
    from bench import family as F

    cs = F.draw(6, 7)
    rows = []
    for i, c in enumerate(cs):
        bound = c.kv_bytes() / (CEIL * 1e12) * 1e6
        lean = bound * 1.02 + 1.0 if i % 2 else bound * 1.5 + 10.0  # odd: near the floor; even: far
        rows += [_row(c, "float16", "lean", lean), _row(c, "float16", "flashinfer", lean * (1.2 if i % 2 else 0.8))]
    R.finalize(rows, CEIL)
    f = R.family_summary(rows)
    assert f["n"] == 6 and f["n_peer"] == 6
    assert abs(f["geomean"] - (1.2 * 0.8) ** 0.5) < 1e-9 and abs(f["min"] - 0.8) < 1e-9
    assert f["below_095"] == 3 and f["over_bound"] == 3
    text = R.format_family_summary(rows, 7)
    assert text.splitlines()[0].startswith("family seed 7 all: 6 shapes; lean / best peer geomean 0.980x, min 0.800x")
    assert "3 of 6 below 0.95x; 3 of 6 over 1.05 x bound + 4 us" in text
    # the best peer over the bound: odd shapes (1.02 bound + 1) x 1.2, even (1.5 bound + 10) x 0.8
    room = [r["best_peer_us"] / r["bound_us"] for r in rows if r["method"] == "lean"]
    assert abs(f["ceiling_room_geomean"] - R.geomean(room)) < 1e-12 and min(room) > 1.05
    assert f["peer_within_5pct"] == 0 and "within 1.05x of that bound on 0 of 6" in text
    # FlashInfer alone: the faster of its two variants where both ran
    assert f["n_flashinfer"] == 6 and abs(f["flashinfer_geomean"] - f["geomean"]) < 1e-12
    assert "lean / FlashInfer (the faster of its variants) geomean 0.980x, min 0.800x" in text
    tc = _row(cs[0], "float16", "flashinfer-tc", rows[0]["device_us"] * 0.5)  # lean row 0: 0.8x FlashInfer
    rows2 = R.finalize(rows + [tc], CEIL)
    g = R.family_summary(rows2)
    assert abs(g["flashinfer_min"] - 0.5) < 1e-12 and g["flashinfer_below_095"] == 3
    assert R.family_summary([r for r in rows if r["method"] == "lean"])["n_flashinfer"] == 0
    assert "FlashInfer" not in R.format_family_summary([r for r in rows if r["method"] == "lean"], 7)
    rows[0]["best_peer_us"] = rows[0]["bound_us"] * 1.04  # a peer at the ceiling: no kernel is 1.05x faster
    assert R.family_summary(rows)["peer_within_5pct"] == 1


def test_family_summary_says_what_was_not_measured():
    """A shape whose peers were all skipped or failed leaves the geomean, so
    the summary says INCOMPLETE and counts them by peer family; a variant's
    own refusals (FlashInfer's CUDA-core decode on a group it does not take,
    the tensor-core one measured) are listed apart, not as missing; an
    output over the tolerance is counted."""
    from bench import family as F

    cs = F.draw(4, 7)
    rows = []
    for i, c in enumerate(cs):
        bound = c.kv_bytes() / (CEIL * 1e12) * 1e6
        rows.append(_row(c, "float16", "lean", bound * 1.5 + 5))
        rows.append(_row(c, "float16", "flashinfer", None, status="error"))  # refused group
        rows.append(_row(c, "float16", "flashinfer-tc", bound * 1.6 + 5, status="ok" if i else "skipped"))
    rows[1]["note"] = None
    R.finalize(rows, CEIL)
    f = R.family_summary(rows)
    assert f["no_peer"] == 1 and f["peer_missing"] == {"FlashInfer": 1}
    assert f["peer_failed"] == {"flashinfer": 4, "flashinfer-tc": 1} and f["mismatch"] == 0
    text = R.format_family_summary(rows, 3)
    assert "INCOMPLETE: 1 of 4 shapes with no peer measured; no variant of FlashInfer on 1" in text
    assert "peer rows refused, failed or skipped: flashinfer on 4, flashinfer-tc on 1" in text
    rows[5]["note"] = "MISMATCH vs lean: max abs diff 0.5 > 0.01"
    assert R.family_summary(rows)["mismatch"] == 1
    whole = [r for r in rows if r["status"] == "ok" or r["method"] == "flashinfer"]  # tc measured everywhere
    for r in whole:
        if r["method"] == "flashinfer-tc":
            r["note"] = None
    g = R.family_summary(R.finalize([dict(r) for r in whole] + [_row(cs[0], "float16", "flashinfer-tc", 99.0)],
                                    CEIL))
    assert g["no_peer"] == 0 and g["peer_missing"] == {} and g["mismatch"] == 0
    assert "INCOMPLETE" not in R.format_family_summary(R.finalize([dict(r) for r in whole] + [
        _row(cs[0], "float16", "flashinfer-tc", 99.0)], CEIL))


def test_bounds_use_the_best_rate_measured_when_it_beats_the_ceiling():
    """A method that streamed faster than the measured read ceiling shows the
    ceiling was measured low: bounds and fractions use that rate instead."""
    from bench import family as F

    c = F.draw(1, 5)[0]
    bound = c.kv_bytes() / (CEIL * 1e12) * 1e6
    rows = R.finalize([_row(c, "float16", "lean", bound * 0.98), _row(c, "float16", "flashinfer", bound * 2)], CEIL)
    fast = CEIL / 0.98
    assert R.effective_ceiling(rows, CEIL) == pytest.approx(fast)
    assert rows[0]["bound_us"] == pytest.approx(bound * 0.98) and rows[0]["frac_ceiling"] == pytest.approx(1.0)
    slow = R.finalize([_row(c, "float16", "lean", bound * 1.2)], CEIL)
    assert slow[0]["bound_us"] == pytest.approx(bound) and R.effective_ceiling(slow, None) is None


def test_peers_from_another_gpu_is_refused(tmp_path, capsys):
    """report --peers-from takes the peers of another run of the same cases:
    only from the same GPU (the ratio would compare machines), with a note
    where the two read ceilings differ by more than 3%."""
    import json

    rows = R.finalize(_fake_rows(), CEIL)
    for name, gpu, ceil in (("a", "H100", CEIL), ("b", "H200", CEIL), ("c", "H100", CEIL * 1.1)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"rows": rows, "gpu": {"name": gpu},
                                                           "read_ceiling_tbps": ceil}))
    with pytest.raises(SystemExit):
        R.main([str(tmp_path / "a.json"), "--peers-from", str(tmp_path / "b.json")])
    assert "expected a run on the same GPU as" in capsys.readouterr().err
    assert R.main([str(tmp_path / "a.json"), "--peers-from", str(tmp_path / "c.json")]) == 0
    assert "the read ceilings differ by more than 3%" in capsys.readouterr().out


def test_family_arguments(capsys):
    rc = bench_run.main(["--family", "5", "--seed", "11", "--list"])
    out = capsys.readouterr().out
    assert rc == 0 and "seed 11" in out and out.count("f0") == 5
    with pytest.raises(SystemExit):
        bench_run.main(["--family", "0", "--list"])


# ---------------------------------------------------------------- tuning

def test_tune_configurations_fit_the_limits():
    from bench import tune

    cfgs = tune.configs_for(("f16", 128, 8, False), 232448, 233472)
    assert ("split", None, None, None, 1, 0) in cfgs
    lean = [c for c in cfgs if c[0] == "lean"]
    # the default (tile 128, 3 stages at head_dim 128, group 8) gets the min-tiles and merge-balance
    # variants, the others not
    assert ("lean", 128, 3, 1, 1, 0) in lean and ("lean", 128, 3, 1, 8, 0) in lean
    assert ("lean", 128, 3, 1, 1, 2) in lean and ("lean", 64, 4, 1, 8, 0) not in lean
    assert ("lean", 64, 4, 1, 1, 0) in lean and ("lean", 64, 4, 1, 1, 2) not in lean
    assert all(tune.parse_name(tune.config_name(c)) == c for c in cfgs)
    assert all(c[3] == 1 for c in lean if c[1] == 128)  # two 128-token CTAs do not fit one SM
    small = tune.configs_for(("f16", 256, 128, True), 101376, 102400)
    assert all(c[1] <= 32 for c in small if c[0] == "lean")
    assert tune.parse_name("lean_t64_s4_c1_m8") == ("lean", 64, 4, 1, 8, 0)  # runs before merge balance


def test_tune_fit_picks_one_configuration_per_group():
    from bench import tune

    def rec(d, kvb, times):
        return {"case": "x", "features": {"head_dim": d, "m_tiles": 1, "paged": False, "kv_bytes": kvb},
                "times": times}

    doc = {"shapes": [
        rec(128, 1e9, {"lean_t64_s4_c1": 10.0, "lean_t32_s4_c2": 11.0, "split": 12.0}),
        rec(128, 2e9, {"lean_t64_s4_c1": 22.0, "lean_t32_s4_c2": 20.0, "split": 30.0}),
        rec(128, 3e9, {"lean_t64_s4_c1": 10.0, "lean_t32_s4_c2": 10.5, "split": None}),
        rec(128, 1e6, {"lean_t64_s4_c1": 9.0, "lean_t32_s4_c2": 9.0, "split": 6.0}),
    ]}
    table = tune.fit([doc])
    large = table[(128, 1, False, "large")]
    assert large[0] == "lean_t64_s4_c1" and large[2] == 3  # split was not measured on every shape
    assert table[(128, 1, False, "small")][0] == "split"


def test_tune_scores_the_rules():
    """The merge balance's floor is looked up at the largest measured
    min-tiles variant below it; the default tile is scored as measured."""
    from bench import tune
    from cupy_lean.schedule import merge_balanced_tiles

    base = "lean_t128_s3_c1"  # the default at head_dim 128, group 4, dense
    lens = [24050]  # one unit of 188 tiles: a = 1 gives a floor of 5 tiles (16 rows), a = 0 none
    assert merge_balanced_tiles(188, 1, 16, 128) == 5
    times = {base: 40.0, base + "_m2": 30.0, base + "_m4": 20.0, base + "_m8": 25.0, "split": 50.0}
    doc = {"shapes": [{"case": "x", "lens": lens, "times": times,
                       "features": {"head_dim": 128, "group": 4, "paged": False, "m_tiles": 1, "kv_bytes": 1e7}}]}
    got = tune.score_rules([doc], balances=(0, 1))
    assert got["default_tile"][128] == (2.0, 2.0, 1)
    assert got["merge_balance"][0][0] == 2.0  # floor 1: the plain configuration
    assert got["merge_balance"][1][0] == 1.0  # floor 5: the m4 variant


# ---------------------------------------------------------------- distributed benchmark

def test_distributed_benchmark_arguments_and_sizes():
    from bench import distributed as D

    assert D.parse_ints("1,2, 4", "--gpus") == [1, 2, 4]
    assert D.parse_heads("32/8") == (32, 8)
    for bad in ("0,1", "a"):
        with pytest.raises(SystemExit):
            D.parse_ints(bad, "--gpus")
    with pytest.raises(SystemExit, match="--heads"):
        D.parse_heads("30/8")
    # 1M tokens, 8 KV heads, head_dim 128, fp16: 4 GB per layer, 1 GB per GPU over four
    assert D.shard_bytes(1 << 20, 1, 1, 8, 128) == 4 * (1 << 30)
    assert D.shard_bytes(1 << 20, 4, 1, 8, 128) == 1 << 30


def test_tuning_option_parses_literals_and_names_bad_items():
    assert bench_run.parse_tuning([]) == {}
    assert bench_run.parse_tuning(["invariant_splits=8", "config_rules_with_features = True"]) == {
        "invariant_splits": 8, "config_rules_with_features": True}
    with pytest.raises(SystemExit, match="--tuning: expected KEY=VALUE with KEY among .*got 'pdll=1'"):
        bench_run.parse_tuning(["pdll=1"])
    with pytest.raises(SystemExit, match="--tuning: expected KEY=VALUE .*got 'pdl'"):
        bench_run.parse_tuning(["pdl"])
    with pytest.raises(SystemExit, match="--tuning: pdl: expected a Python literal, got 'off'"):
        bench_run.parse_tuning(["pdl=off"])


def test_tuning_option_is_restored_after_the_run():
    """bench.run.main(argv) with --tuning leaves kernels.TUNING as it found it
    (main may be called from code); --list changes nothing."""
    from cupy_lean.kernels import TUNING

    before = dict(TUNING)
    assert bench_run.main(["--family", "2", "--seed", "3", "--list", "--tuning", "invariant_splits=4"]) == 0
    assert dict(TUNING) == before


def test_diff_summary_counts_rows_over_the_tolerance():
    rows = _fake_rows()
    peers = [r for r in rows if r["method"] == "sdpa-cudnn" and r["dtype"] == "float16" and r["status"] == "ok"]
    assert len(peers) >= 2
    peers[0]["max_abs_diff"] = 0.5  # a wrong-looking output
    peers[1]["max_abs_diff"] = None  # not checked: not counted
    text = R.format_diffs(rows, R.DIFF_TOL)
    line = next(ln for ln in text.splitlines() if ln.split()[:2] == ["sdpa-cudnn", "fp16"])
    assert f"{len(peers) - 1} rows" in line
    assert "max 0.5 (" + peers[0]["case"][:28] + ")" in line
    assert f"1 over {R.DIFF_TOL['float16']:g}" in line
    other = next(ln for ln in text.splitlines() if ln.split()[:2] == ["sdpa-cudnn", "bf16"])
    assert f"0 over {R.DIFF_TOL['bfloat16']:g}" in other
    assert R.format_diffs([], R.DIFF_TOL) == "output diffs: none measured"
    assert bench_run.DIFF_TOL is R.DIFF_TOL
