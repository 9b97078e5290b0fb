"""The README is checked against the code: its library example runs and prints the plan it
describes, and every command and policy the CLI offers is documented."""

import argparse
import re
from pathlib import Path

import pytest

from spectrumkv.cli import build_parser
from spectrumkv.config import POLICIES
from spectrumkv.tiers import NOMINAL_COST, Tier

README = Path(__file__).parent.parent / "README.md"


def _readme() -> str:
    return README.read_text(encoding="utf-8")


@pytest.mark.model
def test_readme_python_example_runs_and_prints_the_plans_tier_counts(capsys):
    blocks = re.findall(r"```python\n(.*?)```", _readme(), flags=re.S)
    assert blocks, "README has no python example"
    ns: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), ns)
    out = capsys.readouterr().out
    plan, payload = ns["plan"], ns["payload"]
    counts = plan.counts()
    assert str(counts) in out  # what the example prints is the plan's count per tier
    held = int(plan.present.sum())
    assert sum(counts.values()) == held > 0  # every held (layer, token) slot counted once
    nominal = sum(n * NOMINAL_COST[Tier[name]] for name, n in counts.items()) / held
    assert nominal == pytest.approx(plan.nominal_budget, rel=1e-6)  # counts agree with the plan
    budget = ns["skv"].PolicyConfig("spectrum", budget=0.3).budget
    assert len(payload) == plan.wire_bytes and plan.wire_budget <= budget
    # a 0.3 budget cannot hold the prompt in FP16 or INT8: most slots are INT4, the tokens
    # ranked most important get more
    assert counts["INT4"] > held // 2 and counts["FP16"] + counts["INT8"] > 0
    assert out.strip().splitlines()[-1].strip()  # and generated text was printed


def _commands(prefix: str, parser: argparse.ArgumentParser) -> list[str]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [prefix]
    return [c for name, p in subs[0].choices.items() for c in _commands(f"{prefix} {name}", p)]


def test_every_command_and_policy_is_in_the_readme():
    text = " ".join(_readme().split())  # line breaks inside `spectrumkv eval agreement` too
    missing = [c for c in _commands("spectrumkv", build_parser()) if c not in text]
    missing += [p for p in POLICIES if f"`{p}`" not in text]
    assert not missing, f"README does not mention: {', '.join(missing)}"
