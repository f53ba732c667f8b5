"""The Ascend kernel table, executed: the multi-rank scenarios of the CPU tests, emulated.

Two msrun jobs run the scenarios of tests/workers/sync_scenarios.py with
``--emulate-ascend a2``: every layer uses ms_syncbn/kernels/ascend.py over the CPU
stand-ins of MindSpore's four native Ascend primitives (tests/ascend_emulation.py), in
their worst empty-input variant (Atlas A2/A3: an empty input leaves
BatchNormReduceGrad's outputs unwritten, emulated as NaN). Every result is checked
against the float64 reference on the concatenated batch exactly as for the CPU table
(tests/test_sync_multiprocess.py's checks): y, dx, the ranks' weight/bias gradients and
their sums, running statistics identical on every rank, evaluation without communication.

What this proves and what it cannot (real aclnn numerics, HCCL, speed): README,
"What is verified where".
"""
import numpy as np
import pytest

from ms_syncbn.kernels import GUARD_SINGLE_VALUE, guard_message
from tests.harness import scenario_jobs
from tests.test_sync_multiprocess import (LARGE_MEAN_VAR_TOL, STATS_TOL, _check_group,
                                          _groups, _load, check_one_graph_per_step_kind)

JOBS = {
    "emulated_pynative_2ranks": dict(
        world=2, mode="pynative",
        scenarios=["uneven_4d", "empty_rank", "all_empty", "large_mean", "float16", "bfloat16",
                   "float64", "affine_false_cma", "untracked", "rank2", "rank5", "dynamic_shapes",
                   "one_value"]),
    "emulated_graph_4ranks": dict(
        world=4, mode="graph",
        # bfloat16 and float64 run in the PyNative job (suite time)
        scenarios=["world4_uneven", "world4_all_empty", "world4_large_mean", "subgroups",
                   "world4_dynamic_shapes"]),
}
VARIANT = "a2"  # the worst case; the 910_95 variant is covered by tests/test_ascend_binding.py
JOB_TIMEOUT = 420  # seconds

TRAINING_CASES = [(job, scenario) for job, spec in JOBS.items() for scenario in spec["scenarios"]
                  if scenario != "one_value"]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Runs each msrun job at most once, on first use; returns its outcome."""
    return scenario_jobs(tmp_path_factory, JOBS, "--emulate-ascend", VARIANT, timeout=JOB_TIMEOUT)


@pytest.mark.parametrize("job", list(JOBS))
def test_emulated_job_finishes_cleanly(jobs, job):
    result = jobs(job).assert_finished(JOBS[job]["world"])
    print(f"\n{job}: {result.elapsed:.1f} s")


@pytest.mark.parametrize("job, scenario", TRAINING_CASES)
def test_ascend_table_equals_full_batch_reference(jobs, job, scenario):
    ranks = _load(jobs(job), scenario, JOBS[job]["world"])
    for group, members in _groups(ranks).items():
        for meta, _ in members:
            assert meta["status"] == "ok", f"rank {meta['rank']}: {meta.get('traceback')}"
            assert meta["table"] == f"Ascend (emulated, {VARIANT})", meta["table"]
        assert [m["rank"] for m, _ in members] == members[0][0]["group_ranks"], "group incomplete"
        # Running statistics at mean 1e4: the moments protocol's variance carries the float32
        # rounding of the ranks' means (m_i - m), within the issue's 1e-4 (the CPU table's
        # re-centred shifted sums reach 2e-5).
        stats_tol = LARGE_MEAN_VAR_TOL if scenario.endswith("large_mean") else STATS_TOL
        _check_group(scenario, group, members, stats_tol=stats_tol)
        for meta, arrays in members:  # no step was stopped
            np.testing.assert_array_equal(arrays["guard_code"], [0.0])
            assert meta["guard_error"] is None, meta


@pytest.mark.parametrize("job, scenario", [("emulated_pynative_2ranks", "large_mean"),
                                           ("emulated_graph_4ranks", "world4_large_mean")])
def test_ascend_table_large_mean_variance_within_1e4_relative(jobs, job, scenario):
    """Mean 1e4, std <= 2 in float32: the group variance matches float64 per channel to 1e-4."""
    members = _groups(_load(jobs(job), scenario, JOBS[job]["world"]))[None]
    for step in range(members[0][0]["steps"]):  # momentum 1: running_var = the batch's unbiased var
        full_x = np.concatenate([a[f"x{step}"] for _, a in members]).astype(np.float64)
        axes = (0,) + tuple(range(2, full_x.ndim))
        want = full_x.var(axis=axes, ddof=1)
        got = members[0][1][f"running_var{step}"].astype(np.float64)
        rel = np.abs(got - want) / want
        assert np.all(rel <= LARGE_MEAN_VAR_TOL), f"step {step}: relative variance error {rel}"


@pytest.mark.parametrize("job, scenario", [("emulated_pynative_2ranks", "dynamic_shapes"),
                                           ("emulated_graph_4ranks", "world4_dynamic_shapes")])
def test_ascend_table_dynamic_shape_steps_compile_one_graph(jobs, job, scenario):
    """One graph per kind of step (PyNative: under jit) for steps of several shapes with an
    empty rank (checked against the reference above)."""
    check_one_graph_per_step_kind(_load(jobs(job), scenario, JOBS[job]["world"]))


def check_one_value_stopped(ranks):
    """The one_value scenario on the Ascend table (also judged on NPUs by
    launch/ascend_scenarios.py): that step's outputs and gradients are NaN on every rank, the
    state is unchanged, and every rank's layer keeps guard code 2, whose error
    (ms_syncbn.guard_check) names the layer."""
    for meta, arrays in ranks:
        assert meta["status"] == "ok", meta.get("traceback") or meta.get("message")
        if arrays["x0"].size:
            assert np.all(np.isnan(arrays["y0"])), arrays["y0"]
            assert np.all(np.isnan(arrays["dx0"])), arrays["dx0"]
        np.testing.assert_array_equal(arrays["running_mean0"], np.zeros(3, np.float32))
        np.testing.assert_array_equal(arrays["running_var0"], np.ones(3, np.float32))
        assert int(arrays["num_batches_tracked0"]) == 0, f"rank {meta['rank']}"
        np.testing.assert_array_equal(arrays["guard_code"], [GUARD_SINGLE_VALUE])
        # the world group's name depends on the backend: the message around it is fixed
        head, tail = guard_message(GUARD_SINGLE_VALUE, "'layer' SyncBatchNorm(num_features=3) "
                                   "on process group GROUP").split("GROUP")  # the driver's path
        assert meta["guard_error"].startswith(head) and meta["guard_error"].endswith(tail), meta


def test_ascend_table_one_value_poisons_the_step_on_every_rank(jobs):
    """One value per channel in the group's batch: the Ascend guard (composite, no branch) stops
    the step without raising, and the error is kept (check_one_value_stopped)."""
    check_one_value_stopped(_load(jobs("emulated_pynative_2ranks"), "one_value", 2))
