#!/bin/bash
# SCD round 14 (issue 19): the pair's B fine-tuned under another RoPE base frequency (SmolLM2's own
# is 1e5), as MistralLite was made from Mistral-7B. For each base (1e4, then 3e3, the alias
# smollm2-135m-wiki since this round): B is fine-tuned (the default recipe plus --rope-theta),
# the pair's raw reuse measured on 24 held-out wiki-es chunks, A -> B calibrated at full rank with
# distillation (840 steps over 120 chunks for 1e4, 160 over 40 for 3e3), then `scd eval` on the
# same 24 chunks with every baseline. The default pair (base 1e5) is measured on the same chunks.
# Artifacts and logs outside the repo.
#   bash benchmarks/results/scd14.sh
# -> scd14-pair-default.json, scd14-pair.json + scd14-eval.json (1e4),
#    scd14-pair-rope3k.json + scd14-rope3k-eval.json (3e3), and plots.
cd /work/main
set -ex
A=smollm2-135m; T=wiki-es; R=benchmarks/results; TH=${THREADS:-2}; S=".venv/bin/spectrumkv scd"
B0=$($S finetune --base $A --threads $TH | tail -1)  # the default recipe (the alias until this round)
$S pair --producer $A --consumer $B0 --corpus $T --chunks 24 --threads $TH > $R/scd14-pair-default.json
run() {  # THETA B ART NAME PAIR_JSON STEPS CHUNKS
  mkdir -p $3/logs
  [ -f $2/.complete ] || $S finetune --base $A --rope-theta $1 --out $2 --threads $TH
  $S pair --producer $A --consumer $2 --corpus $T --chunks 24 --threads $TH > $R/$5
  [ -f $3/main/manifest.json ] || $S calibrate --producer $A --consumer $2 --corpus $T \
    --prompts 16 --code-budget 1.0 --distill-steps $6 --distill-chunks $7 --distill-lr 3e-5 \
    --out $3/main --threads $TH > $3/logs/cal-main.log 2>&1
  $S eval --producer $A --consumer $2 --artifact $3/main --corpus $T --chunks 24 \
    --budgets 0.5,0.3,0.25 --quant-budgets 0.5,0.3,0.25 --timing-tokens 0 \
    --json $R/$4-eval.json --plots $R/$4 --threads $TH > $3/logs/eval.log 2>&1
}
run 10000 /work/ft-rope4 /work/scd14r scd14 scd14-pair.json 840 120
run 3000 /work/ft-rope3k /work/scd14r3k scd14-rope3k scd14-pair-rope3k.json 160 40
echo done
