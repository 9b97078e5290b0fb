#!/bin/bash
# SCD measurement on the default pair: fine-tune (cached), pair health check, calibrations
# (main + same-model control), then eval. Artifacts and logs outside the repo.
cd /work/main
set -x
A=smollm2-135m; B=smollm2-135m-wiki; ART=/work/scd-artifacts2; LOG=/work/scd-logs
mkdir -p $ART $LOG
.venv/bin/spectrumkv scd finetune --threads 2 > $LOG/ft.log 2>&1
.venv/bin/spectrumkv scd pair --producer $A --consumer $B --chunks 6 --threads 2 \
  > benchmarks/results/scd-pair.json 2> $LOG/pair.log
.venv/bin/spectrumkv scd calibrate --producer $A --consumer $B --out $ART/main --threads 1 > $LOG/cal-main.log 2>&1 &
P1=$!
.venv/bin/spectrumkv scd calibrate --producer $B --consumer $B --max-patches 0 --out $ART/control --threads 1 > $LOG/cal-control.log 2>&1 &
P2=$!
wait $P1 $P2
.venv/bin/spectrumkv scd eval --producer $A --consumer $B --artifact $ART/main --control $ART/control \
  --chunks 6 --json benchmarks/results/scd-eval.json --plots benchmarks/results/scd --threads 2 > $LOG/eval.log 2>&1
echo done
