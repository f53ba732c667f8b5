"""Checkpoints: SyncBatchNorm <-> mint.nn.BatchNorm2d, nn.BatchNorm2d models, msrun -> one process.

* A SyncBatchNorm checkpoint loads into mint.nn.BatchNorm2d (same names; only the
  ``stat_shift`` and ``guard_code`` buffers are left over) and a mint checkpoint loads back.
* nn.BatchNorm2d checkpoints (gamma/beta/moving_*) load into converted models and
  converted checkpoints into reverted models through remap_batchnorm_checkpoint.
* A model trained on 2 ranks under msrun saves ONE checkpoint that loads into a
  single-process model (converted, reverted, or never converted) with the same eval
  outputs, and the main job (launch/run_cpu.sh) passes its own check.
Correctness is checked against tests/reference.py (float64).
"""
import datetime
import importlib.util
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import mindspore as ms
from mindspore import mint, nn

from ms_syncbn import (SyncBatchNorm, convert_sync_batchnorm, remap_batchnorm_checkpoint,
                       revert_sync_batchnorm)
from tests import reference
from tests.harness import run_msrun
from tests.workers import convert_checkpoint_train as job

ROOT = Path(__file__).resolve().parents[1]
CHANNELS = 4


pytestmark = pytest.mark.usefixtures("pynative_cpu")


class Holder(nn.Cell):
    """A parent cell, so that parameters are saved as ``bn.<name>`` as in a real model."""

    def __init__(self, bn):
        super().__init__()
        self.bn = bn

    def construct(self, x):
        return self.bn(x)


def randomize(cell, seed):
    rng = np.random.default_rng(seed)
    for param in cell.get_parameters():
        if param.name.endswith("num_batches_tracked"):
            param.set_data(ms.Tensor(int(rng.integers(1, 50)), ms.int64))
        else:
            param.set_data(ms.Tensor(rng.uniform(0.5, 1.5, param.shape).astype(np.float32)))


def values(cell):
    return {p.name: p.asnumpy() for p in cell.get_parameters()}


def eval_output(model, x):
    model.set_train(False)
    out = model(ms.Tensor(x))
    return out.asnumpy()


def test_syncbn_checkpoint_loads_into_mint_batchnorm2d_and_back(tmp_path):
    sync = Holder(SyncBatchNorm(CHANNELS))
    randomize(sync, seed=1)
    ms.save_checkpoint(sync, str(tmp_path / "sync.ckpt"))

    plain = Holder(mint.nn.BatchNorm2d(CHANNELS))
    not_loaded, unused = ms.load_param_into_net(plain, ms.load_checkpoint(str(tmp_path / "sync.ckpt")))
    assert not_loaded == [] and unused == ["bn.stat_shift", "bn.guard_code"]
    saved = values(sync)
    for name, value in values(plain).items():
        np.testing.assert_array_equal(value, saved[name], err_msg=name)

    randomize(plain, seed=2)
    ms.save_checkpoint(plain, str(tmp_path / "mint.ckpt"))
    back = Holder(SyncBatchNorm(CHANNELS))
    not_loaded, unused = ms.load_param_into_net(back, ms.load_checkpoint(str(tmp_path / "mint.ckpt")))
    # derived state, re-centred on use; no step of the new layer was stopped
    assert not_loaded == ["bn.stat_shift", "bn.guard_code"] and unused == []
    saved = values(plain)
    for name, value in values(back).items():
        if name not in ("bn.stat_shift", "bn.guard_code"):
            np.testing.assert_array_equal(value, saved[name], err_msg=name)
    x = np.random.default_rng(3).normal(1.0, 2.0, size=(5, CHANNELS, 3, 3)).astype(np.float32)
    expected = reference.forward(x, saved["bn.weight"], saved["bn.bias"], 1e-5,
                                 saved["bn.running_mean"], saved["bn.running_var"])
    np.testing.assert_allclose(eval_output(back, x), expected, rtol=1e-5, atol=1e-5)


