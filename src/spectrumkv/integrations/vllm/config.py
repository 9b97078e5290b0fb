"""The connector's settings, read once from vLLM's `kv_connector_extra_config` and validated.

    {"kv_connector": "SpectrumKVConnector",
     "kv_connector_module_path": "spectrumkv.integrations.vllm",
     "kv_role": "kv_producer" | "kv_consumer",
     "kv_load_failure_policy": "recompute",
     "kv_connector_extra_config": {"policy": "spectrum", "budget": 0.5,
                                   "receiver": "127.0.0.1:14600", ...}}

The shared secret comes from $SPECTRUMKV_SECRET (both instances), never from the command line.
Unknown keys are refused, so a typo cannot silently fall back to a default.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from ...config import PolicyConfig, QuantConfig
from ...errors import ConfigError
from ...transport.auth import secret_from_env

#: Policies that never drop a token. vLLM's paged cache holds every prompt position (attention
#: masks are built from sequence lengths, not per-slot), so a dropped token cannot be expressed.
NO_DROP_POLICIES = ("spectrum", "spectrum-2tier", "uniform-int8", "uniform-int4", "fp16")
ROLES = {"kv_producer": "producer", "kv_consumer": "consumer"}
#: Importance scorers that need only the cached keys (importance.py): `keynorm` (small key
#: norms attract attention) or `positional` (the SpectrumKV paper's decay + recency heuristic).
PROXIES = ("keynorm", "positional")

#: Keys the proxy puts in a request's `kv_transfer_params`:
#:   prefill request: {TRANSFER_ID: id, BUDGET: 0.5 (optional, overrides the producer's)}
#:   decode request:  {TRANSFER_ID: id, LOAD: true}
TRANSFER_ID = "spectrumkv_transfer_id"
BUDGET = "spectrumkv_budget"
LOAD = "spectrumkv_load"


@dataclass(frozen=True)
class ConnectorConfig:
    """role: `producer` (prefill instance: scores, encodes, pushes) or `consumer` (decode
    instance: receives, verifies, decodes into its paged cache).
    receiver: host:port the consumer listens on and the producer pushes to.
    push_timeout_s: deadline of one push, connection to verdict (seconds).
    load_timeout_s: how long the consumer's step waits for a payload not yet arrived (seconds);
    past it the blocks are reported as load errors and vLLM recomputes them.
    inbox_mb / inbox_ttl_s: decoded payloads the consumer holds before their request comes.
    link_gbps / link_latency_s: link emulation on the producer (0 = off).
    tls_cert / tls_key (consumer) and tls_ca (producer): PEM paths; set them to run the push
    channel inside TLS (the producer checks the consumer's certificate against tls_ca).
    importance: how the producer ranks tokens without attention weights (see PROXIES).
    """

    role: Literal["producer", "consumer"]
    policy: PolicyConfig
    secret: bytes
    receiver_host: str = "127.0.0.1"
    receiver_port: int = 14600
    push_timeout_s: float = 30.0
    load_timeout_s: float = 5.0
    inbox_mb: int = 2048
    inbox_ttl_s: float = 120.0
    link_gbps: float = 0.0
    link_latency_s: float = 0.0
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    importance: str = "keynorm"

    def __post_init__(self) -> None:
        check_policy(self.policy)
        if self.importance not in PROXIES:
            raise ConfigError(
                f"importance must be one of {', '.join(PROXIES)} (vLLM never materialises "
                f"attention weights), got {self.importance!r}"
            )
        for name in ("push_timeout_s", "load_timeout_s", "inbox_ttl_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.inbox_mb < 1:
            raise ConfigError(f"inbox_mb must be >= 1, got {self.inbox_mb}")
        if self.link_gbps < 0 or self.link_latency_s < 0:
            raise ConfigError("link_gbps and link_latency_s must be >= 0")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key go together")
        if not 0 <= self.receiver_port < 65536:
            raise ConfigError(f"receiver port {self.receiver_port} out of range")

    @classmethod
    def from_extra(cls, kv_role: str, extra: dict[str, Any]) -> ConnectorConfig:
        """Build from vLLM's kv_role and kv_connector_extra_config."""
        if kv_role not in ROLES:
            raise ConfigError(
                f"SpectrumKVConnector needs kv_role kv_producer or kv_consumer, got {kv_role!r}"
            )
        extra = dict(extra)
        policy_keys = {"policy": "spectrum", "budget": 0.5, "sinks": 4, "group_size": 64}
        p = {k: extra.pop(k, v) for k, v in policy_keys.items()}
        host, port = _host_port(str(extra.pop("receiver", "127.0.0.1:14600")))
        simple = {f.name for f in fields(cls)} - {
            "role",
            "policy",
            "secret",
            "receiver_host",
            "receiver_port",
        }
        unknown = set(extra) - simple
        if unknown:
            raise ConfigError(f"unknown kv_connector_extra_config keys: {sorted(unknown)}")
        try:
            policy = PolicyConfig(
                str(p["policy"]),
                budget=float(p["budget"]),
                sinks=int(p["sinks"]),
                quant=QuantConfig(group_size=int(p["group_size"])),
            )
            values = {k: type(getattr(cls, k))(v) for k, v in extra.items()}
        except (TypeError, ValueError) as e:
            raise ConfigError(f"bad kv_connector_extra_config value: {e}") from None
        return cls(ROLES[kv_role], policy, secret_from_env(), host, port, **values)


def check_policy(policy: PolicyConfig) -> None:
    """Refuse policies the paged cache cannot represent (see NO_DROP_POLICIES)."""
    if policy.name not in NO_DROP_POLICIES:
        raise ConfigError(
            f"policy {policy.name!r} drops tokens or needs per-layer attention scores, which "
            f"vLLM's paged KV cache cannot take; use one of {', '.join(NO_DROP_POLICIES)}"
        )


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"receiver must be host:port, got {text!r}")
    return host, int(port)
