#!/usr/bin/env bash
# The demo command of the README: environment from scratch, then a federated FC-MoE fine-tuning of a
# tiny Mixtral-style MoE on the bundled non-IID synthetic domains (4 clients, 3 rounds, CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
hf-fcmoe simulate --config "${1:-recipes/tiny/fcmoe.yaml}" --overwrite_output_dir true "${@:2}"
