"""One process, no init(): the guard codes a stopped step leaves behind, read and raised by name.

    python tests/workers/guard_codes.py --mode {pynative,graph} --table {ascend,cpu}

Used by tests/test_guard_codes.py. The layers believe they are in a group of two ranks
(ms_syncbn.batchnorm.resolve_group is replaced) and their all-reduce is a stand-in for what
the other rank would add (an ops.Custom pyfunc where the AllReduce kernels go):

- ``other rank empty``: adds nothing (x * 1);
- ``same batch``: the other rank holds the same batch (x * 2);
- ``other rank 1 channel wider``: x * 2, plus 1 in the last slot, which carries the
  channel count in the forward payloads (the backward's last slot, the fingerprint, is off
  by one too: that step's backward is stopped as well).

``--table ascend`` runs every layer on the Ascend table over the emulated A2 primitives
(tests/ascend_emulation.py), whose guard poisons; ``--table cpu`` on the CPU table, whose
guard raises. Prints one JSON object: per case, what the step returned, the layer's
``guard_code`` and state, and what check_guard_codes / GuardCodeCheck raised.
"""
import argparse
import json
import os
import sys
import traceback

import numpy as np
import mindspore as ms
import mindspore.dataset as ds
from mindspore import Tensor, nn, ops
from mindspore.train import Model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

def _last_slot(x):
    return np.eye(1, x.size, x.size - 1, dtype=x.dtype)[0]  # (M,) one-hot on the last slot


def other_rank_empty(channels):
    """What an empty rank adds: zeros, but its constant slots in the forward payloads: its channel
    count in the last slot (3C+2 on the CPU table; C+5 in the moments protocol's first
    all-reduce, [n m | n | n - 1/W | n | n | C], where it also sends -1/W = -1/2 in the N - 1
    slot) and, in the backward payload (2C+1), the same fingerprint as ours (the statistics
    are the group's)."""
    def add(x):
        if x.size == 3 * channels + 2:
            return x + channels * _last_slot(x)
        if x.size == channels + 5:
            return x + channels * _last_slot(x) - 0.5 * np.eye(1, x.size, channels + 1, dtype=x.dtype)[0]
        if x.size == 2 * channels + 1:
            return x + x[-1] * _last_slot(x)
        return x * 1.0  # the moments protocol's second all-reduce
    return add


STAND_INS = {
    "other rank empty": other_rank_empty,
    "same batch": lambda channels: lambda x: x * 2.0,
    "other rank 1 channel wider": lambda channels: lambda x: x * 2.0 + _last_slot(x),
}


def install_stand_in_group():
    """Every SyncBatchNorm built after this believes it is in a group of two ranks; its
    all-reduce is the stand-in named by the layer's `stand_in` class attribute at build time."""
    import ms_syncbn.batchnorm as batchnorm
    from ms_syncbn.comm import CommGroup

    group = CommGroup("stand_in_two_ranks", (0, 1))
    batchnorm.resolve_group = lambda process_group: group

    def all_reduce_sum(_):
        stand_in = STAND_INS[install_stand_in_group.current](install_stand_in_group.channels)
        return ops.Custom(stand_in, out_shape=lambda x: x, out_dtype=lambda x: x, func_type="pyfunc")

    batchnorm.all_reduce_sum = all_reduce_sum


def build_layer(stand_in, channels=3):
    from ms_syncbn import SyncBatchNorm

    install_stand_in_group.current, install_stand_in_group.channels = stand_in, channels
    return SyncBatchNorm(channels)


class Net(nn.Cell):
    """Three layers on their own inputs, so each case's path shows in its error."""

    def __init__(self):
        super().__init__()
        self.healthy = build_layer("same batch")
        self.one_value = build_layer("other rank empty")
        self.wider_peer = build_layer("other rank 1 channel wider")

    def construct(self, a, b, c, upstream_a, upstream_b, upstream_c):
        return ((self.healthy(a) * upstream_a).sum() + (self.one_value(b) * upstream_b).sum()
                + (self.wider_peer(c) * upstream_c).sum())


