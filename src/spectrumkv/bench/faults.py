"""`spectrumkv bench faults`: fault injection into the running prefill -> decode path.

Real worker processes; the decode worker reaches the prefill worker through `FaultProxy`, a
TCP proxy that applies one fault per connection to the byte stream:

- close:   close both sockets after `offset` bytes of the KV stream;
- stall:   stop forwarding after `offset` bytes and keep the sockets open (the decode worker's
           deadline must fire);
- corrupt: flip one byte at `offset` of the KV stream, or of the request (`upstream=True`: a
           token id or the JSON around it; the payload's token digest catches the former);
- kill:    kill the prefill worker process `delay` seconds into the transfer, then restart it;
- none:    pass everything through.

Every request must either complete with the reference answer (the transfer survived, or the
decode worker recomputed) or fail with a clear HTTP 502 error, within its deadline; afterwards
the decode worker must hold no in-flight request and (its batch engine) no KV pages, and its
memory must not grow with the number of faults.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import urllib.error
from collections import Counter
from dataclasses import asdict, dataclass

from ..pd.client import complete, get_json, token_ids
from ..pd.launch import Cluster, rss_mb
from ..serve.metrics import read as read_metrics

FAULTS = ("none", "close", "stall", "corrupt", "kill")


@dataclass
class Fault:
    kind: str = "none"
    offset: int = 0  # bytes into the stream
    upstream: bool = False  # corrupt the decode -> prefill direction instead
    xor: int = 0xFF  # corrupt: the byte at `offset` is XORed with this


class FaultProxy:
    """A loopback TCP proxy on its own event-loop thread; `arm(fault)` sets the fault of the
    next accepted connection."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._next = Fault()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def arm(self, fault: Fault) -> None:
        self._next = fault

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        fault, self._next = self._next, Fault()
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            down_w.close()
            return
        kv = self._pipe(up_r, down_w, fault if not fault.upstream else Fault())
        req = self._pipe(down_r, up_w, fault if fault.upstream else Fault())
        await asyncio.wait(
            [asyncio.ensure_future(kv), asyncio.ensure_future(req)],
            return_when=asyncio.FIRST_COMPLETED,
        )
        for w in (up_w, down_w):
            w.close()

    @staticmethod
    async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, fault: Fault) -> None:
        sent = 0
        try:
            while chunk := await r.read(1 << 16):
                if fault.kind in ("close", "stall") and sent + len(chunk) > fault.offset:
                    w.write(chunk[: fault.offset - sent])
                    await w.drain()
                    if fault.kind == "stall":
                        await r.read(-1)  # swallow the rest until the peer gives up
                    return
                if fault.kind == "corrupt" and sent <= fault.offset < sent + len(chunk):
                    b = bytearray(chunk)
                    b[fault.offset - sent] ^= fault.xor
                    chunk = bytes(b)
                w.write(chunk)
                await w.drain()
                sent += len(chunk)
        except (ConnectionError, OSError):
            return

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@dataclass
class FaultRecord:
    round: int
    fault: str
    offset: int
    upstream: bool
    on_failure: str
    outcome: str  # ok | recomputed | failed_clearly | wrong_answer | error_500 | over_deadline
    seconds: float


def _has_chat_template(model: str) -> bool:
    """Whether the model's tokenizer has a chat template (the rounds send the prompt as a chat
    message where it does; a base model such as gemma3-270m's package has none)."""
    from transformers import AutoTokenizer

    from ..assets import model_dir

    return bool(getattr(AutoTokenizer.from_pretrained(model_dir(model)), "chat_template", None))


