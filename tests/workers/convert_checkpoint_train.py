"""Worker for tests/test_checkpoint.py: train a converted model on 2 ranks, save ONE checkpoint.

The model (``build_model``) is a plain MindSpore network (nn.BatchNorm2d on the input,
conv, nn.BatchNorm2d, ReLU, pooling, dense), converted with convert_sync_batchnorm
after init(). Each step every rank takes its uneven slice of a global batch
(``global_batch``); gradients and loss are summed over the ranks by one all-reduce.
After training, rank 0 saves ``model.ckpt``; every rank evaluates ``eval_input()`` and
writes ``rank{r}.npz`` with the eval output and the input layer's running statistics.
"""
import argparse
from pathlib import Path

import numpy as np

STEPS = 3
CHANNELS_IN = 3
CHANNELS = 4
SLICE_SIZES = (5, 2)  # rank 0, rank 1
MOMENTUM = 0.1  # SyncBatchNorm convention (nn.BatchNorm2d(momentum=0.9))


def global_batch(step):
    """x (7, 3, 6, 6) float32 of one step, labels (7,) int32."""
    rng = np.random.default_rng([11, step])
    total = sum(SLICE_SIZES)
    x = rng.normal(2.0, 3.0, size=(total, CHANNELS_IN, 6, 6)).astype(np.float32)
    return x, rng.integers(0, 3, size=total).astype(np.int32)


def rank_slice(rank):
    start = sum(SLICE_SIZES[:rank])
    return slice(start, start + SLICE_SIZES[rank])


def eval_input():
    return np.random.default_rng(99).normal(2.0, 3.0, size=(6, CHANNELS_IN, 6, 6)).astype(np.float32)


def build_model():
    """The plain network, with deterministic weights."""
    import mindspore as ms
    from mindspore import nn

    class Model(nn.Cell):
        def __init__(self):
            super().__init__()
            self.input_bn = nn.BatchNorm2d(CHANNELS_IN, momentum=1.0 - MOMENTUM)
            self.features = nn.SequentialCell([
                nn.Conv2d(CHANNELS_IN, CHANNELS, 3, pad_mode="same", has_bias=False),
                nn.BatchNorm2d(CHANNELS), nn.ReLU()])
            self.head = nn.Dense(CHANNELS, 3)

        def construct(self, x):
            return self.head(self.features(self.input_bn(x)).mean(axis=(2, 3)))

    model = Model()
    rng = np.random.default_rng(3)
    for param in model.trainable_params():
        param.set_data(ms.Tensor(rng.normal(0.0, 0.3, param.shape).astype(np.float32)))
    return model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import mindspore as ms
    from mindspore import nn, ops
    from mindspore.communication import get_group_size, get_rank, init
    from ms_syncbn import SyncBatchNorm

    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    init()
    rank, world = get_rank(), get_group_size()
    assert world == len(SLICE_SIZES), world
    model = SyncBatchNorm.convert_sync_batchnorm(build_model())

    class Loss(nn.Cell):
        def __init__(self, net):
            super().__init__(auto_prefix=False)
            self.net = net
            self.ce = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="sum")

        def construct(self, x, labels):
            return self.ce(self.net(x), labels) / float(sum(SLICE_SIZES))

    optimizer = nn.SGD(model.trainable_params(), learning_rate=0.1)
    grad_fn = ms.value_and_grad(Loss(model), None, optimizer.parameters)
    all_reduce = ops.AllReduce()
    sizes = [int(np.prod(p.shape)) for p in optimizer.parameters]
    model.set_train(True)
    for step in range(STEPS):
        x, labels = global_batch(step)
        part = rank_slice(rank)
        _, grads = grad_fn(ms.Tensor(x[part]), ms.Tensor(labels[part]))
        # One all-reduce for all gradients: they are summed in the same order on every rank.
        flat = all_reduce(ops.concat([g.reshape(-1) for g in grads]))
        parts = ops.split(flat, sizes)
        optimizer(tuple(p.reshape(g.shape) for p, g in zip(parts, grads)))
    if rank == 0:
        ms.save_checkpoint(model, str(Path(args.out) / "model.ckpt"))
    model.set_train(False)
    y = model(ms.Tensor(eval_input())).asnumpy()
    np.savez(Path(args.out) / f"rank{rank}.npz", y=y,
             input_running_mean=model.input_bn.running_mean.asnumpy(),
             input_running_var=model.input_bn.running_var.asnumpy(),
             input_tracked=model.input_bn.num_batches_tracked.asnumpy())


if __name__ == "__main__":
    main()
