#!/usr/bin/env bash
# Chooses the Python that runs the archive, creating and updating its virtual environment
# where it is the archive's own. Sourced by run_experiments.sh and tests/run.sh; re-running
# costs a hash comparison when nothing changed. Three ways, by environment variable:
#
#   (none)                 the pinned environment: .venv, Python 3.11, requirements.txt
#                          (numpy 1.23.5, torch, Theano's C mode). The default.
#   CRMN_PROFILE=current   .venv-current, Python 3.12, requirements-current.txt (numpy 2.x,
#                          jax 0.11, no torch): the Theano backend in JAX mode only.
#   CRMN_PYTHON=/path/py   that interpreter as it is: no venv, no install; a missing package
#                          is one line naming it and the pip command.
#
# CRMN_VENV overrides the virtual environment's folder; CRMN_WHEELS the folder of the
# locally built theano-pymc and Lasagne wheels (default .whl/). A caller that needs more
# than the archive's own packages (tests/run.sh: pytest) lists them in CRMN_NEEDS.
#
# After sourcing: $CRMN_PY is the environment's python.
set -euo pipefail

CRMN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CRMN_WHEELS="${CRMN_WHEELS:-$CRMN_ROOT/.whl}"

_crmn_die() { echo "ensure_env: $*" >&2; exit 1; }

# a Python interpreter named $1 (e.g. python3.12) that really runs: PATH first (a pyenv
# shim may be on PATH and still refuse to run), then pyenv's own versions
_crmn_find_python() {
  local name="$1" candidate
  for candidate in "$(command -v "$name" || true)" \
      "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"${name#python}".*/bin/"$name"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] \
        && "$candidate" -c 'import sys' >/dev/null 2>&1; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

# Theano links the network's matrix products against a system BLAS (docs/spec.md §3).
# (grep reads all of ldconfig's output: with -q it would exit early, ldconfig would die of
# SIGPIPE, and pipefail would report OpenBLAS missing at random)
_crmn_ensure_openblas() {
  if ! { ldconfig -p 2>/dev/null || true; } | grep 'libopenblas\.so' >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "ensure_env: installing OpenBLAS (libopenblas-dev) for Theano" >&2
      (apt-get -o DPkg::Lock::Timeout=300 install -y -qq libopenblas-dev >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get -o DPkg::Lock::Timeout=300 install -y -qq libopenblas-dev >/dev/null 2>&1; }) \
        || echo "ensure_env: could not install libopenblas-dev; the Theano backend will refuse to run" >&2
    else
      echo "ensure_env: no OpenBLAS found; install libopenblas-dev (Debian) or set THEANO_FLAGS=blas__ldflags=..." >&2
    fi
  fi
}

# theano-pymc 1.1.2 and Lasagne 0.1 as wheels in $CRMN_WHEELS, built once with Python 3.11
# (theano-pymc's source archive does not build on 3.12; both are pure Python)
_crmn_ensure_wheels() {
  if compgen -G "$CRMN_WHEELS/theano_pymc-1.1.2-*.whl" >/dev/null \
      && compgen -G "$CRMN_WHEELS/[Ll]asagne-0.1-*.whl" >/dev/null; then
    return 0
  fi
  local py311=""
  if [ -x "$CRMN_ROOT/.venv/bin/python" ]; then
    py311="$CRMN_ROOT/.venv/bin/python"
  else
    py311="$(_crmn_find_python python3.11)" \
      || _crmn_die "building the theano-pymc and Lasagne wheels needs python3.11 (not found); install CPython 3.11"
  fi
  echo "ensure_env: building the theano-pymc 1.1.2 and Lasagne 0.1 wheels into $CRMN_WHEELS with $py311" >&2
  mkdir -p "$CRMN_WHEELS"
  "$py311" -m pip wheel -q --disable-pip-version-check --no-deps -w "$CRMN_WHEELS" \
      theano-pymc==1.1.2 Lasagne==0.1 \
    || _crmn_die "pip could not build the theano-pymc and Lasagne wheels with $py311"
}

# $1 venv folder, $2 interpreter that creates it, $3 requirements file, $4.. extra pip options
_crmn_ensure_venv() {
  local venv="$1" base="$2" req="$3"
  shift 3
  if [ ! -x "$venv/bin/python" ]; then
    echo "ensure_env: creating $venv with $base" >&2
    "$base" -m venv "$venv" || _crmn_die "could not create the virtual environment $venv; check the disk, delete $venv and run again"
  fi
  local want stamp
  want="$(sha256sum "$req" | cut -d' ' -f1)"
  stamp="$venv/.requirements.sha256"
  if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "ensure_env: installing $(basename "$req") into $venv" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" -r "$req" \
      || _crmn_die "pip could not install $(basename "$req") into $venv"
    echo "$want" >"$stamp"
  fi
}

if [ -n "${CRMN_PYTHON:-}" ]; then
  # "as it is": no venv, no install, no system packages
  [ -x "$CRMN_PYTHON" ] || CRMN_PYTHON="$(command -v "$CRMN_PYTHON" || true)"
  [ -n "$CRMN_PYTHON" ] && [ -x "$CRMN_PYTHON" ] \
    || _crmn_die "CRMN_PYTHON is not an executable Python interpreter; point it at a python binary"
  "$CRMN_PYTHON" "$CRMN_ROOT/scripts/check_python.py" ${CRMN_NEEDS:-} || exit 1
  CRMN_PY="$CRMN_PYTHON"
else
  case "${CRMN_PROFILE:-pinned}" in
    pinned)
      _crmn_ensure_openblas
      CRMN_VENV="${CRMN_VENV:-$CRMN_ROOT/.venv}"
      _base=""
      if [ ! -x "$CRMN_VENV/bin/python" ]; then
        _base="$(_crmn_find_python python3.11)" \
          || _crmn_die "python3.11 not found on PATH (the archive's environment needs CPython 3.11); install it, or set CRMN_PYTHON"
      fi
      _crmn_ensure_venv "$CRMN_VENV" "$_base" "$CRMN_ROOT/requirements.txt"
      ;;
    current)
      CRMN_VENV="${CRMN_VENV:-$CRMN_ROOT/.venv-current}"
      _base=""
      if [ ! -x "$CRMN_VENV/bin/python" ]; then
        _base="$(_crmn_find_python python3.12)" \
          || _crmn_die "python3.12 not found (PATH or pyenv): CRMN_PROFILE=current needs CPython 3.12; install it, or use the pinned profile"
      fi
      _want="$(sha256sum "$CRMN_ROOT/requirements-current.txt" | cut -d' ' -f1)"
      if [ "$(cat "$CRMN_VENV/.requirements.sha256" 2>/dev/null || true)" != "$_want" ]; then
        _crmn_ensure_wheels
      fi
      # pip takes a wheel before a source archive of the same version; --only-binary makes
      # sure theano-pymc and Lasagne never come from their sources
      _crmn_ensure_venv "$CRMN_VENV" "$_base" "$CRMN_ROOT/requirements-current.txt" \
        --find-links "$CRMN_WHEELS" --only-binary theano-pymc,lasagne
      ;;
    *)
      _crmn_die "CRMN_PROFILE=${CRMN_PROFILE} is not an environment: choose pinned (the default) or current"
      ;;
  esac
  CRMN_PY="$CRMN_VENV/bin/python"
fi
export CRMN_PY
