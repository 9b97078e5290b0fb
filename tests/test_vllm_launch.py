"""The vLLM pair launcher's port handling, without starting vLLM: the ports of one launch are
distinct, and a port held by something that does not speak HTTP is a LaunchError at once, not a
confusing HTTP parse error or a 10-minute wait."""

import socket
import threading

import pytest

from spectrumkv.integrations.vllm.launch import _healthy, free_ports
from spectrumkv.pd.launch import LaunchError


def test_ports_of_one_launch_are_distinct():
    ports = free_ports(64)
    assert len(set(ports)) == 64


def test_port_held_by_a_non_http_listener_is_a_launch_error():
    with socket.create_server(("127.0.0.1", 0)) as srv:

        def answer_garbage():
            conn, _ = srv.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"\x00\x9f\x12 not http\r\n\r\n")

        t = threading.Thread(target=answer_garbage, daemon=True)
        t.start()
        url = f"http://127.0.0.1:{srv.getsockname()[1]}"
        with pytest.raises(LaunchError, match="not as vLLM"):
            _healthy(url)
        t.join(5)


def test_port_with_no_listener_is_not_yet_healthy():
    (port,) = free_ports(1)
    assert _healthy(f"http://127.0.0.1:{port}") is False
