"""Model conversion: plain BatchNorm layers <-> ``SyncBatchNorm``, and checkpoint names.

Three public functions:

* :func:`convert_sync_batchnorm` -- every ``mindspore.nn.BatchNorm1d/2d/3d`` and
  ``mindspore.mint.nn.BatchNorm1d/2d/3d`` in a model becomes a ``SyncBatchNorm``
  with the same state (also available as ``SyncBatchNorm.convert_sync_batchnorm``).
* :func:`revert_sync_batchnorm` -- the reverse, for single-device inference and export.
* :func:`remap_batchnorm_checkpoint` -- renames the batch-norm entries of a
  checkpoint to the names a model's batch-norm layers use, whichever of the three
  layouts below the checkpoint was saved from.

Parameter layouts (names relative to the layer; each layer's parameters carry its
path in the model as prefix, e.g. ``layer1.0.bn1.weight``):

=====================  ==========  ==========  ================  =====================  =====================
layer                  gamma       beta        running mean      running variance       others
=====================  ==========  ==========  ================  =====================  =====================
SyncBatchNorm          weight      bias        running_mean      running_var            num_batches_tracked,
                                                                                        stat_shift, guard_code
mint.nn.BatchNorm*d    weight      bias        running_mean      running_var            num_batches_tracked
nn.BatchNorm1d/2d      gamma       beta        moving_mean       moving_variance
nn.BatchNorm3d         bn2d.gamma  bn2d.beta   bn2d.moving_mean  bn2d.moving_variance
=====================  ==========  ==========  ================  =====================  =====================

Momentum conventions: ``SyncBatchNorm`` and ``mint.nn.BatchNorm*d`` update
``running = (1 - momentum) * running + momentum * batch``; ``nn.BatchNorm*d(momentum=m)``
updates ``running = m * running + (1 - m) * batch`` (its default 0.9 is our 0.1).
Conversions translate between the two.
"""
import warnings
from typing import Dict, NamedTuple, Optional

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn

from ms_syncbn.batchnorm import SyncBatchNorm

# The plain batch-norm classes this module converts, with the input rank they stand for.
_NN_BATCHNORM_DIMS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
_MINT_BATCHNORM_DIMS = {mint.nn.BatchNorm1d: 1, mint.nn.BatchNorm2d: 2, mint.nn.BatchNorm3d: 3}
_LAYER_FAMILIES = ("mint", "nn")

# Attribute set on each SyncBatchNorm made by convert_sync_batchnorm: the dimensionality
# (1, 2 or 3) of the BatchNorm layer it replaced, which revert_sync_batchnorm restores.
REVERT_DIMS_ATTR = "revert_dims"

# Checkpoint aliases of one batch-norm slot, relative to the layer's prefix (see the table above;
# "mean"/"variance" are the names of a top-level nn.BatchNorm*d, which has no prefix).
_SLOT_ALIASES = {
    "weight": ("weight", "gamma", "bn2d.gamma"),
    "bias": ("bias", "beta", "bn2d.beta"),
    "running_mean": ("running_mean", "moving_mean", "bn2d.moving_mean", "mean"),
    "running_var": ("running_var", "moving_variance", "bn2d.moving_variance", "variance"),
    "num_batches_tracked": ("num_batches_tracked",),
}


class _LayerSlots(NamedTuple):
    """A batch-norm layer's parameters by slot (None when the layer has no such parameter)."""

    prefix: str  # e.g. "layer1.0.bn1." ("" for a top-level layer)
    params: Dict[str, Optional[Parameter]]  # slot -> Parameter, slots as in _SLOT_ALIASES


# ----------------------------------------------------------------------------------------------
# Finding and describing batch-norm layers


def _known_base(cell, table):
    """The class of ``table`` that ``cell`` is an instance of (the most derived one), or None."""
    for klass in type(cell).__mro__:
        if klass in table:
            return klass
    return None


def _qualified_name(cell) -> str:
    klass = type(cell)
    return f"{klass.__module__}.{klass.__qualname__}"


def _nn_inner(cell):
    """The ``_BatchNorm`` of an ``nn.BatchNorm*d`` that holds its parameters (BatchNorm3d wraps one)."""
    return cell.bn2d if isinstance(cell, nn.BatchNorm3d) else cell


def _prefix_from(param: Optional[Parameter], relative_name: str) -> Optional[str]:
    """The prefix of ``param.name`` in front of ``relative_name``, or None if it does not end so."""
    if param is None:
        return None
    if param.name == relative_name:
        return ""
    if param.name.endswith("." + relative_name):
        return param.name[:-len(relative_name)]
    return None


