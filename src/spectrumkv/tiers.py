"""Precision tiers and their exact wire cost.

Tier codes are ordered by precision, so `a > b` means "a keeps more information than b".
They are also the 4-bit values written in a frame's tier map.
"""

from enum import IntEnum

import torch


class Tier(IntEnum):
    DROP = 0
    INT2 = 1
    INT4 = 2
    INT8 = 3
    FP16 = 4


#: Bits per element of the stored code. FP16 means "the engine's 16-bit KV dtype, bit exact".
TIER_BITS = {Tier.INT2: 2, Tier.INT4: 4, Tier.INT8: 8, Tier.FP16: 16}

#: The paper's nominal cost of a token relative to FP16 (scales and metadata not counted).
NOMINAL_COST = {Tier.DROP: 0.0, Tier.INT2: 0.125, Tier.INT4: 0.25, Tier.INT8: 0.5, Tier.FP16: 1.0}

QUANT_TIERS = (Tier.INT2, Tier.INT4, Tier.INT8)
#: Order in which tiers are laid out inside a frame.
STORED_TIERS = (Tier.FP16, Tier.INT8, Tier.INT4, Tier.INT2)

#: Relative squared error (||x - x_hat||^2 / ||x||^2) of a token's K/V at each tier, measured on
#: the prompt caches of SmolLM2-135M and Gemma-3-270M with the default quantizer (group 64,
#: Hadamard rotation); both models agree within 5%. DROP loses the token entirely.
TIER_ERROR = {Tier.FP16: 0.0, Tier.INT8: 2.7e-5, Tier.INT4: 7.6e-3, Tier.INT2: 0.19, Tier.DROP: 1.0}


_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def as_tier_codes(tiers: torch.Tensor) -> torch.Tensor:
    """A one-dimensional tensor of Tier codes as a contiguous uint8 tensor: itself when it
    already is one (an unneeded `.to(...).contiguous()` costs ~1.5 us, on every frame), else a
    converted copy. ValueError for another shape or dtype, or, when converting, a value outside
    the codes (which uint8 would wrap: -252 would become FP16). uint8 codes above FP16 are
    rejected where the map is counted."""
    if tiers.dim() != 1 or tiers.dtype not in _INT_DTYPES:
        raise ValueError(
            f"a tier list is one-dimensional integer Tier codes, got {tuple(tiers.shape)} "
            f"{tiers.dtype}"
        )
    if tiers.dtype == torch.uint8:
        return tiers if tiers.is_contiguous() else tiers.contiguous()
    if tiers.numel() and (int(tiers.min()) < 0 or int(tiers.max()) > Tier.FP16):
        raise ValueError("invalid tier code in tier list")
    return tiers.to(torch.uint8).contiguous()
