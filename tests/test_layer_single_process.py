"""SyncBatchNorm in one plain process (no ``init()``): arguments, input checks, local batch norm.

Without communication the layer must be a batch norm over the local batch, in
PyNative and in graph mode; every number is compared with the float64
reference (tests/reference.py); its stateful ``BatchNorm`` holds the layer's behaviour over calls
(running statistics, ``track_running_stats``) to that of torch's and mint's modules.
"""
import inspect
import pydoc
import warnings
from typing import Optional

import numpy as np
import pytest
import mindspore as ms

from ms_syncbn import SyncBatchNorm
from tests import reference
from tests.ascend_emulation import use_emulated_ascend
from tests.workers.core_checks import (assert_close, batch_stats_step, expected_training,
                                       frozen_stats_step)
from tests.workers.core_steps import LayerDriver, random_batch, round_to, set_parameters

EPS = 1e-5
FLOAT32_TOL = 2e-5


@pytest.fixture(params=[ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])
def mode(request):
    """Run the test in PyNative and in graph mode; leave the process in PyNative."""
    ms.set_context(mode=request.param)
    yield request.param
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(params=["pynative", "graph", "jit"])
def execution(request):
    """PyNative, graph mode, or PyNative with the step compiled by mindspore.jit; yields use_jit."""
    ms.set_context(mode=ms.GRAPH_MODE if request.param == "graph" else ms.PYNATIVE_MODE)
    yield request.param == "jit"
    ms.set_context(mode=ms.PYNATIVE_MODE)


# ----------------------------------------------------------------- constructor arguments --

def _assert_names(err, argument, value):
    message = str(err.value)
    assert argument in message, f"message does not name {argument!r}: {message}"
    assert repr(value) in message or str(value) in message, \
        f"message does not show the value {value!r}: {message}"


@pytest.mark.parametrize("value", [True, False, 2.0, 3.5, "4", None, np.float32(4.0)])
def test_num_features_not_int_is_type_error(value):
    with pytest.raises(TypeError) as err:
        SyncBatchNorm(value)
    _assert_names(err, "num_features", value)


@pytest.mark.parametrize("value", [0, -1, -8])
def test_num_features_below_one_is_value_error(value):
    with pytest.raises(ValueError) as err:
        SyncBatchNorm(value)
    _assert_names(err, "num_features", value)


@pytest.mark.parametrize("value", [1, 0, 7, "1e-5", None, True])
def test_eps_not_float_is_type_error(value):
    with pytest.raises(TypeError) as err:
        SyncBatchNorm(3, eps=value)
    _assert_names(err, "eps", value)


@pytest.mark.parametrize("value", [-0.1, 1.5, 2.0, -1e-9, 1.0000001])
def test_momentum_outside_unit_interval_is_value_error(value):
    with pytest.raises(ValueError) as err:
        SyncBatchNorm(3, momentum=value)
    _assert_names(err, "momentum", value)


@pytest.mark.parametrize("value", [None, 0.0, 1.0, 0.25])
def test_momentum_in_unit_interval_or_none_is_accepted(value):
    assert SyncBatchNorm(3, momentum=value).momentum == value


@pytest.mark.parametrize("argument, value, error", [
    ("eps", 1, TypeError), ("eps", None, TypeError), ("eps", 0.0, ValueError), ("eps", -1e-3, ValueError),
    ("momentum", "0.1", TypeError), ("momentum", True, TypeError), ("momentum", 1.5, ValueError),
    ("momentum", -0.1, ValueError)])
def test_eps_or_momentum_set_to_a_bad_value_raises_and_keeps_the_old_one(argument, value, error):
    layer = SyncBatchNorm(3, eps=1e-3, momentum=0.2)
    with pytest.raises(error) as err:
        setattr(layer, argument, value)
    _assert_names(err, argument, value)
    assert (layer.eps, layer.momentum) == (1e-3, 0.2)


@pytest.mark.parametrize("argument", ["affine", "track_running_stats"])
@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_flag_not_bool_is_type_error(argument, value):
    with pytest.raises(TypeError) as err:
        SyncBatchNorm(3, **{argument: value})
    _assert_names(err, argument, value)


