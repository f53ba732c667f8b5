"""msrun worker: run many SyncBatchNorm scenarios in one job; every rank saves what it saw and got.

Launched by tests/test_sync_multiprocess.py through tests/harness.py::run_msrun:

    sync_scenarios.py --out DIR --mode {pynative,graph} [--emulate-ascend {a2,910_95}]
                      [--device {CPU,Ascend}] SCENARIO [SCENARIO ...]

``--emulate-ascend`` runs every layer on the Ascend kernel table over the CPU stand-ins
of tests/ascend_emulation.py (tests/test_ascend_emulated.py); ``--device Ascend`` runs
on real NPUs with the layer's own (Ascend) table (launch/run_ascend_scenarios.sh).

Each scenario builds a layer, trains it for a few steps and evaluates it. All
members of a group draw the group's full batches from a shared seed and keep
their own slice (batch sizes differ between ranks, and may be 0), so the test
can rebuild the full batch from the saved slices and check it against
tests/reference.py. Per scenario and rank it writes ``DIR/<scenario>/rank<r>.npz``
(inputs, upstream gradients, outputs, gradients, running statistics per step)
and ``rank<r>.json`` (group, sizes, layer arguments, and the error if one was
raised). Results are written as each scenario ends, so a later hang or crash
cannot hide earlier results. A scenario that raises is recorded and the next
one runs. A scenario may name its own mode (``mode``), which holds while it runs:
one job then covers PyNative and graph mode.
"""
import argparse
import json
import os
import sys
import traceback
import zlib
from pathlib import Path

import numpy as np
import mindspore as ms
from mindspore import nn
from mindspore.communication import GlobalComm, create_group, get_group_size, get_rank, init

from core_steps import LayerDriver, random_batch, round_to, set_parameters
from ms_syncbn import SyncBatchNorm, convert_sync_batchnorm, create_syncbn_process_group

EPS = 1e-5

