#!/usr/bin/env bash
# Records the paged decode-attention results (issue 17) into benchmarks/results/attention*.
# Run from the repository root: `bash benchmarks/results/attention.sh` (about 80 min on the shared
# 2-core VM at load average ~10, 50 min at load 4-6; PARTS="calibrate smollm2" etc. runs a subset,
# in this order; REPS=9 times 9 rounds per case instead of 5; NAME=attention-zen4 writes every
# file under that prefix instead, so a run on another CPU keeps the recorded one). `adaptive` is
# timed per step (planned once per timed pass, the route passed to every layer, as
# serve/runner.py does; see paged/bench.py).
# 1. calibrate the cost model on calibration seeds 0-1, for bf16 and for fp16 pages (writes a
#    machine profile per dtype: each dtype runs its own kernel);
# 2. bench every route and the anchors on held-out seeds 100-104: per case the routes run in 5
#    interleaved rounds on the same data (step = the least over the rounds, spreads from the
#    paired per-round ratios); the slow torch routes (padded, per-request SDPA) in 1 round.
set -euo pipefail
R=benchmarks/results
SK="nice -n 5 .venv/bin/spectrumkv"
PARTS=${PARTS:-"calibrate smollm2 7b fp16 p16 limit"}
N=$R/${NAME:-attention}
REPS=${REPS:-5}  # interleaved rounds per case (REPS=9: ~1.6x the time, ~25 % less spread)
B="--profile $N-profile-bfloat16.json --ring-mb 256 --reps $REPS --slow-reps 1"
B16="--profile $N-profile-float16.json --ring-mb 256 --reps $REPS --slow-reps 1"
KERNEL=per-request,split,workqueue,adaptive
log() { echo "$1 $(date -u +%H:%M:%S) $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a $N-uptime.txt; }
grep -m1 "model name" /proc/cpuinfo | tee -a $N-uptime.txt
for part in $PARTS; do
    log "start $part"
    case $part in
    calibrate) for dt in bfloat16 float16; do
        $SK bench calibrate --dtype $dt --ring-mb 256 --rounds 5 --out $N-profile-$dt.json \
            | tee $N-calibrate-$dt.txt
        done ;;
    # SmolLM2-135M shape (3 KV / 9 query heads, d=64), bf16, 32-token pages (vLLM's CPU kernel
    # needs multiples of 32), all traces, batch 1-32, every route + per-request SDPA + vLLM CPU
    smollm2) $SK bench attention $B --json $N-smollm2.json \
        --plot $N-smollm2.png | tee $N-smollm2.txt ;;
    # 7B-class GQA shape (8 KV / 32 query heads, d=128), batch 8
    7b) $SK bench attention $B --shapes 7b-gqa --traces bimodal,uniform --batches 8 \
        --json $N-7b.json --plot $N-7b.png | tee $N-7b.txt ;;
    # float16 (vLLM runs its `vec` kernel there, `amx` in bf16), batch 8
    fp16) $SK bench attention $B16 --dtype float16 --traces bimodal,uniform --batches 8 \
        --routes $KERNEL,vllm --json $N-fp16.json | tee $N-fp16.txt ;;
    # our routes at 16-token pages (the default page size), batch 8
    p16) $SK bench attention $B --page-sizes 16 --traces bimodal --batches 8 --routes $KERNEL \
        --json $N-p16.json | tee $N-p16.txt ;;
    # the bandwidth-limit target (every request >= 8K tokens): bucketed trace, batch 4
    limit) $SK bench attention $B --traces bucketed --batches 4 --routes $KERNEL \
        --json $N-limit.json | tee $N-limit.txt ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
    esac
done
log "end"
