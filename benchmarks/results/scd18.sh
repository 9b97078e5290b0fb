#!/bin/bash
# SCD round 17 (issue 19, session 18): the Gemma-3 pair of round 16 (gemma3-270m ->
# gemma3-270m-wiki, raw reuse +31.8 %) calibrated with every 1,024-token chunk of the calib split
# for distillation (96, was 40) and 4 passes over them (384 steps, was 160): does more
# distillation data close the train/dev KL gap (0.024 vs 0.047 in round 16)? The training
# chunks' oracle log-probs are float16 since this round (96 x 67 MB). Then `scd eval` on the 24
# held-out wiki-es chunks of round 16. Artifacts and logs outside the repo.
#   bash benchmarks/results/scd18.sh
# -> scd18-gemma-eval.json and its plots.
cd /work/main
set -ex
A=gemma3-270m; B=gemma3-270m-wiki; T=wiki-es; R=benchmarks/results; TH=${THREADS:-2}
S=".venv/bin/spectrumkv scd"; ART=/work/scd18g
mkdir -p $ART/logs
[ -f $ART/long/manifest.json ] || /usr/bin/time -v $S calibrate --producer $A --consumer $B \
  --corpus $T --prompts 16 --code-budget 1.0 --distill-steps 384 --distill-chunks 96 \
  --distill-lr 3e-5 --out $ART/long --threads $TH > $ART/logs/cal-long.log 2>&1
$S eval --producer $A --consumer $B --artifact $ART/long --corpus $T --chunks 24 \
  --budgets 0.5,0.3 --quant-budgets 0.5,0.25 --timing-tokens 0 \
  --json $R/scd18-gemma-eval.json --plots $R/scd18-gemma --threads $TH > $ART/logs/eval.log 2>&1
echo done
