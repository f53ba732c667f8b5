"""Stress run of the graph-mode parallel-branch reproduction; not part of the suite.

    PYTHONPATH=. python -m tests.workers.stress_parallel_branches --runs 5 --ranks 2 4 --load 0 2

Runs tests/workers/repro_graph_parallel_branches.py (a residual block with SyncBatchNorm
on parallel branches, graph mode, CPU) `--runs` times for every rank count and every
background load (that many busy-looping processes started for the duration, then
stopped), and prints per configuration how many runs passed, how many were stopped by
the backward layer-identity check (the runtime issued the branches' backward
all-reduces in different orders on different ranks), how many returned wrong dx
undetected, and how many failed otherwise. `--dispatch-threads K` passes MindSpore's
runtime dispatch thread count to the reproduction.
"""
import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.harness import run_msrun

REPRO = "repro_graph_parallel_branches.py"


def classify(result):
    """'pass', 'stopped', 'wrong' or 'crashed' for one msrun run of the reproduction."""
    logs = "".join(p.read_text(errors="replace") for p in sorted(result.log_dir.glob("worker_*.log")))
    outcomes = re.findall(r"^\d+ RESULT (PASS|FAIL|STOPPED)", logs, flags=re.MULTILINE)
    if "STOPPED" in outcomes:
        return "stopped"
    if "FAIL" in outcomes:
        return "wrong"
    if result.returncode == 0 and outcomes and all(o == "PASS" for o in outcomes):
        return "pass"
    return "crashed"


def start_load(processes):
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]


def stop_load(procs):
    for proc in procs:
        proc.kill()
        proc.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--load", type=int, nargs="+", default=[0, 2],
                        help="numbers of busy-looping background processes")
    parser.add_argument("--dispatch-threads", type=int, default=0)
    args = parser.parse_args()
    extra = ["--dispatch-threads", str(args.dispatch_threads)] if args.dispatch_threads else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in args.ranks:
            for load in args.load:
                counts = dict(passed=0, stopped=0, wrong=0, crashed=0)
                procs = start_load(load)
                start = time.monotonic()
                try:
                    for run in range(args.runs):
                        run_dir = Path(tmp) / f"r{ranks}_l{load}_{run}"
                        run_dir.mkdir()
                        result = run_msrun(REPRO, ranks, run_dir, *extra, timeout=300)
                        outcome = classify(result)
                        counts["passed" if outcome == "pass" else outcome] += 1
                        print(f"ranks {ranks} load {load} run {run}: {outcome} "
                              f"({result.elapsed:.0f} s)", flush=True)
                finally:
                    stop_load(procs)
                rows.append((ranks, load, counts, time.monotonic() - start))
    print(f"\n{'ranks':>5} {'load':>4} {'runs':>4} {'pass':>4} {'stopped':>7} {'wrong':>5} "
          f"{'crashed':>7} {'mis-ordered':>11}")
    for ranks, load, c, seconds in rows:
        runs = sum(c.values())
        print(f"{ranks:>5} {load:>4} {runs:>4} {c['passed']:>4} {c['stopped']:>7} {c['wrong']:>5} "
              f"{c['crashed']:>7} {(c['stopped'] + c['wrong']) / max(runs, 1):>10.0%}")


if __name__ == "__main__":
    main()
