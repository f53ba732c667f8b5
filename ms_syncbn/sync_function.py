"""The synchronized batch-norm function: local statistics -> one all-reduce -> combine -> normalize.

``SyncBatchNormFunction`` is a Cell with ``construct`` and ``bprop``; the
backward is the mirror image: local reductions -> one all-reduce -> element-wise.
It owns the collectives; the kernels it calls never communicate, and the layer
that calls it owns all state. The same code runs on every backend: only the
kernel table differs.

Numerics. Each rank sends, per channel, shifted sums around a shift K that is
the same on every rank (the layer keeps it: the previous group mean):

    [ sum(x-K) (C) | sum((x-K)^2) (C) | n*K (C) | n (1) | C (1) ]   (3C+2,) float32

so the payload is O(C) whatever the world size, and an empty rank (n = 0)
simply sends zeros. The last slot sums to group_size * C exactly when every
rank's layer has C channels; anything else is reported (the layer stops the
step) instead of mixing layers. After the all-reduce (sums S1, S2, Q, N), the
``finalize_stats`` kernel computes, per channel:

    mean = Q/N + S1/N         exact even if the ranks' K differ
    var  = S2/N - (S1/N)^2    exact when every rank used the same K

The subtraction in var loses about (S1/N)^2 / var of float32's precision, so K
must be near the mean. When it is not (first step: K = 0; a shift in the data),
i.e. (S1/N)^2 > RESHIFT_RATIO * var, finalize_stats says so; every rank takes
the same decision from the same reduced numbers and repeats the pass once
around K = mean: a second all-reduce in that step only.

The backward sends [ sum(dy) (C) | sum(dy*(x-mean)) (C) | layer number (1) ]
(2C+1,); a last slot other than group_size * layer number means the collectives
of two layers were paired with each other, and stops the step (guard kernel).
"""
import itertools

import mindspore as ms
from mindspore import Tensor, ops

from ms_syncbn.kernels import GUARD_MISPAIRED
from ms_syncbn.precision import Float32Cell

# Re-centre when the shift is further than sqrt(64) = 8 standard deviations
# from the mean: beyond that float32 loses more than ~6 bits of the variance.
RESHIFT_RATIO = 64.0
# A constant channel (var = 0) re-centres only when its shift is off by more
# than this fraction of the mean: float32 rounding of the mean stays below it.
RESHIFT_MEAN_TOLERANCE = 2.0 ** -20


_LAYER_NUMBERS = itertools.count(1)

# Position of the "channels differ" flag in the status output [channels differ, count].
STATUS_CHANNELS_DIFFER = 0


