"""Composite forms of kernel contracts: ordinary MindSpore operators, any backend.

The Ascend table uses them where no native kernel fits; the CPU tests run them
against the CPU kernels of the same contracts (they are the readable statement
of what those kernels compute).
"""
import mindspore as ms
from mindspore import nn, ops
from mindspore.ops.auto_generate import SplitWithSize

from ms_syncbn.kernels import FINGERPRINT_SCALE, FINGERPRINT_WRAP


class CombineMoments(nn.Cell):
    """reduced (C+5,), local_mean, local_var (C,), count (1,), expected (3,), if_equal (3, 3),
    if_unequal (3, 3), text (T,) -> m2_part, mean (C,), group_count, group_count_less_one,
    code, increment (1,), float32.

    See ``CombineMoments`` in ops/cpu/syncbn_cpu.cc for the contract; here a stopped step is not
    raised (`text` is unused) but poisoned: m2_part is -inf or NaN. Ten kernels (SplitWithSize,
    Equal, Select, ReduceMin, SplitWithSize, Div, Sub, Addcmul, Mul, Neg).
    """

    def __init__(self):
        super().__init__()
        # The primitives: ops.split is a Python function with a branch, which MindSpore 2.10
        # does not compile when it runs both in a construct and in a bprop (kernels/ascend.py);
        # ops.addcmul wraps `value` in Tensor(), which a graph cannot type.
        self.split = SplitWithSize()
        self.row_minimum = ops.ReduceMin()
        self.addcmul = ops.Addcmul()

    def construct(self, reduced, local_mean, local_var, count, expected, if_equal, if_unequal,
                  text):
        channels = local_mean.shape[0]
        mean_sum, group_count, group_count_less_one, checks = self.split(
            reduced, (channels, 1, 1, 3))
        # (3,) == (3,) -> select over (3, 3) -> row minima (3,): [q | -code | increment]
        verdict = self.row_minimum(ops.select(checks == expected, if_equal, if_unequal), 1)
        q, negative_code, increment = self.split(verdict, (1, 1, 1))
        mean = mean_sum / group_count  # N = 0: NaN, which an empty group never reads
        deviation = local_mean - mean
        m2_part = self.addcmul(local_var, deviation, deviation, q) * count  # (C,)
        return (ops.depend(m2_part, text), mean, group_count, group_count_less_one,
                ops.neg(negative_code), increment)


class FinalizeMoments(nn.Cell):
    """m2 (C,), group_count, group_count_less_one, eps (1,) -> invstd, var (unbiased) (C,),
    float32: rsqrt(m2 / N + eps) and m2 / (N - 1). Four kernels (Div, Add, Rsqrt, Div).

    See ``FinalizeMoments`` in ops/cpu/syncbn_cpu.cc for the contract.
    """

    def construct(self, m2, group_count, group_count_less_one, eps):
        return ops.rsqrt(m2 / group_count + eps), m2 / group_count_less_one


class UpdateStats(nn.Cell):
    """mean, var (C,), shift, running_mean, running_var (C,), factor (1,)
    -> shift', running_mean', running_var' (C,) float32.

    See ``UpdateStats`` in ops/cpu/syncbn_cpu.cc for the contract: `var` is the unbiased
    variance, non-finite on every channel that must not change. Six kernels (IsFinite,
    Lerp, Select, Lerp, Select, Select); an output the caller does not use (the Ascend
    layer never reads the shift) is pruned by the compiler.
    """

    def construct(self, mean, var, shift, running_mean, running_var, factor):
        change = ops.isfinite(var)  # (C,)
        return (ops.select(change, mean, shift),
                ops.select(change, ops.lerp(running_mean, mean, factor), running_mean),
                ops.select(change, ops.lerp(running_var, var, factor), running_var))


class CheckPairing(nn.Cell):
    """values (M,), reduced_tag (1,), tag (1,), group_size (1,), code (1,), text (T,) float32
    -> values (M,) float32: `values` where reduced_tag == tag * group_size, NaN everywhere
    otherwise. Three kernels (Muls, NotEqual, MaskedFill); `code` and `text` are unused.

    The backward's layer-identity check without a branch (on Ascend a branch on a tensor needs
    its value on the host, and no native kernel fails on a value): a mispaired step's gradients
    are NaN. ``CheckPairing`` in ops/cpu/syncbn_cpu.cc states the contract (there the
    step stops with error `code`, naming the layer).
    """

    def construct(self, values, reduced_tag, tag, group_size, code, text):
        return ops.masked_fill(ops.depend(values, text), reduced_tag != tag * group_size,
                               float("nan"))  # (M,), (1,) -> (M,)


class Fingerprint(nn.Cell):
    """invstd (C,), modulus (1,) float32 -> (1,) float32, an integer in [0, modulus).

    See ``Fingerprint`` in ops/cpu/syncbn_cpu.cc for the contract. Every step is exact or
    correctly rounded IEEE arithmetic, and the sum is over integers (exact in any order), so
    every rank, holding the same all-reduced statistics bit for bit, gets the same integer.
    NaN and Inf count as 0. Seven kernels (Muls, NanToNum, FloorMod, Cast, ReduceSum,
    FloorMod, Cast).
    """

    # Read through self: mindspore.amp's O1 regenerates a cell's code in another module,
    # where this module's names are not defined.
    scale = FINGERPRINT_SCALE
    wrap = FINGERPRINT_WRAP

    def __init__(self):
        super().__init__()
        # The primitive, not Tensor.sum: the front end traces a Tensor method to its own code,
        # not to the bprop that calls it, and the layer-step count (ms_syncbn/_bench_graphs.py)
        # would file this backward kernel under the forward.
        self.sum = ops.ReduceSum(keep_dims=True)

    def construct(self, invstd, modulus):
        values = ops.nan_to_num(invstd * self.scale, 0.0, 0.0, 0.0)  # (C,)
        # [0, 2^14] (-tiny rounds to 2^14), int64: ReduceSum then needs no cast of its own
        bits = ops.floor_mod(values, self.wrap).astype(ms.int64)
        digest = ops.floor_mod(self.sum(bits), modulus.astype(ms.int64))  # (1,) int64
        return digest.astype(ms.float32)