def _first_prefix(candidates, fallback: str) -> str:
    for param, relative_name in candidates:
        prefix = _prefix_from(param, relative_name)
        if prefix is not None:
            return prefix
    return fallback


def _layer_slots(cell, path: str) -> Optional[_LayerSlots]:
    """The slots of a batch-norm layer of any of the three layouts; None for any other cell."""
    fallback = f"{path}." if path else ""
    if isinstance(cell, SyncBatchNorm) or _known_base(cell, _MINT_BATCHNORM_DIMS) is not None:
        names = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        params = {slot: getattr(cell, slot) for slot in names}
        if isinstance(cell, SyncBatchNorm):
            params["stat_shift"] = cell.stat_shift
            params["guard_code"] = cell.guard_code
        prefix = _first_prefix([(p, slot) for slot, p in params.items()], fallback)
        return _LayerSlots(prefix, params)
    if _known_base(cell, _NN_BATCHNORM_DIMS) is not None:
        inner = _nn_inner(cell)
        inner_path = "bn2d." if inner is not cell else ""
        params = {"weight": inner.gamma, "bias": inner.beta, "running_mean": inner.moving_mean,
                  "running_var": inner.moving_variance, "num_batches_tracked": None}
        prefix = _first_prefix([(inner.gamma, inner_path + "gamma"),
                                (inner.beta, inner_path + "beta"),
                                (inner.moving_mean, inner_path + "moving_mean"),
                                (inner.moving_variance, inner_path + "moving_variance")], fallback)
        return _LayerSlots(prefix, params)
    return None


def _set_param_names(prefix: str, named_params):
    """Name each parameter ``prefix + relative name``: the names checkpoints are saved under."""
    for relative_name, param in named_params:
        if param is not None:
            param.name = prefix + relative_name


def _tidy(momentum: float) -> float:
    """1 - m in [0, 1] without the rounding residue of the subtraction (1 - 0.9 -> 0.1)."""
    return min(max(float(f"{momentum:.12g}"), 0.0), 1.0)


def _copy_param(dst: Parameter, src: Parameter):
    """dst <- value of src (a copy, cast to dst's dtype), and src's requires_grad."""
    value = src.value()
    data = value.astype(ms.float32).asnumpy() if value.dtype == ms.bfloat16 else value.asnumpy()
    dst.set_data(Tensor(np.array(data, copy=True), dst.dtype))
    dst.requires_grad = src.requires_grad


def _copy_values(dst: Parameter, src: Parameter):
    """dst <- value of src (a copy, cast to dst's dtype); dst keeps its requires_grad."""
    requires_grad = dst.requires_grad
    _copy_param(dst, src)
    dst.requires_grad = requires_grad


# ----------------------------------------------------------------------------------------------
# Walking a model


def _replace_children(cell, replace, path, memo):
    """Apply ``replace`` to every descendant of ``cell``, in place; returns nothing."""
    replaced = False
    for name, child in list(cell._cells.items()):  # pylint: disable=protected-access
        if child is None:
            continue
        child_path = f"{path}.{name}" if path else name
        key = id(child)
        if key not in memo:  # a layer shared by several parents is converted once
            memo[key] = replace(child, child_path, memo)
        if memo[key] is not child:
            cell._cells[name] = memo[key]  # pylint: disable=protected-access
            replaced = True
    if replaced and hasattr(cell, "cell_list"):  # SequentialCell iterates this list in construct
        cell.cell_list = list(cell._cells.values())  # pylint: disable=protected-access


# ----------------------------------------------------------------------------------------------
# Plain BatchNorm -> SyncBatchNorm


