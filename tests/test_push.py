"""Push transfers (transport/push.py) over real loopback sockets: a sender pushes real payloads
into a receiver's inbox; corruption, impostors, wrong models, failure notices, caps and
expiry each end in a typed failure, never a stored payload."""

import asyncio
import time

import pytest
import torch

from spectrumkv.config import PolicyConfig
from spectrumkv.policy import plan
from spectrumkv.transport.framing import TransportError
from spectrumkv.transport.push import (
    KVInbox,
    PushReceiver,
    TransferFailed,
    payload_nbytes,
    push_payload,
    start_receiver,
)
from spectrumkv.transport.tls import client_context, server_context
from spectrumkv.wire import frame_bytes, header_bytes
from tests.synthetic import make_header, random_layers

SECRET = b"0123456789abcdef"


def _chunks(n=40, budget=0.5, **kw):
    header = make_header(n, budget=budget, **kw)
    layers = random_layers(header)
    p = plan(torch.arange(n, 0, -1).float(), header, PolicyConfig("spectrum", budget=budget))
    chunks = [header_bytes(header)]
    chunks += [frame_bytes(i, 0, p.tiers[i], kv, header) for i, kv in enumerate(layers)]
    return header, layers, chunks


def _run(coro_fn, inbox=None, expect=None, tls=None):
    """Start a receiver, run `coro_fn(port)`, return (result or exception, inbox, receiver)."""
    header, _, _ = _chunks()
    inbox = KVInbox(1 << 30, 60) if inbox is None else inbox
    receiver = PushReceiver(inbox, SECRET, expect or header.fingerprint)

    async def main():
        srv = await start_receiver(receiver, "127.0.0.1", 0, tls)
        port = srv.sockets[0].getsockname()[1]
        async with srv:
            try:
                return await coro_fn(port)
            except Exception as e:  # returned for the test to inspect
                return e

    return asyncio.run(main()), inbox, receiver


def test_pushed_payload_is_claimed_bit_exact_with_its_wire_size():
    header, layers, chunks = _chunks(budget=1.0)
    sent, inbox, receiver = _run(lambda port: push_payload("127.0.0.1", port, SECRET, "t1", chunks))
    assert sent == sum(len(c) for c in chunks)
    payload, wire = inbox.take("t1", 1.0)
    assert wire == sent and receiver.received == 1
    assert payload.header == header
    for got, sent_kv in zip(payload.layers, layers, strict=True):  # budget 1.0: all FP16
        assert torch.equal(got.keys, sent_kv.keys) and torch.equal(got.values, sent_kv.values)
    assert inbox.held_bytes == 0 and len(inbox) == 0
    with pytest.raises(TransferFailed, match="did not arrive"):
        inbox.take("t1", 0.05)  # claimed once only


