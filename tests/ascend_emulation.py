"""Emulated Ascend: CPU stand-ins for the native Ascend batch-norm primitives (tests only).

``use_emulated_ascend(variant)`` makes every SyncBatchNorm built afterwards in this
process use the Ascend table (ms_syncbn/kernels/ascend.py) with these stand-ins in
place of ``mindspore.ops.auto_generate``'s primitives. msrun workers select it with
``--emulate-ascend {a2,910_95}`` (tests/workers/sync_scenarios.py); it is the one switch.

Each stand-in has the real primitive's call signature and output tuple, accepts the
dtypes MindSpore 2.10's type inference accepts (else TypeError, as inference raises at
compile time), returns the output dtypes inference gives, and computes what the aclnn
kernel computes; a dtype that inference passes but the aclnn kernel rejects raises a
RuntimeError, as the kernel launch would. Sources:

- call signatures: ``mindspore/ops/auto_generate/gen_ops_prim.py`` (MindSpore 2.10);
- accepted and output dtypes: MindSpore's own inference, run on CPU by
  tests/test_ascend_binding.py, which fails if these stand-ins disagree with it;
- arithmetic, aclnn dtype lists and empty inputs: CANN ops-nn (github.com/hicann/ops-nn):
  ``norm/batch_norm_elemt/op_host/op_api/aclnn_batch_norm_elemt.cpp``,
  ``norm/sync_batch_norm_backward_reduce/op_api/aclnn_batch_norm_backward_reduce.cpp``,
  ``norm/sync_batch_norm_backward_elemt/op_api/aclnn_batch_norm_elemt_backward.cpp`` and the
  ``aclnnBatchNormStats`` documentation;
- BNTrainingUpdateGrad (``mindspore.ops.operations._grad_ops``, run through MindSpore's aclop
  path): CANN's ``bn_training_update_grad`` (dy and x cast to float32, the mean subtracted per
  element, float32 sums; float32 statistics). MindSpore's inference checks no dtype or rank;
  the stand-in accepts what the kernel is documented to take, 4-D float16/float32 NCHW with
  float32 statistics, and raises RuntimeError (as the launch would) for anything else.

Empty inputs (variant): on Atlas A2/A3 (910B/910_93, ``"a2"``) aclnnBatchNormReduceBackward
returns without writing its outputs; the stand-in fills them with NaN, the worst case
("unwritten" memory). The 910_95 op_api zero-fills them (``"910_95"``). BatchNormStats on
an empty input is not documented: NaN in both variants (mean of nothing).
"""
import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import constexpr

VARIANTS = ("a2", "910_95")

STATS_DTYPES = (ms.float16, ms.float32)  # BatchNormStats inference
ELEMT_DTYPES = (ms.float16, ms.bfloat16, ms.float32)  # BatchNormElemt inference
GRAD_DTYPES = (ms.float16, ms.bfloat16, ms.float32, ms.float64)  # ReduceGrad / ElemtGrad inference
ACLNN_DTYPES = (ms.float16, ms.bfloat16, ms.float32)  # aclnn kernels on A2/A3 (910B and later)


def _reduce_axes(x):
    return (0,) + tuple(range(2, x.ndim))


def _per_channel(v, x):
    return v.reshape((1, x.shape[1]) + (1,) * (x.ndim - 2))


@constexpr
def _check_inferred(primitive, dtype, accepted):
    """TypeError worded as MindSpore's inference words it, for a dtype it rejects."""
    if dtype not in accepted:
        raise TypeError(f"For primitive[{primitive}], the input argument[input] must be a type of "
                        f"{accepted}, but got {dtype} (emulated inference).")


@constexpr
def _check_same_dtype(primitive, dout_dtype, input_dtype):
    """RuntimeError, as aclnnBatchNormReduceBackward's check: gradOut and input share a dtype."""
    if dout_dtype != input_dtype:
        raise RuntimeError(f"{primitive}: gradOut ({dout_dtype}) and input ({input_dtype}) must have "
                           f"the same dtype (emulated kernel launch).")


@constexpr
def _check_aclnn(primitive, dtype):
    """RuntimeError for a dtype that inference passes and the aclnn kernel rejects."""
    if dtype not in ACLNN_DTYPES:
        raise RuntimeError(f"{primitive}: aclnn kernel not implemented for {dtype}, should be in "
                           f"dtype support list {ACLNN_DTYPES} (emulated kernel launch).")


def _empty_fill(variant):
    return float("nan") if variant == "a2" else 0.0


