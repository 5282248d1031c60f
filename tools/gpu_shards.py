"""Run the GPU-marked tests in several pytest processes at once.

The GPU tests spend most of their time compiling kernels and computing NumPy
references, so a few processes sharing one GPU finish several times sooner
than one.  Ids are collected once and dealt round-robin to the shards; each
shard's output goes into one summary file, shard by shard.

Usage: python tools/gpu_shards.py [--shards 6] [--out FILE] [-k EXPR]
"""
import argparse
import os
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=6)
    ap.add_argument("--out", default="gpu_tests.txt")
    ap.add_argument("-k", default="")
    args = ap.parse_args()
    ids = collect(args.k)
    n = max(1, min(args.shards, len(ids)))
    tmp = tempfile.mkdtemp(prefix="gpu_shards_")
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
        part = ids[i::n]
        idfile = os.path.join(tmp, f"ids{i}.txt")
        with open(idfile, "w") as f:
            f.write("\n".join(part))
        log = open(os.path.join(tmp, f"log{i}.txt"), "w")
        # ids may hold spaces, so they go to pytest through a file, not argv splitting
        code = ("import sys, pytest; ids = open(sys.argv[1]).read().split('\\n'); "
                "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-rfE'] + ids))")
        procs.append((subprocess.Popen([sys.executable, "-c", code, idfile], stdout=log,
                                       stderr=subprocess.STDOUT), log, len(part)))
    for i, (p, log, _) in enumerate(procs):
        rcs[i] = p.wait()
        log.close()
        write_summary()
    sys.exit(max(rcs))


if __name__ == "__main__":
    main()
