"""Two real worker processes on loopback: the KV cache crosses a TCP socket, and the decode
worker's HTTP front is OpenAI-compatible in fact (one pair of workers for the module)."""

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

import spectrumkv as skv
from spectrumkv.paged import cost
from spectrumkv.paged.errors import PagedInputError
from spectrumkv.pd.client import complete, get_json, get_text, post, token_ids
from spectrumkv.pd.decode_worker import DecodeConfig, DecodeWorker
from spectrumkv.pd.launch import Cluster
from spectrumkv.pd.prefill_worker import ROLE
from spectrumkv.serve.runner import pool_config
from spectrumkv.transport.auth import AuthError, client_handshake
from spectrumkv.transport.framing import connect

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


def _error(url: str, path: str, body: bytes | dict) -> tuple[int, str, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(f"{url}{path}", data=data), timeout=60)
    return e.value.code, e.value.headers["Content-Type"], json.loads(e.value.read())


def test_budget_one_equals_single_process_generation(cluster, reference):
    r = complete(cluster.url, PROMPT, 12, chat=True, policy="spectrum", budget=1.0)
    s = r["spectrumkv"]
    assert s["outcome"] == "ok" and token_ids(r) == reference
    assert 1.0 < s["wire_ratio"] < 1.01 and s["ttft_s"] > 0


def test_chat_completions_use_the_chat_template(cluster, reference):
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 12}
    body["spectrumkv"] = {"budget": 1.0}
    r = post(cluster.url, "/v1/chat/completions", body)
    assert r["object"] == "chat.completion" and r["choices"][0]["token_ids"] == reference
    assert (
        r["choices"][0]["message"]["role"] == "assistant" and r["choices"][0]["message"]["content"]
    )
    events = _stream(cluster.url, "/v1/chat/completions", {**body, "stream": True})
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == r["choices"][0]["message"]["content"]
    assert events[-1]["choices"][0]["token_ids"] == reference
    assert all(e["object"] == "chat.completion.chunk" for e in events)


def test_half_budget_is_served_in_half_the_bytes(cluster):
    r = complete(cluster.url, PROMPT, 8, chat=True, policy="spectrum", budget=0.5)
    s = r["spectrumkv"]
    assert s["outcome"] == "ok" and s["wire_ratio"] <= 0.5 and r["choices"][0]["text"]
    metrics = get_text(cluster.url, "/metrics")
    line = next(x for x in metrics.splitlines() if x.startswith("spectrumkv_wire_bytes_total"))
    assert float(line.split()[1]) >= s["wire_bytes"]
    assert 'spectrumkv_stage_seconds_count{stage="ttft"}' in metrics


def _stream(url: str, path: str, body: dict) -> list:
    req = urllib.request.Request(
        f"{url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        events = [ln for ln in resp.read().decode().splitlines() if ln.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[6:]) for e in events[:-1]]


def test_streaming_completion(cluster):
    events = _stream(
        cluster.url,
        "/v1/completions",
        {"prompt": "Hello, my name is", "max_tokens": 5, "stream": True},
    )
    assert len(events) >= 2 and events[-1]["usage"]["completion_tokens"] == 5
    text = "".join(e["choices"][0]["text"] for e in events)
    assert text and events[-1]["choices"][0]["finish_reason"] == "length"


BAD = [
    (b"not json", None),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "Hi there", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "Hi there", "max_tokens": "8"}, "max_tokens"),
    ({"prompt": "Hi there", "max_tokens": True}, "max_tokens"),
    ({"prompt": "Hi there", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "Hi there", "logprobs": 2}, "logprobs"),
    ({"prompt": "Hi there", "temperature": 3}, "temperature"),
    ({"prompt": "Hi there", "top_p": 0}, "top_p"),
    ({"prompt": "Hi there", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "Hi there", "model": "gpt-4"}, "model"),
    ({"prompt": "Hi there", "spectrumkv": {"budget": 0}}, "spectrumkv.budget"),
    ({"prompt": "Hi there", "spectrumkv": {"budget": 1.5}}, "spectrumkv.budget"),
    ({"prompt": "Hi there", "spectrumkv": {"budget": -0.2}}, "spectrumkv.budget"),
    ({"prompt": "Hi there", "spectrumkv": {"budget": None}}, "spectrumkv.budget"),
    ({"prompt": "Hi there", "spectrumkv": {"policy": "bogus"}}, "spectrumkv.policy"),
    ({"prompt": "Hi there", "spectrumkv": {"on_failure": "explode"}}, "spectrumkv.on_failure"),
    ({"prompt": "Hi there", "spectrumkv": {"link_latency_s": 1e9}}, "spectrumkv.link_latency_s"),
    ({"prompt": "Hi there", "spectrumkv": {"link_gbps": 1e-9}}, "spectrumkv.link_gbps"),
    ({"prompt": "Hi there", "spectrumkv": {"nope": 1}}, "spectrumkv.nope"),
]


