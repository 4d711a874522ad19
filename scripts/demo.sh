#!/usr/bin/env bash
# The demo command of the README: environment (set up once; later calls skip it), then a federated FC-MoE
# fine-tuning of a tiny Mixtral-style MoE on the bundled non-IID synthetic domains (4 clients, CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
hf-fcmoe simulate --config "${1:-recipes/tiny/fcmoe.yaml}" --overwrite_output_dir true "${@:2}"
echo "hf-fcmoe and accelerate live in .venv/bin: run  . .venv/bin/activate  to use them in this shell"