def _sync_from_nn(cell, process_group, path):
    """nn.BatchNorm1d/2d/3d -> SyncBatchNorm, or None (with a warning) if it cannot be synchronized."""
    inner = _nn_inner(cell)
    where = f"{_qualified_name(cell)} at {path or '<root>'!r}"
    if getattr(inner, "format", "NCHW") != "NCHW":
        warnings.warn(f"convert_sync_batchnorm: left {where} unchanged: data_format "
                      f"{inner.format!r} is not supported by SyncBatchNorm (NCHW only).",
                      UserWarning, stacklevel=2)
        return None
    if inner.use_batch_statistics is False:
        warnings.warn(f"convert_sync_batchnorm: left {where} unchanged: use_batch_statistics=False "
                      f"normalizes with its moving statistics only (a frozen batch norm), so there "
                      f"is nothing to synchronize.", UserWarning, stacklevel=2)
        return None
    track_running_stats = inner.use_batch_statistics is None
    if not track_running_stats:
        warnings.warn(f"convert_sync_batchnorm: {where} has use_batch_statistics=True: the "
                      f"SyncBatchNorm gets track_running_stats=False and its moving_mean and "
                      f"moving_variance (which that layer never normalizes with) are dropped.",
                      UserWarning, stacklevel=2)
    # nn.BatchNorm*d(momentum=m) stores 1 - m in .momentum: the weight of the batch, our momentum.
    momentum = _tidy(float(inner.momentum))
    # nn.BatchNorm*d always scales by gamma and shifts by beta (affine=False only freezes
    # them), so the SyncBatchNorm is affine and carries requires_grad per parameter.
    sync = SyncBatchNorm(int(inner.num_features), eps=float(inner.eps), momentum=momentum,
                         affine=True, track_running_stats=track_running_stats,
                         process_group=process_group, dtype=inner.gamma.dtype)
    _copy_param(sync.weight, inner.gamma)
    _copy_param(sync.bias, inner.beta)
    if track_running_stats:
        _copy_values(sync.running_mean, inner.moving_mean)
        _copy_values(sync.running_var, inner.moving_variance)
    return sync


def _sync_from_mint(cell, process_group):
    """mint.nn.BatchNorm1d/2d/3d -> SyncBatchNorm: the same names, the same conventions."""
    sync = SyncBatchNorm(int(cell.num_features), eps=float(cell.eps), momentum=cell.momentum,
                         affine=bool(cell.affine), track_running_stats=bool(cell.track_running_stats),
                         process_group=process_group, dtype=cell.dtype)
    for slot in ("weight", "bias"):
        if getattr(cell, slot) is not None:
            _copy_param(getattr(sync, slot), getattr(cell, slot))
    for slot in ("running_mean", "running_var", "num_batches_tracked"):
        if getattr(cell, slot) is not None:
            _copy_values(getattr(sync, slot), getattr(cell, slot))
    return sync


def _to_sync(cell, path, memo, process_group):
    if isinstance(cell, SyncBatchNorm):
        return cell
    nn_base = _known_base(cell, _NN_BATCHNORM_DIMS)
    base = nn_base or _known_base(cell, _MINT_BATCHNORM_DIMS)
    if base is None:
        _replace_children(cell, lambda c, p, m: _to_sync(c, p, m, process_group), path, memo)
        return cell
    if type(cell).construct is not base.construct:
        warnings.warn(f"convert_sync_batchnorm: left {_qualified_name(cell)} at "
                      f"{path or '<root>'!r} unchanged: it subclasses {base.__name__} with a "
                      f"construct of its own, which SyncBatchNorm would not reproduce.",
                      UserWarning, stacklevel=2)
        return cell
    prefix = _layer_slots(cell, path).prefix
    if nn_base is not None:
        sync = _sync_from_nn(cell, process_group, path)
        if sync is None:
            return cell
        setattr(sync, REVERT_DIMS_ATTR, _NN_BATCHNORM_DIMS[base])
    else:
        sync = _sync_from_mint(cell, process_group)
        setattr(sync, REVERT_DIMS_ATTR, _MINT_BATCHNORM_DIMS[base])
    _set_param_names(prefix, _sync_param_items(sync))
    sync.set_train(cell.training)
    return sync


def _sync_param_items(sync):
    names = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked", "stat_shift",
             "guard_code")
    return [(name, getattr(sync, name)) for name in names]


