"""``Float32Cell``: a Cell that computes in float32 under MindSpore's mixed precision."""
from mindspore import nn

_PRECISION_FLAGS = ("fp16", "bf16", "fp32")


class Float32Cell(nn.Cell):
    """A Cell, and its sub-cells, that take every mixed-precision setting as float32.

    ``mindspore.amp`` (O2, O3, ``custom_mixed_precision``, ``build_train_network``) and
    ``Cell.to_float`` set a precision flag on a cell and each of its sub-cells through
    ``add_flags_recursive``: float16 or bfloat16 makes the cell cast its inputs, its
    parameters and its operators' inputs to that dtype. A batch norm keeps float32, as amp
    keeps ``nn.BatchNorm*d`` (its black list): here any such flag becomes float32, so the
    per-channel tensors, statistics and kernels stay float32 (a float16 input is computed
    in float32; SyncBatchNorm returns amp's dtype, as amp's wrapper of ``nn.BatchNorm*d``
    does). Flags other than precision pass unchanged. Without amp nothing is set and
    nothing is cast.
    """

    def add_flags_recursive(self, **flags):
        if any(flags.get(name, False) for name in _PRECISION_FLAGS):
            flags = dict(flags, fp16=False, bf16=False, fp32=True)
        return super().add_flags_recursive(**flags)
