#!/usr/bin/env bash
# Set up everything the tests need (venv, model, Prometheus + Alertmanager, headless Chromium, Phoenix), lint and
# type-check, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
bash .ci/install-servers.sh
bash .ci/install-browser.sh  # chromium + chromedriver for tests/test_ui.py
bash .ci/setup-vllm.sh  # .venv-vllm for tests/test_vllm.py (vLLM in its own venv)
bash .ci/setup-phoenix.sh  # .venv-phoenix: the OTLP receiver tests/test_otel.py exports to
echo "test: ruff" >&2
.venv/bin/python -m ruff check featurewatch tests benchmarks examples
echo "test: mypy" >&2
.venv/bin/python -m mypy featurewatch
exec .venv/bin/python -m pytest "$@"