def convert_sync_batchnorm(cell, process_group=None):
    r"""
    Replace every plain batch-norm layer of `cell` by a :class:`SyncBatchNorm` with the same state.

    Converts ``mindspore.nn.BatchNorm1d/2d/3d`` and ``mindspore.mint.nn.BatchNorm1d/2d/3d``,
    and subclasses of them that do not define their own ``construct``, anywhere in `cell`
    (attributes, ``nn.CellList``, ``nn.SequentialCell``, at any depth; a layer shared by
    several parents becomes one shared SyncBatchNorm). Carried over: gamma/`weight`,
    beta/`bias`, the running mean and variance, `num_batches_tracked`, `eps`, `momentum`,
    `affine`, whether running statistics are tracked, the `requires_grad` of each parameter,
    and the training flag. The normalization stays

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    with E and Var now taken over the batches of all ranks of `process_group`.

    Conversions:

    - ``nn.BatchNorm*d(momentum=m)`` keeps ``running = m * running + (1 - m) * batch``; the
      SyncBatchNorm gets ``momentum = 1 - m``. It is always affine (an ``nn.BatchNorm*d``
      always applies gamma and beta; ``affine=False`` only freezes them, and so do the
      copied `requires_grad` flags). ``use_batch_statistics=None`` tracks running
      statistics; ``True`` gives ``track_running_stats=False`` (with a warning: the moving
      statistics are dropped); ``False`` (a frozen batch norm, nothing to synchronize) and
      ``data_format='NHWC'`` layers are left unchanged with a warning.
    - ``mint.nn.BatchNorm*d`` arguments and parameters carry over one to one.
    - Parameter names stay those the model saves checkpoints under: the layer's path plus
      the SyncBatchNorm names (``weight``, ``bias``, ``running_mean``, ``running_var``,
      ``num_batches_tracked``; ``stat_shift`` and ``guard_code`` are SyncBatchNorm's own).
      They equal ``mint.nn.BatchNorm*d``'s; a checkpoint of an ``nn.BatchNorm*d`` model
      (``gamma``, ``beta``, ``moving_mean``, ``moving_variance``) loads after
      :func:`remap_batchnorm_checkpoint`, or load it into the model before converting it.
    - Each new layer records the dimensionality of the layer it replaced in its
      ``revert_dims`` attribute, for :func:`revert_sync_batchnorm`.

    A subclass with its own ``construct`` is left unchanged, with a warning naming it.
    Call this after ``mindspore.communication.init()`` (and after ``create_group`` for a
    `process_group`): a SyncBatchNorm resolves its group when it is built.

    Args:
        cell (mindspore.nn.Cell): The model; changed in place. If `cell` itself is a
            batch-norm layer, the new layer is returned instead.
        process_group (str, optional): Group to synchronize over, as in
            :class:`SyncBatchNorm`. ``None``: all ranks. Default: ``None``.

    Returns:
        mindspore.nn.Cell, `cell` with its batch-norm layers replaced, or the SyncBatchNorm
        that replaces `cell`.

    Raises:
        TypeError: If `cell` is not a ``mindspore.nn.Cell``.
        ValueError: If `process_group` does not exist or the current rank is not in it.

    Supported Platforms:
        ``Ascend`` ``CPU``

    Examples:
        >>> from mindspore import nn
        >>> from ms_syncbn import SyncBatchNorm
        >>> net = nn.SequentialCell([nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()])
        >>> net = SyncBatchNorm.convert_sync_batchnorm(net)
        >>> print(type(net[1]).__name__, net[1].momentum)
        SyncBatchNorm 0.1
        >>> print([p.name for p in net[1].get_parameters()])
        ['1.weight', '1.bias', '1.running_mean', '1.running_var', '1.num_batches_tracked', '1.stat_shift', '1.guard_code']
    """
    if not isinstance(cell, nn.Cell):
        raise TypeError(f"convert_sync_batchnorm: cell must be a mindspore.nn.Cell, but got "
                        f"{cell!r} of type {type(cell).__name__}.")
    return _to_sync(cell, "", {}, process_group)


# ----------------------------------------------------------------------------------------------
# SyncBatchNorm -> plain BatchNorm


def _default_layer_family() -> str:
    # mint's batch-norm kernels exist on Ascend only (CPU: "kernel BatchNormExt unregistered").
    return "mint" if ms.get_context("device_target") == "Ascend" else "nn"


def _nn_from_sync(sync, dims):
    if sync.momentum is None:
        factor = 1.0 / (int(sync.num_batches_tracked.asnumpy()) + 1) if sync.track_running_stats \
            else 0.1
        warnings.warn(f"revert_sync_batchnorm: nn.BatchNorm{dims}d has no cumulative moving average "
                      f"(momentum=None); the reverted layer uses the weight the next update would "
                      f"have used, momentum={1.0 - factor} in nn's convention.",
                      UserWarning, stacklevel=2)
    else:
        factor = float(sync.momentum)
    klass = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    plain = klass(sync.num_features, eps=float(sync.eps), momentum=_tidy(1.0 - factor),
                  affine=bool(sync.affine),
                  use_batch_statistics=None if sync.track_running_stats else True,
                  dtype=sync.param_dtype)
    inner = _nn_inner(plain)
    if sync.affine:
        _copy_param(inner.gamma, sync.weight)
        _copy_param(inner.beta, sync.bias)
    if sync.track_running_stats:
        _copy_values(inner.moving_mean, sync.running_mean)
        _copy_values(inner.moving_variance, sync.running_var)
    inner_path = "bn2d." if inner is not plain else ""
    return plain, [(inner_path + name, getattr(inner, name))
                   for name in ("gamma", "beta", "moving_mean", "moving_variance")]


