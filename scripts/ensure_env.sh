#!/usr/bin/env bash
# Creates the project's virtual environment (.venv, Python 3.11) if it is missing, installs
# the pinned requirements when requirements.txt changed since the last install, and makes
# sure a system OpenBLAS is there for Theano. Sourced by run_experiments.sh and tests/run.sh;
# re-running costs a hash comparison when nothing changed.
#
# After sourcing: $CRMN_PY is the environment's python.
set -euo pipefail

CRMN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CRMN_VENV="${CRMN_VENV:-$CRMN_ROOT/.venv}"

_crmn_die() { echo "ensure_env: $*" >&2; exit 1; }

# Theano links the network's matrix products against a system BLAS (SPEC §3).
# (grep reads all of ldconfig's output: with -q it would exit early, ldconfig would die of
# SIGPIPE, and pipefail would report OpenBLAS missing at random)
if ! { ldconfig -p 2>/dev/null || true; } | grep 'libopenblas\.so' >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "ensure_env: installing OpenBLAS (libopenblas-dev) for Theano" >&2
    (apt-get install -y -qq libopenblas-dev >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libopenblas-dev >/dev/null 2>&1; }) \
      || echo "ensure_env: could not install libopenblas-dev; the Theano stack will refuse to run" >&2
  else
    echo "ensure_env: no OpenBLAS found; install libopenblas-dev (Debian) or set THEANO_FLAGS=blas__ldflags=..." >&2
  fi
fi

if [ ! -x "$CRMN_VENV/bin/python" ]; then
  PY311="$(command -v python3.11 || true)"
  [ -n "$PY311" ] || _crmn_die "python3.11 not found on PATH (the archive's environment needs CPython 3.11)"
  echo "ensure_env: creating $CRMN_VENV with $PY311" >&2
  "$PY311" -m venv "$CRMN_VENV" || _crmn_die "could not create the virtual environment $CRMN_VENV"
fi

_want="$(sha256sum "$CRMN_ROOT/requirements.txt" | cut -d' ' -f1)"
_stamp="$CRMN_VENV/.requirements.sha256"
if [ "$(cat "$_stamp" 2>/dev/null || true)" != "$_want" ]; then
  echo "ensure_env: installing pinned requirements into $CRMN_VENV" >&2
  "$CRMN_VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$CRMN_ROOT/requirements.txt" \
    || _crmn_die "pip could not install requirements.txt into $CRMN_VENV"
  echo "$_want" >"$_stamp"
fi

CRMN_PY="$CRMN_VENV/bin/python"
export CRMN_PY
