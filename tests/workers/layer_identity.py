"""msrun worker (3 ranks): layer identity in the backward pairing check.

Launched by tests/test_layer_identity.py through tests/harness.py::run_msrun:

    layer_identity.py --out DIR

Runs every scenario below in PyNative and then in graph mode, in one process per
rank. Each scenario trains a small model of SyncBatchNorm layers on parallel branches
(``Pair``: a = A(x), b = B(x * x), out = a * b + a) for a few steps, with layers that
some ranks build but others do not, build in another order, or call elsewhere. Ranks
hold uneven slices of the full batch. Per step every rank saves its slice of x and of
the upstream gradient, its loss sum(out * dy), dx and the layers' weight/bias gradients,
and after the steps the running statistics: the test rebuilds the full batch and checks
them against the float64 reference (tests/reference.py). ``mispaired`` swaps two layers'
backward collectives on rank 0 and records the error. Writes
``DIR/<mode>_<scenario>/rank<r>.npz`` and ``rank<r>.json`` (status, error type and
message), scenario by scenario.
"""
import argparse
import copy
import json
import os
import traceback

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore.communication import create_group, get_rank, init

from ms_syncbn import SyncBatchNorm

CHANNELS = 3
SIZES = [3, 1, 4]  # per-rank batch sizes (3 ranks)
STEPS = 1  # per model; the checkpoint scenario trains one step before and one after
SUBGROUP = "pair01"  # ranks 0 and 1: a group that rank 2 knows nothing of
SUBGROUP_RANKS = [0, 1]
# Affine parameters of the two layers of a Pair (the test states the same values).
WEIGHT_A = [1.5, -0.5, 2.0]
BIAS_A = [0.1, 0.2, -0.3]
WEIGHT_B = [0.7, 1.2, -1.1]
BIAS_B = [0.0, -0.4, 0.5]
SCENARIOS = ("extra_unused_and_eval", "extra_subgroup", "build_order", "teacher_student",
             "deep_copied_teacher", "weight_sharing", "rebuilt_after_checkpoint", "mispaired")


class Pair(nn.Cell):
    """Two SyncBatchNorm layers on parallel branches; `shared` applies A twice instead."""

    def __init__(self, build_b_first=False, shared=False):
        super().__init__()
        if build_b_first:
            self.bn_b = SyncBatchNorm(CHANNELS)
            self.bn_a = SyncBatchNorm(CHANNELS)
        else:
            self.bn_a = SyncBatchNorm(CHANNELS)
            self.bn_b = SyncBatchNorm(CHANNELS)
        self.shared = shared
        for layer, weight, bias in ((self.bn_a, WEIGHT_A, BIAS_A), (self.bn_b, WEIGHT_B, BIAS_B)):
            layer.weight.set_data(Tensor(np.array(weight, np.float32)))
            layer.bias.set_data(Tensor(np.array(bias, np.float32)))

    def construct(self, x):
        a = self.bn_a(x)
        b = self.bn_a(x * x) if self.shared else self.bn_b(x * x)
        return a * b + a


class Loss(nn.Cell):
    def __init__(self, *models):
        super().__init__()
        self.models = nn.CellList(list(models))

    def construct(self, x, dy):
        loss = 0.0
        for model in self.models:
            loss = loss + (model(x) * dy).sum()
        return loss


