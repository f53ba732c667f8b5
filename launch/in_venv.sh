#!/usr/bin/env bash
# Run a command in the virtual environment that launch/install.sh set up (its python, msrun,
# pytest first on PATH), e.g.  bash launch/in_venv.sh python -m pytest -q tests/test_docs.py
# Which environment: launch/venv.sh ($MS_SYNCBN_VENV, else the active one, else <repo>/.venv).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/launch/venv.sh"
if [[ $# -eq 0 || "$1" == "-h" || "$1" == "--help" ]]; then
  echo "Usage: bash launch/in_venv.sh COMMAND [ARGS ...]"
  echo "Runs COMMAND with the environment $(syncbn_venv_dir) first on PATH."
  exit 0
fi
if ! syncbn_enter_venv; then
  echo "in_venv.sh: no virtual environment at $(syncbn_venv_dir): run 'bash launch/install.sh' first" \
       "(or set MS_SYNCBN_VENV to the environment's folder)" >&2
  exit 1
fi
exec "$@"
