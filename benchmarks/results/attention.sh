#!/usr/bin/env bash
# Records the paged decode-attention results (issue 17) into benchmarks/results/attention*.
# Run from the repository root on a quiet machine: `bash benchmarks/results/attention.sh`.
# 1. calibrate the cost model on calibration seeds 0-1 (writes the machine profile);
# 2. bench every route and the anchors on held-out seeds 100-104 (a 256 MB ring of layers, 2
#    repetitions: sized to finish in ~20 min on the loaded 2-core VM; raise --ring-mb/--reps
#    on a quiet machine).
set -euo pipefail
R=benchmarks/results
SK=.venv/bin/spectrumkv
uptime | tee $R/attention-uptime.txt
[ "${SKIP_CALIBRATE:-0}" = 1 ] || $SK bench calibrate --ring-mb 512 --out $R/attention-profile.json | tee $R/attention-calibrate.txt
# SmolLM2-135M shape (3 KV / 9 query heads, d=64), bf16, 32-token pages (vLLM's CPU kernel needs
# multiples of 32), all traces, batch 1-32, every route + per-request SDPA + vLLM CPU
$SK bench attention --profile $R/attention-profile.json --ring-mb 256 --reps 2 \
    --json $R/attention-smollm2.json --plot $R/attention-smollm2.png | tee $R/attention-smollm2.txt
# 7B-class GQA shape (8 KV / 32 query heads, d=128), batch 8
$SK bench attention --profile $R/attention-profile.json --shapes 7b-gqa --traces bimodal,uniform --batches 8 \
    --ring-mb 256 --reps 2 --json $R/attention-7b.json --plot $R/attention-7b.png | tee $R/attention-7b.txt
# float16 (vLLM runs its `vec` kernel there, `amx` in bf16), batch 8
$SK bench attention --profile $R/attention-profile.json --dtype float16 --traces bimodal,uniform \
    --batches 8 --routes per-request,split,workqueue,adaptive,vllm --ring-mb 256 --reps 2 \
    --json $R/attention-fp16.json | tee $R/attention-fp16.txt
# our routes at 16-token pages (the default page size), batch 8
$SK bench attention --profile $R/attention-profile.json --page-sizes 16 --traces bimodal \
    --batches 8 --routes per-request,split,workqueue,adaptive --ring-mb 256 --reps 2 \
    --json $R/attention-p16.json | tee $R/attention-p16.txt
# the bandwidth-limit target (every request >= 8K tokens): bucketed trace, batch 4, kernel routes
$SK bench attention --profile $R/attention-profile.json --traces bucketed --batches 4 \
    --routes per-request,split,workqueue,adaptive --ring-mb 256 --reps 2 \
    --json $R/attention-limit.json | tee $R/attention-limit.txt
uptime | tee -a $R/attention-uptime.txt
