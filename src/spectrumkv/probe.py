"""Deployment-time probe: does a model tolerate INT4 on the wire?

`paper`: the SpectrumKV paper's probe, three aggressive needle-in-a-haystack trials with the
3-tier policy at b=0.3; tolerated if at least 2 of 3 succeed.
`ppl+niah`: our probe, designed because three binary trials are noisy on small models: all-INT4
Delta-PPL on a few chunks (<= `max_ppl_pct`) *and* all-INT4 NIAH on the trials where the
uncompressed transfer succeeds (at most one miss).
The verdict is written as a model profile; the `adaptive` policy reads it: 3-tier spectrum when
INT4 is tolerated, FP16+INT8 with dropping (spectrum-2tier) when not.
"""

from __future__ import annotations

import time
from pathlib import Path

from .assets import cache_dir
from .engines.hf import Engine
from .errors import ConfigError
from .eval.niah import run_niah
from .eval.ppl import run_ppl
from .eval.runs import RunSpec

PROBES = ("paper", "ppl+niah")


def default_profile_path(engine: Engine) -> Path:
    safe = engine.name.strip("/").replace("/", "_")
    return cache_dir() / "profiles" / f"{safe}-{engine.fingerprint.weights_digest}.json"


def run_probe(
    engine: Engine,
    haystack: str,
    kind: str = "ppl+niah",
    context: int = 1024,
    trials: int = 3,
    max_ppl_pct: float = 1.0,
) -> dict:
    """Run a probe and return the profile (a JSON-able dict)."""
    if kind not in PROBES:
        raise ConfigError(f"unknown probe {kind!r}; expected one of {PROBES}")
    depths = [0.25, 0.5, 0.75][:trials] if trials <= 3 else [i / trials for i in range(trials)]
    evidence: dict = {}
    if kind == "paper":
        recs = run_niah(
            engine, "probe", haystack, [RunSpec("spectrum", 0.3)], [context], depths, n_needles=1
        )
        spec = [r.success for r in recs if r.policy == "spectrum"]
        evidence["niah_spectrum_b0.3"] = spec
        evidence["niah_fp16"] = [r.success for r in recs if r.policy == "fp16"]
        tolerated = sum(spec) >= 2
    else:
        ppl = run_ppl(
            engine,
            "probe",
            haystack,
            [RunSpec("uniform-int4", None)],
            context,
            max(16, context // 8),
            2,
        )
        recs = run_niah(
            engine,
            "probe",
            haystack,
            [RunSpec("uniform-int4", None)],
            [context],
            depths,
            n_needles=1,
        )
        fp16 = [r.success for r in recs if r.policy == "fp16"]
        int4 = [r.success for r in recs if r.policy == "uniform-int4"]
        misses = sum(f and not q for f, q in zip(fp16, int4, strict=True))
        evidence.update(int4_delta_ppl_pct=ppl[0].delta_pct, niah_fp16=fp16, niah_int4=int4)
        tolerated = ppl[0].delta_pct <= max_ppl_pct and misses <= 1
    return {
        "model": engine.name,
        "weights_digest": engine.fingerprint.weights_digest,
        "probe": kind,
        "context": context,
        "int4_tolerated": bool(tolerated),
        "evidence": evidence,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
