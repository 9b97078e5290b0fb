#!/bin/bash
# SCD round 16 (issue 19): the Gemma-3 pair with B's 3 full-attention layers trained under RoPE
# base 1e3 (the alias gemma3-270m-wiki since then; raw reuse +31.8 %), calibrated as round 15
# calibrated SmolLM2 (160 distillation steps over 40 chunks, 6 dev chunks), then `scd eval` on 24
# held-out wiki-es chunks. Artifacts and logs outside the repo.
#   bash benchmarks/results/scd17.sh
# -> scd17-gemma-eval.json and its plots. Round 17 is this script with other settings (scd18.sh):
# ART (artifact root), RUN (artifact name), STEPS / CHUNKS (distillation), NAME (record prefix).
cd /work/main
set -ex
A=gemma3-270m; B=gemma3-270m-wiki; T=wiki-es; R=benchmarks/results; TH=${THREADS:-2}
S=".venv/bin/spectrumkv scd"; ART=${ART:-/work/scd17g}; RUN=${RUN:-main}
STEPS=${STEPS:-160}; CHUNKS=${CHUNKS:-40}; NAME=${NAME:-scd17-gemma}
mkdir -p $ART/logs
[ -f $ART/$RUN/manifest.json ] || /usr/bin/time -v $S calibrate --producer $A --consumer $B \
  --corpus $T --prompts 16 --code-budget 1.0 --distill-steps $STEPS --distill-chunks $CHUNKS \
  --distill-lr 3e-5 --out $ART/$RUN --threads $TH > $ART/logs/cal-$RUN.log 2>&1
$S eval --producer $A --consumer $B --artifact $ART/$RUN --corpus $T --chunks 24 \
  --budgets 0.5,0.3 --quant-budgets 0.5,0.25 --timing-tokens 0 \
  --json $R/$NAME-eval.json --plots $R/$NAME --threads $TH > $ART/logs/eval.log 2>&1
echo done