def test_corrupted_frame_is_refused_and_the_claim_fails_at_once():
    _, _, chunks = _chunks()
    bad = bytearray(chunks[1])
    bad[len(bad) // 2] ^= 0x40
    result, inbox, receiver = _run(
        lambda port: push_payload("127.0.0.1", port, SECRET, "t2", [chunks[0], bytes(bad)])
    )
    assert isinstance(result, TransferFailed) and "ChecksumError" in str(result)
    assert receiver.refused == 1
    t0 = time.monotonic()
    with pytest.raises(TransferFailed, match="ChecksumError"):
        inbox.take("t2", 5.0)
    assert time.monotonic() - t0 < 1.0


def test_payload_for_another_model_is_refused():
    _, _, chunks = _chunks()
    other = make_header(40, n_layers=3).fingerprint
    result, inbox, _ = _run(
        lambda port: push_payload("127.0.0.1", port, SECRET, "t3", chunks), expect=other
    )
    assert isinstance(result, TransferFailed) and "IncompatiblePayload" in str(result)
    with pytest.raises(TransferFailed):
        inbox.take("t3", 0.1)


def test_impostor_sender_is_refused_and_stores_nothing():
    _, _, chunks = _chunks()
    result, inbox, _ = _run(
        lambda port: push_payload("127.0.0.1", port, b"wrong-secret-wrong", "t4", chunks)
    )
    assert isinstance(result, TransportError)
    assert len(inbox) == 0


def test_truncated_push_fails_the_claim():
    _, _, chunks = _chunks()
    result, inbox, _ = _run(lambda port: push_payload("127.0.0.1", port, SECRET, "t5", chunks[:-1]))
    assert isinstance(result, TransferFailed) and "incomplete" in str(result)
    with pytest.raises(TransferFailed, match="incomplete"):
        inbox.take("t5", 0.1)


def test_failure_notice_fails_the_claim_immediately():
    result, inbox, _ = _run(
        lambda port: push_payload("127.0.0.1", port, SECRET, "t6", [], error="budget too small")
    )
    assert result == 0
    with pytest.raises(TransferFailed, match="budget too small"):
        inbox.take("t6", 5.0)


def test_unreachable_receiver_is_a_transport_error():
    async def main():
        srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        srv.close()
        await srv.wait_closed()
        return await push_payload("127.0.0.1", port, SECRET, "t7", [b"x"])

    with pytest.raises(TransportError, match="cannot reach"):
        asyncio.run(main())


def test_inbox_cap_and_expiry():
    header, layers, chunks = _chunks()
    from spectrumkv.payload import Payload

    payload = Payload(header, layers)
    size = payload_nbytes(payload)
    inbox = KVInbox(max_bytes=size + 10, ttl_s=0.2)
    inbox.put("a", payload, 100)
    with pytest.raises(TransferFailed, match="inbox full"):
        inbox.put("b", payload, 100)
    time.sleep(0.3)
    inbox.put("b", payload, 100)  # "a" expired and freed its bytes
    assert inbox.expired == 1 and inbox.held_bytes == size
    with pytest.raises(TransferFailed):
        inbox.take("a", 0.05)
    assert inbox.take("b", 0.05)[1] == 100


def test_receiver_refuses_a_payload_that_would_overflow_the_inbox():
    header, _, chunks = _chunks()
    result, inbox, _ = _run(
        lambda port: push_payload("127.0.0.1", port, SECRET, "t8", chunks),
        inbox=KVInbox(max_bytes=1000, ttl_s=60),
    )
    assert isinstance(result, TransferFailed) and "cannot hold" in str(result)
    assert inbox.held_bytes == 0


def test_push_inside_tls_and_plaintext_sender_refused(cert):
    crt, key = cert
    header, _, chunks = _chunks()
    server = server_context(crt, key)

    async def both(port):
        sent = await push_payload("127.0.0.1", port, SECRET, "t9", chunks, tls=client_context(crt))
        try:
            await push_payload("127.0.0.1", port, SECRET, "t10", chunks)
        except TransportError as e:
            return sent, e
        return sent, None

    (sent, plain_error), inbox, _ = _run(both, tls=server)
    assert sent == sum(len(c) for c in chunks)
    assert inbox.take("t9", 1.0)[0].header == header
    assert isinstance(plain_error, TransportError) and len(inbox) == 0


def test_bench_push_quick_mode_measures_all_three_paths(tmp_path, capsys):
    import json

    from spectrumkv.cli import main

    out = tmp_path / "push.json"
    assert main(["bench", "push", "--quick", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["policy"] for r in records] == ["uniform-int8", "spectrum", "spectrum"]
    for r in records:
        assert r["wire_bytes"] > 0 and r["raw_gbps"] > 0 and r["push_gbps"] > 0
        assert r["decode_gbps"] > 0 and r["push_over_raw"] > 0
    assert records[2]["wire_bytes"] < records[1]["wire_bytes"]  # b=0.3 below b=0.5
    assert "loopback TCP" in capsys.readouterr().out
