#!/bin/bash
# SCD round 10 (issue 19): codes below all-INT4 drop the least important tokens (wire.code_plan),
# so SCD reaches <= 0.25 of raw FP16 KV bytes at full rank. On a fresh machine: B is fine-tuned
# (the alias's default recipe), A -> B calibrated at full rank (DISTILL distillation steps over
# CHUNKS chunks; default 0 = none), then `scd eval` on 8 held-out wiki-es chunks with every
# baseline, raw-spectrum and scd-q at 0.5, 0.3 and 0.25 of the bytes. Artifacts and logs outside the repo.
#   bash benchmarks/results/scd10.sh
# -> scd10-eval.json and plots. scd10-g16-eval.json, scd10-g64-int4sinks-eval.json and
# scd10-sinks-eval.json are the same command at earlier commits (code group 16; group 64; FP16
# sinks), kept for RESULTS.md's table of what each change did.
cd /work/main
set -ex
A=smollm2-135m; B=smollm2-135m-wiki; T=wiki-es; R=benchmarks/results; NAME=scd10
ART=${ART:-/work/scd10-artifacts}; TH=${THREADS:-2}; S=".venv/bin/spectrumkv scd"
mkdir -p $ART/logs
[ -f $ART/main/manifest.json ] || $S calibrate --producer $A --consumer $B --corpus $T \
  --prompts 16 --code-budget 1.0 --distill-steps ${DISTILL:-0} --distill-chunks ${CHUNKS:-40} \
  --distill-lr 3e-5 --out $ART/main --threads $TH > $ART/logs/cal-main.log 2>&1
$S eval --producer $A --consumer $B --artifact $ART/main --corpus $T --chunks 8 \
  --budgets 0.5,0.3,0.25 --quant-budgets 0.5,0.3,0.25 --timing-tokens 0 \
  --json $R/$NAME-eval.json --plots $R/$NAME --threads $TH > $ART/logs/eval.log 2>&1
echo done
