#!/usr/bin/env bash
# The issue's GPU targets, for a machine with one CUDA GPU and `pip install -e ".[cuda12,test]"`
# (torch must then be a CUDA build for the torch comparison). Not run yet: no GPU was lent.
# Results go to results/bench/gpu_*.json; BENCHMARKS.md says which target each one answers.
set -euo pipefail
cd "$(dirname "$0")/../.."
P=${PYTHON:-python}
mkdir -p results/bench
# >= 40 % MFU: Llama-3.2-1B-shaped random bf16 base, LoRA r8 q,k,v,o, B 16, T 512 (bf16 matmul peak measured in the run)
$P experiments/bench/bench_flops.py --model 1b --dtype bfloat16 --batch 16 --seq 512 --mm 8192 --mem-clients 1 2 \
    --mem-batch 16 --mem-seq 512 --json results/bench/gpu_flops.json
# client-mapped round >= 5x the loop at C = 128 with the smallest model (auto groups: 65k tokens on accelerators)
$P experiments/bench/bench_clients.py --clients 8 32 128 --batch 4 4 2 --seq 64 64 32 --json results/bench/gpu_clients.json
# >= 3x the lean PyTorch + PEFT loop on the same GPU
$P experiments/bench/bench_torch_peers.py --device cuda --json results/bench/gpu_torch.json
# clustering >= 20x scikit-learn on the host CPU
$P experiments/bench/bench_clustering.py --json results/bench/gpu_clustering.json
$P experiments/bench/bench_scale.py --clients 8 32 128 512 2048 --json results/bench/gpu_scale.json