class SyncBatchNormFunction(Float32Cell):
    """Batch statistics over a process group, normalization, and the matching backward.

    Args:
        kernels (BatchNormKernels): The backend's kernel table.
        eps (float): Added to the variance before the square root.
        all_reduce (Primitive, optional): Summing all-reduce over the group; None for a
            local batch norm with no communication.

    Inputs:
        - **x** (Tensor) - (N, C, *), float16, bfloat16, float32 or float64.
        - **weight** (Tensor) - (C,) float32.
        - **bias** (Tensor) - (C,) float32.
        - **shift** (Tensor) - (C,) float32, identical on every rank of the group.

    Outputs:
        Tuple of 6 tensors: y (like x), mean (C,), invstd (C,), biased var (C,), count (1,),
        statistics over the whole group, and status (2,) float32 = [channels differ (0/1),
        count], all identical on every rank; only y carries a gradient. When channels
        differ, the ranks' layers disagree on num_features and nothing else is meaningful:
        the caller stops the step (guard kernel). The function does not raise itself: a
        branch on a tensor costs about a millisecond per layer and step in a CPU graph.
    """

    def __init__(self, kernels, eps, all_reduce=None, group_size=1):
        super().__init__()
        # Layers are numbered in construction order, the same on every rank of a
        # data-parallel job; the number travels with the backward sums to catch
        # collectives of two layers paired with each other (compiled graphs may
        # issue the backward collectives of parallel branches in any order).
        self.pairing_tag = float(next(_LAYER_NUMBERS))
        self.check_pairing = all_reduce is not None
        self.local_stats = kernels.local_stats
        self.normalize = kernels.normalize
        self.backward_reduce = kernels.backward_reduce
        self.backward_elemt = kernels.backward_elemt
        self.finalize_stats = kernels.finalize_stats
        self.guard = kernels.guard
        self.finalize_params = Tensor([float(group_size), eps, RESHIFT_RATIO, RESHIFT_MEAN_TOLERANCE],
                                      ms.float32)
        self.eps = eps
        self.all_reduce = all_reduce
        self.group_size = group_size
        self.synchronized = all_reduce is not None

    def _group_sum(self, local_sums):
        if self.synchronized:
            return self.all_reduce(local_sums)
        return local_sums

    def _group_stats(self, x, shift):
        """x (N, C, *), shift (C,) -> (3C+3,) [mean | invstd | var | channels differ | count |
        needs reshift], the group's statistics (finalize_stats), identical on every rank."""
        channels = x.shape[1]
        # (3C+1,) local sums, and one more slot carrying C: ranks whose layers disagree on
        # num_features send buffers of different lengths, which the all-reduce does not
        # detect by itself.
        sums = ops.cat((self.local_stats(x, shift), ops.fill(ms.float32, (1,), float(channels))))
        return self.finalize_stats(self._group_sum(sums), self.finalize_params)  # (3C+2,) -> (3C+3,)

    def construct(self, x, weight, bias, shift):
        channels = x.shape[1]
        stats = self._group_stats(x, shift)
        # The one branch on a tensor: hidden from autodiff by bprop, and rare to be taken.
        # Never with mismatched layers (finalize_stats says no): their sums are garbage, and a
        # second collective could wait forever for the rank whose all-reduce already failed.
        if stats[3 * channels + 2] > 0.5:
            stats = self._group_stats(x, stats[:channels])
        mean, invstd, var = stats[:channels], stats[channels:2 * channels], stats[2 * channels:3 * channels]
        status = stats[3 * channels:3 * channels + 2]  # [channels differ, count]
        count = status[1:]
        y = self.normalize(x, mean, invstd, weight, bias)
        return y, mean, invstd, var, count, status

    def bprop(self, x, weight, bias, shift, out, dout):
        dy = dout[0]
        mean, invstd, count = out[1], out[2], out[4]
        channels = mean.shape[0]
        # dy, x, mean -> (2C,) local [sum(dy) | sum(dy*(x-mean))]
        local_sums = self.backward_reduce(dy, x, mean)
        # weight/bias gradients stay local: data parallelism sums them over ranks.
        grad_weight = local_sums[channels:] * invstd
        grad_bias = local_sums[:channels]
        if self.check_pairing:
            group_sums = self._checked_group_sum(local_sums)
        else:
            group_sums = self._group_sum(local_sums)
        dx = self.backward_elemt(dy, x, mean, invstd, weight, group_sums, count)
        return dx, grad_weight, grad_bias, ops.zeros_like(shift)

    def _checked_group_sum(self, local_sums):
        """(2C,) -> (2C,) group sums; raises (guard) if another layer's collective was paired with ours."""
        tag = ops.fill(ms.float32, (1,), self.pairing_tag)
        reduced = self.all_reduce(ops.cat((local_sums, tag)))  # (2C+1,)
        mispaired = ops.abs(reduced[-1:] - self.pairing_tag * self.group_size) > 0.5
        code = mispaired.astype(ms.float32) * GUARD_MISPAIRED  # (1,): 0 or the error code
        # No branch: the guard kernel passes the sums through or stops the step.
        return self.guard(reduced[:-1], code)


class FrozenStatsNormalize(Float32Cell):
    """Normalization with given statistics (eval mode with running stats); no communication.

    Inputs: x (N, C, *), mean (C,), invstd (C,), weight (C,), bias (C,), all float32 but x.
    Outputs: y, like x. Gradients flow to x, weight and bias; mean and invstd are constants.
    """

    def __init__(self, kernels):
        super().__init__()
        self.normalize = kernels.normalize
        self.backward_reduce = kernels.backward_reduce
        self.backward_elemt = kernels.backward_elemt

    def construct(self, x, mean, invstd, weight, bias):
        return self.normalize(x, mean, invstd, weight, bias)

    def bprop(self, x, mean, invstd, weight, bias, out, dout):
        local_sums = self.backward_reduce(dout, x, mean)  # (2C,)
        channels = mean.shape[0]
        # With zero sums backward_elemt reduces to dx = weight * invstd * dy.
        no_sums = ops.zeros_like(local_sums)
        dx = self.backward_elemt(dout, x, mean, invstd, weight, no_sums, ops.ones((1,), ms.float32))
        return (dx, ops.zeros_like(mean), ops.zeros_like(invstd),
                local_sums[channels:] * invstd, local_sums[:channels])
