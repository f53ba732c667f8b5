"""One rank of ``python -m ms_syncbn.bench``, launched by msrun; not an API.

    _bench_worker.py --out DIR --modes pynative,graph --shapes 8x64x32x32,... --iters N --warmup N
                     [--torch] [--components]

Per mode and per-rank shape, times forward+backward steps of the candidates
below, *alternately* (one step of each in turn, the starting candidate
rotating), so that noise from the shared machine hits them alike:

* ``syncbn``      ms_syncbn.SyncBatchNorm over the world (training mode);
* ``bn2d``        MindSpore's local ``nn.BatchNorm2d`` (training mode, no communication);
* ``torch``       PyTorch's ``BatchNorm2d`` with ``torch.set_num_threads(1)`` (if --torch);

and, with --components, the floor of a step and the parts of a SyncBatchNorm step:

* ``floor``       the same MindSpore step with an identity layer (graph launch, gradient
                  plumbing, synchronisation: what every MindSpore candidate pays besides its layer);
* ``torch_floor`` the same for PyTorch (if --torch);
* ``syncbn_fwd``  the SyncBatchNorm forward alone;
* ``kernels``     the four CPU kernels chained, without the layer's small per-channel ops;
* ``allreduce``   the three collectives of a step, (C+5,), (C,) and (2C+1,) float32 (world > 1).

A step is the forward and the backward of the layer for a fixed random upstream
gradient dy -- the gradients with respect to x and the parameters (one compiled
graph in graph mode; torch: ``layer(x).backward(dy)``) -- followed by a host
synchronisation (``asnumpy``), the same for every candidate. Before each timed
step the ranks meet at a barrier (untimed), so a step never includes waiting
for a rank that is still busy with another candidate. It also records
the all-reduce payloads of SyncBatchNorm (PyNative; first step and steady state)
by wrapping the layer's all-reduce. Writes ``DIR/rank<r>.json``.
"""
import argparse
import json
import os
import time

import numpy as np


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--modes", default="pynative,graph")
    parser.add_argument("--shapes", default="8x64x32x32")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--torch", action="store_true")
    parser.add_argument("--components", action="store_true")
    return parser.parse_args()


def parse_shape(text):
    return tuple(int(v) for v in text.split("x"))


