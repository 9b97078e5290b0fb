"""Adapters that plug SpectrumKV into serving engines (optional extras)."""
