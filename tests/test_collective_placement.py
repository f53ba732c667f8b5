"""The collectives of a compiled step share one kernel graph: what keeps their order.

MindSpore 2.10's graph scheduler chains the communication kernels of a kernel graph with
control arrows in that graph's execution order (GraphScheduler::LinkControlArrowByCommunicationNode,
backend/ms_backend/runtime/graph_scheduler), and the execution order depends only on the
graph's structure (ExecOrderBuilder), which is the same on every rank. Collectives in
different kernel graphs are ordered only by control-flow actors: in two earlier versions of
the layer (an `if` in the backward; before that, no check at all) every collective got a
kernel graph of its own, and the backward all-reduces of parallel branches were paired across
layers in 4 of 5 and 5 of 6 runs of tests/workers/repro_graph_parallel_branches.py (README,
Known issues); this test fails on both layouts. It keeps them from coming back: one process
compiles a residual block with SyncBatchNorms on parallel
branches (tests/workers/backward_collective_placement.py: a stand-in collective where the
AllReduce kernels go) and the stand-ins, forward and backward, must all sit in the one kernel
graph that holds the backward kernels. The chain itself, on real ranks, is what
tests/workers/stress_parallel_branches.py --check-order reads.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).resolve().parent / "workers" / "backward_collective_placement.py"
LAYERS = 3  # b1, and b2 / bs on the parallel branches


def kernel_graph_counts(ir_dir: Path):
    """{kernel graph file: (collectives, backward_elemt kernels)} of the compiled step."""
    counts = {}
    for path in ir_dir.glob("graph_build_*.ir"):
        text = path.read_text(errors="replace")
        counts[path.name] = (len(re.findall(r"\{instance name: all_reduce\}", text)),
                             len(re.findall(r"\{instance name: backward_elemt\}", text)))
    return counts


def test_backward_collectives_in_one_kernel_graph(tmp_path):
    ir_dir = tmp_path / "ir"
    env = dict(os.environ, MS_DEV_SAVE_GRAPHS="1", MS_DEV_SAVE_GRAPHS_PATH=str(ir_dir), GLOG_v="3")
    done = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True,
                          timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    err = float(re.search(r"rel err (\S+)", done.stdout).group(1))
    assert err < 1e-5, done.stdout  # the stand-in step is a real batch-norm step
    counts = kernel_graph_counts(ir_dir)
    backward = {name: c for name, c in counts.items() if c[1] > 0}
    # Every layer's backward (backward_elemt) and every collective of the step in a single kernel
    # graph: two per layer in the forward (the moments protocol, no branch to cut the graph) and
    # one per layer in the backward.
    assert list(backward.values()) == [(3 * LAYERS, LAYERS)], counts
    assert sum(c[0] for c in counts.values()) == 3 * LAYERS, counts
