"""Composite forms of kernel contracts: ordinary MindSpore operators, any backend.

The Ascend table uses them where no native kernel fits; the CPU tests run them
against the CPU kernels of the same contracts (they are the readable statement
of what those kernels compute).
"""
import mindspore as ms
from mindspore import nn, ops

from ms_syncbn.kernels import FINGERPRINT_SCALE, FINGERPRINT_WRAP


class FinalizeStats(nn.Cell):
    """sums (3C+2,), params (6,) -> mean, invstd, var (C,), code, count, needs reshift,
    increment (1,), float32.

    See ``FinalizeStats`` in ops/cpu/syncbn_cpu.cc for the contract (`var` is the unbiased
    variance, NaN where the state must not change; invstd is from the biased one). Float32
    arithmetic: the kernel's values to a few roundings.
    """

    def construct(self, sums, params):
        channels = (sums.shape[0] - 2) // 3
        s1, s2 = sums[:channels], sums[channels:2 * channels]
        nk, count = sums[2 * channels:3 * channels], sums[3 * channels:3 * channels + 1]
        group_size, eps, ratio, tolerance = params[0], params[1], params[2], params[3]
        channels_differ = ops.abs(sums[3 * channels + 1:] - channels * group_size) > 0.5  # (1,)
        safe_count = ops.maximum(count, 1.0)  # N = 0: all sums are 0, so mean = var = 0
        offset = s1 / safe_count
        mean = nk / safe_count + offset
        var = s2 / safe_count - offset * offset
        var = var * (var >= 0.0).astype(var.dtype)  # rounding can dip below 0; NaN stays NaN
        limit = ratio * var + ops.square(tolerance * mean)
        reshift = ops.logical_and((ops.square(offset) > limit).any().reshape((1,)),
                                  ops.logical_not(channels_differ))
        code = ops.select(channels_differ, params[4:5],
                          ops.select(count == 1.0, params[5:6], ops.zeros_like(count)))
        kept = code == 0.0  # (1,)
        # (C,): the unbiased variance where it is defined, NaN elsewhere
        defined = ops.logical_and(ops.logical_and(kept, count >= 2.0),
                                  ops.logical_and(ops.isfinite(mean), ops.isfinite(var)))
        unbiased = ops.masked_fill(var * (count / ops.maximum(count - 1.0, 1.0)),
                                   ops.logical_not(defined), float("nan"))
        increment = ops.logical_and(kept, count >= 1.0).astype(ms.float32)
        return (mean, ops.rsqrt(var + eps), unbiased, code, count, reshift.astype(ms.float32),
                increment)


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


class Guard(nn.Cell):
    """values (M,) float32, code (1,) float32, text (unused) -> values (M,) float32: `values`
    where code is 0, NaN everywhere otherwise. Two kernels (NotEqual, MaskedFill).

    The guard contract without a branch: on Ascend a branch on a tensor needs the value on
    the host, a device-to-host round trip per layer and step, and no native kernel fails on
    a value. So a step with an error code is stopped by poisoning what it computes next (the
    layer routes the group variance through here, the backward its group sum(dy)): its outputs and
    gradients are NaN, and the layer leaves its state unchanged. Which error it was is not
    carried: run the job on CPU, whose Guard kernel names it (README, "Errors").
    """

    def construct(self, values, code, text):
        return ops.masked_fill(ops.depend(values, text), code != 0.0, float("nan"))  # (M,), (1,) -> (M,)


class CheckPairing(nn.Cell):
    """values (M,), reduced_tag (1,), tag (1,), group_size (1,), code (1,), text (T,) float32
    -> values (M,) float32: `values` where reduced_tag == tag * group_size, NaN everywhere
    otherwise. Three kernels (Muls, NotEqual, MaskedFill); `code` and `text` are unused.

    The backward's layer-identity check without a branch (see ``Guard``): a mispaired step's
    gradients are NaN. ``CheckPairing`` in ops/cpu/syncbn_cpu.cc states the contract (there the
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
