#!/usr/bin/env bash
# Issue 17, item 7 on a lent GPU, in one call: the compiled Triton checks (tests/test_paged_gpu.py
# on CUDA), a FlashInfer JIT warm-up in the background, then the GPU decode-attention benchmark
# (python -m spectrumkv.paged.gpu_bench). Runs under the machine's own python3 (torch, triton);
# FlashInfer and msgspec come as wheels in .whl (see benchmarks/RESULTS.md for the pip download).
# Usage there: OUT=DIR [SWEEP="gpu_bench args"] bash benchmarks/gpu/run.sh [gpu_bench args...]
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton-cache
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used \
    --format=csv | tee "$OUT/smi.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD/src
if ! python3 -c "import spectrumkv.paged.gpu_bench" 2> "$OUT/import.txt"; then
    # the package's top level needs what this image lacks: import spectrumkv.paged alone
    echo "top-level import failed, using a shim:"; tail -2 "$OUT/import.txt"
    mkdir -p /tmp/shim/spectrumkv && : > /tmp/shim/spectrumkv/__init__.py
    for f in src/spectrumkv/*; do
        [ "$(basename "$f")" = __init__.py ] || ln -sf "$PWD/$f" /tmp/shim/spectrumkv/
    done
    export PYTHONPATH=/tmp/site:/tmp/shim
fi
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
(timeout 300 python3 -m spectrumkv.paged.gpu_bench --json /tmp/warm.json --methods flashinfer \
    flashinfer-tc --batches 1 --seeds 0 --traces uniform --rounds 1 --scale 0.01 \
    > "$OUT/warm.txt" 2>&1; echo "warm-up rc=$?" >> "$OUT/warm.txt") &
timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests/test_paged_gpu.py \
    -k "${CHECKS:-cuda or sm90 or split}" 2>&1 | tee "$OUT/checks.txt" | tail -5
wait
tail -4 "$OUT/warm.txt"
if [ -n "${SWEEP:-}" ]; then  # kernel-config sweep first: SWEEP="gpu_bench args"
    timeout 200 python3 -m spectrumkv.paged.gpu_bench --json "$OUT/gpu-sweep.json" $SWEEP 2>&1 \
        | tee "$OUT/sweep.txt" | tail -16
fi
timeout 420 python3 -m spectrumkv.paged.gpu_bench --json "$OUT/gpu-attention.json" "$@" 2>&1 \
    | tee "$OUT/bench.txt" | tail -52
