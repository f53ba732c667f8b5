"""Kernel tables: the batch-norm kernels, one table per backend.

Every table implements the same contracts (shapes for an input x of shape
(N, C, *), per-channel tensors float32):

==================  =========================================================  ==================
kernel              inputs                                                     output
==================  =========================================================  ==================
local_stats         x, shift (C,)                                              (3C+1,) float32:
                                                                               [sum(x-K), sum((x-K)^2), n*K, n]
normalize           x, mean, invstd, weight, bias                              y, dtype of x
backward_reduce     dy, x, mean                                                (2C,) float32:
                                                                               [sum(dy), sum(dy*(x-mean))]
backward_elemt      dy, x, mean, invstd, weight, sums (2C,), count (1,)        dx, dtype of x
finalize_stats      sums (3C+2,): [sum(x-K), sum((x-K)^2), n*K, n, C] summed   (3C+3,) float32:
                    over the group; params (4,): [group size, eps,             [mean | invstd | var |
                    reshift ratio, mean tolerance]                             channels differ | count |
                                                                               needs reshift]
update_stats        mean, var (C,), count (1,), kept (1,), shift,              (3C+1,) float32:
                    running_mean, running_var (C,), factor (1,)                [shift' | running_mean' |
                                                                               running_var' | updated]
guard               values (M,) float32, code (1,) float32                     values, or the step
                                                                               stops (see below)
local_moments       x                                                          (2C+1,) float32:
(optional)                                                                     [mean_i | m2_i | n_i]
==================  =========================================================  ==================

Sums are over the local batch; kernels never communicate. An entry is a
primitive or a Cell, so it can be called from ``construct`` in PyNative and in
graph mode.

``finalize_stats`` turns the group's sums into its statistics and
``update_stats`` gives the layer's state after a training step, each in one call
(``FinalizeStats`` and ``UpdateStats`` in ops/cpu/syncbn_cpu.cc state the arithmetic). ``guard`` lets
a compiled graph stop without a branch: code 0 passes `values` through; any
code of :data:`GUARD_CODES` stops the step. The CPU kernel raises a RuntimeError
carrying the code and writes its meaning to stderr; the Ascend composite
(``kernels.composite.Guard``) returns NaN, which the layer routes into the
step's outputs and gradients.

``local_moments`` (mean_i and m2_i = sum((x - mean_i)^2) over the local batch,
n_i its number of values per channel; zeros for an empty batch) is given by
tables whose native statistics kernel centres on the local mean (Ascend's
BatchNormStats). With it, ``SyncBatchNormFunction`` combines the ranks' moments
in two small all-reduces and never branches; without it (CPU), it uses
``local_stats``' shifted sums in one all-reduce and a rare re-centring pass.
"""
from typing import Any, NamedTuple


# Error codes of the guard kernel (ops/cpu/syncbn_cpu.cc, Guard, holds the same meanings).
GUARD_CHANNELS_DIFFER = 2.0  # the ranks of the process group disagree on num_features
GUARD_SINGLE_VALUE = 3.0  # the group's batch holds 1 value per channel in training
GUARD_MISPAIRED = 4.0  # a backward all-reduce was paired with another layer's
GUARD_CODES = (GUARD_CHANNELS_DIFFER, GUARD_SINGLE_VALUE, GUARD_MISPAIRED)


class BatchNormKernels(NamedTuple):
    """One backend's implementation of the four kernel contracts above."""

    backend: str
    local_stats: Any
    normalize: Any
    backward_reduce: Any
    backward_elemt: Any
    finalize_stats: Any
    update_stats: Any
    guard: Any
    local_moments: Any = None  # optional: see the module docstring


def kernels_for(device_target: str) -> BatchNormKernels:
    """The kernel table for ``device_target`` ("CPU" or "Ascend").

    Raises:
        RuntimeError: If the target has no kernels, or its kernels are not built.
    """
    if device_target == "CPU":
        from ms_syncbn.kernels.cpu import cpu_kernels
        return cpu_kernels()
    if device_target == "Ascend":
        from ms_syncbn.kernels.ascend import ascend_kernels
        return ascend_kernels()
    raise RuntimeError(f"ms_syncbn has no kernels for device_target {device_target!r}; "
                       f"supported targets are 'CPU' and 'Ascend'.")
