#!/usr/bin/env bash
# GPU check: a few real-size layers of Mixtral-8x7B and Qwen3-30B-A3B (random bf16 weights, the recipes' LoRA)
# through one client round; prints tokens/s and peak memory as a markdown table (paste into recipes/README.md).
# On a machine without a CUDA GPU it prints why it was skipped and exits 0.
#   scripts/gpu_check.sh [--layers 4] [--steps 10] [--batch 4] [--seq 512]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python}" benchmarks/gpu_client_round.py "$@"