# A scenario: per-step local batch sizes of the group members (group order), the
# trailing shape (C, *), layer arguments, input dtype, data, eval batch sizes, and
# optionally the subgroups: {name: ranks}, a rank runs the one it belongs to; or
# group_size: the groups of create_syncbn_process_group(group_size), per-group values keyed
# "<first rank>-<last rank>". build="convert": the layer is an nn.BatchNorm2d with the
# layer's momentum converted by convert_sync_batchnorm(..., process_group=group).
# dynamic=True: the steps run in graphs compiled once for dynamic shapes (LayerDriver's
# dynamic_rank; under mindspore.jit in a PyNative job), each training step with its own
# trailing shape from "tails" ("tail" is the evaluation's).
SCENARIOS = {
    "uneven_4d": dict(sizes=[[3, 5]] * 3, tail=(4, 3, 3), eval_sizes=[2, 4]),
    "empty_rank": dict(sizes=[[0, 6], [4, 0], [0, 5]], tail=(3, 5), eval_sizes=[0, 3]),
    "large_mean": dict(sizes=[[3, 5]] * 2, tail=(3, 8, 8), eval_sizes=[2, 3], mean=1e4, std=2.0,
                       layer=dict(momentum=1.0)),
    "float16": dict(sizes=[[3, 5]] * 2, tail=(3, 4, 4), eval_sizes=[2, 2], dtype="float16"),
    "bfloat16": dict(sizes=[[2, 5]] * 2, tail=(3, 6), eval_sizes=[2, 2], dtype="bfloat16"),
    "affine_false_cma": dict(sizes=[[4, 3], [2, 6], [5, 1]], tail=(3, 5), eval_sizes=[3, 1],
                             layer=dict(affine=False, momentum=None)),
    "untracked": dict(sizes=[[3, 5]] * 2, tail=(2, 4, 3), eval_sizes=[3, 2],
                      layer=dict(track_running_stats=False)),
    "rank2": dict(sizes=[[1, 4], [5, 2], [3, 3]], tail=(5,), eval_sizes=[1, 2]),
    "rank3": dict(sizes=[[2, 3]] * 2, tail=(3, 7), eval_sizes=[2, 1]),
    "rank5": dict(sizes=[[2, 3]] * 2, tail=(2, 3, 2, 4), eval_sizes=[1, 2]),
    "float64": dict(sizes=[[3, 5], [4, 0]], tail=(3, 4, 4), eval_sizes=[2, 2], dtype="float64"),
    # a step in which every rank's batch is empty: no statistic changes, nothing is NaN
    "all_empty": dict(sizes=[[3, 5], [0, 0], [2, 4]], tail=(3, 4), eval_sizes=[2, 0]),
    # the group's batch holds one value per channel: every rank must raise
    "one_value": dict(sizes=[[1, 0]], tail=(3,), eval_sizes=[1, 1]),
    # 4 ranks
    "world4_uneven": dict(sizes=[[2, 0, 3, 5], [1, 4, 0, 2], [3, 3, 1, 0]], tail=(3, 4),
                          eval_sizes=[1, 0, 2, 1], layer=dict(momentum=0.3)),
    "world4_all_empty": dict(sizes=[[2, 0, 3, 1], [0, 0, 0, 0], [1, 2, 0, 3]], tail=(2, 3, 2),
                             eval_sizes=[1, 0, 2, 1]),
    "world4_large_mean": dict(sizes=[[3, 0, 2, 4]] * 2, tail=(3, 6, 6), eval_sizes=[2, 1, 0, 1],
                              mean=1e4, std=2.0, layer=dict(momentum=1.0)),
    "world4_bfloat16": dict(sizes=[[2, 3, 1, 0]] * 2, tail=(3, 6), eval_sizes=[0, 1, 2, 1],
                            dtype="bfloat16"),
    "world4_float64": dict(sizes=[[0, 3, 2, 4]] * 2, tail=(2, 5), eval_sizes=[1, 1, 1, 1],
                           dtype="float64", layer=dict(affine=False, momentum=None)),
    "subgroups": dict(groups={"0-1": [0, 1], "2-3": [2, 3]}, tail=(3, 2, 3), eval_sizes=[2, 1],
                      sizes={"0-1": [[3, 5], [2, 2], [4, 1]], "2-3": [[1, 6], [0, 3], [5, 5]]},
                      mean={"0-1": 0.0, "2-3": 50.0}, std=2.0, layer=dict(momentum=0.5)),
    # one graph compiled for dynamic shapes (graph mode; jit in a PyNative job) trains on steps
    # whose N per rank (one rank empty) and trailing dimensions all change: "tails" per step
    "dynamic_shapes": dict(sizes=[[4, 2], [0, 5], [3, 3], [6, 0]], dynamic=True,
                           tails=[(3, 5, 4), (3, 2, 7), (3, 6, 3), (3, 1, 5)], tail=(3, 4, 2),
                           eval_sizes=[2, 0]),
    "world4_dynamic_shapes": dict(sizes=[[2, 0, 3, 1], [0, 4, 1, 2], [3, 2, 0, 0]], dynamic=True,
                                  tails=[(3, 5, 4), (3, 2, 7), (3, 6, 3)], tail=(3, 4, 2),
                                  eval_sizes=[1, 0, 2, 1]),
    # constructor errors that need init(): a group that was never created, and the group of
    # the other half of the world (run after "subgroups", which created each rank's own half)
    "group_errors": dict(kind="group_errors",
                         groups={"no-such-group": None, "0-1": [0, 1], "2-3": [2, 3]}),
    # groups of 2 consecutive ranks from create_syncbn_process_group(2), the layer converted
    # from nn.BatchNorm2d with that group; graph mode, and PyNative in the same job
    "apex_groups": dict(group_size=2, build="convert", tail=(3, 2, 3), eval_sizes=[1, 2],
                        sizes={"0-1": [[4, 1], [0, 3], [2, 5]], "2-3": [[2, 2], [5, 0], [1, 3]]},
                        mean={"0-1": -20.0, "2-3": 30.0}, std=2.0, layer=dict(momentum=0.3)),
    "apex_groups_pynative": dict(group_size=2, build="convert", mode="pynative", tail=(2, 3, 2),
                                 eval_sizes=[2, 0], sizes={"0-1": [[1, 5], [3, 3], [0, 4]],
                                                           "2-3": [[6, 1], [2, 0], [3, 2]]},
                                 mean={"0-1": 40.0, "2-3": -10.0}, std=1.5,
                                 layer=dict(momentum=0.6)),
    # create_syncbn_process_group's other values and errors on 4 ranks, and a second call
    "apex_group_errors": dict(kind="apex_group_errors"),
}


