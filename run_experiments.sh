#!/usr/bin/env bash
# The one entry point for experiments (SPEC §1): creates .venv if missing, then runs the CLI.
#   bash run_experiments.sh params | table1 | table2 | table3 | svhn | compare DIR | smoke
#   bash run_experiments.sh verify | bench | test       (see --help of each)
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_env.sh
exec "$CRMN_PY" -m crmn.cli "$@"
