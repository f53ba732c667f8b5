"""Train a small network as a user's script would, unconverted and then converted, and mark on
stderr which phase each of MindSpore's console lines belongs to (tests/test_console.py).

Each mode runs the phase "plain" (nn.BatchNorm2d) first, then "converted" (the same network
after SyncBatchNorm.convert_sync_batchnorm), and, with --emulate-ascend, "converted-ascend"
(the emulated Ascend table): a line MindSpore prints once per process shows in "plain", so a
line that shows only in a converted phase is one the layer caused. Every phase runs the same
recipes: TrainOneStepCell steps and evaluation, Model.train at amp O2 (with its fixed loss
scale, as on CPU it must be) and predict, and a step compiled once for dynamic shapes. The converted phases also run layers with
momentum=None, track_running_stats switched off, and one built without running statistics.

Run alone (the layers are local) or under msrun (init() and DATA_PARALLEL: the layers synchronize).
"""
import argparse
import os
import sys

import numpy as np
import mindspore as ms
from mindspore import nn
import mindspore.dataset as ds
from mindspore.train import FixedLossScaleManager, Model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

PHASE_MARK = "=== console phase: "


def mark(phase):
    """Write the phase marker to stderr's file descriptor, where MindSpore's C++ log goes."""
    sys.stderr.flush()
    os.write(2, f"{PHASE_MARK}{phase}\n".encode())


class Net(nn.Cell):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.fc = nn.Dense(8 * 8 * 8, 10)

    def construct(self, x):
        return self.fc(self.flat(self.relu(self.bn(self.conv(x)))))


def build(converted, configure=None):
    from ms_syncbn import SyncBatchNorm

    net = Net()
    if converted:
        net = SyncBatchNorm.convert_sync_batchnorm(net)
        if configure is not None:
            configure(net)
    return net


def train_steps(net, rng):
    loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    opt = nn.Momentum(net.trainable_params(), 0.01, 0.9)
    step = nn.TrainOneStepCell(nn.WithLossCell(net, loss), opt)
    step.set_train()
    for _ in range(2):
        x = ms.Tensor(rng.normal(size=(4, 3, 8, 8)).astype(np.float32))
        step(x, ms.Tensor(rng.integers(0, 10, size=4).astype(np.int32))).asnumpy()
    net.set_train(False)
    net(ms.Tensor(rng.normal(size=(4, 3, 8, 8)).astype(np.float32))).asnumpy()


class PooledLoss(nn.Cell):
    """Cross-entropy of the channels' spatial means (8 classes): any image size."""

    def __init__(self):
        super().__init__()
        self.loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")

    def construct(self, y, label):
        return self.loss(y.mean(axis=(2, 3)), label)


def dynamic_shape_steps(net, rng):
    """A step compiled once for any batch and image size (multi-scale training), two sizes."""
    opt = nn.Momentum(net.trainable_params(), 0.01, 0.9)
    step = nn.TrainOneStepCell(nn.WithLossCell(nn.SequentialCell([net.conv, net.bn, net.relu]),
                                               PooledLoss()), opt)
    step.set_train()
    step.set_inputs(ms.Tensor(shape=[None, 3, None, None], dtype=ms.float32),
                    ms.Tensor(shape=[None], dtype=ms.int32))
    for batch, size in ((4, 8), (3, 10)):
        x = ms.Tensor(rng.normal(size=(batch, 3, size, size)).astype(np.float32))
        step(x, ms.Tensor(rng.integers(0, 8, size=batch).astype(np.int32))).asnumpy()


def model_train_o2(net, rng):
    data = ds.NumpySlicesDataset({"x": rng.normal(size=(8, 3, 8, 8)).astype(np.float32),
                                  "y": rng.integers(0, 10, size=8).astype(np.int32)},
                                 shuffle=False).batch(4)
    loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    opt = nn.Momentum(net.trainable_params(), 0.01, 0.9, loss_scale=128.0)
    model = Model(net, loss, opt, amp_level="O2",
                  loss_scale_manager=FixedLossScaleManager(128.0, drop_overflow_update=False))
    model.train(1, data, dataset_sink_mode=False)
    model.predict(ms.Tensor(rng.normal(size=(4, 3, 8, 8)).astype(np.float32))).asnumpy()


def no_running_stats(net):
    from ms_syncbn import SyncBatchNorm

    net.bn = SyncBatchNorm(8, track_running_stats=False)


def untracked(net):
    net.bn.track_running_stats = False


def cumulative(net):
    net.bn.momentum = None


def run_phase(phase, converted):
    mark(phase)
    rng = np.random.default_rng(0)
    train_steps(build(converted), rng)
    model_train_o2(build(converted), rng)
    dynamic_shape_steps(build(converted), rng)
    if converted:
        for configure in (cumulative, untracked, no_running_stats):
            train_steps(build(converted, configure), rng)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)  # tests/harness.py passes it; unused
    parser.add_argument("--emulate-ascend", action="store_true")
    args = parser.parse_args()
    ms.set_device("CPU")
    if "MS_WORKER_NUM" in os.environ or "RANK_SIZE" in os.environ:
        from mindspore.communication import init
        init()
        # As data-parallel users train: the plain network's gradients are all-reduced too (and
        # so MindSpore's first-connection lines show in the plain phase, as in users' jobs).
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    for mode_name, mode in (("pynative", ms.PYNATIVE_MODE), ("graph", ms.GRAPH_MODE)):
        ms.set_context(mode=mode)
        run_phase(f"{mode_name} plain", converted=False)
        run_phase(f"{mode_name} converted", converted=True)
    if args.emulate_ascend:
        from tests.ascend_emulation import use_emulated_ascend

        use_emulated_ascend("a2")
        for mode_name, mode in (("pynative", ms.PYNATIVE_MODE), ("graph", ms.GRAPH_MODE)):
            ms.set_context(mode=mode)
            run_phase(f"{mode_name} converted-ascend", converted=True)
    mark("done")


if __name__ == "__main__":
    main()
