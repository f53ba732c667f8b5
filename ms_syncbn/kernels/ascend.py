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
- precision. ``BatchNormReduceGrad`` computes sum(dy*x) - mean*sum(dy) in float32,
  which cancels when |mean| >> std (0.6 % error at mean 1e4, std 2): the adapter
  hands it x - mean, centred in float32, and a zero mean.

The tests run this table on CPU over stand-ins of the four primitives
(tests/ascend_emulation.py) and check the real primitives' type inference with
exactly these calls (tests/test_ascend_binding.py); see README, "What is verified where".
"""
import functools
import os

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import auto_generate as native

from ms_syncbn.kernels import BatchNormKernels
from ms_syncbn.kernels.composite import CheckPairing, FinalizeStats, Fingerprint, Guard, UpdateStats

# The one switch of the backward reduction (README, "How dtypes are routed on Ascend"):
# "centred" (default) hands BatchNormReduceGrad x - mean in float32, one more pass over the
# activation than mint makes (and in float16/bfloat16 two casts), precise at any mean;
# "uncentred" calls it as mint does, with x and the mean, no extra pass, and inherits its
# sum(dy*x) - mean*sum(dy) in float32, which cancels when |mean| >> std.
BACKWARD_REDUCE_ENV = "MS_SYNCBN_ASCEND_BACKWARD_REDUCE"
BACKWARD_REDUCE_CHOICES = ("centred", "uncentred")

# BatchNormStats returns invstd = 1/sqrt(var + eps) in float32; var comes back as
# 1/invstd^2 - eps, within a few float32 ulps of the kernel's var. This eps keeps a
# constant channel finite (invstd = 1e6) while moving var by at most ~1e-19.
_STATS_EPS = 1e-12
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


def _as_float32(x):
    if x.dtype == ms.float32:
        routed = x
    else:
        routed = x.astype(ms.float32)
    return routed


class _LocalMeanVar(nn.Cell):
    """x (N, C, *) non-empty -> mean (C,), biased var (C,), float32, from one BatchNormStats."""

    # Read through self: mindspore.amp's O1 regenerates a cell's code in another module,
    # where this module's own constants are not defined.
    stats_eps = _STATS_EPS

    def __init__(self):
        super().__init__()
        self.stats = native.BatchNormStats()

    def construct(self, x):
        mean, invstd = self.stats(_stats_input(x), self.stats_eps)  # (C,), (C,) float32
        var = ops.relu(1.0 / (invstd * invstd) - self.stats_eps)  # rounding can dip below 0
        return mean, var


class _LocalStats(nn.Cell):
    """x (N, C, *), shift (C,) -> (3C+1,) f32: [sum(x-K), sum((x-K)^2), n*K, n].

    sum(x-K) = n (m - K), sum((x-K)^2) = n var + n (m - K)^2 with the local mean m
    and biased variance var. Zeros for an empty batch, without a native kernel.
    """

    def __init__(self):
        super().__init__()
        self.mean_var = _LocalMeanVar()

    def construct(self, x, shift):
        channels = x.shape[1]
        count = x.size // channels
        if count == 0:  # static shape: decided at compile time, no graph branch
            sums = ops.depend(ops.zeros((3 * channels + 1,), ms.float32), shift)
        else:
            mean, var = self.mean_var(x)
            n = ops.scalar_to_tensor(count, ms.float32)
            d = mean - shift
            sums = ops.cat((n * d, n * (var + d * d), n * shift, n.reshape((1,))))
        return sums


class _LocalMoments(nn.Cell):
    """x (N, C, *) -> mean_i (C,), var_i (C,) float32: the local mean and biased variance.

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

    def construct(self, x):
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
    from one BatchNormReduceGrad (its weight and bias gradients are the last two).

    The kernel sums dy*x and subtracts mean*sum(dy) in float32, which cancels at large
    |mean|/std (0.6 % at mean 1e4, std 2). `centred` (the default, BACKWARD_REDUCE_ENV): it
    gets x - mean in float32 and a zero mean, precise at any mean, for one more pass over x
    (and in float16/bfloat16 the casts of dy and x); its sums then come back float32.
    Otherwise it gets x and the mean as mint passes them: no extra pass, mint's numerics, and
    in float16/bfloat16 sums in that dtype (rounded; above 65504 they overflow), cast to
    float32 per channel. Zeros for an empty batch, without a native kernel (A2/A3 leave them
    unwritten).
    """

    def __init__(self, centred=True):
        super().__init__()
        self.reduce_grad = native.BatchNormReduceGrad()
        self.centred = centred

    def construct(self, dy, x, mean, invstd):
        channels = x.shape[1]
        if x.size == 0:  # static shape: decided at compile time, no graph branch
            # Zeros that still wait for mean, invstd and dy, as the kernel would.
            zeros = ops.depend(ops.depend(ops.depend(ops.zeros((channels,), ms.float32), mean),
                                          invstd), dy)
            sums = (zeros, zeros, zeros, zeros)
        elif self.centred:  # a constant of the table: no graph branch
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


def centred_backward_reduce() -> bool:
    """Whether the table's BatchNormReduceGrad gets x - mean (see BACKWARD_REDUCE_ENV).

    Raises:
        ValueError: If the variable holds anything but "centred" or "uncentred".
    """
    choice = os.environ.get(BACKWARD_REDUCE_ENV, "centred")
    if choice not in BACKWARD_REDUCE_CHOICES:
        raise ValueError(f"ms_syncbn: {BACKWARD_REDUCE_ENV} must be one of {BACKWARD_REDUCE_CHOICES}, "
                         f"but got {choice!r}.")
    return choice == "centred"


@functools.lru_cache(maxsize=None)
def ascend_kernels() -> BatchNormKernels:
    """The Ascend table (BatchNormStats, BatchNormElemt, BatchNormReduceGrad, BatchNormElemtGrad).

    finalize_stats, update_stats, guard and fingerprint are composites (ms_syncbn.kernels.composite).
    The backward reduction is centred unless BACKWARD_REDUCE_ENV says "uncentred", read when
    the table is first made in the process.
    """
    return BatchNormKernels(backend="Ascend", local_stats=_LocalStats(), normalize=_Normalize(),
                            backward_reduce=_BackwardReduce(centred_backward_reduce()),
                            backward_elemt=_BackwardElemt(),
                            finalize_stats=FinalizeStats(), update_stats=UpdateStats(),
                            guard=Guard(), fingerprint=Fingerprint(), check_pairing=CheckPairing(),
                            local_moments=_LocalMoments())
