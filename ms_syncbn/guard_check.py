"""Named errors for training steps that a layer's checks stopped without raising (Ascend).

The forward checks of a synchronized step (the ranks disagree on ``num_features``: guard code
3; the group's batch holds one value per channel: code 2) are decided from all-reduced
numbers on the device. The CPU kernel that checks them raises there and then. The Ascend table
cannot without a device-to-host read per layer and step, so it poisons the step instead (the
layer's outputs and gradients are NaN, its state is unchanged) and the layer keeps the code in
its ``guard_code`` buffer, the largest code so far (0: none). The poison does not always reach
the loss: MindSpore's ReLU turns NaN into 0 (measured on CPU: a poisoned step behind a ReLU
gave a finite loss), so the codes are what to read, not the loss. This module reads them once
per step, off the layers' hot path, and raises the error the CPU kernel would have raised:

- :class:`GuardCodeCheck`, a ``Model.train`` callback, at the end of every step;
- :func:`check_guard_codes`, for hand-written loops.

Each check is one AddN over the layers' codes and one device-to-host copy of its (1,) result;
the layers are read one by one only when it is not 0.

The backward check (code 4, a mis-paired all-reduce) is not kept: a ``bprop`` cannot write a
Parameter in a compiled MindSpore graph ("The user defined 'bprop' function ... does not
support using Parameter"). On Ascend such a step's gradients are NaN and no code is found: the
same step on the CPU table names it (README, *Errors*).
"""

from mindspore import ops
from mindspore.train import Callback

from ms_syncbn.batchnorm import SyncBatchNorm


def _sync_batchnorms(network):
    """Every SyncBatchNorm in `network`, each once (even if shared), in model order."""
    return [cell for _, cell in network.cells_and_names() if isinstance(cell, SyncBatchNorm)]


def check_guard_codes(network):
    """Raise the error of every step that a SyncBatchNorm of `network` stopped without raising.

    On the Ascend table a stopped step shows only as NaN in that layer's output and gradients
    (which a ReLU after it turns into 0); call this after each step. It costs one AddN over the
    layers' codes and one device-to-host copy of a (1,) tensor. On the CPU table the guard
    raises at the step itself, and this finds nothing.

    Args:
        network (mindspore.nn.Cell): The model, or the training cell that wraps it.

    Raises:
        RuntimeError: If a layer's ``guard_code`` is set: the message names each such layer
            (its path in the model), the check that stopped its step and the causes that fit,
            as the CPU kernel's error does.

    Supported Platforms:
        ``Ascend`` ``CPU``

    Examples:
        >>> from ms_syncbn import check_guard_codes
        >>> for x, label in dataset:  # doctest: +SKIP
        ...     loss = train_step(x, label)
        ...     check_guard_codes(net)
    """
    layers = _sync_batchnorms(network)
    if not layers:
        return
    # Codes are >= 0: their sum is 0 exactly when no layer kept one. One read for all layers.
    if float(ops.addn([layer.guard_code for layer in layers]).asnumpy()[0]) == 0.0:
        return
    messages = [message for message in (layer.guard_error() for layer in layers) if message]
    raise RuntimeError("\n".join(messages))


class GuardCodeCheck(Callback):
    """``Model.train`` callback: at the end of every step, raise the error of any SyncBatchNorm
    whose guard stopped a step without raising (:func:`check_guard_codes`).

    Costs one AddN over the layers' codes and one device-to-host copy of a (1,) tensor per step.

    Args:
        network (mindspore.nn.Cell, optional): Where to look for the layers. ``None``: the
            network ``Model.train`` trains. Default: ``None``.

    Raises:
        RuntimeError: From the end of a step after which a layer's ``guard_code`` is set (see
            :func:`check_guard_codes`).

    Supported Platforms:
        ``Ascend`` ``CPU``

    Examples:
        >>> from mindspore.train import LossMonitor, Model
        >>> from ms_syncbn import GuardCodeCheck
        >>> model = Model(net, loss_fn, optimizer)  # doctest: +SKIP
        >>> model.train(10, dataset, callbacks=[GuardCodeCheck(), LossMonitor()])  # doctest: +SKIP
    """

    def __init__(self, network=None):
        super().__init__()
        self.network = network

    def on_train_step_end(self, run_context):
        network = self.network
        if network is None:
            network = run_context.original_args().train_network
        check_guard_codes(network)
