"""ms_syncbn: synchronized batch normalization for MindSpore (Ascend, CPU).

    from ms_syncbn import SyncBatchNorm
"""
from ms_syncbn.batchnorm import SyncBatchNorm

__all__ = ["SyncBatchNorm"]
__version__ = "0.1.0"
