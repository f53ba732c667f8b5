"""Run a SyncBatchNorm through training and evaluation steps; every result comes back as NumPy.

Shared by the single-process tests (tests/test_layer_single_process.py) and the
msrun worker (tests/workers/sync_scenarios.py), so both drive the layer the same
way in PyNative, in graph mode and under ``mindspore.jit``: one
``value_and_grad`` call per step gives the output y and the gradients for x,
weight and bias of ``sum(y * dy)``, whose gradient with respect to y is exactly
the upstream gradient dy.
"""
import numpy as np
import mindspore as ms
from mindspore import nn, ops

_MS_DTYPES = {"float16": ms.float16, "bfloat16": ms.bfloat16, "float32": ms.float32,
              "float64": ms.float64}


def to_tensor(array, dtype_name):
    """NumPy array -> Tensor of dtype ``dtype_name``; bfloat16 arrays travel as float32."""
    return ms.Tensor(np.asarray(array, np.float32 if dtype_name == "bfloat16" else None)).astype(
        _MS_DTYPES[dtype_name])


def to_numpy(tensor):
    """Tensor -> NumPy array of the same dtype; bfloat16 (which NumPy lacks) -> float32, exactly."""
    if tensor is None:
        return None
    if tensor.dtype == ms.bfloat16:
        tensor = tensor.astype(ms.float32)
    return tensor.asnumpy().copy()  # asnumpy() of a Parameter may share its memory


def round_to(array, dtype_name):
    """The values ``array`` takes once stored in ``dtype_name`` (as float32 for bfloat16)."""
    array = np.asarray(array, np.float32)
    if dtype_name == "bfloat16":  # round to nearest even on the top 16 bits
        bits = array.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.astype(np.uint32).view(np.float32)
    return array.astype(dtype_name)


class OutputDotUpstream(nn.Cell):
    """(x, dy) -> (sum(layer(x) * dy) in float32, layer(x)); d loss / d layer(x) = dy."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def construct(self, x, dy):
        y = self.layer(x)
        # The aux copy of y carries no gradient: MindSpore's CPU AddN has no bfloat16 kernel,
        # so a bfloat16 y that receives gradients from two uses cannot be compiled.
        return (y * dy).astype(ms.float32).sum(), ops.stop_gradient(y)


class GradStep(nn.Cell):
    """(x, dy) -> ((loss, y), grads): ``value_and_grad`` of `net` as a Cell, so that a graph of
    the whole step can be compiled for dynamic shapes (``Cell.set_inputs``)."""

    def __init__(self, net, weights):
        super().__init__()
        self.net = net  # a sub-cell: set_train reaches the layer
        self.grad = ms.value_and_grad(net, grad_position=0, weights=weights, has_aux=True)

    def construct(self, x, dy):
        return self.grad(x, dy)


def _graphs_compiled(step):
    """Graphs MindSpore has compiled so far: those of `step` (a Cell run in graph mode) plus
    every ``mindspore.jit`` phase of the process (MindSpore's phase caches; the one
    observable of a recompilation)."""
    from mindspore.graph import api
    return len(getattr(step, "compile_cache", ())) + len(api.ms_compile_cache)


class LayerDriver:
    """Training and evaluation steps of one layer; each step returns y, dx, dweight, dbias (NumPy).

    Training and evaluation use separate wrapper Cells (and so separate compiled graphs in
    graph mode); each switches the layer's mode right before it runs. ``jit=True`` compiles
    each whole step (forward and gradient) with ``mindspore.jit``, as a PyNative user would.
    ``dynamic_rank=R`` (graph mode or ``jit``) compiles each step once for inputs of rank R
    whose dimensions but C are unknown (``Cell.set_inputs``, ``dynamic_dtype``); then
    ``graphs_compiled`` counts the compilations each step caused (1 each if no step's shape
    made MindSpore compile again).
    """

    def __init__(self, layer, jit=False, dynamic_rank=None, dynamic_dtype="float32"):
        self.layer = layer
        weights = [layer.weight, layer.bias] if layer.affine else None
        self.train_net = OutputDotUpstream(layer)
        self.eval_net = OutputDotUpstream(layer)
        compile_step = ms.jit if jit else (lambda step: step)
        self.graphs_compiled = None
        self._dynamic_steps = {}  # net -> its GradStep compiled for dynamic shapes
        if dynamic_rank is None:
            self.train_grad = compile_step(ms.value_and_grad(self.train_net, grad_position=0,
                                                             weights=weights, has_aux=True))
            self.eval_grad = compile_step(ms.value_and_grad(self.eval_net, grad_position=0,
                                                            weights=weights, has_aux=True))
            return
        unknown = ms.Tensor(shape=[None, layer.num_features] + [None] * (dynamic_rank - 2),
                            dtype=_MS_DTYPES[dynamic_dtype])
        for net in (self.train_net, self.eval_net):
            self._dynamic_steps[net] = GradStep(net, weights)
            self._dynamic_steps[net].set_inputs(unknown, unknown)
        self.train_grad = compile_step(self._dynamic_steps[self.train_net])
        self.eval_grad = compile_step(self._dynamic_steps[self.eval_net])
        self.graphs_compiled = {"train": 0, "eval": 0}

    def _step(self, net, grad_fn, x, dy, dtype_name):
        step = self._dynamic_steps.get(net)
        (net if step is None else step).set_train(net is self.train_net)
        before = _graphs_compiled(step) if step is not None else 0
        (_, y), grads = grad_fn(to_tensor(x, dtype_name), to_tensor(dy, dtype_name))
        if step is not None:
            kind = "train" if net is self.train_net else "eval"
            self.graphs_compiled[kind] += _graphs_compiled(step) - before
        if self.layer.affine:
            dx, (dweight, dbias) = grads
        else:
            dx, dweight, dbias = grads, None, None
        return {"y": to_numpy(y), "dx": to_numpy(dx),
                "dweight": to_numpy(dweight), "dbias": to_numpy(dbias)}

    def train(self, x, dy, dtype_name="float32"):
        return self._step(self.train_net, self.train_grad, x, dy, dtype_name)

    def evaluate(self, x, dy, dtype_name="float32"):
        return self._step(self.eval_net, self.eval_grad, x, dy, dtype_name)

    def state(self):
        """Running statistics (None when not tracked) as NumPy."""
        layer = self.layer
        return {"running_mean": to_numpy(layer.running_mean),
                "running_var": to_numpy(layer.running_var),
                "num_batches_tracked": to_numpy(layer.num_batches_tracked)}


def set_parameters(layer, weight, bias):
    """Give an affine layer its (C,) weight and bias (in the layer's parameter dtype)."""
    layer.weight.set_data(ms.Tensor(np.asarray(weight, np.float32)).astype(layer.weight.dtype))
    layer.bias.set_data(ms.Tensor(np.asarray(bias, np.float32)).astype(layer.bias.dtype))


def random_batch(rng, shape, mean_scale=3.0, std_range=(0.5, 2.0)):
    """Float32 data with a random mean and spread per channel (N, C, *)."""
    channels = shape[1]
    per_channel = (1, channels) + (1,) * (len(shape) - 2)
    mean = rng.uniform(-mean_scale, mean_scale, channels).reshape(per_channel)
    std = rng.uniform(*std_range, channels).reshape(per_channel)
    return (mean + std * rng.standard_normal(shape)).astype(np.float32)
