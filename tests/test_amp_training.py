"""Training a converted network through mindspore.amp and MindSpore's training APIs, under msrun.

One msrun job per mode (2 ranks, PyNative and graph) runs every recipe of
tests/workers/amp_training.py: ``build_train_network`` at O0-O3 with a fixed loss scale,
``auto_mixed_precision`` or ``custom_mixed_precision`` + ``nn.TrainOneStepCell``,
``Model.train`` over a sharded dataset (amp_level O0 and O2), gradient accumulation over
micro-batches, and a float16 overflow under loss scaling; ``DATA_PARALLEL`` with ``gradients_mean`` False and True.
For each recipe:

- the two ranks' parameters and running statistics are bit-for-bit identical after
  every step;
- they equal, within the tolerance stated per amp level below, those of ONE process
  training the unconverted network (``nn.BatchNorm2d``) at the same amp level on the
  concatenated global batches (the ranks run these inside the same job, with no parallel
  context);
- training changed the parameters, and amp changed the numbers (O2 differs from O0).
"""
import json

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn

from ms_syncbn import SyncBatchNorm
from tests import reference
from tests.harness import run_msrun
from tests.workers import amp_training as job

MODES = ("pynative", "graph")
RECIPES = list(job.RECIPES)
JOB_TIMEOUT = 600  # seconds; a job takes ~100 s on 2 idle cores, more when shared

# Largest |converted on 2 ranks - unconverted on one process| over every parameter and
# running statistic after every step, per amp level. float32 (O0): summation order only.
# O1/O2 and our float32 layer: the same float16 convolutions, and batch norms whose float32
# outputs round to float16 alike but for a rare last-bit flip. O3 casts nn.BatchNorm2d to
# float16 in graph mode (float16 weights and output), while SyncBatchNorm stays float32.
TOLERANCE = {"O0": 1e-5, "O1": 1e-4, "O2": 1e-4, "O3": 5e-3}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Runs each mode's msrun job at most once, on first use."""
    done = {}

    def outcome(mode):
        if mode not in done:
            result = run_msrun("amp_training.py", 2, tmp_path_factory.mktemp(f"amp_{mode}"),
                               "--mode", mode, *RECIPES, timeout=JOB_TIMEOUT)
            done[mode] = result
        return done[mode]

    return outcome


def _load(result, recipe, who):
    base = result.out_dir / recipe / who
    if not base.with_suffix(".json").exists():
        pytest.fail(f"{who} wrote no result for {recipe}\n{result.stdout[-3000:]}\n{result.logs()}")
    meta = json.loads(base.with_suffix(".json").read_text())
    assert meta["error"] is None, f"{recipe}, {who}: {meta['error']}"
    with np.load(base.with_suffix(".npz")) as data:
        arrays = dict(data)
    steps = sorted({int(key.rpartition("@")[2]) for key in arrays})
    states = [{key.rpartition("@")[0]: value for key, value in arrays.items()
               if key.endswith(f"@{step}")} for step in steps]
    return meta, states


def max_difference(states, reference):
    """Largest |a - b| over every step, parameter and running statistic; NaN in both is equal."""
    assert len(states) == len(reference) and states, (len(states), len(reference))
    worst = 0.0
    for ours, theirs in zip(states, reference):
        assert sorted(ours) == sorted(theirs), (sorted(ours), sorted(theirs))
        for name, value in ours.items():
            other = theirs[name]
            both_nan = np.isnan(value) & np.isnan(other)
            diff = np.abs(np.where(both_nan, 0.0, value - other))
            worst = max(worst, float(np.max(np.where(np.isnan(diff), np.inf, diff))))
    return worst


