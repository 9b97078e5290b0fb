"""The serving front's parts that need no model: CLI, circuit breaker, send-queue gate, sampling."""

import threading
import time

import pytest
import torch

from spectrumkv.cli import build_parser, main
from spectrumkv.errors import ConfigError
from spectrumkv.pd.breaker import CircuitBreaker
from spectrumkv.pd.prefill_worker import ByteGate
from spectrumkv.pd.sampling import Cancelled, SamplingParams, next_token
from spectrumkv.transport.tls import require_tls_off_loopback


def test_serve_roles_have_their_own_flags_with_defaults_and_units(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "decode", "--help"])
    out = capsys.readouterr().out
    for text in (
        "--budget",
        "(default: 0.5)",
        "--link-latency-s",
        "seconds",
        "Gbit/s",
        "--deadline",
    ):
        assert text in out
    assert "--tls-cert" not in out and "--link-latency-ms" not in out
    with pytest.raises(SystemExit) as e:  # the decode worker's flags are not the prefill's
        build_parser().parse_args(["serve", "prefill", "--budget", "0.3"])
    assert e.value.code == 2
    assert "unrecognized arguments: --budget" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--version"])
    assert capsys.readouterr().out.startswith("spectrumkv ")


@pytest.mark.parametrize(
    "flags, error",
    [
        (["--budget", "2"], "BudgetError: --budget must be in (0, 1]"),
        (["--policy", "bogus"], "unknown policy 'bogus'"),
        (["--link-latency-s", "1e9"], "link_latency_s"),
        (["--policy", "spectrum-layer"], "spectrum-layer"),  # needs --score-layers 0
        (["--prefill", "10.1.2.3:7100"], "no TLS"),
    ],
)
def test_decode_worker_refuses_bad_defaults_at_start_up(flags, error, capsys, monkeypatch):
    monkeypatch.setenv("SPECTRUMKV_SECRET", "x" * 32)
    assert main(["serve", "decode", *flags]) == 2  # before any model is loaded
    assert error in capsys.readouterr().err


def test_kv_channel_off_loopback_needs_tls_or_insecure(capsys, monkeypatch):
    monkeypatch.setenv("SPECTRUMKV_SECRET", "x" * 32)
    assert main(["serve", "prefill", "--host", "0.0.0.0"]) == 2
    assert "--insecure" in capsys.readouterr().err
    require_tls_off_loopback("127.0.0.1", tls=False, insecure=False, what="x")
    require_tls_off_loopback("::1", tls=False, insecure=False, what="x")
    require_tls_off_loopback("10.0.0.1", tls=True, insecure=False, what="x")
    require_tls_off_loopback("10.0.0.1", tls=False, insecure=True, what="x")
    with pytest.raises(ConfigError):
        require_tls_off_loopback("prefill.example", tls=False, insecure=False, what="x")


def test_circuit_breaker_opens_fails_fast_and_half_opens_once():
    b = CircuitBreaker(threshold=2, cooldown_s=0.2)
    b.failure("TransportError: x")
    assert b.allow() and b.state == "closed"
    b.failure("TransportError: y")
    assert b.state == "open" and not b.allow()
    time.sleep(0.25)
    assert b.state == "half-open" and b.allow() and not b.allow()  # one trial at a time
    b.failure("TransportError: z")  # the trial failed: open again at once
    assert b.state == "open" and b.last_error.endswith("z")
    time.sleep(0.25)
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow() and b.allow()
    never = CircuitBreaker(threshold=0)
    for _ in range(10):
        never.failure("e")
    assert never.allow()


def test_send_queue_gate_bounds_bytes_and_wakes_on_cancel():
    cancel = threading.Event()
    gate = ByteGate(100, cancel)
    gate.acquire(150)  # one frame larger than the limit may wait alone
    done = threading.Event()

    def second():
        gate.acquire(10)
        done.set()

    t = threading.Thread(target=second)
    t.start()
    assert not done.wait(0.3)  # blocked while 150 bytes wait
    gate.release(150)
    assert done.wait(2)
    t.join()
    gate.acquire(90)
    errors = []

    def blocked():
        try:
            gate.acquire(50)
        except Cancelled as e:
            errors.append(e)

    t = threading.Thread(target=blocked)
    t.start()
    cancel.set()
    t.join(2)
    assert not t.is_alive() and errors


def test_next_token_greedy_top_p_and_seed():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    assert next_token(logits, SamplingParams(1), torch.Generator()) == 1
    tight = SamplingParams(1, temperature=1.0, top_p=0.01)  # nucleus = the top token only
    assert {next_token(logits, tight, torch.Generator().manual_seed(s)) for s in range(50)} == {1}
    free = SamplingParams(1, temperature=5.0)
    draws = [next_token(logits, free, torch.Generator().manual_seed(s)) for s in range(200)]
    assert set(draws) == {0, 1, 2, 3}
    again = [next_token(logits, free, torch.Generator().manual_seed(s)) for s in range(200)]
    assert draws == again
    half = SamplingParams(1, temperature=1.0, top_p=0.8)  # drops the least likely token
    assert 3 not in {next_token(logits, half, torch.Generator().manual_seed(s)) for s in range(300)}
