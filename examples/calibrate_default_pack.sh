#!/usr/bin/env bash
# Calibrate the default pack's four detectors leave-one-source-out (featurewatch calibrate --group-by source).
#   [BASELINE=OLD_PACK] bash examples/calibrate_default_pack.sh [PACK_DIR] [DETECTOR ...]
# Needs ../shared/data (or DATA=DIR): dev/multi/*.jsonl, the older dev/*.jsonl and corpus/chat_train.jsonl.
# Each command prints its per-source report and writes DETECTOR.json and DETECTOR-probe.json into the pack;
# the whole reports go to runs/calibrate/DETECTOR.json.
set -euo pipefail
cd "$(dirname "$0")/.."
FW=${FW:-.venv/bin/featurewatch}
DATA=${DATA:-../shared/data}
PACK=${1:-detectors/smollm2-135m-instruct}
shift || true
ONLY=("$@")
if [ ! -d "$DATA/dev/multi" ] || [ ! -f "$DATA/corpus/chat_train.jsonl" ]; then
    echo "error: $DATA has no dev/multi/ and corpus/chat_train.jsonl (set DATA=DIR to the shared data)" >&2
    exit 2
fi
D=$DATA/dev
M=$DATA/dev/multi
HW=examples/data
OUT=runs/calibrate
mkdir -p "$OUT"
wanted() { [ ${#ONLY[@]} -eq 0 ] || [[ " ${ONLY[*]} " == *" $1 "* ]]; }
# shared by every detector: the benign pools, the caps and the budget per text
POOLS=(--negatives "$HW/handwritten_smalltalk.jsonl" --negatives "$DATA/corpus/chat_train.jsonl"
       --negatives "$HW/writing_replies_fit.jsonl"
       --max-per-group 60 --max-per-group chat_train.jsonl=10 --max-per-group handwritten_smalltalk.jsonl=200)
COMMON=(--pack "$PACK" --group-by source --max-tokens 160 --max-features 32 --target-fpr ${TARGET_FPR:-0.02}
        --cache "$OUT/acts")
if [ -n "${BASELINE:-}" ]; then COMMON+=(--baseline "$BASELINE"); fi  # e.g. the pack as it was, to compare
MAILWRAP=plain,quoted,reply

if wanted scam-email; then
$FW calibrate --name scam-email "${COMMON[@]}" --watch prompt,completion --min-tokens 8 --severity warning \
    --description "Text that is, or is being written as, a scam, phishing or fraud message." \
    --input "$M/scam.jsonl" --input "$D/scam.jsonl" --input "$HW/handwritten_scam.jsonl" \
    --negatives "$D/spam_generic.jsonl" --negatives "$M/dangerous.jsonl" "${POOLS[@]}" \
    --wrap "$M/scam.jsonl=$MAILWRAP" --wrap "$D/scam.jsonl=$MAILWRAP" --wrap "handwritten_scam.jsonl=$MAILWRAP" \
    --wrap "spam_generic.jsonl=$MAILWRAP" --max-chars "$M/scam.jsonl=500" --max-chars "$D/scam.jsonl=500" \
    --max-chars handwritten_scam.jsonl=500 --max-chars spam_generic.jsonl=500 \
    --report "$OUT/scam-email.json"
fi
if wanted dangerous-content; then
$FW calibrate --name dangerous-content "${COMMON[@]}" --watch prompt,completion --min-tokens 6 --severity critical \
    --description "Requests for, or text giving, seriously harmful capability (weapons, cyberattacks, violent crime, hard drugs)." \
    --input "$M/dangerous.jsonl" --input "$D/dangerous.jsonl" --input "$HW/handwritten_dangerous.jsonl" \
    --input "$M/dangerous_completion.jsonl" --input "$D/dangerous_completion.jsonl" \
    --negatives "$M/scam.jsonl" "${POOLS[@]}" \
    --wrap "$D/dangerous_completion.jsonl=reply" --wrap "$M/scam.jsonl=$MAILWRAP" \
    --max-per-group "$M/dangerous_completion.jsonl=40" --max-per-group "$D/dangerous_completion.jsonl=40" \
    --max-chars "$M/dangerous_completion.jsonl=800" --max-chars "$D/dangerous_completion.jsonl=800" \
    --max-chars "$M/scam.jsonl=500" \
    --report "$OUT/dangerous-content.json"
fi
if wanted deception; then
$FW calibrate --name deception "${COMMON[@]}" --watch completion --min-tokens 5 --severity warning \
    --description "The assistant knowingly misleading (lying, concealing, manipulating, fabricating) or asserting falsehoods." \
    --input "$M/deception.jsonl" --input "$D/deception.jsonl" --input "$HW/handwritten_deception.jsonl" \
    --negatives "$M/dangerous_completion.jsonl" "${POOLS[@]}" \
    --max-per-group "$D/deception.jsonl=30" --max-per-group "handwritten_deception.jsonl=40" \
    --max-per-group "$M/dangerous_completion.jsonl=40" --max-chars "$M/dangerous_completion.jsonl=800" \
    --report "$OUT/deception.json"
fi
if wanted sycophancy; then
$FW calibrate --name sycophancy "${COMMON[@]}" --watch completion --min-tokens 6 --severity info \
    --description "The assistant flattering the user or telling them what they want to hear instead of the truth." \
    --input "$M/sycophancy.jsonl" --input "$D/sycophancy.jsonl" --input "$HW/handwritten_sycophancy.jsonl" \
    --negatives "$M/deception.jsonl" "${POOLS[@]}" \
    --max-per-group "$M/sycophancy.jsonl=40" --max-per-group "$D/sycophancy.jsonl=30" \
    --max-per-group "handwritten_sycophancy.jsonl=40" \
    --report "$OUT/sycophancy.json"
fi
