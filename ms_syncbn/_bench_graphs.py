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
  graphs the step is split into;
* activation-sized kernels: those that read or write a tensor with as many elements
  as the layer's input x (the passes over the activation), and an estimate of the
  activation bytes moved per element of x: the bytes of every activation-sized
  tensor a kernel reads or writes, from the IR's inferred shapes and dtypes, summed
  over kernels and divided by x's element count (each kernel counted as one pass
  over memory: no cache reuse, no fusion).

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
# The line after a node: its inputs' and outputs' inferred types, "<Tensor[Float32], (8, 64)>".
_SIGNATURE = re.compile(r"^\s+: \(")
_TENSOR = re.compile(r"<Tensor\[([A-Za-z0-9]+)\], \(([0-9, ]*)\)")
_DTYPE_BYTES = {"Float16": 2, "BFloat16": 2, "Float32": 4, "Float64": 8, "Int32": 4, "Int64": 8,
                "Bool": 1, "Int8": 1, "UInt8": 1, "Int16": 2}


def _activation_bytes(signature, activation_elements):
    """Bytes of the tensors of one node's signature line that have `activation_elements`
    elements (0 if none)."""
    total = 0
    for dtype, dims in _TENSOR.findall(signature):
        elements = 1
        for d in dims.split(","):
            if d.strip():
                elements *= int(d)
        if dims.strip() and elements == activation_elements:
            total += elements * _DTYPE_BYTES.get(dtype, 4)
    return total


def count_ir(text, activation_elements=None):
    """Counts of one validate-IR dump (see the module docstring) -> dict. With
    `activation_elements` (the element count of x), also the activation-sized kernels and
    the estimated activation bytes per element."""
    nodes = []  # [operator, traced to a bprop, activation bytes]
    graphs = 0
    for line in text.splitlines():
        if _GRAPH.match(line):
            graphs += 1
            continue
        match = _NODE.match(line)
        if match:
            nodes.append([match.group(1), False, 0])
        elif nodes and _SIGNATURE.match(line) and activation_elements:
            nodes[-1][2] = _activation_bytes(line, activation_elements)
        elif nodes and line.lstrip().startswith("# In file") and "def bprop(" in line:
            nodes[-1][1] = True
    kernels = [(op, backward, size) for op, backward, size in nodes if op not in STRUCTURAL_NODES]
    counts = {}
    if activation_elements:
        for side, is_backward in (("forward", False), ("backward", True)):
            passes = [(op, size) for op, backward, size in kernels if backward is is_backward and size]
            counts[f"{side}_activation_kernels"] = len(passes)
            counts[f"{side}_activation_kernel_names"] = [op for op, _ in passes]
            counts[f"{side}_activation_bytes_per_element"] = (
                sum(size for _, size in passes) / activation_elements)
    kernels = [(op, backward) for op, backward, _ in kernels]
    return dict(counts, **{
        "forward_kernels": sum(1 for _, backward in kernels if not backward),
        "backward_kernels": sum(1 for _, backward in kernels if backward),
        "forward_collectives": sum(1 for op, backward in kernels if op in COLLECTIVES and not backward),
        "backward_collectives": sum(1 for op, backward in kernels if op in COLLECTIVES and backward),
        "control_flow_nodes": sum(1 for op, _, _ in nodes if op in CONTROL_FLOW),
        "graphs": graphs,
        "kernel_names": sorted({op for op, _ in kernels}),
        "forward_kernel_names": [op for op, backward in kernels if not backward],
        "backward_kernel_names": [op for op, backward in kernels if backward],
    })


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


class LayerForward(nn.Cell):
    """The forward of `layer` alone (for layers whose backward does not compile on CPU)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def construct(self, x):
        return self.layer(x)


def layer_step_counts(layer, x, work_dir, forward_only=False):
    """Compile one training step of `layer` on input `x` in graph mode and count its IR
    (with `forward_only`, its forward alone).

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
        if forward_only:
            LayerForward(layer)(x)
        else:
            LayerTrainStep(layer)(x, x)  # dy = x: the same graph, any dtype
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
        counts = count_ir(f.read(), x.size)
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


# The tables' counted steps, in the benchmark's order: (name, table, input dtype).
ASCEND_DTYPES = ("float32", "float16", "bfloat16")
MINT = "mint.nn.SyncBatchNorm"


def step_counts(shape, work_dir, tables=("CPU", "Ascend", MINT)):
    """Counts of one synchronized layer step for input `shape` (N, C, *): {row name: counts}.

    Rows: "CPU" (the CPU table, float32), "Ascend <dtype>" for each of :data:`ASCEND_DTYPES`
    (the Ascend table over MindSpore's native primitives) and, when communication is
    initialised, mint.nn.SyncBatchNorm's forward (its backward does not compile on CPU:
    the benchmark reads it from its bprop). The layers must see a group of two or more
    ranks (msrun, or a test's stand-in group).
    """
    import numpy as np

    from ms_syncbn.batchnorm import SyncBatchNorm
    from ms_syncbn.kernels.ascend import ascend_kernels

    x32 = ms.Tensor(np.ones(shape, np.float32))
    counts = {}
    if "CPU" in tables:
        counts["CPU"] = layer_step_counts(SyncBatchNorm(shape[1]), x32, os.path.join(work_dir, "cpu"))
    if "Ascend" in tables:
        for dtype in ASCEND_DTYPES:
            with layers_built_with(ascend_kernels()):
                layer = SyncBatchNorm(shape[1])
            counts[f"Ascend {dtype}"] = layer_step_counts(
                layer, x32.astype(getattr(ms, dtype)), os.path.join(work_dir, f"ascend_{dtype}"))
    if MINT in tables:
        from mindspore import mint

        counts[MINT] = layer_step_counts(mint.nn.SyncBatchNorm(shape[1]), x32,
                                         os.path.join(work_dir, "mint"), forward_only=True)
    return counts
