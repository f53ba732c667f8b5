"""Reliability (issue 5): faults end the job in bounded time; bad inputs do not corrupt state.

Faults (tests/workers/reliability_faults.py, one msrun job each, since a fault ends
the job; the four run side by side, as each mostly waits out a timeout): a rank that raises, a rank killed with SIGKILL, a rank that stays alive
but never joins the collective, and ranks whose layers disagree on num_features.
Each job must exit non-zero, within FAULT_BOUND seconds of the fault, and its logs
must name the failed rank and the cause. What bounds the time on CPU: msrun polls
its workers every second and SIGKILLs the others as soon as one exits non-zero,
then waits for its scheduler, which gives up on the dead workers after
MS_NODE_TIMEOUT seconds (default 30); a rank blocked in an all-reduce whose peer
never comes fails after MS_NODE_TIMEOUT too. msrun names a failed worker by pid
only, so every worker prints ``rank R pid P`` at start.

Inputs (tests/workers/reliability_inputs.py, all in one job): ranks with different
input dtypes, NaN/Inf in one channel, float16 near its maximum, all-equal values,
empty local batches on some and on all ranks, non-contiguous views; each is
checked against tests/reference.py on the concatenated batch.
"""
import os
import re
import signal
from dataclasses import dataclass

import numpy as np
import pytest

from tests import reference
from tests.harness import MsrunResult, run_msrun, start_msrun
from tests.workers.reliability_faults import CHANNELS
from tests.workers.reliability_inputs import (CONSTANT_VALUE, FLOAT16_MAX, INF_CHANNEL,
                                              NAN_CHANNEL)

EPS = 1e-5
MOMENTUM = 0.1
FAULT_NODE_TIMEOUT = 10  # MS_NODE_TIMEOUT (s) of the fault jobs that do not measure the default
FAULT_BOUND = 120  # s from the fault to msrun's exit: a hang guard, not a speed test
JOB_TIMEOUT = 240  # the harness kills a job after this long (a hang fails the test, never the suite)

FLOAT32_TOL = 2e-5  # relative to each result's scale
FLOAT16_TOL = 3e-3  # float16 outputs: 2^-11 rounding, relative to the result's scale
STATS_TOL = 2e-5


# ---------------------------------------------------------------------------------- faults --

@dataclass
class FaultOutcome:
    result: MsrunResult
    seconds_after_fault: float  # from the first "rank R fault" line to msrun's exit
    failed_rank: int  # rank of the first worker msrun reported as failed
    cause: str  # its signal, or the last exception line of its log
    logs: dict  # rank -> worker log text

    def report(self):
        return (f"msrun exit {self.result.returncode} {self.seconds_after_fault:.1f} s after the "
                f"fault; first failed: rank {self.failed_rank}: {self.cause}")


def worker_logs(result):
    return {int(re.search(r"worker_(\d+)\.log$", path.name).group(1)): path.read_text(errors="replace")
            for path in result.log_dir.glob("worker_*.log")}


def last_exception(log):
    lines = re.findall(r"^(\w*(?:Error|Exception)\b: .*)$", log, flags=re.MULTILINE)
    return lines[-1] if lines else "no exception in the log"


# Fault -> MS_NODE_TIMEOUT of its job (None: unset, MindSpore's default).
FAULTS = {"raise": FAULT_NODE_TIMEOUT, "sigkill": None, "skip": FAULT_NODE_TIMEOUT,
          "model_mismatch": FAULT_NODE_TIMEOUT}


@pytest.fixture(scope="module")
def fault_jobs(tmp_path_factory):
    """All fault jobs, started together: each spends most of its time waiting for a timeout,
    so running them side by side costs little more than the longest. Each is timed by its
    own clock (the harness notes when msrun exited)."""
    jobs = {}
    for fault, node_timeout in FAULTS.items():
        env = dict(os.environ)
        env.pop("MS_NODE_TIMEOUT", None)
        if node_timeout is not None:
            env["MS_NODE_TIMEOUT"] = str(node_timeout)
        jobs[fault] = start_msrun("reliability_faults.py", 2, tmp_path_factory.mktemp(fault), fault,
                                  timeout=JOB_TIMEOUT, env=env)
    return jobs


