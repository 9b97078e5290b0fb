"""Disjoint splits of a corpus for SCD: what the fine-tune, the calibration, the layer selection
(dev) and the evaluation each read. No two splits share text.

A split is a character range of the corpus text (`assets.load_text`), cut at paragraph
boundaries. The evaluation split is the corpus' first tenth, which is also where `eval ppl`
reads, so results there are on text neither the fine-tune nor the calibration saw.
"""

from __future__ import annotations

from ..assets import load_text
from ..errors import ConfigError

#: name -> (start, end) as fractions of the corpus' characters.
SPLITS = {
    "eval": (0.0, 0.10),
    "dev": (0.10, 0.14),
    "calib": (0.14, 0.30),
    "finetune": (0.30, 1.0),
}


def split_text(corpus: str, split: str) -> str:
    """The text of one split of a corpus (a text file path or an alias such as `wiki`)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    text = load_text(corpus)
    lo, hi = SPLITS[split]
    return text[_cut(text, lo) : _cut(text, hi)]


def _cut(text: str, frac: float) -> int:
    """The first paragraph boundary at or after `frac` of the text (0 and 1 map to the ends)."""
    if frac <= 0:
        return 0
    if frac >= 1:
        return len(text)
    at = text.find("\n\n", int(len(text) * frac))
    return len(text) if at < 0 else at + 2
