"""Typed errors of the paged KV cache and decode attention."""

from ..errors import SpectrumKVError


class PagedInputError(SpectrumKVError, ValueError):
    """A bad argument: a block table pointing past the pool, a length < 1 or past its table,
    mismatched dtypes, head counts or batch sizes, an unknown route or request."""


class CacheFullError(SpectrumKVError):
    """The page pool has too few free pages for an allocation; nothing was changed."""