def fault_outcome(fault_jobs, fault):
    """Wait for the job of ``fault`` and read what happened from its output and logs."""
    result = fault_jobs[fault].result()
    logs = worker_logs(result)
    context = f"\n{result.stdout[-3000:]}\n{result.logs()}"
    fault_times = [float(t) for log in logs.values()
                   for t in re.findall(r"^rank \d+ fault \w+ at ([\d.]+)$", log, flags=re.MULTILINE)]
    assert fault_times, f"no rank reached the fault{context}"
    rank_of_pid = {int(pid): int(rank) for log in logs.values()
                   for rank, pid in re.findall(r"^rank (\d+) pid (\d+)$", log, flags=re.MULTILINE)}
    failures = re.findall(r"Worker process (\d+) exit with exception\. Error code: (-?\d+)",
                          result.stdout)
    assert failures, f"msrun reported no failed worker{context}"
    pid, code = int(failures[0][0]), int(failures[0][1])
    assert pid in rank_of_pid, f"failed pid {pid} is none of the workers {rank_of_pid}{context}"
    rank = rank_of_pid[pid]
    cause = (f"killed by {signal.Signals(-code).name}" if code < 0
             else f"exit code {code}: {last_exception(logs[rank])}")
    outcome = FaultOutcome(result, result.ended_wall - min(fault_times), rank, cause, logs)
    print(f"\n[reliability] {fault} (MS_NODE_TIMEOUT={FAULTS[fault]}): {outcome.report()}")
    return outcome


def assert_job_failed_in_bound(outcome):
    assert outcome.result.returncode != 0, f"the job succeeded despite the fault\n{outcome.result.stdout[-3000:]}"
    assert outcome.seconds_after_fault < FAULT_BOUND, outcome.report()


def test_rank_raising_ends_job_naming_rank_and_cause(fault_jobs):
    """Rank 1 passes C+1 channels (a ValueError before any collective); rank 0 waits in the all-reduce."""
    outcome = fault_outcome(fault_jobs, "raise")
    assert_job_failed_in_bound(outcome)
    assert outcome.failed_rank == 1, outcome.report()
    assert f"ValueError: SyncBatchNorm: expected {CHANNELS} channels" in outcome.cause, outcome.report()
    assert f"({3 + 1}, {CHANNELS + 1}, 5)" in outcome.cause, outcome.report()  # the shape it got


def test_rank_killed_ends_job_within_default_node_timeout(fault_jobs):
    """Rank 1 SIGKILLs itself mid-training; MS_NODE_TIMEOUT unset (MindSpore's default, 30 s)."""
    outcome = fault_outcome(fault_jobs, "sigkill")
    assert_job_failed_in_bound(outcome)
    assert outcome.failed_rank == 1, outcome.report()
    assert outcome.cause == "killed by SIGKILL", outcome.report()


def test_rank_that_never_joins_ends_job(fault_jobs):
    """Rank 1 stays alive but skips the layer: rank 0's all-reduce fails after MS_NODE_TIMEOUT."""
    outcome = fault_outcome(fault_jobs, "skip")
    assert_job_failed_in_bound(outcome)
    assert outcome.failed_rank == 0, outcome.report()  # the waiting rank gives up first
    # The layer runs as a compiled graph, whose RuntimeError carries no text; the rank's
    # log names the failed kernel ...
    assert "AllReduce" in outcome.cause or "AllReduce" in outcome.logs[0], outcome.report()
    # ... and the rank it waited for: "Ring ReduceScatter wait receiving [1,..] failed"
    assert re.search(r"wait receiving \[1,", outcome.logs[0]), outcome.logs[0][-3000:]


@pytest.fixture(scope="module")
def model_mismatch(fault_jobs):
    """Rank r builds a layer of CHANNELS + r features; both call it once."""
    return fault_outcome(fault_jobs, "model_mismatch")


def test_model_mismatch_ends_job_without_a_result(model_mismatch):
    """Layers of different num_features: the job fails in bounded time and no rank returns numbers.

    MindSpore's CPU all-reduce of buffers of different lengths (3C+1 floats per rank)
    fails on the rank with the shorter buffer but *succeeds with garbage* on the
    other; here that rank then blocks (its second all-reduce has no partner) and
    msrun kills it, so no wrong number escapes.
    """
    assert_job_failed_in_bound(model_mismatch)
    returned = {}
    for rank in range(2):
        path = model_mismatch.result.out_dir / f"rank{rank}.json"
        if path.exists() and '"y"' in path.read_text():
            returned[rank] = path.read_text()[:300]
    assert not returned, f"ranks returned an output from a mismatched all-reduce: {returned}"


