"""Pytest-side expectations for the core tests: what tests/reference.py says a run must give.

Not a worker (nothing here imports MindSpore): the single-process and the msrun
tests both turn a sequence of full batches into expected outputs, gradients and
running statistics with these functions, and compare with ``assert_close``.
"""
import numpy as np

from tests import reference


def assert_close(actual, expected, tol, what, scale=None):
    """|actual - expected| <= tol * (|expected| + scale), elementwise; shapes must match.

    ``scale`` (default max|expected|) makes the tolerance relative to the size of the
    result, so entries near zero of an O(1) result are held to the same absolute
    error as the rest; pass the size of the terms when the result is a cancellation.
    """
    expected = np.asarray(expected, np.float64)
    assert actual is not None, f"{what}: missing"
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape, \
        f"{what}: shape {actual.shape} != expected {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values {actual}"
    if expected.size == 0:
        return
    if scale is None:
        scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * max(scale, 1e-30),
                               err_msg=what)


def frozen_stats_step(x, dy, weight, bias, eps, mean, var):
    """Output and gradients of sum(y * dy) for y normalized with given (constant) statistics."""
    dx, dweight, dbias = reference.frozen_backward(x, dy, weight, eps, mean, var)
    return {"y": reference.forward(x, weight, bias, eps, mean, var), "dx": dx,
            "dweight": dweight, "dbias": dbias}


def batch_stats_step(x, dy, weight, bias, eps):
    """Output and gradients of sum(y * dy) for training-mode batch norm over the batch x."""
    dx, dweight, dbias = reference.backward(x, dy, weight, eps)
    return {"y": reference.forward(x, weight, bias, eps), "dx": dx, "dweight": dweight,
            "dbias": dbias}


def expected_training(batches, upstreams, weight, bias, eps, momentum, track_running_stats):
    """Expected result of each training step on the full (group) batches, in float64.

    Returns one dict per step: y, dx, dweight, dbias on the full batch, and the running
    statistics after the step (None when not tracked). A step with an empty batch
    changes no running statistic and does not count as a tracked batch.
    """
    channels = np.asarray(batches[0]).shape[1]
    running_mean, running_var, tracked = np.zeros(channels), np.ones(channels), 0
    steps = []
    for x, dy in zip(batches, upstreams):
        step = batch_stats_step(x, dy, weight, bias, eps)
        if track_running_stats:
            if np.asarray(x).size > 0:
                tracked += 1
                running_mean, running_var = reference.running_update(
                    running_mean, running_var, x, momentum, tracked)
            step.update(running_mean=running_mean, running_var=running_var,
                        num_batches_tracked=tracked)
        else:
            step.update(running_mean=None, running_var=None, num_batches_tracked=None)
        steps.append(step)
    return steps

