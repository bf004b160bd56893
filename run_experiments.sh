#!/usr/bin/env bash
# The one entry point for experiments (SPEC §1): creates .venv if missing, then runs the CLI
# (CRMN_PROFILE=current or CRMN_PYTHON=... choose another environment: scripts/ensure_env.sh).
#   bash run_experiments.sh params | table1 | table2 | table3 | svhn | compare DIR | smoke
#   bash run_experiments.sh verify | bench | test       (see --help of each)
# Relative paths given as options are read from the directory it is called from; the
# defaults (data/, runs/) are the archive's own folders.
set -euo pipefail
CRMN_HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$CRMN_HERE/scripts/ensure_env.sh"
PYTHONPATH="$CRMN_HERE${PYTHONPATH:+:$PYTHONPATH}" exec "$CRMN_PY" -m crmn.cli "$@"