def test_process_group_without_init_warns_and_normalizes_locally():
    with pytest.warns(UserWarning, match="process_group") as record:
        layer = SyncBatchNorm(3, process_group="0-1")
    assert any("0-1" in str(w.message) for w in record)
    rng = np.random.default_rng(11)
    x, dy = random_batch(rng, (5, 3, 4)), rng.standard_normal((5, 3, 4)).astype(np.float32)
    got = LayerDriver(layer).train(x, dy)
    want = batch_stats_step(x, dy, np.ones(3), np.zeros(3), EPS)
    for key in ("y", "dx", "dweight", "dbias"):
        assert_close(got[key], want[key], FLOAT32_TOL, key)


def test_no_warning_without_process_group():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SyncBatchNorm(3)


# ------------------------------------------------------------ parameters, doc, signature --

def test_parameters_and_buffers_are_named_and_initialized_like_batchnorm():
    layer = SyncBatchNorm(4)
    assert layer.weight.name == "weight" and layer.bias.name == "bias"
    assert layer.running_mean.name == "running_mean" and layer.running_var.name == "running_var"
    assert layer.num_batches_tracked.name == "num_batches_tracked"
    assert [p.name for p in layer.trainable_params()] == ["weight", "bias"]
    initial = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}
    for name, value in initial.items():
        param = getattr(layer, name)
        assert param.shape == (4,) and param.dtype == ms.float32, name
        np.testing.assert_array_equal(param.asnumpy(), np.full(4, value, np.float32), err_msg=name)
    assert layer.num_batches_tracked.dtype == ms.int64 and layer.num_batches_tracked.shape == ()
    assert int(layer.num_batches_tracked.asnumpy()) == 0
    assert not layer.running_mean.requires_grad and not layer.running_var.requires_grad


def test_affine_false_and_untracked_have_no_such_parameters():
    layer = SyncBatchNorm(4, affine=False, track_running_stats=False)
    assert layer.weight is None and layer.bias is None
    assert layer.running_mean is None and layer.running_var is None
    assert layer.num_batches_tracked is None
    assert layer.trainable_params() == []


def test_dtype_sets_parameter_dtype():
    layer = SyncBatchNorm(4, dtype=ms.float16)
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert getattr(layer, name).dtype == ms.float16, name


def test_signature_is_the_documented_one():
    def documented(num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                   affine: bool = True, track_running_stats: bool = True,
                   process_group: Optional[str] = None, dtype=None):
        pass

    assert inspect.signature(SyncBatchNorm) == inspect.signature(documented)


def test_docstring_shows_the_formula_in_latex_and_plain_text():
    doc = SyncBatchNorm.__doc__
    assert ".. math::" in doc
    assert r"\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta" in doc
    assert "y = (x - E[x]) / sqrt(Var[x] + eps) * gamma + beta" in doc
    assert "y = (x - E[x]) / sqrt(Var[x] + eps) * gamma + beta" in pydoc.render_doc(
        SyncBatchNorm, renderer=pydoc.plaintext)


# -------------------------------------------------------------------------- input checks --

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape, dtype, error, shown", [
    ((6,), np.float32, ValueError, "6"),
    ((4, 2, 5), np.float32, ValueError, "2"),
    ((4, 5), np.float32, ValueError, "5"),
    ((4, 3, 5), np.int32, TypeError, "int32"),
    ((4, 3, 5), np.bool_, TypeError, "bool"),
], ids=["1d", "channels2", "channels5_2d", "int32", "bool"])
def test_malformed_input_raises_before_any_kernel(mode, training, shape, dtype, error, shown):
    layer = SyncBatchNorm(3)
    layer.set_train(training)
    with pytest.raises(error) as err:
        layer(ms.Tensor(np.ones(shape, dtype)))
    assert shown in str(err.value).lower(), str(err.value)
    _assert_state_untouched(layer)
    _assert_still_works(layer)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_training_with_one_value_per_channel_is_value_error(mode, shape):
    layer = SyncBatchNorm(3)
    layer.set_train(True)
    with pytest.raises(ValueError, match="1 value per channel|more than 1 value") as err:
        layer(ms.Tensor(np.ones(shape, np.float32)))
    assert "value per channel" in str(err.value)
    _assert_state_untouched(layer)
    _assert_still_works(layer)


