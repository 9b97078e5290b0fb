#!/usr/bin/env bash
# The sweeps behind benchmarks/RESULTS.md. Resumable: re-run to continue where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
R=benchmarks/results
PPL_POLICIES="spectrum,spectrum-layer,spectrum-2tier,spectrum-opt,sink-protect,pdtrim@fr=0.25,pdtrim@fr=0.5,pdtrim@fr=0.75,snapkv-drop,random-tier,spectrum@importance=positional,spectrum@importance=positional+scheme=sym-token+rotate=0,uniform-int8,uniform-int4"
NIAH_POLICIES="spectrum,pdtrim@fr=0.25,uniform-int4"
ppl() {
  .venv/bin/spectrumkv eval ppl --model "$1" --corpus wiki --context 1024 --continuation 128 \
    --chunks 4 --budgets 0.15,0.2,0.25,0.3,0.4,0.5,0.75 --policies "$PPL_POLICIES" \
    --json "$R/ppl_$1.json"
}
niah() {
  .venv/bin/spectrumkv eval niah --model "$1" --corpus wiki --contexts 1024 --depths 10 \
    --needles 5 --budgets 0.15,0.3 --policies "$NIAH_POLICIES" --json "$R/niah_$1.json"
}
ppl smollm2-135m
ppl gemma3-270m &
niah smollm2-135m
wait
.venv/bin/spectrumkv report "$R"/ppl_*.json "$R"/niah_*.json --out "$R"
