"""A step the guard stopped without raising (the Ascend table) ends in an error that names it.

The Ascend guard poisons a stopped step instead of raising (no device-to-host read on the hot
path); the layer keeps the code in ``guard_code``, and ms_syncbn.check_guard_codes /
GuardCodeCheck raise the CPU guard kernel's text from it after the step. One process per mode
and table runs tests/workers/guard_codes.py: the layers believe they are in a group of two
ranks whose other rank is simulated by a stand-in all-reduce (the other rank empty, holding the
same batch, or with a layer one channel wider), on the emulated Ascend table and on the CPU
table, PyNative and graph.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ms_syncbn.kernels import GUARD_CHANNELS_DIFFER, GUARD_SINGLE_VALUE, guard_message
from tests import reference

WORKER = Path(__file__).resolve().parent / "workers" / "guard_codes.py"
RUNS = [(mode, table) for table in ("ascend", "cpu") for mode in ("pynative", "graph")]


def where(path):
    return (f"{path!r} SyncBatchNorm(num_features=3) on process group 'stand_in_two_ranks' "
            f"of 2 ranks")


@pytest.fixture(scope="module")
def results():
    """The four worker runs, started together; {(mode, table): result}."""
    procs = {run: subprocess.Popen([sys.executable, str(WORKER), "--mode", run[0], "--table", run[1]],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   cwd=WORKER.parents[2])
             for run in RUNS}
    out = {}
    for run, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, f"{run}: rc {proc.returncode}\n{stdout[-2000:]}\n{stderr[-3000:]}"
        out[run] = json.loads(lines[-1][len("RESULT "):])
        for case, result in out[run].items():
            assert "crashed" not in result, f"{run} {case}:\n{result['crashed']}"
    return out


def assert_state_unchanged(layer):
    assert layer["running_mean"] == [0.0] * 3 and layer["running_var"] == [1.0] * 3, layer
    assert layer["num_batches_tracked"] == 0, layer


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_ascend_stopped_steps_keep_their_code_and_raise_it_by_name(results, mode):
    direct = results[(mode, "ascend")]["direct"]
    assert direct["step_error"] is None  # the Ascend guard does not raise in the step
    dx_healthy, dx_one_value, dx_wider = (np.array(dx, np.float64) for dx in direct["step"]["dx"])
    assert np.isfinite(dx_healthy).all() and np.isnan(dx_one_value).all() and np.isnan(dx_wider).all()
    layers = direct["layers"]
    assert layers["healthy"]["guard_code"] == 0.0 and layers["healthy"]["guard_error"] is None
    assert layers["healthy"]["num_batches_tracked"] == 1
    # The healthy layer's step against float64: the group batch is the local one twice (the
    # stand-in's other rank holds the same batch and upstream gradient); this rank's slice.
    x = np.array(direct["healthy_inputs"]["x"], np.float64)
    dy = np.array(direct["healthy_inputs"]["dy"], np.float64)
    group_x, group_dy = np.concatenate([x, x]), np.concatenate([dy, dy])
    want_dx = reference.backward(group_x, group_dy, np.ones(3), 1e-5)[0][:len(x)]
    np.testing.assert_allclose(dx_healthy, want_dx, rtol=1e-4, atol=1e-5)
    want_mean, want_var = reference.running_update(np.zeros(3), np.ones(3), group_x, 0.1, 1)
    np.testing.assert_allclose(layers["healthy"]["running_mean"], want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layers["healthy"]["running_var"], want_var, rtol=1e-5)
    expected = {"one_value": GUARD_SINGLE_VALUE, "wider_peer": GUARD_CHANNELS_DIFFER}
    for name, code in expected.items():
        assert layers[name]["guard_code"] == code, (name, layers[name])
        assert layers[name]["guard_error"] == guard_message(code, where(name))
        assert_state_unchanged(layers[name])
    # check_guard_codes: one RuntimeError naming both layers, in model order
    assert direct["check_error"] == dict(type="RuntimeError", message="\n".join(
        guard_message(code, where(name)) for name, code in expected.items()))


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_model_train_with_guard_code_check_stops_at_the_stopped_step(results, mode):
    """Model.train: the first step holds one value per channel in the group; GuardCodeCheck raises
    at its end (the loss can be finite: the layer is followed by a ReLU, which turns NaN into 0)."""
    run = results[(mode, "ascend")]["model_one_value"]
    assert len(run["losses"]) == 1, run  # stopped after the first step, not later
    assert run["error"] == dict(type="RuntimeError",
                                message=guard_message(GUARD_SINGLE_VALUE, where("bn")))
    assert run["layer"]["guard_code"] == GUARD_SINGLE_VALUE
    assert_state_unchanged(run["layer"])


@pytest.mark.parametrize("run", RUNS, ids=["-".join(run) for run in RUNS])
def test_guard_code_check_lets_a_correct_job_train(results, run):
    healthy = results[run]["model_healthy"]
    assert healthy["error"] is None and len(healthy["losses"]) == 3, healthy
    assert np.isfinite(healthy["losses"]).all()
    assert healthy["layer"]["guard_code"] == 0.0 and healthy["layer"]["num_batches_tracked"] == 3


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_cpu_guard_raises_in_the_step_with_the_same_text(results, mode):
    """The CPU table's guard kernel raises in the step itself; its text is guard_message's."""
    result = results[(mode, "cpu")]
    direct, model = result["direct"], result["model_one_value"]
    assert direct["step_error"]["type"] == "RuntimeError"
    assert guard_message(GUARD_SINGLE_VALUE, where("one_value")) in direct["step_error"]["message"]
    assert model["losses"] == [] and model["error"]["type"] == "RuntimeError"
    assert guard_message(GUARD_SINGLE_VALUE, where("bn")) in model["error"]["message"]
    for layer in (direct["layers"]["one_value"], model["layer"]):
        assert_state_unchanged(layer)
