#!/usr/bin/env bash
# Set up ms_syncbn in a virtual environment, from a machine with only python3.
#   bash launch/install.sh           what the main job needs: MindSpore 2.10.0, NumPy < 2 and
#                                    the package with its CPU kernels (requirements.txt)
#   bash launch/install.sh --tests   and what the tests need (requirements-tests.txt)
# The environment (launch/venv.sh): $MS_SYNCBN_VENV, else the active one ($VIRTUAL_ENV), else
# <repo>/.venv; made with `python3 -m venv` when it does not exist, reused when it does, so
# nothing is installed into the system's Python (PEP 668 forbids that on Debian and Ubuntu).
# Idempotent: re-running it only re-checks. Used by README's two commands and .ci/run.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
source launch/venv.sh

usage() {
  cat <<USAGE
Usage: bash launch/install.sh [--tests]

Sets up ms_syncbn in the virtual environment $(syncbn_venv_dir)
(\$MS_SYNCBN_VENV, else the active one, else <repo>/.venv; made if missing).

  (no option)  MindSpore 2.10.0, NumPy < 2, ms_syncbn with its CPU kernels: what
               'bash launch/run_cpu.sh' needs (download size and time: README, "Two commands")
  --tests      also pytest, pytest-xdist and Sphinx (tests/test_docs.py builds the docs)
  -h, --help   this help

Environment variables: MS_SYNCBN_VENV (the environment's folder), PYTHON (the python that
makes a new environment; default python3).
USAGE
}

TESTS=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tests) TESTS=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

STEPS=$((3 + TESTS))
STEP=0
step() {  # one line per step, so a long download is never a silent minute
  STEP=$((STEP + 1))
  echo
  echo "[install $STEP/$STEPS] $*"
}

VENV="$(syncbn_venv_dir)"
if [[ -x "$VENV/bin/python" ]]; then
  step "virtual environment: $VENV (exists, reused)"
else
  BASE="${PYTHON:-}"
  if [[ -z "$BASE" ]]; then
    for candidate in python3 python; do
      if command -v "$candidate" >/dev/null; then BASE="$candidate"; break; fi
    done
  fi
  if [[ -z "$BASE" ]]; then
    echo "install.sh: no python3 on PATH: install Python 3.9-3.11 (MindSpore 2.10.0's range)" >&2
    exit 1
  fi
  step "virtual environment: $VENV (new, made by $(command -v "$BASE"), $("$BASE" --version 2>&1))"
  if ! "$BASE" -m venv "$VENV"; then
    rm -rf "$VENV"
    echo "install.sh: '$BASE -m venv $VENV' failed. On Debian/Ubuntu install the venv module:" \
         "apt-get install python3-venv (python3.X-venv for your version)" >&2
    exit 1
  fi
fi
PY="$VENV/bin/python"
# pip prints what it downloads with its size ("Downloading mindspore-2.10.0-...whl (804.3 MB)")
# and a progress bar on a terminal; "Requirement already satisfied" when there is nothing to do.
PIP=("$PY" -m pip install --no-input)

step "MindSpore 2.10.0 and NumPy < 2 (requirements.txt; first time ~870 MB to download," \
     "MindSpore's wheel alone 804 MB: 20 s at 40 MB/s, 7 min at 2 MB/s)"
if ! "${PIP[@]}" -r requirements.txt setuptools; then
  echo "install.sh: pip could not install requirements.txt into $VENV ($("$PY" --version 2>&1))." \
       "MindSpore 2.10.0 needs Python 3.9-3.11: with another Python, make the environment with" \
       "one of those, e.g. PYTHON=python3.11 MS_SYNCBN_VENV=.venv311 bash launch/install.sh" >&2
  exit 1
fi

step "ms_syncbn, compiling its CPU kernels (ops/cpu/syncbn_cpu.cc, ~20 s)"
"${PIP[@]}" --no-build-isolation -e .

if [[ "$TESTS" == 1 ]]; then
  step "test tools: pytest, pytest-xdist, Sphinx (requirements-tests.txt; first time ~18 MB)"
  "${PIP[@]}" -r requirements-tests.txt
fi

echo
"$PY" -c "import ms_syncbn, ms_syncbn.kernels.cpu as k; print('ms_syncbn', ms_syncbn.__version__, 'CPU kernels:', k.cpu_library_path())"
echo "Set up in $VENV. Commands run in it: bash launch/run_cpu.sh; bash launch/in_venv.sh COMMAND;" \
     "or activate it: source $VENV/bin/activate"