@pytest.mark.parametrize("mode", MODES)
def test_job_finishes_cleanly(outcomes, mode):
    result = outcomes(mode)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.logs()}"
    print(f"amp_training {mode}: {result.elapsed:.0f} s")


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r != "build_O2_overflow"])
@pytest.mark.parametrize("mode", MODES)
def test_recipe_matches_one_process_on_the_concatenated_batches(outcomes, mode, recipe):
    result = outcomes(mode)
    meta0, rank0 = _load(result, recipe, "rank0")
    meta1, rank1 = _load(result, recipe, "rank1")
    _, reference = _load(result, recipe, "reference")
    for step, (a, b) in enumerate(zip(rank0, rank1)):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{name} after step {step}")
    for values in (meta0["losses"], meta1["losses"]):
        assert np.all(np.isfinite(values)), values
    first, last = rank0[0], rank0[-1]
    assert any(not np.array_equal(first[k], last[k]) for k in first if not k.startswith("bn")), \
        "training left the weights unchanged"
    level = job.RECIPES[recipe]["level"]
    diff = max_difference(rank0, reference)
    print(f"{mode} {recipe}: max |2 ranks - 1 process| = {diff:.2e}")
    assert diff <= TOLERANCE[level], f"{mode} {recipe}: {diff:.3e} > {TOLERANCE[level]}"


@pytest.mark.parametrize("mode", MODES)
def test_amp_changes_the_numbers(outcomes, mode):
    """O2 really runs in float16: its result differs from O0's on the same data."""
    result = outcomes(mode)
    _, o0 = _load(result, "build_O0", "rank0")
    _, o2 = _load(result, "build_O2", "rank0")
    assert max_difference(o2, o0) > 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_float16_overflow_under_a_fixed_loss_scale(outcomes, mode):
    """The scaled gradients overflow float16 and the fixed scale applies them: the weights
    become non-finite as in the unconverted network, the running statistics stay finite
    (a step with non-finite batch statistics leaves them unchanged)."""
    result = outcomes(mode)
    _, rank0 = _load(result, "build_O2_overflow", "rank0")
    _, rank1 = _load(result, "build_O2_overflow", "rank1")
    _, reference = _load(result, "build_O2_overflow", "reference")
    for a, b in zip(rank0, rank1):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    weights = [k for k in rank0[-1] if k.startswith("conv")]
    assert any(not np.all(np.isfinite(rank0[-1][k])) for k in weights), "no overflow happened"
    for ours, theirs in zip(rank0, reference):
        for name in ours:
            if name.endswith(("running_mean", "running_var")):
                assert np.all(np.isfinite(ours[name])), name
                if np.all(np.isfinite(theirs[name])):  # nn.BatchNorm2d's turn NaN later
                    np.testing.assert_allclose(ours[name], theirs[name], atol=TOLERANCE["O2"],
                                               err_msg=name)
            else:
                np.testing.assert_array_equal(np.isfinite(ours[name]), np.isfinite(theirs[name]),
                                              err_msg=name)


@pytest.mark.usefixtures("pynative_cpu")
@pytest.mark.parametrize("low", [ms.float16, ms.bfloat16])
def test_to_float_keeps_the_layer_in_float32_and_returns_the_low_dtype(low):
    """What amp does to nn.BatchNorm2d (black list): computed in float32, output in the low
    dtype; parameters and running statistics stay float32 and are updated."""
    net = nn.SequentialCell([SyncBatchNorm(3)])
    net.to_float(low)
    bn = net[0]
    assert bn.amp_output_dtype == low
    for cell in (bn, bn.group_stats, bn.local_batch_stats, bn.frozen_stats):
        assert cell.get_flags().get("fp32") is True and not cell.get_flags().get("fp16"), cell
    x = np.random.default_rng(5).normal(2.0, 3.0, size=(4, 3, 2, 2)).astype(np.float32)
    net.set_train(True)
    y = net(ms.Tensor(x).astype(low))
    assert y.dtype == low
    assert bn.weight.dtype == ms.float32 and bn.running_var.dtype == ms.float32
    x_low = ms.Tensor(x).astype(low).astype(ms.float32).asnumpy()  # what the layer saw
    expected = reference.forward(x_low, np.ones(3), np.zeros(3), 1e-5)
    tol = 1e-2 if low == ms.float16 else 5e-2
    np.testing.assert_allclose(y.astype(ms.float32).asnumpy(), expected, rtol=tol, atol=tol)
    mean, var = reference.running_update(np.zeros(3), np.ones(3), x_low, 0.1, 1)
    np.testing.assert_allclose(bn.running_mean.asnumpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var.asnumpy(), var, rtol=1e-5, atol=1e-6)
    net.to_float(ms.float32)
    assert bn.amp_output_dtype is None


