"""``SyncBatchNorm``: the layer. It owns parameters, running statistics and argument checks."""
import numbers
from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, ops

from ms_syncbn.comm import all_reduce_sum, resolve_group
from ms_syncbn.kernels import guard_message, kernels_for
from ms_syncbn.precision import Float32Cell
from ms_syncbn.sync_function import FrozenStatsNormalize, SyncBatchNormFunction

_FLOAT_DTYPES = (ms.float16, ms.bfloat16, ms.float32, ms.float64)
# What a new layer holds, and what reset_parameters / reset_running_stats restore.
_INITIAL_VALUES = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}


def _check_eps(eps):
    if not isinstance(eps, float):
        raise TypeError(f"SyncBatchNorm: eps must be a float, but got {eps!r} of type "
                        f"{type(eps).__name__}.")
    if not eps > 0.0:
        raise ValueError(f"SyncBatchNorm: eps must be positive, but got {eps}.")


def _check_momentum(momentum):
    if momentum is None:
        return
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"SyncBatchNorm: momentum must be a float or None, but got {momentum!r} "
                        f"of type {type(momentum).__name__}.")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"SyncBatchNorm: momentum must be in range [0, 1], but got {momentum}.")


def _check_constructor_args(num_features, eps, momentum, affine, track_running_stats, dtype):
    if isinstance(num_features, bool) or not isinstance(num_features, int):
        raise TypeError(f"SyncBatchNorm: num_features must be an int, but got {num_features!r} "
                        f"of type {type(num_features).__name__}.")
    if num_features < 1:
        raise ValueError(f"SyncBatchNorm: num_features must be at least 1, but got {num_features}.")
    _check_eps(eps)
    _check_momentum(momentum)
    for name, value in (("affine", affine), ("track_running_stats", track_running_stats)):
        if not isinstance(value, bool):
            raise TypeError(f"SyncBatchNorm: {name} must be a bool, but got {value!r} of type "
                            f"{type(value).__name__}.")
    if dtype is not None and dtype not in _FLOAT_DTYPES:
        raise TypeError(f"SyncBatchNorm: dtype must be None or one of float16, bfloat16, float32, "
                        f"float64, but got {dtype!r}.")


