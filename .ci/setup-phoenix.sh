#!/usr/bin/env bash
# Set up .venv-phoenix: Arize Phoenix, the real OTLP receiver and trace viewer that
# tests/test_otel.py exports featurewatch's spans to (started on 127.0.0.1, read back through its
# REST API). Its own venv: Phoenix pins pandas, SQLAlchemy, grpcio, ... that featurewatch does not
# need. Idempotent; about 1.5 minutes and 0.9 GB the first time.
#   bash .ci/setup-phoenix.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-phoenix
PHOENIX_VERSION=20.26.1
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup-phoenix: creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('arize-phoenix') != '$PHOENIX_VERSION')" 2>/dev/null; then
  echo "setup-phoenix: installing arize-phoenix $PHOENIX_VERSION" >&2
  "$VENV/bin/python" -m pip --disable-pip-version-check -q install "arize-phoenix==$PHOENIX_VERSION"
fi
test -x "$VENV/bin/phoenix"
echo "setup-phoenix: phoenix $PHOENIX_VERSION ok" >&2
