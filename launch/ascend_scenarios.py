"""Run the emulated tier's multi-rank scenarios on real Ascend NPUs (HCCL) and judge them.

    python launch/ascend_scenarios.py [--out DIR] [--timeout S]

Five msrun jobs on this node's NPUs, with the layer's own (Ascend) kernel table:
2 ranks in PyNative, 2 ranks in graph mode, 4 ranks in graph mode (with subgroups), the
scenarios of tests/test_ascend_emulated.py (the default backward reduction,
BNTrainingUpdateGrad through MindSpore's aclop path), and 2 ranks in graph mode with each other
choice of the backward switch MS_SYNCBN_ASCEND_BACKWARD_REDUCE (centred, uncentred). Each scenario's results are checked against
the float64 reference on the concatenated batch exactly as the tests check the CPU and
emulated runs (the one-value scenario: the guard stops that step without raising, its
outputs are NaN, the state is unchanged and every rank keeps guard code 2, named); one line
PASS/FAIL per job and scenario, exit status 0 only if all pass.
Without an Ascend NPU (no /dev/davinci* device, or a MindSpore without Ascend support)
it says so and exits 2.
"""
import argparse
import glob
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ms_syncbn.kernels.ascend import BACKWARD_REDUCE_ENV  # noqa: E402

JOBS = {  # name: (ranks, mode, scenarios); the emulated tier's scenarios
    "pynative_2ranks": (2, "pynative", ["uneven_4d", "empty_rank", "all_empty", "large_mean",
                                        "float16", "bfloat16", "float64", "affine_false_cma",
                                        "untracked", "rank2", "rank5", "one_value"]),
    "graph_2ranks": (2, "graph", ["uneven_4d", "empty_rank", "all_empty", "large_mean", "float16",
                                  "bfloat16", "float64", "rank3"]),
    "graph_4ranks": (4, "graph", ["world4_uneven", "world4_all_empty", "world4_large_mean",
                                  "world4_bfloat16", "world4_float64", "subgroups"]),
    # The backward switch (README, "How dtypes are routed on Ascend"): BatchNormReduceGrad on
    # x - mean (the fallback if the aclop kernel is missing), and called as mint calls it (not
    # at a large mean, where that call cancels by design).
    "graph_2ranks_centred": (2, "graph", ["uneven_4d", "empty_rank", "all_empty", "large_mean",
                                          "float16", "bfloat16", "float64", "rank3"]),
    "graph_2ranks_uncentred": (2, "graph", ["uneven_4d", "empty_rank", "all_empty", "float16",
                                            "bfloat16", "float64", "rank3"]),
}
# Environment of a job, on top of this process's.
JOB_ENV = {"graph_2ranks_centred": {BACKWARD_REDUCE_ENV: "centred"},
           "graph_2ranks_uncentred": {BACKWARD_REDUCE_ENV: "uncentred"}}


def ascend_available():
    """(True, "") or (False, why not)."""
    if not glob.glob("/dev/davinci[0-9]*"):
        return False, "no Ascend NPU on this machine (no /dev/davinci* device)"
    if shutil.which("msrun") is None:
        return False, "msrun (MindSpore's launcher) is not on PATH"
    try:
        import mindspore as ms
        ms.set_context(device_target="Ascend")
        ms.Tensor([1.0]).asnumpy()
    except Exception as err:  # MindSpore without Ascend support, or no driver
        return False, f"MindSpore cannot use Ascend here: {type(err).__name__}: {err}"
    return True, ""


def scenario_judges():
    """What runs and judges the jobs: the tests' msrun harness and their checks against the
    float64 reference (imported only when an NPU is there: the tests' modules import
    MindSpore's CPU-side helpers)."""
    from tests.harness import ScenarioJobOutcome, run_msrun
    from tests.test_ascend_emulated import LARGE_MEAN_VAR_TOL, STATS_TOL, check_one_value_stopped
    from tests.test_sync_multiprocess import _check_group, _groups, _load

    return (run_msrun, ScenarioJobOutcome, LARGE_MEAN_VAR_TOL, STATS_TOL, check_one_value_stopped,
            _check_group, _groups, _load)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="results directory (default: a temporary one)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per msrun job")
    args = parser.parse_args()
    ok, why = ascend_available()
    if not ok:
        print(f"ascend_scenarios: cannot run: {why}. Nothing was tested.", file=sys.stderr)
        return 2
    (run_msrun, JobOutcome, LARGE_MEAN_VAR_TOL, STATS_TOL, check_one_value_stopped,
     _check_group, _groups, _load) = scenario_judges()
    out = Path(args.out or tempfile.mkdtemp(prefix="ascend_scenarios_"))
    failures = 0
    for job, (world, mode, scenarios) in JOBS.items():
        job_dir = out / job
        job_dir.mkdir(parents=True, exist_ok=True)
        try:
            result = run_msrun("sync_scenarios.py", world, job_dir, "--mode", mode,
                               "--device", "Ascend", *scenarios, timeout=args.timeout,
                               env=dict(os.environ, **JOB_ENV.get(job, {})))
            outcome = JobOutcome(result, "", result.out_dir)
            print(f"{job}: msrun exit {result.returncode}, {result.elapsed:.0f} s, logs in "
                  f"{result.log_dir}", flush=True)
        except AssertionError as err:
            found = sorted(job_dir.glob("out_*"))
            outcome = JobOutcome(None, str(err), found[0] if found else None)
            print(f"{job}: msrun timed out after {args.timeout} s", flush=True)
        for scenario in scenarios:
            try:
                if scenario == "one_value":  # stopped by the guard: NaN, state kept, code 2 kept
                    check_one_value_stopped(_load(outcome, scenario, world))
                    print(f"PASS {job} {scenario}", flush=True)
                    continue
                for group, members in _groups(_load(outcome, scenario, world)).items():
                    for meta, _ in members:
                        assert meta["status"] == "ok", f"rank {meta['rank']}: {meta.get('message')}"
                    tol = LARGE_MEAN_VAR_TOL if scenario.endswith("large_mean") else STATS_TOL
                    _check_group(scenario, group, members, stats_tol=tol)
                print(f"PASS {job} {scenario}", flush=True)
            except BaseException as err:  # pytest.fail raises a BaseException subclass
                failures += 1
                reason = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
                print(f"FAIL {job} {scenario}: {reason[:300]}", flush=True)
                if "-v" in sys.argv:
                    traceback.print_exc()
    print(f"{failures} scenario(s) failed; results in {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