def main():
    args = parse_args()
    import mindspore as ms
    from mindspore import nn, ops
    from mindspore.communication import get_group_size, get_rank, init

    import ms_syncbn.batchnorm as batchnorm_module
    from ms_syncbn import SyncBatchNorm
    from ms_syncbn._bench_graphs import LayerForward as Forward
    from ms_syncbn._bench_graphs import LayerTrainStep as TrainStep
    from ms_syncbn._bench_graphs import step_counts
    from ms_syncbn.kernels.cpu import cpu_kernels

    init()
    rank, world = get_rank(), get_group_size()
    torch = None
    if args.torch:
        import torch
        torch.set_num_threads(1)
    kernels = cpu_kernels()

    class Identity(nn.Cell):
        def construct(self, x):
            return x

    class ChainedKernels(nn.Cell):
        """The four activation-sized kernels of a step, fed with fixed per-channel tensors."""

        def __init__(self):
            super().__init__()
            self.local_moments = kernels.local_moments
            self.normalize = kernels.normalize
            self.backward_reduce = kernels.backward_reduce
            self.backward_elemt = kernels.backward_elemt

        def construct(self, x, dy, mean, invstd, weight, bias, count):
            stats = self.local_moments(x, mean)
            y = self.normalize(x, mean, invstd, weight, bias)
            sum_dy, sum_dy_xmu, _, _ = self.backward_reduce(dy, x, mean, invstd)
            dx = self.backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count)
            return stats, y, dx

    class StepAllReduces(nn.Cell):
        """The step's three collectives, each after the one before (as the layer's data orders
        them)."""

        def __init__(self):
            super().__init__()
            self.all_reduce = ops.AllReduce(ops.ReduceOp.SUM)

        def construct(self, first, second, backward):
            first = self.all_reduce(first)
            second = self.all_reduce(ops.depend(second, first))
            return first, second, self.all_reduce(ops.depend(backward, second))

    class RecordingAllReduce(nn.Cell):
        """The layer's all-reduce, recording the element count of each payload (PyNative)."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.payloads = []

        def construct(self, payload):
            self.payloads.append(int(payload.size))
            return self.inner(payload)

    class Barrier(nn.Cell):
        def __init__(self):
            super().__init__()
            self.all_reduce = ops.AllReduce(ops.ReduceOp.SUM)

        def construct(self, token):
            return self.all_reduce(token)

    barrier_cell = Barrier() if world > 1 else None
    barrier_token = ms.Tensor(np.zeros(1, np.float32))

    def barrier():
        """Returns once every rank has arrived (a one-element all-reduce, waited for)."""
        if barrier_cell is not None:
            sync(barrier_cell(barrier_token))

    def sync(outputs):
        for value in outputs if isinstance(outputs, (tuple, list)) else (outputs,):
            if isinstance(value, (tuple, list)):
                sync(value)
            else:
                value.asnumpy()

    def record_payloads(shape, x, dy):
        """Element counts of the all-reduces of SyncBatchNorm's first and second training step."""
        recorders = []
        original = batchnorm_module.all_reduce_sum

        def recording_all_reduce_sum(group):
            recorder = RecordingAllReduce(original(group))
            recorders.append(recorder)
            return recorder

        batchnorm_module.all_reduce_sum = recording_all_reduce_sum
        try:
            layer = SyncBatchNorm(shape[1])
        finally:
            batchnorm_module.all_reduce_sum = original
        layer.set_train(True)
        # The compiled training path would run the recorder's Python only while compiling;
        # the op-by-op body is the same code and sends the same payloads.
        layer._forward_train = layer._train_body  # pylint: disable=protected-access
        step = TrainStep(layer)
        steps = []
        for _ in range(2):
            for recorder in recorders:
                recorder.payloads.clear()
            sync(step(x, dy))
            steps.append([n for recorder in recorders for n in recorder.payloads])
        return {"first_step": steps[0], "steady_step": steps[1]}

    results = {"rank": rank, "world": world, "modes": {}, "payloads": {}}
    for mode in args.modes.split(","):
        ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
        per_shape = {}
        for shape_text in args.shapes.split(","):
            shape = parse_shape(shape_text)
            channels = shape[1]
            rng = np.random.default_rng(1000 * rank + channels)
            x_np = rng.normal(0.5, 2.0, shape).astype(np.float32)
            dy_np = rng.normal(0.0, 1.0, shape).astype(np.float32)
            x, dy = ms.Tensor(x_np), ms.Tensor(dy_np)
            if mode == "pynative" and world > 1:
                results["payloads"][shape_text] = record_payloads(shape, x, dy)

            syncbn_layer = SyncBatchNorm(channels)
            syncbn_layer.set_train(True)
            bn2d_layer = nn.BatchNorm2d(channels)
            bn2d_layer.set_train(True)
            syncbn_step, bn2d_step = TrainStep(syncbn_layer), TrainStep(bn2d_layer)
            candidates = {
                "syncbn": lambda: sync(syncbn_step(x, dy)),
                "bn2d": lambda: sync(bn2d_step(x, dy)),
            }
            if torch is not None:
                torch_layer = torch.nn.BatchNorm2d(channels)
                torch_x = torch.tensor(x_np, requires_grad=True)
                torch_dy = torch.tensor(dy_np)

                def torch_step():
                    torch_x.grad = None
                    torch_layer.zero_grad(set_to_none=True)
                    torch_layer(torch_x).backward(torch_dy)

                candidates["torch"] = torch_step
            if args.components:
                floor_step = TrainStep(Identity())
                candidates["floor"] = lambda: sync(floor_step(x, dy))
                if torch is not None:
                    torch_floor_x = torch.tensor(x_np, requires_grad=True)

                    def torch_floor_step():
                        torch_floor_x.grad = None
                        torch_floor_x.view_as(torch_floor_x).backward(torch_dy)

                    candidates["torch_floor"] = torch_floor_step
                syncbn_forward = Forward(syncbn_layer)
                chained = ChainedKernels()
                per_channel = ms.Tensor(np.ones(channels, np.float32))
                count = ms.Tensor(np.array([x_np.size // channels], np.float32))
                candidates["syncbn_fwd"] = lambda: sync(syncbn_forward(x))
                candidates["kernels"] = lambda: sync(chained(x, dy, per_channel, per_channel,
                                                             per_channel, per_channel, count))
                if world > 1:
                    step_all_reduces = StepAllReduces()
                    payloads = [ms.Tensor(np.ones(n, np.float32))
                                for n in (channels + 5, channels, 2 * channels + 1)]
                    candidates["allreduce"] = lambda: sync(step_all_reduces(*payloads))
            names = list(candidates)
            for name in names:  # compile and warm up
                for _ in range(args.warmup):
                    candidates[name]()
            times = {name: [] for name in names}
            for i in range(args.iters):
                for k in range(len(names)):  # same order on every rank: collectives must match
                    name = names[(i + k) % len(names)]
                    barrier()  # every rank starts the step together, as in lockstep training
                    start = time.perf_counter()
                    candidates[name]()
                    times[name].append(time.perf_counter() - start)
            per_shape[shape_text] = {name: {"median_ms": 1e3 * float(np.median(t)),
                                            "min_ms": 1e3 * float(np.min(t)),
                                            "samples": len(t)} for name, t in times.items()}
        results["modes"][mode] = per_shape
    if world > 1:  # a synchronized layer's graph: what each kernel table launches per step
        shape = parse_shape(args.shapes.split(",")[0])
        results["graph_counts"] = step_counts(shape, os.path.join(args.out, f"graphs_rank{rank}"))
    path = os.path.join(args.out, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
