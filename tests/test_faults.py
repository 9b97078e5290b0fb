"""Fault injection with real worker processes: closed sockets, stalls, corrupted bytes in flight,
a killed and restarted prefill worker. Every request ends correct or clearly failed, in time."""

import pytest

from spectrumkv.bench import faults

pytestmark = pytest.mark.model


def test_every_fault_ends_in_the_right_answer_or_a_clear_error():
    records, summary = faults.run_faults("smollm2-135m", rounds=10, seed=7, deadline_s=6.0)
    assert faults.is_clean(summary), summary
    assert set(summary["faults"]) == set(faults.FAULTS)
    assert summary["in_flight_after"] == 0
    assert max(r.seconds for r in records) < 6.0 + 30
    # a fault on the KV stream must not pass unnoticed as a different answer
    assert all(r.outcome != "wrong_answer" for r in records)
    assert summary["decode_rss_mb_end"] - summary["decode_rss_mb_start"] < 200


def test_a_request_corrupted_into_another_prompt_is_caught(smol):
    """Flip one digit of the first token id on its way to the prefill worker: the prefill worker
    computes the KV of a different prompt, and the decode worker must notice (token digest)."""
    import urllib.error

    from spectrumkv.pd.client import complete, token_ids
    from spectrumkv.pd.launch import Cluster

    prompt = "The three primary colours are"
    ids = smol.tokenizer(prompt)["input_ids"]
    proxy = None

    def route(port: int) -> int:
        nonlocal proxy
        proxy = faults.FaultProxy(port)
        return proxy.port

    auth, head = 5 + 32 + 32, 5  # AUTH message (answer + client nonce), REQUEST message head
    prefix = len('{"request_id":"cmpl-0123456789abcdef","token_ids":[')
    offset = auth + head + prefix + len(str(ids[0])) - 1  # last digit of the first token id
    with Cluster("smollm2-135m", ["--deadline", "10"], route=route) as c:
        ref = token_ids(complete(c.url, prompt, 6, budget=1.0))
        proxy.arm(faults.Fault("corrupt", offset, upstream=True, xor=0x01))
        with pytest.raises(urllib.error.HTTPError) as e:
            complete(c.url, prompt, 6, budget=1.0, on_failure="fail")
        assert e.value.code == 502 and "not for this request's prompt" in e.value.read().decode()
        proxy.arm(faults.Fault("corrupt", offset, upstream=True, xor=0x01))
        r = complete(c.url, prompt, 6, budget=1.0, on_failure="recompute")
        assert r["spectrumkv"]["outcome"] == "recomputed" and token_ids(r) == ref
    proxy.close()


def test_rounds_use_chat_only_where_the_model_has_a_template():
    assert faults._has_chat_template("smollm2-135m")  # an instruct model
    assert not faults._has_chat_template("gemma3-270m")  # a base model: plain prompts (was a 400)
