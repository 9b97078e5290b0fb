#!/bin/bash
# SCD round 15 (issue 19): patch layers admitted only on a dev gain the chunks resolve (a paired
# one-sided 95 % t bound over 6 dev chunks, metrics.resolved_gain). The round-14 pairs (B under
# RoPE base 3e3, the alias, and 1e4) are re-calibrated with 160 distillation steps over 40
# chunks, then `scd eval` on the same 24 held-out wiki-es chunks as round 14.
# Artifacts and logs outside the repo.
#   bash benchmarks/results/scd15.sh
# -> scd15-rope3k-eval.json, scd15-rope1e4-eval.json, and plots.
cd /work/main
set -ex
A=smollm2-135m; T=wiki-es; R=benchmarks/results; TH=${THREADS:-2}; S=".venv/bin/spectrumkv scd"
run() {  # B ART NAME (skipped when its eval record exists)
  [ -f $R/$3-eval.json ] && return
  mkdir -p $2/logs
  [ -f $2/main/manifest.json ] || /usr/bin/time -v $S calibrate --producer $A --consumer $1 \
    --corpus $T --prompts 16 --code-budget 1.0 --distill-steps 160 --distill-chunks 40 \
    --distill-lr 3e-5 --out $2/main --threads $TH > $2/logs/cal-main.log 2>&1
  $S eval --producer $A --consumer $1 --artifact $2/main --corpus $T --chunks 24 \
    --budgets 0.5,0.3,0.25 --quant-budgets 0.5,0.3,0.25 --timing-tokens 0 \
    --json $R/$3-eval.json --plots $R/$3 --threads $TH > $2/logs/eval.log 2>&1
}
run smollm2-135m-wiki /work/scd15r3k scd15-rope3k
run /work/ft-rope4 /work/scd15r4 scd15-rope1e4
echo done
