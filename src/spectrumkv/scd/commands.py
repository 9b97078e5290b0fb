"""`spectrumkv scd ...`: argument parsing and dispatch."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add `spectrumkv scd` (finetune, calibrate, eval) to the main parser."""
