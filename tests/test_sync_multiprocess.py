"""SyncBatchNorm across processes: msrun jobs of 2 and 4 ranks, PyNative and graph mode.

Each job runs many scenarios of tests/workers/sync_scenarios.py at once (an
msrun start costs ~10 s). Every rank saves its slice of the group's batches,
its outputs, gradients and running statistics; here the slices are put back
together and checked against tests/reference.py on the full batch:

- y and dx of every rank equal the slice of batch norm on the concatenated batch;
- weight/bias gradients are the rank's own part (its slice of sum(dy), sum(dy * xhat)
  with the group's statistics), and their sum over the group is the full-batch gradient;
- running statistics equal the reference update sequence and are bit-for-bit the same
  on every rank;
- evaluation uses the running statistics (or, untracked, the rank's own batch) and
  communicates nothing (ranks make different numbers of evaluation calls).
"""
import json

import numpy as np
import pytest

from ms_syncbn.kernels import GUARD_MEANINGS, GUARD_SINGLE_VALUE
from tests.harness import scenario_jobs
from tests.workers.core_checks import (assert_close, batch_stats_step, expected_training,
                                       frozen_stats_step)
from tests import reference

TWO_RANK_SCENARIOS = ["uneven_4d", "empty_rank", "large_mean", "float16", "bfloat16",
                      "affine_false_cma", "untracked", "rank2", "rank3", "rank5",
                      "dynamic_shapes",  # graph mode; under jit in the PyNative job
                      "one_value"]  # last: a failure there cannot disturb the others
JOBS = {
    "pynative_2ranks": dict(world=2, mode="pynative", scenarios=TWO_RANK_SCENARIOS),
    "graph_2ranks": dict(world=2, mode="graph", scenarios=TWO_RANK_SCENARIOS),
    # apex_groups_pynative runs in PyNative mode within this graph-mode job (its own mode)
    "graph_4ranks": dict(world=4, mode="graph",
                         scenarios=["world4_uneven", "subgroups", "group_errors", "apex_groups",
                                    "apex_group_errors", "apex_groups_pynative"]),
}
JOB_TIMEOUT = 360  # seconds; a job takes 20-40 s on 2 idle cores, a few times that when shared

# Tolerance (relative to each result's scale) of outputs and gradients, and of running stats.
TOLERANCE = {"float16": 4e-3, "bfloat16": 2e-2}
FLOAT32_TOL = 2e-5
# Mean 1e4 in float32: x - mean carries the rounding of x (~5e-4), i.e. ~3e-4 of std.
LARGE_MEAN_TOL = 1e-3
STATS_TOL = 2e-5
LARGE_MEAN_VAR_TOL = 1e-4  # relative, per channel: the bound

TRAINING_CASES = [(job, scenario) for job, spec in JOBS.items() for scenario in spec["scenarios"]
                  if scenario not in ("one_value", "group_errors", "apex_group_errors")]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Runs each msrun job at most once, on first use; returns its outcome."""
    return scenario_jobs(tmp_path_factory, JOBS, timeout=JOB_TIMEOUT)


def _load(outcome, scenario, world):
    """[(meta, arrays)] of every rank for one scenario; fails with the job's report if missing."""
    ranks = []
    for rank in range(world):
        base = None if outcome.out_dir is None else outcome.out_dir / scenario / f"rank{rank}"
        if base is None or not base.with_suffix(".json").exists():
            logs = outcome.failure or (outcome.result.stdout[-3000:] + outcome.result.logs())
            pytest.fail(f"rank {rank} wrote no result for {scenario}\n{logs}")
        meta = json.loads(base.with_suffix(".json").read_text())
        with np.load(base.with_suffix(".npz")) as data:
            ranks.append((meta, dict(data)))
    return ranks


def _groups(ranks):
    """{group: [(meta, arrays)] in group order}."""
    groups = {}
    for meta, arrays in ranks:
        groups.setdefault(meta["group"], []).append((meta, arrays))
    return {g: sorted(members, key=lambda m: m[0]["member"]) for g, members in groups.items()}


@pytest.mark.parametrize("job", list(JOBS))
def test_job_finishes_cleanly(jobs, job):
    jobs(job).assert_finished(JOBS[job]["world"])


