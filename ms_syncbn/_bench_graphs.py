"""Kernel launches and control flow of one layer's training step, counted from MindSpore's IR.

Used by the benchmark worker (``ms_syncbn/_bench_worker.py``). A training step
of one layer (forward and backward for an upstream gradient, as the benchmark
times it) is compiled in graph mode with MindSpore's IR dumps switched on, and
the last front-end graph (``*_validate_*.ir``: after type inference, inlining
and the front-end optimizations, before the backend picks kernels) is read:

* kernels: every primitive node except the structural ones (tuples, loads,
  monads, graph calls), split into forward and backward by whether MindSpore
  traces the node to a ``bprop``;
* collectives: the kernels that are AllReduce / AllGather / ReduceScatter;
* control flow: ``Switch`` nodes (a branch on a tensor value) and the number of
  graphs the step is split into.

The front end runs on CPU for any device's primitives: a graph of MindSpore's
native Ascend kernels compiles up to this point here and then fails at kernel
selection, which :func:`layer_step_counts` expects. What the Ascend backend
does afterwards (graph-kernel fusion, cast insertion) is not seen.
"""
import contextlib
import glob
import os
import re

import mindspore as ms
from mindspore import nn, ops

# Nodes that move no data through a kernel: tuple plumbing, parameter loads, side-effect
# ordering, graph calls and returns.
STRUCTURAL_NODES = frozenset({"TupleGetItem", "MakeTuple", "Load", "UpdateState", "Depend",
                              "Return", "Partial", "Switch", "SwitchLayer", "MakeList",
                              "ListGetItem", "StopGradient", "MakeKeywordArg"})
COLLECTIVES = frozenset({"AllReduce", "AllGather", "ReduceScatter", "Broadcast"})
CONTROL_FLOW = frozenset({"Switch", "SwitchLayer"})

_NODE = re.compile(r"^\s+%\d+\([^)]*\) = (?:PrimFunc_)?([A-Za-z_][A-Za-z0-9_]*)\(")
_GRAPH = re.compile(r"^subgraph @")


def count_ir(text):
    """Counts of one validate-IR dump (see the module docstring) -> dict."""
    nodes = []  # [operator, traced to a bprop]
    graphs = 0
    for line in text.splitlines():
        if _GRAPH.match(line):
            graphs += 1
            continue
        match = _NODE.match(line)
        if match:
            nodes.append([match.group(1), False])
        elif nodes and line.lstrip().startswith("# In file") and "def bprop(" in line:
            nodes[-1][1] = True
    kernels = [(op, backward) for op, backward in nodes if op not in STRUCTURAL_NODES]
    return {
        "forward_kernels": sum(1 for _, backward in kernels if not backward),
        "backward_kernels": sum(1 for _, backward in kernels if backward),
        "forward_collectives": sum(1 for op, backward in kernels if op in COLLECTIVES and not backward),
        "backward_collectives": sum(1 for op, backward in kernels if op in COLLECTIVES and backward),
        "control_flow_nodes": sum(1 for op, _ in nodes if op in CONTROL_FLOW),
        "graphs": graphs,
        "kernel_names": sorted({op for op, _ in kernels}),
    }


class LayerTrainStep(nn.Cell):
    """Forward and backward of `layer` for the upstream gradient dy: (dx, parameter grads).

    The vector-Jacobian product of the layer alone, as torch's ``layer(x).backward(dy)``:
    no loss reduction, whose MindSpore CPU kernel alone (ReduceSum, ~2 ms for 0.5 M
    floats) would outweigh the layer being measured. The benchmark times it and
    :func:`layer_step_counts` counts it.
    """

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.params = ms.ParameterTuple(layer.trainable_params())
        self.grad = ops.GradOperation(get_all=True, get_by_list=True, sens_param=True)

    def construct(self, x, dy):
        return self.grad(self.layer, self.params)(x, dy)


def layer_step_counts(layer, x, work_dir):
    """Compile one training step of `layer` on input `x` in graph mode and count its IR.

    The step runs if its kernels exist on this machine (the CPU table) and stops at kernel
    selection if they do not (native Ascend kernels on CPU); either way the front end
    has written the graph. Returns the dict of :func:`count_ir`, plus ``"ran"`` (bool).
    """
    os.makedirs(work_dir, exist_ok=True)
    previous_mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE, save_graphs=1, save_graphs_path=work_dir)
    layer.set_train(True)
    ran = True
    try:
        LayerTrainStep(layer)(x, ops.ones_like(x))
    except RuntimeError as err:
        if "Kernel select failed" not in str(err) and "Unsupported op" not in str(err):
            raise
        ran = False
    finally:
        ms.set_context(mode=previous_mode, save_graphs=0)
    # Under msrun MindSpore writes into a rank_<r> subdirectory.
    dumps = sorted(glob.glob(os.path.join(work_dir, "**", "*_validate_*.ir"), recursive=True),
                   key=os.path.getmtime)
    if not dumps:
        raise RuntimeError(f"MindSpore wrote no validate IR into {work_dir}")
    with open(dumps[-1], errors="replace") as f:
        counts = count_ir(f.read())
    counts["ran"] = ran
    return counts


@contextlib.contextmanager
def layers_built_with(kernels):
    """Within the block, SyncBatchNorm layers are built with `kernels` whatever the device.

    For measurement only: the benchmark counts the Ascend table's graph on CPU.
    """
    import ms_syncbn.batchnorm as batchnorm_module

    original = batchnorm_module.kernels_for
    batchnorm_module.kernels_for = lambda device_target: kernels
    try:
        yield
    finally:
        batchnorm_module.kernels_for = original
