#!/usr/bin/env bash
# Run the emulated-Ascend tier's multi-rank scenarios on this node's real NPUs (HCCL) and print
# PASS/FAIL per scenario against float64 (launch/ascend_scenarios.py). Exits 2 without Ascend.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/launch/venv.sh"
syncbn_enter_venv || true  # the environment launch/install.sh set up, if there is one
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export GLOG_v="${GLOG_v:-3}"
exec python "$ROOT/launch/ascend_scenarios.py" "$@"
