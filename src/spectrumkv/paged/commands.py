"""`spectrumkv bench attention` / `bench calibrate`: argument parsing and dispatch."""

from __future__ import annotations

import argparse


def register(bench: argparse._SubParsersAction) -> None:
    """Add the paged-attention benchmarks to `spectrumkv bench`."""