@pytest.mark.parametrize("job, scenario", TRAINING_CASES)
def test_training_then_eval_equals_full_batch_reference(jobs, job, scenario):
    ranks = _load(jobs(job), scenario, JOBS[job]["world"])
    for group, members in _groups(ranks).items():
        for meta, _ in members:
            assert meta["status"] == "ok", f"rank {meta['rank']}: {meta.get('traceback')}"
        assert [m["rank"] for m, _ in members] == members[0][0]["group_ranks"], "group incomplete"
        _check_group(scenario, group, members)


def _check_group(scenario, group, members, stats_tol=STATS_TOL):
    meta0, arrays0 = members[0]
    dtype = meta0["dtype"]
    tol = LARGE_MEAN_TOL if scenario.endswith("large_mean") else TOLERANCE.get(dtype, FLOAT32_TOL)
    affine = meta0["layer"].get("affine", True)
    track = meta0["layer"].get("track_running_stats", True)
    channels = arrays0["x0"].shape[1]
    weight = arrays0["weight"].astype(np.float64) if affine else np.ones(channels)
    bias = arrays0["bias"].astype(np.float64) if affine else np.zeros(channels)
    steps = meta0["steps"]
    full_x = [np.concatenate([a[f"x{s}"] for _, a in members]) for s in range(steps)]
    full_dy = [np.concatenate([a[f"dy{s}"] for _, a in members]) for s in range(steps)]
    expected = expected_training(full_x, full_dy, weight, bias, meta0["eps"], meta0["momentum"],
                                 track)
    where = f"group {group}"
    for step, want in enumerate(expected):
        start = 0
        grad_sums = {"dweight": 0.0, "dbias": 0.0}
        for meta, arrays in members:
            rank = f"{where} rank {meta['rank']} step {step}"
            x, dy = arrays[f"x{step}"], arrays[f"dy{step}"]
            stop = start + x.shape[0]
            assert arrays[f"y{step}"].dtype == x.dtype, rank
            assert arrays[f"dx{step}"].dtype == x.dtype, rank
            assert_close(arrays[f"y{step}"], want["y"][start:stop], tol, f"{rank} y",
                         scale=_largest(want["y"]))
            assert_close(arrays[f"dx{step}"], want["dx"][start:stop], tol, f"{rank} dx",
                         scale=_largest(want["dx"]))
            if affine:
                local = _local_affine_grads(x, dy, full_x[step], meta0["eps"])
                for key in ("dweight", "dbias"):
                    assert_close(arrays[f"{key}{step}"], local[key], tol,
                                 f"{rank} {key} (local part)", scale=_largest(want[key]))
                    grad_sums[key] = grad_sums[key] + arrays[f"{key}{step}"].astype(np.float64)
            start = stop
        if affine:
            for key in ("dweight", "dbias"):
                assert_close(grad_sums[key], want[key], tol, f"{where} step {step} sum of {key}")
        if track:
            for key in ("running_mean", "running_var"):
                values = [arrays[f"{key}{step}"] for _, arrays in members]
                for other in values[1:]:
                    assert np.array_equal(values[0], other), \
                        f"{where} step {step}: {key} differs between ranks: {values}"
                assert_close(values[0], want[key], stats_tol, f"{where} step {step} {key}")
            counts = [int(arrays[f"num_batches_tracked{step}"]) for _, arrays in members]
            assert counts == [want["num_batches_tracked"]] * len(members), f"{where} step {step}"
        else:
            assert not any(f"running_mean{step}" in arrays for _, arrays in members)
    _check_eval(members, expected[-1], weight, bias, meta0["eps"], track, tol, affine)


def _largest(values):
    """max |values|, 0 for an empty array (a step in which the whole group's batch is empty)."""
    values = np.asarray(values)
    return float(np.abs(values).max()) if values.size else 0.0


def _local_affine_grads(x, dy, full_x, eps):
    """A rank's own weight/bias gradients: its slice of the sums, with the group's statistics."""
    mean, var, _ = reference.batch_stats(full_x)
    xhat = reference.forward(x, np.ones_like(mean), np.zeros_like(mean), eps, mean, var)
    axes = (0,) + tuple(range(2, x.ndim))
    dy = dy.astype(np.float64)
    return {"dweight": (dy * xhat).sum(axis=axes), "dbias": dy.sum(axis=axes)}


