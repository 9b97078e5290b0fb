"""Two real worker processes on loopback: the KV cache crosses a TCP socket."""

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

import spectrumkv as skv
from spectrumkv.pd.client import complete, get_text
from spectrumkv.pd.launch import Cluster
from spectrumkv.pd.prefill_worker import ROLE
from spectrumkv.transport.auth import client_handshake
from spectrumkv.transport.framing import TransportError, connect

pytestmark = pytest.mark.model
PROMPT = "Why is the sky blue? Explain it to a ten-year-old."


@pytest.fixture(scope="module")
def cluster():
    with Cluster("smollm2-135m") as c:
        yield c


@pytest.fixture(scope="module")
def reference(smol):
    context, last = skv.split_prompt(skv.chat_ids(smol, PROMPT))
    pre = skv.prefill(smol, context)
    return skv.generate(smol, skv.reference_state(smol, pre), last, 12)


def test_budget_one_equals_single_process_generation(cluster, reference):
    r = complete(cluster.url, PROMPT, 12, chat=True, policy="spectrum", budget=1.0)
    s = r["spectrumkv"]
    assert s["outcome"] == "ok" and s["token_ids"] == reference
    assert 1.0 < s["wire_ratio"] < 1.01 and s["ttft_s"] > 0


def test_half_budget_is_served_in_half_the_bytes(cluster):
    r = complete(cluster.url, PROMPT, 8, chat=True, policy="spectrum", budget=0.5)
    s = r["spectrumkv"]
    assert s["outcome"] == "ok" and s["wire_ratio"] <= 0.5 and r["choices"][0]["text"]
    metrics = get_text(cluster.url, "/metrics")
    line = next(x for x in metrics.splitlines() if x.startswith("spectrumkv_wire_bytes_total"))
    assert float(line.split()[1]) >= s["wire_bytes"]
    assert 'spectrumkv_stage_seconds_count{stage="ttft"}' in metrics


def test_streaming_completion(cluster):
    body = json.dumps({"prompt": "Hello, my name is", "max_tokens": 5, "stream": True}).encode()
    req = urllib.request.Request(
        f"{cluster.url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        events = [ln for ln in resp.read().decode().splitlines() if ln.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    pieces = [json.loads(e[6:]) for e in events[:-1]]
    assert len(pieces) >= 2 and pieces[-1]["usage"]["completion_tokens"] == 5


def test_bad_requests_get_clear_errors(cluster):
    for body in (b"not json", json.dumps({"prompt": ""}).encode()):
        req = urllib.request.Request(f"{cluster.url}/v1/completions", data=body)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 400
    with pytest.raises(urllib.error.HTTPError) as e:  # budget out of range: prefill says why
        complete(cluster.url, PROMPT, 4, budget=1.5, on_failure="fail")
    assert e.value.code == 502 and "BudgetError" in e.value.read().decode()


def test_peer_with_wrong_secret_is_refused(cluster):
    async def attempt(secret: bytes) -> None:
        ch = await connect("127.0.0.1", cluster.prefill_port)
        try:
            await client_handshake(ch, secret, ROLE)
        finally:
            ch.close()

    with pytest.raises(TransportError):
        asyncio.run(attempt(b"not-the-secret-at-all"))
    asyncio.run(attempt(cluster.secret.encode()))  # the right one still works


def test_killed_prefill_worker_gives_configured_outcome(reference):
    with Cluster("smollm2-135m", ["--deadline", "20"]) as c:
        result = {}

        def slow_request():
            # 0.002 Gbps: the ~0.5 MB payload needs ~2 s on the wire, so the kill lands mid-transfer
            result["r"] = complete(
                c.url, PROMPT, 12, chat=True, budget=1.0, link_gbps=0.002, on_failure="recompute"
            )

        t = threading.Thread(target=slow_request)
        t0 = time.monotonic()
        t.start()
        time.sleep(3.0)
        c.kill_prefill()
        t.join(60)
        assert not t.is_alive(), "request hung after the prefill worker died"
        s = result["r"]["spectrumkv"]
        assert s["outcome"] == "recomputed" and s["token_ids"] == reference
        assert time.monotonic() - t0 < 40

        t0 = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as e:
            complete(c.url, PROMPT, 4, chat=True, on_failure="fail")
        assert e.value.code == 502 and "TransportError" in e.value.read().decode()
        assert time.monotonic() - t0 < 20
        assert json.loads(get_text(c.url, "/health"))["in_flight"] == 0
