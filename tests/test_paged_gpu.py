"""The Triton workqueue decode (spectrumkv.paged.gpu): the checks in paged_gpu_checks.py, run
in a fresh process (Triton's interpreter is chosen when triton is first imported, and this
process may already have imported it, e.g. through vLLM).

`test_interpreted` runs them under Triton's interpreter on CPU tensors: it needs no GPU and
runs everywhere (CI). `test_compiles_for_sm90` builds both kernels to Hopper cubins with
Triton's own compiler and bundled ptxas (no GPU needed): what the interpreter cannot check
(types, tl.dot shapes, lowering), compiled but not run. `test_compiled_on_cuda` runs the checks
compiled on a GPU and is skipped where torch sees none (as on the machines this project was
built on).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHECKS = Path(__file__).with_name("paged_gpu_checks.py")
CHECK_COUNT = 13  # test items in CHECKS (parametrized cases counted): all must run and pass


def _run_checks(device: str) -> None:
    """Run every check on `device` in a new process; all must pass, none may skip."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["SPECTRUMKV_TRITON_DEVICE"] = device
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(CHECKS)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    report = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    summary = run.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= CHECK_COUNT, report
    assert "skipped" not in summary and "deselected" not in summary, report


def test_interpreted():
    _run_checks("cpu")


def test_compiles_for_sm90(tmp_path, monkeypatch):
    """Decode (fp16 SmolLM2 shape: d 64, group 3, TF32 dots; bf16 7B-class shape: d 128,
    group 4, IEEE float32 dots) and merge, compiled afresh (empty cache) for sm_90."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from spectrumkv.paged import gpu

    geometry = ("HKV", "G", "GP", "D", "DP")
    ptrs = dict.fromkeys(("Q", "Out", "PM", "PL", "PAcc"), "*fp32")
    kinds = (("*fp16", (3, 3, 16, 64, 64), "tf32"), ("*bf16", (8, 4, 16, 128, 128), "ieee"))
    for kv, shape, precision in kinds:
        consts = dict(zip(geometry, shape, strict=True), PS=16, BLOCK=64, PREC=precision)
        sig = dict(ptrs, K=kv, V=kv, Tables="*i32", Tasks="*i32", scale="fp32", width="i32")
        src = ASTSource(gpu._decode_kernel, sig | dict.fromkeys(consts, "constexpr"), consts)
        built = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        assert built.asm["cubin"] and built.metadata.name == "_decode_kernel"
        assert ("tf32" in built.asm["ptx"]) == (precision == "tf32")  # tensor cores or FMA
    consts = dict(zip(geometry, shape, strict=True))
    sig = {k: ptrs[k] for k in ("Out", "PM", "PL", "PAcc")} | dict(Merges="*i32")
    sig |= dict.fromkeys(consts, "constexpr")
    built = triton.compile(ASTSource(gpu._merge_kernel, sig, consts), GPUTarget("cuda", 90, 32))
    assert built.asm["cubin"] and built.metadata.name == "_merge_kernel"


def test_split_settings_fill_the_device():
    """Chunks of total tokens x kv_heads / programs, never under MIN_SPLIT_TOKENS; bad
    arguments (and a bad KernelConfig) are a typed error."""
    from spectrumkv.paged import cost, gpu
    from spectrumkv.paged.errors import PagedInputError

    spans = [40_000, 3_000, 9_000, 500]
    max_splits, chunk = gpu.split_settings(spans, 8, 264)
    assert chunk == -(-sum(spans) * 8 // 264) and max_splits == gpu.MAX_SPLITS
    programs = 8 * sum(cost.splits_of(n, max_splits, chunk)[0] for n in spans)
    assert 264 <= programs <= 264 + 8 * len(spans)  # about the target, rounding up per request
    assert gpu.split_settings([100, 20], 2, 264)[1] == gpu.MIN_SPLIT_TOKENS
    for bad in (([], 2, 8), ([0, 5], 2, 8), ([5], 0, 8), ([5], 2, 0)):
        with pytest.raises(PagedInputError):
            gpu.split_settings(*bad)
    for bad in (dict(block_tokens=48), dict(num_warps=3), dict(num_stages=0), dict(precision="tf")):
        with pytest.raises(PagedInputError):
            gpu.KernelConfig(**bad)


def test_compiled_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the compiled Triton kernels were not run")
    _run_checks("cuda")