def test_model_mismatch_error_names_num_features(model_mismatch):
    """The error of a num_features mismatch between ranks must say so.

    MindSpore's CPU all-reduce of buffers of different lengths fails on one rank
    (its log: "RunRingAllReduce] Memcpy error, ... dest size is 28, src size is 32")
    and hands the other a silently wrong sum. The payload's last slot carries
    num_features; the rank that receives the sum sees it does not add up to
    group_size * num_features, and the guard kernel stops the step with code 3:
    the exception (and stderr) names the check, the layer and the causes.
    """
    messages = {rank: last_exception(log) for rank, log in model_mismatch.logs.items()}
    guard_lines = {rank: re.findall(r"ms_syncbn SyncBatchNorm error 3 in layer .*", log)
                   for rank, log in model_mismatch.logs.items()}
    assert any("SyncBatchNorm error 3 in layer" in message and "forward num_features check" in message
               for message in messages.values()), messages
    assert any("disagree on num_features" in line for lines in guard_lines.values()
               for line in lines), (f"no rank names num_features: {messages} {guard_lines}")


# ---------------------------------------------------------------------------------- inputs --

INPUT_SCENARIOS = ["mixed_dtype", "nonfinite", "float16_near_max", "constant", "empty", "strided"]


@pytest.fixture(scope="module")
def inputs_job(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("inputs")
    env = dict(os.environ, MS_NODE_TIMEOUT=str(FAULT_NODE_TIMEOUT))
    result = run_msrun("reliability_inputs.py", 2, tmp_path, *INPUT_SCENARIOS, timeout=JOB_TIMEOUT,
                       env=env)
    print(f"\n[reliability] inputs job: {result.elapsed:.1f} s")
    return result


def load_scenario(job, name):
    """Per-rank records of a scenario; fails with the worker's error or the job's logs."""
    directory = job.out_dir / name
    errors = {path.name: path.read_text()[-3000:] for path in directory.glob("*.error")}
    assert not errors, f"scenario {name} raised: {errors}"
    paths = [directory / f"rank{rank}.npz" for rank in range(2)]
    missing = [str(path) for path in paths if not path.exists()]
    assert not missing, f"missing {missing} (msrun exit {job.returncode})\n{job.logs()}"
    return [dict(np.load(path)) for path in paths]


def steps_of(records):
    return sum(1 for key in records[0] if re.fullmatch(r"x\d+", key))


def concat(records, key):
    return np.concatenate([record[key] for record in records])


def assert_close(got, expected, tol, what, scale=0.0):
    """max |got - expected| <= tol * scale, scale at least max |expected|."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    if expected.size == 0:
        return
    scale = max(np.abs(expected).max(), scale, 1e-12)
    error = np.abs(got - expected).max() / scale
    assert error <= tol, f"{what}: max error {error:.3g} of scale {scale:.3g} > {tol}"


def assert_same_on_ranks(records, key):
    assert np.array_equal(records[0][key], records[1][key], equal_nan=True), (
        f"{key} differs between ranks: {records[0][key]} vs {records[1][key]}")


def local_param_grads(x, dy, rows):
    """Each rank's own dweight, dbias: its rows of sum(dy * xhat), sum(dy), with group statistics."""
    axes = (0,) + tuple(range(2, x.ndim))
    mean, var, _ = reference.batch_stats(x)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    xhat = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + EPS)
    return (dy[rows] * xhat[rows]).sum(axis=axes), dy[rows].sum(axis=axes)