class SyncBatchNorm(Float32Cell):
    r"""
    Batch normalization synchronized across the devices of a process group.

    Normalizes an input of shape :math:`(N, C, *)` per channel with the mean and
    variance of the whole group's batch, as in the paper `Batch Normalization:
    Accelerating Deep Network Training by Reducing Internal Covariate Shift
    <https://arxiv.org/abs/1502.03167>`_:

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    In plain text: ``y = (x - E[x]) / sqrt(Var[x] + eps) * gamma + beta``, where
    E[x] and Var[x] (the biased variance) are taken over N and every trailing
    dimension of all ranks of `process_group`, and gamma (`weight`) and beta
    (`bias`) are learned per channel.

    In training, each rank contributes its local batch, which may differ in size
    from the others' or be empty; every rank receives the same statistics. The
    running statistics are updated with the unbiased variance of the whole
    group's batch, ``running = (1 - momentum) * running + momentum * batch``, and
    are identical on all ranks. In evaluation they normalize the input and
    nothing is communicated. Without ``mindspore.communication.init()`` the
    layer is a plain batch norm over the local batch.

    Args:
        num_features (int): C, the number of channels of an input of shape :math:`(N, C, *)`.
        eps (float, optional): :math:`\epsilon`, added to the variance for numerical
            stability. Default: ``1e-5``.
        momentum (float, optional): Weight of the current batch in the running statistics,
            in [0, 1]; ``None`` uses a cumulative moving average. Default: ``0.1``.
            `eps` and `momentum` may be set on the built layer, with the same checks; every
            call reads them (in a compiled graph: the values it was compiled with).
        affine (bool, optional): Whether :math:`\gamma` and :math:`\beta` are learned
            parameters; when ``False`` they are fixed to 1 and 0. Default: ``True``.
        track_running_stats (bool, optional): Whether to keep running statistics. When
            ``False``, batch statistics are used in training and in evaluation (in
            evaluation over the local batch, without communication). Set to ``False`` on a
            layer built with running statistics, training leaves them unchanged and
            evaluation still uses them (as in mint). Default: ``True``.
        process_group (str, optional): Name of a group made by
            ``mindspore.communication.create_group``; statistics are synchronized within
            it. ``None`` synchronizes over all ranks. Default: ``None``.
        dtype (mindspore.dtype, optional): Dtype of the parameters and running statistics.
            ``None`` means float32. Default: ``None``.

    Inputs:
        - **x** (Tensor) - Shape :math:`(N, C, *)` with 2 to 5 dimensions in common use;
          float16, bfloat16, float32 or float64. Statistics are accumulated in float32 or
          better whatever the dtype.

    Outputs:
        Tensor of the same shape and dtype as `x`. Under mixed precision (``mindspore.amp``
        O2 and O3, ``Cell.to_float``) the layer computes in float32, as amp keeps
        ``nn.BatchNorm*d``, and the output takes the float16 or bfloat16 dtype amp asked for;
        parameters and running statistics keep their dtype.

    Raises:
        TypeError: If `num_features` is not an int (a bool is not accepted).
        TypeError: If `eps` is not a float (also when set on the layer; likewise below).
        TypeError: If `momentum` is neither a float nor None, or `affine` or
            `track_running_stats` is not a bool, or `dtype` is not a floating dtype.
        ValueError: If `num_features` is less than 1, or `eps` is not positive.
        ValueError: If `momentum` is not in range [0, 1].
        ValueError: If `process_group` does not exist or the current rank is not a member of it.
        ValueError: At call time in training, if `track_running_stats` was set to ``True`` on
            a layer built without running statistics.
        ValueError: At call time, if `x` has fewer than 2 dimensions or its dimension 1
            is not `num_features`, or, in training on one rank, if `x` holds a single value
            per channel.
        TypeError: At call time, if `x` is not a floating-point tensor.
        RuntimeError: In training, on every rank of the group, if the ranks disagree on
            `num_features` (code 3) or the group's batch holds a single value per channel
            (code 2), or, in the backward, if this layer's all-reduce was paired with
            another layer application's on some rank (code 4: e.g. the ranks ran parallel
            branches' backward passes in different orders). The step stops in the kernel
            that checks it; the message (also written to stderr) names the check, the layer
            (its path in the model) and the causes that fit
            (:data:`ms_syncbn.kernels.GUARD_MEANINGS`). On Ascend a kernel cannot raise
            without a device-to-host read per layer and step: that step's outputs and
            gradients are NaN instead, and codes 2 and 3 are kept in the layer's
            ``guard_code`` buffer, which :func:`ms_syncbn.check_guard_codes` and the
            ``Model.train`` callback :class:`ms_syncbn.GuardCodeCheck` raise by name.

    Supported Platforms:
        ``Ascend`` ``CPU``

    Examples:
        >>> # train_syncbn.py -- run with:
        >>> #   msrun --worker_num=2 --local_worker_num=2 --master_port=8975 \
        >>> #         --log_dir=msrun_log --join=True train_syncbn.py
        >>> import numpy as np
        >>> import mindspore as ms
        >>> from mindspore.communication import init, get_rank
        >>> from ms_syncbn import SyncBatchNorm
        >>> init()
        >>> bn = SyncBatchNorm(num_features=2)
        >>> bn.set_train(True)  # training mode: statistics of both ranks' batches
        >>> x = ms.Tensor(np.random.default_rng(get_rank()).normal(size=(3, 2, 4, 4)), ms.float32)
        >>> y = bn(x)
        >>> print(y.shape)
        (3, 2, 4, 4)
    """

    # Read through self in the construct path: amp's O1 regenerates the layer's code in
    # another module, where this module's own globals are not defined.
    input_dtypes = _FLOAT_DTYPES

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: Optional[str] = None, dtype=None):
        super().__init__()
        _check_constructor_args(num_features, eps, momentum, affine, track_running_stats, dtype)
        group = resolve_group(process_group)
        self.num_features = num_features
        self.eps, self.momentum = eps, momentum  # the properties: they also make the tensors
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.process_group = process_group
        self.group_size = 1 if group is None else group.size
        self.group_label = "(local)" if group is None else repr(group.name)
        self.param_dtype = ms.float32 if dtype is None else dtype

        def filled(name, requires_grad):
            return Parameter(self._initial_value(name), name=name, requires_grad=requires_grad)

        if affine:
            self.weight = filled("weight", True)
            self.bias = filled("bias", True)
        else:
            self.weight = None
            self.bias = None
        if track_running_stats:
            self.running_mean = filled("running_mean", False)
            self.running_var = filled("running_var", False)
            self.num_batches_tracked = Parameter(Tensor(0, ms.int64), name="num_batches_tracked",
                                                 requires_grad=False)
        else:
            self.running_mean = None
            self.running_var = None
            self.num_batches_tracked = None
        # A hint for the local statistics kernel, which may centre its sums on it (the CPU
        # kernel does: ms_syncbn.kernels): the last group mean. Only ever set from all-reduced
        # values, so it is identical on every rank; a table that does not read it leaves it.
        self.stat_shift = Parameter(Tensor(np.zeros((num_features,), np.float32)),
                                    name="stat_shift", requires_grad=False)
        # The largest guard code that stopped one of this layer's training steps (0: none).
        # Tables whose checks poison instead of raising (Ascend) leave the error here, to be
        # read off the hot path and raised by name (ms_syncbn.guard_check).
        self.guard_code = Parameter(Tensor(np.zeros((1,), np.float32)), name="guard_code",
                                    requires_grad=False)
        self.guard_where = None  # the layer as the checks' errors name it (_describe)
        self._ones = Tensor(np.ones((num_features,), np.float32))
        self._zeros = Tensor(np.zeros((num_features,), np.float32))

        kernels = kernels_for(ms.get_context("device_target"))
        self.update_stats = kernels.update_stats
        all_reduce = None if group is None else all_reduce_sum(group)
        self.group_stats = SyncBatchNormFunction(kernels, all_reduce, self.group_size)
        self.local_batch_stats = SyncBatchNormFunction(kernels, None)  # eval, untracked
        self.frozen_stats = FrozenStatsNormalize(kernels)
        self._described_as = None
        self._describe()
        # Set by mindspore.amp / Cell.to_float (add_flags_recursive): the low-precision dtype
        # amp asked for, which the output takes; None keeps the input's dtype.
        self.amp_output_dtype = None

    # Errors of the checking kernels name the layer by its path in the model, the prefix of its
    # parameters' names. Those names change when the layer (or a parent) is attached or
    # converted, so the description is refreshed at attachment, at set_train (which every
    # training script calls on the whole model) and at every PyNative call; a compiled
    # graph keeps the description it was compiled with.
    def _describe(self):
        name = self.stat_shift.name
        if name == self._described_as:
            return
        self._described_as = name
        path = name[:-len(".stat_shift")] if name.endswith(".stat_shift") else ""
        self.guard_where = (f"{path!r} " if path else "(not attached to a model: no path) ") + (
            f"SyncBatchNorm(num_features={self.num_features}) on process group {self.group_label} "
            f"of {self.group_size} ranks")
        self.group_stats.describe(self.guard_where)

    def guard_error(self):
        """The error of the code kept in ``guard_code`` (the largest guard code that stopped one
        of this layer's training steps without raising, see ms_syncbn.guard_check), or None if
        no step was stopped. Reads the buffer on the host."""
        code = float(self.guard_code.asnumpy()[0])
        if code == 0.0:
            return None
        self._describe()
        return guard_message(code, self.guard_where)

    def reset_running_stats(self):
        """Running mean to 0, running variance to 1 and num_batches_tracked to 0, as
        ``mint.nn.SyncBatchNorm.reset_running_stats``; nothing without running statistics.

        Re-estimating the statistics (e.g. after weight averaging, as
        ``torch.optim.swa_utils.update_bn`` does) is this, ``momentum = None`` (a cumulative
        average over the batches that follow) and training-mode passes over the data. Call it
        on every rank: the statistics are the group's. ``stat_shift`` (the hint of the local
        statistics kernel, identical on every rank) and ``guard_code`` are kept.
        """
        if self.running_mean is None:
            return
        # In place (ops.assign, as mint): set_data would give the Parameter new memory, which a
        # graph compiled before keeps neither reading nor updating.
        ops.assign(self.running_mean, self._initial_value("running_mean"))
        ops.assign(self.running_var, self._initial_value("running_var"))
        ops.assign(self.num_batches_tracked, Tensor(0, ms.int64))

    def reset_parameters(self):
        """``reset_running_stats``, and weight to 1 and bias to 0 (if `affine`), as
        ``mint.nn.SyncBatchNorm.reset_parameters``."""
        self.reset_running_stats()
        if self.weight is not None:
            ops.assign(self.weight, self._initial_value("weight"))
            ops.assign(self.bias, self._initial_value("bias"))

    def _initial_value(self, name):
        """(C,) tensor in the parameters' dtype: what `name` holds in a new layer."""
        return Tensor(np.full((self.num_features,), _INITIAL_VALUES[name], np.float32),
                      self.param_dtype)

    def update_parameters_name(self, prefix='', recurse=True):
        super().update_parameters_name(prefix, recurse)
        self._describe()

    def __call__(self, *args, **kwargs):  # Python calls only: a compiled graph parses construct
        self._describe()
        return super().__call__(*args, **kwargs)

    # eps and momentum are read by every step, as by mint.nn.SyncBatchNorm: setting them after
    # construction (model code often does, e.g. ``m.eps, m.momentum = 1e-3, 0.03``) takes
    # effect. In PyNative a change shows at the next call: the values are tensor inputs of the
    # layer's compiled step, and whether momentum is None a constant it is compiled for. A
    # graph compiled around the layer (GRAPH_MODE, or a jit of the whole step) keeps the
    # values it was compiled with, as it does every Python attribute.
    @property
    def eps(self):
        """float: added to the variance before the square root."""
        return self._eps

    @eps.setter
    def eps(self, value):
        _check_eps(value)
        self._eps = value
        self._eps_tensor = Tensor([value], ms.float32)  # (1,): what a step reads, an input

    @property
    def momentum(self):
        """float or None: weight of the current batch in the running statistics; None for a
        cumulative moving average."""
        return self._momentum

    @momentum.setter
    def momentum(self, value):
        _check_momentum(value)
        self._momentum = value
        self._momentum_tensor = Tensor([0.0 if value is None else value], ms.float32)

    def extend_repr(self):
        return (f"num_features={self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
                f"process_group={self.process_group}, group_size={self.group_size}")

    def _check_input(self, x):
        if x.ndim < 2:
            raise ValueError(f"SyncBatchNorm: expected an input of shape (N, C, *) with at least "
                             f"2 dimensions, but got shape {x.shape}.")
        if x.shape[1] != self.num_features:
            raise ValueError(f"SyncBatchNorm: expected {self.num_features} channels in dimension 1 "
                             f"of the input (num_features), but got shape {x.shape}.")
        if x.dtype not in self.input_dtypes:
            raise TypeError(f"SyncBatchNorm: expected a floating-point input (float16, bfloat16, "
                            f"float32 or float64), but got {x.dtype}.")

    def _affine_params(self):
        if not self.affine:
            return self._ones, self._zeros
        if self.param_dtype == ms.float32:  # no cast: it would be one more op each way
            return self.weight, self.bias
        return self.weight.astype(ms.float32), self.bias.astype(ms.float32)

    def construct(self, x):
        self._check_input(x)  # plain Python in PyNative: nothing malformed reaches a kernel
        if not self.training:
            if x.dtype == ms.bfloat16:
                return self._amp_output(self._eval_body(x, self._eps_tensor))
            return self._amp_output(self._forward_eval(x, self._eps_tensor))
        if self.group_size == 1 and x.size == self.num_features:
            raise ValueError(f"SyncBatchNorm: expected more than 1 value per channel when "
                             f"training, but got input of shape {x.shape}.")
        # As in mint and torch, track_running_stats is read at every call: set to False on a
        # layer with running statistics, training leaves them alone and evaluation still
        # uses them. A layer built without them has none to update.
        tracked = self.track_running_stats
        if tracked and self.running_mean is None:
            raise ValueError("SyncBatchNorm: track_running_stats is True, but the layer was built "
                             "with track_running_stats=False and has no running statistics to "
                             "update; build it with track_running_stats=True.")
        eps, momentum, cumulative = self._eps_tensor, self._momentum_tensor, self._momentum is None
        if x.dtype == ms.bfloat16:
            return self._amp_output(self._train_body(x, eps, momentum, cumulative, tracked))
        return self._amp_output(self._forward_train(x, eps, momentum, cumulative, tracked))

    def add_flags_recursive(self, **flags):
        """Under mixed precision the layer computes in float32 (see ``Float32Cell``) and, as
        amp does for ``nn.BatchNorm*d``, returns the low-precision dtype it was asked for.
        (set_train also lands here: the error description is refreshed, see _describe.)"""
        self._describe()
        if flags.get("fp16", False):
            self.amp_output_dtype = ms.float16
        elif flags.get("bf16", False):
            self.amp_output_dtype = ms.bfloat16
        elif flags.get("fp32", False):
            self.amp_output_dtype = None
        return super().add_flags_recursive(**flags)

    def _amp_output(self, y):
        if self.amp_output_dtype is None:  # no amp: nothing added to the step
            return y
        return y.astype(self.amp_output_dtype)

    # Run by Python (PyNative), both paths are compiled all the same: the per-channel
    # arithmetic around the kernels is a few dozen tiny ops, which cost ~1 ms each when
    # dispatched one by one and almost nothing in a graph. One function per mode,
    # because a compiled graph does not see later changes of `self.training`. bfloat16
    # runs op by op: PyNative's gradient of a compiled function sums bfloat16 gradients
    # with AddN, which MindSpore has no CPU kernel for.
    @ms.jit
    def _forward_train(self, x, eps, momentum, cumulative, tracked):
        return self._train_body(x, eps, momentum, cumulative, tracked)

    @ms.jit
    def _forward_eval(self, x, eps):
        return self._eval_body(x, eps)

    def _train_body(self, x, eps, momentum, cumulative, tracked):
        """One training step of the layer: x -> y, and the state updated.

        Errors that only the all-reduced sums reveal (the ranks disagree on
        num_features; the group's batch holds one value per channel) stop the step,
        identically on every rank, and leave the state unchanged. No branch and no host
        read: a branch on a tensor splits a CPU graph (about half a millisecond per layer and
        step) and needs the host on Ascend, and a host read would stall PyNative's dispatch
        at every layer.
        eps (1,) and momentum (1,) are the layer's; the constants cumulative (momentum is None)
        and tracked (track_running_stats) say how the running statistics are updated.
        """
        weight, bias = self._affine_params()
        # Indexed, not unpacked: unpacking makes a getitem of the unused invstd, which
        # MindSpore 2.10 drops with a console warning ("Some side effect nodes were
        # eliminated by mistake", auto_monad.cc) in every step that compiles this body.
        outputs = self.group_stats(x, weight, bias, self.stat_shift, eps)
        y, mean, var, code, increment = outputs[0], outputs[1], outputs[3], outputs[5], outputs[6]
        self._update_state(mean, var, code, increment, momentum, cumulative, tracked)
        return y

    def _eval_body(self, x, eps):
        weight, bias = self._affine_params()
        if self.running_mean is not None:  # whatever track_running_stats says now (as mint)
            mean = self.running_mean.astype(ms.float32)
            invstd = ops.rsqrt(self.running_var.astype(ms.float32) + eps)
            return self.frozen_stats(x, mean, invstd, weight, bias)
        # Evaluation without running statistics: the local batch, no communication.
        return self.local_batch_stats(x, weight, bias, self.stat_shift, eps)[0]

    def _update_state(self, mean, var, code, increment, momentum, cumulative, tracked):
        """Shift hint and running statistics from the group statistics of one training step.

        `var` is the group's unbiased variance, non-finite on every channel of a step that must
        not change the state (stopped by a guard code, or fewer than 2 values per channel in
        the group) and on a channel whose batch holds NaN or Inf: such a channel keeps its
        value, so NaN or Inf in a batch shows in that step's output and loss but never reaches
        the state that later steps and evaluation use. A code other than 0 is kept in
        ``guard_code`` (the largest so far), where ms_syncbn.guard_check finds it when the
        table stopped the step without raising; `increment` (1 or 0) is added to
        num_batches_tracked. (One ``update_stats`` kernel: the arithmetic is stated there.)
        """
        code, mean, var = ops.stop_gradient(code), ops.stop_gradient(mean), ops.stop_gradient(var)
        if self.group_stats.synchronized:  # static: without a group the code is always 0
            ops.assign(self.guard_code, ops.maximum(self.guard_code, code))
        if tracked:
            running_mean, running_var = self.running_mean, self.running_var
            if self.param_dtype != ms.float32:
                running_mean, running_var = (running_mean.astype(ms.float32),
                                             running_var.astype(ms.float32))
            if cumulative:  # momentum None: a cumulative moving average over the batches with data
                factor = 1.0 / (self.num_batches_tracked + 1).astype(ms.float32).reshape((1,))
            else:
                factor = momentum
        else:  # only the shift is kept
            running_mean, running_var, factor = self.stat_shift, self.stat_shift, momentum
        new_shift, new_mean, new_var = self.update_stats(mean, var, self.stat_shift, running_mean,
                                                         running_var, factor)
        if self.group_stats.reads_shift:  # static: a table whose local_moments ignores the hint
            ops.assign(self.stat_shift, new_shift)
        if tracked:
            ops.assign(self.running_mean, new_mean.astype(self.param_dtype))
            ops.assign(self.running_var, new_var.astype(self.param_dtype))
            # (1,) float32 -> (1,) int64, added to the () counter
            ops.assign_add(self.num_batches_tracked, ops.stop_gradient(increment).astype(ms.int64))