class BatchNormStats(nn.Cell):
    """(input_x, eps) -> (mean (C,) float32, invstd (C,) float32); input_x float16/float32.

    mean = sum(x)/n, invstd = 1/sqrt(sum((x - mean)^2)/n + eps), in float32 (the variance
    is taken around the mean, as aclnnBatchNormStats documents).
    """

    accepted_dtypes = STATS_DTYPES  # through self: amp O1's code rewrite drops module constants

    def __init__(self, variant="a2"):
        super().__init__()
        self.empty_value = _empty_fill(variant)

    def construct(self, input_x, eps):
        _check_inferred("BatchNormStats", input_x.dtype, self.accepted_dtypes)
        channels = input_x.shape[1]
        if input_x.size == 0:  # not documented: NaN, the mean of nothing
            mean = ops.fill(ms.float32, (channels,), float("nan"))
            invstd = mean
        else:
            x = input_x.astype(ms.float32)
            axes = _reduce_axes(x)
            mean = x.mean(axis=axes)
            var = ops.square(x - _per_channel(mean, x)).mean(axis=axes)
            invstd = ops.rsqrt(var + eps)
        return mean, invstd


class BatchNormElemt(nn.Cell):
    """(input_x, weight, bias, mean, invstd, eps) -> y, dtype of input_x (float16/bfloat16/float32).

    aclnnBatchNormElemt: var = 1/invstd^2 - eps, then inference batch norm
    y = (x - mean) / sqrt(var + eps) * weight + bias, in float32.
    """

    accepted_dtypes = ELEMT_DTYPES  # through self: amp O1's code rewrite drops module constants

    def __init__(self, variant="a2"):
        super().__init__()
        self.empty_value = _empty_fill(variant)

    def construct(self, input_x, weight, bias, mean, invstd, eps):
        _check_inferred("BatchNormElemt", input_x.dtype, self.accepted_dtypes)
        x = input_x.astype(ms.float32)
        invstd32 = invstd.astype(ms.float32)
        var = 1.0 / (invstd32 * invstd32) - eps
        scale = weight.astype(ms.float32) * ops.rsqrt(var + eps)
        y = (x - _per_channel(mean.astype(ms.float32), x)) * _per_channel(scale, x) \
            + _per_channel(bias.astype(ms.float32), x)
        return y.astype(input_x.dtype)


class BatchNormReduceGrad(nn.Cell):
    """(dout, input_x, mean, invstd, weight, input_g, weight_g, bias_g)
    -> (sum_dy, sum_dy_xmu) in input_x's dtype, (grad_weight, grad_bias) in weight's dtype.

    aclnnBatchNormReduceBackward casts dout and input_x to float32, sums dy and dy*x, then
    sum_dy_xmu = sum(dy*x) - mean*sum(dy) and grad_weight = sum_dy_xmu * invstd in
    float32, and casts each output to its dtype. Empty input: NaN ("a2") or zeros ("910_95").
    """

    accepted_dtypes = GRAD_DTYPES  # through self: amp O1's code rewrite drops module constants

    def __init__(self, variant="a2"):
        super().__init__()
        self.empty_value = _empty_fill(variant)

    def construct(self, dout, input_x, mean, invstd, weight, input_g, weight_g, bias_g):
        _check_inferred("BatchNormReduceGrad", input_x.dtype, self.accepted_dtypes)
        _check_aclnn("BatchNormReduceGrad", input_x.dtype)
        _check_same_dtype("BatchNormReduceGrad", dout.dtype, input_x.dtype)
        channels = input_x.shape[1]
        if input_x.size == 0:
            sum_dy = ops.fill(ms.float32, (channels,), self.empty_value)  # unwritten, or zeros
            sum_dy_xmu = sum_dy
            grad_weight = sum_dy
        else:
            dy = dout.astype(ms.float32)
            x = input_x.astype(ms.float32)
            axes = _reduce_axes(x)
            sum_dy = dy.sum(axis=axes)
            sum_dy_x = (dy * x).sum(axis=axes)
            sum_dy_xmu = sum_dy_x - mean.astype(ms.float32) * sum_dy
            grad_weight = sum_dy_xmu * invstd.astype(ms.float32)
        return (sum_dy.astype(input_x.dtype), sum_dy_xmu.astype(input_x.dtype),
                grad_weight.astype(weight.dtype), sum_dy.astype(weight.dtype))


class BatchNormElemtGrad(nn.Cell):
    """(dout, input_x, mean, invstd, weight, sumd_dy, sum_dy_xmu, count) -> dx, dtype of input_x.

    aclnnBatchNormElemtBackward: in float32 (float16 only if every input is float16),
    n = sum(count), dx = (dy - sum_dy/n - (x - mean) * invstd^2 * sum_dy_xmu/n) * invstd * weight.
    """

    accepted_dtypes = GRAD_DTYPES  # through self: amp O1's code rewrite drops module constants

    def __init__(self, variant="a2"):
        super().__init__()
        self.empty_value = _empty_fill(variant)

    def construct(self, dout, input_x, mean, invstd, weight, sumd_dy, sum_dy_xmu, count):
        _check_inferred("BatchNormElemtGrad", input_x.dtype, self.accepted_dtypes)
        _check_aclnn("BatchNormElemtGrad", input_x.dtype)
        x = input_x.astype(ms.float32)
        dy = dout.astype(ms.float32)
        n = count.astype(ms.float32).sum()
        invstd32 = invstd.astype(ms.float32)
        mean_dy = sumd_dy.astype(ms.float32) / n
        mean_dy_xmu = sum_dy_xmu.astype(ms.float32) / n
        xmu = x - _per_channel(mean.astype(ms.float32), x)
        dx = (dy - _per_channel(mean_dy, x) - xmu * _per_channel(invstd32 * invstd32 * mean_dy_xmu, x)) \
            * _per_channel(invstd32 * weight.astype(ms.float32), x)
        return dx.astype(input_x.dtype)


