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

Also here: the graph-mode path, every compiled instruction set (AVX-512,
AVX2, baseline; selected with MS_SYNCBN_CPU_ISA in a subprocess that calls
the library through ctypes), and the size of the collective payloads, which
must not depend on the world size.
"""
import ctypes
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
from ms_syncbn.kernels.composite import FinalizeStats as CompositeFinalizeStats
from ms_syncbn.kernels.composite import Fingerprint as CompositeFingerprint
from ms_syncbn.kernels.composite import Guard as CompositeGuard, UpdateStats as CompositeUpdateStats
from ms_syncbn.kernels.cpu import cpu_kernels, cpu_library_path
from ms_syncbn.sync_function import RESHIFT_MEAN_TOLERANCE, RESHIFT_RATIO, SyncBatchNormFunction

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
def local_stats_ref(x, shift):
    """-> [sum(x-K) | sum((x-K)^2) | n*K | n] and the per-channel sums of |terms|."""
    d = x - channel_view(shift, x.ndim)
    axes = reduce_axes(x.ndim)
    count = x.size // x.shape[1] if x.size else 0
    ref = np.concatenate([d.sum(axis=axes), (d * d).sum(axis=axes), count * shift, [count]])
    scale = np.concatenate([np.abs(d).sum(axis=axes), (d * d).sum(axis=axes),
                            np.abs(count * shift), [count]])
    return ref, scale


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


# ------------------------------------------------------------ local_stats --
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", WORKING_SHAPES, ids=str)
def test_local_stats(kernels, shape, dtype):
    rng = np.random.default_rng(seed(shape, dtype))
    x, x64 = make_input(rng, shape, dtype, loc=0.7, scale=1.3)
    shift, shift64 = f32(rng.normal(0.5, 0.5, shape[1]))
    out = kernels.local_stats(x, shift)
    ref, scale = local_stats_ref(x64, shift64)
    assert out.shape == (3 * shape[1] + 1,)
    assert_sums_close(out, ref, scale, dtype, "local_stats")


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_local_stats_large_mean_shift_near_mean(kernels, dtype):
    """Data far from 0 with a shift near the mean: the shifted sums give the variance to float32
    precision (plain sums of x and x^2 would lose it all)."""
    rng = np.random.default_rng(7)
    loc = 1000.0 if dtype == "float16" else 1.0e4
    x, x64 = make_input(rng, (16, 3, 9, 11), dtype, loc=loc, scale=1.0)
    true_mean = x64.mean(axis=(0, 2, 3))
    true_var = x64.var(axis=(0, 2, 3))
    shift, shift64 = f32(true_mean + rng.normal(0.0, 0.3, 3))
    out = kernels.local_stats(x, shift).asnumpy().astype(np.float64)
    channels = 3
    s1, s2, nk, n = out[:channels], out[channels:2 * channels], out[2 * channels:3 * channels], out[-1]
    ref, scale = local_stats_ref(x64, shift64)
    assert_sums_close(ms.Tensor(out.astype(np.float32)), ref, scale, dtype, "local_stats large mean")
    var = s2 / n - (s1 / n) ** 2
    np.testing.assert_allclose(var, true_var, rtol=2e-5)
    np.testing.assert_allclose(nk / n + s1 / n, true_mean, rtol=1e-6)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_local_stats_empty_batch_is_all_zeros(kernels, shape, dtype):
    x = ms.Tensor(np.zeros(shape, np.float32)).astype(DTYPES[dtype])
    shift, _ = f32(np.arange(1, shape[1] + 1))
    out = kernels.local_stats(x, shift).asnumpy()
    np.testing.assert_array_equal(out, np.zeros(3 * shape[1] + 1, np.float32))


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
    """The four kernels chained as in a training step, compiled as one graph."""

    def __init__(self, table):
        super().__init__()
        self.local_stats = table.local_stats
        self.normalize = table.normalize
        self.backward_reduce = table.backward_reduce
        self.backward_elemt = table.backward_elemt

    def construct(self, x, dy, shift, mean, invstd, weight, bias, count):
        stats = self.local_stats(x, shift)
        y = self.normalize(x, mean, invstd, weight, bias)
        sum_dy, sum_dy_xmu, _, _ = self.backward_reduce(dy, x, mean, invstd)
        dx = self.backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count)
        return stats, y, ops.cat((sum_dy, sum_dy_xmu)), dx


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernels_in_graph_mode(kernels, dtype):
    rng = np.random.default_rng(29)
    shape = (5, 6, 3, 7)
    x, x64 = make_input(rng, shape, dtype, loc=2.0)
    dy, dy64 = make_input(rng, shape, dtype)
    shift, shift64 = f32(rng.normal(2.0, 0.3, 6))
    (mean, mean64), (invstd, invstd64), (weight, weight64), (bias, bias64) = channel_params(rng, 6)
    count, count64 = f32([x64.size // 6])
    previous_mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        stats, y, sums, dx = AllKernels(kernels)(x, dy, shift, mean, invstd, weight, bias, count)
    finally:
        ms.set_context(mode=previous_mode)
    ref, scale = local_stats_ref(x64, shift64)
    assert_sums_close(stats, ref, scale, dtype, "graph local_stats")
    ref, scale = normalize_ref(x64, mean64, invstd64, weight64, bias64)
    assert_close(to_f64(y), ref, scale, dtype, ELEM_RTOL, "graph normalize")
    ref_sums, scale = backward_reduce_ref(dy64, x64, mean64)
    assert_sums_close(sums, ref_sums, scale, dtype, "graph backward_reduce")
    sums_used = sums.asnumpy().astype(np.float64)  # what backward_elemt received
    ref, scale = backward_elemt_ref(dy64, x64, mean64, invstd64, weight64, sums_used, count64)
    assert_close(to_f64(dx), ref, scale, dtype, ELEM_RTOL, "graph backward_elemt")


class PerChannelKernels(nn.Cell):
    """The per-channel kernels of a training step chained as the callers chain them (backward
    reduce -> elemt; finalize -> update; fingerprint -> check_pairing; guard)."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.group_size = ms.Tensor([2.0], ms.float32)
        self.mispaired = ms.Tensor([GUARD_MISPAIRED], ms.float32)
        self.no_code = ms.Tensor([0.0], ms.float32)

    def construct(self, dy, x, mean, invstd, weight, count, sums, params, shift, modulus, text):
        sum_dy, sum_dy_xmu, grad_weight, grad_bias = self.table.backward_reduce(dy, x, mean, invstd)
        dx = self.table.backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count)
        g_mean, g_invstd, g_var, code, g_count, reshift, increment = self.table.finalize_stats(sums, params)
        state = self.table.update_stats(g_mean, g_var, shift, shift, shift, ops.ones_like(count) * 0.5)
        tag = self.table.fingerprint(g_invstd, modulus)
        paired = self.table.check_pairing(grad_weight, tag * self.group_size, tag, self.group_size,
                                          self.mispaired, text)
        guarded = self.table.guard(grad_bias, self.no_code, text)
        return (sum_dy, sum_dy_xmu, dx, paired, guarded, g_var, code, increment, tag) + state