def test_one_value_per_channel_is_fine_in_eval(mode):
    layer = SyncBatchNorm(3)
    set_parameters(layer, [1.5, -0.5, 2.0], [0.1, 0.2, -0.3])
    x = np.array([[1.0, -2.0, 3.0]], np.float32)
    dy = np.array([[0.3, -1.1, 0.7]], np.float32)
    got = LayerDriver(layer).evaluate(x, dy)
    want = frozen_stats_step(x, dy, [1.5, -0.5, 2.0], [0.1, 0.2, -0.3], EPS,
                             mean=np.zeros(3), var=np.ones(3))  # the initial running stats
    for key in ("y", "dx", "dweight", "dbias"):
        assert_close(got[key], want[key], FLOAT32_TOL, key)


def test_two_values_per_channel_train(mode):
    rng = np.random.default_rng(5)
    x, dy = random_batch(rng, (1, 3, 2)), rng.standard_normal((1, 3, 2)).astype(np.float32)
    got = LayerDriver(SyncBatchNorm(3)).train(x, dy)
    want = batch_stats_step(x, dy, np.ones(3), np.zeros(3), EPS)
    for key in ("y", "dweight", "dbias"):
        assert_close(got[key], want[key], FLOAT32_TOL, key)
    # with two values dx is a near-total cancellation: judge it against the size of its terms
    invstd = 1.0 / np.sqrt(x.astype(np.float64).var(axis=(0, 2)) + EPS)
    assert_close(got["dx"], want["dx"], FLOAT32_TOL, "dx",
                 scale=float(np.abs(dy * invstd.reshape(1, 3, 1)).max()))


def test_empty_batch_trains_to_empty_output_and_changes_no_statistic(mode):
    layer = SyncBatchNorm(3)
    driver = LayerDriver(layer)
    got = driver.train(np.zeros((0, 3, 4), np.float32), np.zeros((0, 3, 4), np.float32))
    assert got["y"].shape == (0, 3, 4) and got["dx"].shape == (0, 3, 4)
    np.testing.assert_array_equal(got["dweight"], np.zeros(3))
    np.testing.assert_array_equal(got["dbias"], np.zeros(3))
    _assert_state_untouched(layer)
    _assert_still_works(layer)


def _assert_state_untouched(layer):
    np.testing.assert_array_equal(layer.running_mean.asnumpy(), np.zeros(3, np.float32))
    np.testing.assert_array_equal(layer.running_var.asnumpy(), np.ones(3, np.float32))
    assert int(layer.num_batches_tracked.asnumpy()) == 0


def _assert_still_works(layer):
    """A well-formed call after the error gives batch norm and counts one batch."""
    rng = np.random.default_rng(3)
    x, dy = random_batch(rng, (4, 3, 5)), rng.standard_normal((4, 3, 5)).astype(np.float32)
    got = LayerDriver(layer).train(x, dy)
    want = expected_training([x], [dy], np.ones(3), np.zeros(3), EPS, 0.1, True)[0]
    for key in ("y", "dx", "dweight", "dbias", "running_mean", "running_var"):
        assert_close(got[key] if key in got else getattr(layer, key).asnumpy(), want[key],
                     FLOAT32_TOL, key)
    assert int(layer.num_batches_tracked.asnumpy()) == 1


# ------------------------------------------------------------- local batch norm, numbers --