class SwappedBackward(nn.Cell):
    """Forward of both layers of a Pair in the same order on every rank, then their backward
    functions in the order given: (a, b) or (b, a). Each backward waits for the previous one."""

    def __init__(self, pair, b_first):
        super().__init__()
        self.fa, self.fb = pair.bn_a.group_stats, pair.bn_b.group_stats
        self.wa, self.ba = pair.bn_a.weight, pair.bn_a.bias
        self.wb, self.bb = pair.bn_b.weight, pair.bn_b.bias
        self.shift_a, self.shift_b = pair.bn_a.stat_shift, pair.bn_b.stat_shift
        self.eps_a, self.eps_b = pair.bn_a._eps_tensor, pair.bn_b._eps_tensor
        self.b_first = b_first

    def _dout(self, dy, out):  # the upstream gradients of the function's 7 outputs
        return (dy, ops.zeros_like(out[1]), ops.zeros_like(out[2]), ops.zeros_like(out[3]),
                ops.zeros_like(out[4]), ops.zeros_like(out[5]), ops.zeros_like(out[6]))

    def construct(self, x, dy):
        # Pinned by data: A's forward, then B's, then the backward passes. The ranks' graphs
        # differ (their backward order), and a compiled step orders what data does not by the
        # graph's structure: unpinned, a rank could issue a forward collective where another
        # issues a backward one, or swap the forwards too (which pairs the layers consistently,
        # leaving no mis-pairing for the check to find).
        out_a = self.fa(x, self.wa, self.ba, self.shift_a, self.eps_a)
        xb = ops.depend(x * x, out_a[2])
        out_b = self.fb(xb, self.wb, self.bb, self.shift_b, self.eps_b)
        dy = ops.depend(dy, out_b[2])
        # The upstream gradient of the second backward waits for the first one's dx: the
        # second all-reduce's payload depends on the first all-reduce's result.
        if self.b_first:
            grads_b = self.fb.bprop(xb, self.wb, self.bb, self.shift_b, self.eps_b, out_b,
                                    self._dout(dy, out_b))
            grads_a = self.fa.bprop(x, self.wa, self.ba, self.shift_a, self.eps_a, out_a,
                                    self._dout(ops.depend(dy, grads_b[0]), out_a))
        else:
            grads_a = self.fa.bprop(x, self.wa, self.ba, self.shift_a, self.eps_a, out_a,
                                    self._dout(dy, out_a))
            grads_b = self.fb.bprop(xb, self.wb, self.bb, self.shift_b, self.eps_b, out_b,
                                    self._dout(ops.depend(dy, grads_a[0]), out_b))
        return grads_a[0] + grads_b[0]


def batch(rank, seed):
    """This rank's slice of the full batch of the step: x (N_r, C, 4), dy like x."""
    rng = np.random.default_rng(seed)
    total = sum(SIZES)
    x = rng.normal(0.5, 2.0, size=(total, CHANNELS, 4)).astype(np.float32)
    dy = rng.normal(size=(total, CHANNELS, 4)).astype(np.float32)
    start = sum(SIZES[:rank])
    return x[start:start + SIZES[rank]], dy[start:start + SIZES[rank]]


def train(loss_net, rank, seed, record, tag, steps=STEPS):
    """`steps` steps of forward + backward of loss_net; records inputs and results under `tag`."""
    params = loss_net.trainable_params()
    grad_fn = ms.value_and_grad(loss_net, grad_position=0, weights=params)
    for step in range(steps):
        x, dy = batch(rank, seed + step)
        loss, (dx, dparams) = grad_fn(Tensor(x), Tensor(dy))
        record[f"{tag}x{step}"], record[f"{tag}dy{step}"] = x, dy
        record[f"{tag}loss{step}"] = loss.asnumpy()
        record[f"{tag}dx{step}"] = dx.asnumpy()
        for param, grad in zip(params, dparams):
            record[f"{tag}grad{step}:{param.name}"] = grad.asnumpy()


def save_state(record, tag, pair):
    for name, layer in (("a", pair.bn_a), ("b", pair.bn_b)):
        record[f"{tag}running_mean_{name}"] = layer.running_mean.asnumpy()
        record[f"{tag}running_var_{name}"] = layer.running_var.asnumpy()


