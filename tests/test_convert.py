"""convert_sync_batchnorm / revert_sync_batchnorm on a nested model, single process.

Without ``mindspore.communication.init()`` a SyncBatchNorm normalizes over the local
batch, so a converted model must behave exactly like the original ``nn.BatchNorm*d``
model: the same outputs in training and evaluation, the same gradients (random
upstream gradients), the same running statistics (which checks the momentum
conversion), and the first layer's statistics equal to the float64 reference.
mint.nn.BatchNorm*d has no CPU kernels, so conversions from and to mint are checked on
the carried state and arguments.
"""
import warnings

import numpy as np
import pytest
import mindspore as ms
from mindspore import mint, nn

from ms_syncbn import (SyncBatchNorm, convert_sync_batchnorm, remap_batchnorm_checkpoint,
                       revert_sync_batchnorm)
from tests import reference

CHANNELS = 4


pytestmark = pytest.mark.usefixtures("pynative_cpu")


class PlainSubclassBN(nn.BatchNorm2d):
    """Adds an attribute but no forward behaviour: must be converted."""

    def __init__(self, num_features):
        super().__init__(num_features)
        self.tag = "plain"


class CustomBN(nn.BatchNorm2d):
    """Its own construct: must be left alone, with a warning."""

    def construct(self, x):
        return super().construct(x) * 2.0


class Block(nn.Cell):
    def __init__(self, momentum, eps):
        super().__init__()
        self.conv = nn.Conv2d(CHANNELS, CHANNELS, 3, pad_mode="same", has_bias=False)
        self.bn = nn.BatchNorm2d(CHANNELS, momentum=momentum, eps=eps)
        self.relu = nn.ReLU()

    def construct(self, x):
        return self.relu(self.bn(self.conv(x)))


