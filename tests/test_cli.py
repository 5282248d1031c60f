"""The command line: help, argument errors (exit 2, no traceback), the
schedule command."""

import subprocess
import sys

import pytest


def _run(*args):
    return subprocess.run([sys.executable, "-m", "cupy_lean", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_every_command():
    r = _run("--help")
    assert r.returncode == 0
    for cmd in ("demo", "schedule", "bench"):
        assert cmd in r.stdout
    r = _run("schedule", "--help")
    assert r.returncode == 0 and "--lens" in r.stdout and "default 132" in r.stdout


@pytest.mark.parametrize("args,msg", [
    ((), "required: COMMAND"),
    (("nope",), "invalid choice: 'nope'"),
    (("schedule", "--lens", "abc"), "expected comma-separated integers, got 'abc'"),
    (("schedule", "--lens", "5,-1"), "lengths >= 0"),
    (("schedule", "--lens", "-5,3"), "expected one or more lengths >= 0, got '-5,3'"),  # not "expected one argument"
    (("schedule", "--lens", "5,,6"), "none left empty, got '5,,6'"),
    (("schedule", "--lens", "5,100000000000"), "lengths of at most 2147483392 tokens (the kernels' longest sequence), "
                                               "got 100000000000"),
    (("schedule", "--lens", "5,"), "none left empty, got '5,'"),
    (("schedule", "--lens", "64", "--tile-size", "48"), "invalid choice: 48"),
    (("schedule", "--lens", "64", "--png", "/no/such/folder/x.png"), "does not exist"),
    (("schedule", "--lens", "64", "--num-ctas", "0"), "expected an integer >= 1, got 0"),
    (("schedule", "--lens", "64", "--merge-balance", "-3"), "expected an integer >= 0, got -3"),
    (("schedule", "--lens", "64,9", "--group", "1000"), "groups of 1 to 128, got 1000"),
])
def test_bad_arguments_exit_2_without_traceback(args, msg):
    r = _run(*args)
    assert r.returncode == 2
    assert msg in r.stderr and "Traceback" not in r.stderr


def test_schedule_says_which_grid_it_assumed(tmp_path):
    png = tmp_path / "s.png"
    r = _run("schedule", "--lens", "300,5,0", "--heads-kv", "2", "--sms", "10", "--png", str(png))
    assert r.returncode == 0, r.stderr
    # the default plan's grid: head_dim 128, group 4 -> tile 128, one CTA per SM
    assert "(grid: 10 CTAs, 1 CTA(s) per SM on 10 SMs, tile 128, merge balance 0)" in r.stdout
    assert png.stat().st_size > 0
    r = _run("schedule", "--lens", "300,5,0", "--heads-kv", "2", "--tile-size", "16", "--merge-balance", "1",
             "--num-ctas", "7")
    assert r.returncode == 0 and "(grid: 7 CTAs, --num-ctas 7, tile 16, merge balance 1)" in r.stdout


@pytest.mark.parametrize("args, note", [
    (("--lens", "1000,200,0"),
     "(work for 120 of the grid's 132 CTAs: the split-K chosen at launch gives each CTA one whole chunk of a unit)"),
    (("--lens", "0,0"), "(work for 0 of the grid's 1 CTAs: no sequence has a key)"),
    (("--lens", "100,100", "--num-ctas", "50"), "(work for 16 of the grid's 50 CTAs: fewer tiles than CTAs)"),
    (("--lens", "59,2251", "--num-ctas", "84", "--merge-balance", "1", "--heads-kv", "1", "--tile-size", "16"),
     "(work for 12 of the grid's 84 CTAs: the merge balance gives each CTA a range of at least a minimum size)"),
    (("--lens", "30000,20000"), None),
])
def test_schedule_says_when_part_of_the_grid_has_no_work(args, note):
    r = _run("schedule", *args)
    assert r.returncode == 0, r.stderr
    num = int(next(ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("num_ctas")))
    grid = int(r.stdout.split("(grid: ")[1].split()[0])
    if note is None:
        assert num == grid and "work for" not in r.stdout
    else:
        assert note in r.stdout and num < grid


@pytest.mark.parametrize("args,msg", [
    (("--lens", "5,x"), "expected comma-separated integers"),
    (("--lens", "5,,6"), "none left empty, got '5,,6'"),
    (("--lens=-5,3",), "--lens: expected lengths >= 0, got -5"),
    (("--heads-q", "0"), "expected an integer >= 1, got 0"),
    (("--heads-kv", "x"), "expected an integer >= 1, got 'x'"),
    (("--heads-q", "30", "--heads-kv", "8"), "--heads-q: expected a multiple of --heads-kv (8), got 30"),
    (("--page-size", "-1"), "expected an integer >= 0, got -1"),
    (("--repeats", "0"), "expected an integer >= 1, got 0"),
    (("--schedules", "lean,stream"), "--schedules: expected comma-separated names from lean, split, head"),
    (("--tile-sizes", "48"), "--tile-sizes: expected values from"),
    (("--num-ctas", "0,132"), "--num-ctas: expected values >= 1, got 0"),
    (("--stages", "7"), "--stages: expected values from 2 to 6, got 7"),
    (("--ctas-per-sm", "0"), "--ctas-per-sm: expected values >= 1, got 0"),
])
def test_bench_names_a_bad_option_before_any_gpu_work(args, msg):
    """Checked with or without a GPU: exit 2, the option and the value named."""
    r = _run("bench", *args)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_bench_help_and_no_gpu_message():
    r = _run("bench", "--help")
    assert r.returncode == 0 and "--cold-l2" in r.stdout and "--tile-sizes" in r.stdout
    r = _run("bench", "--lens", "5,x")
    assert r.returncode == 2 and "expected comma-separated integers" in r.stderr
    import cupy_lean

    if cupy_lean.gpu_available():
        pytest.skip("a GPU is present")
    pytest.importorskip("cupy")
    r = _run("bench")
    assert r.returncode == 1 and "no usable CUDA GPU" in r.stderr and "Traceback" not in r.stderr


def test_schedule_shows_the_default_plans_merge():
    """Few units for the grid: the default plan's merge by the combine launch
    (also with --merge-balance 0, the default); a grid given by --num-ctas
    keeps the in-kernel merge; the grid is clamped to one CTA per tile as the
    plan's is; one sequence gets a note on the plan's variants."""
    r = _run("schedule", "--lens", "90000,3000", "--heads-kv", "2")
    assert r.returncode == 0 and "merge             by the combine launch" in r.stdout, r.stdout
    r = _run("schedule", "--lens", "90000,3000", "--heads-kv", "2", "--merge-balance", "0")
    assert "by the combine launch" in r.stdout
    r = _run("schedule", "--lens", "90000,3000", "--heads-kv", "2", "--num-ctas", "132")
    assert "by each partial unit's last contributor" in r.stdout
    r = _run("schedule", "--lens", "100,100", "--heads-kv", "1")
    assert "(grid: 2 CTAs" in r.stdout and "in the kernel" in r.stdout, r.stdout
    r = _run("schedule", "--lens", "90000", "--heads-kv", "2")
    assert "one sequence: the default plan may run its split-K variant" in r.stdout


def test_schedule_takes_the_tile_of_varied_lengths():
    """Several lengths at head_dim 64: the plan's tile for them
    (kernels.varied_length_tile: 64 tokens, two CTAs per SM); one length, or
    head_dim 128, or --tile-size, keeps the default tile."""
    r = _run("schedule", "--lens", "3000,17,900", "--head-dim", "64", "--heads-kv", "2", "--sms", "10")
    assert r.returncode == 0 and "(grid: 20 CTAs, 2 CTA(s) per SM on 10 SMs, tile 64," in r.stdout, r.stdout
    r = _run("schedule", "--lens", "3000", "--head-dim", "64", "--heads-kv", "2", "--sms", "10")
    assert r.returncode == 0 and "1 CTA(s) per SM on 10 SMs, tile 128," in r.stdout, r.stdout
    r = _run("schedule", "--lens", "3000,17,900", "--head-dim", "128", "--heads-kv", "2", "--sms", "10")
    assert r.returncode == 0 and "1 CTA(s) per SM on 10 SMs, tile 128," in r.stdout, r.stdout
    r = _run("schedule", "--lens", "3000,17,900", "--head-dim", "64", "--heads-kv", "2", "--sms", "10",
             "--tile-size", "128")
    assert r.returncode == 0 and "1 CTA(s) per SM on 10 SMs, tile 128," in r.stdout, r.stdout


def test_schedule_shows_the_in_kernel_split_rule():
    """Twenty 1000-token sequences and one of 2560 at head_dim 128 (21 units,
    132 CTAs, under 8 per unit: the in-kernel merge): stream-K's busiest CTA
    has 2 tiles, the split's 4 (20 tiles in 6 chunks); the in-kernel rule
    (twice stream-K's busiest) takes the split, which the merge launch's rule
    (one tile more) would not; 3137 tokens (5 tiles per chunk) keep stream-K."""
    lens = ",".join(["1000"] * 20 + ["2560"])
    r = _run("schedule", "--lens", lens, "--heads-kv", "1", "--group", "4", "--head-dim", "128")
    assert r.returncode == 0 and "schedule          split" in r.stdout, r.stdout
    assert "chunks merged by each unit's last chunk, in the kernel" in r.stdout
    assert "tiles per CTA     min 0  max 4" in r.stdout
    lens = ",".join(["1000"] * 20 + ["3137"])
    r = _run("schedule", "--lens", lens, "--heads-kv", "1", "--group", "4", "--head-dim", "128")
    assert r.returncode == 0 and "schedule          lean" in r.stdout, r.stdout
