"""The SASS reading of tools/sass_loop.py and tools/code_size.py on made-up
listings (CI has no ptxas, cuobjdump or nvdisasm; the tools themselves run
where they are), and code_size's ELF reading of an NVRTC cubin."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import code_size  # noqa: E402
import pytest  # noqa: E402
import sass_loop  # noqa: E402

LISTING = [
    (0x00, "MOV R1, c[0x0][0x28]"),
    (0x10, "IMAD R2, R3, R4, RZ"),           # outer loop head
    (0x20, "LDGSTS.E.BYPASS.128 [R5], desc[UR4][R6.64], !P1"),
    (0x30, "LDGDEPBAR"),
    (0x40, "HMMA.16816.F32 R8, R10, R12, R8"),  # inner loop head
    (0x50, "@!P0 IMAD.WIDE.U32 R6, R7, UR4, R6"),
    (0x60, "HMMA.16816.F32 R8, R10, R14, R8"),
    (0x70, "@P2 BRA 0x40"),                  # inner loop: 2 HMMA, 4 instructions
    (0x80, "IADD3 R2, R2, 0x1, RZ"),
    (0x90, "@P3 BRA 0x10"),                  # outer loop: the same 2 HMMA, longer
    (0xa0, "EXIT"),
]


def test_tile_loop_is_the_shortest_loop_with_the_most_hmma():
    h, body = sass_loop._tile_loop(LISTING)
    assert h == 2
    assert [a for a, _ in body] == [0x40, 0x50, 0x60, 0x70]


def test_opcodes_drop_predicates_and_modifiers():
    assert sass_loop._opcode("@!P0 IMAD.WIDE.U32 R6, R7, UR4, R6") == "IMAD"
    assert sass_loop._opcode("@UP1 BRA 0x40") == "BRA"
    assert sass_loop._opcode("LDGSTS.E.BYPASS.128 [R5], desc[UR4][R6.64], !P1") == "LDGSTS"


def test_no_loop_without_hmma():
    assert sass_loop._tile_loop([(0x0, "IADD3 R1, R1, 0x1, RZ"), (0x10, "@P0 BRA 0x0")]) is None


def test_spec_sweep_draws_its_shapes_as_asked():
    """tools/spec_sweep.py's two shape sources (the sweep itself needs a GPU):
    many-unit dense shapes in the lengths asked, and family shapes filtered by
    head_dim, layout, size and batch, the same for the same seed."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import spec_sweep

    dense = spec_sweep.draw(12, 7, 132, (64,), (2000, 10000))
    assert len(dense) == 12
    for c in dense:
        assert c.layout == "dense" and c.head_dim == 64 and 2000 <= c.max_len <= 10001
        assert c.kv_bytes() <= 400e6 + 1 and len(set(c.lens)) == 1
    assert dense == spec_sweep.draw(12, 7, 132, (64,), (2000, 10000))
    # long calls whose split would occupy 70-90% of the SMs (the equal-length model's step)
    band = spec_sweep.draw(8, 5, 132, (64, 128), (20000, 160000), (0.3, 0.8), max_mb=2000, sm_fraction=(0.7, 0.9))
    assert len(band) == 8 and band == spec_sweep.draw(8, 5, 132, (64, 128), (20000, 160000), (0.3, 0.8),
                                                      max_mb=2000, sm_fraction=(0.7, 0.9))
    for c in band:
        u = c.batch * c.heads_kv
        assert 0.7 <= (132 // u) * u / 132 < 0.9 and c.kv_bytes() <= 2000e6 + 1 and c.head_dim in (64, 128)
    assert len({c.name for c in band}) == 8
    fam = spec_sweep.family_shapes(10, 3, [64, 128], ["paged"], 60)
    assert len(fam) == 10 and fam == spec_sweep.family_shapes(10, 3, [64, 128], ["paged"], 60)
    for c in fam:
        assert c.layout == "paged" and c.head_dim in (64, 128) and c.kv_bytes() <= 60e6
        assert c.name.startswith("s") and "_f" in c.name  # the family seed it came from, then its name there
    assert len({c.name for c in fam}) == len(fam)
    one = spec_sweep.family_shapes(6, 3, [64, 128, 256], ["ragged", "paged"], 0, max_batch=1)
    assert len(one) == 6 and all(c.batch == 1 and c.layout in ("ragged", "paged") for c in one)
    mid = spec_sweep.family_shapes(6, 3, [64, 128, 256], ["ragged", "paged"], 0, max_units=44, min_units=17)
    assert len(mid) == 6 and all(17 <= c.batch * c.heads_kv <= 44 for c in mid)
    from cupy_lean import kernels as K

    for name, changes in spec_sweep.TUNING_CONFIGS.items():  # each config's values pass TUNING's checks
        for key, value in changes.items():
            K._check_tuning_value(key, value)
    big = spec_sweep.family_shapes(6, 3, [64, 128, 256], ["ragged", "paged"], 0, min_mb=60)
    assert len(big) == 6 and all(c.kv_bytes() >= 60e6 and c.layout != "dense" for c in big)
    import pytest

    with pytest.raises(ValueError, match=r"layouts: expected some of .*got \['page'\]"):
        spec_sweep.family_shapes(3, 3, [64], ["page"], 0)


def test_cta_rate_shapes():
    """tools/cta_rate.py's shapes (the timing needs a GPU): per head_dim and
    group, one sequence of one KV head per CTA, each of about the asked MB
    of K and V, a length that no tile divides, CTA counts from the
    fractions of the SMs, each count once."""
    import cta_rate

    s = cta_rate.shapes(132, [64, 256], [1, 7], (0.3, 0.7, 0.7005, 1.0, 1.5), 8.0)
    assert [(d, g, w) for d, g, w, _ in s] == [(d, g, w) for d in (64, 256) for g in (1, 7) for w in (40, 92, 132)]
    for d, g, w, c in s:
        assert (c.batch, c.heads_kv, c.heads_q, c.head_dim, c.layout) == (w, 1, g, d, "dense")
        assert len(set(c.lens)) == 1 and c.lens[0] % 2 == 1
        assert abs(c.kv_bytes() / w - 8e6) <= 4 * d  # one token's K and V at most
    assert [w for _, _, w, _ in cta_rate.shapes(10, [128], [1], (0.01, 0.05), 1.0)] == [1]


def test_saturation_fit_reads_rates_and_sweeps(tmp_path, capsys):
    """tools/saturation_fit.py on made-up measurements: CTAs of 30 GB/s each
    under a 3 TB/s DRAM saturate at 100 of 132 SMs (0.758); the per-CTA rate
    comes from the counts that stream below 0.9 of it; a sweep's ratios over
    the default."""
    import json

    import saturation_fit

    rows = []
    for w in (40, 60, 92, 120, 132):
        nbytes = w * 8e6
        tb = min(3.0, w * 0.03)  # TB/s of w CTAs
        rows.append({"head_dim": 128, "group": 1, "ctas": w, "sms": 132, "kv_bytes": nbytes,
                     "times": {"head": nbytes / (tb * 1e6), "stream_k": nbytes / 3e6}})
    (d, g, b, r, frac, n), = saturation_fit.rates({"rows": rows})
    assert (d, g, n) == (128, 1, 2) and abs(b - 3.0) < 1e-9 and abs(r - 30.0) < 1e-9
    assert abs(frac - 3000 / (30 * 132)) < 1e-9
    sw = {"seed": 5, "shapes": [{"times": {"default": 10.0, "sk": 9.0, "sat08": 10.0}},
                                {"times": {"default": 20.0, "sk": 22.0, "sat08": None}},
                                {"times": {"default": None, "sk": 1.0}}]}
    out = saturation_fit.sweep(sw)
    assert set(out) == {"sk", "sat08"} and out["sat08"] == (1.0, 1.0, 1.0, 0, 0, 1)
    g_, lo, hi, faster, slower, n = out["sk"]
    assert abs(g_ - (0.9 * 1.1) ** 0.5) < 1e-12 and (lo, hi, faster, slower, n) == (0.9, 1.1, 1, 1, 2)
    (tmp_path / "r.json").write_text(json.dumps({"gpu": "X", "rows": rows}))
    (tmp_path / "s.json").write_text(json.dumps(sw))
    assert saturation_fit.main(["--rates", str(tmp_path / "r.json"), "--sweeps", str(tmp_path / "s.json")]) == 0
    text = capsys.readouterr().out
    assert "saturates at 0.76 of the SMs" in text and "sk           0.995x (0.900-1.100) over 2" in text


def test_timeline_and_split_gap_summaries():
    """tools/timeline.py's per-CTA summary on a made-up table (32 stamps a
    CTA: 16 the start before the wait, 17 and 18 the prologue's split
    stamps; 14 and 15 clocks, never phases) and tools/split_gap.py's
    combine summary (4 stamps a block), relative to the first CTA's start."""
    import numpy as np

    cp = __import__("pytest").importorskip("cupy")  # timeline.py imports CuPy (no GPU needed)
    del cp
    import split_gap
    import timeline

    t = np.zeros((4, timeline.WIDTH), np.uint64)
    for c, base in enumerate((1000, 1100, 1200)):  # CTA 3 never ran
        t[c, 16] = base - 30  # waited 30 ns
        t[c, 0] = base
        t[c, 8] = base + 500
        t[c, 17] = base + 700
        t[c, 1] = base + 900
        t[c, 7] = base + 5000
        t[c, 14], t[c, 15] = 10_000, 10_000 + 2 * 5000  # 2 GHz
    t[1, 18] = 1100 + 800  # CTA 1 took the launch-time split
    s = timeline.summary(t, 4)
    assert s["ctas"] == 3 and abs(s["span_us"] - 5.2) < 1e-9 and abs(s["sm_mhz"] - 2000) < 1e-6
    assert s["wait_us"] == [0.03, 0.03, 0.03]
    assert s["scanned"] == [0.5, 0.6, 0.7] and s["made"] == [0.7, 0.8, 0.9] and s["decided"] == [0.9, 0.9, 0.9]
    assert s["found"] == [0.9, 1.0, 1.1] and s["critical_cta"][7] == 5.2
    assert None not in s and "None" not in s and len(s["critical_cta"]) == len(timeline.PHASES)
    # slot 19, %smid: SMs 0 and 1 form one TPC, CTA 2 has TPC 3 (SMs 6, 7) to itself
    t[0, 19], t[1, 19], t[2, 19] = 0, 1, 7
    assert timeline.summary(t, 4)["by_tpc"] == {"alone": {"ctas": 1, "us": [5.0, 5.0, 5.0]},
                                                "tpc_shared": {"ctas": 2, "us": [5.0, 5.0, 5.0]}}
    t[1, 19] = 0  # CTAs 0 and 1 on one SM
    assert set(timeline.summary(t, 4)["by_tpc"]) == {"alone", "sm_shared"}
    ct = np.zeros((3, 4), np.uint64)
    ct[0] = (7000, 7100, 7300, 9000)
    ct[1] = (7200, 7200, 7400, 9400)
    c = split_gap.combine_summary(ct, 1000)
    assert c["blocks"] == 2 and c["c_start"] == [6.0, 6.1, 6.2] and c["c_end"] == [8.0, 8.2, 8.4]
    assert "c_loaded" not in c
    ct8 = np.zeros((3, 8), np.uint64)  # the kernel's layout: the merge's own stamps after the first four
    ct8[0] = (7000, 7100, 7300, 9000, 7900, 8100, 8200, 8900)
    c = split_gap.combine_summary(ct8, 1000)
    assert c["blocks"] == 1 and c["c_loaded"] == [6.9] * 3 and c["c_stored"] == [7.9] * 3


def test_gpu_shards_deal_by_earlier_durations():
    """tools/gpu_shards.py: pytest's durations report summed per test id,
    and ids dealt longest first to the least loaded shard (unknown ids at
    the median known duration), round-robin without durations."""
    import gpu_shards

    report = """============================= slowest durations =============================
12.50s call     tests/test_gpu.py::test_property[a b]
0.50s setup    tests/test_gpu.py::test_property[a b]
3.00s call     tests/test_gpu_use.py::test_x
(20 durations < 0.02s hidden.  Use -vv to show these durations.)
"""
    d = gpu_shards.parse_durations(report)
    assert d == {"tests/test_gpu.py::test_property[a b]": 13.0, "tests/test_gpu_use.py::test_x": 3.0}
    ids = ["a", "b", "c", "d", "e"]
    assert gpu_shards.deal(ids, 2) == [["a", "c", "e"], ["b", "d"]]
    assert gpu_shards.deal(ids, 2, {}) == [["a", "c", "e"], ["b", "d"]]
    parts = gpu_shards.deal(ids, 2, {"a": 10.0, "b": 1.0, "c": 4.0, "d": 5.0})  # e unknown: the median, 5
    # a (10) | d (5), e (5) | c (4) to the first of the tied shards | b (1) to the lighter
    assert parts == [["a", "c"], ["d", "e", "b"]]


def test_gpu_shards_split_the_thread_pools():
    """Each shard's BLAS / OpenMP pools get cpus // shards threads (at least
    one); a variable the caller set is kept."""
    import gpu_shards

    env = gpu_shards.shard_env(12, {"PATH": "/bin"}, cpus=16)
    assert env["PATH"] == "/bin"
    assert [env[v] for v in gpu_shards.THREAD_VARS] == ["1", "1", "1"]
    env = gpu_shards.shard_env(4, {"OMP_NUM_THREADS": "8"}, cpus=16)
    assert env["OMP_NUM_THREADS"] == "8" and env["OPENBLAS_NUM_THREADS"] == "4"
    assert gpu_shards.shard_env(32, {}, cpus=16)["MKL_NUM_THREADS"] == "1"


def test_split_rule_fit_supports_the_default():
    """The checked-in sweep of the launch-time split (H100, 12 seeds of ragged
    and paged family shapes, bench/results/split_rule_h100_s27.json) through
    tools/split_rule_fit.py: on the in-kernel merge's shapes the default rule
    (TUNING["runtime_split_in_kernel_scale"] x stream-K's busiest CTA, no
    slack) is faster than the merge launch's rule (1 x, one tile) and than
    stream-K alone, on each half of the seeds, and makes at most 2 shapes
    over 2% slower; the rows are rebuilt from the compact file."""
    import split_rule_fit as F
    from cupy_lean.kernels import TUNING

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = F.load([os.path.join(root, "bench", "results", "split_rule_h100_s27.json")])
    inner = [r for r in rows if not r["launch"]]
    assert len(inner) >= 100 and len({r["seed"] for r in inner}) >= 10
    seeds = sorted({r["seed"] for r in inner})
    scale = TUNING["runtime_split_in_kernel_scale"]
    for part in ([r for r in inner if r["seed"] in seeds[::2]], [r for r in inner if r["seed"] not in seeds[::2]]):
        new, over, _ = F.evaluate(part, scale, 0)
        assert new < F.evaluate(part, 1, 1)[0] - 0.01 and new < 0.98 and over <= 2
    # the merge launch keeps its rule: a factor of 2 there makes more shapes slower
    launch = [r for r in rows if r["launch"]]
    assert F.evaluate(launch, 1, 1)[1] < F.evaluate(launch, 2, 0)[1]
    # the default cap (TUNING["runtime_split_in_kernel_cap_bytes"]) costs these calls (up to 60 MB) under
    # half a percent against the factor alone; a cap of none equals the factor's rule, of 0 bytes the
    # factor 1 without slack
    cap = TUNING["runtime_split_in_kernel_cap_bytes"]
    assert F.evaluate_cap(inner, cap, scale)[0] < F.evaluate(inner, scale, 0)[0] + 0.005
    assert F.evaluate_cap(inner, 1 << 62, scale) == F.evaluate(inner, scale, 0)
    assert F.evaluate_cap(inner, 0, scale) == F.evaluate(inner, 1, 0)
    assert F.tile_bytes({"tile": 64, "case": "s1_f03_b2_h8x2_d256_ragged_uniform_900"}) == 64 * 256 * 4


def test_split_cap_fits_the_long_calls():
    """The cap's sweeps on calls of 60 MB to 2.4 GB (H200, the three shapes
    the factor alone split badly and 14 held-out ones,
    bench/results/split_cap_h200_s*.json) through tools/split_rule_fit.py:
    with the default cap the in-kernel rule is within half a percent of
    stream-K there, and the factor without a cap is at least 5% slower;
    the shapes are rebuilt from their seeds (any size)."""
    import split_rule_fit as F
    from cupy_lean.kernels import TUNING

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = [os.path.join(root, "bench", "results", f"split_cap_h200_s{s}.json") for s in (749032119, 555123)]
    rows = [r for r in F.load(files) if not r["launch"] and r["ns"] >= 1 and r["kv_bytes"] >= 60e6]
    assert len(rows) >= 8
    scale = TUNING["runtime_split_in_kernel_scale"]
    capped, over, _ = F.evaluate_cap(rows, TUNING["runtime_split_in_kernel_cap_bytes"], scale)
    assert capped < 1.005 and over == 0
    assert F.evaluate_cap(rows, 1 << 62, scale)[0] > capped + 0.05


def test_cta_rate_reproduces_the_tuning_defaults(capsys):
    """The equal-length model's measured inputs in kernels.TUNING are
    tools/cta_rate.py's fit of the stored H100 run (the script that
    regenerates them): partial_grid_time per head_dim and cta_stream_gbs;
    --fit prints them without a GPU."""
    import json
    import pathlib

    import cta_rate

    from cupy_lean import kernels as K

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "results" / "cta_rate_h100_s29.json"
    table, rates = cta_rate.tuning_values(json.loads(path.read_text())["rows"])
    assert table == K.TUNING["partial_grid_time"] and rates == K.TUNING["cta_stream_gbs"]
    cta_rate.print_tuning(json.loads(path.read_text())["rows"])
    out = capsys.readouterr().out
    assert '"partial_grid_time": {"64": [[0.303, 1.389]' in out and '"cta_stream_gbs": {"64": 51.1' in out
    rows = [{"head_dim": 64, "group": g, "ctas": w, "sms": 100, "kv_bytes": 8e6 * w,
             "times": {"head": t, "stream_k": 10.0}} for g, w, t in ((1, 50, 12.0), (8, 50, 11.0), (1, 100, 10.0))]
    rows.append({"head_dim": 64, "group": 1, "ctas": 75, "sms": 100, "kv_bytes": 6e8, "times": {"head": None}})
    assert cta_rate.tuning_values(rows) == ({"64": [[0.5, 1.15], [1.0, 1.0]]}, {"64": 697.0})


def test_ncu_table_tells_calls_apart_by_their_markers(tmp_path):
    import ncu_table as T

    st = T.STALL + "long_scoreboard" + T.STALL_END
    sw = T.STALL + "wait" + T.STALL_END
    ss = T.STALL + "selected" + T.STALL_END
    head = ["ID", "Kernel Name", T.COLS["time"], T.COLS["dram"], T.COLS["grid"], st, sw, ss]
    units = ["", "", "ns", "%", "", "", "", ""]
    body = [
        ["0", "lean_ncu_marker", "1,500", "0", "1", "0", "0", "0"],
        ["1", "lean_f16_d128_attention", "12,000", "40.5", "132", "3.5", "1.0", "9.0"],
        ["2", "lean_ncu_marker", "1,400", "0", "2", "0", "0", "0"],
        ["3", "lean_f16_d64_attention", "30,000", "80.0", "264", "1.0", "2.0", "1.0"],
        ["4", "lean_f16_d64_combine", "3,000", "10.0", "40", "0.5", "0.5", "1.0"],
    ]
    import csv

    raw = tmp_path / "raw.csv"
    with open(raw, "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(["==PROF== a line before the table"])
        for r in [head, units] + body:
            w.writerow(r)
    index = [{"index": 1, "case": "f00_b1_x", "dtype": "float16", "fp8": False, "mb": 10.0},
             {"index": 2, "case": "f01_b2_y", "dtype": "float16", "fp8": False, "mb": 100.0}]
    bench = {"rows": [
        {"method": "lean", "case": "f00_b1_x", "dtype": "float16", "device_us": 14.0, "bound_us": 3.0,
         "best_peer": "p", "best_peer_us": 13.0},
        {"method": "lean", "case": "f01_b2_y", "dtype": "float16", "device_us": 36.0, "bound_us": 32.0,
         "best_peer": "p", "best_peer_us": 40.0},
        {"method": "p", "case": "f01_b2_y", "dtype": "float16", "device_us": 40.0}]}
    rows = T.table(index, T.read_raw(raw), bench)
    a, b = rows
    assert a["kernels"] == 1 and abs(a["ncu_us"] - 12.0) < 1e-9 and a["dram"] == 40.5
    assert [n for n, _ in a["stalls"]] == ["long_scoreboard", "wait"]  # "selected" is not a stall
    assert b["kernels"] == 2 and abs(b["ncu_us"] - 33.0) < 1e-9
    assert b["grid"] == 264 and b["main"] == "lean_f16_d64_attention"
    assert a["miss"] is True and abs(a["limit_us"] - 7.15) < 1e-9  # 14 > 1.05 x 3 + 4
    assert b["miss"] is False  # 36 <= 1.05 x 32 + 4
    md = T.markdown(rows)
    assert "f00 fp16 MISS" in md and "long_scoreboard 3.5" in md
    # a marker missing from the report (its kernels would join the call before) is refused, as is a repeat
    import pytest

    ks = T.read_raw(raw)
    with pytest.raises(ValueError, match="missing"):
        T.table(index, [k for k in ks if not (k["name"] == "lean_ncu_marker" and k[T.COLS["grid"]] == 1)])
    with pytest.raises(ValueError, match="twice"):
        T.calls(ks + ks[2:3])
    # markers past the index (a run that died before writing the entry) are ignored
    assert len(T.table(index[:1], ks)) == 1
    # an unknown time unit is refused, not read as microseconds
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="") as f:
        w = csv.writer(f)
        for r in [head, ["", "", "cycle", "%", "", "", "", ""]] + body:
            w.writerow(r)
    with pytest.raises(ValueError, match="unknown time unit"):
        T.read_raw(bad)
    empty = tmp_path / "empty.csv"
    empty.write_text("==ERROR== no kernels were profiled\n")
    with pytest.raises(ValueError, match="no ncu raw table"):
        T.read_raw(empty)


def test_ncu_family_picks_cases_by_name():
    import ncu_family
    from bench import family as F

    cases = F.draw(6, 12345)
    assert ncu_family._pick(cases, "all") == cases
    two = ncu_family._pick(cases, "f01,f04")
    assert [c.name.split("_")[0] for c in two] == ["f01", "f04"]
    import pytest

    with pytest.raises(SystemExit, match="f99"):
        ncu_family._pick(cases, "f99")


def test_ncu_table_compares_fp8_calls_with_the_fp16_ones():
    """--against: each call's ncu time over another table's same call (the
    fp16 row where the base has several dtypes), checked on the stored H100
    tables of seed 918629583."""
    import json

    import ncu_table as T

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fp8 = json.load(open(os.path.join(root, "bench/results/ncu_s918629583_e4m3.json")))
    base = json.load(open(os.path.join(root, "bench/results/ncu_s918629583.json")))
    cmp = T.compare(fp8, base)
    assert len(cmp) == len(fp8) == 12
    by = {c["case"].split("_")[0]: c for c in cmp}
    assert 1.0 < by["f08"]["ratio"] < 1.03  # the fp8 call no faster than fp16
    assert 0.55 < by["f10"]["ratio"] < 0.56
    assert by["f10"]["base_us"] == next(r["ncu_us"] for r in base
                                        if r["case"].startswith("f10_") and r["dtype"] == "float16")
    assert T.compare(fp8, []) == []


LINE_LISTING = """
\t.section\t.text.other_entry,"ax",@progbits
        //## File "/x/lean_f16_d64.cu", line 3
        /*0000*/                   MOV R1, c[0x0][0x28] ;
\t.section\t.text.my_entry,"ax",@progbits
        //## File "/x/lean_f16_d64.cu", line 2
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
        //## File "/x/lean_f16_d64.cu", line 7
        /*0020*/                   HMMA.16816.F32 R8, R10, R12, R8 ;
        //## File "/y/common.cuh", line 40
        /*0030*/                   SHFL.BFLY PT, R3, R4, 0x1, 0x1f ;
        //## File "/x/lean_f16_d64.cu", line 5
        /*0040*/                   EXIT ;
"""


def test_code_size_counts_an_entrys_instructions_by_source_block():
    src = ["// a", "__device__ void first(int a) {", "}", "", "__device__ float second() {", "", "x;", ""]
    blocks = code_size.source_blocks(LINE_LISTING, "my_entry", 4, src)
    # lines 1-4: the MOV and IADD3 at line 2; lines 5-8: line 7's HMMA and line 5's EXIT; the header's SHFL
    assert blocks == [("lines 1-4 (first)", 2), ("lines 5-8 (second)", 2), ("common.cuh", 1)]
    assert code_size.source_blocks(LINE_LISTING, "absent_entry", 4, src) == []


def test_code_size_reads_the_text_sections_of_a_compiled_spec():
    from cupy_lean import kernels as K

    spec = K.make_spec("f16", 64, 4, False)
    cubin = K.compile_cubin(spec, "sm_80")
    sizes = code_size.text_sizes(cubin)
    for entry in (spec.entry, spec.combine_entry, spec.dump_entry):
        assert sizes[entry] > 0 and sizes[entry] % 16 == 0  # whole 16-byte instructions
    got = code_size.spec_sizes(spec, "sm_80")
    assert got == {"attention": sizes[spec.entry], "combine": sizes[spec.combine_entry],
                   "dump": sizes[spec.dump_entry]}
    with pytest.raises(ValueError, match="64-bit little-endian ELF"):
        code_size.text_sizes(b"\x7fELF\x01\x01" + bytes(64))
    with pytest.raises(ValueError, match="section headers"):
        code_size.text_sizes(cubin[:200])  # cut short: the headers it points to are gone


def test_fp8_excess_splits_a_call_into_floor_and_overhead(tmp_path, capsys):
    """A pair with the same overhead over its floor has extra 0 and the
    'same' ratio equal to its ratio; an fp8 call 2 us slower shows extra 2."""
    import json

    import fp8_excess

    floor16 = 10.0  # us at 1 TB/s: 1e7 bytes
    rows = [dict(case="f00_b1_h8x1_d128_dense_100", kv_bytes_fp16=10_000_000, fp16_us=floor16 + 5, fp8_us=floor16 / 2 + 5),
            dict(case="f01_b1_h8x1_d64_dense_100", kv_bytes_fp16=10_000_000, fp16_us=floor16 + 5, fp8_us=floor16 / 2 + 7)]
    path = tmp_path / "fp8.json"
    path.write_text(json.dumps(dict(rows=rows)))
    got = {r["case"]: r["_e"] for r in fp8_excess.main([str(path), "--tbps", "1"])}
    a, b = got[rows[0]["case"]], got[rows[1]["case"]]
    assert a["over16"] == pytest.approx(5) and a["over8"] == pytest.approx(5) and a["extra"] == pytest.approx(0)
    assert a["same"] == pytest.approx(a["ratio"]) == pytest.approx(10 / 15)
    assert b["extra"] == pytest.approx(2) and b["ratio"] == pytest.approx(12 / 15)
    out = capsys.readouterr().out
    assert "2 shapes from 1 files" in out and "\nd64 " in out and "< 60 MB" in out
    with pytest.raises(SystemExit, match="files: no file matches"):
        fp8_excess.main([str(tmp_path / "none*.json")])


def test_spec_texts_of_the_sass_tools_are_checked():
    """tools/code_size.py / sass_loop.py --specs: dtype:head_dim:group:dense|paged[:features];
    another form or a value make_spec refuses exits naming the text (before
    any compile)."""
    from cupy_lean import kernels as K

    assert sass_loop._spec("f16:128:4:dense").name == K.make_spec("f16", 128, 4, False).name
    assert sass_loop._spec("bf16:64:8:paged:1").features == 1
    for text, msg in (("f16:128:4", "expected dtype:head_dim"), ("f16:128:4:ragged", "expected dtype:head_dim"),
                      ("f16:128.0:4:dense", "must be integers"), ("f16:96:4:dense", "head_dim"),
                      ("f32:128:4:dense", "f32"), ("f16:128:4:dense:48", "features"), ("", "got ''")):
        with pytest.raises(SystemExit, match=msg):
            sass_loop._spec(text)
    with pytest.raises(SystemExit, match="f16:96:4:dense"):
        code_size.main(["--specs", "f16:64:4:dense,f16:96:4:dense"])


def test_pair_heads_transform_gives_the_plain_result_on_the_reference_path(capsys):
    """tools/pair_heads_probe.py's transform (two neighbouring KV heads read
    as one 128-wide head, q padded by zeros in the other half, the wanted
    half taken back) gives the plain call's output on the NumPy reference
    path, with an fp8 cache, ragged lengths, one-token pages, sinks, a window
    and a soft-cap; and the padding leaves exactly the other halves zero."""
    import numpy as np
    import pair_heads_probe as P

    assert P.check_cpu() < 1e-6
    q = np.arange(2 * 12 * 64, dtype=np.float32).reshape(2, 12, 64) + 1
    qp = P.pair_q(q, 3)  # 4 KV heads of 3 query heads: pairs (0, 1) and (2, 3)
    assert qp.shape == (2, 12, 128)
    for i in range(12):
        half = (i // 3) % 2
        assert (qp[:, i, 64 * half:64 * half + 64] == q[:, i]).all()
        assert (qp[:, i, 64 * (1 - half):64 * (1 - half) + 64] == 0).all()
    assert (P.unpair_out(qp, 3) == q).all()
    k = np.zeros((5, 1, 4, 64), np.uint8)
    assert P.pair_kv(k).shape == (5, 1, 2, 128) and np.shares_memory(P.pair_kv(k), k)
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")  # (CI has it: the fused copies' kernel compiles)
    from cupy_lean import kernels as K

    assert b"lean_pair_heads" in K.compile_cubin(None, "sm_90")  # (the package's, which the probe launches)
