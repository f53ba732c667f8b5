"""Closed-form float64 batch norm: the independent reference every test compares against.

Written from the formulas, not from ms_syncbn: NumPy only, float64 throughout.
x has shape (N, C, *); statistics are over every axis but 1.
"""
import numpy as np


def _axes(x):
    return (0,) + tuple(range(2, x.ndim))


def _per_channel(v, ndim):
    return np.asarray(v, np.float64).reshape((1, -1) + (1,) * (ndim - 2))


def batch_stats(x):
    """x (N, C, *) -> mean (C,), biased var (C,), count per channel."""
    x = np.asarray(x, np.float64)
    return x.mean(axis=_axes(x)), x.var(axis=_axes(x)), x.size // x.shape[1]


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
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - _per_channel(mean, x.ndim)) * _per_channel(invstd, x.ndim)
    dbias = dy.sum(axis=axes)
    dweight = (dy * xhat).sum(axis=axes)
    dx = _per_channel(np.asarray(weight, np.float64) * invstd, x.ndim) * (
        dy - _per_channel(dbias / count, x.ndim) - xhat * _per_channel(dweight / count, x.ndim))
    return dx, dweight, dbias


def running_update(running_mean, running_var, x, momentum, num_batches_tracked):
    """One running-statistics update from batch x; momentum None is a cumulative average.

    num_batches_tracked is the count *after* this batch.
    """
    mean, var, count = batch_stats(x)
    unbiased = var * count / max(count - 1, 1)
    factor = 1.0 / num_batches_tracked if momentum is None else momentum
    return ((1 - factor) * np.asarray(running_mean, np.float64) + factor * mean,
            (1 - factor) * np.asarray(running_var, np.float64) + factor * unbiased)
