"""Run the GPU-marked tests in several pytest processes at once.

The GPU tests spend most of their time compiling kernels and computing NumPy
references, so a few processes sharing one GPU finish several times sooner
than one.  Ids are collected once and dealt to the shards: longest first to
the least loaded shard by the durations of an earlier run (``--durations``,
default tools/gpu_durations.json; tests it does not know count as its
median), round-robin without one. Each shard's output goes into one summary
file, shard by shard, and the run's own durations into ``--save-durations``
(for the next run).

Each shard's BLAS / OpenMP pools get ``cpus // shards`` threads (unless
OMP_NUM_THREADS, OPENBLAS_NUM_THREADS or MKL_NUM_THREADS is set): with a
pool of every core in each shard, 12 shards on 16 cores ran the suite at
about 2.5x its usual time (load average 42-55; the NumPy references are
what the shards mostly wait on).

Usage: python tools/gpu_shards.py [--shards 6] [--out FILE] [-k EXPR]
                                  [--durations F.json] [--save-durations F.json]
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time


def collect(k):
    cmd = [sys.executable, "-m", "pytest", "tests", "-m", "gpu", "--collect-only", "-q",
           "-p", "no:cacheprovider"]
    if k:
        cmd += ["-k", k]
    res = subprocess.run(cmd, capture_output=True, text=True)
    ids = [ln.strip() for ln in res.stdout.splitlines() if "::" in ln]
    if not ids:
        sys.exit("no GPU tests collected:\n" + res.stdout[-2000:] + res.stderr[-2000:])
    return ids


DURATION = re.compile(r"^\s*([0-9.]+)s (call|setup|teardown)\s+(\S.*?)\s*$")


def parse_durations(text):
    """Seconds per test id (setup, call and teardown summed) from pytest's
    ``--durations`` report."""
    out = {}
    for line in text.splitlines():
        m = DURATION.match(line)
        if m:
            out[m.group(3)] = out.get(m.group(3), 0.0) + float(m.group(1))
    return out


def deal(ids, n, durations=None):
    """``n`` lists of ids: longest known first, each to the shard with the
    least time so far (unknown ids count as the median known duration);
    round-robin when no duration is known."""
    known = [durations[i] for i in ids if durations and i in durations]
    if not known:
        return [ids[i::n] for i in range(n)]
    fill = sorted(known)[len(known) // 2]
    load, parts = [0.0] * n, [[] for _ in range(n)]
    for i in sorted(ids, key=lambda x: -durations.get(x, fill)):
        k = min(range(n), key=lambda j: (load[j], j))
        parts[k].append(i)
        load[k] += durations.get(i, fill)
    return parts


THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def shard_env(n, env=None, cpus=None):
    """The environment of each of ``n`` shards: the thread pools split over
    the CPUs (at least one thread each), a variable already set kept."""
    env = dict(os.environ if env is None else env)
    if not cpus:
        try:
            cpus = len(os.sched_getaffinity(0))  # the CPUs this process may use
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
    per = max(1, cpus // max(1, n))
    for var in THREAD_VARS:
        env.setdefault(var, str(per))
    return env


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=6)
    ap.add_argument("--out", default="gpu_tests.txt")
    ap.add_argument("-k", default="")
    ap.add_argument("--durations", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                        "gpu_durations.json"),
                    help="seconds per test id of an earlier run (missing: round-robin)")
    ap.add_argument("--save-durations", default="", help="write this run's seconds per test id here")
    args = ap.parse_args()
    ids = collect(args.k)
    n = max(1, min(args.shards, len(ids)))
    durations = json.load(open(args.durations)) if os.path.exists(args.durations) else None
    parts = deal(ids, n, durations)
    tmp = tempfile.mkdtemp(prefix="gpu_shards_")
    env = shard_env(n)
    procs = []
    t0 = time.time()
    rcs = [None] * n

    def write_summary(note=""):
        # every shard's log so far (a shard still running shows its progress
        # dots) and one line per shard; rewritten as shards finish, and on
        # SIGTERM (an outer `timeout`), so a cut run still says what passed
        wall = time.time() - t0
        with open(args.out, "w") as out:
            for i in range(n):
                out.write(f"===== shard {i} ({procs[i][2]} tests, rc {rcs[i]}) =====\n")
                out.write(open(os.path.join(tmp, f"log{i}.txt")).read())
            out.write(f"\n{len(ids)} GPU tests in {n} shards, {wall:.0f} s wall{note}\n")
            for i in range(n):
                last = [ln for ln in open(os.path.join(tmp, f"log{i}.txt")).read().splitlines()
                        if any(w in ln for w in ("passed", "failed", "skipped", "error")) and " in " in ln]
                state = last[-1] if last and rcs[i] is not None else "still running"
                out.write(f"shard {i}: rc {rcs[i]} {state}\n")

    def on_term(signum, frame):
        for p, log, _ in procs:
            if p.poll() is None:
                p.terminate()
            if not log.closed:
                log.flush()
        if len(procs) == n:
            write_summary(" (stopped by a signal: unfinished shards say so)")
        sys.exit(124)

    signal.signal(signal.SIGTERM, on_term)
    for i in range(n):
        part = parts[i]
        idfile = os.path.join(tmp, f"ids{i}.txt")
        with open(idfile, "w") as f:
            f.write("\n".join(part))
        log = open(os.path.join(tmp, f"log{i}.txt"), "w")
        # ids may hold spaces, so they go to pytest through a file, not argv splitting
        code = ("import sys, pytest; ids = open(sys.argv[1]).read().split('\\n'); "
                "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-rfEs', '--durations=0', "
                "'--durations-min=0.02'] + ids))")
        procs.append((subprocess.Popen([sys.executable, "-c", code, idfile], stdout=log,
                                       stderr=subprocess.STDOUT, env=env), log, len(part)))
    for i, (p, log, _) in enumerate(procs):
        rcs[i] = p.wait()
        log.close()
        write_summary()
    if args.save_durations:
        seen = {}
        for i in range(n):
            seen.update(parse_durations(open(os.path.join(tmp, f"log{i}.txt")).read()))
        with open(args.save_durations, "w") as f:
            json.dump(dict(sorted(seen.items())), f, indent=0)
    sys.exit(max(rcs))


if __name__ == "__main__":
    main()
