#!/usr/bin/env bash
# The whole test suite: creates .venv if missing, installs the pins, runs pytest.
# Extra arguments go to pytest (e.g. `bash tests/run.sh -k schedule`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_env.sh
exec "$CRMN_PY" -m pytest tests "$@"