def run(scenario, rank, out_dir, record):
    """One scenario; fills `record` and returns extra metadata."""
    seed = 1000 + SCENARIOS.index(scenario) * 10
    if scenario == "extra_unused_and_eval":
        # Copies that only rank 0 builds: one never called, one evaluated (running
        # statistics, no communication) before the model is built and after it trained.
        copies = [SyncBatchNorm(CHANNELS) for _ in range(2)] if rank == 0 else []
        pair = Pair()
        for layer in copies[1:]:
            layer.set_train(False)
            layer(Tensor(batch(rank, seed)[0])).asnumpy()
    elif scenario == "extra_subgroup":
        if rank in SUBGROUP_RANKS:  # trained on a group of its own before the model is built
            extra = SyncBatchNorm(CHANNELS, process_group=SUBGROUP)
            extra.set_train(True)
            grad_extra = ms.grad(Loss(extra), grad_position=0)
            x, dy = batch(rank, seed + 7)
            record["subgroup_dx"] = grad_extra(Tensor(x), Tensor(dy)).asnumpy()
            record["subgroup_x"], record["subgroup_dy"] = x, dy
        pair = Pair()
    elif scenario == "build_order":
        pair = Pair(build_b_first=rank == 1)
    elif scenario == "teacher_student":
        if rank == 0:
            teacher, student = Pair(), Pair()
        else:
            student, teacher = Pair(), Pair()
        loss_net = Loss(student, teacher)
        loss_net.set_train(True)
        train(loss_net, rank, seed, record, "")
        save_state(record, "student_", student)
        save_state(record, "teacher_", teacher)
        return {}
    elif scenario == "deep_copied_teacher":  # an EMA / self-distillation teacher: copy.deepcopy
        student = Pair()
        teacher = copy.deepcopy(student)
        loss_net = Loss(student, teacher)
        loss_net.set_train(True)
        train(loss_net, rank, seed, record, "")
        save_state(record, "student_", student)
        save_state(record, "teacher_", teacher)
        return {}
    elif scenario == "weight_sharing":
        pair = Pair(shared=True)
    elif scenario == "rebuilt_after_checkpoint":
        first = Loss(Pair())
        first.set_train(True)
        train(first, rank, seed, record, "before_")
        path = os.path.join(out_dir, f"rank{rank}.ckpt")
        ms.save_checkpoint(first, path)
        if rank == 0:
            SyncBatchNorm(CHANNELS)  # an evaluation copy that only rank 0 builds
        rebuilt = Loss(Pair())
        for layer in (rebuilt.models[0].bn_a, rebuilt.models[0].bn_b):  # defaults until loaded
            layer.weight.set_data(Tensor(np.ones(CHANNELS, np.float32)))
            layer.bias.set_data(Tensor(np.zeros(CHANNELS, np.float32)))
        not_loaded, _ = ms.load_param_into_net(rebuilt, ms.load_checkpoint(path))
        rebuilt.set_train(True)
        train(rebuilt, rank, seed + STEPS, record, "")
        save_state(record, "", rebuilt.models[0])
        return {"not_loaded": list(not_loaded)}
    elif scenario == "mispaired":
        pair = Pair()
        pair.set_train(True)
        swapped = SwappedBackward(pair, b_first=rank == 0)
        x, dy = batch(rank, seed)
        swapped(Tensor(x), Tensor(dy)).asnumpy()
        return {}
    else:
        raise ValueError(scenario)
    loss_net = Loss(pair)
    loss_net.set_train(True)
    train(loss_net, rank, seed, record, "")
    save_state(record, "", pair)
    return {}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--modes", default="pynative,graph")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = parser.parse_args()
    ms.set_context(device_target="CPU")
    init()
    rank = get_rank()
    if rank in SUBGROUP_RANKS:
        create_group(SUBGROUP, SUBGROUP_RANKS)
    for mode in args.modes.split(","):
        ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
        for scenario in args.scenarios.split(","):
            out_dir = os.path.join(args.out, f"{mode}_{scenario}")
            os.makedirs(out_dir, exist_ok=True)
            record, meta = {}, dict(rank=rank, mode=mode, scenario=scenario, sizes=SIZES)
            try:
                meta.update(run(scenario, rank, out_dir, record), status="ok")
            except Exception as err:  # recorded; the test decides whether it was expected
                meta.update(status="error", error_type=type(err).__name__, message=str(err),
                            traceback=traceback.format_exc())
            np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **record)
            with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
                json.dump(meta, f)
            print(f"rank {rank} {mode} {scenario}: {meta['status']}", flush=True)


if __name__ == "__main__":
    main()