def test_nn_batchnorm_checkpoint_loads_into_converted_model_after_remap(tmp_path):
    original = job.build_model()
    randomize(original.input_bn, seed=4)
    randomize(original.features[1], seed=5)
    ms.save_checkpoint(original, str(tmp_path / "plain.ckpt"))

    converted = convert_sync_batchnorm(job.build_model())
    randomize(converted, seed=6)  # every value must come from the checkpoint
    params = ms.load_checkpoint(str(tmp_path / "plain.ckpt"))
    not_loaded, _ = ms.load_param_into_net(converted, dict(params))
    assert "input_bn.weight" in not_loaded  # the names differ: gamma vs weight
    not_loaded, _ = ms.load_param_into_net(converted, remap_batchnorm_checkpoint(params, converted))
    assert sorted(not_loaded) == sorted(
        f"{layer}.{buf}" for layer in ("input_bn", "features.1")
        for buf in ("num_batches_tracked", "stat_shift", "guard_code")), not_loaded

    x = job.eval_input()
    np.testing.assert_allclose(eval_output(converted, x), eval_output(original, x),
                               rtol=1e-5, atol=1e-5)
    bn = original.input_bn
    expected = reference.forward(x, bn.gamma.asnumpy(), bn.beta.asnumpy(), bn.eps,
                                 bn.moving_mean.asnumpy(), bn.moving_variance.asnumpy())
    np.testing.assert_allclose(eval_output(converted.input_bn, x), expected, rtol=1e-5, atol=1e-5)


def test_converted_checkpoint_loads_into_reverted_model_after_remap(tmp_path):
    converted = convert_sync_batchnorm(job.build_model())
    randomize(converted, seed=7)
    ms.save_checkpoint(converted, str(tmp_path / "sync.ckpt"))
    reverted = revert_sync_batchnorm(convert_sync_batchnorm(job.build_model()), layer_family="nn")
    randomize(reverted, seed=8)
    params = ms.load_checkpoint(str(tmp_path / "sync.ckpt"))
    not_loaded, _ = ms.load_param_into_net(reverted, remap_batchnorm_checkpoint(params, reverted))
    assert not_loaded == []
    x = job.eval_input()
    np.testing.assert_allclose(eval_output(reverted, x), eval_output(converted, x),
                               rtol=1e-5, atol=1e-5)


def test_checkpoint_trained_under_msrun_loads_into_a_single_process_model(tmp_path):
    result = run_msrun("convert_checkpoint_train.py", 2, tmp_path, timeout=200)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.logs()}"
    ranks = [np.load(result.out_dir / f"rank{r}.npz") for r in range(2)]
    ckpt = result.out_dir / "model.ckpt"
    assert ckpt.exists()

    # Synchronized: both ranks hold the same model; the input layer's running statistics
    # are those of the concatenated global batches (float64 reference).
    np.testing.assert_array_equal(ranks[0]["y"], ranks[1]["y"])
    mean, var = np.zeros(job.CHANNELS_IN), np.ones(job.CHANNELS_IN)
    for step in range(job.STEPS):
        x, _ = job.global_batch(step)
        mean, var = reference.running_update(mean, var, x, job.MOMENTUM, step + 1)
    for res in ranks:
        np.testing.assert_allclose(res["input_running_mean"], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res["input_running_var"], var, rtol=1e-5, atol=1e-6)
        assert int(res["input_tracked"]) == job.STEPS

    params = ms.load_checkpoint(str(ckpt))
    x = job.eval_input()
    # 1. The converted model in one process (no init(): no communication).
    single = convert_sync_batchnorm(job.build_model())
    randomize(single, seed=9)
    not_loaded, _ = ms.load_param_into_net(single, params)
    assert not_loaded == []
    np.testing.assert_allclose(eval_output(single, x), ranks[0]["y"], rtol=1e-6, atol=1e-6)
    # 2. Reverted to nn.BatchNorm2d, and 3. the original, never converted network.
    for plain in (revert_sync_batchnorm(convert_sync_batchnorm(job.build_model())),
                  job.build_model()):
        randomize(plain, seed=10)
        not_loaded, _ = ms.load_param_into_net(plain, remap_batchnorm_checkpoint(params, plain))
        assert not_loaded == []
        np.testing.assert_allclose(eval_output(plain, x), ranks[0]["y"], rtol=1e-5, atol=1e-5)
    bn = single.input_bn
    expected = reference.forward(x, bn.weight.asnumpy(), bn.bias.asnumpy(), bn.eps, mean, var)
    np.testing.assert_allclose(eval_output(bn, x), expected, rtol=1e-4, atol=1e-4)


