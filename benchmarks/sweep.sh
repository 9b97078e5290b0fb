#!/usr/bin/env bash
# Every measurement behind benchmarks/RESULTS.md. Resumable: finished runs are skipped.
# Runtime on the 2-core CPU machine: about 3 hours (run pieces selectively with STEPS="ppl niah").
set -euo pipefail
cd "$(dirname "$0")/.."
R=benchmarks/results
STEPS=${STEPS:-"ppl paper niah probe ttft codec trust vllm report"}
PPL_POLICIES="spectrum,spectrum-layer,spectrum-2tier,spectrum-opt,sink-protect,pdtrim@fr=0.25,pdtrim@fr=0.5,pdtrim@fr=0.75,snapkv-drop,random-tier,spectrum@importance=positional,spectrum@importance=keynorm,spectrum@importance=positional+scheme=sym-token+rotate=0,uniform-int8,uniform-int4,kivi2"
BUDGETS=0.15,0.2,0.25,0.3,0.4,0.5,0.75
skv=.venv/bin/spectrumkv
for step in $STEPS; do
  case $step in
  ppl)
    for m in smollm2-135m gemma3-270m; do
      $skv eval ppl --model $m --corpus wiki --context 1024 --continuation 128 --chunks 4 \
        --budgets $BUDGETS --policies "$PPL_POLICIES" --json $R/ppl_$m.json
    done ;;
  paper)
    $skv eval ppl --protocol paper --model smollm2-135m --corpus wiki --context 1024 \
      --continuation 128 --chunks 4 --budgets 0.2,0.3,0.5 \
      --policies "spectrum,pdtrim@fr=0.25,spectrum@importance=positional+scheme=sym-token+rotate=0,kivi2,uniform-int4" \
      --json $R/ppl_paper_smollm2-135m.json ;;
  niah)
    $skv eval niah --model smollm2-135m --corpus wiki --contexts 1024 --depths 10 --needles 5 \
      --budgets 0.15,0.3 --policies "spectrum,pdtrim@fr=0.25,uniform-int4" \
      --json $R/niah_smollm2-135m.json
    $skv eval niah --model smollm2-135m --corpus wiki --contexts 2048 --depths 10 --needles 5 \
      --budgets 0.3 --policies "spectrum,pdtrim@fr=0.25" --json $R/niah_smollm2-135m.json
    $skv eval niah --model gemma3-270m --corpus wiki --contexts 1024,2048 --depths 10 --needles 5 \
      --budgets 0.3 --policies "spectrum,pdtrim@fr=0.25" --json $R/niah_gemma3-270m.json ;;
  probe)
    for m in smollm2-135m gemma3-270m; do
      for kind in paper ppl+niah; do
        $skv probe --model $m --kind $kind --out $R/profile_${m}_${kind/+/-}.json
      done
    done ;;
  ttft)
    $skv bench ttft --model smollm2-135m --lengths 512,2048,4096 --links 1,10,25 \
      --budgets 1.0,0.5,0.3 --both --json $R/ttft_smollm2-135m.json \
      --plot $R/ttft_smollm2-135m.png | tee $R/ttft_smollm2-135m.txt ;;
  codec)
    $skv bench codec --json $R/codec.json | tee $R/codec.txt
    $skv bench codec --fresh --reference --json $R/codec-fresh.json | tee $R/codec-fresh.txt
    $skv bench push --json $R/push.json | tee $R/push.txt
    $skv bench codec --head-dim 128 --kv-heads 4 --q-heads 28 --layers 28 --dtypes bfloat16 \
      --json $R/codec-qwen7b-shape.json | tee $R/codec-qwen7b-shape.txt
    $skv bench codec --tokens 256 --pause-ms 1 --policies uniform-int8,spectrum@0.5 \
      --json $R/codec-paced.json | tee $R/codec-paced.txt
    $skv bench scoring --lengths 2048,8192,32768 --json $R/scoring.json | tee $R/scoring.txt ;;
  trust)
    $skv bench fuzz --cases 100000 --json $R/fuzz.json | tee $R/fuzz.txt
    $skv bench faults --rounds 60 --json $R/faults.json | tee $R/faults.txt
    $skv bench load --clients 32 --duration 150 --json $R/load.json \
      --plot $R/load-memory.png | tee $R/load.txt ;;
  vllm)
    $skv eval agreement --model smollm2-135m --lengths 512,2048 --prompts 4 \
      --json $R/agreement_smollm2-135m.json | tee $R/agreement_smollm2-135m.txt
    $skv eval agreement --model gemma3-270m --lengths 512,2048 --prompts 4 \
      --json $R/agreement_gemma3-270m.json | tee $R/agreement_gemma3-270m.txt
    $skv bench vllm --prompts 4 --prompt-tokens 512 --max-tokens 8 --links 0,1 \
      --json $R/vllm_1p1d.json | tee $R/vllm_1p1d.txt ;;
  report)
    $skv report $R/ppl_*.json $R/niah_*.json --out $R ;;
  esac
done
