#!/bin/bash
# SCD round 20 (issue 19, session 27): calibration chooses the refresh (`--refresh-grid`) and
# distillation trains through it. One pair per run: fit under the grid's largest refresh, keep
# the cheapest candidate whose dev KL <= eps; then held-out KL at every candidate
# (scd26-refresh-heldout.py) and, with EVAL=1, the full `scd eval` on the 24 held-out chunks.
# Artifacts and logs outside the repo.
#   PAIR=smollm2 EVAL=1 bash benchmarks/results/scd27.sh
#   PAIR=gemma STEPS=320 WINDOWS=random bash benchmarks/results/scd27.sh
# -> scd27-$PAIR-heldout.json (and scd27-$PAIR-eval.json, -pareto.png, -layers.png).
# Round 21 (session 28) calibrates on prompts as long as the protocol's (PT, calibration prompt
# tokens; 512 before) and names its files scd28-*:
#   ROUND=scd28 PT=1024 STEPS=0 PAIR=gemma EVAL=1 ART=/work/scd28 bash benchmarks/results/scd27.sh
cd "$(dirname "$0")/../.." || exit 1
set -ex
R=benchmarks/results; S=".venv/bin/spectrumkv scd"; TH=${THREADS:-1}; T=wiki-es
ART=${ART:-/work/scd27}; PAIR=${PAIR:-smollm2}; NAME=${ROUND:-scd27}-$PAIR; PT=${PT:-512}
STEPS=${STEPS:-160}; CHUNKS=${CHUNKS:-40}; WINDOWS=${WINDOWS:-fixed}
if [ "$PAIR" = gemma ]; then
  A=gemma3-270m; B=gemma3-270m-wiki; FIT=16:256; GRID=0:0,16:0,16:64,16:128,16:256
else
  A=smollm2-135m; B=smollm2-135m-wiki; FIT=16:128; GRID=0:0,16:0,16:32,16:64,16:128
fi
mkdir -p $ART/logs
[ -f $ART/$PAIR/manifest.json ] || /usr/bin/time -v $S calibrate --producer $A --consumer $B \
  --corpus $T --prompts 16 --prompt-tokens $PT --code-budget 1.0 --distill-steps $STEPS \
  --distill-chunks $CHUNKS --distill-windows $WINDOWS --distill-lr 3e-5 \
  --head-tokens ${FIT%:*} --tail-tokens ${FIT#*:} \
  --refresh-grid $GRID --out $ART/$PAIR --threads $TH > $ART/logs/cal-$PAIR.log 2>&1
THREADS=$TH .venv/bin/python $R/scd26-refresh-heldout.py $ART/$PAIR $R/$NAME-heldout.json $A $B \
  > $ART/logs/heldout-$PAIR.log 2>&1
[ "${EVAL:-0}" = 1 ] && $S eval --producer $A --consumer $B --artifact $ART/$PAIR --corpus $T \
  --chunks 24 --budgets 0.5,0.3 --quant-budgets 0.5,0.25 --refreshes ${REFRESHES:-16:128} \
  --timing-tokens 0 --json $R/$NAME-eval.json --plots $R/$NAME --threads $TH \
  > $ART/logs/eval-$PAIR.log 2>&1
echo done