def _load_example():
    spec = importlib.util.spec_from_file_location(
        "train_resnet_syncbn", ROOT / "examples" / "train_resnet_syncbn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_main_job_writes_each_run_to_a_new_folder(tmp_path):
    """A second run never overwrites the first one's results: a new run-<date>-<time> folder
    per run under --out-root (suffixed within the same second); --out names the folder and
    is refused when it holds a result.json."""
    example = _load_example()
    args = example.parse_args(["--out-root", str(tmp_path / "runs")])
    now = datetime.datetime(2026, 1, 2, 3, 4, 5)
    first, second = example.new_run_folder(args, now), example.new_run_folder(args, now)
    assert (first.name, second.name) == ("run-20260102-030405", "run-20260102-030405-2")
    assert first.is_dir() and second.is_dir()
    (first / "result.json").write_text("{}")
    with pytest.raises(SystemExit, match="holds an earlier run's results"):
        example.new_run_folder(example.parse_args(["--out", str(first)]))
    mine = example.new_run_folder(example.parse_args(["--out", str(tmp_path / "mine")]))
    assert mine == tmp_path / "mine" and mine.is_dir()
    assert example.parse_args([]).out_root == "syncbn_runs" and example.parse_args([]).out is None


def test_main_job_passes_and_its_checkpoint_loads_single_process(tmp_path):
    """The main job as a user runs it, with float16 mixed precision (--amp O2: Model.train
    with amp_level O2 and a loss scale; the float32 Model.train path is a recipe of
    tests/test_amp_training.py): it passes, prints no MindSpore log line although it
    promises errors only, labels the compilation step and lists the files it wrote."""
    out = tmp_path / "run"
    cmd = ["bash", str(ROOT / "launch" / "run_cpu.sh"), "--log-dir", str(tmp_path / "log"),
           "--amp", "O2", "--", "--steps", "4", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=tmp_path,
                            env=dict(os.environ, GLOG_v="3", OMP_NUM_THREADS="1"))
    try:
        stdout, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
        pytest.fail(f"launch/run_cpu.sh timed out\n{stdout[-4000:]}")
    assert proc.returncode == 0, stdout[-4000:]
    assert "step   4/4  loss" in stdout and "-> PASS" in stdout, stdout[-4000:]
    assert "amp O2" in stdout and "includes compiling" in stdout, stdout[-4000:]
    assert "[INFO]" not in stdout and "[WARNING]" not in stdout, stdout[-4000:]
    assert f"results in {out}" in stdout, stdout[-4000:]
    listed = stdout[stdout.index("files written"):]
    for name in ("resnet_syncbn.ckpt", "result.json", "eval_images.npy", "eval_logits.npy"):
        assert str(out / name) in listed and (out / name).exists(), listed
    assert stdout.rstrip().endswith("PASS"), stdout[-2000:]

    example = _load_example()
    plain = example.build_network(seed=123)  # other weights: all must come from the file
    params = ms.load_checkpoint(str(out / "resnet_syncbn.ckpt"))
    not_loaded, _ = ms.load_param_into_net(plain, remap_batchnorm_checkpoint(params, plain))
    assert not_loaded == []
    np.testing.assert_allclose(eval_output(plain, np.load(out / "eval_images.npy")),
                               np.load(out / "eval_logits.npy"), rtol=1e-5, atol=1e-5)