def _mint_from_sync(sync, dims):
    klass = {1: mint.nn.BatchNorm1d, 2: mint.nn.BatchNorm2d, 3: mint.nn.BatchNorm3d}[dims]
    plain = klass(sync.num_features, eps=float(sync.eps), momentum=sync.momentum,
                  affine=bool(sync.affine), track_running_stats=bool(sync.track_running_stats),
                  dtype=sync.param_dtype)
    names = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    for name in names:
        if getattr(sync, name) is not None:
            if name in ("weight", "bias"):
                _copy_param(getattr(plain, name), getattr(sync, name))
            else:
                _copy_values(getattr(plain, name), getattr(sync, name))
    return plain, [(name, getattr(plain, name)) for name in names]


def _to_plain(cell, path, memo, default_dims, layer_family):
    if isinstance(cell, SyncBatchNorm):
        dims = getattr(cell, REVERT_DIMS_ATTR, default_dims)
        prefix = _layer_slots(cell, path).prefix
        build = _mint_from_sync if layer_family == "mint" else _nn_from_sync
        plain, named_params = build(cell, dims)
        _set_param_names(prefix, named_params)
        plain.set_train(cell.training)
        return plain
    _replace_children(cell, lambda c, p, m: _to_plain(c, p, m, default_dims, layer_family),
                      path, memo)
    return cell


def revert_sync_batchnorm(cell, default_dims=2, layer_family=None):
    r"""
    Replace every :class:`SyncBatchNorm` of `cell` by a plain BatchNorm layer with the same state.

    The reverse of :func:`convert_sync_batchnorm`, for single-device inference and export:
    the plain layers never communicate, and in evaluation give the same outputs,

    .. math::
        y = \frac{x - \mathrm{running\_mean}}{\sqrt{\mathrm{running\_var} + \epsilon}} * \gamma + \beta

    SyncBatchNorm does not know the rank of its input, so the dimensionality of each plain
    layer is the one recorded by :func:`convert_sync_batchnorm` in the layer's
    ``revert_dims`` attribute, or `default_dims` for a SyncBatchNorm built by hand.

    The layer family is ``mint.nn.BatchNorm*d`` (same parameter names as SyncBatchNorm)
    where mint's batch-norm kernels exist (Ascend), and ``nn.BatchNorm*d`` elsewhere
    (CPU), whose parameters are named ``gamma``, ``beta``, ``moving_mean`` and
    ``moving_variance`` (the ``stat_shift`` and ``guard_code`` buffers are dropped: they only
    centre the synchronized sums and keep a stopped step's error code). Momentum is
    translated to ``nn``'s convention (``1 - momentum``); ``momentum=None`` (cumulative
    average), which ``nn.BatchNorm*d`` cannot express, becomes the weight of the next
    update, with a warning. ``track_running_stats=False``
    becomes ``use_batch_statistics=True`` there.

    Args:
        cell (mindspore.nn.Cell): The model; changed in place. If `cell` itself is a
            SyncBatchNorm, the new layer is returned instead.
        default_dims (int, optional): 1, 2 or 3: BatchNorm1d/2d/3d for a SyncBatchNorm that
            has no ``revert_dims`` attribute. Default: ``2``.
        layer_family (str, optional): ``"mint"`` or ``"nn"``; ``None`` chooses ``"mint"`` on
            Ascend and ``"nn"`` on other targets. Default: ``None``.

    Returns:
        mindspore.nn.Cell, `cell` with its SyncBatchNorm layers replaced, or the plain layer
        that replaces `cell`.

    Raises:
        TypeError: If `cell` is not a ``mindspore.nn.Cell``.
        ValueError: If `default_dims` is not 1, 2 or 3, or `layer_family` is not ``"mint"``,
            ``"nn"`` or None.

    Supported Platforms:
        ``Ascend`` ``CPU``

    Examples:
        >>> from mindspore import nn
        >>> from ms_syncbn import SyncBatchNorm, revert_sync_batchnorm
        >>> net = SyncBatchNorm.convert_sync_batchnorm(
        ...     nn.SequentialCell([nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)]))
        >>> net = revert_sync_batchnorm(net, layer_family="nn")
        >>> print(type(net[1]).__name__)
        BatchNorm2d
    """
    if not isinstance(cell, nn.Cell):
        raise TypeError(f"revert_sync_batchnorm: cell must be a mindspore.nn.Cell, but got "
                        f"{cell!r} of type {type(cell).__name__}.")
    if isinstance(default_dims, bool) or default_dims not in (1, 2, 3):
        raise ValueError(f"revert_sync_batchnorm: default_dims must be 1, 2 or 3, but got "
                         f"{default_dims!r}.")
    if layer_family is None:
        layer_family = _default_layer_family()
    if layer_family not in _LAYER_FAMILIES:
        raise ValueError(f"revert_sync_batchnorm: layer_family must be 'mint', 'nn' or None, "
                         f"but got {layer_family!r}.")
    return _to_plain(cell, "", {}, default_dims, layer_family)


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _batchnorm_layers(cell):
    """(path, _LayerSlots) of every batch-norm layer in cell, not descending into them."""
    found = []

    def visit(current, path):
        slots = _layer_slots(current, path)
        if slots is not None:
            found.append((path, slots))
            return
        for name, child in current._cells.items():  # pylint: disable=protected-access
            if child is not None:
                visit(child, f"{path}.{name}" if path else name)

    visit(cell, "")
    return found


