#!/usr/bin/env bash
# Records `spectrumkv bench decode` (issue 18 item 5) into benchmarks/results/decode_*.
# Run from the repository root on a quiet machine: `bash benchmarks/results/decode.sh`.
# Every engine behind its real server, streamed over the OpenAI endpoint (--via http):
# SpectrumKV's prefill + decode workers (--engine batched | sequential, 1 torch thread each),
# vLLM's CPU engine (one OpenAI server, bfloat16, OpenMP bound to 1 CPU), and HF transformers'
# continuous batching (generate_batch, in process, 1 thread; at 16 only, 8 new tokens: its steps
# take seconds here). Same prompts (trace `uniform`, seed 0), same greedy output lengths.
set -euo pipefail
R=benchmarks/results
SK=.venv/bin/spectrumkv
uptime | tee $R/decode-uptime.txt
# 1. the workload: 16 requests of 250-2,000 tokens (uniform x 1/16), 32 new tokens each
$SK bench decode --engines batched,sequential,vllm,hf-cb --requests 16 --concurrency 1,4,16 \
    --decode 32 --scale 0.0625 --threads 1 --hf-cb-decode 8 \
    --json $R/decode_http.json --plot $R/decode_http.png 2>$R/decode_http.log | tee $R/decode_http.txt
uptime | tee -a $R/decode-uptime.txt
# 2. decode-heavy: 16 requests of 62-500 tokens (x 1/64), 128 new tokens each, so that requests
#    overlap in decode although the prefill worker prefills one prompt at a time
$SK bench decode --engines batched,sequential,vllm --requests 16 --concurrency 4,16 \
    --decode 128 --scale 0.015625 --threads 1 \
    --json $R/decode_http_long.json --plot $R/decode_http_long.png 2>$R/decode_http_long.log \
    | tee $R/decode_http_long.txt
uptime | tee -a $R/decode-uptime.txt
# 2b. a second run of the >= 4x pair at 16 (batched vs sequential), to see the ratio's spread
$SK bench decode --engines batched,sequential --requests 16 --concurrency 16 --decode 128 \
    --scale 0.015625 --threads 1 --json $R/decode_http_long_rep.json 2>/dev/null \
    | tee $R/decode_http_long_rep.txt
uptime | tee -a $R/decode-uptime.txt
# 3. vLLM in float32 (the dtype our engine computes in), decode-heavy workload, at 16
$SK bench decode --engines vllm --vllm-dtype float32 --requests 16 --concurrency 16 \
    --decode 128 --scale 0.015625 --threads 1 \
    --json $R/decode_http_vllm_fp32.json 2>$R/decode_http_vllm_fp32.log | tee $R/decode_http_vllm_fp32.txt
# 4. the step vs its bandwidth limit at batch 16 (in process: the full-batch step time)
$SK bench decode --via process --engines batched --requests 16 --concurrency 16 --decode 32 \
    --scale 0.0625 --threads 1 --json $R/decode_limit.json | tee $R/decode_limit.txt
uptime | tee -a $R/decode-uptime.txt