def _check_eval(members, final, weight, bias, eps, track, tol, affine):
    for meta, arrays in members:
        calls = 2 if meta["member"] == 0 else 1
        assert f"eval_y{calls - 1}" in arrays and f"eval_y{calls}" not in arrays
        for call in range(calls):
            x, dy = arrays[f"eval_x{call}"], arrays[f"eval_dy{call}"]
            if track:  # the running statistics; no communication
                want = frozen_stats_step(x, dy, weight, bias, eps, final["running_mean"],
                                         final["running_var"])
            else:  # untracked: the rank's own batch statistics; no communication
                want = batch_stats_step(x, dy, weight, bias, eps)
            for key in ("y", "dx") + (("dweight", "dbias") if affine else ()):
                assert_close(arrays[f"eval_{key}{call}"], want[key], tol,
                             f"rank {meta['rank']} eval call {call} {key}")


def check_one_graph_per_step_kind(ranks):
    """Every rank trained and evaluated through one compiled graph each, whatever the shapes."""
    for meta, _ in ranks:
        assert meta["status"] == "ok", f"rank {meta['rank']}: {meta.get('traceback')}"
        assert meta["graphs_compiled"] == {"train": 1, "eval": 1}, meta


@pytest.mark.parametrize("job", ["pynative_2ranks", "graph_2ranks"])
def test_dynamic_shape_steps_compile_one_graph(jobs, job):
    """dynamic_shapes (checked against the reference above): one graph per kind of step for
    steps of 4 shapes, with a different empty rank in two of them; PyNative runs it under jit."""
    check_one_graph_per_step_kind(_load(jobs(job), "dynamic_shapes", JOBS[job]["world"]))


@pytest.mark.parametrize("job", ["pynative_2ranks", "graph_2ranks"])
def test_large_mean_variance_within_1e4_relative(jobs, job):
    """Mean 1e4, std <= 2 in float32: the group variance matches float64 per channel to 1e-4."""
    ranks = _load(jobs(job), "large_mean", JOBS[job]["world"])
    members = _groups(ranks)[None]
    for meta, _ in members:
        assert meta["status"] == "ok", meta.get("traceback")
    for step in range(members[0][0]["steps"]):  # momentum 1: running_var = the batch's unbiased var
        full_x = np.concatenate([a[f"x{step}"] for _, a in members]).astype(np.float64)
        axes = (0,) + tuple(range(2, full_x.ndim))
        want = full_x.var(axis=axes, ddof=1)
        assert np.all(np.abs(full_x.mean(axis=axes) - 1e4) < 10)
        got = members[0][1][f"running_var{step}"].astype(np.float64)
        rel = np.abs(got - want) / want
        assert np.all(rel <= LARGE_MEAN_VAR_TOL), f"step {step}: relative variance error {rel}"


@pytest.mark.parametrize("job", ["pynative_2ranks", "graph_2ranks"])
def test_group_with_one_value_per_channel_raises_on_every_rank(jobs, job):
    """The guard kernel stops the step on every rank (RuntimeError with code 2, the layer and
    its meaning, also on each rank's stderr), in PyNative and graph mode alike, and the state is unchanged."""
    ranks = _load(jobs(job), "one_value", JOBS[job]["world"])
    for meta, _ in ranks:
        assert meta["status"] == "error", f"rank {meta['rank']} trained without error"
        assert meta["error_type"] == "RuntimeError", meta.get("traceback")
        assert f"SyncBatchNorm error {int(GUARD_SINGLE_VALUE)} in layer" in meta["message"], meta["message"]
        assert GUARD_MEANINGS[GUARD_SINGLE_VALUE] in meta["message"], meta["message"]
    logs = "".join(path.read_text(errors="replace")
                   for path in sorted(jobs(job).result.log_dir.glob("worker_*.log")))
    assert logs.count(GUARD_MEANINGS[GUARD_SINGLE_VALUE]) >= 2, logs[-3000:]
    for meta, arrays in ranks:  # the failed step changed nothing
        assert "state_error" not in meta, meta["state_error"]
        np.testing.assert_array_equal(arrays["after_error_running_mean"], np.zeros(3, np.float32))
        np.testing.assert_array_equal(arrays["after_error_running_var"], np.ones(3, np.float32))
        assert int(arrays["after_error_num_batches_tracked"]) == 0, f"rank {meta['rank']}"


def test_subgroups_synchronize_independently(jobs):
    """Two halves of a 4-rank world: each half's statistics are its own (checked in full above);
    here: the halves' running statistics differ, as their data do."""
    ranks = _load(jobs("graph_4ranks"), "subgroups", 4)
    groups = _groups(ranks)
    assert sorted(groups) == ["0-1", "2-3"]
    assert [m["rank"] for m, _ in groups["0-1"]] == [0, 1]
    assert [m["rank"] for m, _ in groups["2-3"]] == [2, 3]
    steps = groups["0-1"][0][0]["steps"]
    low = groups["0-1"][0][1][f"running_mean{steps - 1}"]
    high = groups["2-3"][0][1][f"running_mean{steps - 1}"]
    assert np.all(high - low > 20.0), (low, high)  # data means 0 and 50


