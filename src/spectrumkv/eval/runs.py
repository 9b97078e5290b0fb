"""Run specs for sweeps: `policy[@key=value[+key=value...]]` at a budget, e.g.
`pdtrim@fr=0.25`, `spectrum@importance=positional+sinks=0`, `uniform-int4` (fixed rate, run
once). Options: fr, importance, sinks, group, rotate, scheme, mode, window, pool, and for
`adaptive` the model profile written by `spectrumkv probe`: `adaptive@profile=PATH`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import FIXED_RATE, POLICIES, PolicyConfig, QuantConfig, ScoreConfig
from ..errors import ConfigError
from ..profile import adaptive_policy, load_profile

_OPTIONS = {
    "fr",
    "importance",
    "sinks",
    "group",
    "rotate",
    "scheme",
    "mode",
    "window",
    "pool",
    "layers",
    "profile",
}


@dataclass(frozen=True)
class RunSpec:
    label: str  # the spec as written, e.g. "pdtrim@fr=0.25"
    budget: float | None

    def configs(self) -> tuple[PolicyConfig, ScoreConfig]:
        name, _, rest = self.label.partition("@")
        opts = dict(kv.split("=", 1) for kv in rest.split("+") if kv) if rest else {}
        unknown = set(opts) - _OPTIONS
        if unknown:
            raise ConfigError(f"unknown run option(s) {sorted(unknown)} in {self.label!r}")
        kivi = name == "kivi2"  # KIVI's own setting: groups of 32, no rotation
        quant = QuantConfig(
            group_size=int(opts.get("group", 32 if kivi else 64)),
            scheme=opts.get("scheme", "kivi" if kivi else "asym-group"),  # type: ignore[arg-type]
            rotate=opts.get("rotate", "0" if kivi else "1") not in ("0", "false", "no"),
        )
        policy = PolicyConfig(
            "spectrum" if name == "adaptive" else name,
            budget=self.budget,
            budget_mode=opts.get("mode", "wire"),  # type: ignore[arg-type]
            sinks=int(opts.get("sinks", 4)),
            pdtrim_fr=float(opts.get("fr", 0.5)),
            quant=quant,
        )
        if name == "adaptive":
            if "profile" not in opts:
                raise ConfigError("adaptive needs a model profile: adaptive@profile=PATH")
            policy = adaptive_policy(policy, load_profile(Path(opts["profile"])))
        scoring = ScoreConfig(
            method=opts.get("importance", "attention"),  # type: ignore[arg-type]
            window=int(opts.get("window", 32)),
            pool=int(opts.get("pool", 7)),
            layers=int(opts.get("layers", 0)),
        )
        return policy, scoring


def parse_runs(policies: str, budgets: str) -> list[RunSpec]:
    """Every policy at every budget; fixed-rate policies once, at their own rate."""
    values = [float(b) for b in budgets.split(",") if b.strip()]
    runs: list[RunSpec] = []
    for label in (p.strip() for p in policies.split(",")):
        if not label:
            continue
        name = label.partition("@")[0]
        if name not in (*POLICIES, "adaptive"):
            raise ConfigError(f"unknown policy {name!r} in run spec {label!r}")
        fixed = name in FIXED_RATE
        runs.extend([RunSpec(label, None)] if fixed else [RunSpec(label, b) for b in values])
    return runs


def load_records(path: str | None) -> list[dict]:
    """Records already in a results file (for resuming a sweep)."""
    if path and Path(path).is_file():
        return json.loads(Path(path).read_text(encoding="utf-8"))
    return []


def save_records(path: str | None, records: list[dict]) -> None:
    """Write atomically, so an interrupted sweep leaves a valid file to resume from."""
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
    os.replace(tmp, path)
