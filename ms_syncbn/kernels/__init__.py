"""Kernel tables: the batch-norm kernels, one table per backend.

Every table implements the same contracts (shapes for an input x of shape
(N, C, *), per-channel tensors float32):

==================  =========================================================  ==================
kernel              inputs                                                     outputs
==================  =========================================================  ==================
local_moments       x, shift (C,): a hint, near the mean                       mean_i, var_i (C,)
normalize           x, mean, invstd, weight, bias                              y, dtype of x
combine_moments     reduced (C+5,): the first payload summed over the group,   m2_part, mean (C,),
                    [sum n_i m_i (C) | N | N - 1 | checks (3)];                count, count - 1,
                    local mean_i, var_i (C,); n_i (1,); expected (3,),         code, increment
                    if_equal (3, 3), if_unequal (3, 3); text (T,)              (1,)
finalize_moments    m2 (C,): m2_part summed over the group; count (1,),        invstd, var
                    count - 1 (1,), eps (1,)                                   (unbiased) (C,)
update_stats        mean, var (unbiased) (C,), shift, running_mean,            shift', running_mean',
                    running_var (C,), factor (1,)                              running_var' (C,)
backward_reduce     dy, x, mean, invstd                                        sum(dy),
                                                                               sum(dy*(x-mean)),
                                                                               grad_weight, grad_bias
                                                                               (C,)
backward_elemt      dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu (C,),      dx, dtype of x
                    count (1,)
fingerprint         invstd (C,), modulus (1,)                                  (1,): an integer
                                                                               in [0, modulus)
check_pairing       values (M,), reduced_tag (1,), tag (1,), group_size (1,),  values, or the step
                    code (1,), text (T,)                                       stops (see below)
==================  =========================================================  ==================

Sums are over the local batch; kernels never communicate: the all-reduces between them are
``SyncBatchNormFunction``'s (ms_syncbn/sync_function.py states the protocol). backward_reduce's
weight and bias gradients (sum(dy*(x-mean)) * invstd and sum(dy)) are the local ones: data
parallelism sums them over the ranks. Per-channel results are separate tensors, not one packed
buffer: a native kernel gives them so, and packing then slicing them again would cost kernels
on a table of composites. An entry is a primitive or a Cell, so it can be called from
``construct`` in PyNative and in graph mode.

``local_moments`` gives the local mean and biased variance var_i = sum((x - mean_i)^2) / n_i
(n_i = x.size / C, static), zeros for an empty batch, as exact as two passes around the mean
whatever the mean's magnitude. ``shift`` is a hint that a one-pass kernel may centre its
sums on (the layer's previous group mean: ``LocalMoments`` in ops/cpu/syncbn_cpu.cc, which
re-centres inside the kernel where the hint is far off); a table whose statistics kernel
centres on the local mean by itself (Ascend's BatchNormStats) ignores it and says so with
``reads_shift=False``, and the layer then does not keep the hint up to date.

``combine_moments`` is the step between the protocol's two all-reduces and
``finalize_moments`` the step after them (``CombineMoments`` and ``FinalizeMoments`` in
ops/cpu/syncbn_cpu.cc state the arithmetic; ``kernels.composite`` has the same in operators).
The checks' verdict is the caller's tables: for row r, the minimum over k of
``if_equal[r][k]`` where checks[k] == expected[k], else ``if_unequal[r][k]``, gives
[q, -code, increment]; q = -inf (a stopped step, or an empty group) poisons m2_part, so the
variance, invstd, y, the gradients and the unbiased variance are non-finite. A code other
than 0 stops the step there, before the second all-reduce: the CPU kernel raises a
RuntimeError with ``text`` (the layer and :data:`GUARD_MEANINGS`, :func:`guard_text`), also
written to stderr; the composite cannot fail on a value without a branch (on Ascend a branch
needs the code on the host), so the poison is the stop and the layer keeps the code for a
later, named error (ms_syncbn.guard_check).

``update_stats`` gives the layer's state after a training step in one call (``UpdateStats``
in ops/cpu/syncbn_cpu.cc). The ``var`` it takes is the group's unbiased variance, non-finite
on every channel of a step that must not change the state (a stopped step, fewer than 2
values per channel) and on a channel whose statistics are not finite: it moves a channel
exactly where ``var`` is finite, by lerp(a, b, w) = a + w * (b - a) in float32.

``fingerprint`` hashes a layer application's group invstd (identical on every
rank) to a small integer, which the backward payload carries to catch two layers'
collectives paired with each other; ``Fingerprint`` in ops/cpu/syncbn_cpu.cc states the
arithmetic, with the constants :data:`FINGERPRINT_SCALE` and :data:`FINGERPRINT_WRAP`.
``check_pairing`` checks it after the all-reduce: when ``reduced_tag`` != ``tag`` *
``group_size`` (float32 product, exact for these integers), the step stops with error
``code`` (the caller passes :data:`GUARD_MISPAIRED`) as ``combine_moments`` stops for its
codes (CPU: a RuntimeError naming the layer; Ascend, ``kernels.composite.CheckPairing``:
NaN values); otherwise ``values`` pass through.
"""
from typing import Any, NamedTuple

