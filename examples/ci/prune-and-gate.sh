#!/usr/bin/env bash
# A CI job for a model: prune it, fine-tune what is left, write the explain report (an artifact),
# then gate on the metric and on the latency. The build fails when a gate fails; the script reads
# only exit codes and --json files, never the human output.
#
#   examples/ci/prune-and-gate.sh MODEL TRAIN VAL OUT_DIR
#
# Settings (environment): PCT (90), EPOCHS (5), MAX_DROP (0.01: the metric may fall at most this
# far below the original's), MAX_LATENCY_MS (50: batch 1, as written), EXPLAINFIX (explainfix).
set -uo pipefail
MODEL=$1 TRAIN=$2 VAL=$3 OUT=$4
PCT=${PCT:-90} EPOCHS=${EPOCHS:-5} MAX_DROP=${MAX_DROP:-0.01} MAX_LATENCY_MS=${MAX_LATENCY_MS:-50}
EXPLAINFIX=${EXPLAINFIX:-explainfix}
mkdir -p "$OUT"

# the steps that make the model: any failure here is a failure of the job (exit 1 or 2)
"$EXPLAINFIX" prune "$MODEL" --data "$VAL" --pct "$PCT" --out "$OUT/pruned.safetensors" --force --json > "$OUT/prune.json" || exit
"$EXPLAINFIX" finetune "$OUT/pruned.safetensors" --data "$TRAIN" --val "$VAL" --teacher "$MODEL" --epochs "$EPOCHS" \
    --out "$OUT/model.safetensors" --force --json > "$OUT/finetune.json" || exit
"$EXPLAINFIX" explain "$OUT/model.safetensors" --data "$VAL" --out "$OUT/report" --force --json > "$OUT/explain.json" || exit

# the gates: exit 1 means "not met"; run both, so the job log shows every verdict (each command prints
# one line per gate on stderr, met or not)
failed=0
"$EXPLAINFIX" evaluate "$OUT/model.safetensors" --data "$VAL" --vs "$MODEL" --max-drop "$MAX_DROP" --json > "$OUT/evaluate.json"
status=$?; [ $status -eq 1 ] && failed=1; [ $status -gt 1 ] && exit $status
"$EXPLAINFIX" bench "$OUT/model.safetensors" --vs "$MODEL" --max-latency-ms "$MAX_LATENCY_MS" --repeats 10 --json > "$OUT/bench.json"
status=$?; [ $status -eq 1 ] && failed=1; [ $status -gt 1 ] && exit $status
exit $failed