def check_training_steps(records, tol_of_rank, channels=None, steps=None):
    """Every step's y, dx, dweight, dbias and running statistics against the reference.

    ``channels`` restricts the comparison (statistics are per channel); running
    statistics must be bit-identical on the ranks in every channel.
    """
    weight, bias = records[0]["weight"], records[0]["bias"]
    keep = slice(None) if channels is None else list(channels)
    running_mean = np.zeros_like(weight, np.float64)[keep]
    running_var = np.ones_like(weight, np.float64)[keep]
    tracked = 0
    for i in range(steps_of(records) if steps is None else steps):
        sizes = [len(record[f"x{i}"]) for record in records]
        x, dy = concat(records, f"x{i}")[:, keep], concat(records, f"dy{i}")[:, keep]
        for key in ("running_mean", "running_var", "num_batches_tracked", "stat_shift"):
            assert_same_on_ranks(records, f"{key}{i}")
        if len(x):
            tracked += 1
            y = reference.forward(x, weight[keep], bias[keep], EPS)
            dx, _, _ = reference.backward(x, dy, weight[keep], EPS)
            running_mean, running_var = reference.running_update(running_mean, running_var, x,
                                                                 MOMENTUM, tracked)
        else:
            y, dx = x, x
        start = 0
        for rank, record in enumerate(records):
            rows = slice(start, start + sizes[rank])
            start += sizes[rank]
            tol = tol_of_rank[rank]
            what = f"step {i} rank {rank}"
            assert_close(record[f"y{i}"][:, keep], y[rows], tol, f"{what} y")
            assert_close(record[f"dx{i}"][:, keep], dx[rows], tol, f"{what} dx")
            if len(x):
                dweight, dbias = local_param_grads(x, dy, rows)
            else:
                dweight = dbias = np.zeros(x.shape[1])
            # a sum of |dy| bounds both (|xhat| <= sqrt(N)): the scale when they cancel to ~0
            scale = np.abs(dy[rows]).sum(axis=(0,) + tuple(range(2, dy.ndim))).max(initial=0.0)
            assert_close(record[f"dweight{i}"][keep], dweight, tol, f"{what} dweight", scale)
            assert_close(record[f"dbias{i}"][keep], dbias, tol, f"{what} dbias", scale)
        assert_close(records[0][f"running_mean{i}"][keep], running_mean, STATS_TOL,
                     f"step {i} running_mean")
        assert_close(records[0][f"running_var{i}"][keep], running_var, STATS_TOL,
                     f"step {i} running_var")
        assert int(records[0][f"num_batches_tracked{i}"]) == tracked, f"step {i} num_batches_tracked"


def test_ranks_with_different_input_dtypes(inputs_job):
    """float16 on rank 0, float32 on rank 1: the payload is float32 everywhere; the result is right."""
    records = load_scenario(inputs_job, "mixed_dtype")
    assert records[0]["y0"].dtype == np.float64  # saved as float64; the layer returned the input dtype
    check_training_steps(records, tol_of_rank=[FLOAT16_TOL, FLOAT32_TOL])


AFFECTED = (NAN_CHANNEL, INF_CHANNEL)


def unaffected_channels(records):
    return [c for c in range(records[0]["x0"].shape[1]) if c not in AFFECTED]


def test_nonfinite_batch_spares_unaffected_channels(inputs_job):
    """NaN (rank 1) and +Inf (rank 0) in one element of two channels: the others are untouched.

    Policy: the affected channels' batch statistics, outputs (on every rank) and
    gradients are non-finite; every other channel's outputs, gradients and running
    statistics are exact, finite and the same on every rank.
    """
    records = load_scenario(inputs_job, "nonfinite")
    keep = unaffected_channels(records)
    check_training_steps(records, tol_of_rank=[FLOAT32_TOL] * 2, channels=keep)
    for step in range(2):
        for key in ("running_mean", "running_var"):
            assert np.isfinite(records[0][f"{key}{step}"][keep]).all()
    for rank, record in enumerate(records):
        for channel in AFFECTED:
            assert not np.isfinite(record["y0"][:, channel]).any(), (
                f"rank {rank} channel {channel}: finite output from a non-finite batch")


def test_nonfinite_batch_leaves_affected_channel_statistics_untouched(inputs_job):
    """Policy: a channel whose batch statistics are NaN/Inf does not update its running stats.

    Its output (and so the loss) of that step is non-finite, which is where the user
    sees it; the running mean and variance keep their previous values (here the
    initial 0 and 1) instead of being destroyed, on every rank alike. Step 1 is clean
    and updates them as usual.
    """
    records = load_scenario(inputs_job, "nonfinite")
    for record in records:
        np.testing.assert_array_equal(record["running_mean0"][list(AFFECTED)], 0.0)
        np.testing.assert_array_equal(record["running_var0"][list(AFFECTED)], 1.0)
        for key in ("running_mean1", "running_var1"):
            assert np.isfinite(record[key]).all(), f"{key} after a clean batch: {record[key]}"
            np.testing.assert_array_equal(record[key], records[0][key])


