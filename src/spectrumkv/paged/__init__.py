"""PersistentKV: a paged KV cache and page-aware decode attention with a calibrated route picker."""
