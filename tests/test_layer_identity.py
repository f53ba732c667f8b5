"""The backward pairing check identifies layers the same way on every rank of a correct job.

One msrun job of 3 ranks (tests/workers/layer_identity.py) runs every scenario in
PyNative and in graph mode: layers that only some ranks build (never called, called
only in eval, trained on a subgroup), models built in different orders, two models
trained in one step (one of them a ``copy.deepcopy`` of the other), one layer applied
twice, a model rebuilt after a checkpoint load. Each must train to the float64
full-batch result (tests/reference.py on the concatenated batch, through the chain rule
of the small network, ``reference_step``). Swapping two layers' backward collectives on
one rank must still stop the step on every rank with a message that names the check,
the layer and the causes.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from ms_syncbn.kernels import GUARD_MEANINGS, GUARD_MISPAIRED
from tests import reference
from tests.harness import run_msrun

WORLD = 3
MODES = ("pynative", "graph")
TRAINING = ("extra_unused_and_eval", "extra_subgroup", "build_order", "teacher_student",
            "deep_copied_teacher", "weight_sharing", "rebuilt_after_checkpoint")
JOB_TIMEOUT = 600  # seconds: a hang guard; the job takes ~1.5-3 min on 2 shared cores
EPS = 1e-5
MOMENTUM = 0.1
TOLERANCE = 2e-5  # relative to the largest reference value of each result (measured: <= 2.2e-6)
STATS_TOLERANCE = 2e-5
# The affine parameters the worker sets (WEIGHT_A, BIAS_A, WEIGHT_B, BIAS_B there).
AFFINE = {"a": ([1.5, -0.5, 2.0], [0.1, 0.2, -0.3]), "b": ([0.7, 1.2, -1.1], [0.0, -0.4, 0.5])}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    result = run_msrun("layer_identity.py", WORLD, tmp_path_factory.mktemp("layer_identity"),
                       timeout=JOB_TIMEOUT)
    print(f"layer_identity job: {result.elapsed:.1f} s")
    assert result.returncode == 0, f"msrun exit {result.returncode}\n{result.logs()}"
    return result


def load(job, mode, scenario):
    out = Path(job.out_dir) / f"{mode}_{scenario}"
    ranks = []
    for rank in range(WORLD):
        meta = json.loads((out / f"rank{rank}.json").read_text())
        ranks.append((meta, dict(np.load(out / f"rank{rank}.npz"))))
    return ranks


def reference_step(x, dy, models, shared):
    """float64 loss sum(out * dy) per row, dx, and d loss / d parameter for the full batch.

    `models` copies of the worker's Pair: out = a * b + a, a = A(x), b = B(x * x) (A(x * x)
    when `shared`); parameters are ("models.<i>.bn_<a|b>.<weight|bias>") -> gradient.
    Backward by the chain rule: d out / d a = b + 1 and d out / d b = a, each layer's
    backward from tests/reference.py, and d (x * x) / d x = 2 x: per model,
    g_a = dy * (b + 1), g_b = dy * a, dx = dx_A(g_a) + 2 * x * dx_B(g_b).
    """
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    second = "a" if shared else "b"
    (weight_a, bias_a), (weight_b, bias_b) = AFFINE["a"], AFFINE[second]
    a = reference.forward(x, weight_a, bias_a, EPS)
    b = reference.forward(x * x, weight_b, bias_b, EPS)
    rows = ((a * b + a) * dy).reshape(len(x), -1).sum(axis=1) * models
    dx_a, dweight_a, dbias_a = reference.backward(x, dy * (b + 1), weight_a, EPS)
    dx_b, dweight_b, dbias_b = reference.backward(x * x, dy * a, weight_b, EPS)
    dx = (dx_a + 2 * x * dx_b) * models
    if shared:  # A takes both gradients; B is not in the graph
        layer_grads = {"a": (dweight_a + dweight_b, dbias_a + dbias_b),
                       "b": (np.zeros(3), np.zeros(3))}
    else:
        layer_grads = {"a": (dweight_a, dbias_a), "b": (dweight_b, dbias_b)}
    grads = {}
    for index in range(models):
        for layer, (dweight, dbias) in layer_grads.items():
            grads[f"models.{index}.bn_{layer}.weight"] = dweight
            grads[f"models.{index}.bn_{layer}.bias"] = dbias
    return rows, dx, grads


def running_reference(inputs):
    """Running mean and var after updates from the float64 batches `inputs` (in order)."""
    mean, var = np.zeros(3), np.ones(3)
    for x in inputs:
        x = np.asarray(x, np.float64)
        count = x.shape[0] * x.shape[2]
        batch_mean, batch_var = x.mean(axis=(0, 2)), x.var(axis=(0, 2)) * count / (count - 1)
        mean = (1 - MOMENTUM) * mean + MOMENTUM * batch_mean
        var = (1 - MOMENTUM) * var + MOMENTUM * batch_var
    return mean, var


def assert_close(got, want, what, tolerance=TOLERANCE):
    scale = max(float(np.max(np.abs(want))), 1e-6)
    err = float(np.max(np.abs(np.asarray(got, np.float64) - want))) / scale
    assert err <= tolerance, f"{what}: relative error {err:.3g} > {tolerance}"


def check_training(ranks, tag, models, shared, steps=1):
    sizes = ranks[0][0]["sizes"]
    bounds = np.cumsum([0] + sizes)
    full_inputs = []
    for step in range(steps):
        x = np.concatenate([arrays[f"{tag}x{step}"] for _, arrays in ranks])
        dy = np.concatenate([arrays[f"{tag}dy{step}"] for _, arrays in ranks])
        full_inputs.append(x)
        rows, dx, grads = reference_step(x, dy, models, shared)
        for rank, (_, arrays) in enumerate(ranks):
            part = slice(bounds[rank], bounds[rank + 1])
            assert_close(arrays[f"{tag}loss{step}"], rows[part].sum(), f"rank {rank} loss, step {step}")
            assert_close(arrays[f"{tag}dx{step}"], dx[part], f"rank {rank} dx, step {step}")
        for name, want in grads.items():
            key = f"{tag}grad{step}:{name}"
            got = sum(arrays[key] for _, arrays in ranks)  # data parallelism: summed over ranks
            assert_close(got, want, f"{name} gradient summed over ranks, step {step}")
    return full_inputs


def check_running_stats(ranks, prefix, inputs_a, inputs_b):
    for layer, inputs in (("a", inputs_a), ("b", inputs_b)):
        mean, var = running_reference(inputs)
        for rank, (_, arrays) in enumerate(ranks):
            got_mean = arrays[f"{prefix}running_mean_{layer}"]
            np.testing.assert_array_equal(got_mean, ranks[0][1][f"{prefix}running_mean_{layer}"])
            assert_close(got_mean, mean, f"rank {rank} {prefix}running_mean of {layer}", STATS_TOLERANCE)
            assert_close(arrays[f"{prefix}running_var_{layer}"], var,
                         f"rank {rank} {prefix}running_var of {layer}", STATS_TOLERANCE)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scenario", TRAINING)
def test_correct_jobs_train_to_the_full_batch_result(job, mode, scenario):
    ranks = load(job, mode, scenario)
    for meta, _ in ranks:
        assert meta["status"] == "ok", f"rank {meta['rank']}: {meta.get('traceback')}"
    if scenario in ("teacher_student", "deep_copied_teacher"):
        # each model's running statistics take the step once: a copy shares no state
        inputs = check_training(ranks, "", models=2, shared=False)
        for prefix in ("student_", "teacher_"):
            check_running_stats(ranks, prefix, inputs, [x * x for x in inputs])
        return
    if scenario == "rebuilt_after_checkpoint":
        for meta, _ in ranks:
            assert not [n for n in meta["not_loaded"] if "bn_" in n], meta["not_loaded"]
        before = check_training(ranks, "before_", models=1, shared=False)
        after = check_training(ranks, "", models=1, shared=False)
        inputs = before + after
        check_running_stats(ranks, "", inputs, [x * x for x in inputs])
        return
    shared = scenario == "weight_sharing"
    inputs = check_training(ranks, "", models=1, shared=shared)
    if shared:  # layer A is updated twice per step: with x, then with x * x; B never
        both = [v for x in inputs for v in (x, x * x)]
        check_running_stats(ranks, "", both, [])
    else:
        check_running_stats(ranks, "", inputs, [x * x for x in inputs])
    if scenario == "extra_subgroup":  # the layer trained on ranks 0 and 1 only
        members = ranks[:2]
        x = np.concatenate([a["subgroup_x"] for _, a in members])
        dy = np.concatenate([a["subgroup_dy"] for _, a in members])
        dx, _, _ = reference.backward(x, dy, np.ones(3), EPS)
        got = np.concatenate([a["subgroup_dx"] for _, a in members])
        assert_close(got, dx, "subgroup layer dx")


@pytest.mark.parametrize("mode", MODES)
def test_swapped_backward_collectives_stop_every_rank_and_say_why(job, mode):
    """Rank 0 runs the backward of layer B before A's, the others A before B: each rank's
    first backward all-reduce meets another layer's. Every rank stops with code 4, naming
    the check, its own layer (path in the model) and the causes."""
    ranks = load(job, mode, "mispaired")
    for meta, _ in ranks:
        assert meta["status"] == "error", f"rank {meta['rank']} was not stopped"
        assert meta["error_type"] == "RuntimeError", meta["traceback"]
        message = meta["message"]
        layer = "'bn_b'" if meta["rank"] == 0 else "'bn_a'"
        expected = f"error {int(GUARD_MISPAIRED)} in layer {layer} SyncBatchNorm(num_features=3)"
        assert expected in message, message
        assert GUARD_MEANINGS[GUARD_MISPAIRED] in message, message
        assert "backward layer-identity check" in message and "Causes that fit" in message


def test_guard_errors_name_the_layer_by_its_path_in_the_model():
    """The layer's description for guard errors follows its parameters' names: standalone, after
    attachment, after its parent is attached (refreshed by set_train), after conversion."""
    from mindspore import nn
    from ms_syncbn import SyncBatchNorm

    def described(layer):
        return layer.group_stats.guard_text.asnumpy().astype(np.uint8).tobytes().split(b"\0")[0].decode()

    layer = SyncBatchNorm(3)
    assert described(layer).startswith("(not attached to a model: no path) SyncBatchNorm(num_features=3)")

    class Block(nn.Cell):
        def __init__(self):
            super().__init__()
            self.bn = SyncBatchNorm(3)

    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.block = Block()
            self.head = nn.SequentialCell([nn.Dense(2, 3), SyncBatchNorm(3)])

    net = Net()
    net.set_train(True)
    assert described(net.block.bn).startswith("'block.bn' SyncBatchNorm(num_features=3)")
    assert described(net.head[1]).startswith("'head.1' SyncBatchNorm(num_features=3)")

    class Plain(nn.Cell):
        def __init__(self):
            super().__init__()
            self.features = nn.SequentialCell([nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)])

    converted = SyncBatchNorm.convert_sync_batchnorm(Plain())
    converted.set_train(True)
    assert described(converted.features[1]).startswith("'features.1' SyncBatchNorm(num_features=4)")