def _run_local(layer, shape, steps, seed, input_dtype="float32", jit=False):
    """``steps`` training steps then one eval step on fresh data; returns inputs and results."""
    rng = np.random.default_rng(seed)
    channels = shape[1]
    weight = rng.uniform(0.5, 2.0, channels) * rng.choice([-1, 1], channels)
    bias = rng.uniform(-1, 1, channels)
    if layer.affine:
        set_parameters(layer, weight, bias)
        # the layer's parameters may round (dtype=float16): the reference uses what it holds
        weight = layer.weight.asnumpy().astype(np.float64)
        bias = layer.bias.asnumpy().astype(np.float64)
    else:
        weight, bias = np.ones(channels), np.zeros(channels)
    driver = LayerDriver(layer, jit=jit)
    xs, dys, results = [], [], []
    for step in range(steps + 1):
        x = round_to(random_batch(rng, shape, mean_scale=3.0 * (step + 1)), input_dtype)
        dy = round_to(rng.standard_normal(shape), input_dtype)
        xs.append(x)
        dys.append(dy)
        if step < steps:
            results.append({**driver.train(x, dy, input_dtype), **driver.state()})
        else:
            results.append(driver.evaluate(x, dy, input_dtype))
    return xs, dys, weight, bias, results


def _check_local(layer, xs, dys, weight, bias, results, tol, stats_tol=None, momentum=0.1):
    stats_tol = tol if stats_tol is None else stats_tol
    steps = len(results) - 1
    expected = expected_training(xs[:steps], dys[:steps], weight, bias, EPS, momentum,
                                 layer.track_running_stats)
    for step, (got, want) in enumerate(zip(results[:steps], expected)):
        for key in ("y", "dx"):
            assert_close(got[key], want[key], tol, f"step {step} {key}")
        if layer.affine:
            for key in ("dweight", "dbias"):
                assert_close(got[key], want[key], tol, f"step {step} {key}")
        if layer.track_running_stats:
            for key in ("running_mean", "running_var"):
                assert_close(got[key], want[key], stats_tol, f"step {step} {key}")
            assert int(got["num_batches_tracked"]) == step + 1
    if layer.track_running_stats:
        final = expected[-1]
        want = frozen_stats_step(xs[-1], dys[-1], weight, bias, EPS, final["running_mean"],
                                 final["running_var"])
    else:  # eval without running statistics: the batch's own statistics
        want = batch_stats_step(xs[-1], dys[-1], weight, bias, EPS)
    for key in ("y", "dx") + (("dweight", "dbias") if layer.affine else ()):
        assert_close(results[-1][key], want[key], tol, f"eval {key}")


@pytest.mark.parametrize("shape", [(7, 3), (5, 4, 6), (4, 3, 5, 3), (3, 2, 3, 4, 2)],
                         ids=["2d", "3d", "4d", "5d"])
def test_local_layer_equals_batchnorm(execution, shape):
    layer = SyncBatchNorm(shape[1])
    xs, dys, weight, bias, results = _run_local(layer, shape, steps=3, seed=len(shape),
                                                jit=execution)
    for got in results:
        assert got["y"].dtype == np.float32 and got["dx"].dtype == np.float32
    _check_local(layer, xs, dys, weight, bias, results, FLOAT32_TOL)


def test_local_affine_false_momentum_none_is_cumulative_average(execution):
    layer = SyncBatchNorm(3, affine=False, momentum=None)
    xs, dys, weight, bias, results = _run_local(layer, (6, 3, 4, 2), steps=3, seed=21,
                                                jit=execution)
    _check_local(layer, xs, dys, weight, bias, results, FLOAT32_TOL, momentum=None)


def test_local_untracked_uses_batch_stats_in_train_and_eval(execution):
    layer = SyncBatchNorm(4, track_running_stats=False)
    xs, dys, weight, bias, results = _run_local(layer, (5, 4, 3), steps=2, seed=22,
                                                jit=execution)
    assert results[0]["running_mean"] is None and results[0]["num_batches_tracked"] is None
    _check_local(layer, xs, dys, weight, bias, results, FLOAT32_TOL)


@pytest.mark.parametrize("input_dtype, tol", [("float16", 4e-3), ("bfloat16", 2e-2)])
def test_local_half_precision_input_with_float32_parameters(execution, input_dtype, tol):
    layer = SyncBatchNorm(3)
    xs, dys, weight, bias, results = _run_local(layer, (6, 3, 5), steps=3, seed=23,
                                                input_dtype=input_dtype, jit=execution)
    want_dtype = np.float16 if input_dtype == "float16" else np.float32  # bf16 travels as f32
    for got in results:
        assert got["y"].dtype == want_dtype and got["dx"].dtype == want_dtype
    # statistics are accumulated in float32 or better: running stats much closer than tol
    _check_local(layer, xs, dys, weight, bias, results, tol, stats_tol=1e-5)


