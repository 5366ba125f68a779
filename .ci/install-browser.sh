#!/usr/bin/env bash
# Install Debian's headless Chromium and its chromedriver for the page's browser tests
# (tests/test_ui.py drives them over the WebDriver protocol; no selenium).
#
# Idempotent: does nothing when both binaries are already there.
set -euo pipefail

if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    echo "install-browser: chromium and chromedriver already installed"
    exit 0
fi

sudo=""
if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update
$sudo apt-get install -y --no-install-recommends chromium chromium-driver

for bin in chromium chromedriver; do
    if ! command -v "$bin" >/dev/null; then
        echo "install-browser: $bin is missing after install" >&2
        exit 1
    fi
done
chromedriver --version | head -1
