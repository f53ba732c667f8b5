"""Train a small ResNet with SyncBatchNorm on N ranks with Model.train, and check it against one process.

Launch (2 CPU ranks by default):

    bash launch/run_cpu.sh                           # = msrun --worker_num=2 ... this script
    bash launch/run_cpu.sh --amp O2                  # float16 mixed precision, loss scale 128
    bash launch/run_cpu.sh --mode graph --steps 40   # see the known issue in --help

What it does, the way a MindSpore user writes it:

1. builds a ResNet-style network from ``mindspore.nn.BatchNorm2d`` layers and converts it
   with ``SyncBatchNorm.convert_sync_batchnorm`` after ``init()``;
2. sets the ``DATA_PARALLEL`` context (``gradients_mean=True``) and trains with
   ``Model(net, loss_fn, optimizer, amp_level=--amp, loss_scale_manager=...)`` and
   ``model.train`` over a ``mindspore.dataset`` sharded over the ranks: synthetic
   16x16 images whose class (10 classes) shows in their colour and pattern; rank 0
   prints a line per step;
3. rank 0 then trains the *unconverted* network (plain nn.BatchNorm2d, one process, no
   communication, same amp level) on the concatenated per-step batches and prints the
   maximum difference of every parameter and running statistic: PASS/FAIL (exit status
   1 on FAIL);
4. rank 0 saves the checkpoint, loads it into a converted network, into that network
   reverted with ``revert_sync_batchnorm`` and into a fresh plain network, checks that
   the three give the same evaluation outputs (float32), and reports the accuracy on
   held-out images (chance: 0.10);
5. it lists the files it wrote, in a new folder per run (``--out-root``, default
   ./syncbn_runs/run-<date>-<time>; ``--out DIR`` for a folder of your choice): an earlier
   run's results are never overwritten.

Without msrun the script runs as one rank (no communication), which is a plain run.
"""
import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import mindspore as ms
import mindspore.dataset as ds
from mindspore import nn
from mindspore.amp import FixedLossScaleManager
from mindspore.train import Callback, Model

from ms_syncbn import GuardCodeCheck, SyncBatchNorm, remap_batchnorm_checkpoint, revert_sync_batchnorm

NUM_CLASSES = 10
IMAGE_SHAPE = (3, 16, 16)
EVAL_SIZE = 256
# Largest allowed |synchronized - single process| per amp level (measured: README,
# "Mixed precision and MindSpore's training APIs"). float32 differs by summation order only
# (~1e-6 after 30 steps). Under float16 a last-bit float32 difference sometimes rounds to
# another float16 value, and the training amplifies it: at O2, 4e-6 after 1 step, 3e-4
# after 3, 3e-3 after 12, 5e-2 after 30 (tests/test_amp_training.py checks 3 steps to 1e-4).
TOLERANCE = {"O0": 1e-4, "O1": 0.1, "O2": 0.1, "O3": 0.1}


# ------------------------------------------------------------------------------------------------
# The network: a plain MindSpore ResNet, as a user would have it


