"""Run a training script on a node other than node 0 of a multi-node msrun job.

``msrun`` starts a scheduler on every node whose own address is ``--master_addr``.
On real nodes only node 0 has that address; when several "nodes" share one host
(a rehearsal of a multi-node job, e.g. tests/test_launch_multinode.py), the other
nodes' msrun would start a second scheduler, which fails to bind the port and
makes their msrun exit non-zero although the job ran. This entry point, which
run_multinode.sh puts in front of the script on nodes 1, 2, ..., exits at once in
such a scheduler process (MS_ROLE=MS_SCHED) and otherwise runs the script as
``__main__`` with its own arguments, exactly as ``python SCRIPT ARGS`` would.

Usage (by run_multinode.sh): msrun ... launch/node_entry.py SCRIPT [ARGS ...]
"""
import os
import runpy
import sys


def main():
    if len(sys.argv) < 2:
        raise SystemExit("usage: node_entry.py SCRIPT [ARGS ...]")
    if os.environ.get("MS_ROLE") == "MS_SCHED":
        print("node_entry.py: node 0 hosts the msrun scheduler; this node's is not needed.",
              flush=True)
        return
    script = os.path.abspath(sys.argv[1])
    sys.argv = [script] + sys.argv[2:]
    sys.path[0] = os.path.dirname(script)
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
