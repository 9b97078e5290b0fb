"""The Triton workqueue decode (spectrumkv.paged.gpu): the checks in paged_gpu_checks.py, run
in a fresh process (Triton's interpreter is chosen when triton is first imported, and this
process may already have imported it, e.g. through vLLM).

`test_interpreted` runs them under Triton's interpreter on CPU tensors: it needs no GPU and
runs everywhere (CI). `test_compiled_on_cuda` runs the same checks compiled on a GPU and is
skipped where torch sees none (as on the machines this project was built on).
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
CHECK_COUNT = 9  # test items in CHECKS (parametrized cases counted): all must run and pass


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


def test_compiled_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the compiled Triton kernels were not run")
    _run_checks("cuda")
