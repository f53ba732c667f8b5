"""Closed-form float64 batch norm: the independent reference every test compares against.

Written from the formulas, not from ms_syncbn: NumPy only, float64 throughout.
x has shape (N, C, *); statistics are over every axis but 1. An empty batch (N = 0) has no
statistics (NaN per channel, without NumPy's empty-slice warnings), an empty output and zero
weight and bias gradients. ``BatchNorm`` adds a layer's state over calls: train/eval, running
statistics and ``track_running_stats`` as torch's and mint's ``BatchNorm*d`` modules keep them.
"""
import numpy as np


def _axes(x):
    return (0,) + tuple(range(2, x.ndim))


def _per_channel(v, ndim):
    return np.asarray(v, np.float64).reshape((1, -1) + (1,) * (ndim - 2))


def batch_stats(x):
    """x (N, C, *) -> mean (C,), biased var (C,), count per channel (NaN, NaN, 0 if empty)."""
    x = np.asarray(x, np.float64)
    count = x.size // x.shape[1]
    if count == 0:
        undefined = np.full(x.shape[1], np.nan)
        return undefined, undefined.copy(), 0
    return x.mean(axis=_axes(x)), x.var(axis=_axes(x)), count


def forward(x, weight, bias, eps, mean=None, var=None):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, with batch stats unless given."""
    x = np.asarray(x, np.float64)
    if mean is None:
        mean, var, _ = batch_stats(x)
    invstd = 1.0 / np.sqrt(_per_channel(var, x.ndim) + eps)
    return (x - _per_channel(mean, x.ndim)) * invstd * _per_channel(weight, x.ndim) + _per_channel(bias, x.ndim)


def backward(x, dy, weight, eps):
    """Gradients of sum(y * dy) for training-mode batch norm: dx, dweight, dbias."""
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    axes = _axes(x)
    mean, var, count = batch_stats(x)
    if count == 0:  # nothing normalized: no gradient to anything
        return np.zeros_like(x), np.zeros(x.shape[1]), np.zeros(x.shape[1])
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - _per_channel(mean, x.ndim)) * _per_channel(invstd, x.ndim)
    dbias = dy.sum(axis=axes)
    dweight = (dy * xhat).sum(axis=axes)
    dx = _per_channel(np.asarray(weight, np.float64) * invstd, x.ndim) * (
        dy - _per_channel(dbias / count, x.ndim) - xhat * _per_channel(dweight / count, x.ndim))
    return dx, dweight, dbias


def frozen_backward(x, dy, weight, eps, mean, var):
    """Gradients of sum(y * dy) for y normalized with given (constant) statistics: dx, dweight,
    dbias (evaluation with running statistics)."""
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    axes = _axes(x)
    invstd = 1.0 / np.sqrt(np.asarray(var, np.float64) + eps)
    xhat = (x - _per_channel(mean, x.ndim)) * _per_channel(invstd, x.ndim)
    dx = dy * _per_channel(np.asarray(weight, np.float64) * invstd, x.ndim)
    return dx, (dy * xhat).sum(axis=axes), dy.sum(axis=axes)


def running_update(running_mean, running_var, x, momentum, num_batches_tracked):
    """One running-statistics update from batch x; momentum None is a cumulative average.

    num_batches_tracked is the count *after* this batch.
    """
    mean, var, count = batch_stats(x)
    unbiased = var * count / max(count - 1, 1)
    factor = 1.0 / num_batches_tracked if momentum is None else momentum
    return ((1 - factor) * np.asarray(running_mean, np.float64) + factor * mean,
            (1 - factor) * np.asarray(running_var, np.float64) + factor * unbiased)


class BatchNorm:
    """A float64 batch-norm layer with state, as torch's and mint's ``BatchNorm*d`` behave.

    Training normalizes with the batch statistics and, when ``track_running_stats`` is True at
    the call, updates the running statistics (``momentum`` None: cumulative average) and
    ``num_batches_tracked``; evaluation uses the running statistics whenever the layer has them
    (it was built with ``track_running_stats=True``), whatever the flag says now, and the batch
    statistics otherwise. ``step(x, dy)`` returns y and the gradients of sum(y * dy).
    """

    def __init__(self, weight, bias, eps, momentum, track_running_stats=True):
        channels = len(weight)
        self.weight = np.asarray(weight, np.float64)
        self.bias = np.asarray(bias, np.float64)
        self.eps, self.momentum = eps, momentum
        self.track_running_stats = track_running_stats
        self.training = True
        if track_running_stats:
            self.running_mean, self.running_var = np.zeros(channels), np.ones(channels)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def step(self, x, dy):
        """One call on x and the backward of sum(y * dy): {"y", "dx", "dweight", "dbias"}."""
        if not self.training and self.running_mean is not None:
            mean, var = self.running_mean, self.running_var
            y = forward(x, self.weight, self.bias, self.eps, mean, var)
            dx, dweight, dbias = frozen_backward(x, dy, self.weight, self.eps, mean, var)
        else:
            y = forward(x, self.weight, self.bias, self.eps)
            dx, dweight, dbias = backward(x, dy, self.weight, self.eps)
            if self.training and self.track_running_stats:
                self.num_batches_tracked += 1
                self.running_mean, self.running_var = running_update(
                    self.running_mean, self.running_var, x, self.momentum,
                    self.num_batches_tracked)
        return {"y": y, "dx": dx, "dweight": dweight, "dbias": dbias}
