"""Ascend kernel table: MindSpore's native Ascend batch-norm kernels behind our contracts.

Each entry is a thin adapter, so that the shared algorithm in
``ms_syncbn.sync_function`` is exactly the code the CPU tests run. The adapters
do what the native kernels do not (README, "How dtypes are routed on Ascend"):

- dtype routing. ``BatchNormStats`` takes float16/float32, ``BatchNormElemt`` and
  ``BatchNormElemtGrad`` float16/bfloat16/float32 (aclnn), ``BatchNormReduceGrad``
  returns its sums in the input's dtype. Whatever a kernel does not take goes in
  as float32 (bfloat16 -> float32 for the statistics, float64 -> float32 and back
  everywhere); the backward reduction always runs in float32, so payloads and
  statistics are float32 whatever the input.
- empty batches. On Atlas A2/A3 ``aclnnBatchNormReduceBackward`` returns without
  writing its outputs for an empty input; no native kernel is called on an empty
  local batch (a static shape check: no graph branch), the adapter returns the
  contract's zeros, made to depend (``ops.depend``) on the tensors the kernel would have
  read, so that an empty rank's compiled step orders its work as the other ranks' does.
- no helper with a branch shared by forward and backward: MindSpore 2.10 fails to
  compile (PyNative ``jit`` under ``grad``: "func_graph->get_return() is null", in
  MaybeDropFuncGraphs) when a function with an ``if`` on a constant runs both in a Cell's
  forward and in its ``bprop``; each dtype decision is written where it is used.
- precision and passes. The backward reduction is ``BNTrainingUpdateGrad`` by default: it
  subtracts the mean per element in float32 and sums in the same pass, so it reads dy and x
  once, as mint's reduction does, and does not cancel at large |mean|/std. It is the kernel
  MindSpore's own Ascend backend splits BatchNorm's backward into (its ``BnGradSplit`` pass),
  run through the aclop path (no aclnn kernel; README, "How dtypes are routed on Ascend", for
  the evidence and what is not verified). ``BatchNormReduceGrad`` (aclnn) computes
  sum(dy*x) - mean*sum(dy) in float32, which cancels when |mean| >> std (0.6 % error at mean
  1e4, std 2): BACKWARD_REDUCE_ENV chooses it instead, centred (x - mean in float32, one more
  pass) or as mint calls it (uncentred).

The tests run this table on CPU over stand-ins of the native primitives
(tests/ascend_emulation.py) and check the real primitives' type inference with
exactly these calls (tests/test_ascend_binding.py); see README, "What is verified where".
"""
import functools
import os

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import auto_generate as native
from mindspore.ops.operations import _grad_ops as grad_ops

from ms_syncbn.kernels import BatchNormKernels
from ms_syncbn.kernels.composite import (CheckPairing, CombineMoments, FinalizeMoments, Fingerprint,
                                         UpdateStats)

# The one switch of the backward reduction (README, "How dtypes are routed on Ascend"):
# "update_grad" (default) calls BNTrainingUpdateGrad, the kernel MindSpore's own BatchNorm
# backward is split into on Ascend (its BnGradSplit pass): it subtracts the mean per element in
# float32 and sums in the same pass, so it is precise at any mean and reads dy and x once, as
# mint's reduction does, also in float16 (it casts inside); it runs through the aclop path.
# "centred" hands the aclnn kernel BatchNormReduceGrad x - mean in float32: precise, one more
# pass over the activation (and in float16/bfloat16 two casts). "uncentred" calls
# BatchNormReduceGrad as mint does, with x and the mean, no extra pass, and inherits its
# sum(dy*x) - mean*sum(dy) in float32, which cancels when |mean| >> std.
BACKWARD_REDUCE_ENV = "MS_SYNCBN_ASCEND_BACKWARD_REDUCE"
BACKWARD_REDUCE_CHOICES = ("update_grad", "centred", "uncentred")

# The moments' BatchNormStats eps: var_i = invstd^-2 keeps it (see _LocalMoments).
_MOMENTS_EPS = 1e-30


def _per_channel_shape(x):
    """(1, C, 1, ...) for x (N, C, *): broadcasts a (C,) tensor over x."""
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def _stats_input(x):
    """x as BatchNormStats takes it: float16/float32 as they are, anything else as float32."""
    if x.dtype == ms.float16 or x.dtype == ms.float32:
        routed = x
    else:
        routed = x.astype(ms.float32)
    return routed


def _elemt_input(x):
    """x as BatchNormElemt(Grad) takes it: float16/bfloat16/float32 as they are, float64 as float32."""
    if x.dtype == ms.float64:
        routed = x.astype(ms.float32)
    else:
        routed = x
    return routed


