"""msrun worker: train a converted network through MindSpore's amp and training APIs, many recipes in one job.

Launched by tests/test_amp_training.py through tests/harness.py::run_msrun:

    amp_training.py --out DIR --mode {pynative,graph} RECIPE [RECIPE ...]

Each recipe builds the same small conv-BatchNorm network (nn.BatchNorm2d), converts it
with ``SyncBatchNorm.convert_sync_batchnorm`` and trains it the way a user writes it
(``mindspore.amp.build_train_network``; ``auto_mixed_precision`` or
``custom_mixed_precision`` + ``nn.TrainOneStepCell``; ``Model.train`` over a sharded
dataset; gradient accumulation) under the ``DATA_PARALLEL`` context, each rank on its
slice of every global batch (uneven slices except for ``Model.train``, whose sharded
dataset gives every rank the same size). After all recipes, the ranks share out the
single-process runs: the *unconverted* network, at the same amp level, trained as one
process (no parallel context) on the concatenated global batches.

Per recipe it writes ``DIR/<recipe>/rank<r>.npz`` (parameters and running statistics under
SyncBatchNorm's names, before training and after every step; Model.train: at the end) and
``rank<r>.json`` (losses, seconds, the error if one was raised), and one rank
``reference.npz`` / ``reference.json``.
A recipe that raises is recorded and the next one runs.
"""
import argparse
import json
import os
import time
import traceback

import numpy as np
import mindspore as ms
import mindspore.dataset as ds
from mindspore import nn, ops
from mindspore.amp import FixedLossScaleManager
from mindspore.communication import get_group_size, get_rank, init
from mindspore.train import Model

from ms_syncbn import SyncBatchNorm

CLASSES = 4
IMAGE = (3, 6, 6)
STEPS = 3
LR = 0.05
SIZES = (3, 5)  # per-rank batch sizes of the uneven recipes (2 ranks)
MODEL_SIZE = 4  # per-rank batch size of the sharded dataset (Model.train)
LOSS_SCALE = 128.0

# api: how the step is built; level: amp level (float16); scale: fixed
# loss scale (None: no loss scaling); gradients_mean: the DATA_PARALLEL context's;
# micro: micro-batches per optimizer step (gradient accumulation); sink: Model.train's
# dataset_sink_mode (one sink of all the epoch's steps).
RECIPES = {
    "build_O0": dict(api="build", level="O0", scale=LOSS_SCALE),
    "build_O1": dict(api="build", level="O1", scale=LOSS_SCALE),
    "build_O2": dict(api="build", level="O2", scale=LOSS_SCALE),
    "build_O3": dict(api="build", level="O3", scale=LOSS_SCALE),
    "build_O2_gradients_mean": dict(api="build", level="O2", scale=LOSS_SCALE,
                                    gradients_mean=True),
    # a float16 overflow: the scaled gradients exceed 65504, the fixed scale (no skipping
    # on CPU) applies them, and the next forward pass sees non-finite weights
    "build_O2_overflow": dict(api="build", level="O2", scale=2.0 ** 24),
    "auto_O3": dict(api="auto", level="O3"),
    # amp's explicit hook: MindSpore's black list, SyncBatchNorm not in it
    "custom_black_list": dict(api="custom", level="O2"),
    "model_O2": dict(api="model", level="O2", scale=LOSS_SCALE, gradients_mean=True),
    "model_O0": dict(api="model", level="O0", gradients_mean=True),
    # Ascend's usual Model.train: the dataset sunk, all steps of the epoch in one device loop
    "model_sink_O2": dict(api="model", level="O2", scale=LOSS_SCALE, gradients_mean=True,
                          sink=True),
    "accumulate_O2": dict(api="accumulate", level="O2", micro=2),
}
CANONICAL = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
             "moving_variance": "running_var"}


class Net(nn.Cell):
    """conv-BN-ReLU-conv-BN-ReLU, global average pool, classifier: no parallel branches."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(IMAGE[0], 4, 3, has_bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, has_bias=False)
        self.bn2 = nn.BatchNorm2d(6, momentum=0.8)  # nn's momentum: 0.2 of the batch
        self.relu = nn.ReLU()
        self.head = nn.Dense(6, CLASSES)

    def construct(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(axis=(2, 3)))


def build_net(converted):
    net = Net()
    rng = np.random.default_rng(7)
    for param in net.trainable_params():
        if param.name.endswith(("gamma", "beta")):
            continue
        fan_in = int(np.prod(param.shape[1:])) if len(param.shape) > 1 else param.shape[0]
        param.set_data(ms.Tensor(rng.normal(0.0, np.sqrt(2.0 / fan_in), param.shape), ms.float32))
    return SyncBatchNorm.convert_sync_batchnorm(net) if converted else net


def global_batch(step, size):
    """Step's whole batch: images (size, 3, 6, 6) f32 with a class-dependent mean, labels i32."""
    rng = np.random.default_rng([11, step])
    labels = rng.integers(0, CLASSES, size=size)
    images = rng.normal(0.0, 1.0, size=(size,) + IMAGE) + 0.8 * labels[:, None, None, None] + 0.5
    return images.astype(np.float32), labels.astype(np.int32)