def test_clean_batch_after_nonfinite_batch_is_normalized(inputs_job):
    """One bad batch must not poison later ones: the next clean batch is normalized correctly.

    The layer keeps the last group mean as the shift of its sums (stat_shift) and
    takes only finite means into it, so a NaN/Inf batch cannot poison later steps.
    """
    records = load_scenario(inputs_job, "nonfinite")
    x, dy = concat(records, "x1"), concat(records, "dy1")
    y = reference.forward(x, records[0]["weight"], records[0]["bias"], EPS)
    dx, _, _ = reference.backward(x, dy, records[0]["weight"], EPS)
    start = 0
    for rank, record in enumerate(records):
        rows = slice(start, start + len(record["x1"]))
        start = rows.stop
        assert_close(record["y1"], y[rows], FLOAT32_TOL, f"rank {rank} y of the clean batch")
        assert_close(record["dx1"], dx[rows], FLOAT32_TOL, f"rank {rank} dx of the clean batch")


def test_float16_near_its_maximum(inputs_job):
    """float16 values up to 65504: statistics in float32 do not overflow; results match float64."""
    records = load_scenario(inputs_job, "float16_near_max")
    assert np.abs(concat(records, "x0")).max() >= FLOAT16_MAX - 32  # really at the top of the range
    assert np.abs(concat(records, "x2")).max() == FLOAT16_MAX
    for i in range(steps_of(records)):
        for record in records:
            for key in ("y", "dx", "running_mean", "running_var"):
                assert np.isfinite(record[f"{key}{i}"]).all(), f"step {i}: non-finite {key}"
    check_training_steps(records, tol_of_rank=[FLOAT16_TOL] * 2)


def test_all_equal_values_output_bias(inputs_job):
    """Variance 0 (every value equal): y is the bias exactly, gradients finite and exact."""
    records = load_scenario(inputs_job, "constant")
    assert records[0]["x0"].flat[0] == np.float32(CONSTANT_VALUE)
    bias = records[0]["bias"].reshape(1, -1, 1)
    for i in range(steps_of(records)):
        for rank, record in enumerate(records):
            assert np.isfinite(record[f"dx{i}"]).all()
            assert_close(record[f"y{i}"], np.broadcast_to(bias, record[f"y{i}"].shape), 1e-6,
                         f"step {i} rank {rank}: y of a constant batch")
    check_training_steps(records, tol_of_rank=[FLOAT32_TOL] * 2)


def test_empty_local_batches_on_some_and_all_ranks(inputs_job):
    """Empty batches on one rank, then on all ranks at once: defined results, state untouched.

    A step whose whole group batch is empty returns empty outputs and leaves the
    running statistics, num_batches_tracked and the shift exactly as they were.
    """
    records = load_scenario(inputs_job, "empty")
    check_training_steps(records, tol_of_rank=[FLOAT32_TOL] * 2)
    all_empty = [i for i in range(steps_of(records)) if not len(concat(records, f"x{i}"))]
    some_empty = [i for i in range(steps_of(records))
                  if len(concat(records, f"x{i}")) and min(len(r[f"x{i}"]) for r in records) == 0]
    assert all_empty and some_empty, "the scenario lost its empty steps"
    for i in all_empty:
        for key in ("running_mean", "running_var", "num_batches_tracked", "stat_shift"):
            assert np.array_equal(records[0][f"{key}{i}"], records[0][f"{key}{i - 1}"]), (
                f"step {i} (all ranks empty) changed {key}")
    for i in range(steps_of(records)):
        for key in ("running_mean", "running_var", "stat_shift"):
            assert np.isfinite(records[0][f"{key}{i}"]).all(), f"step {i}: non-finite {key}"


def test_strided_input_equals_contiguous_copy(inputs_job):
    """A transposed view and a strided slice give bit-for-bit the result of their dense copies."""
    records = load_scenario(inputs_job, "strided")
    for record in records:
        for i in range(steps_of(records)):
            assert not bool(record[f"contiguous{i}"]), f"step {i}: the view was contiguous"
            for key in ("y", "dx", "dweight", "dbias", "running_mean", "running_var"):
                assert np.array_equal(record[f"{key}{i}"], record[f"copy_{key}{i}"]), (
                    f"step {i}: {key} of the view differs from the dense copy")
    check_training_steps(records, tol_of_rank=[FLOAT32_TOL] * 2)
