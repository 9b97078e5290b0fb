#!/bin/bash
# SCD measurement on the built-in pair (issue 19): smollm2-135m (A) -> smollm2-135m-wiki (B, a
# full fine-tune on the Spanish Wikipedia summaries, cached by recipe digest). Pair health on B's
# domain (wiki-es) and on general English text (wiki), calibrations (main + same-model control)
# on wiki-es, eval on held-out wiki-es chunks, report. Artifacts and logs outside the repo.
# CHUNKS: held-out eval chunks (default 8). BUDGET: reuse-code budget (default 1.0: full-rank
# maps; the quantized codes reach 0.5). The pair checks are skipped when their JSON exists.
# Calibration shrinks every decoder toward A's own K/V (alpha per K/V and layer group, chosen by
# dev KL; alpha 0 = raw reuse through the codes). Results: scd-shrink-*; then a paired held-out
# check of raw reuse vs the artifact on 16 chunks (scd-shrink-heldout.py) and the 4K timing.
cd /work/main
set -ex
A=smollm2-135m; B=smollm2-135m-wiki; T=wiki-es; BUDGET=${BUDGET:-1.0}
ART=/work/scd-artifacts4; LOG=/work/scd-logs4; R=benchmarks/results; CHUNKS=${CHUNKS:-8}
S=".venv/bin/spectrumkv scd"
mkdir -p $ART $LOG
$S finetune --threads 2 > $LOG/ft.log 2>&1
$S calibrate --producer $A --consumer $B --corpus $T --prompts 16 --code-budget $BUDGET \
  --out $ART/main --threads 1 > $LOG/cal-main.log 2>&1 &
P1=$!
$S calibrate --producer $B --consumer $B --corpus $T --prompts 16 --code-budget $BUDGET \
  --max-patches 0 --out $ART/control --threads 1 > $LOG/cal-control.log 2>&1 &
P2=$!
[ -s $R/scd-pair.json ] || $S pair --producer $A --consumer $B --corpus $T --chunks 10 \
  --threads 1 > $R/scd-pair.json 2> $LOG/pair.log
[ -s $R/scd-pair-general.json ] || $S pair --producer $A --consumer $B --corpus wiki \
  --chunks 10 --threads 1 > $R/scd-pair-general.json 2> $LOG/pair-general.log
wait $P1 $P2
$S eval --producer $A --consumer $B --artifact $ART/main --control $ART/control --corpus $T \
  --chunks $CHUNKS --timing-tokens 4096 --json $R/scd-shrink-eval.json --plots $R/scd-shrink \
  --threads 2 > $LOG/eval.log 2>&1
.venv/bin/python $R/scd-shrink-heldout.py 2 16 $R/scd-shrink-heldout.json $ART/main \
  > $LOG/heldout.log 2>&1
.venv/bin/spectrumkv demo --scd --producer $A --model $B --artifact $ART/main --corpus $T \
  --code-budget 0.45 --json $R/scd-shrink-demo-es.json > $LOG/demo-es.txt 2>&1
.venv/bin/spectrumkv report $R/scd-shrink-eval.json --out $LOG/report
echo done
