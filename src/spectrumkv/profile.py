"""Model profiles: what the deployment-time probe found, and the `adaptive` policy it drives."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from .config import PolicyConfig
from .errors import ConfigError


def save_profile(profile: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=1), encoding="utf-8")


def load_profile(path: Path) -> dict:
    try:
        profile = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read model profile {path}: {e}") from None
    if not isinstance(profile.get("int4_tolerated"), bool):
        raise ConfigError(f"model profile {path} has no boolean 'int4_tolerated'")
    return profile


def adaptive_policy(policy: PolicyConfig, profile: dict) -> PolicyConfig:
    """The policy `adaptive` stands for under a profile."""
    return replace(policy, name="spectrum" if profile["int4_tolerated"] else "spectrum-2tier")