def _group_of(spec, rank):
    """(group name or None, world ranks in group order, key of the scenario's per-group values)
    of this rank for the scenario."""
    if "group_size" in spec:  # consecutive ranks; the name is the function's
        size = spec["group_size"]
        ranks = list(range(rank // size * size, rank // size * size + size))
        return create_syncbn_process_group(size), ranks, f"{ranks[0]}-{ranks[-1]}"
    groups = spec.get("groups")
    if groups is None:
        return None, list(range(get_group_size())), None
    for name, ranks in groups.items():
        if rank in ranks:
            return name, ranks, name
    raise ValueError(f"rank {rank} is in none of the groups {groups}")


def _build_layer(spec, channels, group, layer_args):
    """The scenario's SyncBatchNorm: built directly, or converted from an nn.BatchNorm2d."""
    if spec.get("build") != "convert":
        return SyncBatchNorm(channels, eps=EPS, process_group=group, **layer_args)
    # nn.BatchNorm2d(momentum=m) keeps m of the running value: the layer's momentum is 1 - m
    holder = nn.SequentialCell([nn.BatchNorm2d(channels, eps=EPS,
                                               momentum=1.0 - layer_args["momentum"])])
    convert_sync_batchnorm(holder, process_group=group)
    layer = holder[0]
    if not isinstance(layer, SyncBatchNorm):
        raise TypeError(f"convert_sync_batchnorm left {type(layer).__name__}")
    return layer


def _per_group(value, group):
    return value[group] if isinstance(value, dict) else value


def run_scenario(name, spec, rank, created_groups):
    group, ranks, key = _group_of(spec, rank)
    if "groups" in spec and group not in created_groups:
        create_group(group, ranks)  # only the group this rank belongs to
        created_groups.add(group)
    member = ranks.index(rank)
    dtype = spec.get("dtype", "float32")
    layer_args = dict(spec.get("layer", {}))
    channels = spec["tail"][0]
    rng = np.random.default_rng(zlib.crc32(f"{name}/{group}".encode()))  # shared by the group
    meta = dict(scenario=name, rank=rank, group=group, group_ranks=ranks, member=member,
                dtype=dtype, eps=EPS, layer=layer_args, momentum=layer_args.get("momentum", 0.1))
    arrays = {}
    layer = _build_layer(spec, channels, group, layer_args)
    meta.update(layer_momentum=layer.momentum, layer_group_size=layer.group_size,
                built_by="convert_sync_batchnorm" if spec.get("build") == "convert"
                else "SyncBatchNorm")
    if layer.affine:
        weight = rng.uniform(0.5, 2.0, channels) * rng.choice([-1.0, 1.0], channels)
        set_parameters(layer, weight, rng.uniform(-1.0, 1.0, channels))
        arrays["weight"] = layer.weight.asnumpy()
        arrays["bias"] = layer.bias.asnumpy()
    if spec.get("dynamic"):
        driver = LayerDriver(layer, jit=ms.get_context("mode") == ms.PYNATIVE_MODE,
                             dynamic_rank=len(spec["tail"]) + 1, dynamic_dtype=dtype)
    else:
        driver = LayerDriver(layer)
    mean = _per_group(spec.get("mean"), key)
    steps = _per_group(spec["sizes"], key)
    meta["steps"] = len(steps)
    try:
        for step, sizes in enumerate(steps):
            shape = (sum(sizes),) + (spec["tails"][step] if "tails" in spec else spec["tail"])
            if mean is None:  # a new spread of channel means each step: the shift must follow
                full = random_batch(rng, shape, mean_scale=3.0 * (step + 1))
            else:  # channel means within 1 of mean (+ step), spreads in [std/2, std]
                full = random_batch(rng, shape, mean_scale=1.0,
                                    std_range=(spec["std"] / 2, spec["std"]))
                full = (full.astype(np.float64) + mean + step).astype(np.float32)
            full = round_to(full, dtype)
            upstream = round_to(rng.standard_normal(full.shape), dtype)
            start = sum(sizes[:member])
            x = full[start:start + sizes[member]]
            dy = upstream[start:start + sizes[member]]
            arrays[f"x{step}"], arrays[f"dy{step}"] = x, dy
            for key, value in {**driver.train(x, dy, dtype), **driver.state()}.items():
                if value is not None:
                    arrays[f"{key}{step}"] = value
        # evaluation: each rank its own batch; rank 0 evaluates twice and the others once,
        # which would desynchronise (and hang) any collective hidden in evaluation
        eval_rng = np.random.default_rng(1000 + rank)
        eval_size = spec["eval_sizes"][member]
        for call in range(2 if member == 0 else 1):
            x = round_to(random_batch(eval_rng, (eval_size,) + spec["tail"]), dtype)
            dy = round_to(eval_rng.standard_normal(x.shape), dtype)
            arrays[f"eval_x{call}"], arrays[f"eval_dy{call}"] = x, dy
            for key, value in driver.evaluate(x, dy, dtype).items():
                if value is not None:
                    arrays[f"eval_{key}{call}"] = value
        meta["status"] = "ok"
        meta["graphs_compiled"] = driver.graphs_compiled
    except Exception as err:  # recorded for the test to judge; the next scenario still runs
        meta.update(status="error", error_type=type(err).__name__, message=str(err),
                    traceback=traceback.format_exc())
        try:  # what the failed call left behind
            arrays.update({f"after_error_{key}": value for key, value in driver.state().items()
                           if value is not None})
        except Exception as state_err:  # graph mode may report the error again here
            meta["state_error"] = f"{type(state_err).__name__}: {state_err}"
    try:  # the guard code a stopped step left (ms_syncbn.guard_check), and its error
        arrays["guard_code"] = layer.guard_code.asnumpy()
        meta["guard_error"] = layer.guard_error()
    except Exception as guard_err:
        meta["guard_error_failed"] = f"{type(guard_err).__name__}: {guard_err}"
    return meta, arrays


def check_group_arguments(spec, rank):
    """Build a layer on each group of ``spec`` this rank is not in; record what was raised."""
    meta = dict(rank=rank, status="ok", outcomes={})
    for group, ranks in spec["groups"].items():
        if ranks is not None and rank in ranks:
            continue
        try:
            SyncBatchNorm(3, process_group=group)
            meta["outcomes"][group] = dict(error_type=None, message="")
        except Exception as err:  # the test checks the type and message
            meta["outcomes"][group] = dict(error_type=type(err).__name__, message=str(err))
    return meta, {}


def check_create_syncbn_process_group(rank):
    """create_syncbn_process_group on 4 ranks: what each group_size gives or raises, a second
    call, and layers built on the groups (group_size 1: a step on the rank's own batch)."""
    meta = dict(rank=rank, status="ok", world_group=GlobalComm.WORLD_COMM_GROUP, outcomes={})
    arrays = {}
    for label, group_size in [("size3", 3), ("size8", 8), ("size0", 0), ("size4", 4),
                              ("size2", 2), ("size2_again", 2), ("size1", 1), ("size1_again", 1)]:
        try:
            group = create_syncbn_process_group(group_size)
            outcome = dict(error_type=None, message="", group=group)
            if group_size:
                outcome["layer_group_size"] = SyncBatchNorm(3, process_group=group).group_size
        except Exception as err:  # the test checks the type and message
            outcome = dict(error_type=type(err).__name__, message=str(err))
        meta["outcomes"][label] = outcome
    try:  # group_size 1: each rank alone; the ranks' data differ, so any sync would show
        layer = SyncBatchNorm(3, process_group=create_syncbn_process_group(1))
        rng = np.random.default_rng(500 + rank)
        x = random_batch(rng, (2 + rank, 3, 4), mean_scale=5.0)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        step = LayerDriver(layer).train(x, dy)
        arrays.update(x=x, dy=dy,
                      **{key: value for key, value in step.items() if value is not None})
    except Exception as err:
        meta.update(status="error", error_type=type(err).__name__, message=str(err),
                    traceback=traceback.format_exc())
    return meta, arrays


def _mode_name():
    return "graph" if ms.get_context("mode") == ms.GRAPH_MODE else "pynative"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=["pynative", "graph"], required=True)
    parser.add_argument("--emulate-ascend", choices=["a2", "910_95"], default=None,
                        help="the Ascend kernel table over CPU stand-ins (tests only)")
    parser.add_argument("--device", choices=["CPU", "Ascend"], default="CPU")
    parser.add_argument("scenarios", nargs="+", choices=sorted(SCENARIOS))
    args = parser.parse_args()
    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE,
                   device_target=args.device)
    if args.emulate_ascend is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: tests/
        from tests.ascend_emulation import use_emulated_ascend
        use_emulated_ascend(args.emulate_ascend)
    init()
    rank = get_rank()
    created_groups = set()
    job_mode = ms.get_context("mode")
    for name in args.scenarios:
        spec = SCENARIOS[name]
        if "mode" in spec:
            ms.set_context(mode=ms.GRAPH_MODE if spec["mode"] == "graph" else ms.PYNATIVE_MODE)
        if spec.get("kind") == "group_errors":
            meta, arrays = check_group_arguments(spec, rank)
        elif spec.get("kind") == "apex_group_errors":
            meta, arrays = check_create_syncbn_process_group(rank)
        else:
            meta, arrays = run_scenario(name, spec, rank, created_groups)
        meta["mode"] = _mode_name()
        ms.set_context(mode=job_mode)
        meta["table"] = ("Ascend (emulated, " + args.emulate_ascend + ")" if args.emulate_ascend
                         else args.device)
        out_dir = os.path.join(args.out, name)
        os.makedirs(out_dir, exist_ok=True)
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **arrays)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(meta, f, indent=1)
        print(f"rank {rank}: {name} {meta['status']}", flush=True)
    with open(os.path.join(args.out, f"done_rank{rank}"), "w") as f:
        f.write("ok\n")


if __name__ == "__main__":
    main()
