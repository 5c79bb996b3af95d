#!/usr/bin/env bash
# The README's test command: installs what it needs into ./.venv, then runs the default (fast) suite.
# Slow tests: scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
export JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest -q --durations=15 "$@"
