#!/usr/bin/env bash
# One call on a lent GPU machine: its own python3 has torch and jax (CUDA) but no network and
# no theano-pymc / Lasagne. Installs the two wheels carried in .whl/ into a temporary folder
# (removed at the end), puts it first on PYTHONPATH and runs
#   CRMN_PYTHON=python3 bash run_experiments.sh gpucheck --device cuda --budget 520 --out-dir DIR
# which prints gpucheck.md last (also after a signal cut the run short).
#
#   bash scripts/gpu_call.sh [more gpucheck options, e.g. --real DATA, --only speed, --quick]
#
# Environment (all optional): CRMN_GPU_PYTHON (else CRMN_PYTHON, else python3),
# CRMN_GPU_DEVICE (cuda), CRMN_GPU_BUDGET (520: a 10-minute call less the machine's start and
# this install),
# CRMN_GPU_OUT (runs/gpucheck), CRMN_WHEELS (.whl/; built by
# `CRMN_PROFILE=current bash scripts/ensure_env.sh`, see REPRODUCING.md §5).
# Exit code: gpucheck's (0, 1 a check failed, 3 / 130 cut short by a signal).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${CRMN_GPU_PYTHON:-${CRMN_PYTHON:-python3}}"
wheels="${CRMN_WHEELS:-$here/.whl}"
out="${CRMN_GPU_OUT:-$here/runs/gpucheck}"

die() { echo "gpu_call: $*" >&2; exit 1; }
command -v "$py" >/dev/null 2>&1 || die "CRMN_GPU_PYTHON=$py is not an executable Python: set CRMN_GPU_PYTHON to the machine's Python with torch and jax"
shopt -s nullglob
found=("$wheels"/theano_pymc-1.1.2-*.whl "$wheels"/[Ll]asagne-0.1-*.whl)
shopt -u nullglob
[ "${#found[@]}" = 2 ] || die "$wheels lacks the theano-pymc 1.1.2 and Lasagne 0.1 wheels \
(build them where there is a network: CRMN_PROFILE=current bash scripts/ensure_env.sh)"

site="$(mktemp -d "${TMPDIR:-/tmp}/crmn-wheels.XXXXXX")"
trap 'rm -rf "$site"' EXIT
if "$py" -m pip --version >/dev/null 2>&1; then
  "$py" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
      --no-compile --target "$site" "${found[@]}" \
    || die "pip could not install ${found[*]} into $site: rebuild .whl/ (CRMN_PROFILE=current bash scripts/ensure_env.sh) or free space in ${TMPDIR:-/tmp}"
else  # both are pure-Python wheels: installing one is unpacking it
  for w in "${found[@]}"; do
    "$py" -m zipfile -e "$w" "$site" || die "could not unpack $w into $site: rebuild .whl/ (CRMN_PROFILE=current bash scripts/ensure_env.sh) or free space in ${TMPDIR:-/tmp}"
  done
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
echo "gpu_call: theano-pymc and Lasagne from $site; gpucheck into $out"

# gpucheck runs in the background so that a TERM or INT sent to this script reaches it (it
# then writes its files with the cut-short mark and prints the table)
rc=0
CRMN_PYTHON="$py" bash "$here/run_experiments.sh" gpucheck \
    --device "${CRMN_GPU_DEVICE:-cuda}" --budget "${CRMN_GPU_BUDGET:-520}" --out-dir "$out" "$@" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true' TERM
trap 'kill -INT "$pid" 2>/dev/null || true' INT
while :; do
  wait "$pid" && rc=0 || rc=$?
  kill -0 "$pid" 2>/dev/null || break  # a trap ended the wait, not gpucheck: wait again
done
case "$rc" in
  0|1|3|130) ;;  # gpucheck printed its table last
  *) if [ -f "$out/gpucheck.md" ]; then echo; cat "$out/gpucheck.md"; else
       echo "gpu_call: gpucheck wrote no $out/gpucheck.md (exit $rc): its own lines above say why; fix that and run this script again" >&2
     fi ;;
esac
exit "$rc"
