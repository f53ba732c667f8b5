"""Worker for tests/test_launch_multinode.py: one SyncBatchNorm training step on every rank.

Launched by launch/run_multinode.sh (two "nodes" on one machine). Every rank takes its
own slice of one global batch (uneven slice sizes, from ``global_batch``), runs a
converted ``nn.BatchNorm2d`` in training mode forward and backward with a random upstream
gradient, and writes ``rank{r}.npz``: its rank, the group size, y, dx, dweight, dbias and
the running statistics after the step. The test compares them with tests/reference.py
over the concatenation of all ranks' slices.
"""
import argparse
import os
from pathlib import Path

import numpy as np

CHANNELS = 3
MOMENTUM = 0.1  # SyncBatchNorm convention; the nn.BatchNorm2d is built with 1 - MOMENTUM
EPS = 1e-5


def slice_sizes(world):
    """Uneven per-rank batch sizes."""
    return [(2, 5, 1, 3, 4, 2, 3, 1)[r % 8] for r in range(world)]


def global_batch(world):
    """x (sum of slice sizes, C, 3, 4) and upstream dy of the same shape, float32."""
    rng = np.random.default_rng(2024)
    total = sum(slice_sizes(world))
    x = rng.normal(1.5, 2.0, size=(total, CHANNELS, 3, 4)).astype(np.float32)
    dy = rng.normal(0.0, 1.0, size=x.shape).astype(np.float32)
    return x, dy


def affine_params():
    rng = np.random.default_rng(7)
    return (rng.uniform(0.5, 1.5, CHANNELS).astype(np.float32),
            rng.normal(0.0, 0.5, CHANNELS).astype(np.float32))


def rank_slice(world, rank):
    sizes = slice_sizes(world)
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=("pynative", "graph"), default="pynative")
    args = parser.parse_args()

    import mindspore as ms
    from mindspore import nn
    from mindspore.communication import get_group_size, get_rank, init
    from ms_syncbn import SyncBatchNorm

    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE,
                   device_target="CPU")
    init()
    rank, world = get_rank(), get_group_size()
    x_all, dy_all = global_batch(world)
    part = rank_slice(world, rank)
    weight, bias = affine_params()

    class Model(nn.Cell):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(CHANNELS, eps=EPS, momentum=1.0 - MOMENTUM)

        def construct(self, x):
            return self.bn(x)

    model = Model()
    model.bn.gamma.set_data(ms.Tensor(weight))
    model.bn.beta.set_data(ms.Tensor(bias))
    model = SyncBatchNorm.convert_sync_batchnorm(model)
    model.set_train(True)

    class WeightedSum(nn.Cell):
        """sum(model(x) * dy): its gradient is the upstream gradient dy."""

        def __init__(self, net):
            super().__init__(auto_prefix=False)
            self.net = net

        def construct(self, x, dy):
            return (self.net(x) * dy).sum()

    x = ms.Tensor(x_all[part])
    dy = ms.Tensor(dy_all[part])
    y = model(x)  # training step 1: output, running statistics updated once
    params = [model.bn.weight, model.bn.bias]
    grad_fn = ms.grad(WeightedSum(model), grad_position=0, weights=params)
    dx, (dweight, dbias) = grad_fn(x, dy)  # step 2 on the same batch: gradients, second update
    np.savez(Path(args.out) / f"rank{rank}.npz", rank=rank, world=world,
             rank_size_env=int(os.environ.get("RANK_SIZE", "-1")),
             y=y.asnumpy(), dx=dx.asnumpy(), dweight=dweight.asnumpy(), dbias=dbias.asnumpy(),
             running_mean=model.bn.running_mean.asnumpy(),
             running_var=model.bn.running_var.asnumpy())


if __name__ == "__main__":
    main()
