"""Unit tests of the CPU kernels (ops/cpu/syncbn_cpu.cc through ms_syncbn.kernels.cpu).

Single process, no msrun. Each kernel of ``cpu_kernels()`` is called directly
and compared with a float64 NumPy evaluation of its contract (the contract
comments in ops/cpu/syncbn_cpu.cc and ms_syncbn/kernels/__init__.py). The
reference is computed from the values the kernel actually received (float16 /
bfloat16 inputs are exact in float64), so the tolerances only cover the
kernel's own arithmetic:

* sums: float32 arithmetic in blocks accumulated in double -> error below
  ``SUM_RTOL * sum(|terms|)`` per channel;
* element-wise outputs: float32 arithmetic, then rounding to the output dtype
  -> error below ``ELEM_RTOL * (sum of |partial terms|) + store_rtol * |ref|``.

The moments protocol's per-channel kernels (combine_moments, finalize_moments)
run on simulated ranks, the C++ kernel and the composite alike, against a
NumPy statement of their contract and the float64 statistics of the group's
data; the C++ kernel raises a stopped step's error, the composite poisons it.

Also here: the graph-mode path, every compiled instruction set (AVX-512,
AVX2, baseline; selected with MS_SYNCBN_CPU_ISA in a subprocess that calls
the library through ctypes), and the size of the collective payloads, which
must not depend on the world size.
"""
import ctypes
import functools
import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

import mindspore as ms
from mindspore import nn, ops

from ms_syncbn.kernels import (GUARD_CHANNELS_DIFFER, GUARD_CODES, GUARD_MEANINGS, GUARD_MISPAIRED,
                               GUARD_SINGLE_VALUE, guard_message, guard_text)
from ms_syncbn.kernels.composite import CheckPairing as CompositeCheckPairing
from ms_syncbn.kernels.composite import CombineMoments as CompositeCombineMoments
from ms_syncbn.kernels.composite import FinalizeMoments as CompositeFinalizeMoments
from ms_syncbn.kernels.composite import Fingerprint as CompositeFingerprint
from ms_syncbn.kernels.composite import UpdateStats as CompositeUpdateStats
from ms_syncbn.kernels.cpu import cpu_kernels, cpu_library_path
from ms_syncbn.sync_function import SyncBatchNormFunction

DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16,
          "float64": ms.float64}
# Per-term relative error of the kernels' arithmetic: float32 (float64 for float64 input).
# Sums: up to 2048 terms in one float32 accumulator (S = 1), so allow ~100 roundings.
SUM_RTOL = {"float32": 1e-5, "float16": 1e-5, "bfloat16": 1e-5, "float64": 1e-13}
ELEM_RTOL = {"float32": 1e-6, "float16": 1e-6, "bfloat16": 1e-6, "float64": 1e-14}
# Rounding of an element-wise result to the output dtype (half an ulp, with margin).
STORE_RTOL = {"float32": 1.2e-7, "float16": 1e-3, "bfloat16": 8e-3, "float64": 2.3e-16}
# ... and where the result is subnormal, half the subnormal spacing (float16's is 2^-24).
STORE_ATOL = {"float32": 2.0 ** -150, "float16": 2.0 ** -25, "bfloat16": 2.0 ** -134,
              "float64": 0.0}

# (N, C, *): ranks 2..5, C = 1, S = 1, S = 7, N = 1, non-powers of two, planes
# longer than the kernels' 2048-term summation block, more rows than a block
# (S = 1 and S = 7), and empty batches.
SHAPES = [
    (6, 5),            # rank 2, S = 1
    (9, 1),            # C = 1
    (3, 4, 7),         # rank 3, S = 7
    (1, 6, 5, 3),      # N = 1
    (2, 3, 1, 1),      # rank 4 with S = 1
    (2, 5, 3, 2, 3),   # rank 5
    (3, 2, 45, 50),    # S = 2250 > one summation block
    (2, 3, 4133),      # S = 4133: two blocks and a tail
    (2100, 3),         # S = 1, more rows than one block
    (700, 3, 7),       # S = 7, several row blocks
    (17, 33, 3, 5),    # odd everything
]
EMPTY_SHAPES = [(0, 3), (0, 4, 5, 5)]
WORKING_SHAPES = [s for s in SHAPES if s[0] > 0]


# ----------------------------------------------------------------- inputs --
def seed(*parts):
    """A per-case seed that is stable across processes (str hashes are not)."""
    return zlib.crc32(repr(parts).encode())


def make_input(rng, shape, dtype, loc=0.0, scale=1.0):
    """(Tensor of `dtype`, float64 array of exactly the values the kernel receives)."""
    values = rng.normal(loc, scale, size=shape)
    if dtype == "float64":
        tensor = ms.Tensor(values, ms.float64)
    else:
        tensor = ms.Tensor(values.astype(np.float32)).astype(DTYPES[dtype])
    return tensor, to_f64(tensor)


def to_f64(tensor):
    if tensor.dtype in (ms.float16, ms.bfloat16):
        tensor = tensor.astype(ms.float32)
    return tensor.asnumpy().astype(np.float64)


def f32(values):
    """A float32 per-channel tensor and the float64 copy of its float32 values."""
    values = np.asarray(values, np.float32)
    return ms.Tensor(values), values.astype(np.float64)


def channel_view(v, ndim):
    return np.asarray(v, np.float64).reshape((1, -1) + (1,) * (ndim - 2))


def reduce_axes(ndim):
    return (0,) + tuple(range(2, ndim))


def channel_params(rng, channels):
    """Random mean, invstd (> 0), weight (any sign), bias as float32 tensors + float64 copies."""
    return (f32(rng.normal(0.0, 0.5, channels)), f32(rng.uniform(0.5, 2.0, channels)),
            f32(rng.normal(1.0, 0.5, channels)), f32(rng.normal(0.0, 0.5, channels)))


# ------------------------------------------------------- contract in f64 --
def local_moments_ref(x, shift):
    """-> float64 mean, biased var (zeros for an empty batch), and the error bounds of the
    contract's kernel: float32 block sums around a centre K no further from the mean than the
    kernel's re-centring threshold (8 standard deviations + 2^-20 |mean|: a hint beyond it is
    replaced by the mean, in a second pass) -> SUM_RTOL of the sums of |terms| around K."""
    axes = reduce_axes(x.ndim)
    channels = x.shape[1]
    if x.size == 0:
        zeros = np.zeros(channels)
        return zeros, zeros, zeros, zeros
    n = x.size // channels
    mean = x.mean(axis=axes)
    var = ((x - channel_view(mean, x.ndim)) ** 2).mean(axis=axes)
    reach = 8.0 * np.sqrt(var) + 2.0 ** -20 * np.abs(mean) + 1e-6 * np.abs(mean)
    centre = mean + np.clip(shift - mean, -reach, reach)
    d = x - channel_view(centre, x.ndim)
    scale1 = np.abs(d).sum(axis=axes) / n  # of sum(x - K) / n
    scale2 = (d * d).sum(axis=axes) / n  # of sum((x - K)^2) / n
    offset = np.abs(mean - centre)
    return mean, var, scale1, scale2 + 2.0 * offset * scale1


def assert_moments_close(got_mean, got_var, x64, shift64, dtype, what):
    """local_moments' two outputs against the float64 mean and biased variance of x."""
    for name, got in (("mean", got_mean), ("var", got_var)):
        assert got.dtype == ms.float32, f"{what} {name}: dtype {got.dtype}, expected float32"
        assert got.shape == (x64.shape[1],), f"{what} {name}: shape {got.shape}"
    mean, var, mean_scale, var_scale = local_moments_ref(x64, shift64)
    for name, got, ref, scale in (("mean", got_mean, mean, mean_scale), ("var", got_var, var, var_scale)):
        got = got.asnumpy().astype(np.float64)
        bound = 2 * SUM_RTOL[dtype] * scale + 1.2e-7 * np.abs(ref) + 1e-30
        bad = ~(np.abs(got - ref) <= bound)
        assert not bad.any(), (f"{what} {name} ({dtype}): channels {np.flatnonzero(bad)[:8]} off: "
                               f"got {got[bad][:4]}, expected {ref[bad][:4]} (bounds {bound[bad][:4]})")



def normalize_ref(x, mean, invstd, weight, bias):
    """-> y and the per-element size of its terms."""
    nd = x.ndim
    a = channel_view(weight * invstd, nd)
    centred = (x - channel_view(mean, nd)) * a
    return centred + channel_view(bias, nd), np.abs(centred) + np.abs(channel_view(bias, nd))


def reduce_packed(table, dy, x, mean):
    """The table's backward_reduce as (2C,) [sum(dy) | sum(dy*(x-mean))] (the references' form);
    its gradients: test_backward_reduce_gives_the_local_weight_and_bias_gradients."""
    sum_dy, sum_dy_xmu, _, _ = table.backward_reduce(dy, x, mean, ops.ones_like(mean))
    return ops.cat((sum_dy, sum_dy_xmu))


def elemt_packed(table, dy, x, mean, invstd, weight, sums, count):
    """The table's backward_elemt with the group sums given as (2C,) (the references' form)."""
    channels = mean.shape[0]
    return table.backward_elemt(dy, x, mean, invstd, weight, sums[:channels], sums[channels:], count)


def backward_reduce_ref(dy, x, mean):
    axes = reduce_axes(x.ndim)
    prod = dy * (x - channel_view(mean, x.ndim))
    return (np.concatenate([dy.sum(axis=axes), prod.sum(axis=axes)]),
            np.concatenate([np.abs(dy).sum(axis=axes), np.abs(prod).sum(axis=axes)]))