def test_local_bfloat16_output_dtype(mode):
    layer = SyncBatchNorm(3)
    layer.set_train(True)
    y = layer(ms.Tensor(np.random.default_rng(0).standard_normal((4, 3)), ms.bfloat16))
    assert y.dtype == ms.bfloat16 and y.shape == (4, 3)


def test_local_float16_parameters(execution):
    layer = SyncBatchNorm(3, dtype=ms.float16)
    xs, dys, weight, bias, results = _run_local(layer, (6, 3, 5), steps=3, seed=24,
                                                jit=execution)
    for got in results:
        assert got["y"].dtype == np.float32
        assert got["dweight"].dtype == np.float16 and got["dbias"].dtype == np.float16
    assert layer.running_mean.dtype == ms.float16 and layer.running_var.dtype == ms.float16
    _check_local(layer, xs, dys, weight, bias, results, 4e-3)


@pytest.mark.parametrize("table", ["cpu", "emulated_ascend"])
def test_eps_and_momentum_set_after_construction_take_effect(execution, table, monkeypatch):
    """Model code sets them on built layers (``m.eps, m.momentum = 1e-3, 0.03``); like
    mint.nn.SyncBatchNorm and torch, every call reads them. Set before the first call they hold
    in every mode; in PyNative a change between calls holds from the next call (a graph
    compiled around the layer keeps the values it was compiled with). Both tables: the CPU
    one passes eps to its FinalizeMoments kernel, the Ascend one to the composite's rsqrt.
    Against the float64 reference; eps 0.5 and 0.05 against variances in [0.25, 4], so a
    value not taken moves y by percents."""
    if table == "emulated_ascend":
        use_emulated_ascend("a2", monkeypatch)
    layer = SyncBatchNorm(3)
    layer.eps, layer.momentum = 0.5, 0.3
    changes_between_calls = ms.get_context("mode") == ms.PYNATIVE_MODE and not execution
    schedule = [(0.5, 0.3)] * 2 + [(0.05, None) if changes_between_calls else (0.5, 0.3)] * 2
    rng = np.random.default_rng(31)
    weight, bias = rng.uniform(0.5, 2.0, 3), rng.uniform(-1, 1, 3)
    set_parameters(layer, weight, bias)
    driver = LayerDriver(layer, jit=execution)
    running_mean, running_var = np.zeros(3), np.ones(3)
    for step, (eps, momentum) in enumerate(schedule):
        layer.eps, layer.momentum = eps, momentum
        x, dy = random_batch(rng, (6, 3, 5)), rng.standard_normal((6, 3, 5))
        got = {**driver.train(x, dy), **driver.state()}
        want = batch_stats_step(x, dy, weight, bias, eps)
        running_mean, running_var = reference.running_update(running_mean, running_var, x,
                                                             momentum, step + 1)
        want.update(running_mean=running_mean, running_var=running_var)
        for key in ("y", "dx", "dweight", "dbias", "running_mean", "running_var"):
            assert_close(got[key], want[key], FLOAT32_TOL, f"step {step} {key} (eps {eps}, "
                                                           f"momentum {momentum})")
    x, dy = random_batch(rng, (6, 3, 5)), rng.standard_normal((6, 3, 5))
    want = frozen_stats_step(x, dy, weight, bias, eps, running_mean, running_var)
    got = driver.evaluate(x, dy)
    for key in ("y", "dx", "dweight", "dbias"):
        assert_close(got[key], want[key], FLOAT32_TOL, f"eval {key} (eps {eps})")