def remap_batchnorm_checkpoint(param_dict, cell):
    """
    Rename the batch-norm entries of a checkpoint to the names `cell`'s batch-norm layers use.

    For every batch-norm layer of `cell` (SyncBatchNorm, ``mint.nn.BatchNorm*d`` or
    ``nn.BatchNorm*d``) and each of its parameters that `param_dict` lacks under its own
    name, the entry saved under the layer's prefix with another layout's name is added
    under the layer's name: ``gamma``/``bn2d.gamma`` <-> ``weight``, ``beta`` <-> ``bias``,
    ``moving_mean`` <-> ``running_mean``, ``moving_variance`` <-> ``running_var``. Every
    other entry is kept unchanged (``mindspore.load_param_into_net`` ignores the ones the
    model does not have, e.g. ``stat_shift`` when loading into a plain layer). Parameters
    absent from every layout keep their values when loading: ``num_batches_tracked`` (only
    used with ``momentum=None``), ``stat_shift`` (re-centred on the next batch) and
    ``guard_code`` (0 in a new layer).

    Args:
        param_dict (dict): Name -> Parameter, e.g. from ``mindspore.load_checkpoint``.
        cell (mindspore.nn.Cell): The model the checkpoint will be loaded into.

    Returns:
        dict, a new name -> Parameter dict for ``mindspore.load_param_into_net(cell, ...)``.

    Raises:
        TypeError: If `param_dict` is not a dict or `cell` is not a ``mindspore.nn.Cell``.

    Supported Platforms:
        ``Ascend`` ``CPU``

    Examples:
        >>> import mindspore as ms
        >>> from mindspore import nn
        >>> from ms_syncbn import SyncBatchNorm, remap_batchnorm_checkpoint
        >>> plain = nn.SequentialCell([nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)])
        >>> ms.save_checkpoint(plain, "plain.ckpt")  # names 1.gamma, 1.moving_mean, ...
        >>> net = SyncBatchNorm.convert_sync_batchnorm(
        ...     nn.SequentialCell([nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)]))
        >>> params = remap_batchnorm_checkpoint(ms.load_checkpoint("plain.ckpt"), net)
        >>> _ = ms.load_param_into_net(net, params)
    """
    if not isinstance(param_dict, dict):
        raise TypeError(f"remap_batchnorm_checkpoint: param_dict must be a dict of name -> "
                        f"Parameter, but got {type(param_dict).__name__}.")
    if not isinstance(cell, nn.Cell):
        raise TypeError(f"remap_batchnorm_checkpoint: cell must be a mindspore.nn.Cell, but got "
                        f"{cell!r} of type {type(cell).__name__}.")
    remapped = dict(param_dict)
    for _, slots in _batchnorm_layers(cell):
        for slot, param in slots.params.items():
            if param is None or param.name in remapped or slot not in _SLOT_ALIASES:
                continue
            for alias in _SLOT_ALIASES[slot]:
                source = param_dict.get(slots.prefix + alias)
                if source is not None:
                    remapped[param.name] = Parameter(source.value(), name=param.name,
                                                     requires_grad=param.requires_grad)
                    break
    return remapped