def layer_record(layer):
    return dict(guard_code=float(layer.guard_code.asnumpy()[0]),
                running_mean=layer.running_mean.asnumpy().tolist(),
                running_var=layer.running_var.asnumpy().tolist(),
                num_batches_tracked=int(layer.num_batches_tracked.asnumpy()),
                guard_where=layer.guard_where, guard_error=layer.guard_error())


def error_of(call):
    try:
        call()
    except Exception as err:  # recorded for the test to judge
        return dict(type=type(err).__name__, message=str(err))
    return None


def direct_step():
    """One training step of Net with gradients; each layer's case shows in its own state."""
    from ms_syncbn import check_guard_codes

    rng = np.random.default_rng(0)
    net = Net()
    net.set_train(True)
    shapes = ((4, 3, 2),  # healthy: 2 x 4 samples
              (1, 3),  # one value per channel in the group
              (4, 3))  # the peer's layer is wider
    inputs = tuple(Tensor(rng.normal(size=shape).astype(np.float32)) for shape in shapes * 2)
    result = {}
    grads = {}

    def step():
        loss, grad = ms.value_and_grad(net, grad_position=(0, 1, 2))(*inputs)
        grads.update(loss=float(loss.asnumpy()), dx=[g.asnumpy().tolist() for g in grad])

    result["step_error"] = error_of(step)
    result["step"] = grads
    result["healthy_inputs"] = dict(x=inputs[0].asnumpy().tolist(), dy=inputs[3].asnumpy().tolist())
    result["layers"] = {name: layer_record(getattr(net, name))
                        for name in ("healthy", "one_value", "wider_peer")}
    result["check_error"] = error_of(lambda: check_guard_codes(net))
    return result


class Classifier(nn.Cell):
    def __init__(self):
        super().__init__()
        ms.set_seed(3)
        self.fc1 = nn.Dense(4, 3)
        self.bn = build_layer("other rank empty")
        self.fc2 = nn.Dense(3, 2)

    def construct(self, x):
        return self.fc2(ops.relu(self.bn(self.fc1(x))))


def model_train(batch_size):
    """Model.train with GuardCodeCheck over 3 steps: losses seen by a callback before it, the
    error raised, the layer's record."""
    from ms_syncbn import GuardCodeCheck
    from mindspore.train import Callback

    rng = np.random.default_rng(1)
    data = rng.normal(size=(3 * batch_size, 4)).astype(np.float32)
    labels = rng.integers(0, 2, size=3 * batch_size).astype(np.int32)
    dataset = ds.NumpySlicesDataset({"x": data, "y": labels}, shuffle=False).batch(batch_size)
    net = Classifier()
    losses = []

    class Losses(Callback):
        def on_train_step_end(self, run_context):
            losses.append(float(run_context.original_args().net_outputs.asnumpy()))

    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                  nn.Momentum(net.trainable_params(), 0.1, 0.9))
    error = error_of(lambda: model.train(1, dataset, callbacks=[Losses(), GuardCodeCheck()],
                                         dataset_sink_mode=False))
    return dict(losses=losses, error=error, layer=layer_record(net.bn))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["pynative", "graph"], required=True)
    parser.add_argument("--table", choices=["ascend", "cpu"], required=True)
    args = parser.parse_args()
    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE,
                   device_target="CPU")
    if args.table == "ascend":
        from tests.ascend_emulation import use_emulated_ascend
        use_emulated_ascend("a2")
    install_stand_in_group()
    out = {}
    for name, case in (("direct", direct_step),
                       ("model_one_value", lambda: model_train(batch_size=1)),
                       ("model_healthy", lambda: model_train(batch_size=4))):
        try:
            out[name] = case()
        except Exception:  # the case itself broke: the test shows why
            out[name] = dict(crashed=traceback.format_exc())
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
