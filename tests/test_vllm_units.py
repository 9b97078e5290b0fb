"""The vLLM connector's parts without a running server: settings validation, the scheduler
side's bookkeeping (chunked prefill, prefix hits, one load per request), the paged-layout
probe against vLLM's real CPU cache-write op, and the proxy's request rewriting."""

from types import SimpleNamespace

import pytest
import torch

from spectrumkv.errors import ConfigError
from spectrumkv.integrations.vllm.config import BUDGET, LOAD, TRANSFER_ID, ConnectorConfig
from spectrumkv.integrations.vllm.paged import gather, learn_layout, scatter, token_slots
from spectrumkv.integrations.vllm.proxy import decode_body, prefill_body
from spectrumkv.integrations.vllm.scheduler import ConsumerScheduler, ProducerScheduler
from spectrumkv.integrations.vllm.worker import cpu_write_op
from spectrumkv.wire import tokens_digest


@pytest.fixture(autouse=True)
def secret(monkeypatch):
    monkeypatch.setenv("SPECTRUMKV_SECRET", "0123456789abcdef")


def test_settings_are_validated_once_with_clear_errors(monkeypatch):
    cfg = ConnectorConfig.from_extra(
        "kv_producer", {"budget": 0.3, "receiver": "10.0.0.2:9000", "link_gbps": 1}
    )
    assert (cfg.role, cfg.policy.budget, cfg.receiver_host, cfg.receiver_port) == (
        "producer",
        0.3,
        "10.0.0.2",
        9000,
    )
    assert cfg.link_gbps == 1.0 and cfg.secret == b"0123456789abcdef"
    bad = [
        ("kv_both", {}, "kv_producer or kv_consumer"),
        ("kv_producer", {"policy": "pdtrim"}, "cannot take"),
        ("kv_producer", {"policy": "snapkv-drop"}, "cannot take"),
        ("kv_producer", {"budget": 1.5}, "budget"),
        ("kv_producer", {"budgt": 0.5}, "unknown kv_connector_extra_config keys"),
        ("kv_consumer", {"receiver": "nohost"}, "host:port"),
        ("kv_consumer", {"load_timeout_s": 0}, "load_timeout_s"),
        ("kv_consumer", {"inbox_mb": "lots"}, "bad kv_connector_extra_config value"),
        ("kv_producer", {"importance": "attention"}, "importance must be one of"),
        ("kv_consumer", {"tls_cert": "c.pem"}, "go together"),
    ]
    for role, extra, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            ConnectorConfig.from_extra(role, extra)
    monkeypatch.setenv("SPECTRUMKV_SECRET", "short")
    with pytest.raises(ConfigError, match="SPECTRUMKV_SECRET"):
        ConnectorConfig.from_extra("kv_consumer", {})


def _request(req_id, prompt, params, num_computed=0):
    return SimpleNamespace(
        request_id=req_id,
        prompt_token_ids=prompt,
        num_prompt_tokens=len(prompt),
        kv_transfer_params=params,
        num_computed_tokens=num_computed,
    )


def _step(new=(), cached=(), scheduled=None):
    """A SchedulerOutput with the fields the connector reads."""
    new_reqs = [
        SimpleNamespace(req_id=r, block_ids=(blocks,), num_computed_tokens=c)
        for r, blocks, c in new
    ]
    cached_reqs = SimpleNamespace(
        req_ids=[r for r, _, _ in cached],
        resumed_req_ids=set(),
        new_block_ids=[(b,) if b else None for _, b, _ in cached],
        num_computed_tokens=[c for _, _, c in cached],
    )
    return SimpleNamespace(
        scheduled_new_reqs=new_reqs,
        scheduled_cached_reqs=cached_reqs,
        num_scheduled_tokens=scheduled or {},
    )


def test_producer_pushes_once_the_last_prompt_chunk_is_computed():
    sched = ProducerScheduler(ConnectorConfig.from_extra("kv_producer", {}))
    prompt = list(range(300))
    sched.on_new_request(_request("r1", prompt, {TRANSFER_ID: "x1"}))
    sched.on_new_request(_request("plain", prompt, None))  # no transfer: never sent
    # chunked prefill: 128 + 128 + 44 tokens over three steps, blocks allocated as it goes
    m1 = sched.build_meta(_step(new=[("r1", [7], 0), ("plain", [9], 0)], scheduled={"r1": 128}))
    m2 = sched.build_meta(_step(cached=[("r1", [3], 128)], scheduled={"r1": 128}))
    m3 = sched.build_meta(_step(cached=[("r1", [5], 256)], scheduled={"r1": 44}))
    assert m1.sends == [] and m2.sends == []
    (send,) = m3.sends
    assert (send.transfer_id, send.block_ids, send.token_ids, send.error) == (
        "x1",
        [7, 3, 5],
        prompt,
        "",
    )
    m4 = sched.build_meta(_step(cached=[("r1", None, 300)], scheduled={"r1": 1}))
    assert m4.sends == []  # sent once
    params = sched.request_finished(_request("r1", prompt, {TRANSFER_ID: "x1"}))
    assert params[TRANSFER_ID] == "x1"


def test_producer_turns_a_bad_per_request_budget_into_a_failure_notice():
    sched = ProducerScheduler(ConnectorConfig.from_extra("kv_producer", {}))
    sched.on_new_request(_request("r", list(range(10)), {TRANSFER_ID: "x", BUDGET: 7}))
    (send,) = sched.build_meta(_step(new=[("r", [1], 0)], scheduled={"r": 10})).sends
    assert "bad per-request budget" in send.error


