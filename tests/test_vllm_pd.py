"""Two real vLLM instances (prefill = producer, decode = consumer) and the proxy on loopback,
SmolLM2-135M, real sockets. The pair is started once for the module (about a minute here).

The instances run with --max-num-batched-tokens 128, so the 300-token prompts below are
prefilled in three chunks (chunked prefill's code path); prefix caching is on (vLLM's default).
References come from the decode instance alone (no transfer) with their own cache salt, i.e.
single-instance vLLM on the same prompt. (vLLM's CPU backend prefills bfloat16 at ~45 tokens/s
on this machine, which sets the prompt length.)
"""

import time
import urllib.request
import uuid

import pytest

from spectrumkv.assets import corpus_ids, model_dir
from spectrumkv.integrations.vllm.client import ask, completion_body, stream_completion
from spectrumkv.integrations.vllm.config import LOAD, TRANSFER_ID
from spectrumkv.integrations.vllm.launch import PDSetup, VllmPD

pytestmark = pytest.mark.model
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def pd(tmp_path_factory):
    from transformers import AutoTokenizer

    model = str(model_dir("smollm2-135m"))
    setup = PDSetup(
        model,
        tmp_path_factory.mktemp("vllm"),
        budget=0.5,
        load_timeout_s=3.0,
        extra_args=("--enforce-eager", "--max-num-batched-tokens", "128"),
    )
    ids = corpus_ids(AutoTokenizer.from_pretrained(model), "wiki", 900)
    prompts = [ids[i * 300 : (i + 1) * 300] for i in range(3)]
    with VllmPD(setup) as cluster:
        cluster.prompts = prompts
        cluster.references = {}
        yield cluster


def reference(pd: VllmPD, prompt: list[int]) -> str:
    """Single-instance greedy answer (computed once per prompt)."""
    key = tuple(prompt)
    if key not in pd.references:
        body = completion_body(pd.setup.model, prompt, MAX_TOKENS, uuid.uuid4().hex)
        pd.references[key] = stream_completion(pd.url("decode"), body)[0]
    return pd.references[key]


def counters(pd: VllmPD, name: str, key: str) -> float:
    return pd.metrics(name).get(f"vllm:spectrumkv_{key}_total", 0.0)


#: The decode (consumer) instance's own view: payloads its connector loaded and failed to load,
#: prompt tokens vLLM took from the connector, and prompt tokens it found in its prefix cache.
CONSUMER = {
    "loads": "vllm:spectrumkv_transfers_total",
    "load_failures": "vllm:spectrumkv_failures_total",
    "loaded_tokens": "vllm:external_prefix_cache_hits_total",
    "cached_tokens": "vllm:prefix_cache_hits_total",
}


