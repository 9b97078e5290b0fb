"""Prefill-decode disaggregation: a prefill worker and a decode worker in separate processes."""
