"""The actor-dump reader behind the stress script's all-reduce order check (tests/actor_dump.py).

The dumps are MindSpore 2.10's actor-set IR (MS_DEV_SAVE_GRAPHS=1); the excerpt below has
its layout: tab-indented actor blocks with numbered sections.
"""
from tests.actor_dump import allreduce_chains, rank_dumps, read_actor_dump

DUMP = """[Kernel actors:4]
\tactor_name:1_Default/AllReduce-op0\tactor_id:1
\t\tkernel_name:Default/AllReduce-op0\tstream id:0\tinputs_num:1
\t\toutput_data_arrows:1
 \t\t\tfrom_output_node:AllReduce-op0\tfrom_output_index:0\tto_actor_name:3_Default/Mul-op0\tto_input_index:0\tflag:0
\t\toutput_control_arrows:{first_arrows}
{first_control}
\tactor_name:2_Default/Add-op0\tactor_id:2
\t\tkernel_name:Default/Add-op0\tstream id:0\tinputs_num:2
\t\toutput_control_arrows:1
 \t\t\tto_actor_name:4_Default/AllReduce-op1\tflag:0

\tactor_name:3_Default/Mul-op0\tactor_id:3
\t\tkernel_name:Default/Mul-op0\tstream id:0\tinputs_num:2

\tactor_name:4_Default/AllReduce-op1\tactor_id:4
\t\tkernel_name:Default/AllReduce-op1\tstream id:0\tinputs_num:1

[Stack actors:1]
\tactor_name:kernel_graph_1_StackActor\tactor_id:5
\t\toutput_control_arrows:1
 \t\t\tto_actor_name:1_Default/AllReduce-op0\tflag:0
"""


def write(tmp_path, rank, first_to_add):
    text = DUMP.format(first_arrows=1 if first_to_add else 0,
                       first_control=" \t\t\tto_actor_name:2_Default/Add-op0\tflag:0" if first_to_add else "")
    path = tmp_path / f"rank_{rank}" / "actor_set" / "0_actor_set_pipeline_kernel_graph_0-1.ir"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


def test_chained_all_reduces_in_arrow_order(tmp_path):
    actors = read_actor_dump(write(tmp_path, 0, first_to_add=True))
    assert sorted(a.kernel for a in actors.values()) == [
        "Default/Add-op0", "Default/AllReduce-op0", "Default/AllReduce-op1", "Default/Mul-op0"]
    # AllReduce-op0 -> Add-op0 -> AllReduce-op1: ordered through a kernel in between; the data
    # arrow to Mul-op0 and the stack actor's control arrow do not count.
    (chain,) = allreduce_chains(actors)
    assert chain.kernels == ("Default/AllReduce-op0", "Default/AllReduce-op1") and chain.chained


def test_unordered_all_reduces_are_reported(tmp_path):
    chains = allreduce_chains(read_actor_dump(write(tmp_path, 0, first_to_add=False)))
    # No control arrow path between the two: they fall into two separate groups, so nothing in
    # the kernel arrows orders them (only control actors between kernel graphs could).
    assert [c.kernels for c in chains] == [("Default/AllReduce-op0",), ("Default/AllReduce-op1",)]


def test_rank_dumps_by_rank(tmp_path):
    paths = [write(tmp_path, rank, True) for rank in (1, 0)]
    assert rank_dumps(tmp_path) == {0: [paths[1]], 1: [paths[0]]}
