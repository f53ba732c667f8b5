"""Stress run of the graph-mode parallel-branch reproduction; not part of the suite.

    PYTHONPATH=. python -m tests.workers.stress_parallel_branches --runs 5 --ranks 2 4 --load 0 2

Runs tests/workers/repro_graph_parallel_branches.py (a residual block with SyncBatchNorm
on parallel branches, graph mode, CPU) `--runs` times for every rank count and every
background load (that many busy-looping processes started for the duration, then
stopped), and prints per configuration how many runs passed, how many were stopped by
the backward layer-identity check (the runtime issued the branches' backward
all-reduces in different orders on different ranks), how many returned wrong dx
undetected, and how many failed otherwise. `--dispatch-threads K` passes MindSpore's
runtime dispatch thread count to the reproduction, `--sizes` its per-rank batch sizes.

`--check-order` also has every rank dump its actor set (MS_DEV_SAVE_GRAPHS=1; ~50 MB per
rank, deleted after each run) and reads from it the order in which the runtime's control
arrows make that rank issue its all-reduces (tests/actor_dump.py): per run, "same" if the
chains of all-reduces linked by kernel control arrows are identical on all ranks, "differ"
or "unchained" otherwise, and the chain lengths ("5+10x1": the five backward all-reduces in
one chain, ten forward ones alone in their kernel graphs, which run one after another).
All-reduces in different chains are ordered only by MindSpore's control-flow actors between
kernel graphs, or not at all (the run's outcome can then be luck).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from tests.actor_dump import allreduce_chains, rank_dumps, read_actor_dump
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


def collective_order(save_graphs_path, ranks):
    """('same' | 'differ' | 'unchained' | 'no dump', chain lengths): the order the runtime's
    control arrows impose on every rank's all-reduces, and how they group into chains on
    rank 0 (e.g. "5+10x1": five all-reduces in one chain, ten alone in their kernel graphs)."""
    dumps = rank_dumps(save_graphs_path)
    if sorted(dumps) != list(range(ranks)):
        return "no dump", ""
    chains = [[(path.name, allreduce_chains(read_actor_dump(path))) for path in dumps[rank]]
              for rank in range(ranks)]
    lengths = sorted((len(chain.kernels) for _, graph in chains[0] for chain in graph), reverse=True)
    shape = "+".join(f"{n}x{length}" if n > 1 else f"{length}"
                     for length, n in sorted(Counter(lengths).items(), reverse=True))
    if not all(chain.chained for rank_chains in chains for _, graph in rank_chains for chain in graph):
        return "unchained", shape
    return ("same" if all(c == chains[0] for c in chains) else "differ"), shape


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
    parser.add_argument("--sizes", default="",
                        help="per-rank batch sizes passed to the reproduction (one --ranks value)")
    parser.add_argument("--check-order", action="store_true",
                        help="compare the runtime's all-reduce order across ranks (actor-set dumps)")
    args = parser.parse_args()
    extra = ["--dispatch-threads", str(args.dispatch_threads)] if args.dispatch_threads else []
    extra += ["--sizes", args.sizes] if args.sizes else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in args.ranks:
            for load in args.load:
                counts = dict(passed=0, stopped=0, wrong=0, crashed=0)
                orders = dict(same=0, differ=0, unchained=0)
                procs = start_load(load)
                start = time.monotonic()
                try:
                    for run in range(args.runs):
                        run_dir = Path(tmp) / f"r{ranks}_l{load}_{run}"
                        run_dir.mkdir()
                        env, ir_dir = None, run_dir / "ir"
                        if args.check_order:
                            env = dict(os.environ, MS_DEV_SAVE_GRAPHS="1",
                                       MS_DEV_SAVE_GRAPHS_PATH=str(ir_dir))
                        result = run_msrun(REPRO, ranks, run_dir, *extra, timeout=300, env=env)
                        outcome = classify(result)
                        counts["passed" if outcome == "pass" else outcome] += 1
                        order = ""
                        if args.check_order:
                            order, shape = collective_order(ir_dir, ranks)
                            orders[order] = orders.get(order, 0) + 1
                            shutil.rmtree(ir_dir, ignore_errors=True)
                            order = f", all-reduce order across ranks: {order}, chains {shape}"
                        print(f"ranks {ranks} load {load} run {run}: {outcome} "
                              f"({result.elapsed:.0f} s{order})", flush=True)
                finally:
                    stop_load(procs)
                rows.append((ranks, load, counts, orders, time.monotonic() - start))
    print(f"\n{'ranks':>5} {'load':>4} {'runs':>4} {'pass':>4} {'stopped':>7} {'wrong':>5} "
          f"{'crashed':>7} {'mis-ordered':>11} {'order same/differ/unchained/no dump':>36}")
    for ranks, load, c, o, seconds in rows:
        runs = sum(c.values())
        order = (f"{o['same']}/{o['differ']}/{o['unchained']}/{o.get('no dump', 0)}"
                 if args.check_order else "not checked")
        print(f"{ranks:>5} {load:>4} {runs:>4} {c['passed']:>4} {c['stopped']:>7} {c['wrong']:>5} "
              f"{c['crashed']:>7} {(c['stopped'] + c['wrong']) / max(runs, 1):>10.0%} {order:>36}")


if __name__ == "__main__":
    main()
