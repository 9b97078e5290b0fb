"""The decode engine: continuous batching over the paged KV cache (spectrumkv.paged)."""