def test_consumer_loads_beyond_its_prefix_hit_and_only_once():
    sched = ConsumerScheduler(ConnectorConfig.from_extra("kv_consumer", {}))
    prompt = list(range(300))
    req = _request("d1", prompt, {TRANSFER_ID: "x1", LOAD: True})
    assert sched.matched_tokens(_request("p", prompt, None), 0) == (0, False)
    assert sched.matched_tokens(req, 128) == (300 - 1 - 128, False)  # last token computed here
    sched.after_alloc(req, None, 171)
    (load,) = sched.build_meta(_step(new=[("d1", [4, 6, 8], 128)])).loads
    assert (load.start, load.end, load.block_ids) == (128, 299, [4, 6, 8])
    assert (load.n_prompt, load.digest) == (300, tokens_digest(prompt))
    assert sched.matched_tokens(req, 0) == (0, False)  # preempted later: recompute, no reload
    assert sched.matched_tokens(_request("s", [1], {TRANSFER_ID: "y", LOAD: True}), 0) == (
        0,
        False,
    )


@pytest.fixture(scope="module")
def cpu_layout():
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(torch.bfloat16, 128, 64, "auto")
    return isa, learn_layout(3, 128, 64, cpu_write_op(isa))


def test_learned_layout_reads_and_writes_what_vllms_cache_op_wrote(cpu_layout):
    isa, layout = cpu_layout
    cache = torch.zeros(6, 3, 128, 128, dtype=torch.bfloat16)
    n = 300
    k, v = torch.randn(n, 3, 64).bfloat16(), torch.randn(n, 3, 64).bfloat16()
    blocks, offsets = token_slots(layout, [5, 0, 2], 0, n)
    cpu_write_op(isa)(k, v, cache, blocks * 128 + offsets)
    keys, values = gather(layout, cache, blocks, offsets)
    assert torch.equal(keys, k.transpose(0, 1)) and torch.equal(values, v.transpose(0, 1))
    mine = torch.zeros_like(cache)
    scatter(layout, mine, blocks, offsets, keys, values)
    assert torch.equal(mine, cache)
    with pytest.raises(ValueError, match="cannot hold"):
        token_slots(layout, [5, 0], 0, n)


def test_layout_probe_refuses_a_write_op_it_cannot_map():
    def partial(k, v, block, slots):  # writes keys only
        block[0, :, :, :64] = k.transpose(0, 1)

    with pytest.raises(ConfigError, match="unwritten"):
        learn_layout(2, 16, 64, partial)

    def collide(k, v, block, slots):  # every token lands on slot 0
        block[0, :, 0, :64] = k[-1]
        block[0, :, 0, 64:] = v[-1]
        block[0, :, 1:, :] = 0

    with pytest.raises(ConfigError):
        learn_layout(2, 16, 64, collide)


def test_proxy_rewrites_requests_for_each_instance():
    body = {"prompt": "hi", "max_tokens": 50, "stream": True, "kv_transfer_params": {"evil": 1}}
    p = prefill_body(body, "t", 0.3, transfer=True)
    assert p["max_tokens"] == 1 and "stream" not in p
    assert p["kv_transfer_params"] == {TRANSFER_ID: "t", BUDGET: 0.3}
    assert "kv_transfer_params" not in prefill_body(body, "t", None, transfer=False)
    d = decode_body(body, "t")
    assert d["max_tokens"] == 50 and d["stream"] is True
    assert d["kv_transfer_params"] == {TRANSFER_ID: "t", LOAD: True}
    assert "kv_transfer_params" not in decode_body(body, None)


def test_budget_floor_is_checked_at_start_up_and_plans_never_drop():
    from spectrumkv.assets import model_dir
    from spectrumkv.config import PolicyConfig
    from spectrumkv.engines.hf import dir_fingerprint
    from spectrumkv.errors import BudgetError
    from spectrumkv.integrations.vllm.connector import _check_budget
    from spectrumkv.integrations.vllm.worker import plan_no_drop
    from spectrumkv.pipeline import new_header

    fp = dir_fingerprint(model_dir("smollm2-135m"), "bfloat16")
    _check_budget(fp, PolicyConfig("spectrum", budget=0.3))
    with pytest.raises(ConfigError, match="smallest budget is about 0.28"):
        _check_budget(fp, PolicyConfig("spectrum", budget=0.25))
    policy = PolicyConfig("spectrum", budget=0.26)
    with pytest.raises(BudgetError, match="dropped"):
        plan_no_drop(torch.rand(600), new_header(fp, 600, policy), policy)
    ok = PolicyConfig("spectrum", budget=0.3)
    p = plan_no_drop(torch.rand(600), new_header(fp, 600, ok), ok)
    assert p.wire_budget <= 0.3 and p.counts()["DROP"] == 0


def test_a_sliding_window_model_of_any_kind_is_refused_at_start_up(tmp_path):
    """A Mistral-style model (every layer slides, no `layer_types`) was fingerprinted as having
    no sliding layers, so the connector took it and sent whole-prompt frames vLLM keeps."""
    from spectrumkv.assets import model_dir
    from spectrumkv.integrations.vllm.connector import check_model

    from .tiny_models import mistral_dir

    with pytest.raises(ConfigError, match=r"sliding-window layers yet \(3 of 3 here\)"):
        check_model(str(mistral_dir(tmp_path)))
    assert check_model(str(model_dir("smollm2-135m"))).sliding_layers == ()
