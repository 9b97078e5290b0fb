"""Disjoint splits of a corpus for SCD: what the fine-tune, the calibration, the layer selection
(dev) and the evaluation each read. No two splits share text.

A corpus is a text file path, an alias (`wiki`, via `assets.load_text`), or `ALIAS:TOPIC` for
the articles of one topic of a JSON alias whose records carry a `topic` field (e.g.
`wiki:Biology and health sciences`): a narrower domain for a fine-tune. A split is a character
range of the corpus text, cut at paragraph boundaries. The evaluation split is the corpus'
first tenth, which is also where `eval ppl` reads, so results there are on text neither the
fine-tune nor the calibration saw. Articles are ordered by title in both `wiki` and
`wiki:TOPIC`, so a topic's `finetune` split (its titles from ~30 % on) does not reach `wiki`'s
`eval` split (the first tenth of all titles).
"""

from __future__ import annotations

import json

from ..assets import CORPUS_ALIASES, load_text, packaged_file
from ..errors import ConfigError

#: The default fine-tune recipe's corpus (the Spanish Wikipedia summaries). SCD's calibration,
#: evaluation, pair check and demo prompts default to it too, so the default pair is measured in
#: the domain B was tuned on, on splits the fine-tune never read.
DEFAULT_CORPUS = "wiki-es"

#: name -> (start, end) as fractions of the corpus' characters.
SPLITS = {
    "eval": (0.0, 0.10),
    "dev": (0.10, 0.14),
    "calib": (0.14, 0.30),
    "finetune": (0.30, 1.0),
}


def corpus_text(corpus: str) -> str:
    """The whole text of a corpus: `ALIAS:TOPIC` keeps the articles of one topic (in title
    order, like `load_text`); anything else is `assets.load_text(corpus)`."""
    alias, sep, topic = corpus.partition(":")
    if not sep or alias not in CORPUS_ALIASES:
        return load_text(corpus)
    data = json.loads(packaged_file(CORPUS_ALIASES[alias]).read_text(encoding="utf-8"))
    keep = [k for k in sorted(data) if data[k].get("topic") == topic and data[k].get("extract")]
    if not keep:
        topics = sorted({str(v.get("topic")) for v in data.values()})
        raise ConfigError(f"corpus {alias!r} has no topic {topic!r}; topics: {', '.join(topics)}")
    return "\n\n".join(data[k]["extract"].strip() for k in keep)


def split_text(corpus: str, split: str) -> str:
    """The text of one split of a corpus (see `corpus_text`)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    text = corpus_text(corpus)
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
