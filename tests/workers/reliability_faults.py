"""msrun worker: train a SyncBatchNorm layer until one rank fails in a chosen way.

Launched by tests/test_reliability.py through tests/harness.py::run_msrun:

    reliability_faults.py --out DIR FAULT

FAULT is one of

- ``raise``: at step FAULT_STEP rank 1 passes C+1 channels to its C-channel layer
  (a ValueError on that rank before any collective) while rank 0 calls normally;
- ``sigkill``: at step FAULT_STEP rank 1 kills itself with SIGKILL (no traceback,
  no cleanup) while rank 0 calls the layer;
- ``skip``: at step FAULT_STEP rank 1 stays alive but does not call the layer for
  SKIP_SECONDS (a rank that skips a layer, or a straggler), while rank 0 calls it;
- ``model_mismatch``: rank r builds a layer of C + r features (the ranks disagree
  on the model) and both call it once with inputs that fit their own layer.

Every rank prints ``rank R pid P`` at start (msrun names a failed worker only by
pid) and ``rank R fault FAULT at T`` (T = time.time()) just before it fails or, on
the healthy rank, before the call that cannot complete. Per rank it writes
``DIR/rank<r>.json``: the steps completed, and for ``model_mismatch`` the call's
outcome (its output and batch, or the error) right after the call returns.
"""
import argparse
import json
import os
import signal
import time
import traceback

import numpy as np
import mindspore as ms
from mindspore.communication import get_rank, init

from ms_syncbn import SyncBatchNorm

CHANNELS = 4
FAULT_STEP = 2
SKIP_SECONDS = 150  # longer than any collective timeout the test configures
STEPS = 4


def local_batch(step, rank, channels):
    """Rank-dependent (3 + rank, channels, 5) float32 batch of step ``step``."""
    rng = np.random.default_rng([step, rank])
    return rng.normal(1.0, 2.0, size=(3 + rank, channels, 5)).astype(np.float32)


def announce_fault(rank, fault):
    print(f"rank {rank} fault {fault} at {time.time():.3f}", flush=True)


def write_json(out, rank, record):
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)


def train_until_fault(fault, rank, out):
    layer = SyncBatchNorm(CHANNELS)
    layer.set_train(True)
    completed = []
    for step in range(STEPS):
        channels = CHANNELS
        if step == FAULT_STEP:
            announce_fault(rank, fault)
            if rank == 1:
                if fault == "sigkill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if fault == "skip":
                    time.sleep(SKIP_SECONDS)
                if fault == "raise":
                    channels = CHANNELS + 1
        layer(ms.Tensor(local_batch(step, rank, channels))).asnumpy()
        completed.append(step)
        write_json(out, rank, {"completed_steps": completed})


def call_mismatched_model(rank, out):
    channels = CHANNELS + rank
    layer = SyncBatchNorm(channels)
    layer.set_train(True)
    x = local_batch(0, rank, channels)
    announce_fault(rank, "model_mismatch")
    try:
        y = layer(ms.Tensor(x)).asnumpy()
    except Exception as err:  # recorded for the test, then re-raised: the job must fail
        write_json(out, rank, {"error": f"{type(err).__name__}: {err}",
                               "traceback": traceback.format_exc()})
        raise
    write_json(out, rank, {"channels": channels, "x": x.tolist(), "y": y.tolist(),
                           "running_mean": layer.running_mean.asnumpy().tolist()})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("fault", choices=["raise", "sigkill", "skip", "model_mismatch"])
    args = parser.parse_args()
    init()
    rank = get_rank()
    print(f"rank {rank} pid {os.getpid()}", flush=True)
    if args.fault == "model_mismatch":
        call_mismatched_model(rank, args.out)
    else:
        train_until_fault(args.fault, rank, args.out)


if __name__ == "__main__":
    main()
