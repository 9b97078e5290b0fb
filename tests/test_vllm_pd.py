"""Two real vLLM instances (prefill = producer, decode = consumer) and the proxy on loopback,
SmolLM2-135M, real sockets. The pair is started once for the module (about a minute here).

The instances run with --max-num-batched-tokens 128, so the 300-token prompts below are
prefilled in three chunks (chunked prefill's code path); prefix caching is on (vLLM's default).
References come from the decode instance alone (no transfer) with their own cache salt, i.e.
single-instance vLLM on the same prompt. (vLLM's CPU backend prefills bfloat16 at ~45 tokens/s
on this machine, which sets the prompt length.)
"""

import time
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


def test_budget_1_answers_equal_single_instance_vllm(pd):
    for prompt in pd.prompts:
        got = ask(pd, prompt, MAX_TOKENS, budget=1.0, salt=uuid.uuid4().hex)
        assert not got.fallback
        assert got.wire_bytes > 0 and 0.99 < got.wire_bytes / got.fp16_bytes < 1.01
        assert got.text == reference(pd, prompt)


def test_budget_half_is_served_with_half_the_bytes(pd):
    loads = counters(pd, "decode", "transfers")
    for prompt in pd.prompts:
        got = ask(pd, prompt, MAX_TOKENS, budget=0.5, salt=uuid.uuid4().hex)
        assert not got.fallback and got.text.strip()
        assert 0.45 < got.wire_bytes / got.fp16_bytes <= 0.5
    assert counters(pd, "decode", "transfers") == loads + len(pd.prompts)


def test_repeated_prompt_uses_the_decode_prefix_cache_and_stays_exact(pd):
    salt = uuid.uuid4().hex
    first = ask(pd, pd.prompts[0], MAX_TOKENS, budget=1.0, salt=salt)
    second = ask(pd, pd.prompts[0], MAX_TOKENS, budget=1.0, salt=salt)
    assert first.text == second.text == reference(pd, pd.prompts[0])


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
