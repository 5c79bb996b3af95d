#!/usr/bin/env bash
# The README's test command: installs what it needs into ./.venv, then runs the default (fast) suite.
# Slow tests: scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
export JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# one worker per core, each test file on one worker (its module fixtures are built once)
exec .venv/bin/python -m pytest -q -n auto --dist loadfile --durations=15 "$@"
