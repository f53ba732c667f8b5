#!/usr/bin/env bash
# Run a training script on the 8 NPUs of one Ascend node with msrun (one rank per NPU).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/launch/venv.sh"
syncbn_enter_venv || true  # the environment launch/install.sh set up, if there is one

usage() {
  cat <<USAGE
Usage: bash launch/run_ascend_node.sh [--npus N] [--port P] [--log-dir DIR] [--timeout S]
                                      [--script PATH] [--] [training script arguments ...]

Runs PATH (default: examples/train_resnet_syncbn.py --device Ascend) on the NPUs of this
node under msrun, one rank per NPU; SyncBatchNorm synchronizes across all of them.
Arguments the launcher does not know (or all after --) go to the training script.

  --npus N        number of NPUs / ranks (default 8)
  --port P        msrun master port (default 8118)
  --log-dir DIR   msrun worker logs (default ./msrun_log_ascend); rank r: DIR/worker_r.log
  --timeout S     msrun --cluster_time_out, seconds to wait for all ranks (default 300)
  --script PATH   the training script (default adds --device Ascend for the demo)
  -h, --help      this help

Example: bash launch/run_ascend_node.sh -- --mode graph --steps 100
USAGE
}

NPUS=8; PORT=8118; LOG_DIR="msrun_log_ascend"; TIMEOUT=300
SCRIPT="$ROOT/examples/train_resnet_syncbn.py"; DEMO=1
SCRIPT_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --npus) NPUS="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --log-dir) LOG_DIR="$2"; shift 2 ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    --script) SCRIPT="$2"; DEMO=0; shift 2 ;;
    --) shift; SCRIPT_ARGS+=("$@"); break ;;
    *) SCRIPT_ARGS+=("$1"); shift ;;
  esac
done
if ! [[ "$NPUS" =~ ^[1-9][0-9]*$ ]]; then
  echo "run_ascend_node.sh: --npus must be a positive integer, but got '$NPUS'" >&2; exit 2
fi
if [[ "$DEMO" == 1 ]]; then SCRIPT_ARGS=(--device Ascend "${SCRIPT_ARGS[@]}"); fi
export GLOG_v="${GLOG_v:-3}"
echo "msrun: $NPUS Ascend rank(s) on this node, master 127.0.0.1:$PORT, logs in $LOG_DIR/worker_<rank>.log"
msrun --worker_num="$NPUS" --local_worker_num="$NPUS" --master_addr=127.0.0.1 \
  --master_port="$PORT" --log_dir="$LOG_DIR" --join=True --cluster_time_out="$TIMEOUT" \
  --tail_worker_log=0 "$SCRIPT" "${SCRIPT_ARGS[@]}"
