"""ms_syncbn: synchronized batch normalization for MindSpore (Ascend, CPU).

    from ms_syncbn import SyncBatchNorm
"""
from ms_syncbn.batchnorm import SyncBatchNorm
from ms_syncbn.comm import create_syncbn_process_group
from ms_syncbn.convert import convert_sync_batchnorm, remap_batchnorm_checkpoint, revert_sync_batchnorm
from ms_syncbn.guard_check import GuardCodeCheck, check_guard_codes

# PyTorch's spelling, SyncBatchNorm.convert_sync_batchnorm(cell); defined in convert.py so that
# batchnorm.py does not import the module that imports it.
SyncBatchNorm.convert_sync_batchnorm = staticmethod(convert_sync_batchnorm)

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "revert_sync_batchnorm",
           "remap_batchnorm_checkpoint", "create_syncbn_process_group", "check_guard_codes",
           "GuardCodeCheck"]
__version__ = "0.1.0"