def run_faults(
    model: str, rounds: int, seed: int = 0, deadline_s: float = 8.0, max_tokens: int = 8
) -> tuple[list[FaultRecord], dict]:
    """Run `rounds` requests, each with a random fault; returns the records and a summary."""
    rng = random.Random(seed)
    prompt = "Explain how a bicycle stays upright while it moves."
    proxy: FaultProxy | None = None

    def route(prefill_port: int) -> int:
        nonlocal proxy
        proxy = FaultProxy(prefill_port)
        return proxy.port

    records: list[FaultRecord] = []
    # no circuit breaker: every round must reach the proxy and meet its own fault
    args = ["--deadline", str(deadline_s), "--breaker-threshold", "0"]
    cluster = Cluster(model, args, route=route)
    with cluster as c:
        assert proxy is not None
        # 0.01 Gbps: the FP16 payload (~1 MB) takes about a second on the wire, so offsets and
        # kills land inside the transfer
        opts = {"chat": _has_chat_template(model), "budget": 1.0, "link_gbps": 0.01}
        ref = token_ids(complete(c.url, prompt, max_tokens, **opts))
        # the stream's size must come from a transfer that worked: a 502 here says why not
        # (e.g. a machine too slow for `deadline_s`)
        stream_bytes = complete(c.url, prompt, 1, on_failure="fail", **opts)["spectrumkv"]
        stream_bytes = stream_bytes["wire_bytes"]
        decode_pid = c.procs[1].pid
        rss_start = rss_mb(decode_pid)
        for i in range(rounds):
            kind = FAULTS[i % len(FAULTS)] if i < len(FAULTS) else rng.choice(FAULTS)
            upstream = kind == "corrupt" and rng.random() < 0.3
            # the request direction carries ~100 bytes of handshake + the JSON request
            offset = rng.randrange(100, 400) if upstream else rng.randrange(stream_bytes + 200)
            fault = Fault(kind, offset, upstream)
            on_failure = rng.choice(("recompute", "fail"))
            proxy.arm(fault if kind != "kill" else Fault())
            killer = None
            if kind == "kill":
                fault.offset = 0
                killer = threading.Timer(rng.uniform(0.05, 1.0), c.kill_prefill)
                killer.start()
            t0 = time.monotonic()
            try:
                r = complete(
                    c.url,
                    prompt,
                    max_tokens,
                    timeout=deadline_s + 60,
                    on_failure=on_failure,
                    **opts,
                )
                ok = token_ids(r) == ref
                outcome = r["spectrumkv"]["outcome"] if ok else "wrong_answer"
            except urllib.error.HTTPError as e:
                outcome = "failed_clearly" if e.code == 502 else f"error_{e.code}"
            except TimeoutError:
                outcome = "hang"
            elapsed = time.monotonic() - t0
            if killer is not None:
                killer.join()
                c.restart_prefill()
            if outcome in ("ok", "recomputed", "failed_clearly") and elapsed > deadline_s + 30:
                outcome = "over_deadline"
            records.append(
                FaultRecord(i, kind, fault.offset, fault.upstream, on_failure, outcome, elapsed)
            )
            print(
                f"{i:>4} {kind:>8} @{fault.offset:<8} {'up' if fault.upstream else 'kv':>2} "
                f"{on_failure:>9} -> {outcome:<15} {elapsed:6.2f} s",
                flush=True,
            )
        _, health = get_json(c.url, "/health")
        pages = read_metrics(c.url).get("spectrumkv_engine_pages{state=used}")
        summary = {
            "rounds": rounds,
            "outcomes": dict(Counter(r.outcome for r in records)),
            "faults": dict(Counter(r.fault for r in records)),
            "in_flight_after": health["in_flight"],
            "pages_used_after": None if pages is None else int(pages),  # None: no batch engine
            "decode_rss_mb_start": rss_start,
            "decode_rss_mb_end": rss_mb(decode_pid),
            "max_seconds": max(r.seconds for r in records),
            "deadline_s": deadline_s,
        }
    proxy.close()
    return records, summary


def is_clean(summary: dict) -> bool:
    """No wrong answers, no 500s, no hangs, no stuck requests, no KV pages left held."""
    good = {"ok", "recomputed", "failed_clearly"}
    return (
        set(summary["outcomes"]) <= good
        and summary["in_flight_after"] == 0
        and summary.get("pages_used_after") in (0, None)
    )


def write_json(records: list[FaultRecord], summary: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump({"summary": summary, "records": [asdict(r) for r in records]}, f, indent=1)