def test_bad_requests_get_openai_errors_before_any_work(cluster):
    for body, param in BAD:
        code, ctype, err = _error(cluster.url, "/v1/completions", body)
        assert code in (400, 404), body
        assert ctype.startswith("application/json")
        assert set(err["error"]) == {"message", "type", "param", "code"}
        assert err["error"]["param"] == param, (body, err)
    code, _, err = _error(cluster.url, "/v1/chat/completions", {"messages": []})
    assert code == 400 and err["error"]["param"] == "messages"
    code, _, err = _error(cluster.url, "/v1/chat/completions", {"messages": [{"role": "x"}]})
    assert code == 400
    t0 = time.monotonic()  # past the model's 8,192-token context: refused before any prefill
    code, _, err = _error(cluster.url, "/v1/completions", {"prompt": "word " * 9000})
    assert code == 400 and err["error"]["code"] == "context_length_exceeded"
    assert time.monotonic() - t0 < 10
    code, _, err = _error(
        cluster.url, "/v1/completions", {"prompt": "word " * 8000, "max_tokens": 500}
    )
    assert code == 400 and "8192" in err["error"]["message"]
    assert get_json(cluster.url, "/v1/models")[1]["data"][0]["id"] == "smollm2-135m"


def test_fixed_rate_policies_run_at_their_own_rate_and_unmeetable_budgets_say_why(cluster):
    for policy, low, high in (("uniform-int8", 0.5, 0.6), ("fp16", 1.0, 1.03)):
        s = complete(cluster.url, PROMPT, 2, chat=True, policy=policy)["spectrumkv"]
        assert s["outcome"] == "ok" and low < s["wire_ratio"] < high, (policy, s)
    r = complete(cluster.url, PROMPT, 2, chat=True, budget=0.01)  # no plan fits: falls back
    assert r["spectrumkv"]["outcome"] == "recomputed" and "BudgetError" in r["spectrumkv"]["reason"]
    code, _, err = _error(
        cluster.url,
        "/v1/completions",
        {"prompt": PROMPT, "stream": True, "spectrumkv": {"budget": 0.01, "on_failure": "fail"}},
    )
    assert code == 502 and "BudgetError" in err["error"]["message"]  # an error, not a 200 stream


def test_max_tokens_null_is_the_server_default(cluster):
    body = {"prompt": "Count: 1, 2, 3, 4,", "max_tokens": None}
    r = post(cluster.url, "/v1/completions", body)
    assert r["usage"]["completion_tokens"] == 16 or r["choices"][0]["finish_reason"] == "stop"


def test_sampling_parameters_are_honored(cluster):
    base = {"prompt": "Count: 1, 2, 3,", "max_tokens": 12, "stop": [" 6"]}
    cut = post(cluster.url, "/v1/completions", base)["choices"][0]  # greedy: " 4, 5, 6, ..."
    assert cut["text"] == " 4, 5," and cut["finish_reason"] == "stop"
    events = _stream(cluster.url, "/v1/completions", {**base, "stop": " 6", "stream": True})
    assert "".join(e["choices"][0]["text"] for e in events) == " 4, 5,"  # never streamed past it
    hot = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 1.5, "seed": 7, "n": 2}
    a, b = (post(cluster.url, "/v1/completions", hot) for _ in range(2))
    assert [c["token_ids"] for c in a["choices"]] == [c["token_ids"] for c in b["choices"]]
    assert len(a["choices"]) == 2 and a["choices"][0]["token_ids"] != a["choices"][1]["token_ids"]


def _cancelled(url: str) -> float:
    for line in get_text(url, "/metrics").splitlines():
        if line.startswith('spectrumkv_requests_total{outcome="cancelled"}'):
            return float(line.split()[1])
    return 0.0