def backward_elemt_ref(dy, x, mean, invstd, weight, sums, count):
    nd = x.ndim
    channels = mean.shape[0]
    cnt = count[0] if count[0] > 0 else 1.0
    a = channel_view(weight * invstd, nd)
    term_dy = a * dy
    term_x = -a * channel_view(invstd ** 2 * sums[channels:] / cnt, nd) * (x - channel_view(mean, nd))
    term_c = -a * channel_view(sums[:channels] / cnt, nd) + 0.0 * x
    dx = term_dy + term_x + term_c
    return dx, np.abs(term_dy) + np.abs(term_x) + np.abs(term_c)


def assert_close(got, ref, scale, dtype, rtol, what):
    got = np.asarray(got, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape}, expected {ref.shape}"
    bound = rtol[dtype] * scale + STORE_RTOL[dtype] * np.abs(ref) + STORE_ATOL[dtype] + 1e-300
    excess = np.abs(got - ref) - bound
    worst = int(np.argmax(excess)) if excess.size else 0
    assert excess.size == 0 or excess.flat[worst] <= 0, (
        f"{what} ({dtype}): |got - ref| = {abs(got.flat[worst] - ref.flat[worst]):.3e} exceeds "
        f"{bound.flat[worst]:.3e} at flat index {worst} (got {got.flat[worst]!r}, "
        f"ref {ref.flat[worst]!r})")


def assert_sums_close(got_tensor, ref, scale, dtype, what):
    # Sums are float32 outputs: their own rounding is float32's, whatever the input dtype.
    assert got_tensor.dtype == ms.float32, f"{what}: dtype {got_tensor.dtype}, expected float32"
    got = got_tensor.asnumpy().astype(np.float64)
    bound = SUM_RTOL[dtype] * scale + 1.2e-7 * np.abs(ref) + 1e-30
    assert got.shape == ref.shape, f"{what}: shape {got.shape}, expected {ref.shape}"
    bad = np.abs(got - ref) > bound
    assert not bad.any(), (f"{what} ({dtype}): entries {np.flatnonzero(bad)[:8]} off: got "
                           f"{got[bad][:4]}, expected {ref[bad][:4]} (bounds {bound[bad][:4]})")


@pytest.fixture(scope="module")
def kernels():
    return cpu_kernels()


# ---------------------------------------------------------- local_moments --
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", WORKING_SHAPES, ids=str)
def test_local_moments(kernels, shape, dtype):
    rng = np.random.default_rng(seed(shape, dtype))
    x, x64 = make_input(rng, shape, dtype, loc=0.7, scale=1.3)
    shift, shift64 = f32(rng.normal(0.5, 0.5, shape[1]))
    mean, var = kernels.local_moments(x, shift)
    assert_moments_close(mean, var, x64, shift64, dtype, "local_moments")


