#!/usr/bin/env bash
# How the default pack (detectors/smollm2-135m-instruct) was built, end to end.
# Needs ../shared/data (public dev splits and the chat corpus; see its README).
# On 2 CPU cores: ~110 min to harvest 4 M tokens of activations, ~32 min to train, ~12 min to evaluate
# the SAE; ~40 min to extract activations for calibration, ~3 min to fit.
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

# 1. the SAE: BatchTopK k=32, 16384 features, layer-15 residual, 4 M tokens: 60 % safety mix (phishing,
#    legitimate and spam mail, red-team dialogues, manipulation, deception) so that the concepts the
#    detectors read are frequent enough to get features of their own; 40 % generic chat so ordinary
#    chat still reconstructs; half the documents inside chat turns, so features see both framings.
#    Harvest once to runs/sae16k/cache (fp16, resumable), then train from it.
$FW train-sae --corpus "$DATA/corpus/safety_mix.jsonl" --corpus "$DATA/corpus/chat_train.jsonl" --mix 0.6,0.4 \
    --wrap-documents 0.5 --out runs/sae16k --hookpoint layers.15 --tokens 4000000 --d-sae 16384 --k 32 --epochs 1
mkdir -p "$PACK/sae"
rm -rf "$PACK/sae/layers.15"
cp -r runs/sae16k/sae/layers.15 "$PACK/sae/"
cp runs/sae16k/features.json "$PACK/features.json"  # full top contexts; step 3 trims those no detector reads

# 2. the detectors, through the product's own calibrate: leave-one-source-out over every public source
#    (dev/multi's several sources per label, the older dev sets, our hand-written sets), benign pools as
#    --negatives; each detector's decision (SAE readout, dense probe, mean difference) chosen by its worst
#    left-out source; thresholds at 2 % FPR on the benign negatives of each phase. One forward pass per
#    prepared file, cached under runs/calibrate (about 25 min on 2 idle cores the first time).
bash examples/calibrate_default_pack.sh "$PACK"

# 3. the hand-written feature labels (examples/feature_labels.json, keyed by this SAE's fingerprint) into
#    features.json and every spec; every top context kept for the features a detector reads, two for the rest
.venv/bin/python examples/apply_labels.py "$PACK" --trim
