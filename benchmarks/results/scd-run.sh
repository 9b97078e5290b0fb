#!/bin/bash
# SCD measurement on the default pair: calibrations (main + same-model control) then eval.
cd /work/main
set -x
A=smollm2-135m; B=smollm2-135m-wiki; ART=/work/scd-artifacts
mkdir -p $ART
.venv/bin/spectrumkv scd calibrate --producer $A --consumer $B --out $ART/main --threads 1 > /work/scd-logs/cal-main.log 2>&1 &
P1=$!
.venv/bin/spectrumkv scd calibrate --producer $B --consumer $B --max-patches 0 --out $ART/control --threads 1 > /work/scd-logs/cal-control.log 2>&1 &
P2=$!
wait $P1 $P2
.venv/bin/spectrumkv scd eval --producer $A --consumer $B --artifact $ART/main --control $ART/control \
  --chunks 6 --json benchmarks/results/scd-eval.json --plots benchmarks/results/scd --threads 2 > /work/scd-logs/eval.log 2>&1
echo done
