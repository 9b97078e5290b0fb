"""Configuration dataclasses: validated once at construction, then passed down unchanged."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from .errors import BudgetError, ConfigError

QuantScheme = Literal["asym-group", "sym-token", "kivi"]
BudgetMode = Literal["wire", "nominal"]
ScoreMethod = Literal["attention", "positional", "keynorm", "random"]

POLICIES = (
    "spectrum",
    "spectrum-opt",
    "spectrum-layer",
    "spectrum-2tier",
    "sink-protect",
    "pdtrim",
    "snapkv-drop",
    "uniform-int8",
    "uniform-int4",
    "random-tier",
    "fp16",
    "kivi2",
)
#: Policies whose size does not depend on the budget (run once, at their own rate).
FIXED_RATE = ("uniform-int8", "uniform-int4", "fp16", "kivi2")


@dataclass(frozen=True)
class QuantConfig:
    """How integer tiers are quantized.

    `asym-group`: asymmetric min/scale per group of `group_size` elements along head_dim,
    scale and minimum stored as FP16 (4 bytes per group).
    `sym-token`: the SpectrumKV paper's quantizer, symmetric absmax with one FP16 scale per
    (token, layer, K|V) over all heads and dims (2 bytes).
    `kivi`: KIVI-style: keys per channel over blocks of `group_size` consecutive tokens (of the
    same tier), values per token in groups of `group_size` along head_dim; FP16 scale + minimum.
    `rotate`: multiply each head vector by an orthonormal Hadamard matrix before quantizing (and
    back after), which spreads outlier channels over the group. Measured on SmolLM2 keys: INT4
    group-64 relative MSE 0.018 -> 0.007. FP16 tiers are never rotated.
    How both settings apply to a model's head_dim (the group a head vector actually uses, the
    rotation's blocks) is its `geometry(head_dim)`: the one place every codec and the receiver
    read it from.
    """

    group_size: int = 64
    scheme: QuantScheme = "asym-group"
    rotate: bool = True

    def __post_init__(self) -> None:
        if self.scheme not in ("asym-group", "sym-token", "kivi"):
            raise ConfigError(f"unknown quantization scheme {self.scheme!r}")
        g = self.group_size
        if g < 4 or g > 1024 or g & (g - 1):
            raise ConfigError(f"group_size must be a power of two in [4, 1024], got {g}")

    def geometry(self, head_dim: int) -> Geometry:
        """How a head vector of `head_dim` channels is quantized (ConfigError if it cannot be)."""
        return _geometry(self.group_size, self.rotate, head_dim)

    def group_for(self, head_dim: int) -> int:
        """Effective group size for a head dimension: `geometry(head_dim).group`."""
        return self.geometry(head_dim).group


@dataclass(frozen=True)
class Geometry:
    """The layout of one head vector in the integer tiers, shared by the encoder, both codecs
    (compiled and reference) and the receiver, which all derive it from a `QuantConfig` and the
    model's head_dim (`QuantConfig.geometry`), so they cannot disagree.

    `group`: channels per FP16 (scale, minimum) pair: the largest power of two up to
    `group_size` that divides head_dim (a group never spans two heads); for a power-of-two
    head_dim that is min(group_size, head_dim), e.g. head_dim 96 with group_size 64 -> 32.
    `blocks`: the Hadamard rotation as independent orthonormal blocks of consecutive channels,
    each a power of two, largest first (head_dim 128 -> (128,), 96 -> (64, 32), 80 -> (64, 16));
    () without rotation. Every block boundary is a multiple of `group`.
    """

    head_dim: int
    group: int
    blocks: tuple[int, ...]

    @property
    def rotate(self) -> bool:
        return bool(self.blocks)


#: Largest head_dim a frame may describe (the compiled codec's limit).
MAX_HEAD_DIM = 4096


@lru_cache(maxsize=256)
def _geometry(group_size: int, rotate: bool, head_dim: int) -> Geometry:
    if not (4 <= head_dim <= MAX_HEAD_DIM) or head_dim % 4:
        raise ConfigError(
            f"head_dim must be a multiple of 4 in [4, {MAX_HEAD_DIM}] (INT2 packs 4 codes a byte), "
            f"got {head_dim}"
        )
    blocks = tuple(1 << b for b in range(head_dim.bit_length() - 1, -1, -1) if head_dim >> b & 1)
    return Geometry(head_dim, math.gcd(group_size, head_dim), blocks if rotate else ())


@dataclass(frozen=True)
class ScoreConfig:
    """Token importance. `window`: observation window W (tokens); `pool`: max-pool width (odd).
    `layers`: score from the first `layers` layers that hold the whole prompt only (0 = all;
    see `importance.scoring_layers`). A prefill worker that streams layer by layer can plan, and
    start sending, as soon as those layers are done."""

    method: ScoreMethod = "attention"
    window: int = 32
    pool: int = 7
    seed: int = 0
    layers: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("attention", "positional", "keynorm", "random"):
            raise ConfigError(f"unknown importance method {self.method!r}")
        if self.window < 1:
            raise ConfigError(f"window must be >= 1, got {self.window}")
        if self.pool < 1 or self.pool % 2 == 0:
            raise ConfigError(f"pool must be a positive odd width, got {self.pool}")
        if self.layers < 0:
            raise ConfigError(f"layers must be >= 0, got {self.layers}")


@dataclass(frozen=True)
class PolicyConfig:
    """Budget -> tier map.

    `budget`: target size relative to the FP16 cache of the same tokens, in (0, 1]; 1.0 is the
    uncompressed reference. `None` is allowed only for fixed-rate policies (uniform-*, fp16).
    `budget_mode`: `wire` counts every byte on the wire (payload, scales, tier maps, headers,
    checksums); `nominal` is the paper's accounting (FP16=1, INT8=1/2, INT4=1/4, nothing else).
    `sinks`: first tokens forced to FP16 (SinkProtect). `pdtrim_fr`: fraction of PDTrim's kept
    tokens taken from the start of the prompt. `seed`: for `random-tier`.
    """

    name: str = "spectrum"
    budget: float | None = 0.5
    budget_mode: BudgetMode = "wire"
    sinks: int = 4
    pdtrim_fr: float = 0.5
    seed: int = 0
    quant: QuantConfig = QuantConfig()

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ConfigError(
                f"unknown policy {self.name!r}; expected one of {', '.join(POLICIES)}"
            )
        if self.budget_mode not in ("wire", "nominal"):
            raise ConfigError(f"unknown budget mode {self.budget_mode!r}")
        if self.budget is None:
            if not self.fixed_rate:
                raise ConfigError(f"policy {self.name!r} needs a budget")
        elif not (0.0 < self.budget <= 1.0):
            raise BudgetError(f"budget must be in (0, 1], got {self.budget}")
        if self.sinks < 0:
            raise ConfigError(f"sinks must be >= 0, got {self.sinks}")
        if not (0.0 <= self.pdtrim_fr <= 1.0):
            raise ConfigError(f"pdtrim_fr must be in [0, 1], got {self.pdtrim_fr}")
        if (self.name == "kivi2") != (self.quant.scheme == "kivi"):
            raise ConfigError(
                "the kivi quantization scheme goes with the kivi2 policy, and only it"
            )

    @property
    def fixed_rate(self) -> bool:
        """True for policies whose size does not depend on the budget."""
        return self.name in FIXED_RATE
