#!/bin/bash
# SCD measurement of one model pair (issue 19), after the built-in recipes moved to 512-token
# fine-tune windows: pair health on B's domain (wiki-es) and on English, the calibration of the
# best earlier settings (DISTILL distillation steps over 120 chunks, patch floor), a same-model
# control (B -> B, full rank), 16 paired held-out chunks against raw reuse, and `scd eval` with
# every baseline and the 4K rebuild timing. Artifacts and logs outside the repo.
#   bash benchmarks/results/scd8.sh                      # smollm2-135m -> smollm2-135m-wiki
#   A=gemma3-270m B=gemma3-270m-wiki NAME=scd-gemma DISTILL=0 bash benchmarks/results/scd8.sh
cd /work/main
set -ex
A=${A:-smollm2-135m}; B=${B:-smollm2-135m-wiki}; NAME=${NAME:-scd8}; DISTILL=${DISTILL:-840}
T=wiki-es; ART=${ART:-/work/$NAME-artifacts}; LOG=$ART/logs; R=benchmarks/results
S=".venv/bin/spectrumkv scd"
mkdir -p $ART $LOG
# B is fine-tuned on first use (the alias), then cached
$S pair --producer $A --consumer $B --corpus $T --chunks 10 --threads 2 > $R/$NAME-pair.json \
  2> $LOG/pair.log
$S pair --producer $A --consumer $B --corpus wiki --chunks 10 --threads 2 \
  > $R/$NAME-pair-general.json 2> $LOG/pair-general.log
$S calibrate --producer $A --consumer $B --corpus $T --prompts 16 --code-budget 1.0 \
  --distill-steps $DISTILL --distill-chunks 120 --distill-lr 3e-5 --out $ART/main --threads 2 \
  > $LOG/cal-main.log 2>&1
$S calibrate --producer $B --consumer $B --corpus $T --prompts 16 --code-budget 1.0 \
  --max-patches 0 --out $ART/control --threads 2 > $LOG/cal-control.log 2>&1
SCD_A=$A SCD_B=$B .venv/bin/python $R/scd-shrink-heldout.py 2 16 $R/$NAME-heldout.json \
  $ART/main > $LOG/heldout.log 2>&1
$S eval --producer $A --consumer $B --artifact $ART/main --control $ART/control --corpus $T \
  --chunks 8 --timing-tokens 4096 --json $R/$NAME-eval.json --plots $R/$NAME \
  --threads 2 > $LOG/eval.log 2>&1
echo done