class NestedModel(nn.Cell):
    """Input BN, SequentialCell stem, CellList of blocks, a shared BN, subclasses, 3d and 1d BN."""

    def __init__(self):
        super().__init__()
        self.input_bn = nn.BatchNorm2d(3, momentum=0.7)
        shared = nn.BatchNorm2d(CHANNELS)
        self.stem = nn.SequentialCell([nn.Conv2d(3, CHANNELS, 1, has_bias=False),
                                       nn.BatchNorm2d(CHANNELS), nn.ReLU(), shared])
        self.blocks = nn.CellList([Block(0.8, 1e-3), Block(0.95, 1e-5)])
        self.shared = shared  # the same layer again, under a second parent
        self.plain_subclass = PlainSubclassBN(CHANNELS)
        self.custom = CustomBN(CHANNELS)
        self.bn3d = nn.BatchNorm3d(2)
        self.bn1d = nn.BatchNorm1d(CHANNELS)

    def construct(self, x):
        x = self.stem(self.input_bn(x))
        for block in self.blocks:
            x = block(x)
        x = self.custom(self.plain_subclass(self.shared(x)))
        n, c, h, w = x.shape
        x = self.bn3d(x.reshape(n, 2, c // 2, h, w)).reshape(n, c, h, w)
        return x, self.bn1d(x.mean(axis=(2, 3)))


def nn_batchnorms(model):
    """(path, inner _BatchNorm holding the parameters) of each nn.BatchNorm*d."""
    found = []
    for path, cell in model.cells_and_names():
        if isinstance(cell, (nn.BatchNorm1d, nn.BatchNorm2d)) and ".bn2d" not in f".{path}":
            found.append((path, cell))
        elif isinstance(cell, nn.BatchNorm3d):
            found.append((path, cell.bn2d))
    return found


def build_model(seed=0):
    """A NestedModel with random weights and random BN state; beta of the stem BN frozen."""
    ms.set_seed(seed)
    model = NestedModel()
    rng = np.random.default_rng(seed)
    for param in model.get_parameters():
        if param.name.endswith(("gamma", "moving_variance")):
            value = rng.uniform(0.5, 1.5, param.shape)
        else:
            value = rng.normal(0.0, 0.5, param.shape)
        param.set_data(ms.Tensor(value.astype(np.float32)))
    model.stem[1].beta.requires_grad = False
    return model


def random_input(seed=1, batch=5):
    rng = np.random.default_rng(seed)
    return rng.normal(1.0, 2.0, size=(batch, 3, 6, 6)).astype(np.float32)


def convert_quietly(model, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = convert_sync_batchnorm(model, **kwargs)
    return converted, [str(w.message) for w in caught]


def gradients(model, x, dys):
    """Gradients of sum(out_i * dy_i) w.r.t. x and every trainable parameter, by name."""

    class WeightedSum(nn.Cell):
        def __init__(self, net):
            super().__init__(auto_prefix=False)
            self.net = net

        def construct(self, inputs, dy_maps, dy_vectors):
            maps, vectors = self.net(inputs)
            return (maps * dy_maps).sum() + (vectors * dy_vectors).sum()

    params = model.trainable_params()
    grad_fn = ms.grad(WeightedSum(model), grad_position=0, weights=params)
    dx, grads = grad_fn(ms.Tensor(x), *(ms.Tensor(d) for d in dys))
    return dx.asnumpy(), {p.name: g.asnumpy() for p, g in zip(params, grads)}


def by_sync_names(plain_model, sync_model):
    """plain_model's parameters as NumPy, under sync_model's names."""
    plain = {p.name: p for p in plain_model.get_parameters()}
    remapped = remap_batchnorm_checkpoint(plain, sync_model)
    return {name: p.asnumpy() for name, p in remapped.items()}


# ------------------------------------------------------------------------------------------------


def test_convert_replaces_every_batchnorm_and_carries_state():
    original = build_model()
    model = build_model()
    model.set_train(False)
    model.blocks[1].bn.set_train(True)  # a mixed training flag must survive
    model, messages = convert_quietly(model)

    layers = dict(model.cells_and_names())
    layers["shared"] = model.shared  # cells_and_names lists a shared cell once (as stem.3)
    converted = ["input_bn", "stem.1", "stem.3", "blocks.0.bn", "blocks.1.bn", "shared",
                 "plain_subclass", "bn3d", "bn1d"]
    for path in converted:
        assert isinstance(layers[path], SyncBatchNorm), path
    assert type(layers["custom"]) is CustomBN  # pylint: disable=unidiomatic-typecheck
    assert len(messages) == 1 and "CustomBN" in messages[0] and "'custom'" in messages[0] \
        and "construct" in messages[0]
    assert model.shared is model.stem[3], "a shared layer must stay shared"
    assert model.stem.cell_list[3] is model.shared, "SequentialCell.construct's list not updated"

    assert {path: layers[path].revert_dims for path in converted} == {
        "input_bn": 2, "stem.1": 2, "stem.3": 2, "blocks.0.bn": 2, "blocks.1.bn": 2,
        "shared": 2, "plain_subclass": 2, "bn3d": 3, "bn1d": 1}
    assert layers["input_bn"].momentum == 0.3 and layers["blocks.0.bn"].momentum == 0.2
    assert layers["stem.1"].momentum == 0.1 and layers["blocks.1.bn"].momentum == 0.05
    assert layers["blocks.0.bn"].eps == 1e-3 and layers["stem.1"].eps == 1e-5
    assert all(layers[p].affine and layers[p].track_running_stats for p in converted)
    assert [layers[p].training for p in ("blocks.1.bn", "blocks.0.bn", "bn1d")] == \
        [True, False, False]

    # Values, names and requires_grad: each layer under its old path with SyncBatchNorm names.
    old = {p.name: p for p in original.get_parameters()}
    expected_names = []
    for path, inner in nn_batchnorms(original):
        if path == "custom":
            continue
        # The layer keeps the prefix its parameters had (a shared layer: its last parent's).
        prefix = inner.gamma.name[:-len("gamma")].replace("bn2d.", "")
        sync = layers[path]
        for new, old_attr in (("weight", "gamma"), ("bias", "beta"),
                              ("running_mean", "moving_mean"), ("running_var", "moving_variance")):
            source = getattr(inner, old_attr)
            target = getattr(sync, new)
            assert target.name == prefix + new
            np.testing.assert_array_equal(target.asnumpy(), old[source.name].asnumpy())
            assert target.requires_grad == source.requires_grad, target.name
        expected_names.append(prefix + "weight")
    assert model.stem[1].bias.requires_grad is False and model.stem[1].weight.requires_grad
    names = [p.name for p in model.get_parameters()]
    assert len(names) == len(set(names)), "parameter names must be unique"
    assert set(expected_names) <= set(names)
    assert {"shared.weight", "bn3d.running_var", "blocks.1.bn.bias", "stem.1.weight"} <= set(names)
    assert "custom.gamma" in names  # the unconverted layer keeps its parameters


def test_converted_model_trains_and_evaluates_like_the_original():
    x = random_input()
    rng = np.random.default_rng(5)
    original = build_model()
    model, _ = convert_quietly(build_model())

    for net in (original, model):
        net.set_train(False)
    for a, b in zip(original(ms.Tensor(x)), model(ms.Tensor(x))):
        np.testing.assert_allclose(b.asnumpy(), a.asnumpy(), rtol=1e-5, atol=1e-5)

    # One training step (forward + backward), random upstream gradients.
    for net in (original, model):
        net.set_train(True)
    dys = (rng.normal(size=(5, CHANNELS, 6, 6)).astype(np.float32),
           rng.normal(size=(5, CHANNELS)).astype(np.float32))
    dx_plain, grads_plain = gradients(original, x, dys)
    dx_sync, grads_sync = gradients(model, x, dys)
    np.testing.assert_allclose(dx_sync, dx_plain, rtol=1e-4, atol=1e-5)
    plain_by_sync = remap_batchnorm_checkpoint(
        {name: ms.Parameter(ms.Tensor(g), name=name) for name, g in grads_plain.items()}, model)
    assert set(grads_sync) <= set(plain_by_sync)
    for name, grad in grads_sync.items():
        np.testing.assert_allclose(grad, plain_by_sync[name].asnumpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=name)

    # Running statistics after the step: converted == original (momentum converted) ...
    plain_state = by_sync_names(original, model)
    for param in model.get_parameters():
        if param.name.endswith(("running_mean", "running_var")):
            np.testing.assert_allclose(param.asnumpy(), plain_state[param.name], rtol=1e-5,
                                       atol=1e-6, err_msg=param.name)
    # ... and the input layer's equal the float64 reference (its input is x itself).
    initial = {p.name: p.asnumpy() for p in build_model().input_bn.get_parameters()}
    mean, var = reference.running_update(initial["input_bn.moving_mean"],
                                         initial["input_bn.moving_variance"], x, 0.3, 1)
    np.testing.assert_allclose(model.input_bn.running_mean.asnumpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.input_bn.running_var.asnumpy(), var, rtol=1e-5, atol=1e-6)
    assert int(model.input_bn.num_batches_tracked.asnumpy()) == 1


def test_revert_gives_plain_layers_with_identical_eval_outputs():
    x = random_input(seed=3)
    model, _ = convert_quietly(build_model())
    model.set_train(True)
    model(ms.Tensor(random_input(seed=4)))  # move the running statistics
    model.set_train(False)
    expected = [y.asnumpy() for y in model(ms.Tensor(x))]
    sync_state = {p.name: p.asnumpy() for p in model.get_parameters()}
    sync_grad = {p.name: p.requires_grad for p in model.get_parameters()}

    reverted = revert_sync_batchnorm(model)  # CPU: the nn.BatchNorm*d family
    layers = dict(reverted.cells_and_names())
    assert type(layers["input_bn"]) is nn.BatchNorm2d  # pylint: disable=unidiomatic-typecheck
    assert type(layers["bn3d"]) is nn.BatchNorm3d  # pylint: disable=unidiomatic-typecheck
    assert type(layers["bn1d"]) is nn.BatchNorm1d  # pylint: disable=unidiomatic-typecheck
    assert type(layers["custom"]) is CustomBN  # pylint: disable=unidiomatic-typecheck
    assert reverted.shared is reverted.stem[3]
    assert not any(isinstance(c, SyncBatchNorm) for _, c in reverted.cells_and_names())
    # nn's convention again: its .momentum attribute holds 1 - (constructor momentum).
    assert abs(layers["input_bn"].momentum - 0.3) < 1e-12
    assert abs(layers["blocks.0.bn"].momentum - 0.2) < 1e-12
    assert layers["blocks.0.bn"].eps == 1e-3 and layers["bn1d"].training is False
    names = {p.name for p in reverted.get_parameters()}
    assert {"input_bn.gamma", "input_bn.moving_variance", "bn3d.bn2d.gamma", "bn1d.beta",
            "blocks.1.bn.moving_mean"} <= names

    plain_state = by_sync_names(reverted, model)
    for name, value in sync_state.items():
        if name.endswith(("weight", "bias", "running_mean", "running_var")) and name in plain_state:
            np.testing.assert_array_equal(plain_state[name], value, err_msg=name)
    assert reverted.stem[1].beta.requires_grad is sync_grad["stem.1.bias"] is False

    reverted.set_train(False)
    for got, want in zip(reverted(ms.Tensor(x)), expected):
        # float32 rounding only: rsqrt(var + eps) here, 1 / sqrt(var + eps) there, through 9 layers
        np.testing.assert_allclose(got.asnumpy(), want, rtol=1e-5,
                                   atol=1e-5 * np.abs(want).max())
    # The input layer in evaluation equals the float64 reference with its running statistics.
    bn = reverted.input_bn
    y = bn(ms.Tensor(x)).asnumpy()
    y_ref = reference.forward(x, bn.gamma.asnumpy(), bn.beta.asnumpy(), bn.eps,
                              bn.moving_mean.asnumpy(), bn.moving_variance.asnumpy())
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


def _mint_layers():
    plain = mint.nn.BatchNorm2d(CHANNELS, eps=1e-4, momentum=0.25)
    cma = mint.nn.BatchNorm1d(CHANNELS, momentum=None, affine=False)
    untracked = mint.nn.BatchNorm3d(CHANNELS, track_running_stats=False)
    rng = np.random.default_rng(9)
    for layer in (plain, cma, untracked):
        for param in layer.get_parameters():
            if param.name.endswith("num_batches_tracked"):
                param.set_data(ms.Tensor(7, ms.int64))
            else:
                param.set_data(ms.Tensor(rng.uniform(0.5, 1.5, param.shape).astype(np.float32)))
    plain.bias.requires_grad = False
    return nn.SequentialCell([plain, cma, untracked])


def test_mint_batchnorms_convert_and_revert_one_to_one():
    original = _mint_layers()
    model, messages = convert_quietly(_mint_layers())
    assert not messages
    for index, (dims, momentum, affine, tracked) in enumerate(
            [(2, 0.25, True, True), (1, None, False, True), (3, 0.1, True, False)]):
        sync, plain = model[index], original[index]
        assert isinstance(sync, SyncBatchNorm)
        assert (sync.revert_dims, sync.momentum, sync.affine, sync.track_running_stats) == \
            (dims, momentum, affine, tracked)
        assert sync.eps == plain.eps
        for slot in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            source, target = getattr(plain, slot), getattr(sync, slot)
            assert (source is None) == (target is None), slot
            if source is not None:
                assert target.name == f"{index}.{slot}"
                np.testing.assert_array_equal(target.asnumpy(), source.asnumpy())
                assert target.requires_grad == source.requires_grad
    assert model[0].bias.requires_grad is False

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # mint has momentum=None: no warning expected
        back = revert_sync_batchnorm(model, layer_family="mint")
    for index, klass in enumerate((mint.nn.BatchNorm2d, mint.nn.BatchNorm1d, mint.nn.BatchNorm3d)):
        assert type(back[index]) is klass  # pylint: disable=unidiomatic-typecheck
        for attr in ("eps", "momentum", "affine", "track_running_stats"):
            assert getattr(back[index], attr) == getattr(original[index], attr), attr
        for slot in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            source, target = getattr(original[index], slot), getattr(back[index], slot)
            assert (source is None) == (target is None)
            if source is not None:
                assert target.name == source.name == f"{index}.{slot}"
                np.testing.assert_array_equal(target.asnumpy(), source.asnumpy())
                assert target.requires_grad == source.requires_grad


def test_revert_without_record_and_cumulative_momentum():
    model = nn.SequentialCell([SyncBatchNorm(CHANNELS, momentum=None)])
    model[0].num_batches_tracked.set_data(ms.Tensor(3, ms.int64))
    with pytest.warns(UserWarning, match="cumulative moving average"):
        reverted = revert_sync_batchnorm(model, default_dims=1, layer_family="nn")
    assert type(reverted[0]) is nn.BatchNorm1d  # pylint: disable=unidiomatic-typecheck
    assert abs(reverted[0].momentum - 0.25) < 1e-12  # the 4th batch's weight, 1 / (3 + 1)
    single = revert_sync_batchnorm(SyncBatchNorm(CHANNELS), layer_family="nn")
    assert type(single) is nn.BatchNorm2d  # pylint: disable=unidiomatic-typecheck
    assert single.gamma.name == "gamma"


def test_use_batch_statistics_variants_and_root_layer():
    frozen = nn.SequentialCell([nn.BatchNorm2d(CHANNELS, use_batch_statistics=False)])
    with pytest.warns(UserWarning, match="use_batch_statistics=False.*nothing to synchronize"):
        kept = convert_sync_batchnorm(frozen)
    assert type(kept[0]) is nn.BatchNorm2d  # pylint: disable=unidiomatic-typecheck
    batch_only = nn.SequentialCell([nn.BatchNorm2d(CHANNELS, use_batch_statistics=True)])
    with pytest.warns(UserWarning, match="track_running_stats=False"):
        converted = convert_sync_batchnorm(batch_only)
    assert converted[0].track_running_stats is False and converted[0].running_mean is None
    root = convert_sync_batchnorm(nn.BatchNorm2d(3))
    assert isinstance(root, SyncBatchNorm)
    assert [p.name for p in root.get_parameters()][:4] == ["weight", "bias", "running_mean",
                                                           "running_var"]
    assert SyncBatchNorm.convert_sync_batchnorm is convert_sync_batchnorm


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="cell must be a mindspore.nn.Cell, but got 3"):
        convert_sync_batchnorm(3)
    with pytest.raises(TypeError, match="revert_sync_batchnorm: cell must be"):
        revert_sync_batchnorm("net")
    with pytest.raises(ValueError, match="default_dims must be 1, 2 or 3, but got 4"):
        revert_sync_batchnorm(nn.ReLU(), default_dims=4)
    with pytest.raises(ValueError, match="layer_family must be 'mint', 'nn' or None, but got 'torch'"):
        revert_sync_batchnorm(nn.ReLU(), layer_family="torch")
    with pytest.raises(TypeError, match="param_dict must be a dict"):
        remap_batchnorm_checkpoint([], nn.ReLU())
