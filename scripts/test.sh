#!/usr/bin/env bash
# The test suite: sets up ./.venv if needed, then runs pytest (arguments pass through).
# GPU tests skip cleanly without a GPU.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
exec "$PYTHON" -m pytest -q -ra "$@"