class BasicBlock(nn.Cell):
    """conv-BN-ReLU-conv-BN plus a (projected) shortcut, then ReLU."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, pad_mode="pad",
                               padding=1, has_bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, pad_mode="pad", padding=1,
                               has_bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.SequentialCell([
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, has_bias=False),
                nn.BatchNorm2d(out_channels)])
        else:
            self.shortcut = nn.Identity()

    def construct(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallResNet(nn.Cell):
    """Stem (conv-BN-ReLU), two stages of BasicBlocks, global average pool, classifier."""

    def __init__(self, widths=(8, 16), num_classes=NUM_CLASSES):
        super().__init__()
        self.stem = nn.SequentialCell([
            nn.Conv2d(IMAGE_SHAPE[0], widths[0], 3, pad_mode="pad", padding=1, has_bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU()])
        self.layers = nn.CellList([BasicBlock(widths[0], widths[0], 1),
                                   BasicBlock(widths[0], widths[1], 2)])
        self.head = nn.Dense(widths[1], num_classes)

    def construct(self, x):
        x = self.stem(x)
        for block in self.layers:
            x = block(x)
        return self.head(x.mean(axis=(2, 3)))


def build_network(seed):
    """The same initial weights in every process: drawn from NumPy, in parameter order."""
    net = SmallResNet()
    rng = np.random.default_rng(seed)
    for param in net.trainable_params():
        if param.name.endswith(("gamma", "beta")):
            continue  # BatchNorm starts at gamma = 1, beta = 0
        fan_in = int(np.prod(param.shape[1:])) if len(param.shape) > 1 else param.shape[0]
        value = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=param.shape)
        param.set_data(ms.Tensor(value.astype(np.float32)))
    return net


# ------------------------------------------------------------------------------------------------
# Data: synthetic images; the class shows in a colour offset and a pattern, plus noise


def class_signals(seed):
    """(colour offsets (10, 3, 1, 1), patterns (10, 3, 16, 16)), one per class."""
    rng = np.random.default_rng(seed + 1)
    colours = rng.normal(0.0, 1.0, size=(NUM_CLASSES, IMAGE_SHAPE[0], 1, 1))
    return colours, rng.normal(0.0, 1.0, size=(NUM_CLASSES,) + IMAGE_SHAPE)


def make_batch(key, size, signals):
    """images (size, 3, 16, 16) f32, labels (size,) i32, drawn from the seed sequence `key`."""
    colours, patterns = signals
    rng = np.random.default_rng(key)
    labels = rng.integers(0, NUM_CLASSES, size=size)
    images = (colours[labels] + 0.5 * patterns[labels]
              + rng.normal(0.0, 1.0, size=(size,) + IMAGE_SHAPE) + 0.5)
    return images.astype(np.float32), labels.astype(np.int32)


def training_arrays(steps, global_size, signals, seed):
    """Every training sample, global batch after global batch."""
    images, labels = make_batch([seed, 0], steps * global_size, signals)
    return {"image": images, "label": labels}


def rank_dataset(arrays, rank, world, batch_size):
    """This rank's shard of the training samples, in batches of batch_size (one per step)."""
    dataset = ds.NumpySlicesDataset(arrays, shuffle=False, num_shards=world, shard_id=rank)
    return dataset.batch(batch_size, drop_remainder=True)


def concatenated_dataset(arrays, world, batch_size):
    """Step s: the batches s of all ranks' shards as one batch, for the single-process run."""
    shards = [list(rank_dataset(arrays, r, world, batch_size).create_tuple_iterator(
        output_numpy=True)) for r in range(world)]
    images = np.concatenate([np.concatenate([s[i][0] for s in shards]) for i in range(len(shards[0]))])
    labels = np.concatenate([np.concatenate([s[i][1] for s in shards]) for i in range(len(shards[0]))])
    return ds.NumpySlicesDataset({"image": images, "label": labels},
                                 shuffle=False).batch(world * batch_size)


# ------------------------------------------------------------------------------------------------
# Training: Model.train, as a user writes it


class StepLog(Callback):
    """Keeps each step's loss; prints a line per step (the first one includes compilation)."""

    def __init__(self, steps, log):
        super().__init__()
        self.steps, self.log, self.losses, self.start = steps, log, [], None

    def on_train_step_begin(self, run_context):
        self.start = time.perf_counter()

    def on_train_step_end(self, run_context):
        elapsed = time.perf_counter() - self.start
        out = run_context.original_args().net_outputs
        loss = float((out[0] if isinstance(out, (tuple, list)) else out).asnumpy())
        self.losses.append(loss)
        if self.log:
            step = len(self.losses)
            note = "  (first step: includes compiling the network)" if step == 1 else ""
            print(f"step {step:3d}/{self.steps}  loss {loss:.4f}  step time "
                  f"{elapsed * 1e3:7.1f} ms{note}", flush=True)


def train(net, dataset, args, steps, log):
    """model.train over dataset with the amp level and a fixed loss scale; returns the losses."""
    scale = args.loss_scale if args.amp != "O0" else 1.0
    optimizer = nn.Momentum(net.trainable_params(), learning_rate=args.lr, momentum=0.9,
                            loss_scale=scale)
    loss_fn = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    # On CPU MindSpore accepts a fixed scale that never skips a step; the optimizer divides
    # the gradients by the same scale.
    manager = FixedLossScaleManager(scale, drop_overflow_update=False)
    model = Model(net, loss_fn=loss_fn, optimizer=optimizer, amp_level=args.amp,
                  loss_scale_manager=manager)
    step_log = StepLog(steps, log)
    # GuardCodeCheck: on Ascend, a step a SyncBatchNorm stopped (NaN, no exception in the step)
    # ends in the same named error the CPU table raises in the step (README, Errors).
    model.train(1, dataset, callbacks=[step_log, GuardCodeCheck()], dataset_sink_mode=False)
    return step_log.losses


# ------------------------------------------------------------------------------------------------
# Checks


