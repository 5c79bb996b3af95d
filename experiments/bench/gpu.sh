#!/usr/bin/env bash
# Every GPU check and benchmark of the issue in one run of at most 10 minutes, into ONE JSON
# (results/bench/gpu.json; `--json PATH` to choose). For a machine with one CUDA GPU and
# `pip install -e ".[cuda12,test]"` (torch must be a CUDA build for the torch comparison).
# The steps and their time limits are in experiments/bench/bench_gpu.py; BENCHMARKS.md says
# which target each answers.
#   bash experiments/bench/gpu.sh             # on the GPU machine
#   bash experiments/bench/gpu.sh --dry-run   # on CPU: arguments parsed, checks at tiny shapes
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python}" experiments/bench/bench_gpu.py "$@"
