#!/usr/bin/env bash
# How the default pack (detectors/smollm2-135m-instruct) was built, end to end.
# Needs ../shared/data (public dev splits and the chat corpus; see its README).
# On 2 CPU cores: ~45 min for the SAE, ~40 min to extract activations for calibration.
set -euo pipefail
cd "$(dirname "$0")/.."
FW=.venv/bin/featurewatch
DATA=${DATA:-../shared/data}
if [ ! -d "$DATA/dev" ] || [ ! -d "$DATA/corpus" ]; then
    echo "error: $DATA has no dev/ and corpus/ (set DATA=DIR to the shared data; see its README)" >&2
    exit 2
fi
PACK=detectors/smollm2-135m-instruct
HW=examples/data

# 1. the SAE: BatchTopK k=32, 4608 features, layer 15 residual, 1.2 M chat tokens
$FW train-sae --corpus "$DATA/corpus/chat_train.jsonl" --out runs/sae-l15 --hookpoint layers.15 \
    --tokens 1200000 --d-sae 4608 --k 32 --epochs 2
mkdir -p "$PACK/sae"
cp -r runs/sae-l15/sae/layers.15 "$PACK/sae/"
cp runs/sae-l15/features.json "$PACK/features.json"

# 2. the detectors: every labelled text in several wrappers (plain, quoted in a user message, the
#    assistant's reply to a neutral request, with and without a system prompt), one forward pass per
#    wrapped set (cached under runs/recal/acts), features chosen among those the wrapper and formatting
#    do not explain, per-phase thresholds set on each hard-negative group, a held-out report.
#    Writes the four specs, their -probe variants and runs/recal/report.json. ~40 min on 2 busy cores.
.venv/bin/python examples/recalibrate.py --data "$DATA"
