#!/usr/bin/env bash
# The README's main job: FedRouter on the embedded default (All scenario, 8 clients), offline on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Transparent huge pages for malloc'd memory: XLA:CPU allocates each call's temporaries afresh, and
# with 4 KiB pages the kernel faults and zero-fills them page by page (BENCHMARKS.md: 6% per step).
export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1"
exec .venv/bin/fedrouter-jax run --config configs/default.yaml "$@"