def _like(y, x):
    """A kernel's output y in the dtype of the layer's input x (float64 went in as float32)."""
    if x.dtype == ms.float64:
        out = y.astype(ms.float64)
    else:
        out = y
    return out


def _update_grad_input(x):
    """x as BNTrainingUpdateGrad takes it: float16/float32 as they are, anything else as float32.

    The same routing as _stats_input, written again on purpose: this one runs in the bprop, that
    one in the forward, and MindSpore 2.10 does not compile a function with a branch that runs in
    both (see the module docstring).
    """
    if x.dtype == ms.float16 or x.dtype == ms.float32:
        routed = x
    else:
        routed = x.astype(ms.float32)
    return routed


def _as_float32(x):
    if x.dtype == ms.float32:
        routed = x
    else:
        routed = x.astype(ms.float32)
    return routed


class _LocalMoments(nn.Cell):
    """x (N, C, *), shift (C,) -> mean_i (C,), var_i (C,) float32: the local mean and biased
    variance. The shift hint is not read (BatchNormStats centres on the local mean itself).

    Two kernels: BatchNormStats (mean and invstd = 1/sqrt(var + eps') in float32, the
    variance taken around the mean, so it does not cancel at large |mean|) and
    var_i = invstd^-2 = var + eps' (Pow), with eps' = 1e-30: it keeps a constant channel
    finite (invstd = 1e15) and moves var by 1e-30 absolute, below any float32 rounding of a
    real variance; the relative error of var_i is a few float32 ulps. Zeros for an empty batch,
    without a native kernel.
    """

    # Read through self: mindspore.amp's O1 regenerates a cell's code in another module,
    # where this module's own constants are not defined.
    stats_eps = _MOMENTS_EPS

    def __init__(self):
        super().__init__()
        self.stats = native.BatchNormStats()

    def construct(self, x, shift):
        channels = x.shape[1]
        if x.size == 0:  # static shape: decided at compile time, no graph branch
            mean = ops.zeros((channels,), ms.float32)
            var = mean
        else:
            mean, invstd = self.stats(_stats_input(x), self.stats_eps)  # (C,), (C,) float32
            var = ops.pow(invstd, -2.0)
        return mean, var


class _BackwardReduce(nn.Cell):
    """dy, x, mean, invstd -> sum(dy), sum(dy*(x-mean)), grad_weight, grad_bias (C,) float32,
    from one native reduction (BACKWARD_REDUCE_ENV says which).

    ``update_grad`` (the default): BNTrainingUpdateGrad(dy, x, mean, variance) returns
    sum(dy*(x-mean)/sqrt(variance+epsilon)) and sum(dy), float32, subtracting the mean per
    element in float32 (CANN's bn_training_update_grad; float16 and float32 inputs are read as
    they are). Given variance 1 and epsilon 0 it returns sum(dy*(x-mean)) itself; the weight
    gradient is that times invstd (one (C,) Mul). It takes 4-D NCHW: any other rank is viewed
    as (N, C, L, 1). bfloat16 and float64 go in as float32.
    ``centred``: BatchNormReduceGrad gets x - mean in float32 and a zero mean, precise at any
    mean, for one more pass over x (and in float16/bfloat16 the casts of dy and x).
    ``uncentred``: BatchNormReduceGrad gets x and the mean as mint passes them: no extra pass,
    mint's numerics (sum(dy*x) - mean*sum(dy) cancels at large |mean|/std: 0.6 % at mean 1e4,
    std 2), and in float16/bfloat16 sums in that dtype (rounded; above 65504 they overflow),
    cast to float32 per channel.
    Zeros for an empty batch, without a native kernel (A2/A3 leave BatchNormReduceGrad's
    outputs unwritten).
    """

    def __init__(self, mode="update_grad"):
        super().__init__()
        self.reduce_grad = native.BatchNormReduceGrad()
        self.update_grad = grad_ops.BNTrainingUpdateGrad(epsilon=0.0)
        self.mode = mode

    def construct(self, dy, x, mean, invstd):
        channels = x.shape[1]
        if x.size == 0:  # static shape: decided at compile time, no graph branch
            # Zeros that still wait for mean, invstd and dy, as the kernel would.
            zeros = ops.depend(ops.depend(ops.depend(ops.zeros((channels,), ms.float32), mean),
                                          invstd), dy)
            sums = (zeros, zeros, zeros, zeros)
        elif self.mode == "update_grad":  # a constant of the table: no graph branch
            if x.ndim == 4:
                routed_x, routed_dy = _update_grad_input(x), _update_grad_input(dy)
            else:  # (N, C, *) -> (N, C, L, 1): a view
                nchw = (x.shape[0], channels, -1, 1)
                routed_x = _update_grad_input(x).reshape(nchw)
                routed_dy = _update_grad_input(dy).reshape(nchw)
            # (C,) float32 each: variance 1 and epsilon 0 make its scale 1, so the first is
            # sum(dy*(x-mean)) itself
            sum_dy_xmu, sum_dy = self.update_grad(routed_dy, routed_x, mean, ops.ones_like(mean))
            sums = (sum_dy, sum_dy_xmu, sum_dy_xmu * invstd, sum_dy)
        elif self.mode == "centred":
            centred = _as_float32(x) - mean.reshape(_per_channel_shape(x))  # (N, C, *) float32
            # (C,) float32 each; weight only types grad_weight (float32): ones, a constant
            sums = self.reduce_grad(_as_float32(dy), centred, ops.zeros_like(mean), invstd,
                                    ops.ones_like(mean), True, True, True)
        else:
            routed = _elemt_input(x)  # float16/bfloat16/float32 as they are, float64 as float32
            sum_dy, sum_dy_xmu, grad_weight, grad_bias = self.reduce_grad(
                dy.astype(routed.dtype), routed, mean, invstd, ops.ones_like(mean), True, True, True)
            sums = (_as_float32(sum_dy), _as_float32(sum_dy_xmu), grad_weight, grad_bias)
        return sums


