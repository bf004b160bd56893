#!/usr/bin/env bash
# The whole test suite: creates .venv if missing, installs the pins, runs pytest.
# Extra arguments go to pytest (e.g. `bash tests/run.sh -k schedule`, or a file of tests/).
# CRMN_PROFILE=current or CRMN_PYTHON=... choose the environment (scripts/ensure_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
CRMN_NEEDS="${CRMN_NEEDS:-pytest}"
source scripts/ensure_env.sh
# no path given: pytest.ini's testpaths (tests/); a file given: that file alone
exec "$CRMN_PY" -m pytest "$@"
