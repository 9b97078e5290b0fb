#!/bin/bash
# SCD round 9 (issue 19): two calibrations that the round-8 pairs left open, each followed by
# `scd eval` (8 wiki-es chunks, every baseline) and, for Gemma, 16 paired held-out chunks.
#   bash benchmarks/results/scd9.sh gemma     # gemma3-270m -> gemma3-270m-wiki with DISTILL
#                                             # distillation steps (round 8 had none)
#   bash benchmarks/results/scd9.sh lowrank   # smollm2-135m -> smollm2-135m-wiki at code
#                                             # budget 0.6, so codes fit 0.25 of raw FP16 bytes
# DISTILL / CHUNKS override the distillation steps / chunks; EVAL=0 skips `scd eval`.
# THREADS (default 1) lets the two run side by side on 2 cores. Artifacts and logs outside the
# repo; the same-model controls are round 8's (scd8.sh).
cd /work/main
set -ex
R=benchmarks/results; S=".venv/bin/spectrumkv scd"; T=wiki-es; TH=${THREADS:-1}
case "$1" in
gemma)
  A=gemma3-270m; B=gemma3-270m-wiki; ART=/work/scd-gemma9-artifacts; NAME=scd9-gemma
  # 96 chunks of 1024 tokens: the calib split holds 98,758 tokens of Gemma's tokenizer
  CAL="--code-budget 1.0 --distill-steps ${DISTILL:-480} --distill-chunks ${CHUNKS:-96}"
  CONTROL=/work/scd-gemma-artifacts/control ;;
lowrank)
  A=smollm2-135m; B=smollm2-135m-wiki; ART=/work/scd9-artifacts; NAME=scd9-lowrank
  CAL="--code-budget 0.6 --distill-steps ${DISTILL:-840} --distill-chunks 120"
  CONTROL=/work/scd8-artifacts/control ;;
*) echo "usage: scd9.sh gemma|lowrank"; exit 2 ;;
esac
mkdir -p $ART/logs
$S calibrate --producer $A --consumer $B --corpus $T --prompts 16 $CAL --distill-lr 3e-5 \
  --out $ART/main --threads $TH > $ART/logs/cal-main.log 2>&1
if [ "$1" = gemma ]; then
  SCD_A=$A SCD_B=$B .venv/bin/python $R/scd-shrink-heldout.py $TH 16 $R/$NAME-heldout.json \
    $ART/main /work/scd-gemma-artifacts/main > $ART/logs/heldout.log 2>&1
fi
[ "${EVAL:-1}" = 1 ] && $S eval --producer $A --consumer $B --artifact $ART/main --control $CONTROL --corpus $T \
  --chunks 8 --timing-tokens 0 --json $R/$NAME-eval.json --plots $R/$NAME --threads $TH \
  > $ART/logs/eval.log 2>&1
echo done
