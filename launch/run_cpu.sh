#!/usr/bin/env bash
# Run a training script on N local CPU ranks with msrun (default: the SyncBatchNorm ResNet, 2 ranks).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/launch/venv.sh"
syncbn_enter_venv || true  # the environment launch/install.sh set up, if there is one

usage() {
  cat <<USAGE
Usage: bash launch/run_cpu.sh [--ranks N] [--port P] [--log-dir DIR] [--timeout S]
                              [--script PATH] [--] [training script arguments ...]

Runs PATH (default: examples/train_resnet_syncbn.py) on N CPU processes of this
machine under msrun; every rank is one member of the world group, so SyncBatchNorm
synchronizes across all N. Arguments the launcher does not know (or all after --)
go to the training script, e.g. --amp O2 or --mode graph --steps 40.

  --ranks N       number of ranks (default 2)
  --port P        msrun master port (default: a free port)
  --log-dir DIR   msrun worker logs (default ./msrun_log_cpu); rank r: DIR/worker_r.log
  --timeout S     msrun --cluster_time_out, seconds to wait for all ranks (default 60)
  --script PATH   the training script
  -h, --help      this help

Examples: bash launch/run_cpu.sh --amp O2
          bash launch/run_cpu.sh --ranks 2 -- --mode graph --steps 40
USAGE
}

script_help() {
  echo
  echo "Options of the training script ($SCRIPT):"
  python "$SCRIPT" --help
}

RANKS=2; PORT=""; LOG_DIR="msrun_log_cpu"; TIMEOUT=60; SHOW_HELP=0
SCRIPT="$ROOT/examples/train_resnet_syncbn.py"
SCRIPT_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) SHOW_HELP=1; shift ;;
    --ranks) RANKS="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --log-dir) LOG_DIR="$2"; shift 2 ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    --script) SCRIPT="$2"; shift 2 ;;
    --) shift; SCRIPT_ARGS+=("$@"); break ;;
    *) SCRIPT_ARGS+=("$1"); shift ;;
  esac
done
if [[ "$SHOW_HELP" == 1 ]]; then
  usage; script_help; exit 0
fi
if ! [[ "$RANKS" =~ ^[1-9][0-9]*$ ]]; then
  echo "run_cpu.sh: --ranks must be a positive integer, but got '$RANKS'" >&2; exit 2
fi
if [[ -z "$PORT" ]]; then
  PORT="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
export GLOG_v="${GLOG_v:-3}"                    # MindSpore: errors only
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # one core's worth of threads per rank
echo "msrun: $RANKS CPU rank(s), master 127.0.0.1:$PORT, logs in $LOG_DIR/worker_<rank>.log," \
     "python $(command -v python)"
# MindSpore's RPC layer prints "[INFO] DISTRIBUTED ... Event base dispatch success!" at
# start-up whatever GLOG_v says, and rank 0's copy shows up after its last line: those
# lines (and only those) are dropped here; the worker logs keep them.
set +e
msrun --worker_num="$RANKS" --local_worker_num="$RANKS" --master_addr=127.0.0.1 \
  --master_port="$PORT" --log_dir="$LOG_DIR" --join=True --cluster_time_out="$TIMEOUT" \
  --tail_worker_log=0 "$SCRIPT" "${SCRIPT_ARGS[@]}" 2>&1 \
  | grep --line-buffered -v '^\[INFO\] DISTRIBUTED(.*Event base dispatch success!$'
status=("${PIPESTATUS[@]}")
set -e
exit "${status[0]}"
