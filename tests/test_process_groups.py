"""create_syncbn_process_group in one process: argument errors, and the groups it asks for.

The errors need no communication (group_size is checked first; without init() the function
says to call it). Which groups are created, on which rank, under which name, and that a
second call creates nothing, is checked here against a stand-in for MindSpore's group table
(one per simulated rank, as each process has its own); the groups themselves, layers
synchronizing within them and the errors on 4 real ranks are tested under msrun in
tests/test_sync_multiprocess.py (job graph_4ranks, both modes).
"""
import numpy as np
import pytest

import ms_syncbn
from ms_syncbn import comm, create_syncbn_process_group

WORLD_GROUP = "world_group_of_the_stand_in"


class GroupTable:
    """MindSpore's groups as seen from one rank: create_group / get_process_group_ranks."""

    def __init__(self, rank, world_size):
        self.rank, self.world_size = rank, world_size
        self.groups = {WORLD_GROUP: list(range(world_size))}
        self.created = []  # (name, ranks) of every create_group call

    def create_group(self, name, ranks):
        assert isinstance(ranks, list) and name not in self.groups, (name, ranks)
        self.groups[name] = list(ranks)
        self.created.append((name, list(ranks)))

    def get_process_group_ranks(self, name):
        if name not in self.groups or self.rank not in self.groups[name]:
            raise RuntimeError(f"Group {name} doesn't include this rank {self.rank} process.")
        return list(self.groups[name])


@pytest.fixture
def as_rank(monkeypatch):
    """as_rank(rank, world_size) -> GroupTable: comm's view of MindSpore becomes that rank's."""
    def use(rank, world_size):
        table = GroupTable(rank, world_size)
        monkeypatch.setattr(comm, "communication_initialized", lambda: True)
        monkeypatch.setattr(comm, "get_rank", lambda: rank)
        monkeypatch.setattr(comm, "get_group_size", lambda: world_size)
        monkeypatch.setattr(comm, "create_group", table.create_group)
        monkeypatch.setattr(comm, "get_process_group_ranks", table.get_process_group_ranks)
        monkeypatch.setattr(comm.GlobalComm, "WORLD_COMM_GROUP", WORLD_GROUP)
        return table
    return use


def test_exported_from_the_package():
    assert ms_syncbn.create_syncbn_process_group is comm.create_syncbn_process_group
    assert "create_syncbn_process_group" in ms_syncbn.__all__


@pytest.mark.parametrize("value", [True, False, 2.0, "2", None, [2], np.float32(2)])
def test_group_size_not_an_int_raises_type_error(value):
    with pytest.raises(TypeError, match=r"create_syncbn_process_group: group_size must be an int, "
                                        rf"but got .* of type {type(value).__name__}"):
        create_syncbn_process_group(value)


@pytest.mark.parametrize("value", [-1, -4, np.int64(-2)])
def test_negative_group_size_raises_value_error(value):
    with pytest.raises(ValueError, match=rf"group_size must be .* but got {int(value)}\."):
        create_syncbn_process_group(value)


@pytest.mark.parametrize("value", [1, 2, 4, np.int32(2)])
def test_without_init_says_to_call_init_first(value):
    assert not comm.communication_initialized()  # nothing in this process called init()
    with pytest.raises(RuntimeError, match=rf"group_size={int(value)}\): communication is not "
                                           r"initialized: call mindspore\.communication\.init\(\) "
                                           r"first"):
        create_syncbn_process_group(value)


def test_group_size_zero_means_all_ranks_also_without_init():
    assert create_syncbn_process_group(0) is None  # Apex: 0 is the world, None its group


@pytest.mark.parametrize("world_size, group_size", [(4, 3), (4, 8), (8, 3), (6, 4), (2, 5)])
def test_group_size_not_dividing_the_world_raises_on_every_rank(as_rank, world_size, group_size):
    for rank in range(world_size):
        table = as_rank(rank, world_size)
        with pytest.raises(ValueError, match=rf"group_size must divide the world size {world_size} "
                                             rf".*but got group_size={group_size}\."):
            create_syncbn_process_group(group_size)
        assert table.created == []


@pytest.mark.parametrize("world_size, group_size", [(8, 1), (8, 2), (8, 4), (4, 2), (6, 3)])
def test_each_rank_creates_only_its_own_group_of_consecutive_ranks(as_rank, world_size, group_size):
    """Groups partition the world in order; each rank creates its group once, members only."""
    seen = {}
    for rank in range(world_size):
        table = as_rank(rank, world_size)
        name = create_syncbn_process_group(group_size)
        first = (rank // group_size) * group_size
        want = list(range(first, first + group_size))
        assert name == f"ms_syncbn_ranks_{first}-{first + group_size - 1}"
        assert table.created == [(name, want)], table.created
        seen.setdefault(name, []).append(rank)
    assert sorted(seen.values()) == [list(range(g, g + group_size))
                                     for g in range(0, world_size, group_size)]


def test_second_call_returns_the_same_name_and_creates_nothing(as_rank):
    table = as_rank(5, 8)
    first = create_syncbn_process_group(4)
    assert first == create_syncbn_process_group(4) == "ms_syncbn_ranks_4-7"
    assert table.created == [("ms_syncbn_ranks_4-7", [4, 5, 6, 7])]
    pair = create_syncbn_process_group(2)  # another size: only its own new group
    assert pair == "ms_syncbn_ranks_4-5"
    assert table.created[1:] == [("ms_syncbn_ranks_4-5", [4, 5])]
    assert create_syncbn_process_group(np.int64(4)) == first and len(table.created) == 2


def test_group_size_of_the_whole_world_is_the_world_group(as_rank):
    for world_size in (1, 2, 8):
        table = as_rank(world_size - 1, world_size)
        assert create_syncbn_process_group(world_size) == WORLD_GROUP
        assert table.created == []


def test_a_foreign_group_under_the_name_is_not_taken(as_rank):
    table = as_rank(1, 4)
    table.groups["ms_syncbn_ranks_0-1"] = [1, 3]  # someone else's group, same name
    with pytest.raises(ValueError, match=r"'ms_syncbn_ranks_0-1' already exists with ranks "
                                         r"\[1, 3\], not \[0, 1\]"):
        create_syncbn_process_group(2)
    assert table.created == []