class _ConvBatchNorm(nn.Cell):
    """Conv -> BatchNorm2d -> Dense, its weights drawn from ``seed`` (no global seed): two
    instances built from one seed are the same network."""

    def __init__(self, seed):
        super().__init__()
        rng = np.random.default_rng(seed)
        # sigma 0.01 as MindSpore's weight_init="normal"
        conv_weight, fc_weight = (ms.Tensor(rng.normal(0.0, 0.01, shape).astype(np.float32))
                                  for shape in ((4, 3, 3, 3), (3, 4 * 6 * 6)))
        self.conv = nn.Conv2d(3, 4, 3, pad_mode="same", weight_init=conv_weight)
        self.bn = nn.BatchNorm2d(4)
        self.flatten = nn.Flatten()
        self.fc = nn.Dense(4 * 6 * 6, 3, weight_init=fc_weight, bias_init="zeros")  # default: random

    def construct(self, x):
        return self.fc(self.flatten(self.bn(self.conv(x))))


@pytest.mark.parametrize("mode", MODES)
def test_o1_code_rewrite_runs_the_ascend_table(mode, monkeypatch, tmp_path):
    """amp O1 regenerates every cell's code in another module: the Ascend table (over the
    emulated primitives) must not read a module constant there. Two steps of the converted
    network equal the unconverted network's two steps at O1 (one process)."""
    from tests.ascend_emulation import use_emulated_ascend

    monkeypatch.chdir(tmp_path)  # O1 writes the rewritten code to ./rewritten_network/
    use_emulated_ascend("a2", monkeypatch)
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    try:
        plain, converted = _ConvBatchNorm(seed=3), _ConvBatchNorm(seed=3)
        converted = SyncBatchNorm.convert_sync_batchnorm(converted)
        assert isinstance(converted.bn, SyncBatchNorm)
        rng = np.random.default_rng(5)
        batches = [(ms.Tensor(rng.normal(2.0, 3.0, (5, 3, 6, 6)).astype(np.float32)),
                    ms.Tensor(rng.integers(0, 3, 5).astype(np.int32))) for _ in range(2)]
        losses = {}
        for name, net in (("plain", plain), ("converted", converted)):
            loss_fn = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
            train = ms.amp.build_train_network(net, nn.SGD(net.trainable_params(), 0.1), loss_fn,
                                               level="O1")
            losses[name] = [float(train(x, y).asnumpy()) for x, y in batches]
        # O1 runs the convolutions and the dense layer in float16, and the Ascend table returns
        # BatchNormReduceGrad's sums in x's dtype (float16 here) where nn.BatchNorm2d keeps
        # float32: the two networks agree to float16's resolution (2^-11 ~ 4.9e-4 a rounding),
        # not to float32's.
        np.testing.assert_allclose(losses["converted"], losses["plain"], rtol=1e-3)
        pairs = [(dict(converted.parameters_and_names())[name], dict(plain.parameters_and_names())[name])
                 for name in ("conv.weight", "fc.weight", "fc.bias")]
        pairs += [(converted.bn.weight, plain.bn.gamma), (converted.bn.bias, plain.bn.beta),
                  (converted.bn.running_mean, plain.bn.moving_mean),
                  (converted.bn.running_var, plain.bn.moving_variance)]
        # After two steps the parameters differ by a few float16 roundings of each tensor's
        # scale: over 30 initialisations a mode the largest difference was 1.66e-3 of max|theirs| (the
        # bias and the running mean: small sums of float16 terms), and one CI run saw 2.1e-3 with
        # an unseeded init. 1e-2 (20 roundings) keeps a 5x margin; a wrong mean, a missing
        # gradient term or an unsynchronised statistic is off by O(1) of it.
        for ours, theirs in pairs:
            ours, theirs = ours.asnumpy(), theirs.asnumpy()
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-2 * np.abs(theirs).max(),
                                       err_msg=ours.shape)
    finally:
        ms.set_context(mode=previous)
