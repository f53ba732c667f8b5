#!/usr/bin/env bash
# Install ms_syncbn and everything its job, tests and docs need, on a fresh machine.
# Idempotent: re-running it only re-checks. Used by README's two commands and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# MindSpore 2.10 wheels are built against NumPy 1.x; torch is only the tests' float64 oracle
# (pinned: an unpinned torch pulls a multi-GB CUDA build).
# pytest-xdist runs two test files at a time: the msrun jobs spend much of their time waiting
# (start-up, collectives, fault timeouts), so one at a time leaves a core idle.
$PY -m pip install --quiet "mindspore==2.10.0" "numpy<2" "torch==2.13.0" pytest "pytest-xdist>=3.5"
$PY -m pip install --quiet -r requirements-docs.txt  # Sphinx, for the API reference and its test
$PY -m pip install --quiet --no-build-isolation -e .
$PY -c "import ms_syncbn, ms_syncbn.kernels.cpu as k; print('ms_syncbn', ms_syncbn.__version__, 'CPU kernels:', k.cpu_library_path())"