@pytest.mark.parametrize("hint", ["zero", "mean_plus_50_std", "near_mean"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_local_moments_large_mean_whatever_the_hint(kernels, dtype, hint):
    """Data far from 0 (std 1): the variance to ~2e-5 of float64 whether the hint is near the
    mean (one pass of shifted sums suffices) or far off (0, or 50 std away: the shifted sums
    alone would lose the variance, so the kernel must sum again around the mean)."""
    rng = np.random.default_rng(seed("large", dtype, hint))
    loc = 1000.0 if dtype == "float16" else 1.0e4
    x, x64 = make_input(rng, (16, 3, 9, 11), dtype, loc=loc, scale=1.0)
    true_mean = x64.mean(axis=(0, 2, 3))
    true_var = x64.var(axis=(0, 2, 3))
    offsets = {"zero": -true_mean, "mean_plus_50_std": 50.0 * np.sqrt(true_var),
               "near_mean": rng.normal(0.0, 0.3, 3)}
    shift, _ = f32(true_mean + offsets[hint])
    mean, var = (o.asnumpy().astype(np.float64) for o in kernels.local_moments(x, shift))
    np.testing.assert_allclose(var, true_var, rtol=2e-5)
    np.testing.assert_allclose(mean, true_mean, rtol=1e-6)


@pytest.mark.parametrize("hint", [1e8, 1e10, -1e12, 1e20, -3e38, float(np.finfo(np.float32).max)],
                         ids=str)
@pytest.mark.parametrize("loc", [0.5, 1.0e4])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_local_moments_any_finite_hint_works(kernels, dtype, loc, hint):
    """"Any finite value works": a hint so far off that one re-centred pass is not enough (the
    first pass's mean is itself off by ~|hint| 2^-24 * sqrt(n), > 8 std), or that the shifted
    sums overflow float32, still gives the mean and variance of float64."""
    rng = np.random.default_rng(seed("hint", dtype, loc, hint))
    x, x64 = make_input(rng, (16, 3, 50), dtype, loc=loc, scale=1.0)
    true_mean, true_var = x64.mean(axis=(0, 2)), x64.var(axis=(0, 2))
    mean, var = (o.asnumpy().astype(np.float64) for o in
                 kernels.local_moments(x, ms.Tensor(np.full(3, hint, np.float32))))
    np.testing.assert_allclose(var, true_var, rtol=2e-5)
    np.testing.assert_allclose(mean, true_mean, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_local_moments_empty_batch_is_all_zeros(kernels, shape, dtype):
    x = ms.Tensor(np.zeros(shape, np.float32)).astype(DTYPES[dtype])
    shift, _ = f32(np.arange(1, shape[1] + 1))
    mean, var = kernels.local_moments(x, shift)
    assert mean.shape == var.shape == (shape[1],)
    np.testing.assert_array_equal(mean.asnumpy(), np.zeros(shape[1], np.float32))
    np.testing.assert_array_equal(var.asnumpy(), np.zeros(shape[1], np.float32))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows", [5, 3000], ids=["small", "several_blocks"])
def test_local_moments_constant_channel_has_variance_exactly_zero(kernels, dtype, rows):
    """A constant channel far from the hint (1e4, hint 0): its mean exactly, its variance exactly
    0 (the shifted sums alone leave rounding noise of ~1e8 * 2^-24 there)."""
    rng = np.random.default_rng(seed("constant", dtype, rows))
    values = rng.normal(0.0, 1.0, (rows, 3, 7))
    values[:, 1] = 1.0e4
    values[:, 2] = -1234.5678
    x = ms.Tensor(values, ms.float64) if dtype == "float64" else \
        ms.Tensor(values.astype(np.float32)).astype(DTYPES[dtype])
    x64 = to_f64(x)
    constant = x64[0, 1:, 0]  # the values as received (bfloat16 rounds 1e4)
    assert (x64[:, 1:] == constant[None, :, None]).all()
    mean, var = (o.asnumpy() for o in kernels.local_moments(x, ms.Tensor(np.zeros(3, np.float32))))
    np.testing.assert_array_equal(var[1:], [0.0, 0.0])
    np.testing.assert_array_equal(mean[1:].astype(np.float64), constant.astype(np.float32))
    np.testing.assert_allclose(var[0], x64[:, 0].var(), rtol=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_local_moments_non_finite_value_poisons_only_its_channel(kernels, dtype, bad):
    rng = np.random.default_rng(seed("nan", dtype))
    values = rng.normal(2.0, 1.0, (6, 4, 5))
    values[3, 1, 2] = bad
    x = ms.Tensor(values, ms.float64) if dtype == "float64" else ms.Tensor(values.astype(np.float32))
    x64 = to_f64(x)
    shift, shift64 = f32(np.full(4, 2.0))
    mean, var = kernels.local_moments(x, shift)
    m, v = mean.asnumpy(), var.asnumpy()
    # that channel: a NaN variance (so the state will not move there), a non-finite mean
    assert np.isnan(v[1]) and not np.isfinite(m[1]), (m, v)
    if bad != bad:
        assert np.isnan(m[1]), m
    keep = [0, 2, 3]
    good = x64[:, keep]
    assert_moments_close(ms.Tensor(m[keep]), ms.Tensor(v[keep]), good, shift64[keep], dtype,
                         "local_moments other channels")


def test_local_moments_rejects_a_malformed_call(kernels):
    x = ms.Tensor(np.ones((2, 3, 4), np.float32))
    with pytest.raises(RuntimeError, match=r"is 1\b"):  # shift of the wrong length
        kernels.local_moments(x, ms.Tensor(np.zeros(4, np.float32)))[0].asnumpy()
    with pytest.raises(RuntimeError, match=r"is 1\b"):  # shift not float32
        kernels.local_moments(x, ms.Tensor(np.zeros(3, np.float16)))[0].asnumpy()
    with pytest.raises(RuntimeError, match=r"is 1\b"):  # x of an unsupported dtype
        kernels.local_moments(ms.Tensor(np.ones((2, 3, 4), np.int32)),
                              ms.Tensor(np.zeros(3, np.float32)))[0].asnumpy()


# -------------------------------------------------------------- normalize --
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", WORKING_SHAPES, ids=str)
def test_normalize(kernels, shape, dtype):
    rng = np.random.default_rng(seed(shape, dtype, "n"))
    x, x64 = make_input(rng, shape, dtype)
    (mean, mean64), (invstd, invstd64), (weight, weight64), (bias, bias64) = channel_params(rng, shape[1])
    y = kernels.normalize(x, mean, invstd, weight, bias)
    assert y.dtype == x.dtype and y.shape == x.shape
    ref, scale = normalize_ref(x64, mean64, invstd64, weight64, bias64)
    assert_close(to_f64(y), ref, scale, dtype, ELEM_RTOL, "normalize")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_normalize_large_mean_subtracts_first(kernels, dtype):
    """x ~ 1e4: (x - mean) must be formed before scaling, or float32 loses the result."""
    rng = np.random.default_rng(11)
    x, x64 = make_input(rng, (8, 4, 6, 5), dtype, loc=1.0e4, scale=1.0)
    mean, mean64 = f32(x64.mean(axis=(0, 2, 3)))
    invstd, invstd64 = f32(1.0 / np.sqrt(x64.var(axis=(0, 2, 3)) + 1e-5))
    weight, weight64 = f32(rng.normal(1.0, 0.2, 4))
    bias, bias64 = f32(rng.normal(0.0, 0.2, 4))
    y = kernels.normalize(x, mean, invstd, weight, bias)
    ref, scale = normalize_ref(x64, mean64, invstd64, weight64, bias64)
    assert_close(to_f64(y), ref, scale, dtype, ELEM_RTOL, "normalize large mean")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_normalize_empty_batch(kernels, shape, dtype):
    rng = np.random.default_rng(3)
    x = ms.Tensor(np.zeros(shape, np.float32)).astype(DTYPES[dtype])
    (mean, _), (invstd, _), (weight, _), (bias, _) = channel_params(rng, shape[1])
    y = kernels.normalize(x, mean, invstd, weight, bias)
    assert y.shape == shape and y.dtype == x.dtype


# -------------------------------------------------------- backward_reduce --
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", WORKING_SHAPES, ids=str)
def test_backward_reduce(kernels, shape, dtype):
    rng = np.random.default_rng(seed(shape, dtype, "r"))
    x, x64 = make_input(rng, shape, dtype, loc=0.3)
    dy, dy64 = make_input(rng, shape, dtype)
    mean, mean64 = f32(rng.normal(0.3, 0.2, shape[1]))
    out = reduce_packed(kernels, dy, x, mean)
    assert out.shape == (2 * shape[1],)
    ref, scale = backward_reduce_ref(dy64, x64, mean64)
    assert_sums_close(out, ref, scale, dtype, "backward_reduce")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_backward_reduce_large_mean(kernels, dtype):
    rng = np.random.default_rng(13)
    x, x64 = make_input(rng, (8, 3, 7, 9), dtype, loc=1.0e4)
    dy, dy64 = make_input(rng, (8, 3, 7, 9), dtype)
    mean, mean64 = f32(x64.mean(axis=(0, 2, 3)))
    out = reduce_packed(kernels, dy, x, mean)
    ref, scale = backward_reduce_ref(dy64, x64, mean64)
    assert_sums_close(out, ref, scale, dtype, "backward_reduce large mean")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_backward_reduce_empty_batch_is_all_zeros(kernels, shape, dtype):
    zeros = ms.Tensor(np.zeros(shape, np.float32)).astype(DTYPES[dtype])
    mean, _ = f32(np.ones(shape[1]))
    out = reduce_packed(kernels, zeros, zeros, mean).asnumpy()
    np.testing.assert_array_equal(out, np.zeros(2 * shape[1], np.float32))


def test_backward_reduce_rejects_a_malformed_call(kernels):
    x = ms.Tensor(np.ones((2, 3, 4), np.float32))
    c = ms.Tensor(np.ones(3, np.float32))
    with pytest.raises(RuntimeError, match=r"is 1\b"):  # invstd of the wrong length
        kernels.backward_reduce(x, x, c, ms.Tensor(np.ones(4, np.float32)))[0].asnumpy()
    with pytest.raises(RuntimeError, match=r"is 1\b"):  # dy and x of different shapes
        kernels.backward_reduce(ms.Tensor(np.ones((2, 3, 5), np.float32)), x, c, c)[0].asnumpy()


def test_backward_elemt_rejects_a_malformed_call(kernels):
    x = ms.Tensor(np.ones((2, 3, 4), np.float32))
    c = ms.Tensor(np.ones(3, np.float32))
    one = ms.Tensor(np.ones(1, np.float32))
    with pytest.raises(RuntimeError, match=r"is 1\b"):  # sum_dy_xmu of the wrong length
        kernels.backward_elemt(x, x, c, c, c, c, ms.Tensor(np.ones(6, np.float32)), one).asnumpy()
    with pytest.raises(RuntimeError, match=r"is 1\b"):  # count of the wrong length
        kernels.backward_elemt(x, x, c, c, c, c, c, c).asnumpy()


# --------------------------------------------------------- backward_elemt --
def elemt_inputs(rng, shape, dtype, loc=0.0):
    x, x64 = make_input(rng, shape, dtype, loc=loc)
    dy, dy64 = make_input(rng, shape, dtype)
    channels = shape[1]
    mean, mean64 = f32(x64.mean(axis=reduce_axes(len(shape))) if x64.size else np.zeros(channels))
    invstd, invstd64 = f32(rng.uniform(0.5, 2.0, channels))
    weight, weight64 = f32(rng.normal(1.0, 0.5, channels))
    # Group sums as after the all-reduce: of a bigger batch than the local one.
    sums, sums64 = f32(rng.normal(0.0, 20.0, 2 * channels))
    count, count64 = f32([max(x64.size // channels, 1) * 3])
    return (dy, x, mean, invstd, weight, sums, count), (dy64, x64, mean64, invstd64, weight64, sums64, count64)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", WORKING_SHAPES, ids=str)
def test_backward_elemt(kernels, shape, dtype):
    rng = np.random.default_rng(seed(shape, dtype, "e"))
    args, args64 = elemt_inputs(rng, shape, dtype)
    dx = elemt_packed(kernels, *args)
    assert dx.dtype == args[1].dtype and dx.shape == shape
    ref, scale = backward_elemt_ref(*args64)
    assert_close(to_f64(dx), ref, scale, dtype, ELEM_RTOL, "backward_elemt")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_backward_elemt_large_mean(kernels, dtype):
    rng = np.random.default_rng(17)
    args, args64 = elemt_inputs(rng, (6, 4, 5, 7), dtype, loc=1.0e4)
    ref, scale = backward_elemt_ref(*args64)
    assert_close(to_f64(elemt_packed(kernels, *args)), ref, scale, dtype, ELEM_RTOL,
                 "backward_elemt large mean")


def test_backward_elemt_zero_count_is_treated_as_one(kernels):
    rng = np.random.default_rng(19)
    args, args64 = elemt_inputs(rng, (3, 2, 4), "float32")
    args = args[:-1] + (ms.Tensor(np.zeros(1, np.float32)),)
    args64 = args64[:-1] + (np.zeros(1),)
    ref, scale = backward_elemt_ref(*args64)
    assert_close(to_f64(elemt_packed(kernels, *args)), ref, scale, "float32", ELEM_RTOL,
                 "backward_elemt count 0")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_backward_elemt_empty_batch(kernels, shape, dtype):
    rng = np.random.default_rng(23)
    args, _ = elemt_inputs(rng, shape, dtype)
    dx = elemt_packed(kernels, *args)
    assert dx.shape == shape and dx.dtype == args[1].dtype


# ------------------------------------------------------------- graph mode --
class AllKernels(nn.Cell):
    """The four element kernels chained as in a training step, compiled as one graph."""

    def __init__(self, table):
        super().__init__()
        self.local_moments = table.local_moments
        self.normalize = table.normalize
        self.backward_reduce = table.backward_reduce
        self.backward_elemt = table.backward_elemt

    def construct(self, x, dy, shift, mean, invstd, weight, bias, count):
        local_mean, local_var = self.local_moments(x, shift)
        y = self.normalize(x, mean, invstd, weight, bias)
        sum_dy, sum_dy_xmu, _, _ = self.backward_reduce(dy, x, mean, invstd)
        dx = self.backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count)
        return local_mean, local_var, y, ops.cat((sum_dy, sum_dy_xmu)), dx


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernels_in_graph_mode(kernels, dtype):
    rng = np.random.default_rng(29)
    shape = (5, 6, 3, 7)
    x, x64 = make_input(rng, shape, dtype, loc=2.0)
    dy, dy64 = make_input(rng, shape, dtype)
    shift, shift64 = f32(rng.normal(2.0, 0.3, 6))
    shift_far, shift_far64 = f32(np.full(6, 300.0))  # far off: the in-kernel second pass
    (mean, mean64), (invstd, invstd64), (weight, weight64), (bias, bias64) = channel_params(rng, 6)
    count, count64 = f32([x64.size // 6])
    previous_mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        net = AllKernels(kernels)
        local_mean, local_var, y, sums, dx = net(x, dy, shift, mean, invstd, weight, bias, count)
        far_mean, far_var = net(x, dy, shift_far, mean, invstd, weight, bias, count)[:2]
    finally:
        ms.set_context(mode=previous_mode)
    assert_moments_close(local_mean, local_var, x64, shift64, dtype, "graph local_moments")
    assert_moments_close(far_mean, far_var, x64, x64.mean(axis=(0, 2, 3)), dtype,
                         "graph local_moments, hint far off")
    ref, scale = normalize_ref(x64, mean64, invstd64, weight64, bias64)
    assert_close(to_f64(y), ref, scale, dtype, ELEM_RTOL, "graph normalize")
    ref_sums, scale = backward_reduce_ref(dy64, x64, mean64)
    assert_sums_close(sums, ref_sums, scale, dtype, "graph backward_reduce")
    sums_used = sums.asnumpy().astype(np.float64)  # what backward_elemt received
    ref, scale = backward_elemt_ref(dy64, x64, mean64, invstd64, weight64, sums_used, count64)
    assert_close(to_f64(dx), ref, scale, dtype, ELEM_RTOL, "graph backward_elemt")


class PerChannelKernels(nn.Cell):
    """The kernels of a training step chained as the callers chain them (local moments ->
    combine -> finalize -> update, on one rank: the all-reduces are identities; backward
    reduce -> elemt; fingerprint -> check_pairing)."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.group_size = ms.Tensor([2.0], ms.float32)
        self.mispaired = ms.Tensor([GUARD_MISPAIRED], ms.float32)

    def construct(self, dy, x, mean, invstd, weight, count, reduced, n, expected, if_equal,
                  if_unequal, shift, modulus, text, eps):
        sum_dy, sum_dy_xmu, grad_weight, _ = self.table.backward_reduce(dy, x, mean, invstd)
        dx = self.table.backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count)
        local_mean, local_var = self.table.local_moments(x, shift)
        m2_part, g_mean, g_count, g_count_less_one, code, increment = self.table.combine_moments(
            reduced, local_mean, local_var, n, expected, if_equal, if_unequal, text)
        g_invstd, g_var = self.table.finalize_moments(m2_part, g_count, g_count_less_one, eps)
        state = self.table.update_stats(g_mean, g_var, shift, shift, shift, ops.ones_like(count) * 0.5)
        tag = self.table.fingerprint(g_invstd, modulus)
        paired = self.table.check_pairing(grad_weight, tag * self.group_size, tag, self.group_size,
                                          self.mispaired, text)
        return (sum_dy, sum_dy_xmu, dx, paired, g_mean, g_var, code, increment, tag) + state


def test_per_channel_kernels_in_a_graph_compiled_for_dynamic_shapes(kernels):
    """Each kernel's C++ shape function (one shape per output for the multi-output ones) at
    compile time with unknown dimensions and again at run time, for two widths in one graph."""
    net = PerChannelKernels(kernels)
    tables = SyncBatchNormFunction(kernels, None, 1)
    dynamic = lambda *shape: ms.Tensor(shape=shape, dtype=ms.float32)
    previous_mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        net.set_inputs(dynamic(None, None, None), dynamic(None, None, None), dynamic(None),
                       dynamic(None), dynamic(None), dynamic(1), dynamic(None), dynamic(1),
                       dynamic(3), dynamic(3, 3), dynamic(3, 3), dynamic(None), dynamic(1),
                       dynamic(None), dynamic(1))
        for rows, channels in [(4, 3), (7, 5)]:
            rng = np.random.default_rng(rows)
            args, args64 = elemt_inputs(rng, (rows, channels, 6), "float32", loc=0.5)
            dy, x, mean, invstd, weight, _, count = args
            x64 = args64[1]
            shift, _ = f32(rng.normal(0.5, 0.1, channels))
            n = x64.size // channels
            # one rank (W = 1): the first payload is the reduced one
            reduced = np.concatenate([x64.sum(axis=(0, 2)), [n, n - 1, n, n, channels]])
            outs = net(dy, x, mean, invstd, weight, count, ms.Tensor(reduced.astype(np.float32)),
                       ms.Tensor([float(n)], ms.float32), ms.Tensor([1.0, 0.0, channels], ms.float32),
                       tables.verdict_if_equal, tables.verdict_if_unequal, shift,
                       ms.Tensor([8191.0], ms.float32), ms.Tensor(guard_text("layer")),
                       ms.Tensor([1e-5], ms.float32))
            assert [o.shape for o in outs] == [(channels,)] * 2 + [(rows, channels, 6)] + \
                [(channels,)] * 3 + [(1,)] * 3 + [(channels,)] * 3
            group = outs[0].asnumpy().astype(np.float64), outs[1].asnumpy().astype(np.float64)
            ref, scale = backward_reduce_ref(args64[0], args64[1], args64[2])
            assert_sums_close(ops.cat(outs[:2]), ref, scale, "float32", "dynamic backward_reduce")
            ref, scale = backward_elemt_ref(*args64[:5], np.concatenate(group), args64[6])
            assert_close(to_f64(outs[2]), ref, scale, "float32", ELEM_RTOL, "dynamic backward_elemt")
            np.testing.assert_allclose(outs[4].asnumpy(), x64.mean(axis=(0, 2)), rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(outs[5].asnumpy(), x64.var(axis=(0, 2), ddof=1), rtol=1e-5)
            np.testing.assert_array_equal(np.concatenate([o.asnumpy() for o in outs[6:8]]), [0.0, 1.0])
            np.testing.assert_array_equal(outs[9].asnumpy(), outs[4].asnumpy())  # shift' = mean
    finally:
        ms.set_context(mode=previous_mode)


# ------------------------------------------------- every instruction set --
# Run in a subprocess (the library picks its instruction set once per process):
# load the library with ctypes, call the four entry points with MindSpore's AOT
# convention on the inputs in `cases.npz`, write the outputs.
_ISA_RUNNER = r"""
import ctypes, json, sys
import numpy as np
lib = ctypes.CDLL(sys.argv[1])
lib.MsSyncBnCpuIsa.restype = ctypes.c_char_p
cases = dict(np.load(sys.argv[2]))
meta = json.loads(sys.argv[4])
outputs = {}
def call(symbol, arrays, dtypes):
    n = len(arrays)
    shapes = [(ctypes.c_int64 * max(a.ndim, 1))(*a.shape) for a in arrays]
    rc = getattr(lib, symbol)(
        n, (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays]),
        (ctypes.c_int * n)(*[a.ndim for a in arrays]),
        (ctypes.POINTER(ctypes.c_int64) * n)(*[ctypes.cast(s, ctypes.POINTER(ctypes.c_int64)) for s in shapes]),
        (ctypes.c_char_p * n)(*[d.encode() for d in dtypes]), None, None)
    assert rc == 0, (symbol, rc)
for key, dtype in meta.items():
    x, dy = cases[key + ".x"], cases[key + ".dy"]
    shift, mean, invstd, weight, bias, sums, count = (cases[key + "." + k] for k in
        ("shift", "mean", "invstd", "weight", "bias", "sums", "count"))
    C = x.shape[1]
    e = [dtype, "float32"]
    moments = [np.full(C, np.nan, np.float32) for _ in range(2)]
    call("LocalMoments", [x, shift] + moments, [e[0]] + [e[1]] * 3)
    y = np.empty_like(x); call("Normalize", [x, mean, invstd, weight, bias, y], [e[0]] + [e[1]] * 4 + [e[0]])
    red = [np.full(C, np.nan, np.float32) for _ in range(4)]
    call("BackwardReduce", [dy, x, mean, invstd] + red, [e[0], e[0]] + [e[1]] * 6)
    dx = np.empty_like(x)
    call("BackwardElemt", [dy, x, mean, invstd, weight, sums[:C].copy(), sums[C:].copy(), count, dx],
         [e[0], e[0]] + [e[1]] * 6 + [e[0]])
    outputs.update({key + ".mean": moments[0], key + ".var": moments[1], key + ".y": y, key + ".dx": dx,
                    key + ".red": np.concatenate(red[:2]), key + ".grads": np.concatenate(red[2:])})
np.savez(sys.argv[3], **outputs)
print(lib.MsSyncBnCpuIsa().decode())
"""

_NUMPY_STORAGE = {"float32": np.float32, "float16": np.float16, "float64": np.float64,
                  "bfloat16": np.uint16}


def _to_storage(values, dtype):
    """float64 values -> the array the library reads (bfloat16 as its 16 bits, round to nearest even)."""
    if dtype != "bfloat16":
        return values.astype(_NUMPY_STORAGE[dtype])
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _from_storage(array, dtype):
    if dtype != "bfloat16":
        return array.astype(np.float64)
    return (array.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_every_instruction_set_meets_the_contracts(isa, tmp_path):
    rng = np.random.default_rng(31)
    cases, meta, inputs64 = {}, {}, {}
    for dtype in DTYPES:
        for shape in [(4, 5, 7), (37, 6), (2, 3, 45, 50), (3, 2, 33), (0, 4, 3)]:
            key = f"{dtype}{shape}"
            x64 = _from_storage(_to_storage(rng.normal(0.5, 1.0, shape), dtype), dtype)
            dy64 = _from_storage(_to_storage(rng.normal(0.0, 1.0, shape), dtype), dtype)
            channels = shape[1]
            per_channel = {
                # the hint near the mean, or far off (-1e4: the kernel's second pass)
                "shift": rng.normal(0.5, 0.3, channels) if shape[0] != 37 else np.full(channels, -1.0e4),
                "mean": rng.normal(0.5, 0.3, channels),
                "invstd": rng.uniform(0.5, 2.0, channels), "weight": rng.normal(1.0, 0.5, channels),
                "bias": rng.normal(0.0, 0.5, channels), "sums": rng.normal(0.0, 9.0, 2 * channels),
                "count": np.array([max(x64.size // channels, 1) * 2.0])}
            per_channel = {k: v.astype(np.float32).astype(np.float64) for k, v in per_channel.items()}
            cases[key + ".x"] = _to_storage(x64, dtype)
            cases[key + ".dy"] = _to_storage(dy64, dtype)
            for name, v in per_channel.items():
                cases[f"{key}.{name}"] = v.astype(np.float32)
            meta[key] = dtype
            inputs64[key] = (dtype, x64, dy64, per_channel)
    np.savez(tmp_path / "cases.npz", **cases)
    env = dict(os.environ, MS_SYNCBN_CPU_ISA=isa)
    proc = subprocess.run([sys.executable, "-c", _ISA_RUNNER, cpu_library_path(),
                           str(tmp_path / "cases.npz"), str(tmp_path / "out.npz"), json.dumps(meta)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    active = proc.stdout.strip().splitlines()[-1]
    if active != isa:
        pytest.skip(f"this CPU does not support {isa} (the library ran {active})")
    out = np.load(tmp_path / "out.npz")
    for key, (dtype, x64, dy64, p) in inputs64.items():
        what = f"{isa} {key}"
        assert_moments_close(ms.Tensor(out[key + ".mean"]), ms.Tensor(out[key + ".var"]), x64,
                             p["shift"], dtype, what + " local_moments")
        ref, scale = normalize_ref(x64, p["mean"], p["invstd"], p["weight"], p["bias"])
        assert_close(_from_storage(out[key + ".y"], dtype), ref, scale, dtype, ELEM_RTOL,
                     what + " normalize")
        ref, scale = backward_reduce_ref(dy64, x64, p["mean"])
        assert_sums_close(ms.Tensor(out[key + ".red"]), ref, scale, dtype, what + " backward_reduce")
        channels = x64.shape[1]
        sum_dy, sum_dy_xmu = out[key + ".red"][:channels], out[key + ".red"][channels:]
        np.testing.assert_array_equal(  # grad_weight, grad_bias from the kernel's own float32 sums
            out[key + ".grads"], np.concatenate([sum_dy_xmu * p["invstd"].astype(np.float32), sum_dy]),
            err_msg=what + " backward_reduce gradients")
        ref, scale = backward_elemt_ref(dy64, x64, p["mean"], p["invstd"], p["weight"], p["sums"],
                                        p["count"])
        assert_close(_from_storage(out[key + ".dx"], dtype), ref, scale, dtype, ELEM_RTOL,
                     what + " backward_elemt")


@pytest.mark.parametrize("plane", [1, 20], ids=["scalar", "vector"])
def test_bfloat16_rounding_is_nearest_even_and_keeps_nan(kernels, plane):
    """normalize with a = 1, mean = 0 computes x + bias exactly in float32, then stores bfloat16:
    ties go to even, a finite float32 beyond bfloat16's range becomes inf, NaN stays NaN."""
    base = np.array([1.0, 1.0, 1.0, -2.0, 0.0, 0.0], np.float32)
    bias = np.array([2.0 ** -8, 3 * 2.0 ** -8, 2.0 ** -9, -2.0 ** -7, np.finfo(np.float32).max,
                     np.nan], np.float32)
    x = ms.Tensor(np.repeat(base.reshape(1, 6, 1), plane, axis=2)).astype(ms.bfloat16)
    ones = ms.Tensor(np.ones(6, np.float32))
    zeros = ms.Tensor(np.zeros(6, np.float32))
    y = to_f64(kernels.normalize(x, zeros, ones, ones, ms.Tensor(bias)))[0]  # (6, plane)
    # 1 + 2^-8: tie between 1 and 1 + 2^-7 -> 1 (even); 1 + 3*2^-8 -> 1 + 2^-6 (even);
    # 1 + 2^-9 -> 1; -2 - 2^-7: tie -> -2; float32 max -> inf; NaN -> NaN.
    expected = [1.0, 1.0 + 2.0 ** -6, 1.0, -2.0, np.inf]
    np.testing.assert_array_equal(y[:5], np.repeat(np.array(expected).reshape(5, 1), plane, axis=1))
    assert np.isnan(y[5]).all()


# --------------------------------------------------- collective payloads --
class RecordingAllReduce(nn.Cell):
    """Stands in for the group all-reduce of `world_size` ranks holding the same batch.

    Records the shape and dtype of every payload; returns world_size x the local sums, as a
    summing all-reduce over identical ranks would.
    """

    def __init__(self, world_size):
        super().__init__()
        self.world_size = world_size
        self.payloads = []

    def construct(self, local_sums):
        self.payloads.append((tuple(local_sums.shape), local_sums.dtype))
        return local_sums * self.world_size


@pytest.mark.parametrize("world_size", [2, 4, 8])
@pytest.mark.parametrize("channels", [1, 3, 64])
def test_collective_payload_is_c_plus_5_and_c_then_2c_plus_1_whatever_the_world_size(
        kernels, world_size, channels):
    """One training step of the shared algorithm: exactly two all-reduces in forward, of (C+5,)
    and (C,) float32, and one of (2C+1,) float32 in backward; the statistics equal the
    single-rank ones."""
    rng = np.random.default_rng(world_size * 100 + channels)
    x64 = rng.normal(0.5, 1.2, (4, channels, 3, 5))
    x = ms.Tensor(x64.astype(np.float32))
    x64 = x64.astype(np.float32).astype(np.float64)
    dy = ms.Tensor(rng.normal(size=x64.shape).astype(np.float32))
    weight = ms.Tensor(rng.normal(1.0, 0.3, channels).astype(np.float32))
    bias = ms.Tensor(rng.normal(0.0, 0.3, channels).astype(np.float32))
    # The hint at the batch mean: the steady state (the kernel needs no second pass).
    shift = ms.Tensor(x64.mean(axis=(0, 2, 3)).astype(np.float32))
    recorder = RecordingAllReduce(world_size)
    function = SyncBatchNormFunction(kernels, recorder, world_size)
    eps = ms.Tensor([1e-5], ms.float32)

    class Step(nn.Cell):
        def __init__(self):
            super().__init__()
            self.function = function

        def construct(self, x, weight, bias, shift, dy):
            return (self.function(x, weight, bias, shift, eps)[0] * dy).sum()

    grad_fn = ms.grad(Step(), grad_position=0)
    dx = grad_fn(x, weight, bias, shift, dy)
    dx.asnumpy()
    # forward [n_i m_i (C) | N | N - 1 | checks (3)] then [m2_part (C)], backward [grad sums (2C) |
    # layer tag (1)]: the check slots turn mismatched layers into errors.
    assert recorder.payloads == [((channels + 5,), ms.float32), ((channels,), ms.float32),
                                 ((2 * channels + 1,), ms.float32)]
    _, mean, invstd, var, count, code, increment = function(x, weight, bias, shift, eps)
    group_count = world_size * x64.size // channels
    np.testing.assert_allclose(mean.asnumpy(), x64.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    # var: the group's unbiased variance (W identical ranks)
    np.testing.assert_allclose(var.asnumpy(), x64.var(axis=(0, 2, 3)) * group_count / (group_count - 1),
                               rtol=1e-5)
    np.testing.assert_allclose(invstd.asnumpy(), 1.0 / np.sqrt(x64.var(axis=(0, 2, 3)) + 1e-5), rtol=1e-5)
    assert count.asnumpy()[0] == group_count
    np.testing.assert_array_equal(code.asnumpy(), [0.0])  # no guard code
    np.testing.assert_array_equal(increment.asnumpy(), [1.0])


@pytest.mark.parametrize("channels", [1, 5, 64, 257])
@pytest.mark.parametrize("batch", [0, 1, 8])
def test_kernel_payload_sizes_depend_only_on_channels(kernels, channels, batch):
    x = ms.Tensor(np.ones((batch, channels, 3), np.float32))
    shift = ms.Tensor(np.zeros(channels, np.float32))
    mean = shift
    assert [s.shape for s in kernels.local_moments(x, shift)] == [(channels,)] * 2
    assert [s.shape for s in kernels.backward_reduce(x, x, mean, mean)] == [(channels,)] * 4


@pytest.mark.parametrize("table", ["cpu", "ascend_emulated"])
def test_backward_reduce_gives_the_local_weight_and_bias_gradients(table):
    """grad_weight = sum(dy*(x-mean)) * invstd and grad_bias = sum(dy), float32, on both tables."""
    from tests.ascend_emulation import emulated_ascend_kernels

    kernels = cpu_kernels() if table == "cpu" else emulated_ascend_kernels("a2")
    rng = np.random.default_rng(5)
    x = rng.normal(3.0, 2.0, (4, 3, 5)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    mean = x.mean(axis=(0, 2))
    invstd = rng.uniform(0.5, 2.0, 3).astype(np.float32)
    outs = kernels.backward_reduce(*(ms.Tensor(v) for v in (dy, x, mean, invstd)))
    sum_dy, sum_dy_xmu, grad_weight, grad_bias = (o.asnumpy() for o in outs)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    want = (dy64 * (x64 - mean.astype(np.float64)[None, :, None])).sum(axis=(0, 2))
    np.testing.assert_allclose(sum_dy_xmu, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_weight, want * invstd, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(grad_bias, sum_dy)
    np.testing.assert_allclose(sum_dy, dy64.sum(axis=(0, 2)), rtol=1e-5, atol=1e-5)
    assert {o.dtype for o in outs} == {ms.float32}


def test_library_reports_an_instruction_set():
    lib = ctypes.CDLL(cpu_library_path())
    lib.MsSyncBnCpuIsa.restype = ctypes.c_char_p
    assert lib.MsSyncBnCpuIsa().decode() in ("avx512", "avx2", "baseline")


# ------------------------------------------------------------------------------ guard --

@pytest.mark.parametrize("code", GUARD_CODES)
def test_guard_message_is_the_text_the_cpu_kernels_raise(kernels, code):
    """Errors raised later, in Python, for a step the Ascend composites poisoned (guard_message,
    ms_syncbn.guard_check) read exactly as the CPU kernels': CombineMoments for the forward
    codes, CheckPairing for the backward one."""
    where = "'net.block.bn' SyncBatchNorm(num_features=5) on process group 'g' of 2 ranks"
    with pytest.raises(RuntimeError) as info:
        if code == GUARD_MISPAIRED:
            kernels.check_pairing(*pairing_args(np.ones(3), 9.0, 4.0, 2.0, where)).asnumpy()
        else:
            case = next(c for c in STOPPED if c[3] == code)
            combine_on_rank(kernels.combine_moments, stopped_group(*case[:3]), 0, where)
    raised = str(info.value)
    message = guard_message(code, where)
    assert message.startswith(f"ms_syncbn SyncBatchNorm error {int(code)} in layer {where}: ")
    assert message in raised, (message, raised)


def test_guard_message_of_a_code_out_of_range_reports_a_malformed_call():
    assert guard_message(0.5, "") == f"ms_syncbn SyncBatchNorm error 1: {GUARD_MEANINGS[1.0]}."
    assert guard_message(GUARD_SINGLE_VALUE, "") == \
        f"ms_syncbn SyncBatchNorm error 2: {GUARD_MEANINGS[GUARD_SINGLE_VALUE]}."


def test_guard_text_entries_are_the_layer_then_the_meanings_by_code():
    entries = guard_text("layer").astype(np.uint8).tobytes().decode().split("\0")
    assert entries[0] == "layer"
    for code, meaning in GUARD_MEANINGS.items():
        assert entries[int(code)] == meaning


# ------------------------------------------------------------------------- update_stats --

def update_stats_ref(mean, var, shift, running_mean, running_var, factor):
    """NumPy float32 evaluation of the UpdateStats contract (ops/cpu/syncbn_cpu.cc): channels
    with a finite (unbiased) var move, by lerp(a, b, w) = a + w * (b - a) in float32."""
    mean, var, shift, running_mean, running_var = (np.asarray(v, np.float32) for v in
                                                   (mean, var, shift, running_mean, running_var))
    w = np.float32(factor)
    change = np.isfinite(var)
    with np.errstate(invalid="ignore", over="ignore"):  # channels that do not change
        new_mean = running_mean + w * (mean - running_mean)
        new_var = running_var + w * (var - running_var)
    return (np.where(change, mean, shift), np.where(change, new_mean, running_mean),
            np.where(change, new_var, running_var))


def update_stats_inputs(rng, channels, stopped=False):
    """mean, unbiased var, shift, running_mean, running_var (C,) float32 as the protocols give
    them: var non-finite wherever the step must not change a channel (mean non-finite there too
    in some channels), or on every channel of a stopped step."""
    mean = rng.normal(3.0, 2.0, channels).astype(np.float32)
    var = rng.uniform(0.1, 4.0, channels).astype(np.float32)
    mean[2], var[2] = np.nan, np.nan  # a NaN channel
    var[4] = np.inf  # an overflowing channel
    mean[5], var[5] = -np.inf, np.nan
    var[6] = -np.inf
    if stopped:
        var[:] = np.nan
    shift, running_mean = (rng.normal(size=channels).astype(np.float32) for _ in range(2))
    running_var = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    return mean, var, shift, running_mean, running_var


def call_update(update, mean, var, shift, running_mean, running_var, factor):
    outs = update(*(ms.Tensor(np.asarray(v, np.float32).reshape(-1)) for v in
                    (mean, var, shift, running_mean, running_var, factor)))
    channels = len(mean)
    assert [o.shape for o in outs] == [(channels,)] * 3, [o.shape for o in outs]
    assert [o.dtype for o in outs] == [ms.float32] * 3
    return [o.asnumpy() for o in outs]


@pytest.mark.parametrize("factor", [0.1, 0.7, 1.0, 0.0])
@pytest.mark.parametrize("stopped", [False, True], ids=["kept", "stopped"])
@pytest.mark.parametrize("implementation", ["cpu_kernel", "composite"])
def test_update_stats(kernels, implementation, stopped, factor):
    rng = np.random.default_rng(seed("update", stopped, factor))
    channels = 9
    inputs = update_stats_inputs(rng, channels, stopped)
    update = kernels.update_stats if implementation == "cpu_kernel" else CompositeUpdateStats()
    got = call_update(update, *inputs, factor)
    for name, out, ref in zip(("shift", "running_mean", "running_var"), got,
                              update_stats_ref(*inputs, factor)):
        np.testing.assert_array_equal(out, ref, err_msg=name)  # float32 lerp: bit for bit
    mean, var, shift, running_mean, running_var = inputs
    kept = [c for c in range(channels) if c not in (2, 4, 5, 6)] if not stopped else []
    for c in range(channels):
        if c in kept:  # a moving average between the old state and the batch statistics
            lo, hi = sorted((running_var[c], var[c]))
            assert lo <= got[2][c] <= hi and got[0][c] == mean[c]
        else:  # non-finite var: state unchanged bit for bit
            assert got[0][c] == shift[c] and got[1][c] == running_mean[c]
            assert got[2][c] == running_var[c]
    # float64 sanity of the float32 lerp on the channels that move
    w = np.float32(factor)
    with np.errstate(invalid="ignore"):  # 0 * inf in channels that do not change
        ref64 = running_var.astype(np.float64) + float(w) * (var.astype(np.float64) - running_var)
    np.testing.assert_allclose(got[2][kept], ref64[kept], rtol=1e-6)


def test_update_stats_cpu_kernel_and_composite_agree(kernels):
    """The two forms give the same state bit for bit, on random statistics of many widths."""
    rng = np.random.default_rng(53)
    composite = CompositeUpdateStats()
    for _ in range(20):
        channels = int(rng.integers(7, 200))
        inputs = list(update_stats_inputs(rng, channels, stopped=False))
        inputs[1][rng.random(channels) < 0.1] = np.nan
        factor = float(rng.choice([0.1, 0.01, 0.5, 0.9, rng.uniform()]))
        for a, b in zip(call_update(kernels.update_stats, *inputs, factor),
                        call_update(composite, *inputs, factor)):
            np.testing.assert_array_equal(a, b)


def test_update_stats_rejects_a_malformed_call(kernels):
    c = ms.Tensor(np.ones(3, np.float32))
    one = ms.Tensor(np.ones(1, np.float32))
    with pytest.raises(RuntimeError, match=r"is 1\b"):  # running_var of the wrong length
        kernels.update_stats(c, c, c, c, ms.Tensor(np.ones(4, np.float32)), one)[0].asnumpy()
    with pytest.raises(RuntimeError, match=r"is 1\b"):  # factor of the wrong length
        kernels.update_stats(c, c, c, c, c, c)[0].asnumpy()


# --------------------------------------------------- combine_moments, finalize_moments --

EPS = 1e-5


def simulated_ranks(rng, channels, ranks_rows, loc, plane=4, rank_channels=None):
    """Ranks holding `ranks_rows` rows (rows, C, plane) each, as the moments protocol sees them.

    Returns a dict: "local" [(mean_i, biased var_i, n_i)] as float32 (the float64 moments of each
    rank's data, rounded: what local_moments hands on), "reduced" (C+5,) float32, the sum over
    the ranks (in float32, as the all-reduce) of the first payload
    [n_i m_i (C) | n_i | n_i - 1/W | n_i | n_i | C_i], "expected" [1, 0, W C] and "full", the
    float64 data of the whole group. `rank_channels` overrides the C_i slot of each rank (a rank
    whose layer disagrees on num_features).
    """
    world = len(ranks_rows)
    data = [rng.normal(loc, 2.0, (rows, channels, plane)).astype(np.float32).astype(np.float64)
            for rows in ranks_rows]
    rank_channels = rank_channels or [channels] * world
    local, payloads = [], []
    for x, c_i in zip(data, rank_channels):
        n_i = x.size // channels
        if n_i:
            mean_i, var_i = x.mean(axis=(0, 2)), x.var(axis=(0, 2))
        else:
            mean_i, var_i = np.zeros(channels), np.zeros(channels)
        mean_i, var_i = mean_i.astype(np.float32), var_i.astype(np.float32)
        local.append((mean_i, var_i, np.float32(n_i)))
        payloads.append(np.concatenate([np.float32(n_i) * mean_i,
                                        np.array([n_i, n_i - 1.0 / world, n_i, n_i, c_i], np.float32)]))
    reduced = np.zeros(channels + 5, np.float32)
    for payload in payloads:
        reduced += payload  # float32 sums, as the all-reduce
    expected = np.array([1.0, 0.0, world * channels], np.float32)
    return {"local": local, "reduced": reduced, "expected": expected, "world": world,
            "full": np.concatenate(data, axis=0)}


@functools.lru_cache(maxsize=None)
def verdict_tables(world):
    """The function's verdict tables (if_equal, if_unequal), as tensors."""
    function = SyncBatchNormFunction(cpu_kernels(), None, world)
    return function.verdict_if_equal, function.verdict_if_unequal


def combine_on_rank(combine, group, rank, where="'net.block.bn' SyncBatchNorm(num_features=5)",
                    text=None):
    """combine_moments on rank `rank` of `group` -> its six outputs as float32 arrays."""
    mean_i, var_i, n_i = group["local"][rank]
    if_equal, if_unequal = verdict_tables(group["world"])
    text = guard_text(where) if text is None else text
    outs = combine(ms.Tensor(group["reduced"]), ms.Tensor(mean_i), ms.Tensor(var_i),
                   ms.Tensor([n_i], ms.float32), ms.Tensor(group["expected"]), if_equal, if_unequal,
                   ms.Tensor(np.asarray(text, np.float32)))
    channels = len(mean_i)
    assert [o.shape for o in outs] == [(channels,)] * 2 + [(1,)] * 4, [o.shape for o in outs]
    assert {o.dtype for o in outs} == {ms.float32}
    return [o.asnumpy() for o in outs]


def finalize(finalize_kernel, m2, group_count, group_count_less_one, eps=EPS):
    outs = finalize_kernel(ms.Tensor(np.asarray(m2, np.float32)),
                           ms.Tensor(np.asarray(group_count, np.float32).reshape(1)),
                           ms.Tensor(np.asarray(group_count_less_one, np.float32).reshape(1)),
                           ms.Tensor([eps], ms.float32))
    assert [o.shape for o in outs] == [(len(m2),)] * 2 and {o.dtype for o in outs} == {ms.float32}
    return [o.asnumpy() for o in outs]


def protocol_step(combine, finalize_kernel, group):
    """combine_moments on every rank, the second all-reduce (a float32 sum of m2_part), then
    finalize_moments -> dict of every rank's combine outputs and the group's invstd, var."""
    per_rank = [combine_on_rank(combine, group, r) for r in range(group["world"])]
    m2 = np.zeros_like(per_rank[0][0])
    with np.errstate(invalid="ignore"):
        for outs in per_rank:
            m2 += outs[0]
    first = per_rank[0]
    invstd, var = finalize(finalize_kernel, m2, first[2], first[3])
    return {"ranks": per_rank, "m2": m2, "invstd": invstd, "var": var}


def moments_contract(group):
    """The NumPy float64 statement of the contract for a step that is not stopped: group mean
    m = sum n_i m_i / N, m2_part_i = n_i (v_i + (m_i - m)^2), M2 their sum, invstd =
    1/sqrt(M2/N + eps), unbiased var = M2/(N-1)."""
    reduced = group["reduced"]
    channels = len(reduced) - 5
    count, count_less_one = float(reduced[channels]), float(reduced[channels + 1])
    # the contract's float32 steps: m = sum / N (one rounding), m_i - m (exact or one rounding)
    mean = (reduced[:channels] / reduced[channels]).astype(np.float32)
    parts = [float(n) * (v.astype(np.float64) + (m - mean).astype(np.float64) ** 2)
             for m, v, n in group["local"]]
    m2 = np.sum(parts, axis=0)
    mean = mean.astype(np.float64)
    return {"mean": mean, "parts": parts, "m2": m2, "invstd": 1.0 / np.sqrt(m2 / count + EPS),
            "var": m2 / count_less_one, "count": count, "count_less_one": count_less_one}


def combine_implementation(kernels, implementation):
    if implementation == "cpu_kernel":
        return kernels.combine_moments, kernels.finalize_moments
    return CompositeCombineMoments(), CompositeFinalizeMoments()


@pytest.mark.parametrize("implementation", ["cpu_kernel", "composite"])
@pytest.mark.parametrize("ranks_rows", [(3, 6), (2, 5, 4), (0, 4, 3), (7, 0)], ids=str)
@pytest.mark.parametrize("loc", [0.5, 1.0e4])
def test_combine_and_finalize_moments(kernels, implementation, ranks_rows, loc):
    """A normal step (an empty rank among others included): code 0, increment 1, the group's
    mean, invstd and unbiased variance as the contract states them from the ranks' moments,
    and as float64 gives them from the concatenated data."""
    rng = np.random.default_rng(seed("combine", ranks_rows, loc))
    channels = 5
    group = simulated_ranks(rng, channels, ranks_rows, loc)
    combine, finalize_kernel = combine_implementation(kernels, implementation)
    step = protocol_step(combine, finalize_kernel, group)
    want = moments_contract(group)
    full = group["full"]
    group_count = full.size // channels
    for rank, outs in enumerate(step["ranks"]):
        m2_part, mean, count, count_less_one, code, increment = outs
        np.testing.assert_array_equal(np.concatenate([count, code, increment]),
                                      [group_count, 0.0, 1.0], err_msg=f"rank {rank}")
        np.testing.assert_allclose(count_less_one, [group_count - 1], rtol=2e-7)
        np.testing.assert_allclose(mean, want["mean"], rtol=3e-7, atol=0, err_msg=f"rank {rank}")
        np.testing.assert_allclose(m2_part, want["parts"][rank], rtol=2e-6, atol=1e-30,
                                   err_msg=f"rank {rank}")
        if ranks_rows[rank] == 0:  # an empty rank sends zeros
            np.testing.assert_array_equal(m2_part, np.zeros(channels, np.float32))
    np.testing.assert_allclose(step["var"], want["var"], rtol=4e-6)
    np.testing.assert_allclose(step["invstd"], want["invstd"], rtol=4e-6)
    # ... and the group's statistics from the data itself (at 1e4, the float32 m_i and m are off
    # by up to half an ulp, 2^-11, each, which moves n_i (m_i - m)^2 by ~2 |m_i - m| 2^-10: up
    # to ~1e-3 of a variance of 4 for these few-value ranks; the protocol's, not a kernel's)
    rtol = 1e-5 if loc < 100 else 2e-3
    np.testing.assert_allclose(step["ranks"][0][1], full.mean(axis=(0, 2)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(step["var"], full.var(axis=(0, 2), ddof=1), rtol=rtol)
    np.testing.assert_allclose(step["invstd"], 1 / np.sqrt(full.var(axis=(0, 2)) + EPS), rtol=rtol)


@pytest.mark.parametrize("implementation", ["cpu_kernel", "composite"])
def test_combine_moments_all_ranks_empty(kernels, implementation):
    """N = 0: no code, the step does not count, m2_part NaN, so invstd and the unbiased
    variance are non-finite (the state does not move)."""
    group = simulated_ranks(np.random.default_rng(2), 4, (0, 0), 0.0)
    combine, finalize_kernel = combine_implementation(kernels, implementation)
    step = protocol_step(combine, finalize_kernel, group)
    for outs in step["ranks"]:
        m2_part, _, count, count_less_one, code, increment = outs
        np.testing.assert_array_equal(np.concatenate([count, count_less_one, code, increment]),
                                      [0.0, -1.0, 0.0, 0.0])
        assert np.isnan(m2_part).all(), m2_part
    assert not np.isfinite(step["var"]).any() and not np.isfinite(step["invstd"]).any()


# (ranks' rows, plane, channel slots of the ranks or None, the code): the steps that stop
STOPPED = [
    ((1, 0), 1, None, GUARD_SINGLE_VALUE),  # the group holds one value per channel
    ((0, 1, 0), 1, None, GUARD_SINGLE_VALUE),
    ((3, 2), 4, [5, 6], GUARD_CHANNELS_DIFFER),  # a rank's layer has 6 channels
    ((1, 0), 1, [5, 4], GUARD_CHANNELS_DIFFER),  # both checks fail: the channels' code wins
    ((0, 0), 4, [5, 7], GUARD_CHANNELS_DIFFER),  # ... also over an empty group
]


def stopped_group(ranks_rows, plane, rank_channels):
    rng = np.random.default_rng(seed("stopped", ranks_rows, plane))
    return simulated_ranks(rng, 5, ranks_rows, 1.5, plane=plane, rank_channels=rank_channels)


@pytest.mark.parametrize("ranks_rows, plane, rank_channels, code", STOPPED, ids=str)
def test_composite_combine_moments_poisons_a_stopped_step(ranks_rows, plane, rank_channels, code):
    group = stopped_group(ranks_rows, plane, rank_channels)
    composite = CompositeCombineMoments()
    for rank in range(group["world"]):
        m2_part, _, _, _, got_code, increment = combine_on_rank(composite, group, rank)
        np.testing.assert_array_equal(np.concatenate([got_code, increment]), [code, 0.0])
        assert not np.isfinite(m2_part).any(), (rank, m2_part)
        invstd, var = finalize(CompositeFinalizeMoments(), m2_part, [2.0], [1.0])
        assert not np.isfinite(var).any() and not np.isfinite(invstd).any()


@pytest.mark.parametrize("ranks_rows, plane, rank_channels, code", STOPPED, ids=str)
def test_combine_moments_raises_naming_the_layer_and_saying_what_the_code_means(
        kernels, ranks_rows, plane, rank_channels, code, capfd):
    group = stopped_group(ranks_rows, plane, rank_channels)
    where = "'net.block.bn' SyncBatchNorm(num_features=5) on process group 'g' of 2 ranks"
    with pytest.raises(RuntimeError) as info:
        combine_on_rank(kernels.combine_moments, group, 0, where)
    message = f"ms_syncbn SyncBatchNorm error {int(code)} in layer {where}: {GUARD_MEANINGS[code]}."
    assert message == guard_message(code, where)
    assert message in str(info.value), str(info.value)
    assert message in capfd.readouterr().err


def test_combine_moments_without_text_gives_the_code_and_where_its_meaning_is(kernels):
    group = stopped_group((3, 2), 4, [5, 6])
    with pytest.raises(RuntimeError, match=r"SyncBatchNorm error 3: see ms_syncbn\.kernels\.GUARD_MEANINGS"):
        combine_on_rank(kernels.combine_moments, group, 0, text=np.zeros(0, np.float32))


def test_combine_and_finalize_moments_cpu_kernel_and_composite_agree(kernels):
    """The two forms give the same float32 values to a few ulps (the same formula, maybe
    contracted differently) and the same counts, code, increment and NaN channels."""
    rng = np.random.default_rng(59)
    composite, composite_finalize = CompositeCombineMoments(), CompositeFinalizeMoments()
    for trial in range(24):
        channels = int(rng.integers(1, 40))
        ranks_rows = tuple(int(r) for r in rng.integers(0, 5, int(rng.integers(1, 4))))
        if sum(ranks_rows) == 1:
            ranks_rows += (2,)
        group = simulated_ranks(rng, channels, ranks_rows, float(rng.normal(0.0, 50.0)),
                                plane=int(rng.integers(1, 6)))
        if trial % 4 == 1 and group["reduced"][-2] > 0:  # a NaN in some rank's data
            rank = int(np.argmax(ranks_rows))
            group["local"][rank][0][int(rng.integers(0, channels))] = np.nan
        got = protocol_step(kernels.combine_moments, kernels.finalize_moments, group)
        want = protocol_step(composite, composite_finalize, group)
        pairs = [(g, w) for g_outs, w_outs in zip(got["ranks"], want["ranks"])
                 for g, w in zip(g_outs, w_outs)] + [(got["invstd"], want["invstd"]),
                                                    (got["var"], want["var"])]
        for index, (a, b) in enumerate(pairs):
            np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{trial} {index}")
            np.testing.assert_allclose(a, b, rtol=4 * 2.0 ** -23, atol=0, err_msg=f"{trial} {index}")


def test_combine_moments_rejects_a_malformed_call(kernels):
    group = simulated_ranks(np.random.default_rng(1), 3, (2, 2), 0.0)
    group["reduced"] = group["reduced"][:-1]  # C+4: a check slot is missing
    with pytest.raises(RuntimeError, match=r"error 1: malformed call of the CombineMoments kernel"):
        combine_on_rank(kernels.combine_moments, group, 0)


def test_finalize_moments_rejects_a_malformed_call(kernels):
    with pytest.raises(RuntimeError, match=r"error 1: malformed call of the FinalizeMoments kernel"):
        kernels.finalize_moments(ms.Tensor(np.ones(3, np.float32)),
                                 ms.Tensor([4.0, 4.0], ms.float32),  # count of length 2
                                 ms.Tensor([3.0], ms.float32), ms.Tensor([EPS], ms.float32))[0].asnumpy()


# -------------------------------------------------------------------------- fingerprint --

def fingerprint_ref(invstd, modulus):
    """The fingerprint contract (Fingerprint in ops/cpu/syncbn_cpu.cc) in NumPy float32 and
    Python integers: over the C values of invstd."""
    values = np.asarray(invstd, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = values * np.float32(2.0 ** 12)
    scaled = np.where(np.isfinite(scaled), scaled, np.float32(0.0)).astype(np.float32)
    wrapped = scaled - np.float32(2.0 ** 14) * np.floor(scaled * np.float32(2.0 ** -14))
    assert np.all((wrapped >= 0) & (wrapped <= 2 ** 14))  # -tiny wraps to 2^14 (rounding)
    return float(sum(int(bits) for bits in wrapped.astype(np.float32)) % modulus)


FINGERPRINT_CASES = [
    [np.nan, 1.0, np.inf, -np.inf],  # non-finite values count as 0
    [1.0 / np.sqrt(1e-5)] * 2,  # an all-empty group step
    [1e-30, 316.0, 3e38, -3e38],  # overflow after scaling counts as 0
    [-1e-10, -7.25, 123456.789, 0.5, 2.0, 1e4],  # negative values wrap into [0, 2^14)
]


def fingerprint_of(fingerprint, invstd, modulus):
    as_tensor = lambda v: ms.Tensor(np.asarray(v, np.float32).reshape(-1))
    out = fingerprint(as_tensor(invstd), as_tensor(modulus)).asnumpy()
    assert out.shape == (1,) and out.dtype == np.float32
    return float(out[0])


@pytest.mark.parametrize("implementation", ["cpu_kernel", "composite"])
@pytest.mark.parametrize("modulus", [8191.0, 4095.0, 1.0])
def test_fingerprint_follows_its_contract(kernels, implementation, modulus):
    """Both forms give the contract's integer in [0, modulus), bit for bit, on random statistics
    and edge cases; different statistics almost never share one."""
    fingerprint = kernels.fingerprint if implementation == "cpu_kernel" else CompositeFingerprint()
    rng = np.random.default_rng(int(modulus))

    def tag(invstd):
        got = fingerprint_of(fingerprint, invstd, modulus)
        assert got == fingerprint_ref(invstd, int(modulus)), (invstd, got)
        assert 0 <= got < modulus
        return got

    seen = set()
    for _ in range(40):
        channels = int(rng.integers(1, 70))
        seen.add(tag(rng.uniform(0.01, 300, channels)))
    if modulus > 1000:
        assert len(seen) >= 38, len(seen)  # 40 random statistics: ~0.1-0.2 collisions
    for invstd in FINGERPRINT_CASES:
        tag(invstd)


def test_fingerprint_cpu_kernel_and_composite_agree(kernels):
    """The two forms of the contract give the same integer on the same invstd (every rank of a
    mixed job would pair them)."""
    rng = np.random.default_rng(43)
    composite = CompositeFingerprint()
    cases = [rng.uniform(0.01, 300, int(rng.integers(1, 300))) * 10.0 ** rng.integers(-3, 4)
             for _ in range(30)] + FINGERPRINT_CASES
    for invstd in cases:
        assert fingerprint_of(kernels.fingerprint, invstd, 8191.0) == \
            fingerprint_of(composite, invstd, 8191.0), invstd


def test_fingerprint_depends_on_invstd_only_to_a_2_to_the_minus_12_step(kernels):
    """Statistics that differ by 2^-12 in one channel's invstd (below 2^14 / 2^12 = 4) get
    different tags: a mispaired layer of the same width is caught unless its invstd agrees
    to that resolution on every channel (modulo the hash)."""
    invstd = np.array([1.0, 2.5, 0.75], np.float32)
    moved = invstd.copy()
    moved[1] += np.float32(2.0 ** -12)
    assert fingerprint_of(kernels.fingerprint, invstd, 8191.0) == \
        (fingerprint_of(kernels.fingerprint, moved, 8191.0) - 1.0) % 8191.0


def test_fingerprint_rejects_a_malformed_call(kernels):
    c, one = ms.Tensor(np.ones(3, np.float32)), ms.Tensor(np.ones(1, np.float32))
    with pytest.raises(RuntimeError, match=r"is 1\b"):  # modulus of the wrong length
        kernels.fingerprint(c, ms.Tensor(np.ones(2, np.float32))).asnumpy()
    with pytest.raises(RuntimeError, match=r"is 1\b"):  # modulus 0: no integer in [0, 0)
        kernels.fingerprint(c, ms.Tensor(np.zeros(1, np.float32))).asnumpy()
    with pytest.raises(RuntimeError, match=r"is 1\b"):  # invstd not 1-D
        kernels.fingerprint(ms.Tensor(np.ones((3, 1), np.float32)), one).asnumpy()


# ------------------------------------------------------------------------ check_pairing --

def pairing_args(values, reduced_tag, tag, group_size, where="'net.block.bn' SyncBatchNorm(num_features=3)"):
    as_tensor = lambda v: ms.Tensor(np.asarray(v, np.float32).reshape(-1))
    return (as_tensor(values), as_tensor(reduced_tag), as_tensor(tag), as_tensor(group_size),
            as_tensor(GUARD_MISPAIRED), ms.Tensor(guard_text(where)))


# (reduced tag, tag, group size): what each rank's slot sums to when the layers pair up
PAIRED = [(4095.0 * 8, 4095.0, 8.0), (0.0, 0.0, 2.0), (17.0, 17.0, 1.0), (8190.0 * 2047, 8190.0, 2047.0)]
# ... and when some rank's slot held another layer's tag (or the sum is not a number)
MISPAIRED = [(4095.0 + 12.0, 4095.0, 2.0), (1.0, 0.0, 2.0), (np.nan, 3.0, 2.0), (np.inf, 3.0, 2.0),
             (17.0 * 3 + 1, 17.0, 3.0)]


@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("implementation", ["cpu_kernel", "composite"])
def test_check_pairing_passes_values_through_when_the_tags_add_up(kernels, implementation, mode):
    class Checked(nn.Cell):
        def __init__(self):
            super().__init__()
            self.check = kernels.check_pairing if implementation == "cpu_kernel" else CompositeCheckPairing()

        def construct(self, values, reduced_tag, tag, group_size, code, text):
            return self.check(values, reduced_tag, tag, group_size, code, text) * 2.0

    values = np.random.default_rng(47).normal(size=9).astype(np.float32)
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    try:
        net = Checked()
        for reduced_tag, tag, group_size in PAIRED:
            assert np.float32(reduced_tag) == np.float32(tag) * np.float32(group_size)  # the case's premise
            out = net(*pairing_args(values, reduced_tag, tag, group_size)).asnumpy()
            np.testing.assert_array_equal(out, values * np.float32(2.0))
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.mark.parametrize("reduced_tag, tag, group_size", MISPAIRED)
def test_check_pairing_raises_naming_the_layer_and_the_mispaired_meaning(kernels, reduced_tag, tag,
                                                                        group_size, capfd):
    where = "'net.block.bn' SyncBatchNorm(num_features=3) on process group 'g' of 2 ranks"
    with pytest.raises(RuntimeError) as info:
        kernels.check_pairing(*pairing_args(np.ones(5), reduced_tag, tag, group_size, where)).asnumpy()
    message = (f"ms_syncbn SyncBatchNorm error 4 in layer {where}: "
               f"{GUARD_MEANINGS[GUARD_MISPAIRED]}.")
    assert message == guard_message(GUARD_MISPAIRED, where)
    assert message in str(info.value), str(info.value)
    assert message in capfd.readouterr().err


@pytest.mark.parametrize("reduced_tag, tag, group_size", MISPAIRED)
def test_composite_check_pairing_poisons_instead_of_branching(reduced_tag, tag, group_size):
    out = CompositeCheckPairing()(*pairing_args(np.arange(5), reduced_tag, tag, group_size)).asnumpy()
    assert out.shape == (5,) and out.dtype == np.float32 and np.isnan(out).all(), out


def test_check_pairing_rejects_a_malformed_call(kernels):
    args = list(pairing_args(np.ones(3), 8.0, 4.0, 2.0))
    args[2] = ms.Tensor(np.ones(2, np.float32))  # tag of the wrong length
    with pytest.raises(RuntimeError, match=r"error 1: malformed call of the CheckPairing kernel"):
        kernels.check_pairing(*args).asnumpy()
    args = list(pairing_args(np.ones(3), 8.0, 4.0, 2.0))
    args[0] = ms.Tensor(np.ones((3, 2), np.float32))  # values not 1-D
    with pytest.raises(RuntimeError, match=r"error 1: malformed call of the CheckPairing kernel"):
        kernels.check_pairing(*args).asnumpy()
