#!/usr/bin/env bash
# Install the real Prometheus, promtool, Alertmanager and amtool that the
# observability tests run against (tests/test_ops_files.py,
# tests/test_prometheus_e2e.py).
#
# Idempotent: does nothing when the binaries are already there. The tests
# start the binaries directly on 127.0.0.1 with temp dirs, so the Debian
# services are kept from starting (policy-rc.d exit 101 = "action forbidden")
# and stopped if a previous install started them.
set -euo pipefail

need=(/usr/bin/prometheus /usr/bin/promtool /usr/bin/prometheus-alertmanager /usr/bin/amtool)
missing=0
for bin in "${need[@]}"; do
    [[ -x "$bin" ]] || missing=1
done
if [[ $missing -eq 0 ]]; then
    echo "install-servers: prometheus, promtool, prometheus-alertmanager and amtool already installed"
    exit 0
fi

sudo=""
if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi

# Keep apt's maintainer scripts from starting the daemons (we run our own).
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod +x "$policy"
    created_policy=1
fi
cleanup() { if [[ $created_policy -eq 1 ]]; then $sudo rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update
$sudo apt-get install -y --no-install-recommends prometheus prometheus-alertmanager

for bin in "${need[@]}"; do
    if [[ ! -x "$bin" ]]; then
        echo "install-servers: $bin is missing after install" >&2
        exit 1
    fi
done
promtool --version 2>&1 | head -1
prometheus-alertmanager --version 2>&1 | head -1
