"""Semantic Cache Distillation: model A's prefill rebuilds a fine-tuned model B's KV cache."""