def test_a_client_that_goes_away_is_cancelled(cluster):
    before = _cancelled(cluster.url)
    host, port = cluster.url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 2000, "stream": True})
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        seen = b""
        while b"data: " not in seen:  # generating
            chunk = s.recv(4096)
            assert chunk, "the stream ended early"
            seen += chunk
    t0 = time.monotonic()
    while _cancelled(cluster.url) == before:
        assert time.monotonic() - t0 < 10, "the dropped request kept generating"
        time.sleep(0.1)
    assert get_json(cluster.url, "/health")[1]["in_flight"] == 0
    r = complete(cluster.url, "Hello there friend", 2)  # not queued behind ~2000 tokens
    assert r["spectrumkv"]["ttft_s"] < 10


def test_a_prefill_nobody_waits_for_is_cancelled(cluster):
    """A long prompt's request is dropped mid-prefill; the next request must not wait for it."""
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 300  # ~3,000 tokens
    opts = {"score_layers": 0}
    full = complete(cluster.url, long_prompt, 1, **opts)["spectrumkv"]["prefill_s"]
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        complete(cluster.url, long_prompt + " Again.", 1, timeout=full / 5, **opts)
    r = complete(cluster.url, "Hello there friend", 1)["spectrumkv"]
    # without cancellation this request queues behind the rest of the long prefill (4/5 of it)
    assert r["ttft_s"] < 0.5 * full, (r["ttft_s"], full)


def test_peer_with_wrong_secret_is_refused_as_an_authentication_failure(cluster, smol):
    async def attempt(secret: bytes) -> None:
        ch = await connect("127.0.0.1", cluster.prefill_port)
        try:
            await client_handshake(ch, secret, ROLE)
        finally:
            ch.close()

    with pytest.raises(AuthError, match="authentication failed"):
        asyncio.run(attempt(b"not-the-secret-at-all"))
    asyncio.run(attempt(cluster.secret.encode()))  # the right one still works
    status, health = get_json(cluster.url, "/health")
    assert status == 200 and health["ok"] and health["prefill"]["authenticated"]
    # a decode worker configured with another secret says so in its health report
    wrong = DecodeWorker(smol, DecodeConfig("127.0.0.1", cluster.prefill_port, b"x" * 32))
    try:
        peer = asyncio.run(wrong.peer_health())
    finally:
        wrong.close()
    assert peer["reachable"] and not peer["authenticated"]
    assert "authentication failed" in peer["error"]


def test_decode_worker_takes_an_attention_profile_and_refuses_another_dtypes(cluster, smol,
                                                                            tmp_path):  # fmt: skip
    """`serve decode --attention-profile`: the batch engine's adaptive route reads it (health
    says which); one calibrated on other pages stops the worker before it serves."""
    dtype = cost.dtype_name(pool_config(smol, 8, 16).dtype)
    path = tmp_path / "profile.json"
    cost.MachineProfile(beta=4e9, dtype=dtype).save(path)
    cfg = DecodeConfig("127.0.0.1", cluster.prefill_port, b"x" * 32, kv_pool_mb=8,
                       attention_profile=str(path))  # fmt: skip
    worker = DecodeWorker(smol, cfg)
    try:
        assert worker.batch.runner.profile.beta == 4e9
        assert worker.batch.profile_source == str(path)
    finally:
        worker.close()
    other = "float16" if dtype == "bfloat16" else "bfloat16"
    cost.MachineProfile(dtype=other).save(path)
    with pytest.raises(PagedInputError, match=f"calibrated on {other} pages"):
        DecodeWorker(smol, cfg)


def test_killed_prefill_worker_gives_configured_outcome_and_opens_the_breaker(reference):
    args = ["--deadline", "20", "--breaker-threshold", "1", "--breaker-cooldown", "60"]
    with Cluster("smollm2-135m", args) as c:
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
        assert s["outcome"] == "recomputed" and token_ids(result["r"]) == reference
        assert "TransportError" in s["reason"]
        assert time.monotonic() - t0 < 40

        status, health = get_json(c.url, "/health")
        assert status == 503 and not health["ok"] and not health["prefill"]["reachable"]
        assert health["prefill"]["breaker"] == "open" and health["in_flight"] == 0
        t0 = time.monotonic()  # the breaker is open: no new attempt, an immediate answer
        with pytest.raises(urllib.error.HTTPError) as e:
            complete(c.url, PROMPT, 4, chat=True, on_failure="fail")
        err = json.loads(e.value.read())["error"]
        assert e.value.code == 502 and "circuit open" in err["message"]
        assert "TransportError" in err["message"] and time.monotonic() - t0 < 5
