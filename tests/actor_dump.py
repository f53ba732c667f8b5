"""The order MindSpore's graph runtime imposes on the all-reduces of a compiled graph.

Read from the actor-set dumps that MindSpore writes with ``MS_DEV_SAVE_GRAPHS=1`` (per rank,
one per compiled graph: ``<MS_DEV_SAVE_GRAPHS_PATH>/rank_<r>/actor_set/0_actor_set_pipeline_*.ir``,
the actors after linking). Each kernel actor lists its ``output_control_arrows``; the
runtime launches a kernel only after all its input data and control arrows fired.

MindSpore 2.10 (backend/ms_backend/runtime/graph_scheduler: GraphScheduler::Link ->
LinkGlobalControlArrow -> LinkControlArrowByCommunicationNode) chains the communication
kernels of a kernel-graph group with control arrows in the graph's execution order, and
links every kernel of those graphs in execution order (LinkControlArrowByExecutionOrder).
So when all the all-reduces of one kernel graph form one control-arrow chain, the
runtime issues them in that order on every rank whose execution order is the same — which
:func:`allreduce_chains` lets a caller compare across ranks.
"""
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, NamedTuple, Tuple


class KernelActor(NamedTuple):
    kernel: str  # the kernel's full name with scope, e.g. "Default/AllReduce-op3"
    control_out: Tuple[str, ...]  # names of the actors this one sends a control arrow to


def read_actor_dump(path: Path) -> Dict[str, KernelActor]:
    """Kernel actors of one actor-set dump, by actor name."""
    actors = {}
    name, kernel, section, control_out = None, None, None, []

    def flush():
        if name is not None and kernel is not None:
            actors[name] = KernelActor(kernel, tuple(control_out))

    for line in Path(path).read_text(errors="replace").splitlines():
        match = re.match(r"^\tactor_name:(\S+)\s+actor_id:\d+", line)
        if match:
            flush()
            name, kernel, section, control_out = match.group(1), None, None, []
            continue
        match = re.match(r"^\t\tkernel_name:(\S+)", line)
        if match:
            kernel = match.group(1)
            continue
        match = re.match(r"^\t\t(\w+):\d+\s*$", line)
        if match:
            section = match.group(1)
            continue
        match = re.search(r"to_actor_name:(\S+)", line)
        if match and section == "output_control_arrows":
            control_out.append(match.group(1))
    flush()
    return actors


class AllReduceChain(NamedTuple):
    kernels: Tuple[str, ...]  # the all-reduce kernels of one connected kernel graph, in runtime order
    chained: bool  # True if control arrows lead from each one to the next: the order is enforced


def allreduce_chains(actors: Dict[str, KernelActor]) -> List[AllReduceChain]:
    """The all-reduces of every group of kernel actors connected by kernel-to-kernel control
    arrows (in practice: one kernel graph), in the order those arrows impose, sorted by
    first kernel name. ``chained`` is False when no path of control arrows leads from some
    all-reduce to the next one (then their order is left to the scheduler's threads)."""
    successors = {name: [s for s in actor.control_out if s in actors] for name, actor in actors.items()}
    predecessors = defaultdict(list)
    for name, outs in successors.items():
        for succ in outs:
            predecessors[succ].append(name)
    component = {}
    for start in actors:
        if start in component:
            continue
        component[start], stack = start, [start]
        while stack:
            node = stack.pop()
            for other in successors[node] + predecessors[node]:
                if other not in component:
                    component[other] = start
                    stack.append(other)
    members = defaultdict(list)
    for name, root in component.items():
        members[root].append(name)
    chains = []
    for names in members.values():
        # Kahn's algorithm; ties (no arrow between two ready actors) broken by name only to
        # make the listing stable: the chained flag says whether a tie touched an all-reduce.
        indegree = {n: len(predecessors[n]) for n in names}
        ready = sorted(n for n in names if indegree[n] == 0)
        order = []
        while ready:
            node = ready.pop(0)
            order.append(node)
            for succ in successors[node]:
                indegree[succ] -= 1
                if indegree[succ] == 0:
                    ready.append(succ)
            ready.sort()
        reduces = [n for n in order if "AllReduce" in actors[n].kernel]
        if not reduces:
            continue
        chained = all(_reaches(successors, a, b) for a, b in zip(reduces, reduces[1:]))
        chains.append(AllReduceChain(tuple(actors[n].kernel for n in reduces), chained))
    return sorted(chains)


def _reaches(successors, start, goal) -> bool:
    seen, stack = {start}, [start]
    while stack:
        node = stack.pop()
        if node == goal:
            return True
        for succ in successors[node]:
            if succ not in seen:
                seen.add(succ)
                stack.append(succ)
    return False


def rank_dumps(save_graphs_path: Path) -> Dict[int, List[Path]]:
    """rank -> that rank's actor-set dumps (one per compiled graph, in name order) under a
    MS_DEV_SAVE_GRAPHS_PATH."""
    dumps = defaultdict(list)
    for path in sorted(Path(save_graphs_path).glob("rank_*/actor_set/0_actor_set_pipeline_*.ir")):
        dumps[int(path.parent.parent.name.split("_")[1])].append(path)
    return dict(dumps)
