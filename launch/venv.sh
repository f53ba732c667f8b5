# Sourced by the launch scripts (not run): which virtual environment ms_syncbn is set up in.
# $MS_SYNCBN_VENV if set, else the active one ($VIRTUAL_ENV), else <repo>/.venv.
# Needs ROOT (the repository) set by the script that sources it.

syncbn_venv_dir() {
  if [[ -n "${MS_SYNCBN_VENV:-}" ]]; then
    echo "$MS_SYNCBN_VENV"
  elif [[ -n "${VIRTUAL_ENV:-}" ]]; then
    echo "$VIRTUAL_ENV"
  else
    echo "$ROOT/.venv"
  fi
}

# Put the environment's bin/ (python, msrun, pytest) first on PATH, as `activate` does. Without
# an environment there (the package installed some other way) PATH stays as it is. Returns 1
# then, so a caller can say which python it uses.
syncbn_enter_venv() {
  local dir
  dir="$(syncbn_venv_dir)"
  if [[ -x "$dir/bin/python" ]]; then
    export VIRTUAL_ENV="$dir"
    export PATH="$dir/bin:$PATH"
    unset PYTHONHOME
    return 0
  fi
  return 1
}
