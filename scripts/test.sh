#!/usr/bin/env bash
# The test command of the README: environment (set up once; later calls skip it), lint, then the default
# (fast) test run. HF_FCMOE_LATEST=1 bash scripts/test.sh: the same on the newest versions pyproject allows.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check hf_fcmoe tests benchmarks
python -m pytest -q -p no:cacheprovider "$@"