def test_track_running_stats_set_on_a_built_layer_behaves_as_in_torch(execution):
    """``m.track_running_stats = False`` on a layer with running statistics (freezing them):
    training uses the batch and leaves them and num_batches_tracked alone, evaluation still
    uses them, as torch's BatchNorm and mint read the flag at every call (the oracle: the
    float64 ``reference.BatchNorm``). Set before the first call in every mode; in plain
    PyNative switched off and on again between calls."""
    layer = SyncBatchNorm(3, momentum=0.2)
    layer.track_running_stats = False
    changes_between_calls = ms.get_context("mode") == ms.PYNATIVE_MODE and not execution
    schedule = [True, False, True] if changes_between_calls else [False, False]
    if changes_between_calls:
        layer.track_running_stats = schedule[0]
    rng = np.random.default_rng(33)
    weight, bias = rng.uniform(0.5, 2.0, 3), rng.uniform(-1, 1, 3)
    set_parameters(layer, weight, bias)
    driver = LayerDriver(layer, jit=execution)
    bn = reference.BatchNorm(weight, bias, EPS, momentum=0.2)
    for step, tracked in enumerate(schedule + ["eval"]):
        x, dy = random_batch(rng, (6, 3, 5)), rng.standard_normal((6, 3, 5)).astype(np.float32)
        if tracked == "eval":
            bn.training = False
            got = driver.evaluate(x, dy)
        else:
            layer.track_running_stats = bn.track_running_stats = tracked
            bn.training = True
            got = {**driver.train(x, dy), **driver.state()}
        want = {**bn.step(x, dy), "running_mean": bn.running_mean, "running_var": bn.running_var}
        for key in want if tracked != "eval" else ("y", "dx", "dweight", "dbias"):
            assert_close(got[key], want[key], FLOAT32_TOL, f"step {step} ({tracked}) {key}")
        if tracked != "eval":
            assert int(got["num_batches_tracked"]) == bn.num_batches_tracked, step


def test_track_running_stats_set_on_a_layer_built_without_them_is_value_error(mode):
    layer = SyncBatchNorm(3, track_running_stats=False)
    layer.track_running_stats = True
    layer.set_train(True)
    with pytest.raises(ValueError, match="track_running_stats"):
        layer(ms.Tensor(np.ones((4, 3), np.float32)))


def test_reset_running_stats_and_reestimation_as_swa_update_bn(execution):
    """``reset_running_stats`` / ``reset_parameters`` as mint's, seen by compiled steps too.
    Re-estimation as torch.optim.swa_utils.update_bn: reset, momentum None, training passes
    (plain PyNative; a compiled step keeps its momentum and restarts its EMA from 0 and 1).
    Running statistics against the float64 reference, y after reset_parameters too."""
    layer = SyncBatchNorm(3, momentum=0.3)
    rng = np.random.default_rng(35)
    weight, bias = rng.uniform(0.5, 2.0, 3), rng.uniform(-1, 1, 3)
    set_parameters(layer, weight, bias)
    driver = LayerDriver(layer, jit=execution)
    batch = lambda: (random_batch(rng, (6, 3, 5)), rng.standard_normal((6, 3, 5)).astype(np.float32))
    for _ in range(2):
        driver.train(*batch())
    layer.reset_running_stats()
    state = driver.state()
    assert_close(state["running_mean"], np.zeros(3), 0.0, "reset running_mean")
    assert_close(state["running_var"], np.ones(3), 0.0, "reset running_var")
    assert int(state["num_batches_tracked"]) == 0
    assert_close(layer.weight.asnumpy(), weight, 1e-7, "weight kept")
    momentum = None if ms.get_context("mode") == ms.PYNATIVE_MODE and not execution else 0.3
    layer.momentum = momentum
    running_mean, running_var = np.zeros(3), np.ones(3)
    for step in range(3):
        x, dy = batch()
        got = {**driver.train(x, dy), **driver.state()}
        running_mean, running_var = reference.running_update(running_mean, running_var, x,
                                                             momentum, step + 1)
        assert_close(got["running_mean"], running_mean, FLOAT32_TOL, f"step {step} running_mean")
        assert_close(got["running_var"], running_var, FLOAT32_TOL, f"step {step} running_var")
        assert int(got["num_batches_tracked"]) == step + 1
    layer.reset_parameters()
    x, dy = batch()
    got = driver.train(x, dy)
    assert_close(got["y"], batch_stats_step(x, dy, np.ones(3), np.zeros(3), EPS)["y"], FLOAT32_TOL,
                 "y after reset_parameters")
    assert int(layer.num_batches_tracked.asnumpy()) == 1
    for bare in (SyncBatchNorm(3, affine=False), SyncBatchNorm(3, track_running_stats=False)):
        bare.reset_parameters()  # nothing to reset for the missing parts
        assert (bare.weight is None) == (not bare.affine) and (bare.running_mean is None) == (
            not bare.track_running_stats)


