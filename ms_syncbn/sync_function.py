"""The synchronized batch-norm function: local moments -> two small all-reduces -> normalize.

``SyncBatchNormFunction`` is a Cell with ``construct`` and ``bprop``; the
backward is the mirror image: local reductions -> one all-reduce -> element-wise.
It owns the collectives; the kernels it calls never communicate, and the layer
that calls it owns all state. The same code runs on every backend: only the
kernel table differs.

Numerics. Rank i has n_i values per channel with mean m_i and biased variance v_i
(``local_moments``: as exact as two passes around the mean). With N = sum(n_i) and the
group mean m = sum(n_i m_i) / N, the group's sum of squared deviations is

    M2 = sum over ranks of  n_i (v_i + (m_i - m)^2)

and every term of it is taken around a mean already close to the data (m_i locally, m after
the first all-reduce), so nothing cancels whatever the mean's magnitude. The forward takes
two all-reduces of O(C) floats, whatever the world size, and no branch:

    first   [ n_i * m_i (C) | n_i | n_i - 1/W | n_i | n_i | C ]   (C+5,)
            -> N, N - 1, the checks, m = sum(n_i m_i) / N          (combine_moments)
    second  [ n_i * (v_i + q (m_i - m)^2) (C) ]                   (C,)
            -> M2, var = M2 / N, unbiased var = M2 / (N - 1)       (finalize_moments)

with W the group size and q = 1, or q = -inf when the step must stop (the checks: the ranks
disagree on num_features, which the last slot shows, as it sums to W * C only when every
rank's layer has C channels; the group holds one value per channel; or none): M2, and so
the variance, invstd, y and every statistic the state reads, are then non-finite, with no
guard kernel and no branch (on Ascend a branch needs its condition on the host, a
device-to-host round trip per layer and step; in a CPU graph it splits the step into
several kernel graphs). A table that can stop a step on the host (CPU) raises the code's
error in combine_moments, before the second all-reduce, on every rank alike. An empty
rank (n_i = 0) sends zeros. Every slot of the first payload but n_i * m_i is a constant of
the compiled graph (n_i is the static x.size / C), so the checks cost no kernel to send.

The backward sends [ sum(dy) (C) | sum(dy*(x-mean)) (C) | fingerprint (1) ]
(2C+1,). The fingerprint identifies this application of this layer in this step
the same way on every rank, with no numbering: a small integer hashed from the
step's group invstd, which every rank of the group holds bit for bit. A last
slot other than group_size * fingerprint means the backward collectives of two
layer applications were paired with each other, and stops the step
(``check_pairing`` kernel).
"""
import mindspore as ms
from mindspore import Tensor, ops
from mindspore.ops.auto_generate import SplitWithSize

from ms_syncbn.kernels import GUARD_CHANNELS_DIFFER, GUARD_MISPAIRED, GUARD_SINGLE_VALUE, guard_text
from ms_syncbn.precision import Float32Cell

# Fingerprints are integers in [0, FINGERPRINT_MODULUS): their sum over a group of W ranks is
# exact in float32 while W * FINGERPRINT_MODULUS < 2**24 (larger groups use a smaller modulus).
# The hash itself is the fingerprint kernel's contract (ms_syncbn.kernels).
FINGERPRINT_MODULUS = 8191