def state(net):
    """{SyncBatchNorm name: value} of every parameter and running statistic (not SyncBatchNorm's
    own stat_shift and guard_code)."""
    out = {}
    for param in net.get_parameters():
        prefix, _, leaf = param.name.rpartition(".")
        if leaf in ("stat_shift", "num_batches_tracked", "guard_code"):
            continue
        out[f"{prefix}.{CANONICAL.get(leaf, leaf)}"] = param.asnumpy().astype(np.float32).copy()
    return out


class ScaledCrossEntropy(nn.Cell):
    """factor * sum of the cross entropies: with factor 1 / global batch (gradients summed) or
    world / global batch (gradients averaged) every rank's loss is its share of the global mean."""

    def __init__(self, factor):
        super().__init__()
        self.loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="sum")
        self.factor = factor

    def construct(self, logits, labels):
        return self.loss(logits, labels) * self.factor


class AccumulateGradients(nn.Cell):
    """One micro-batch: loss, and its gradients added to the accumulators."""

    def __init__(self, loss_net, params, accumulators):
        super().__init__(auto_prefix=False)
        self.loss_net = loss_net
        self.accumulators = accumulators
        self.grad_fn = ms.value_and_grad(loss_net, None, params)

    def construct(self, images, labels):
        loss, grads = self.grad_fn(images, labels)  # one forward pass: one statistics update
        for acc, grad in zip(self.accumulators, grads):
            ops.assign_add(acc, grad)
        return loss


class ApplyAccumulated(nn.Cell):
    """One optimizer step with the accumulated gradients (reduced over the ranks), then zero them."""

    def __init__(self, optimizer, accumulators, reducer):
        super().__init__(auto_prefix=False)
        self.optimizer = optimizer
        self.accumulators = accumulators
        self.reducer = reducer

    def construct(self):
        grads = tuple(acc * 1.0 for acc in self.accumulators)
        if self.reducer is not None:
            grads = self.reducer(grads)
        self.optimizer(grads)
        for acc in self.accumulators:
            ops.assign(acc, ops.zeros_like(acc))
        return grads[0].sum()


def set_parallel(world, gradients_mean):
    ms.reset_auto_parallel_context()
    if world > 1:
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL,
                                     gradients_mean=gradients_mean)


def optimizer_for(net, spec):
    return nn.Momentum(net.trainable_params(), learning_rate=LR, momentum=0.9,
                       loss_scale=spec.get("scale") or 1.0)


def run_loop(spec, converted, rank, sizes):
    """build / auto / accumulate recipes: this rank's slices; returns (states, losses), the
    states before training and after every optimizer step."""
    world = len(sizes)
    total = sum(sizes)
    micro = spec.get("micro", 1)
    gradients_mean = spec.get("gradients_mean", False)
    factor = (world if gradients_mean else 1) / (total * micro)
    net = build_net(converted)
    opt = optimizer_for(net, spec)
    loss = ScaledCrossEntropy(factor)
    level = spec["level"]
    if spec["api"] == "build":
        manager = (None if spec.get("scale") is None
                   else FixedLossScaleManager(spec["scale"], drop_overflow_update=False))
        step = ms.amp.build_train_network(net, opt, loss, level=level, loss_scale_manager=manager)
        apply = None
    else:
        if spec["api"] == "custom":
            amp_net = ms.amp.custom_mixed_precision(net, black_list=ms.amp.get_black_list())
        else:
            amp_net = ms.amp.auto_mixed_precision(net, level, dtype=ms.float16)
        loss_net = nn.WithLossCell(amp_net, loss)
        if spec["api"] in ("auto", "custom"):
            step, apply = nn.TrainOneStepCell(loss_net, opt), None
        else:  # accumulate
            params = opt.parameters
            accumulators = ms.ParameterTuple(
                ms.Parameter(ops.zeros(p.shape, ms.float32), name=f"accumulated.{p.name}",
                             requires_grad=False) for p in params)
            reducer = (nn.DistributedGradReducer(params, gradients_mean, world)
                       if world > 1 else None)
            step = AccumulateGradients(loss_net, params, accumulators)
            apply = ApplyAccumulated(opt, accumulators, reducer)
            apply.set_train(True)
    step.set_train(True)
    part = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    states, losses = [state(net)], []
    for index in range(STEPS):
        for m in range(micro):
            images, labels = global_batch(index * micro + m, total)
            losses.append(float(step(ms.Tensor(images[part]), ms.Tensor(labels[part])).asnumpy()))
        if apply is not None:
            apply()
        states.append(state(net))
    return states, losses


