"""Benchmark: SyncBatchNorm vs local batch norms under msrun, collective payloads, kernel bandwidth.

Run ``python -m ms_syncbn.bench --help`` for the flags. For each rank count
(default 1, 2 and 4) it launches one msrun job (free port, its own log
directory, a hard timeout) running ``ms_syncbn/_bench_worker.py`` on every
rank, which times forward+backward training steps of

* ms_syncbn.SyncBatchNorm, synchronized over all ranks,
* MindSpore's local ``nn.BatchNorm2d`` (no communication),
* PyTorch's local ``BatchNorm2d`` with one thread (when torch is importable),

on the same per-rank input, alternately in the same job, in PyNative and graph
mode, and the parts of a SyncBatchNorm step (its forward, the four kernels
alone, the three all-reduces alone). It also records the all-reduce payloads of
SyncBatchNorm (element counts per collective, first and steady step) and, in
this process and single-threaded, the memory bandwidth each CPU kernel achieves
against a NumPy copy of the same number of bytes.

Output: a table on stdout and a JSON file (``--json``, default
bench_results.json). Step times are the median over ``--iters`` steps on each
rank; the table shows the slowest rank (a synchronized step waits for it), the
JSON every rank. The numbers are wall-clock times on a shared machine: expect
noise, and compare candidates within one run only.
"""
import argparse
import ctypes
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

DEFAULT_SHAPES = "8x64x32x32,32x256x14x14,2x32x128x128"
QUICK_SHAPES = "2x8x4x4"
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_bench_worker.py")
FLOAT32_BYTES = 4

# Targets, checked at 2 ranks.
TARGET_SYNCBN_OVER_BN2D = 1.0
TARGET_SYNCBN_OVER_TORCH_GRAPH = 1.5
TARGET_KERNEL_COPY_FRACTION = 0.5
# The speed and bandwidth targets are judged only at shapes of at least this many elements per
# rank (2 MiB of float32; every default shape, 8x64x32x32 the smallest): below it a step's time
# is framework dispatch and a kernel's is its call overhead, which no batch norm can change.
# The payload targets are exact and judged at every shape.
TARGET_MIN_ELEMENTS = 8 * 64 * 32 * 32


