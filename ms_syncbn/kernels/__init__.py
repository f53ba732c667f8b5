"""Kernel tables: the four batch-norm kernels, one table per backend.

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
==================  =========================================================  ==================

Sums are over the local batch; kernels never communicate. An entry is a
primitive or a Cell, so it can be called from ``construct`` in PyNative and in
graph mode.
"""
from typing import Any, NamedTuple


class BatchNormKernels(NamedTuple):
    """One backend's implementation of the four kernel contracts above."""

    backend: str
    local_stats: Any
    normalize: Any
    backward_reduce: Any
    backward_elemt: Any


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