def test_process_group_errors_under_init(jobs):
    """A group that does not exist, or that this rank is not in: ValueError naming the group."""
    ranks = _load(jobs("graph_4ranks"), "group_errors", 4)
    for meta, _ in ranks:
        outcomes = meta["outcomes"]
        assert "no-such-group" in outcomes and len(outcomes) == 2, outcomes
        for group, outcome in outcomes.items():
            assert outcome["error_type"] == "ValueError", (meta["rank"], group, outcome)
            assert group in outcome["message"], outcome["message"]


@pytest.mark.parametrize("scenario, mode", [("apex_groups", "graph"),
                                            ("apex_groups_pynative", "pynative")])
def test_create_syncbn_process_group_pairs_consecutive_ranks(jobs, scenario, mode):
    """create_syncbn_process_group(2) on 4 ranks: groups {0, 1} and {2, 3} under the documented
    names, layers converted with it synchronize within their pair only (each pair's results are
    checked against the reference above), in graph mode and in PyNative."""
    ranks = _load(jobs("graph_4ranks"), scenario, 4)
    for meta, _ in ranks:
        assert meta["status"] == "ok", f"rank {meta['rank']}: {meta.get('traceback')}"
        assert meta["mode"] == mode, meta["mode"]
        assert meta["built_by"] == "convert_sync_batchnorm"
        assert meta["layer_group_size"] == 2, meta
        assert meta["layer_momentum"] == pytest.approx(meta["momentum"], abs=1e-12)
    groups = _groups(ranks)
    assert sorted(groups) == ["ms_syncbn_ranks_0-1", "ms_syncbn_ranks_2-3"], sorted(groups)
    assert [m["rank"] for m, _ in groups["ms_syncbn_ranks_0-1"]] == [0, 1]
    assert [m["rank"] for m, _ in groups["ms_syncbn_ranks_2-3"]] == [2, 3]
    steps = ranks[0][0]["steps"]
    means = {name: members[0][1][f"running_mean{steps - 1}"] for name, members in groups.items()}
    spread = abs(float(np.mean(means["ms_syncbn_ranks_0-1"] - means["ms_syncbn_ranks_2-3"])))
    assert spread > 20.0, means  # data means differ by 50: the pairs did not mix


def test_create_syncbn_process_group_values_errors_and_second_call(jobs):
    """On every rank of 4: group_size 3 and 8 raise ValueError naming group_size, the value
    and the world size; 0 gives None; 4 the world group; 2 the rank's pair, the same name on a
    second call; 1 the rank alone, whose layer normalizes over the rank's own batch."""
    ranks = _load(jobs("graph_4ranks"), "apex_group_errors", 4)
    for meta, arrays in ranks:
        rank, outcomes = meta["rank"], meta["outcomes"]
        for label, value in (("size3", 3), ("size8", 8)):
            outcome = outcomes[label]
            assert outcome["error_type"] == "ValueError", (rank, outcome)
            assert f"group_size={value}" in outcome["message"], outcome["message"]
            assert "world size 4" in outcome["message"], outcome["message"]
        assert outcomes["size0"] == dict(error_type=None, message="", group=None), outcomes
        pair = f"ms_syncbn_ranks_{rank // 2 * 2}-{rank // 2 * 2 + 1}"
        expected = {"size4": (meta["world_group"], 4), "size2": (pair, 2),
                    "size2_again": (pair, 2), "size1": (f"ms_syncbn_ranks_{rank}-{rank}", 1),
                    "size1_again": (f"ms_syncbn_ranks_{rank}-{rank}", 1)}
        for label, (group, layer_size) in expected.items():
            outcome = outcomes[label]
            assert outcome["error_type"] is None, (rank, label, outcome)
            assert (outcome["group"], outcome["layer_group_size"]) == (group, layer_size), \
                (rank, label, outcome)
        assert meta["world_group"], meta
        assert meta["status"] == "ok", f"rank {rank}: {meta.get('traceback')}"
        want = batch_stats_step(arrays["x"], arrays["dy"], np.ones(3), np.zeros(3), 1e-5)
        for key in ("y", "dx", "dweight", "dbias"):
            assert_close(arrays[key], want[key], FLOAT32_TOL, f"rank {rank} group_size 1 {key}")
