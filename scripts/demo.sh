#!/usr/bin/env bash
# The main job: sets up ./.venv if needed, then runs the jax_nvfp4 demo (arguments pass through).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec "$PYTHON" -m jax_nvfp4 demo "$@"