class SyncBatchNormFunction(Float32Cell):
    """Batch statistics over a process group, normalization, and the matching backward.

    Args:
        kernels (BatchNormKernels): The backend's kernel table.
        all_reduce (Primitive, optional): Summing all-reduce over the group; None for a
            local batch norm with no communication.
        group_size (int): Number of ranks in the group (1 without communication).

    Inputs:
        - **x** (Tensor) - (N, C, *), float16, bfloat16, float32 or float64.
        - **weight** (Tensor) - (C,) float32.
        - **bias** (Tensor) - (C,) float32.
        - **shift** (Tensor) - (C,) float32, a value near each channel's mean (the layer's
          previous group mean), which the table's ``local_moments`` may centre its sums on;
          any finite value gives the same statistics.
        - **eps** (Tensor) - (1,) float32, added to the variance before the square root (an
          input, not a constant: the layer's eps may change between calls).

    Outputs:
        Tuple of 7 tensors, all identical on every rank; only y carries a gradient:

        - **y** (Tensor) - like x.
        - **mean**, **invstd** (Tensor) - (C,) float32, the group's batch statistics.
        - **var** (Tensor) - (C,) float32, the group's unbiased variance (what the running
          variance takes), non-finite on every channel of a step that must not change the
          layer's state (stopped, or fewer than 2 values per channel in the group) and on a
          channel whose mean is not finite.
        - **count** (Tensor) - (1,) float32, N, the group's number of values per channel.
        - **code** (Tensor) - (1,) float32, the guard code that stops the step: 0 (none),
          GUARD_CHANNELS_DIFFER (the ranks' layers disagree on num_features; nothing else is
          meaningful then) or GUARD_SINGLE_VALUE (the group's batch holds one value per channel).
        - **increment** (Tensor) - (1,) float32, 1 if the step counts for num_batches_tracked
          (code 0 and a non-empty group batch), else 0.

        A step with a code is stopped without a branch on a tensor: its variance, and so
        invstd, y and the gradients, are non-finite; the CPU table's combine_moments also
        raises a RuntimeError naming the layer and the check, and otherwise the caller keeps
        the code for a later, named error (ms_syncbn.guard_check).
    """

    def __init__(self, kernels, all_reduce=None, group_size=1):
        super().__init__()
        # The backward payload carries a fingerprint of the layer application (see the
        # module docstring) to catch collectives of two layers paired with each other
        # (a compiled step orders them only where data or the graph's structure does: README,
        # Known issues; control flow around a layer can separate them).
        self.fingerprint_modulus = Tensor(
            [float(min(FINGERPRINT_MODULUS, (2 ** 24 - 1) // max(group_size, 1)))], ms.float32)
        self.guard_text = Tensor(guard_text("(unnamed)"))
        self.local_moments = kernels.local_moments
        self.combine_moments = kernels.combine_moments
        self.finalize_moments = kernels.finalize_moments
        self.normalize = kernels.normalize
        self.backward_reduce = kernels.backward_reduce
        self.backward_elemt = kernels.backward_elemt
        self.check_pairing = kernels.check_pairing
        self.fingerprint = kernels.fingerprint
        # Whether the layer must keep the shift hint up to date (a static fact of the table).
        self.reads_shift = kernels.reads_shift
        # The primitive, not ops.split: a Python function with a branch run both in construct and
        # in bprop does not compile in MindSpore 2.10 (kernels/ascend.py).
        self.split = SplitWithSize()
        self.group_size_value = Tensor([float(group_size)], ms.float32)
        self.no_code = Tensor([0.0], ms.float32)
        self.mispaired_code = Tensor([GUARD_MISPAIRED], ms.float32)
        # The checks' verdict (combine_moments): per check [N == 1 | N == 0 | channel slot ==
        # C * W], what each outcome contributes to the rows [q | -code | increment]; each row's
        # minimum is its value. (3, 3) float32 each.
        inf = float("inf")
        self.verdict_if_equal = Tensor([[-inf, -inf, 1.0],
                                        [-GUARD_SINGLE_VALUE, 0.0, 0.0],
                                        [0.0, 0.0, 1.0]], ms.float32)
        self.verdict_if_unequal = Tensor([[1.0, 1.0, -inf],
                                          [0.0, 0.0, -GUARD_CHANNELS_DIFFER],
                                          [1.0, 1.0, 0.0]], ms.float32)
        # The N - 1 slot: each rank sends n_i - 1/W, so the slots sum to N - 1 (exactly when W is
        # a power of two; otherwise within a few float32 roundings of n_i, which moves the
        # unbiased variance by ~W * 2^-24 relative, below its float32 rounding at any real N).
        self.one_over_group = 1.0 / max(group_size, 1)
        self.all_reduce = all_reduce
        self.group_size = group_size
        self.synchronized = all_reduce is not None

    def construct(self, x, weight, bias, shift, eps):
        mean, invstd, var, count, code, increment = self._group_stats(x, shift, eps)
        y = self.normalize(x, mean, invstd, weight, bias)
        return y, mean, invstd, var, count, code, increment

    def _group_stats(self, x, shift, eps):
        """x (N, C, *), shift (C,), eps (1,) -> mean, invstd, unbiased var (C,), count, code,
        increment (1,): the group's statistics from the ranks' moments, in two all-reduces and
        without a branch (see the module docstring); identical on every rank.

        Written for few kernels (each is a launch on Ascend: see
        tests/test_layer_step_counts.py): n_i is static (the shape's), so every slot of the first
        payload but the n_i m_i is a constant of the graph; the checks and the combination are
        one call (combine_moments), the statistics another (finalize_moments).
        """
        channels = x.shape[1]
        count = x.size // channels  # n_i: a constant of the compiled graph for a static shape
        local_mean, local_var = self.local_moments(x, shift)  # (C,), (C,)
        if not self.synchronized:
            return self._ungrouped_stats(local_mean, local_var, count, eps)
        # (No float(): on an int unknown until run time, a graph compiled for dynamic shapes
        # makes it a ScalarCast, which MindSpore 2.10 announces as deprecated on the console.)
        n = ops.scalar_to_tensor(count, ms.float32).reshape((1,))
        n_less = ops.scalar_to_tensor(count - self.one_over_group, ms.float32).reshape((1,))
        # (C,), (1,) x 5 -> (C+5,) [n_i m_i | n_i | n_i - 1/W | n_i | n_i | C]. The last slot sums
        # to W C when every rank's layer has C channels: ranks whose layers disagree on
        # num_features send buffers of different lengths, which the all-reduce does not detect
        # by itself.
        first = self.all_reduce(ops.cat((local_mean * n, n, n_less, n, n,
                                         ops.fill(ms.float32, (1,), float(channels)))))
        # The checks [N | N | C slot] against [1 | 0 | W C] (a constant of the graph).
        expected = Tensor([1.0, 0.0, float(channels * self.group_size)], ms.float32)
        m2_part, mean, group_count, group_count_less_one, code, increment = self.combine_moments(
            first, local_mean, local_var, n, expected, self.verdict_if_equal,
            self.verdict_if_unequal, self.guard_text)
        # (C,) -> (C,). An empty rank sends zeros (n_i = 0), or NaN when q is -inf.
        invstd, unbiased = self.finalize_moments(self.all_reduce(m2_part), group_count,
                                                 group_count_less_one, eps)
        return mean, invstd, unbiased, group_count, code, increment

    def _ungrouped_stats(self, local_mean, local_var, count, eps):
        """No group: the local moments are the statistics (n values per channel); the same outputs
        as _group_stats. One value per channel is caught from the shape before any
        kernel runs; an empty batch leaves the state unchanged. No branch on n (a run-time
        value in a graph compiled for dynamic shapes): the unbiased variance is
        var * n^2 / (n (n - 1)), which is NaN for n = 0 and Inf for n = 1 (var > 0)."""
        n = ops.scalar_to_tensor(count, ms.float32).reshape((1,))
        unbiased = local_var * (n * n) / (n * (n - 1.0))
        increment = (n > 0.5).astype(ms.float32)
        return local_mean, ops.rsqrt(local_var + eps), unbiased, n, self.no_code, increment

    def bprop(self, x, weight, bias, shift, eps, out, dout):
        dy = dout[0]
        mean, invstd, count = out[1], out[2], out[4]
        channels = mean.shape[0]
        # dy, x, mean, invstd -> local sum(dy), sum(dy*(x-mean)) and the weight/bias gradients,
        # which stay local: data parallelism sums them over ranks.
        # After invstd, i.e. after the forward's last all-reduce: in a compiled step nothing
        # else orders the backward all-reduce after the moments protocol's second one, and
        # ranks that issue them in different orders pair them with each other (an empty rank
        # did, in the emulated-Ascend tier: tests/test_ascend_emulated.py).
        sum_dy, sum_dy_xmu, grad_weight, grad_bias = self.backward_reduce(
            dy, x, ops.depend(mean, invstd), invstd)
        if self.synchronized:
            # (C,), (C,), (1,) -> (2C+1,) with the layer's fingerprint in the last slot
            tag = self.fingerprint(invstd, self.fingerprint_modulus)
            reduced = self.all_reduce(ops.cat((sum_dy, sum_dy_xmu, tag)))
            group_dy, group_dy_xmu, reduced_tag = self.split(reduced, (channels, channels, 1))
            # Another layer application's collective was paired with ours when the tags do not
            # add up (integers: exact in float32). No branch: check_pairing passes sum(dy)
            # through or stops the step (CPU: raises; Ascend: NaN, and so dx).
            group_dy = self.check_pairing(group_dy, reduced_tag, tag, self.group_size_value,
                                          self.mispaired_code, self.guard_text)
        else:
            group_dy, group_dy_xmu = sum_dy, sum_dy_xmu
        dx = self.backward_elemt(dy, x, mean, invstd, weight, group_dy, group_dy_xmu, count)
        return dx, grad_weight, grad_bias, ops.zeros_like(shift), ops.zeros_like(eps)

    def describe(self, where):
        """Name the layer in the errors of the kernels that stop a step: `where` says which
        layer it is."""
        self.guard_text = Tensor(guard_text(where))


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
        _, _, grad_weight, grad_bias = self.backward_reduce(dout, x, mean, invstd)
        # With zero sums backward_elemt reduces to dx = weight * invstd * dy.
        no_sums = ops.zeros_like(mean)
        dx = self.backward_elemt(dout, x, mean, invstd, weight, no_sums, no_sums,
                                 ops.ones((1,), ms.float32))
        return dx, ops.zeros_like(mean), ops.zeros_like(invstd), grad_weight, grad_bias