def sharded_dataset(rank, world, batch_size):
    images, labels = zip(*(global_batch(step, MODEL_SIZE * 2) for step in range(STEPS)))
    data = {"image": np.concatenate(images), "label": np.concatenate(labels)}
    dataset = ds.NumpySlicesDataset(data, shuffle=False, num_shards=world, shard_id=rank)
    return dataset.batch(batch_size)


def run_model(spec, converted, rank, world):
    """Model.train over a sharded dataset; returns ([initial state, final state], losses).

    The reference (world 1) trains on the union of the two shards' batches of each step."""
    net = build_net(converted)
    initial = state(net)
    opt = optimizer_for(net, spec)
    loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    manager = (None if spec.get("scale") is None
               else FixedLossScaleManager(spec["scale"], drop_overflow_update=False))
    kwargs = {} if manager is None else {"loss_scale_manager": manager}
    model = Model(net, loss_fn=loss, optimizer=opt, amp_level=spec["level"], **kwargs)
    if world > 1:
        dataset = sharded_dataset(rank, world, MODEL_SIZE)
    else:  # step s: shard 0's batch s then shard 1's, as one batch
        shards = [list(sharded_dataset(r, 2, MODEL_SIZE).create_tuple_iterator(output_numpy=True))
                  for r in range(2)]
        images = np.concatenate([np.concatenate([s[i][0] for s in shards]) for i in range(STEPS)])
        labels = np.concatenate([np.concatenate([s[i][1] for s in shards]) for i in range(STEPS)])
        dataset = ds.NumpySlicesDataset({"image": images, "label": labels},
                                        shuffle=False).batch(2 * MODEL_SIZE)
    losses = []

    class RecordLoss(ms.train.Callback):
        def on_train_step_end(self, run_context):
            out = run_context.original_args().net_outputs
            out = out[0] if isinstance(out, (tuple, list)) else out
            losses.append(float(out.asnumpy()))

    model.train(1, dataset, callbacks=[RecordLoss()], dataset_sink_mode=spec.get("sink", False))
    return [initial, state(net)], losses


def run(spec, converted, rank, world):
    set_parallel(world, spec.get("gradients_mean", False))
    if spec["api"] == "model":
        return run_model(spec, converted, rank, world)
    sizes = list(SIZES) if world > 1 else [sum(SIZES)]
    return run_loop(spec, converted, rank, sizes)


def save(directory, name, states, meta):
    arrays = {f"{key}@{step}": value for step, values in enumerate(states)
              for key, value in values.items()}
    np.savez(os.path.join(directory, f"{name}.npz"), **arrays)
    with open(os.path.join(directory, f"{name}.json"), "w") as f:
        json.dump(meta, f)


def attempt(spec, converted, rank, world):
    """(states, meta): the recipe's results, or no states and the error."""
    start = time.perf_counter()
    try:
        states, losses = run(spec, converted, rank, world)
        return states, dict(losses=losses, seconds=time.perf_counter() - start, error=None)
    except Exception as err:  # recorded for the test; the next recipe runs
        return [], dict(losses=[], seconds=time.perf_counter() - start,
                        error=f"{type(err).__name__}: {err}\n{traceback.format_exc()[-3000:]}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=("pynative", "graph"), required=True)
    parser.add_argument("recipes", nargs="+")
    args = parser.parse_args()
    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE,
                   device_target="CPU")
    init()
    rank, world = get_rank(), get_group_size()
    out = os.path.abspath(args.out)
    # Each rank in a directory of its own: amp O1 writes its rewritten network's code to
    # ./rewritten_network/ (file names from object ids, which two ranks can share) and the
    # graph compiler its reports to ./rank_<r>/.
    workdir = os.path.join(out, f"cwd_rank{rank}")
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)
    for name in args.recipes:
        directory = os.path.join(out, name)
        os.makedirs(directory, exist_ok=True)
        states, meta = attempt(RECIPES[name], True, rank, world)
        save(directory, f"rank{rank}", states, meta)
        print(f"rank {rank}: {name} done", flush=True)
    # One process, the unconverted network, the concatenated batches: the ranks share the
    # recipes (no communication), after every synchronized run.
    for index, name in enumerate(args.recipes):
        if index % world == rank:
            states, meta = attempt(RECIPES[name], False, 0, 1)
            save(os.path.join(out, name), "reference", states, meta)
            print(f"rank {rank}: {name} reference done", flush=True)


if __name__ == "__main__":
    main()