class _BackwardElemt(nn.Cell):
    """dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu (C,), count (1,) -> dx, dtype of x."""

    def __init__(self):
        super().__init__()
        self.elemt_grad = native.BatchNormElemtGrad()

    def construct(self, dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
        if x.size == 0:  # static shape: nothing to compute (but after the group sums)
            dx = ops.depend(ops.depend(ops.depend(ops.zeros_like(x), sum_dy), sum_dy_xmu), invstd)
        else:
            # count as it is (float32): aclnnBatchNormElemtBackward takes float32, float16 or int32
            # counters (ops-nn, aclnn_batch_norm_elemt_backward.cpp), and MindSpore's inference
            # accepts it (tests/test_ascend_binding.py)
            dx = _like(self.elemt_grad(_elemt_input(dy), _elemt_input(x), mean, invstd, weight,
                                       sum_dy, sum_dy_xmu, count), x)
        return dx


class _Normalize(nn.Cell):
    """x, mean, invstd, weight, bias -> y, dtype of x.

    eps: aclnnBatchNormElemt turns invstd back into var = 1/invstd^2 - eps and
    normalizes by 1/sqrt(var + eps), so eps cancels; 0 skips the cancellation (and
    the table is shared by layers with different eps). See README.
    """

    def __init__(self):
        super().__init__()
        self.elemt = native.BatchNormElemt()

    def construct(self, x, mean, invstd, weight, bias):
        if x.size == 0:  # static shape: nothing to compute (but after the group statistics)
            y = ops.depend(ops.depend(ops.zeros_like(x), mean), invstd)
        elif x.dtype == ms.float64:
            y = self.elemt(x.astype(ms.float32), weight, bias, mean, invstd, 0.0).astype(ms.float64)
        else:
            y = self.elemt(x, weight, bias, mean, invstd, 0.0)
        return y


def backward_reduce_mode() -> str:
    """Which native reduction the table's backward uses (see BACKWARD_REDUCE_ENV): "update_grad"
    (the default), "centred" or "uncentred".

    Raises:
        ValueError: If the variable holds anything else.
    """
    choice = os.environ.get(BACKWARD_REDUCE_ENV, BACKWARD_REDUCE_CHOICES[0])
    if choice not in BACKWARD_REDUCE_CHOICES:
        raise ValueError(f"ms_syncbn: {BACKWARD_REDUCE_ENV} must be one of {BACKWARD_REDUCE_CHOICES}, "
                         f"but got {choice!r}.")
    return choice


@functools.lru_cache(maxsize=None)
def ascend_kernels() -> BatchNormKernels:
    """The Ascend table (BatchNormStats, BatchNormElemt, BNTrainingUpdateGrad or
    BatchNormReduceGrad, BatchNormElemtGrad).

    combine_moments, finalize_moments, update_stats, fingerprint and check_pairing are composites
    (ms_syncbn.kernels.composite). The backward reduction is BACKWARD_REDUCE_ENV's choice, read
    when the table is first made in the process.
    """
    return BatchNormKernels(backend="Ascend", local_moments=_LocalMoments(), normalize=_Normalize(),
                            combine_moments=CombineMoments(), finalize_moments=FinalizeMoments(),
                            update_stats=UpdateStats(),
                            backward_reduce=_BackwardReduce(backward_reduce_mode()),
                            backward_elemt=_BackwardElemt(), fingerprint=Fingerprint(),
                            check_pairing=CheckPairing(), reads_shift=False)
