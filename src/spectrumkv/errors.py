"""Typed errors. Every failure a caller can act on has its own class."""


class SpectrumKVError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(SpectrumKVError, ValueError):
    """A configuration value is out of range or unknown."""


class BudgetError(SpectrumKVError, ValueError):
    """No plan of the requested policy fits the byte budget (or the budget is out of (0, 1])."""


class WireFormatError(SpectrumKVError):
    """A payload is malformed: bad magic, truncated, a length or offset out of range."""


class ChecksumError(WireFormatError):
    """A header or layer frame does not match its checksum."""


class IncompatiblePayloadError(SpectrumKVError):
    """A well-formed payload that this receiver cannot use: other model, version or layout."""


class AssetError(SpectrumKVError):
    """A model or corpus could not be found, fetched or converted."""