import numpy as np


# Error codes that stop a step (guard codes); GUARD_MEANINGS is the one statement of what they mean.
# Of two forward codes the larger is the one to report (ranks that disagree on num_features
# make the batch size meaningless too), so a ReduceMax picks it.
GUARD_MALFORMED = 1.0  # a kernel that can stop a step was called with malformed arguments
GUARD_SINGLE_VALUE = 2.0  # the group's batch holds 1 value per channel in training
GUARD_CHANNELS_DIFFER = 3.0  # the ranks of the process group disagree on num_features
GUARD_MISPAIRED = 4.0  # a backward all-reduce was paired with another layer's
GUARD_CODES = (GUARD_SINGLE_VALUE, GUARD_CHANNELS_DIFFER, GUARD_MISPAIRED)

# The fingerprint's hash (the contract of the ``fingerprint`` kernel): the bits of each
# statistic that enter it are value * 2**12 modulo 2**14, summed over the C values of invstd
# and taken modulo the modulus.
FINGERPRINT_SCALE = 2.0 ** 12
FINGERPRINT_WRAP = 2.0 ** 14

# code -> which check stopped the step, what it saw, and the causes that fit.
GUARD_MEANINGS = {
    GUARD_MALFORMED: "internal check: a kernel that checks the step was called with malformed arguments "
                     "(an ms_syncbn bug; please report it)",
    GUARD_CHANNELS_DIFFER: (
        "forward num_features check: the all-reduced channel counts show that the ranks' layers "
        "in this collective disagree on num_features, so the group statistics are meaningless. "
        "Causes that fit: the ranks built this layer with different num_features (different "
        "models), or the ranks called their SyncBatchNorm layers in different orders, so that "
        "layers of different widths met in one all-reduce"),
    GUARD_SINGLE_VALUE: (
        "forward batch-size check: the batch of the whole process group holds 1 value per "
        "channel in training, so the batch variance is undefined. Causes that fit: every rank's "
        "batch is empty but one, which holds a single sample with no spatial extent; use "
        "eval mode or a larger batch for this step"),
    GUARD_MISPAIRED: (
        "backward layer-identity check: this layer's backward all-reduce was paired with a "
        "different layer application on some rank (the layer fingerprints, computed from the "
        "step's group statistics, do not match), and its gradients would be wrong. Causes that "
        "fit: the ranks ran the backward passes of their layers in different orders (a "
        "compiled graph issued the collectives of parallel branches in different orders), or "
        "some rank skipped this layer's backward or ran a different model. Not a cause: "
        "layers that some rank built but did not call, or built in another order"),
}


def guard_text(where: str) -> np.ndarray:
    """The text part of a guard code for a layer described by `where`, as float32 (T,).

    UTF-8 bytes, one per element, of NUL-separated entries: entry 0 is `where`, entry k the
    meaning of code k (:data:`GUARD_MEANINGS`; empty where k is not a code).
    """
    entries = [where] + [GUARD_MEANINGS.get(float(k), "") for k in range(1, int(max(GUARD_MEANINGS)) + 1)]
    data = "\0".join(entry.replace("\0", " ") for entry in entries).encode("utf-8")
    return np.frombuffer(data, np.uint8).astype(np.float32)


def guard_message(code: float, where: str) -> str:
    """The error of guard code `code` for the layer described by `where`: the text the CPU
    ``CombineMoments`` and ``CheckPairing`` kernels raise (ops/cpu/syncbn_cpu.cc), for errors
    raised later, in Python (ms_syncbn.guard_check)."""
    k = int(code) if 1.0 <= code < 1000.0 else 1
    meaning = GUARD_MEANINGS.get(float(k), "see ms_syncbn.kernels.GUARD_MEANINGS")
    place = f" in layer {where}" if where else ""
    return f"ms_syncbn SyncBatchNorm error {k}{place}: {meaning}."


class BatchNormKernels(NamedTuple):
    """One backend's implementation of the kernel contracts above."""

    backend: str
    local_moments: Any
    normalize: Any
    combine_moments: Any
    finalize_moments: Any
    update_stats: Any
    backward_reduce: Any
    backward_elemt: Any
    fingerprint: Any
    check_pairing: Any
    reads_shift: bool  # whether local_moments reads its shift hint (see the module docstring)


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
