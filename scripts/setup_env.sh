#!/usr/bin/env bash
# Create .venv with everything hf_fcmoe needs. torch is installed first, on its own, so that the
# CPU wheel (torch==2.13.0, on local disk on the project machines) is used and no multi-GB CUDA
# build is pulled in by a dependency. Set HF_FCMOE_TORCH to pick another torch requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${HF_FCMOE_TORCH:-torch==2.13.0}"
fi
python -m pip install -q -e ".[${HF_FCMOE_EXTRAS:-test,data}]"
