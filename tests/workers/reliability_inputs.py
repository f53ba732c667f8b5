"""msrun worker: inputs that must not corrupt SyncBatchNorm's state, many scenarios in one job.

Launched by tests/test_reliability.py through tests/harness.py::run_msrun:

    reliability_inputs.py --out DIR SCENARIO [SCENARIO ...]

Each scenario trains a fresh layer for a few steps (forward and backward with a
random upstream gradient). The group's batch of a step is drawn from a shared
seed and every rank keeps its own slice (sizes differ, and may be 0); the rank
may then alter its slice (NaN, Inf, a dtype of its own, a strided view). Per
scenario and rank it writes ``DIR/<scenario>/rank<r>.npz`` with, for step i,
``x{i}`` (the values the layer received, float64), ``dy{i}``, ``y{i}``, ``dx{i}``,
``dweight{i}``, ``dbias{i}``, ``running_mean{i}``, ``running_var{i}``,
``num_batches_tracked{i}``, ``stat_shift{i}``, plus the initial ``weight`` and
``bias``; a scenario that raises writes ``DIR/<scenario>/rank<r>.error`` instead
and the next scenario runs.
"""
import argparse
import os
import traceback

import numpy as np
import mindspore as ms
from mindspore import nn
from mindspore.communication import get_group_size, get_rank, init

from ms_syncbn import SyncBatchNorm

FLOAT16_MAX = 65504.0