@pytest.mark.parametrize("table", ["cpu", "emulated_ascend"])
def test_deep_copy_is_an_independent_layer(mode, table, monkeypatch):
    """``copy.deepcopy`` (EMA and teacher copies) gives a layer with its own state: the copy
    holds the original's values, and training either one leaves the other alone. (MindSpore
    2.10 cannot deep-copy an ``ops.Custom``: the CPU table's kernels are shared by copies.)
    The multi-rank case: tests/test_layer_identity.py, deep_copied_teacher."""
    import copy
    if table == "emulated_ascend":
        use_emulated_ascend("a2", monkeypatch)
    rng = np.random.default_rng(37)
    original = SyncBatchNorm(3, momentum=0.3)
    set_parameters(original, rng.uniform(0.5, 2.0, 3), rng.uniform(-1, 1, 3))
    LayerDriver(original).train(random_batch(rng, (6, 3, 5)), rng.standard_normal((6, 3, 5)))
    clone = copy.deepcopy(original)
    names = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    before = {name: getattr(original, name).asnumpy().copy() for name in names}
    for name in names:
        assert getattr(clone, name) is not getattr(original, name), name
        np.testing.assert_array_equal(getattr(clone, name).asnumpy(), before[name], err_msg=name)
    x, dy = random_batch(rng, (6, 3, 5)), rng.standard_normal((6, 3, 5)).astype(np.float32)
    got = {**LayerDriver(clone).train(x, dy), "running_mean": clone.running_mean.asnumpy()}
    want = batch_stats_step(x, dy, before["weight"].astype(np.float64), before["bias"], EPS)
    want["running_mean"] = reference.running_update(before["running_mean"], before["running_var"],
                                                    x, 0.3, 2)[0]
    for key in ("y", "dx", "running_mean"):
        assert_close(got[key], want[key], FLOAT32_TOL, f"copy {key}")
    for name in names:  # the original did not move
        np.testing.assert_array_equal(getattr(original, name).asnumpy(), before[name], err_msg=name)


# Steps one dynamic-shape graph trains on: N, and every dimension after C, change from step to
# step (an empty batch among them); trailing dimensions for 2-D to 5-D input.
DYNAMIC_BATCHES = (4, 0, 6, 3)
DYNAMIC_SPATIAL = ((5, 4, 2), (3, 2, 3), (2, 7, 1), (1, 3, 4))


@pytest.mark.parametrize("table", ["cpu", "emulated_ascend"])
@pytest.mark.parametrize("execution, ndim", [("graph", 2), ("jit", 3), ("graph", 4), ("jit", 4),
                                             ("graph", 5)])