def consumer(pd: VllmPD) -> dict[str, float]:
    with urllib.request.urlopen(pd.url("decode") + "/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    values = {k: 0.0 for k in CONSUMER}
    names = {metric: key for key, metric in CONSUMER.items()}
    for line in lines:
        key = names.get(line.split("{")[0].split(" ")[0])
        if key is not None:
            values[key] += float(line.rsplit(" ", 1)[1])
    return values


def consumer_growth(pd: VllmPD, before: dict[str, float], loads: int = 1) -> dict[str, float]:
    """How the consumer's counters grew since `before`, once `loads` more loads or failures
    show (connector stats reach /metrics with the engine's stats, a little later)."""
    deadline = time.monotonic() + 20
    while True:
        now = consumer(pd)
        grown = {k: now[k] - before[k] for k in CONSUMER}
        if grown["loads"] + grown["load_failures"] >= loads or time.monotonic() > deadline:
            return grown


def assert_loaded(grown: dict[str, float], prompt: list[int], cached: bool = False) -> None:
    """One verified load, no load error, and every prompt position but the last (which the
    decode request feeds) came from the transfer or, with `cached`, partly the prefix cache."""
    assert grown["loads"] == 1 and grown["load_failures"] == 0, grown
    assert grown["loaded_tokens"] + grown["cached_tokens"] == len(prompt) - 1, grown
    assert (grown["cached_tokens"] > 0) == cached, grown


def test_budget_1_answers_equal_single_instance_vllm(pd):
    """The answer is exact and the consumer really served it from the transfer: a load that
    failed would be recomputed by vLLM with the same answer."""
    for prompt in pd.prompts:
        want = reference(pd, prompt)
        before = consumer(pd)
        got = ask(pd, prompt, MAX_TOKENS, budget=1.0, salt=uuid.uuid4().hex)
        assert_loaded(consumer_growth(pd, before), prompt)
        assert not got.fallback
        assert got.wire_bytes > 0 and 0.99 < got.wire_bytes / got.fp16_bytes < 1.01
        assert got.text == want


def test_budget_half_is_served_with_half_the_bytes(pd):
    for prompt in pd.prompts:
        before = consumer(pd)
        got = ask(pd, prompt, MAX_TOKENS, budget=0.5, salt=uuid.uuid4().hex)
        assert_loaded(consumer_growth(pd, before), prompt)
        assert not got.fallback and got.text.strip()
        assert 0.45 < got.wire_bytes / got.fp16_bytes <= 0.5


def test_repeated_prompt_uses_the_decode_prefix_cache_and_stays_exact(pd):
    """The second request finds the first's blocks in the decode instance's prefix cache (same
    salt) and loads only the positions past the last full cached block."""
    prompt, salt = pd.prompts[0], uuid.uuid4().hex
    want = reference(pd, prompt)
    before = consumer(pd)
    first = ask(pd, prompt, MAX_TOKENS, budget=1.0, salt=salt)
    assert_loaded(consumer_growth(pd, before), prompt)
    before = consumer(pd)
    second = ask(pd, prompt, MAX_TOKENS, budget=1.0, salt=salt)
    grown = consumer_growth(pd, before)
    assert_loaded(grown, prompt, cached=True)
    assert grown["cached_tokens"] >= len(prompt) // 2, grown
    assert first.text == second.text == want


def test_transfer_that_never_arrives_is_recomputed(pd):
    """A decode request naming a transfer nobody sent: the load times out (3 s), its blocks are
    reported through get_block_ids_with_load_errors, vLLM recomputes, the answer is exact."""
    failures = counters(pd, "decode", "failures")
    prompt = pd.prompts[1]
    body = completion_body(pd.setup.model, prompt, MAX_TOKENS, uuid.uuid4().hex)
    body["kv_transfer_params"] = {TRANSFER_ID: "never-sent", LOAD: True}
    t0 = time.perf_counter()
    text = stream_completion(pd.url("decode"), body)[0]
    assert time.perf_counter() - t0 < 60
    assert text == reference(pd, prompt)
    deadline = time.monotonic() + 15
    while counters(pd, "decode", "failures") == failures and time.monotonic() < deadline:
        time.sleep(0.5)
    assert counters(pd, "decode", "failures") == failures + 1


def test_unreachable_budget_is_a_failure_notice_then_a_recompute(pd):
    """Budget 0.2 cannot be met without dropping tokens: the producer sends a failure notice,
    the consumer recomputes at once (no waiting out the load deadline)."""
    failures = counters(pd, "prefill", "failures")
    want = reference(pd, pd.prompts[2])
    t0 = time.perf_counter()
    got = ask(pd, pd.prompts[2], MAX_TOKENS, budget=0.2, salt=uuid.uuid4().hex)
    assert got.text == want
    assert counters(pd, "prefill", "failures") == failures + 1
    log = (pd.setup.log_dir / "decode.log").read_text()
    assert (
        "sender gave up: BudgetError" in log
        and "did not arrive" not in log.split("sender gave up")[-1]
    )
    assert time.perf_counter() - t0 < 60


def test_killed_prefill_instance_falls_back_to_local_prefill(pd):
    """Runs last: the prefill instance is killed; the proxy serves from the decode instance."""
    pd.kill("prefill")
    t0 = time.perf_counter()
    got = ask_without_counters(pd, pd.prompts[0])
    assert time.perf_counter() - t0 < 60
    assert "prefill instance unreachable" in got[1]
    assert got[0] == reference(pd, pd.prompts[0])


def ask_without_counters(pd: VllmPD, prompt: list[int]) -> tuple[str, str]:
    body = completion_body(pd.setup.model, prompt, MAX_TOKENS, uuid.uuid4().hex)
    text, _, _, headers = stream_completion(pd.proxy_url, body)
    return text, headers.get("X-SpectrumKV-Fallback", "")
