#!/usr/bin/env bash
# Regenerate constraints.txt (the lock file scripts/setup_env.sh installs with) from a venv that passed the tests:
#   bash scripts/lock.sh [path/to/venv]        (default: .venv)
# torch (installed first, per platform: CPU or CUDA wheel), its nvidia-*/triton wheels and hf_fcmoe itself are
# left out: the lock pins everything else at the exact versions CI passed with.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
{
  echo "# Exact versions CI passed with; regenerate with: bash scripts/lock.sh [venv]"
  echo "# Installed by scripts/setup_env.sh as pip -c constraints.txt; HF_FCMOE_LATEST=1 skips it."
  "$VENV/bin/python" -m pip freeze --exclude-editable --all \
    | grep -viE '^(torch|triton|nvidia-[a-z0-9_-]+|hf[-_]fcmoe|pip|setuptools|wheel)(==| @)' \
    | LC_ALL=C sort -f
} > constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins from $VENV)"