def test_one_dynamic_shape_graph_trains_on_batches_of_every_shape(table, execution, ndim,
                                                                  monkeypatch):
    """A training step compiled once (``Cell.set_inputs`` with every dimension but C None; in
    graph mode, or in PyNative under ``mindspore.jit``) trains on batches whose N and trailing
    dimensions change every step, an empty batch included, without compiling again: y, dx,
    weight and bias gradients and the running statistics equal the float64 reference after
    every step. Both tables: the CPU table's kernels infer their output shapes in C++ at run
    time (ms_syncbn/kernels/cpu.py)."""
    if table == "emulated_ascend":
        use_emulated_ascend("a2", monkeypatch)
    ms.set_context(mode=ms.GRAPH_MODE if execution == "graph" else ms.PYNATIVE_MODE)
    try:
        layer = SyncBatchNorm(3)
        rng = np.random.default_rng(39 + ndim)
        weight, bias = rng.uniform(0.5, 2.0, 3), rng.uniform(-1, 1, 3)
        set_parameters(layer, weight, bias)
        driver = LayerDriver(layer, jit=execution == "jit", dynamic_rank=ndim)
        shapes = [(batch, 3) + spatial[:ndim - 2]
                  for batch, spatial in zip(DYNAMIC_BATCHES, DYNAMIC_SPATIAL)]
        xs = [random_batch(rng, shape) for shape in shapes]
        dys = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
        with warnings.catch_warnings():  # the empty step's (empty) reference: means of nothing
            warnings.simplefilter("ignore", RuntimeWarning)
            wants = expected_training(xs, dys, weight, bias, EPS, 0.1, True)
        for x, dy, want in zip(xs, dys, wants):
            got = {**driver.train(x, dy), **driver.state()}
            for key in ("y", "dx", "dweight", "dbias", "running_mean", "running_var"):
                assert_close(got[key], want[key], FLOAT32_TOL, f"shape {x.shape} {key}")
            assert int(got["num_batches_tracked"]) == want["num_batches_tracked"], x.shape
        assert driver.graphs_compiled == {"train": 1, "eval": 0}
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_recomputed_block_updates_the_running_statistics_once_in_graph_mode():
    """``Cell.recompute()`` (activation checkpointing) runs the block's forward again in the
    backward pass. In graph mode the layer's output and gradients are the same, and the running
    statistics take the step once: the recomputed forward repeats no side effect (the state's
    Assign), where MindSpore 2.10's own nn.BatchNorm2d, whose kernel updates its moving
    statistics, takes the step twice (measured). PyNative re-runs the Python forward, state
    update included, for both (README, Known issues). Against the float64 reference."""
    from mindspore import nn
    from tests.workers.core_steps import OutputDotUpstream
    rng = np.random.default_rng(41)
    x, dy = random_batch(rng, (5, 3, 4, 2)), rng.standard_normal((5, 3, 4, 2)).astype(np.float32)
    weight, bias = rng.uniform(0.5, 2.0, 3), rng.uniform(-1, 1, 3)
    layer = SyncBatchNorm(3)
    set_parameters(layer, weight, bias)
    block = nn.SequentialCell([layer, nn.Identity()])
    block.recompute()
    net = OutputDotUpstream(nn.SequentialCell([block, nn.Identity()]))
    net.set_train(True)
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        (_, y), dx = ms.value_and_grad(net, grad_position=0, has_aux=True)(ms.Tensor(x),
                                                                           ms.Tensor(dy))
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    want = batch_stats_step(x, dy, weight, bias, EPS)
    assert_close(y.asnumpy(), want["y"], FLOAT32_TOL, "y")
    assert_close(dx.asnumpy(), want["dx"], FLOAT32_TOL, "dx")
    mean, var = reference.running_update(np.zeros(3), np.ones(3), x, 0.1, 1)
    assert_close(layer.running_mean.asnumpy(), mean, FLOAT32_TOL, "running_mean")
    assert_close(layer.running_var.asnumpy(), var, FLOAT32_TOL, "running_var")
    assert int(layer.num_batches_tracked.asnumpy()) == 1


def test_local_layer_equals_the_float64_layer_over_steps(execution):
    """Three training steps then evaluation, momentum 0.2, against the stateful float64
    ``reference.BatchNorm`` (the running statistics it keeps, not the test's own recurrence)."""
    layer = SyncBatchNorm(3, momentum=0.2)
    xs, dys, weight, bias, results = _run_local(layer, (5, 3, 4, 3), steps=3, seed=25,
                                                jit=execution)
    bn = reference.BatchNorm(weight, bias, EPS, momentum=0.2)
    for step, (x, dy, got) in enumerate(zip(xs, dys, results)):
        bn.training = step < len(xs) - 1
        want = bn.step(x, dy)
        for key in ("y", "dx", "dweight", "dbias"):
            assert_close(got[key], want[key], FLOAT32_TOL, f"step {step} {key}")
        if bn.training:
            assert_close(got["running_mean"], bn.running_mean, FLOAT32_TOL, "running_mean")
            assert_close(got["running_var"], bn.running_var, FLOAT32_TOL, "running_var")
            assert int(got["num_batches_tracked"]) == bn.num_batches_tracked