# mint.nn.SyncBatchNorm's training step (mindspore/mint/nn/layer/_functions.py, MindSpore
# 2.10, SyncBatchNormInner.construct / bprop): the kernels it launches, in order. Its forward
# is counted from its compiled graph like ours; its bprop does not compile in graph mode on
# CPU, so its backward is this list.
MINT_SYNCBN_GRAPH = {
    "forward": ["BatchNormStats", "Fill (count)", "Concat", "AllGather", "Reshape", "Split",
                "BatchNormGatherStatsWithCounts", "BatchNormElemt", "Reshape (counts)"],
    "backward": ["BatchNormReduceGrad", "Concat", "AllReduce", "Split", "BatchNormElemtGrad"],
    "source": "mindspore/mint/nn/layer/_functions.py of MindSpore 2.10, SyncBatchNormInner; "
              "its running-statistics update is inside BatchNormGatherStatsWithCounts",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m ms_syncbn.bench",
        description="Time SyncBatchNorm against MindSpore's nn.BatchNorm2d (and torch's BatchNorm2d "
                    "when torch is installed) under msrun (1, 2, 4 ranks; PyNative and graph), record the all-reduce payloads, "
                    "and measure the CPU kernels' memory bandwidth against a plain copy.",
        epilog="Example: python -m ms_syncbn.bench --ranks 2 --modes graph --shapes 8x64x32x32 "
               "--iters 50. The machine's other load shows up in the numbers: compare candidates "
               "within one run.")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: shape {QUICK_SHAPES}, 1 and 2 ranks, 3 iterations, "
                             f"2 warm-up steps (explicit flags still win)")
    parser.add_argument("--ranks", default=None,
                        help="comma-separated rank counts, one msrun job each (default 1,2,4)")
    parser.add_argument("--modes", default="pynative,graph",
                        help="comma-separated subset of pynative,graph (default both)")
    parser.add_argument("--shapes", default=None,
                        help=f"comma-separated per-rank input shapes NxCxHxW (default {DEFAULT_SHAPES})")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed steps per candidate (default 30)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps per candidate first, incl. compilation (default 5)")
    parser.add_argument("--bandwidth-iters", type=int, default=None,
                        help="timed calls per kernel in the bandwidth measurement (default 200)")
    parser.add_argument("--json", default="bench_results.json", metavar="PATH",
                        help="where to write the results (default bench_results.json)")
    parser.add_argument("--log-dir", default=None,
                        help="msrun log directories go here (default: a new temporary directory)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds before an msrun job is killed (default 900, quick 300)")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch even if importable")
    parser.add_argument("--no-components", action="store_true",
                        help="skip the SyncBatchNorm step breakdown (forward, kernels, all-reduces)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.ranks = [int(r) for r in (args.ranks or ("1,2" if quick else "1,2,4")).split(",")]
    args.shapes = args.shapes or (QUICK_SHAPES if quick else DEFAULT_SHAPES)
    args.iters = args.iters or (3 if quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (2 if quick else 5)
    args.bandwidth_iters = args.bandwidth_iters or (5 if quick else 200)
    args.timeout = args.timeout or (300.0 if quick else 900.0)
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in ("pynative", "graph")]
    if unknown:
        parser.error(f"--modes: unknown mode(s) {unknown}; use pynative and/or graph")
    for text in args.shapes.split(","):
        parts = text.split("x")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            parser.error(f"--shapes: {text!r} is not NxCxHxW with positive sizes")
    if any(r < 1 for r in args.ranks):
        parser.error(f"--ranks: rank counts must be >= 1, got {args.ranks}")
    return args


def shape_of(text):
    return tuple(int(v) for v in text.split("x"))


def torch_available():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------- kernel bandwidth --
class KernelLibrary:
    """The CPU kernel library called directly (ctypes), with MindSpore's AOT convention."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        self.lib.MsSyncBnCpuIsa.restype = ctypes.c_char_p

    @property
    def isa(self):
        return self.lib.MsSyncBnCpuIsa().decode()

    def bind(self, symbol, arrays):
        """A no-argument callable running `symbol` on float32 `arrays` (inputs then output)."""
        n = len(arrays)
        shapes = [(ctypes.c_int64 * max(a.ndim, 1))(*a.shape) for a in arrays]
        params = (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays])
        ndims = (ctypes.c_int * n)(*[a.ndim for a in arrays])
        shape_ptrs = (ctypes.POINTER(ctypes.c_int64) * n)(
            *[ctypes.cast(s, ctypes.POINTER(ctypes.c_int64)) for s in shapes])
        dtypes = (ctypes.c_char_p * n)(*([b"float32"] * n))
        function = getattr(self.lib, symbol)
        keep_alive = (arrays, shapes, params, ndims, shape_ptrs, dtypes)

        def call():
            status = function(n, params, ndims, shape_ptrs, dtypes, None, None)
            if status != 0:
                raise RuntimeError(f"{symbol} returned {status}")
            return keep_alive

        return call


def median_seconds(call, iters):
    call()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return float(np.median(samples))


def measure_kernel_bandwidth(shapes, iters):
    """Single-threaded bandwidth of each kernel (float32) and of a NumPy copy moving the same bytes.

    Bytes a kernel must touch: local_moments reads x (once, with a good hint); normalize reads
    x, writes y;
    backward_reduce reads dy and x; backward_elemt reads dy and x, writes dx.
    The copy moves the same total (half read, half written).
    """
    from ms_syncbn.kernels.cpu import cpu_library_path

    library = KernelLibrary(cpu_library_path())
    rng = np.random.default_rng(0)
    rows = []
    for text in shapes:
        shape = shape_of(text)
        channels = shape[1]
        x = rng.normal(size=shape).astype(np.float32)
        dy = rng.normal(size=shape).astype(np.float32)
        out = np.empty_like(x)
        per_channel = np.ones(channels, np.float32)
        sums = [np.empty(channels, np.float32) for _ in range(4)]
        count = np.array([x.size // channels], np.float32)
        kernels = {
            # the hint 1 is within 8 standard deviations of the mean 0: one pass
            "local_moments": (library.bind("LocalMoments", [x, per_channel, sums[2], sums[3]]),
                              x.nbytes),
            "normalize": (library.bind("Normalize", [x, per_channel, per_channel, per_channel,
                                                     per_channel, out]), 2 * x.nbytes),
            "backward_reduce": (library.bind("BackwardReduce", [dy, x, per_channel, per_channel]
                                             + sums), 2 * x.nbytes),
            "backward_elemt": (library.bind("BackwardElemt", [dy, x, per_channel, per_channel,
                                                              per_channel, sums[0], sums[1], count,
                                                              out]),
                               3 * x.nbytes),
        }
        for name, (call, traffic) in kernels.items():
            source = np.ones(traffic // 2 // 4, np.float32)
            destination = np.empty_like(source)
            copy_seconds = median_seconds(lambda: np.copyto(destination, source), iters)
            kernel_seconds = median_seconds(call, iters)
            kernel_gbps = traffic / kernel_seconds / 1e9
            copy_gbps = traffic / copy_seconds / 1e9
            rows.append({"shape": text, "kernel": name, "bytes": int(traffic),
                         "kernel_us": 1e6 * kernel_seconds, "kernel_gbps": kernel_gbps,
                         "copy_us": 1e6 * copy_seconds, "copy_gbps": copy_gbps,
                         "fraction_of_copy": kernel_gbps / copy_gbps})
    return {"isa": library.isa, "rows": rows}


# ------------------------------------------------------------- msrun jobs --
def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(ranks, args, log_root, use_torch):
    """One msrun job with `ranks` workers; returns the per-rank results (list of dicts)."""
    out_dir = os.path.join(log_root, f"results_{ranks}")
    log_dir = os.path.join(log_root, f"msrun_log_{ranks}")
    os.makedirs(out_dir, exist_ok=True)
    command = ["msrun", f"--worker_num={ranks}", f"--local_worker_num={ranks}",
               f"--master_port={free_port()}", f"--log_dir={log_dir}", "--join=True",
               "--cluster_time_out=120", WORKER, "--out", out_dir, "--modes", args.modes,
               "--shapes", args.shapes, "--iters", str(args.iters), "--warmup", str(args.warmup)]
    if use_torch:
        command.append("--torch")
    if not args.no_components:
        command.append("--components")
    env = dict(os.environ)
    env.setdefault("GLOG_v", "3")
    env.setdefault("OMP_NUM_THREADS", "1")  # one core's worth of threads per rank
    # The workers import the ms_syncbn this process runs, installed or not.
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise RuntimeError(f"msrun with {ranks} rank(s) timed out after {args.timeout:.0f} s; "
                           f"logs in {log_dir}")
    finally:
        if process.poll() is None:  # interrupted (Ctrl-C, SIGTERM): leave nothing running
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    results = []
    for rank in range(ranks):
        path = os.path.join(out_dir, f"rank{rank}.json")
        if process.returncode != 0 or not os.path.exists(path):
            tail = output[-3000:]
            raise RuntimeError(f"msrun with {ranks} rank(s) failed (exit {process.returncode}); "
                               f"no result from rank {rank}. Logs in {log_dir}.\n{tail}")
        with open(path) as f:
            results.append(json.load(f))
    print(f"  {ranks} rank(s): {time.monotonic() - start:.0f} s", file=sys.stderr)
    return results


# --------------------------------------------------------------- results --
def summarize(job_results, args):
    """Per (ranks, mode, shape): the slowest rank's median per candidate, ratios, and payloads."""
    runs, payloads = [], []
    for ranks, per_rank in job_results.items():
        for mode in args.modes.split(","):
            for text in args.shapes.split(","):
                candidates = per_rank[0]["modes"][mode][text].keys()
                row = {"ranks": ranks, "mode": mode, "shape": text,
                       "per_rank_median_ms": {name: [r["modes"][mode][text][name]["median_ms"]
                                                     for r in per_rank] for name in candidates}}
                for name, values in row["per_rank_median_ms"].items():
                    row[f"{name}_ms"] = max(values)
                if "bn2d_ms" in row:
                    row["syncbn_over_bn2d"] = row["syncbn_ms"] / row["bn2d_ms"]
                if "torch_ms" in row:
                    row["syncbn_over_torch"] = row["syncbn_ms"] / row["torch_ms"]
                # What the layers add to the framework's floor (launch, gradient plumbing, synchronisation).
                if "floor_ms" in row:
                    row["syncbn_layer_ms"] = row["syncbn_ms"] - row["floor_ms"]
                    row["bn2d_layer_ms"] = row["bn2d_ms"] - row["floor_ms"]
                if "torch_floor_ms" in row:
                    row["torch_layer_ms"] = row["torch_ms"] - row["torch_floor_ms"]
                runs.append(row)
        for text in args.shapes.split(","):
            channels = shape_of(text)[1]
            recorded = per_rank[0]["payloads"].get(text) if ranks > 1 else None
            steady = recorded["steady_step"] if recorded else []
            payloads.append({
                "ranks": ranks, "shape": text, "channels": channels,
                "first_step_elements": recorded["first_step"] if recorded else [],
                "steady_step_elements": steady,
                "steady_step_bytes": [FLOAT32_BYTES * n for n in steady],
                "identical_on_all_ranks": all(r["payloads"].get(text) == recorded for r in per_rank),
                "expected_elements": ([channels + 5, channels, 2 * channels + 1] if ranks > 1
                                      else []),
                # PyTorch / mint.nn.SyncBatchNorm all-gather W*(2C+1) values in forward:
                "allgather_style_forward_elements": ranks * (2 * channels + 1) if ranks > 1 else 0,
            })
    return runs, payloads


def judged_shape(text):
    """Whether a per-rank shape is large enough to judge the speed and bandwidth targets."""
    return int(np.prod(shape_of(text))) >= TARGET_MIN_ELEMENTS


def check_targets(runs, payloads, bandwidth):
    """The targets, from this run: speed and bandwidth at the shapes that can show them
    (``judged_shape``), the all-reduce payloads at every shape."""
    checks = []
    for row in runs:
        if row["ranks"] != 2 or not judged_shape(row["shape"]):
            continue
        if "syncbn_over_bn2d" in row:
            checks.append({"target": f"SyncBN/nn.BatchNorm2d <= {TARGET_SYNCBN_OVER_BN2D} at 2 ranks",
                           "mode": row["mode"], "shape": row["shape"],
                           "value": row["syncbn_over_bn2d"],
                           "met": row["syncbn_over_bn2d"] <= TARGET_SYNCBN_OVER_BN2D})
        if row["mode"] == "graph" and "syncbn_over_torch" in row:
            checks.append({"target": f"SyncBN/torch <= {TARGET_SYNCBN_OVER_TORCH_GRAPH} at 2 ranks, graph",
                           "mode": row["mode"], "shape": row["shape"],
                           "value": row["syncbn_over_torch"],
                           "met": row["syncbn_over_torch"] <= TARGET_SYNCBN_OVER_TORCH_GRAPH})
    for row in bandwidth["rows"]:
        if not judged_shape(row["shape"]):
            continue
        checks.append({"target": f"kernel bandwidth >= {TARGET_KERNEL_COPY_FRACTION} x copy",
                       "mode": "-", "shape": row["shape"], "kernel": row["kernel"],
                       "value": row["fraction_of_copy"],
                       "met": row["fraction_of_copy"] >= TARGET_KERNEL_COPY_FRACTION})
    for row in payloads:
        expected = row["expected_elements"]
        checks.append({"target": "payload: (C+5) and (C) forward, (2C+1) backward; none at 1 rank",
                       "mode": "pynative", "shape": row["shape"], "ranks": row["ranks"],
                       "value": row["steady_step_elements"],
                       "met": row["steady_step_elements"] == expected and row["identical_on_all_ranks"]})
    return checks


def format_graph_counts(graph_counts, mint_graph):
    """Lines of the kernel-count table (one layer step, from the IR: ms_syncbn/_bench_graphs.py)."""
    lines = ["", "One layer's training step as compiled (graph mode, 2 ranks, from MindSpore's front-end "
                 "IR; Ascend: native kernels, whose front end runs on CPU). kernels (activation-sized), "
                 "activation B/el: bytes of activation-sized tensors read or written, summed over "
                 "kernels, per element of x (an estimate: no cache reuse, no fusion):",
             f"  {'':<30}{'fwd kernels':>14}{'bwd kernels':>14}{'fwd B/el':>9}{'bwd B/el':>9}"
             f"{'collectives':>12}{'branches':>9}{'graphs':>7}"]
    for name, counts in graph_counts.items():
        backward = f"{counts['backward_kernels']} ({counts['backward_activation_kernels']})"
        backward_bytes = f"{counts['backward_activation_bytes_per_element']:.0f}"
        backward_collectives = counts["backward_collectives"]
        label = name if name.startswith("mint") else f"SyncBatchNorm, {name}"
        if name.startswith("mint"):  # its backward is read from its bprop (does not compile on CPU)
            backward = f"{len(mint_graph['backward'])} (2)*"
            backward_bytes = "-"
            backward_collectives = 1
        lines.append(f"  {label:<30}"
                     f"{str(counts['forward_kernels']) + ' (' + str(counts['forward_activation_kernels']) + ')':>14}"
                     f"{backward:>14}{counts['forward_activation_bytes_per_element']:>9.0f}{backward_bytes:>9}"
                     f"{str(counts['forward_collectives']) + '+' + str(backward_collectives):>12}"
                     f"{counts['control_flow_nodes']:>9}{counts['graphs']:>7}")
    lines.append(f"  * mint's backward, read from its bprop: {', '.join(mint_graph['backward'])}")
    lines.append(f"    ({mint_graph['source']})")
    return lines


def format_report(results):
    lines = []
    bandwidth = results["kernel_bandwidth"]
    lines.append(f"ms_syncbn benchmark  {results['started']}  ({results['machine']['cpus']} CPUs, "
                 f"kernels: {bandwidth['isa']}, OMP_NUM_THREADS per rank: "
                 f"{results['config']['omp_num_threads']})")
    lines.append("Step = forward + backward of the layer for an upstream gradient dy (no loss "
                 "reduction), median ms of the slowest rank. "
                 "Shared machine: numbers are noisy.")
    lines.append("floor / torch_floor: the same step with an identity layer; syncbn_fwd: forward "
                 "only; kernels: the 4 CPU kernels alone; allreduce: the step's 3 collectives alone.")
    if not results["config"]["torch"]:
        lines.append("PyTorch's BatchNorm2d: skipped (--no-torch, or torch is not importable in this "
                     "Python): the torch columns stay empty.")
    candidates = ["syncbn", "bn2d", "torch", "floor", "torch_floor", "syncbn_fwd", "kernels",
                  "allreduce"]
    present = [c for c in candidates if any(f"{c}_ms" in r for r in results["runs"])]
    header = f"{'ranks':>5} {'mode':<8} {'shape':<15}" + "".join(f"{c:>12}" for c in present) + \
             f"{'sync/bn2d':>10}{'sync/torch':>11}"
    lines.append(header)
    lines.append("-" * len(header))
    for row in results["runs"]:
        cells = "".join(f"{row[c + '_ms']:>12.2f}" if f"{c}_ms" in row else f"{'-':>12}"
                        for c in present)
        ratio_bn2d = f"{row['syncbn_over_bn2d']:>10.2f}" if "syncbn_over_bn2d" in row else f"{'-':>10}"
        ratio_torch = f"{row['syncbn_over_torch']:>11.2f}" if "syncbn_over_torch" in row else f"{'-':>11}"
        lines.append(f"{row['ranks']:>5} {row['mode']:<8} {row['shape']:<15}{cells}{ratio_bn2d}{ratio_torch}")
    lines.append("")
    lines.append("All-reduce payloads of SyncBatchNorm (float32 elements per collective; "
                 "steady step, PyNative):")
    for row in results["payloads"]:
        steady = row["steady_step_elements"]
        text = ", ".join(f"{n} ({FLOAT32_BYTES * n} B)" for n in steady) or "none"
        first = row["first_step_elements"]
        extra = f"; first step {first}" if first and first != steady else ""
        lines.append(f"  {row['ranks']} rank(s) {row['shape']:<15} C={row['channels']:<4} {text}{extra}"
                     + (f"  [all-gather style would be {row['allgather_style_forward_elements']}]"
                        if row["ranks"] > 1 else ""))
    if results.get("graph_counts"):
        lines.extend(format_graph_counts(results["graph_counts"], results["mint_graph"]))
    lines.append("")
    lines.append(f"Kernel bandwidth, float32, one thread ({bandwidth['isa']}), vs NumPy copy of the "
                 f"same bytes:")
    lines.append(f"  {'shape':<15} {'kernel':<16} {'MB':>7} {'us':>9} {'GB/s':>8} {'copy GB/s':>10} {'fraction':>9}")
    for row in bandwidth["rows"]:
        lines.append(f"  {row['shape']:<15} {row['kernel']:<16} {row['bytes'] / 1e6:>7.2f} "
                     f"{row['kernel_us']:>9.1f} {row['kernel_gbps']:>8.1f} {row['copy_gbps']:>10.1f} "
                     f"{row['fraction_of_copy']:>9.2f}")
    lines.append("")
    lines.append("Targets:")
    unjudged = sorted({text for text in results["config"]["shapes"] if not judged_shape(text)})
    if unjudged:
        lines.append(f"  speed and bandwidth not judged at {', '.join(unjudged)}: too small to show "
                     f"them (step time is dispatch); judged from {TARGET_MIN_ELEMENTS} elements "
                     f"per rank, e.g. 8x64x32x32")
    for check in results["targets"]:
        value = check["value"]
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        where = " ".join(str(check[k]) for k in ("ranks", "mode", "shape", "kernel") if k in check
                         and check[k] != "-")
        lines.append(f"  [{'met' if check['met'] else 'MISSED':>6}] {check['target']:<62} {where:<38} {shown}")
    return "\n".join(lines)


def exit_on_sigterm(signum, frame):
    # SystemExit unwinds through run_job, whose cleanup kills the running msrun job.
    sys.exit(128 + signum)


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    use_torch = not args.no_torch and torch_available()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    print("measuring kernel bandwidth ...", file=sys.stderr)
    bandwidth = measure_kernel_bandwidth(args.shapes.split(","), args.bandwidth_iters)
    log_root = args.log_dir or tempfile.mkdtemp(prefix="ms_syncbn_bench_")
    os.makedirs(log_root, exist_ok=True)
    job_results = {}
    for ranks in args.ranks:
        print(f"msrun with {ranks} rank(s) ...", file=sys.stderr)
        job_results[ranks] = run_job(ranks, args, log_root, use_torch)
    runs, payloads = summarize(job_results, args)
    graph_counts = next((per_rank[0]["graph_counts"] for per_rank in job_results.values()
                         if "graph_counts" in per_rank[0]), None)
    results = {
        "started": started,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "config": {"ranks": args.ranks, "modes": args.modes.split(","),
                   "shapes": args.shapes.split(","), "iters": args.iters, "warmup": args.warmup,
                   "torch": use_torch, "components": not args.no_components,
                   "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1"),
                   "log_dir": log_root, "quick": args.quick},
        "kernel_bandwidth": bandwidth,
        "runs": runs,
        "payloads": payloads,
        "graph_counts": graph_counts,
        "mint_graph": MINT_SYNCBN_GRAPH,
    }
    results["targets"] = check_targets(runs, payloads, bandwidth)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(format_report(results))
    print(f"\nJSON: {os.path.abspath(args.json)}   msrun logs: {log_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
