"""Communication: create and resolve process groups, and make their collectives.

The only module of ms_syncbn that talks to ``mindspore.communication``. A layer
asks :func:`resolve_group` once, at construction; ``None`` means "no
communication": either ``init()`` was never called (plain single-process
debugging) or the group has a single member. :func:`create_syncbn_process_group`
(public) splits the world into groups of consecutive ranks, as Apex does. Collectives are the
``mindspore.ops`` primitives, which run in PyNative and graph mode on CPU and
Ascend alike (``comm_func.all_reduce`` does not run on CPU in PyNative).
"""
import numbers
import warnings
from typing import List, NamedTuple, Optional, Tuple

from mindspore import ops
from mindspore.communication import (GlobalComm, create_group, get_group_size,
                                     get_process_group_ranks, get_rank)

# Name of the group of world ranks first..last made by create_syncbn_process_group; the same
# ranks always get the same name, so that a second call finds the groups of the first.
SYNCBN_GROUP_NAME = "ms_syncbn_ranks_{first}-{last}"


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


def _existing_group_ranks(name: str) -> Optional[List[int]]:
    """World ranks of the group ``name`` as MindSpore knows it on this rank, or None if it
    has no such group (MindSpore raises, and logs nothing, for a group it does not have)."""
    try:
        return [int(r) for r in get_process_group_ranks(name)]
    except Exception:  # RuntimeError on CPU and Ascend: "Group ... doesn't include this rank"
        return None


def create_syncbn_process_group(group_size: int) -> Optional[str]:
    r"""
    Split the world into groups of `group_size` consecutive ranks and return this rank's group.

    Apex's ``apex.parallel.create_syncbn_process_group`` under the same name, for synchronizing
    batch statistics over the ranks of one node or over groups of k devices instead of all ranks:
    with W ranks and ``k = group_size``, the groups are ranks 0 .. k-1, k .. 2k-1, ...,
    W-k .. W-1: rank r is in group r // k. Call it on every rank, after
    ``mindspore.communication.init()`` and before building the layers; pass its result as
    the `process_group` of :class:`SyncBatchNorm` or of :func:`convert_sync_batchnorm`.

    Each rank creates only its own group: ``mindspore.communication.create_group`` is called
    on the group's members only, as MindSpore expects (it warns a non-member that the group
    may fail to initialize); the groups are disjoint, so every rank creates at most one group
    per call and all ranks do so in the same order. The group of ranks `first` to `last` is
    named ``"ms_syncbn_ranks_<first>-<last>"``, e.g. ``"ms_syncbn_ranks_4-7"``, whatever
    `group_size` made it: a later call finds the group in MindSpore (by that name) and returns
    it without creating it again, so calling this once per model or per layer is fine.

    - ``group_size=0``: all ranks, as in Apex; returns ``None`` (the world, as
      `process_group=None`) and creates nothing, also without ``init()``.
    - `group_size` equal to the number of ranks: returns the world group's name
      (``GlobalComm.WORLD_COMM_GROUP``) and creates nothing.
    - ``group_size=1``: each rank alone (Apex: "equivalent to using non-sync bn"); one-rank
      groups are created (MindSpore accepts them; tested on CPU) and the layers never
      communicate.

    Args:
        group_size (int): Number of consecutive ranks whose statistics are synchronized;
            must divide the number of ranks. ``0`` means all ranks.

    Returns:
        str, the name of this rank's group; ``None`` for ``group_size=0``.

    Raises:
        TypeError: If `group_size` is not an int (a bool is not accepted).
        ValueError: If `group_size` is negative, or does not divide the number of ranks.
        RuntimeError: If `group_size` is not 0 and ``mindspore.communication.init()`` has
            not been called.

    Supported Platforms:
        ``Ascend`` ``CPU``

    Examples:
        >>> # run under msrun with 8 ranks, e.g. 2 nodes of 4 devices
        >>> from mindspore import nn
        >>> from mindspore.communication import init
        >>> from ms_syncbn import SyncBatchNorm, create_syncbn_process_group
        >>> init()
        >>> group = create_syncbn_process_group(4)  # rank 5: "ms_syncbn_ranks_4-7"
        >>> bn = SyncBatchNorm(16, process_group=group)
        >>> net = nn.SequentialCell([nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU()])
        >>> net = SyncBatchNorm.convert_sync_batchnorm(net, process_group=group)
    """
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise TypeError(f"create_syncbn_process_group: group_size must be an int, but got "
                        f"{group_size!r} of type {type(group_size).__name__}.")
    group_size = int(group_size)
    if group_size < 0:
        raise ValueError(f"create_syncbn_process_group: group_size must be a number of ranks "
                         f"(1 or more), or 0 for all ranks, but got {group_size}.")
    if group_size == 0:
        return None
    if not communication_initialized():
        raise RuntimeError(f"create_syncbn_process_group(group_size={group_size}): communication "
                           f"is not initialized: call mindspore.communication.init() first (in a "
                           f"job launched with msrun).")
    world_size = get_group_size()
    if world_size % group_size != 0:
        raise ValueError(f"create_syncbn_process_group: group_size must divide the world size "
                         f"{world_size} (the number of ranks), but got group_size={group_size}.")
    if group_size == world_size:
        return GlobalComm.WORLD_COMM_GROUP
    first = get_rank() // group_size * group_size
    ranks = list(range(first, first + group_size))
    name = SYNCBN_GROUP_NAME.format(first=first, last=ranks[-1])
    existing = _existing_group_ranks(name)
    if existing is None:
        create_group(name, ranks)
    elif existing != ranks:
        raise ValueError(f"create_syncbn_process_group: a group named {name!r} already exists with "
                         f"ranks {existing}, not {ranks}; it was not made by this function: "
                         f"give it another name.")
    return name