def state_by_sync_names(plain_net, sync_net):
    """plain_net's parameters and running statistics under sync_net's names, as NumPy."""
    plain = {p.name: p for p in plain_net.get_parameters()}
    remapped = remap_batchnorm_checkpoint(plain, sync_net)
    return {p.name: remapped[p.name].asnumpy() for p in sync_net.get_parameters()
            if p.name in remapped}


def max_difference(sync_net, plain_net):
    """Largest |sync - plain| over every parameter and running statistic, and where."""
    plain_state = state_by_sync_names(plain_net, sync_net)
    worst, where = 0.0, None
    for param in sync_net.get_parameters():
        if param.name.endswith(("stat_shift", "num_batches_tracked", "guard_code")):
            continue  # SyncBatchNorm's own buffers (guard_code stays 0: the CPU guard raises)
        if param.name not in plain_state:  # a check that compared nothing must not pass
            return float("inf"), f"{param.name} (no counterpart in the single-process network)"
        diff = float(np.max(np.abs(param.asnumpy() - plain_state[param.name])))
        if diff >= worst:
            worst, where = diff, param.name
    return worst, where


def evaluate(net, images):
    net.set_train(False)
    return net(ms.Tensor(images)).asnumpy()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="train_resnet_syncbn.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--amp", choices=("O0", "O1", "O2", "O3"), default="O0",
                        help="mindspore.amp level of Model(amp_level=...) (default O0: float32); "
                             "O1-O3 use float16 and a fixed loss scale")
    parser.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="images per rank and step (default 8)")
    parser.add_argument("--mode", choices=("pynative", "graph"), default="pynative",
                        help="MindSpore execution mode (default pynative). In graph mode "
                             "MindSpore's runtime issues the collectives of parallel branches "
                             "(this ResNet's shortcut) in one order on every rank (README, Known "
                             "issues); should the collectives of two layers ever be paired with "
                             "each other, the step stops with guard code 4")
    parser.add_argument("--lr", type=float, default=0.03, help="learning rate (default 0.03)")
    parser.add_argument("--loss-scale", type=float, default=128.0,
                        help="fixed loss scale with --amp O1-O3 (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="data and weight seed (default 0)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest allowed |synchronized - single-process| (default per amp "
                             "level: " + ", ".join(f"{k} {v:g}" for k, v in TOLERANCE.items()) + ")")
    parser.add_argument("--out-root", default="syncbn_runs",
                        help="each run writes its checkpoint and results to a new folder "
                             "run-<date>-<time> in here (default ./syncbn_runs)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="write them to DIR instead (a new or empty folder: a folder that "
                             "holds a result.json is refused, never overwritten)")
    parser.add_argument("--device", default="CPU", help="device_target (default CPU)")
    return parser.parse_args(argv)


def check_out(args):
    """Refuse --out when it holds an earlier run's results (on every rank, before init())."""
    if args.out is not None and (Path(args.out) / "result.json").exists():
        raise SystemExit(f"train_resnet_syncbn.py: --out {args.out} holds an earlier run's results "
                         f"(result.json); give a new folder, or --out-root for a new one per run")


def new_run_folder(args, now=None):
    """The folder of this run's results, made here: --out, or a new run-<date>-<time> folder
    in --out-root (-2, -3, ... appended when a folder of that second exists). Never one that
    holds an earlier run's results."""
    check_out(args)
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        return out
    root = Path(args.out_root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = (now or datetime.datetime.now()).strftime("run-%Y%m%d-%H%M%S")
    for suffix in [""] + [f"-{n}" for n in range(2, 1000)]:
        out = root / (stamp + suffix)
        try:
            out.mkdir()
            return out
        except FileExistsError:
            continue
    raise SystemExit(f"train_resnet_syncbn.py: no free run folder {root / stamp}-N")


def main(argv=None):
    args = parse_args(argv)
    check_out(args)
    tolerance = TOLERANCE[args.amp] if args.tolerance is None else args.tolerance
    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE,
                   device_target=args.device)
    # msrun runs this script in its scheduler process too (MS_ROLE=MS_SCHED): init() makes
    # that process the scheduler, and it never gets past init() as a rank.
    launched_by_msrun = "MS_ROLE" in os.environ
    if launched_by_msrun:
        from mindspore.communication import get_group_size, get_rank, init
        init()
        rank, world = get_rank(), get_group_size()
    else:
        rank, world = 0, 1
    log = rank == 0
    out = new_run_folder(args) if log else None  # rank 0 writes the results
    signals = class_signals(args.seed)
    arrays = training_arrays(args.steps, world * args.batch_size, signals, args.seed)
    if log:
        print(f"SyncBatchNorm ResNet: {world} rank(s) x {args.batch_size} images per step, "
              f"{args.steps} steps, {args.mode} mode, amp {args.amp}; results in {out}", flush=True)

    # 1-2. Convert the plain network and train it synchronized: Model.train, DATA_PARALLEL.
    if world > 1:
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL,
                                     gradients_mean=True)
    net = SyncBatchNorm.convert_sync_batchnorm(build_network(args.seed))
    start = time.perf_counter()
    losses = train(net, rank_dataset(arrays, rank, world, args.batch_size), args, args.steps, log)
    train_seconds = time.perf_counter() - start
    if rank != 0:
        return 0

    # 3. The same training on one process: the unconverted network, the concatenated batches.
    print("single-process run of the unconverted network on the concatenated batches ...",
          flush=True)
    ms.reset_auto_parallel_context()
    reference = build_network(args.seed)
    train(reference, concatenated_dataset(arrays, world, args.batch_size), args, args.steps, False)
    diff, where = max_difference(net, reference)
    passed = diff <= tolerance
    print(f"max |synchronized - single process| over parameters and running statistics: "
          f"{diff:.3e} (at {where}) -> {'PASS' if passed else 'FAIL'} "
          f"(tolerance {tolerance:g} for amp {args.amp})", flush=True)

    # 4. Checkpoint; float32 evaluation of the checkpoint as converted, reverted and fresh
    # plain network (amp changed `net` itself to float16).
    ckpt = out / "resnet_syncbn.ckpt"
    ms.save_checkpoint(net, str(ckpt))
    params = ms.load_checkpoint(str(ckpt))
    test_images, test_labels = make_batch([args.seed, 1], EVAL_SIZE, signals)
    converted = SyncBatchNorm.convert_sync_batchnorm(build_network(args.seed + 1))
    not_loaded, _ = ms.load_param_into_net(converted, params)
    sync_logits = evaluate(converted, test_images)
    plain_net = revert_sync_batchnorm(converted)
    plain_logits = evaluate(plain_net, test_images)
    fresh = build_network(seed=args.seed + 2)  # other weights: the checkpoint must set them all
    fresh_missing, _ = ms.load_param_into_net(fresh, remap_batchnorm_checkpoint(params, fresh))
    fresh_logits = evaluate(fresh, test_images)
    revert_diff = float(np.max(np.abs(plain_logits - sync_logits)))
    load_diff = float(np.max(np.abs(fresh_logits - sync_logits)))
    accuracy = float(np.mean(sync_logits.argmax(axis=1) == test_labels))
    loaded_ok = not [n for n in not_loaded if not n.endswith(("stat_shift", "guard_code"))] \
        and not fresh_missing
    reverted_ok = revert_diff <= 1e-5 and load_diff <= 1e-5 and loaded_ok
    print(f"loss {np.mean(losses[:5]):.3f} (first 5 steps) -> {np.mean(losses[-5:]):.3f} "
          f"(last 5); accuracy {accuracy:.2f} on {EVAL_SIZE} held-out images "
          f"(chance {1 / NUM_CLASSES:.2f})", flush=True)
    print(f"checkpoint loaded into a converted network, the same reverted to "
          f"{type(plain_net.stem[1]).__name__}, and a fresh plain network: eval max diff "
          f"{revert_diff:.1e} and {load_diff:.1e} -> {'PASS' if reverted_ok else 'FAIL'}",
          flush=True)
    passed = passed and reverted_ok
    written = {
        ckpt: "the trained network (SyncBatchNorm names; remap_batchnorm_checkpoint for nn.BatchNorm2d)",
        out / "result.json": "settings, per-step losses, differences, accuracy, PASS/FAIL",
        out / "eval_images.npy": f"the {EVAL_SIZE} held-out images",
        out / "eval_logits.npy": "their float32 logits from the checkpoint",
    }
    (out / "result.json").write_text(json.dumps({
        "world": world, "batch_size": args.batch_size, "steps": args.steps, "mode": args.mode,
        "amp": args.amp, "losses": losses, "max_diff": diff, "max_diff_at": where,
        "tolerance": tolerance, "revert_diff": revert_diff, "load_diff": load_diff,
        "accuracy": accuracy, "train_seconds": train_seconds, "passed": passed}, indent=1))
    np.save(out / "eval_logits.npy", sync_logits)
    np.save(out / "eval_images.npy", test_images)
    print(f"files written (in {out}):", flush=True)
    for path, what in written.items():
        print(f"  {path}  {what}", flush=True)
    print("PASS" if passed else "FAIL", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
