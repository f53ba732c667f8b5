"""msrun worker: a 300-step training run of a small SyncBatchNorm net, uninterrupted and restarted.

Launched by tests/test_long_run.py through tests/harness.py::run_msrun:

    long_run.py --out DIR

The plan (batch sizes, layers used, data) is tests/workers/long_run_plan.py,
drawn from a shared seed. In one process (graph mode) each rank runs

1. run A: STEPS steps on a net initialised from ``initial_parameters()``, with
   ``save_checkpoint`` after SAVE_AT steps (saving is not an interruption: A goes on);
2. run C, the restart: a fresh net (default initial values) loads that checkpoint
   with ``load_checkpoint`` + ``load_param_into_net`` and runs steps SAVE_AT..STEPS-1.

It writes ``DIR/rank<r>.npz``: the final state of A and C (``a_<name>``,
``c_<name>`` for every parameter: weights, biases, running statistics,
num_batches_tracked, stat_shift), A's state when saved (``saved_<name>``) and
C's right after loading (``loaded_<name>``), the state after every step
(``history_a_<name>``: STEPS rows, ``history_c_<name>``: STEPS - SAVE_AT rows),
the resident memory samples
(``rss_step``, ``rss_kib``: VmRSS from /proc/self/status every RSS_EVERY of the
STEPS + STEPS - SAVE_AT step executions), ``params_not_loaded`` and
``wall_seconds`` (both runs).
"""
import argparse
import os
import time

import numpy as np
import mindspore as ms
from mindspore import ParameterTuple, nn, ops
from mindspore.communication import get_group_size, get_rank, init

from long_run_plan import (CHANNELS, LEARNING_RATE, MOMENTA, RSS_EVERY, SAVE_AT, STEPS,
                           initial_parameters, step_plan)
from ms_syncbn import SyncBatchNorm


def resident_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


class TanhBatchNormNet(nn.Cell):
    """LAYERS SyncBatchNorm layers; ``LayerSubset`` runs some of them."""

    def __init__(self):
        super().__init__()
        self.norms = nn.CellList([SyncBatchNorm(CHANNELS, momentum=m) for m in MOMENTA])


class LayerSubset(nn.Cell):
    """h_k = tanh(bn_k(h_{k-1})) over ``layers`` (indices into ``norms``); output sum(h * upstream)."""

    def __init__(self, norms, layers):
        super().__init__()
        self.norms = norms
        self.layers = layers

    def construct(self, x, upstream):
        h = x
        for k in self.layers:
            h = ops.tanh(self.norms[k](h))
        return (h * upstream).sum()


class TrainStep(nn.Cell):
    """One SGD step of ``subset``: gradients of all weights and biases, summed over the ranks in
    one all-reduce, then ``param -= LEARNING_RATE * grad``; all in one graph."""

    def __init__(self, subset, params):
        super().__init__()
        self.subset = subset
        self.params = ParameterTuple(params)
        self.grad = ops.GradOperation(get_by_list=True)
        self.sum_over_ranks = ops.AllReduce(ops.ReduceOp.SUM)

    def construct(self, x, upstream):
        grads = self.grad(self.subset, self.params)(x, upstream)
        flat = self.sum_over_ranks(ops.cat([g.reshape(-1) for g in grads]))
        start = 0
        for param, grad in zip(self.params, grads):
            size = grad.shape[0]
            ops.assign_sub(param, LEARNING_RATE * flat[start:start + size])
            start += size
        return flat


class Trainer:
    """Runs the plan's steps on ``net`` (a TanhBatchNormNet) from this rank's rows.

    Graph mode compiles one TrainStep per subset of layers and local batch size:
    SyncBatchNorm's CPU kernels (ops.Custom with Python shape functions) fail to compile
    with a dynamic batch dimension (set_inputs with None: "The pointer[value] is null").
    """

    def __init__(self, net, rank, world):
        self.net = net
        self.rank, self.world = rank, world
        self.steps = {}
        net.set_train(True)

    def step_of(self, layers):
        if layers not in self.steps:
            train_step = TrainStep(LayerSubset(self.net.norms, layers), self.net.trainable_params())
            train_step.set_train(True)
            self.steps[layers] = train_step
        return self.steps[layers]

    def step(self, step):
        plan = step_plan(step, self.world)
        rows = plan.rows(self.rank)
        self.step_of(plan.layers)(ms.Tensor(plan.x[rows]), ms.Tensor(plan.upstream[rows])).asnumpy()


def state_of(net):
    """Every parameter of every layer, as ``norms.<k>.<attribute path>`` (graph compilation
    prefixes Parameter.name with the path of the cell that compiled it)."""
    return {f"norms.{k}.{name}": param.asnumpy().copy()
            for k, norm in enumerate(net.norms) for name, param in norm.parameters_and_names()}


def set_initial_parameters(net):
    weight, bias = initial_parameters()
    for k, norm in enumerate(net.norms):
        norm.weight.set_data(ms.Tensor(weight[k]))
        norm.bias.set_data(ms.Tensor(bias[k]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    # Graph mode: a step takes milliseconds against ~0.1-0.5 s in PyNative; each (subset of
    # layers, local batch size) compiles once per net (~0.3 s), 21 pairs at most.
    ms.set_context(mode=ms.GRAPH_MODE)
    init()
    rank, world = get_rank(), get_group_size()
    record = {}
    rss_step, rss_kib = [], []
    executed = 0

    def run(trainer, steps, history):
        nonlocal executed
        for step in steps:
            if executed % RSS_EVERY == 0:
                rss_step.append(executed)
                rss_kib.append(resident_kib())
                print(f"rank {rank}: {executed} steps, {time.monotonic() - started:.1f} s, "
                      f"VmRSS {rss_kib[-1]} KiB", flush=True)
            trainer.step(step)
            executed += 1
            for name, value in state_of(trainer.net).items():
                history.setdefault(name, []).append(value)

    started = time.monotonic()
    net_a = TanhBatchNormNet()
    set_initial_parameters(net_a)
    trainer_a = Trainer(net_a, rank, world)
    history_a, history_c = {}, {}
    run(trainer_a, range(SAVE_AT), history_a)
    checkpoint = os.path.join(args.out, f"rank{rank}_step{SAVE_AT}.ckpt")
    ms.save_checkpoint(net_a, checkpoint)
    record.update({f"saved_{k}": v for k, v in state_of(net_a).items()})
    run(trainer_a, range(SAVE_AT, STEPS), history_a)
    record.update({f"a_{k}": v for k, v in state_of(net_a).items()})

    net_c = TanhBatchNormNet()  # a fresh model: weight 1, bias 0, running stats reset
    not_loaded, _ = ms.load_param_into_net(net_c, ms.load_checkpoint(checkpoint))
    record.update({f"loaded_{k}": v for k, v in state_of(net_c).items()})
    run(Trainer(net_c, rank, world), range(SAVE_AT, STEPS), history_c)
    rss_step.append(executed)
    rss_kib.append(resident_kib())
    record.update({f"c_{k}": v for k, v in state_of(net_c).items()})

    record.update({f"history_a_{k}": np.stack(v) for k, v in history_a.items()})
    record.update({f"history_c_{k}": np.stack(v) for k, v in history_c.items()})
    record.update(rss_step=np.array(rss_step), rss_kib=np.array(rss_kib),
                  params_not_loaded=np.array([str(name) for name in not_loaded], dtype=str),
                  wall_seconds=np.array(time.monotonic() - started))
    np.savez(os.path.join(args.out, f"rank{rank}.npz"), **record)
    print(f"rank {rank}: long run done in {time.monotonic() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
