#!/bin/bash
# SCD round 14 (issue 19): the pair's B fine-tuned under another RoPE base frequency (1e4 instead of
# SmolLM2's 1e5), as MistralLite was made from Mistral-7B. B is fine-tuned (the default recipe
# plus --rope-theta 10000), the pair's raw reuse measured on 24 held-out wiki-es chunks, A -> B
# calibrated at full rank with 840 distillation steps over 120 chunks, then `scd eval` on the same
# 24 chunks with every baseline. Artifacts and logs outside the repo.
#   bash benchmarks/results/scd14.sh
# -> scd14-pair.json, scd14-pair-default.json (the default pair on the same chunks),
#    scd14-eval.json and plots.
cd /work/main
set -ex
A=smollm2-135m; T=wiki-es; R=benchmarks/results; NAME=scd14
ART=${ART:-/work/scd14r}; TH=${THREADS:-2}; S=".venv/bin/spectrumkv scd"
B=${B:-/work/ft-rope4}
mkdir -p $ART/logs
[ -f $B/.complete ] || $S finetune --base $A --rope-theta 10000 --out $B --threads $TH
$S pair --producer $A --consumer $B --corpus $T --chunks 24 --threads $TH > $R/$NAME-pair.json
$S pair --producer $A --consumer smollm2-135m-wiki --corpus $T --chunks 24 --threads $TH \
  > $R/$NAME-pair-default.json
[ -f $ART/main/manifest.json ] || $S calibrate --producer $A --consumer $B --corpus $T \
  --prompts 16 --code-budget 1.0 --distill-steps 840 --distill-chunks 120 --distill-lr 3e-5 \
  --out $ART/main --threads $TH > $ART/logs/cal-main.log 2>&1
$S eval --producer $A --consumer $B --artifact $ART/main --corpus $T --chunks 24 \
  --budgets 0.5,0.3,0.25 --quant-budgets 0.5,0.3,0.25 --timing-tokens 0 \
  --json $R/$NAME-eval.json --plots $R/$NAME --threads $TH > $ART/logs/eval.log 2>&1
echo done
