#!/usr/bin/env bash
# How the default pack (detectors/smollm2-135m-instruct) was built, end to end.
# Needs ../shared/data (public dev splits and the chat corpus; see its README).
# On 2 CPU cores: ~45 min for the SAE, ~25 min to extract activations for calibration.
set -euo pipefail
cd "$(dirname "$0")/.."
FW=.venv/bin/featurewatch
DATA=${DATA:-../shared/data}
PACK=detectors/smollm2-135m-instruct
HW=examples/data

# 1. the SAE: BatchTopK k=32, 4608 features, layer 15 residual, 1.2 M chat tokens
$FW train-sae --corpus "$DATA/corpus/chat_train.jsonl" --out runs/sae-l15 --hookpoint layers.15 \
    --tokens 1200000 --d-sae 4608 --k 32 --epochs 2
mkdir -p "$PACK/sae"
cp -r runs/sae-l15/sae/layers.15 "$PACK/sae/"
cp runs/sae-l15/features.json "$PACK/features.json"

# 2. extra negatives (ordinary chats and assistant replies; derived files under runs/calib)
.venv/bin/python examples/make_calibration_negatives.py "$DATA"

# 3. the detectors (each: an sae readout and a dense probe; threshold at 1% FPR on out-of-fold scores).
#    dangerous-content is fitted on all tokens of a record (almost all records are prompt-only)
#    and watches the prompt; scam-email is fitted on the prompt. Completion-phase use of these
#    two would need completion-phase data.
$FW calibrate --pack "$PACK" --name scam-email --phase prompt --severity warning \
    --description "Text that is, or is being written as, a scam, phishing or fraud message." \
    --input "$HW/handwritten_scam.jsonl" --input "$DATA/dev/scam.jsonl" \
    --input runs/calib/chat_negatives.jsonl --input runs/calib/alpaca_negatives.jsonl \
    --weight handwritten_scam.jsonl=8 --max-records 1300 --max-tokens 160
$FW calibrate --pack "$PACK" --name dangerous-content --phase all --watch prompt --severity critical \
    --description "Requests for, or text giving, seriously harmful capability (weapons, cyberattacks, violent crime, hard drugs)." \
    --input "$HW/handwritten_dangerous.jsonl" --input "$DATA/dev/dangerous.jsonl" \
    --weight handwritten_dangerous.jsonl=8 --max-tokens 256
$FW calibrate --pack "$PACK" --name sycophancy --phase completion --severity info \
    --description "The assistant flattering the user or telling them what they want to hear instead of the truth." \
    --input "$HW/handwritten_sycophancy.jsonl" --input "$DATA/dev/sycophancy.jsonl" \
    --input runs/calib/corpus_negatives.jsonl \
    --weight handwritten_sycophancy.jsonl=8 --min-tokens 24 --max-records 1400 --max-tokens 256
$FW calibrate --pack "$PACK" --name deception --phase completion --severity warning \
    --description "The assistant knowingly misleading (lying, concealing, manipulating, fabricating) or asserting falsehoods." \
    --input "$HW/handwritten_deception.jsonl" --input "$DATA/dev/deception.jsonl" \
    --input runs/calib/corpus_negatives.jsonl \
    --weight handwritten_deception.jsonl=8 --min-tokens 24 --max-tokens 256
