#!/usr/bin/env bash
# Set up everything the tests need (venv, model, Prometheus + Alertmanager) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
bash .ci/install-servers.sh
bash .ci/setup-vllm.sh  # .venv-vllm for tests/test_vllm.py (vLLM in its own venv)
exec .venv/bin/python -m pytest "$@"