class WeightedSum(nn.Cell):
    """(sum(y * dy) in float32, y) with y = layer(x): the gradient feeds dy to the layer's backward."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def construct(self, x, dy):
        y = self.layer(x)
        return (y.astype(ms.float32) * dy).sum(), y


def make_layer(channels, rng):
    layer = SyncBatchNorm(channels)
    layer.weight.set_data(ms.Tensor(rng.uniform(0.5, 1.5, channels).astype(np.float32)))
    layer.bias.set_data(ms.Tensor(rng.normal(size=channels).astype(np.float32)))
    layer.set_train(True)
    return layer


def my_slice(full, sizes, rank):
    """Rows of the group batch ``full`` that belong to ``rank`` (sizes in rank order)."""
    start = sum(sizes[:rank])
    return full[start:start + sizes[rank]]


class Recorder:
    """Runs training steps of one layer and keeps what each step saw and produced."""

    def __init__(self, layer):
        self.layer = layer
        self.loss = WeightedSum(layer)
        # one forward per step (each forward updates the running statistics)
        self.value_and_grad = ms.value_and_grad(self.loss, grad_position=0,
                                                weights=layer.trainable_params(), has_aux=True)
        self.record = {"weight": layer.weight.asnumpy().copy(), "bias": layer.bias.asnumpy().copy()}
        self.steps = 0

    def step(self, x, dy, x_tensor=None):
        """One step on x (NumPy) or on ``x_tensor`` (a Tensor holding the values of x)."""
        x_tensor = ms.Tensor(x) if x_tensor is None else x_tensor
        dy_tensor = ms.Tensor(dy.astype(np.float32))
        (_, y), (dx, (dweight, dbias)) = self.value_and_grad(x_tensor, dy_tensor)
        y = y.asnumpy()
        i = self.steps
        layer = self.layer
        self.record.update({
            f"x{i}": np.asarray(x, np.float64), f"dy{i}": dy.astype(np.float64),
            f"y{i}": y.astype(np.float64), f"dx{i}": dx.asnumpy().astype(np.float64),
            f"dweight{i}": dweight.asnumpy(), f"dbias{i}": dbias.asnumpy(),
            f"running_mean{i}": layer.running_mean.asnumpy().copy(),
            f"running_var{i}": layer.running_var.asnumpy().copy(),
            f"num_batches_tracked{i}": layer.num_batches_tracked.asnumpy().copy(),
            f"stat_shift{i}": layer.stat_shift.asnumpy().copy(),
        })
        self.steps += 1
        return y


def group_batch(rng, sizes, tail, mean=0.0, std=1.0):
    """Full group batch (sum(sizes), *tail) and upstream gradient, float32."""
    shape = (sum(sizes),) + tuple(tail)
    x = rng.normal(mean, std, size=shape).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    return x, dy


def mixed_dtype(rank, world):
    """Rank 0 sends float16, the others float32: the payload is float32 everywhere."""
    rng = np.random.default_rng(11)
    recorder = Recorder(make_layer(3, rng))
    sizes = [3, 5] + [2] * (world - 2)
    for _ in range(2):
        x, dy = group_batch(rng, sizes, (3, 4), mean=2.0, std=3.0)
        x, dy = my_slice(x, sizes, rank), my_slice(dy, sizes, rank)
        if rank == 0:  # the layer's backward gets dy in the dtype of its output
            x, dy = x.astype(np.float16), dy.astype(np.float16)
        recorder.step(x, dy)
    return recorder.record


NAN_CHANNEL = 1  # NaN in one element, on rank 1
INF_CHANNEL = 3  # +Inf in one element, on rank 0


def nonfinite(rank, world):
    """Step 0: one NaN (rank 1, channel 1) and one +Inf (rank 0, channel 3); step 1 is clean."""
    rng = np.random.default_rng(12)
    recorder = Recorder(make_layer(5, rng))
    sizes = [3, 4] + [2] * (world - 2)
    x, dy = group_batch(rng, sizes, (5, 3), mean=1.0, std=2.0)
    x, dy = my_slice(x, sizes, rank).copy(), my_slice(dy, sizes, rank)
    if rank == 1:
        x[1, NAN_CHANNEL, 2] = np.nan
    if rank == 0:
        x[0, INF_CHANNEL, 1] = np.inf
    recorder.step(x, dy)
    x, dy = group_batch(rng, sizes, (5, 3), mean=1.0, std=2.0)
    recorder.step(my_slice(x, sizes, rank), my_slice(dy, sizes, rank))
    return recorder.record


def float16_near_max(rank, world):
    """float16 values at the top of its range: a narrow band just below 65504, then +-65504."""
    rng = np.random.default_rng(13)
    recorder = Recorder(make_layer(2, rng))
    sizes = [4, 3] + [2] * (world - 2)
    tail = (2, 6)
    full = (sum(sizes),) + tail
    band = FLOAT16_MAX - 32.0 * rng.integers(0, 64, size=full)  # float16 spacing there is 32
    wide = rng.uniform(-FLOAT16_MAX, FLOAT16_MAX, size=full)
    wide.reshape(-1)[:2] = [FLOAT16_MAX, -FLOAT16_MAX]
    for values in (band, band[::-1], wide):
        x = my_slice(values.astype(np.float16), sizes, rank)
        dy = my_slice(rng.normal(size=full).astype(np.float16), sizes, rank)
        recorder.step(x, dy)
    return recorder.record


CONSTANT_VALUE = 3.7


def constant(rank, world):
    """Every value equal (variance 0): the output is the bias, gradients finite."""
    rng = np.random.default_rng(14)
    recorder = Recorder(make_layer(3, rng))
    sizes = [2, 4] + [1] * (world - 2)
    for value in (CONSTANT_VALUE, -1e3):
        x = np.full((sizes[rank], 3, 5), value, np.float32)
        _, dy = group_batch(rng, sizes, (3, 5))
        recorder.step(x, my_slice(dy, sizes, rank))
    return recorder.record


# Local batch sizes per step, in rank order; "0, 0" steps: the whole group is empty.
EMPTY_STEPS = [[3, 5], [0, 0], [0, 4], [2, 0], [0, 0], [4, 3]]


def empty(rank, world):
    """Empty local batches on some ranks and on all ranks at once, between normal steps."""
    rng = np.random.default_rng(15)
    recorder = Recorder(make_layer(3, rng))
    for sizes in EMPTY_STEPS:
        sizes = sizes + [0] * (world - 2)
        x, dy = group_batch(rng, sizes, (3, 2, 2), mean=-4.0, std=0.5)
        recorder.step(my_slice(x, sizes, rank), my_slice(dy, sizes, rank))
    return recorder.record


def strided(rank, world):
    """Non-contiguous inputs (a transposed view, a strided slice): same result as a dense copy.

    Two layers with the same state get, step by step, the views and dense copies
    of the same values (keys ``copy_*``): the test checks views against copies
    and both against the reference. ``contiguous{i}`` records whether the view
    given at step i was non-contiguous as MindSpore sees it.
    """
    rng = np.random.default_rng(16)
    layer_state = rng.bit_generator.state
    view_recorder = Recorder(make_layer(3, rng))
    rng.bit_generator.state = layer_state
    copy_recorder = Recorder(make_layer(3, rng))
    sizes = [3, 2] + [2] * (world - 2)
    # (N, 4, 3, 5) transposed to (N, 3, 4, 5); (N, 3, 10) sliced [..., ::2] to (N, 3, 5)
    nhcw, dy_transposed = group_batch(rng, sizes, (4, 3, 5), mean=1.5, std=2.0)
    wide, dy_sliced = group_batch(rng, sizes, (3, 10), mean=-1.0, std=0.5)
    views = [ms.Tensor(my_slice(nhcw, sizes, rank)).transpose(0, 2, 1, 3),
             ms.Tensor(my_slice(wide, sizes, rank))[:, :, ::2]]
    upstream = [my_slice(dy_transposed.transpose(0, 2, 1, 3), sizes, rank),
                my_slice(dy_sliced[:, :, ::2], sizes, rank)]
    for view, dy in zip(views, upstream):
        dense = np.ascontiguousarray(view.asnumpy())
        view_recorder.record[f"contiguous{view_recorder.steps}"] = np.array(view.is_contiguous())
        view_recorder.step(dense, dy, x_tensor=view)
        copy_recorder.step(dense, dy)
    record = dict(view_recorder.record)
    record.update({f"copy_{key}": value for key, value in copy_recorder.record.items()})
    return record


SCENARIOS = {"mixed_dtype": mixed_dtype, "nonfinite": nonfinite,
             "float16_near_max": float16_near_max, "constant": constant, "empty": empty,
             "strided": strided}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("scenarios", nargs="+", choices=sorted(SCENARIOS))
    args = parser.parse_args()
    init()
    rank, world = get_rank(), get_group_size()
    for name in args.scenarios:
        out = os.path.join(args.out, name)
        os.makedirs(out, exist_ok=True)
        try:
            record = SCENARIOS[name](rank, world)
        except Exception:  # recorded for the test; the next scenario still runs
            with open(os.path.join(out, f"rank{rank}.error"), "w") as f:
                f.write(traceback.format_exc())
            continue
        np.savez(os.path.join(out, f"rank{rank}.npz"), **record)
        print(f"rank {rank}: scenario {name} done", flush=True)


if __name__ == "__main__":
    main()
