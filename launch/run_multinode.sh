#!/usr/bin/env bash
# Run a training script on several nodes with msrun: start this once on every node.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/launch/venv.sh"
syncbn_enter_venv || true  # the environment launch/install.sh set up, if there is one

usage() {
  cat <<USAGE
Usage: bash launch/run_multinode.sh --node-rank R --master-addr ADDR --master-port P
                                    [--nodes N] [--local-ranks L] [--log-dir DIR]
                                    [--timeout S] [--script PATH]
                                    [--] [training script arguments ...]

Start it on each of N nodes with the same ADDR and P (node 0's address, where the
msrun scheduler runs) and R = 0 .. N-1. The job has N * L ranks, numbered node by
node (node R holds ranks R*L .. R*L+L-1), all in one world group: SyncBatchNorm
synchronizes across every rank of every node. Arguments the launcher does not know
(or all after --) go to the training script.

  --node-rank R     this node's index, 0 .. N-1 (required)
  --master-addr A   address of node 0, reachable from every node (required)
  --master-port P   a free port on node 0 (required)
  --nodes N         number of nodes (default 2)
  --local-ranks L   ranks on this node: 8 NPUs, or CPU processes (default 8)
  --log-dir DIR     msrun logs (default ./msrun_log_node<R>); rank r: DIR/worker_r.log
  --timeout S       msrun --cluster_time_out: seconds to wait for every node (default 300)
  --script PATH     the training script (default examples/train_resnet_syncbn.py)
  -h, --help        this help

To rehearse on one host, start two CPU "nodes" with --master-addr 127.0.0.1 and the
same port (tests/test_launch_multinode.py does): nodes other than 0 run the script
through launch/node_entry.py, which stops the scheduler msrun would start twice there.

Example, two 8-NPU nodes (node 0 at 192.0.2.10):
  node 0: bash launch/run_multinode.sh --node-rank 0 --master-addr 192.0.2.10 --master-port 8118 -- --device Ascend
  node 1: bash launch/run_multinode.sh --node-rank 1 --master-addr 192.0.2.10 --master-port 8118 -- --device Ascend
USAGE
}

NODE_RANK=""; MASTER_ADDR=""; MASTER_PORT=""; NODES=2; LOCAL=8; LOG_DIR=""; TIMEOUT=300
SCRIPT="$ROOT/examples/train_resnet_syncbn.py"
SCRIPT_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --node-rank) NODE_RANK="$2"; shift 2 ;;
    --master-addr) MASTER_ADDR="$2"; shift 2 ;;
    --master-port) MASTER_PORT="$2"; shift 2 ;;
    --nodes) NODES="$2"; shift 2 ;;
    --local-ranks) LOCAL="$2"; shift 2 ;;
    --log-dir) LOG_DIR="$2"; shift 2 ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    --script) SCRIPT="$2"; shift 2 ;;
    --) shift; SCRIPT_ARGS+=("$@"); break ;;
    *) SCRIPT_ARGS+=("$1"); shift ;;
  esac
done
fail() { echo "run_multinode.sh: $1" >&2; echo "Run with --help for usage." >&2; exit 2; }
[[ -n "$NODE_RANK" ]] || fail "--node-rank is required"
[[ -n "$MASTER_ADDR" ]] || fail "--master-addr is required"
[[ -n "$MASTER_PORT" ]] || fail "--master-port is required"
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || fail "--nodes must be a positive integer, but got '$NODES'"
[[ "$LOCAL" =~ ^[1-9][0-9]*$ ]] || fail "--local-ranks must be a positive integer, but got '$LOCAL'"
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] && (( NODE_RANK < NODES )) \
  || fail "--node-rank must be in 0 .. $((NODES - 1)), but got '$NODE_RANK'"
[[ -n "$LOG_DIR" ]] || LOG_DIR="msrun_log_node$NODE_RANK"
WORKERS=$((NODES * LOCAL))
# msrun starts a scheduler on every node whose address is MASTER_ADDR: only node 0 on real
# nodes, but every "node" when they share one host; node_entry.py makes the extra ones exit.
ENTRY=("$SCRIPT")
if (( NODE_RANK > 0 )); then ENTRY=("$ROOT/launch/node_entry.py" "$SCRIPT"); fi
export GLOG_v="${GLOG_v:-3}"
echo "msrun: node $NODE_RANK of $NODES, $LOCAL local rank(s) of $WORKERS, master $MASTER_ADDR:$MASTER_PORT, logs in $LOG_DIR"
msrun --worker_num="$WORKERS" --local_worker_num="$LOCAL" --node_rank="$NODE_RANK" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" --log_dir="$LOG_DIR" --join=True \
  --cluster_time_out="$TIMEOUT" "${ENTRY[@]}" "${SCRIPT_ARGS[@]}"
