"""Communication: resolve a process group and make its collectives.

The only module of ms_syncbn that talks to ``mindspore.communication``. A layer
asks :func:`resolve_group` once, at construction; ``None`` means "no
communication": either ``init()`` was never called (plain single-process
debugging) or the group has a single member. Collectives are the
``mindspore.ops`` primitives, which run in PyNative and graph mode on CPU and
Ascend alike (``comm_func.all_reduce`` does not run on CPU in PyNative).
"""
import warnings
from typing import NamedTuple, Optional, Tuple

from mindspore import ops
from mindspore.communication import GlobalComm, get_process_group_ranks, get_rank


class CommGroup(NamedTuple):
    """A resolved process group that this rank belongs to (two or more members)."""

    name: str
    ranks: Tuple[int, ...]  # world ranks of the members, in group order

    @property
    def size(self) -> int:
        return len(self.ranks)


def communication_initialized() -> bool:
    """True once ``mindspore.communication.init()`` has run in this process."""
    return bool(GlobalComm.INITED)


def resolve_group(process_group: Optional[str]) -> Optional[CommGroup]:
    """Resolve ``process_group`` (None: the world) for the calling rank.

    Returns None when there is nothing to synchronise with: communication is not
    initialised, or the group has one member.

    Raises:
        TypeError: If `process_group` is neither None nor a str.
        ValueError: If the group does not exist or the calling rank is not a member.
    """
    if process_group is not None and not isinstance(process_group, str):
        raise TypeError(f"SyncBatchNorm: process_group must be None or a str, "
                        f"but got {process_group!r} of type {type(process_group).__name__}.")
    if not communication_initialized():
        if process_group is not None:
            warnings.warn(f"SyncBatchNorm: process_group {process_group!r} is ignored because "
                          f"mindspore.communication.init() has not been called; the layer "
                          f"normalizes over the local batch only.", UserWarning, stacklevel=3)
        return None
    name = GlobalComm.WORLD_COMM_GROUP if process_group is None else process_group
    try:
        ranks = tuple(int(r) for r in get_process_group_ranks(name))
    except Exception as err:  # MindSpore raises RuntimeError/ValueError/TypeError here
        # MindSpore reports a missing group and a group without this rank alike.
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"SyncBatchNorm: process_group {name!r} cannot be used on rank {get_rank()}: "
                         f"it does not exist or this rank is not a member (create it with "
                         f"mindspore.communication.create_group on its members only). "
                         f"MindSpore says: {reason}") from err
    me = get_rank()
    if me not in ranks:
        raise ValueError(f"SyncBatchNorm: the current rank {me} is not a member of process_group "
                         f"{name!r} (ranks {list(ranks)}).")
    if len(ranks) < 2:
        return None
    return CommGroup(name, ranks)


def all_reduce_sum(group: CommGroup):
    """A summing all-reduce primitive over ``group``; every member receives the same sums."""
    return ops.AllReduce(ops.ReduceOp.SUM, group.name)