def test_per_channel_kernels_in_a_graph_compiled_for_dynamic_shapes(kernels):
    """Each kernel's C++ shape function (one shape per output for the multi-output ones) at
    compile time with unknown dimensions and again at run time, for two widths in one graph."""
    net = PerChannelKernels(kernels)
    dynamic = lambda *shape: ms.Tensor(shape=shape, dtype=ms.float32)
    previous_mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        net.set_inputs(dynamic(None, None, None), dynamic(None, None, None), dynamic(None),
                       dynamic(None), dynamic(None), dynamic(1), dynamic(None), dynamic(6),
                       dynamic(None), dynamic(1), dynamic(None))
        for rows, channels in [(4, 3), (7, 5)]:
            rng = np.random.default_rng(rows)
            args, args64 = elemt_inputs(rng, (rows, channels, 6), "float32")
            dy, x, mean, invstd, weight, _, count = args
            shift, shift64 = f32(rng.normal(0.5, 0.1, channels))
            sums, full = group_sums(rng, channels, (2, 3), 0.5, shift64)
            params = ms.Tensor(np.array(FINALIZE_PARAMS, np.float32))
            outs = net(dy, x, mean, invstd, weight, count, ms.Tensor(sums), params, shift,
                       ms.Tensor([8191.0], ms.float32), ms.Tensor(guard_text("layer")))
            assert [o.shape for o in outs] == [(channels,)] * 2 + [(rows, channels, 6)] + \
                [(channels,)] * 3 + [(1,)] * 3 + [(channels,)] * 3
            group = outs[0].asnumpy().astype(np.float64), outs[1].asnumpy().astype(np.float64)
            ref, scale = backward_reduce_ref(args64[0], args64[1], args64[2])
            assert_sums_close(ops.cat(outs[:2]), ref, scale, "float32", "dynamic backward_reduce")
            ref, scale = backward_elemt_ref(*args64[:5], np.concatenate(group), args64[6])
            assert_close(to_f64(outs[2]), ref, scale, "float32", ELEM_RTOL, "dynamic backward_elemt")
            np.testing.assert_array_equal(outs[4].asnumpy(), outs[0].asnumpy())  # grad_bias = sum_dy
            np.testing.assert_allclose(outs[5].asnumpy(), full.var(axis=(0, 2), ddof=1), rtol=1e-5)
            np.testing.assert_array_equal(np.concatenate([o.asnumpy() for o in outs[6:8]]), [0.0, 1.0])
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
    stats = np.zeros(3 * C + 1, np.float32); call("LocalStats", [x, shift, stats], [e[0], e[1], e[1]])
    y = np.empty_like(x); call("Normalize", [x, mean, invstd, weight, bias, y], [e[0]] + [e[1]] * 4 + [e[0]])
    red = [np.full(C, np.nan, np.float32) for _ in range(4)]
    call("BackwardReduce", [dy, x, mean, invstd] + red, [e[0], e[0]] + [e[1]] * 6)
    dx = np.empty_like(x)
    call("BackwardElemt", [dy, x, mean, invstd, weight, sums[:C].copy(), sums[C:].copy(), count, dx],
         [e[0], e[0]] + [e[1]] * 6 + [e[0]])
    outputs.update({key + ".stats": stats, key + ".y": y, key + ".dx": dx,
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
                "shift": rng.normal(0.5, 0.3, channels), "mean": rng.normal(0.5, 0.3, channels),
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
        ref, scale = local_stats_ref(x64, p["shift"])
        assert_sums_close(ms.Tensor(out[key + ".stats"]), ref, scale, dtype, what + " local_stats")
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
def test_collective_payload_is_3c_plus_2_then_2c_plus_1_whatever_the_world_size(kernels, world_size,
                                                                           channels):
    """One training step of the shared algorithm: exactly one all-reduce of (3C+2,) float32 in
    forward and one of (2C+1,) float32 in backward; the statistics equal the single-rank ones."""
    rng = np.random.default_rng(world_size * 100 + channels)
    x64 = rng.normal(0.5, 1.2, (4, channels, 3, 5))
    x = ms.Tensor(x64.astype(np.float32))
    x64 = x64.astype(np.float32).astype(np.float64)
    dy = ms.Tensor(rng.normal(size=x64.shape).astype(np.float32))
    weight = ms.Tensor(rng.normal(1.0, 0.3, channels).astype(np.float32))
    bias = ms.Tensor(rng.normal(0.0, 0.3, channels).astype(np.float32))
    # Shift at the batch mean: the steady state, where no re-centring pass is needed.
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
    # [shifted sums (3C+1) | num_features check (1)] forward, [grad sums (2C) | layer tag (1)]
    # backward: the two check slots turn mismatched layers into errors.
    assert recorder.payloads == [((3 * channels + 2,), ms.float32), ((2 * channels + 1,), ms.float32)]
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
    assert kernels.local_stats(x, shift).shape == (3 * channels + 1,)
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

@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_guard_passes_values_through_on_code_zero(kernels, mode):
    class Guarded(nn.Cell):
        def __init__(self):
            super().__init__()
            self.guard = kernels.guard

        def construct(self, values, code, text):
            return self.guard(values, code, text) * 2.0

    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    try:
        values = np.random.default_rng(7).normal(size=11).astype(np.float32)
        out = Guarded()(ms.Tensor(values), ms.Tensor(np.zeros(1, np.float32)),
                        ms.Tensor(guard_text("layer")))
        np.testing.assert_array_equal(out.asnumpy(), values * 2.0)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.mark.parametrize("code", GUARD_CODES)
def test_guard_raises_naming_the_layer_and_saying_what_the_code_means(kernels, code, capfd):
    values = ms.Tensor(np.ones(3, np.float32))
    text = guard_text("'net.block.bn' SyncBatchNorm(num_features=3)")
    with pytest.raises(RuntimeError) as info:
        kernels.guard(values, ms.Tensor(np.array([code], np.float32)), ms.Tensor(text)).asnumpy()
    message = (f"ms_syncbn SyncBatchNorm error {int(code)} in layer "
               f"'net.block.bn' SyncBatchNorm(num_features=3): {GUARD_MEANINGS[code]}.")
    assert message in str(info.value), str(info.value)
    assert message in capfd.readouterr().err


@pytest.mark.parametrize("code", GUARD_CODES)
def test_guard_message_is_the_text_the_cpu_guard_raises(code):
    """Errors raised later, in Python, for a step the Ascend guard poisoned (guard_message,
    ms_syncbn.guard_check) read exactly as the CPU kernel's."""
    where = "'net.block.bn' SyncBatchNorm(num_features=3) on process group 'g' of 2 ranks"
    text = guard_text(where)
    with pytest.raises(RuntimeError) as info:
        cpu_kernels().guard(ms.Tensor(np.ones(3, np.float32)), ms.Tensor(np.array([code], np.float32)),
                            ms.Tensor(text)).asnumpy()
    raised = str(info.value)
    message = guard_message(code, where)
    assert message.startswith(f"ms_syncbn SyncBatchNorm error {int(code)} in layer {where}: ")
    assert message in raised, (message, raised)


def test_guard_without_text_gives_the_code_and_where_its_meaning_is(kernels):
    with pytest.raises(RuntimeError, match=r"SyncBatchNorm error 4: see ms_syncbn\.kernels\.GUARD_MEANINGS"):
        kernels.guard(ms.Tensor(np.ones(3, np.float32)),
                      ms.Tensor(np.array([GUARD_MISPAIRED], np.float32)),
                      ms.Tensor(np.zeros(0, np.float32))).asnumpy()


def test_guard_text_entries_are_the_layer_then_the_meanings_by_code():
    entries = guard_text("layer").astype(np.uint8).tobytes().decode().split("\0")
    assert entries[0] == "layer"
    for code, meaning in GUARD_MEANINGS.items():
        assert entries[int(code)] == meaning


def test_guard_rejects_a_malformed_call(kernels):
    with pytest.raises(RuntimeError, match=r"error 1: malformed call of the Guard kernel"):
        kernels.guard(ms.Tensor(np.ones((2, 2), np.float32)),
                      ms.Tensor(np.zeros(1, np.float32)), ms.Tensor(np.zeros(0, np.float32))).asnumpy()


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_composite_guard_poisons_instead_of_branching(mode):
    """The Ascend table's guard: values through on code 0, NaN on any error code, no branch."""
    guard = CompositeGuard()
    values = ms.Tensor(np.arange(4, dtype=np.float32))
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    try:
        text = ms.Tensor(guard_text("layer"))
        np.testing.assert_array_equal(guard(values, ms.Tensor(np.zeros(1, np.float32)), text).asnumpy(),
                                      np.arange(4, dtype=np.float32))
        for code in GUARD_CODES:
            out = guard(values, ms.Tensor(np.array([code], np.float32)), text).asnumpy()
            assert out.shape == (4,) and np.isnan(out).all(), (code, out)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


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


# ----------------------------------------------------------------------- finalize_stats --

FINALIZE_PARAMS = (2.0, 1e-5, RESHIFT_RATIO, RESHIFT_MEAN_TOLERANCE, GUARD_CHANNELS_DIFFER,
                   GUARD_SINGLE_VALUE)  # group of 2 ranks


def finalized(finalize, sums, params):
    """finalize_stats' seven outputs packed as (3C+4,) [mean | invstd | var | code | count |
    needs reshift | increment]."""
    outs = finalize(ms.Tensor(np.asarray(sums, np.float32)), ms.Tensor(np.array(params, np.float32)))
    channels = (len(sums) - 2) // 3
    assert [o.shape for o in outs] == [(channels,)] * 3 + [(1,)] * 4
    assert {o.dtype for o in outs} == {ms.float32}
    return np.concatenate([o.asnumpy() for o in outs])


def group_sums(rng, channels, ranks_rows, loc, shift):
    """The all-reduced (3C+2,) sums of ranks holding `ranks_rows` rows each, and the float64 data."""
    data = [rng.normal(loc, 2.0, (rows, channels, 4)).astype(np.float32).astype(np.float64)
            for rows in ranks_rows]
    full = np.concatenate(data, axis=0)
    d = full - shift[None, :, None]
    n = full.size // channels
    sums = np.concatenate([d.sum(axis=(0, 2)), (d * d).sum(axis=(0, 2)), n * shift,
                           [n, channels * len(ranks_rows)]])
    return sums.astype(np.float32), full


@pytest.mark.parametrize("implementation", ["cpu_kernel", "composite"])
@pytest.mark.parametrize("loc, shift_offset, expect_reshift", [(0.5, 0.1, 0.0), (3.0, -40.0, 1.0)])
def test_finalize_stats(kernels, implementation, loc, shift_offset, expect_reshift):
    rng = np.random.default_rng(41)
    channels = 5
    shift = np.full(channels, loc + shift_offset).astype(np.float32).astype(np.float64)
    sums, full = group_sums(rng, channels, (3, 6), loc, shift)
    finalize = kernels.finalize_stats if implementation == "cpu_kernel" else CompositeFinalizeStats()
    out = finalized(finalize, sums, FINALIZE_PARAMS)
    assert out.shape == (3 * channels + 4,) and out.dtype == np.float32
    count = full.size // channels
    mean, var = full.mean(axis=(0, 2)), full.var(axis=(0, 2))
    np.testing.assert_allclose(out[:channels], mean, rtol=1e-6, atol=1e-6)
    if not expect_reshift:  # a trusted variance: the shift is near the mean
        # the unbiased variance (Bessel) for the running statistics; invstd from the biased one
        np.testing.assert_allclose(out[2 * channels:3 * channels], full.var(axis=(0, 2), ddof=1),
                                   rtol=1e-5)
        np.testing.assert_allclose(out[channels:2 * channels], 1 / np.sqrt(var + 1e-5), rtol=1e-5)
    else:
        assert np.isfinite(out[2 * channels:3 * channels]).all()
    # code 0, the count, the reshift flag, the step counts
    np.testing.assert_array_equal(out[3 * channels:], [0.0, count, expect_reshift, 1.0])


@pytest.mark.parametrize("implementation", ["cpu_kernel", "composite"])
def test_finalize_stats_edge_cases(kernels, implementation):
    finalize = kernels.finalize_stats if implementation == "cpu_kernel" else CompositeFinalizeStats()
    # Layout for C = 2: mean [0:2], invstd [2:4], var [4:6], code 6, count 7, reshift 8, increment 9.
    # Empty group: mean 0, var NaN (no unbiased variance), count 0, nothing to re-centre, no code,
    # and the step does not count.
    empty = np.zeros(3 * 2 + 2, np.float32)
    empty[-1] = 4.0  # 2 channels x 2 ranks
    out = finalized(finalize, empty, FINALIZE_PARAMS)
    np.testing.assert_array_equal(out[:2], [0, 0])
    np.testing.assert_allclose(out[2:4], 1 / np.sqrt(1e-5), rtol=1e-6)
    assert np.isnan(out[4:6]).all()
    np.testing.assert_array_equal(out[6:], [0, 0, 0, 0])
    # The ranks disagree on num_features: their code, var NaN, never a re-centring pass, no count.
    rng = np.random.default_rng(3)
    sums, _ = group_sums(rng, 2, (2, 2), 100.0, np.zeros(2))  # K = 0 far from the mean
    sums[-1] = 5.0
    out = finalized(finalize, sums, FINALIZE_PARAMS)
    assert out[6] == GUARD_CHANNELS_DIFFER and out[8] == 0.0 and out[9] == 0.0
    assert np.isnan(out[4:6]).all()
    sums[-2] = 1.0  # ... whatever the count says
    out = finalized(finalize, sums, FINALIZE_PARAMS)
    assert out[6] == GUARD_CHANNELS_DIFFER and out[9] == 0.0 and np.isnan(out[4:6]).all()
    # One value per channel in the group's batch: its code, var NaN, the step does not count.
    sums[-1] = 4.0
    out = finalized(finalize, sums, FINALIZE_PARAMS)
    assert out[6] == GUARD_SINGLE_VALUE and out[7] == 1.0 and out[9] == 0.0
    assert np.isnan(out[4:6]).all()
    # Two values per channel: the smallest group with an unbiased variance.
    x = np.array([[1.0, -3.0], [4.0, 5.0]])  # (N = 2, C = 2)
    two = np.concatenate([x.sum(0), (x * x).sum(0), [0.0, 0.0], [2.0, 4.0]]).astype(np.float32)
    out = finalized(finalize, two, FINALIZE_PARAMS)
    np.testing.assert_allclose(out[4:6], x.var(axis=0, ddof=1), rtol=1e-6)  # [4.5, 32]
    np.testing.assert_array_equal(out[6:], [0, 2, 0, 1])
    # A NaN channel stays NaN (var too) and does not make the other channels re-centre.
    sums, full = group_sums(rng, 2, (2, 2), 0.5, np.full(2, 0.5))
    sums[0] = np.nan
    out = finalized(finalize, sums, FINALIZE_PARAMS)
    assert np.isnan(out[0]) and np.isnan(out[4]) and out[8] == 0.0 and out[6] == 0.0
    np.testing.assert_allclose(out[5], full[:, 1].var(ddof=1), rtol=1e-5)
    assert out[9] == 1.0
    # An overflowing channel: var NaN there only.
    sums, full = group_sums(rng, 2, (2, 2), 0.5, np.full(2, 0.5))
    sums[3] = np.inf  # S2 of channel 1
    out = finalized(finalize, sums, FINALIZE_PARAMS)
    assert np.isnan(out[5]) and out[9] == 1.0
    np.testing.assert_allclose(out[4], full[:, 0].var(ddof=1), rtol=1e-5)


def test_finalize_stats_cpu_kernel_and_composite_agree(kernels):
    """The two forms give the same statistics (to float32 roundings: the kernel works in double,
    the composite in float32) and the same code, count, flags and NaN channels."""
    rng = np.random.default_rng(59)
    composite = CompositeFinalizeStats()
    for trial in range(24):
        channels = int(rng.integers(1, 40))
        ranks_rows = tuple(int(r) for r in rng.integers(0, 5, int(rng.integers(1, 4))))
        loc = float(rng.normal(0.0, 5.0))
        shift = (loc + rng.normal(0.0, 0.5, channels)).astype(np.float32).astype(np.float64)
        sums, _ = group_sums(rng, channels, ranks_rows, loc, shift)
        if trial % 4 == 1:
            sums[int(rng.integers(0, 2 * channels))] = np.nan
        if trial % 4 == 2:
            sums[-1] += 1.0  # the ranks disagree on num_features
        params = (float(len(ranks_rows)),) + FINALIZE_PARAMS[1:]
        got = finalized(kernels.finalize_stats, sums, params)
        want = finalized(composite, sums, params)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=str(trial))
        np.testing.assert_allclose(got[:3 * channels], want[:3 * channels], rtol=2e-5, atol=1e-5,
                                   err_msg=str(trial))
        np.testing.assert_array_equal(got[3 * channels:], want[3 * channels:], err_msg=str(trial))


def test_finalize_stats_rejects_a_malformed_call(kernels):
    with pytest.raises(RuntimeError, match=r"is 1\b"):  # 3C+1 sums: the channel slot is missing
        kernels.finalize_stats(ms.Tensor(np.ones(7, np.float32)),
                               ms.Tensor(np.array(FINALIZE_PARAMS, np.float32)))[0].asnumpy()


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
