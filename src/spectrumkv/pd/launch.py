"""Start a prefill and a decode worker as separate processes on loopback, and stop them."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..assets import check_model
from ..errors import SpectrumKVError

START_TIMEOUT_S = 180.0


class LaunchError(SpectrumKVError):
    """A worker process did not come up."""


def rss_mb(pid: int) -> float:
    """Resident memory of a process, MB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Cluster:
    """Two worker processes: procs[0] prefill, procs[1] decode. `url`: the decode worker's HTTP
    base URL. `route(prefill_port) -> port`: where the decode worker dials the prefill worker
    (e.g. through a fault-injection proxy); default: directly."""

    model: str
    decode_args: list[str] = field(default_factory=list)
    route: Callable[[int], int] | None = None
    prefill_model: str | None = None  # another model for the prefill worker (SCD: model A)
    prefill_args: list[str] = field(default_factory=list)
    prefill_batch: int | None = None  # `serve prefill --prefill-batch` (None: its default)
    secret: str = field(default_factory=lambda: secrets.token_hex(16))
    procs: list[subprocess.Popen] = field(default_factory=list)
    prefill_port: int = 0
    decode_port: int = 0
    # torch threads per worker unless its args say `--threads`: the two workers share this
    # machine's cores, and oversubscribed OpenMP regions wait for descheduled threads (on 2
    # loaded cores a batch-16 decode step took ~10x longer with 2 threads than with 1)
    threads: int = field(default_factory=lambda: max(1, (os.cpu_count() or 2) // 2))
    # the decode worker's CPU priority below the prefill worker's when both share this host (a
    # `nice` increment, 0: equal): the prefill worker, which paces the decode batch, runs first
    decode_nice: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.decode_port}"

    def __enter__(self) -> Cluster:
        check_model(self.model)  # a clear AssetError here beats two workers dying at start-up
        if self.prefill_batch is not None:
            from .batcher import check_batch  # (imports torch: only when asked)

            check_batch(self.prefill_batch)
        if self.prefill_model:
            check_model(self.prefill_model)
        try:
            self.prefill_port = self._start(self._prefill_cmd("0"))
            dial = self.route(self.prefill_port) if self.route else self.prefill_port
            self.decode_port = self._start(
                [
                    "serve",
                    "decode",
                    "--port",
                    "0",
                    "--prefill",
                    f"127.0.0.1:{dial}",
                    *self.decode_args,
                ],
                nice=self.decode_nice,
            )
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self, args: list[str], slot: int | None = None, nice: int = 0) -> int:
        """Start a worker (appended to procs, or replacing procs[slot]) at CPU priority `nice`
        (coreutils `nice -n`); returns its port."""
        env = {**os.environ, "SPECTRUMKV_SECRET": self.secret}
        if "--model" not in args:
            args = [*args, "--model", self.model]
        if "--threads" not in args:
            args = [*args, "--threads", str(self.threads)]
        cmd = [sys.executable, "-m", "spectrumkv.cli", *args]
        if nice:
            cmd = ["nice", "-n", str(nice), *cmd]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env)
        if slot is None:
            self.procs.append(proc)
        else:
            self.procs[slot] = proc
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("READY "):
                return int(line.rsplit(":", 1)[1])
        try:
            code = proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        raise LaunchError(f"worker {' '.join(args[:2])} did not start (exit code {code})")

    def kill_prefill(self) -> None:
        """Kill the prefill worker abruptly (fault injection)."""
        self.procs[0].kill()
        self.procs[0].wait(10)

    def restart_prefill(self) -> None:
        """Start a new prefill worker on the old port (after `kill_prefill`)."""
        if self.procs[0].poll() is None:
            self.kill_prefill()
        self._start(self._prefill_cmd(str(self.prefill_port)), slot=0)

    def _prefill_cmd(self, port: str) -> list[str]:
        model = ["--model", self.prefill_model] if self.prefill_model else []
        batch = [] if self.prefill_batch is None else ["--prefill-batch", str(self.prefill_batch)]
        return ["serve", "prefill", "--port", port, *model, *batch, *self.prefill_args]

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