class BNTrainingUpdateGrad(nn.Cell):
    """(grads, x, batch_mean, batch_variance) -> (diff_scale, diff_offset), (C,) float32 each.

    diff_scale = sum(dy * (x - mean) / sqrt(variance + epsilon)), diff_offset = sum(dy) over N, H,
    W, with dy and x cast to float32 and the mean subtracted per element. Empty input: not
    documented; NaN ("a2", unwritten) or zeros ("910_95"), as BatchNormReduceGrad.
    """

    kernel_dtypes = (ms.float16, ms.float32)  # through self: amp O1's code rewrite drops module constants

    def __init__(self, variant="a2", epsilon=1e-4):
        super().__init__()
        self.empty_value = _empty_fill(variant)
        self.epsilon = epsilon

    def construct(self, grads, x, batch_mean, batch_variance):
        _check_update_grad("BNTrainingUpdateGrad", x.dtype, grads.dtype, batch_mean.dtype,
                           batch_variance.dtype, x.ndim, self.kernel_dtypes)
        channels = x.shape[1]
        if x.size == 0:
            diff_offset = ops.fill(ms.float32, (channels,), self.empty_value)
            diff_scale = diff_offset
        else:
            dy = grads.astype(ms.float32)
            x32 = x.astype(ms.float32)
            axes = _reduce_axes(x32)
            rstd = ops.rsqrt(batch_variance + self.epsilon)
            diff_scale = (dy * (x32 - _per_channel(batch_mean, x32))).sum(axis=axes) * rstd
            diff_offset = dy.sum(axis=axes)
        return diff_scale, diff_offset


@constexpr
def _check_update_grad(primitive, x_dtype, dy_dtype, mean_dtype, variance_dtype, rank, accepted):
    """RuntimeError, as the aclop launch of BNTrainingUpdateGrad would, outside what the kernel
    takes: 4-D x and grads of one float16/float32 dtype, float32 statistics."""
    if x_dtype not in accepted or dy_dtype != x_dtype or rank != 4 \
            or mean_dtype != ms.float32 or variance_dtype != ms.float32:
        raise RuntimeError(f"{primitive}: takes 4-D float16/float32 grads and x of one dtype and "
                           f"float32 statistics, but got x {x_dtype} ({rank}-D), grads {dy_dtype}, "
                           f"statistics {mean_dtype}/{variance_dtype} (emulated kernel launch).")


class EmulatedGradOps:
    """Stands in for ``mindspore.ops.operations._grad_ops`` inside ms_syncbn.kernels.ascend."""

    def __init__(self, variant):
        self.variant = variant

    def BNTrainingUpdateGrad(self, epsilon=1e-4):  # pylint: disable=invalid-name
        return BNTrainingUpdateGrad(self.variant, epsilon)


class EmulatedPrimitives:
    """Stands in for ``mindspore.ops.auto_generate`` inside ms_syncbn.kernels.ascend."""

    def __init__(self, variant):
        if variant not in VARIANTS:
            raise ValueError(f"emulated Ascend variant must be one of {VARIANTS}, but got {variant!r}")
        self.variant = variant

    def BatchNormStats(self):  # pylint: disable=invalid-name
        return BatchNormStats(self.variant)

    def BatchNormElemt(self):  # pylint: disable=invalid-name
        return BatchNormElemt(self.variant)

    def BatchNormReduceGrad(self):  # pylint: disable=invalid-name
        return BatchNormReduceGrad(self.variant)

    def BatchNormElemtGrad(self):  # pylint: disable=invalid-name
        return BatchNormElemtGrad(self.variant)


def emulated_ascend_kernels(variant):
    """A fresh Ascend table whose native primitives are the stand-ins of ``variant``."""
    from ms_syncbn.kernels import ascend

    real, real_grad_ops = ascend.native, ascend.grad_ops
    ascend.native, ascend.grad_ops = EmulatedPrimitives(variant), EmulatedGradOps(variant)
    try:
        return ascend.ascend_kernels.__wrapped__()
    finally:
        ascend.native, ascend.grad_ops = real, real_grad_ops


def use_emulated_ascend(variant, monkeypatch=None):
    """Every SyncBatchNorm built after this call in this process uses the emulated Ascend table;
    with pytest's `monkeypatch`, only until the test ends."""
    from ms_syncbn import batchnorm

    table = emulated_ascend_kernels(variant)
    if monkeypatch is None:
        batchnorm.kernels_for = lambda device_target: table
    else:
        monkeypatch.setattr(batchnorm, "kernels_for", lambda device_target: table)
    return table
