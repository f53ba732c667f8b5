"""Ascend kernel table: MindSpore's native Ascend batch-norm kernels behind our contracts.

Not executed on our CPU-only machines (see README, "What is verified where").
Each entry is a thin adapter so that the shared algorithm in
``ms_syncbn.sync_function`` is exactly the code the CPU tests run.
"""
import functools

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import auto_generate as native

from ms_syncbn.kernels import BatchNormKernels
from ms_syncbn.kernels.composite import FinalizeStats, Guard, UpdateStats

# BatchNormStats returns invstd = 1/sqrt(var + eps); this eps keeps a constant
# channel finite while changing var by at most 1e-12.
_STATS_EPS = 1e-12


class _LocalStats(nn.Cell):
    """x (N, C, *), shift (C,) -> (3C+1,) f32: [sum(x-K), sum((x-K)^2), n*K, n]."""

    def __init__(self):
        super().__init__()
        self.stats = native.BatchNormStats()

    def construct(self, x, shift):
        count = x.size // x.shape[1]
        mean, invstd = self.stats(x, _STATS_EPS)  # local mean, 1/sqrt(var + eps): (C,), (C,)
        if count == 0:
            zeros = ops.zeros_like(shift)
            return ops.cat((zeros, zeros, zeros, ops.zeros((1,), ms.float32)))
        n = ops.scalar_to_tensor(float(count), ms.float32)
        d = mean - shift  # sum(x-K) = n (m - K);  sum((x-K)^2) = n var + n (m - K)^2
        var = ops.relu(1.0 / (invstd * invstd) - _STATS_EPS)
        return ops.cat((n * d, n * (var + d * d), n * shift, n.reshape((1,))))


class _BackwardReduce(nn.Cell):
    """dy, x, mean -> (2C,) f32: [sum(dy), sum(dy*(x-mean))]."""

    def __init__(self):
        super().__init__()
        self.reduce_grad = native.BatchNormReduceGrad()

    def construct(self, dy, x, mean):
        ones = ops.ones_like(mean)
        sum_dy, sum_dy_xmu, _, _ = self.reduce_grad(dy, x, mean, ones, ones, True, False, False)
        return ops.cat((sum_dy, sum_dy_xmu))


class _BackwardElemt(nn.Cell):
    """dy, x, mean, invstd, weight, sums (2C,), count (1,) -> dx."""

    def __init__(self):
        super().__init__()
        self.elemt_grad = native.BatchNormElemtGrad()

    def construct(self, dy, x, mean, invstd, weight, sums, count):
        sum_dy, sum_dy_xmu = ops.split(sums, x.shape[1])
        return self.elemt_grad(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu,
                               count.astype(ms.int32))


class _Normalize(nn.Cell):
    """x, mean, invstd, weight, bias -> y."""

    def __init__(self):
        super().__init__()
        self.elemt = native.BatchNormElemt()

    def construct(self, x, mean, invstd, weight, bias):
        return self.elemt(x, weight, bias, mean, invstd, 0.0)


@functools.lru_cache(maxsize=None)
def ascend_kernels() -> BatchNormKernels:
    """The Ascend table (BatchNormStats, BatchNormElemt, BatchNormReduceGrad, BatchNormElemtGrad).

    finalize_stats, update_stats and guard are composites (ms_syncbn.kernels.composite):
    per-channel arithmetic, and a graph branch (no native kernel fails on a value).
    """
    return BatchNormKernels(backend="Ascend", local_stats=_LocalStats(), normalize=_Normalize(),
                            backward_reduce=_BackwardReduce(), backward_elemt=_BackwardElemt(),
                            finalize_stats=FinalizeStats(), update_stats=UpdateStats(),
                            guard=Guard())
