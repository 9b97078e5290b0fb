import json

import pytest

from spectrumkv.assets import load_text
from spectrumkv.cli import main
from spectrumkv.config import PolicyConfig
from spectrumkv.errors import ConfigError
from spectrumkv.eval.niah import build_prompt, run_niah
from spectrumkv.eval.runs import RunSpec, parse_runs
from spectrumkv.profile import adaptive_policy, load_profile


def test_run_specs_parse_options_and_fixed_rate():
    runs = parse_runs("spectrum,pdtrim@fr=0.25,uniform-int4", "0.3,0.5")
    assert [(r.label, r.budget) for r in runs] == [
        ("spectrum", 0.3),
        ("spectrum", 0.5),
        ("pdtrim@fr=0.25", 0.3),
        ("pdtrim@fr=0.25", 0.5),
        ("uniform-int4", None),
    ]
    policy, scoring = RunSpec("spectrum@importance=positional+group=32", 0.3).configs()
    assert scoring.method == "positional" and policy.quant.group_size == 32
    assert RunSpec("pdtrim@fr=0.25", 0.3).configs()[0].pdtrim_fr == 0.25
    with pytest.raises(ConfigError, match="unknown run option"):
        RunSpec("spectrum@colour=red", 0.3).configs()
    with pytest.raises(ConfigError, match="profile"):
        RunSpec("adaptive", 0.3).configs()


def test_adaptive_follows_the_profile(tmp_path):
    p = tmp_path / "profile.json"
    p.write_text(json.dumps({"int4_tolerated": False}))
    policy, _ = RunSpec(f"adaptive@profile={p}", 0.3).configs()
    assert policy.name == "spectrum-2tier"
    assert adaptive_policy(PolicyConfig(), {"int4_tolerated": True}).name == "spectrum"
    p.write_text("{}")
    with pytest.raises(ConfigError, match="int4_tolerated"):
        load_profile(p)


@pytest.mark.model
def test_niah_512_succeeds_at_budget_one(smol):
    ids = build_prompt(smol, load_text("wiki"), ("secret code of the blue door", "4817"), 0.5, 512)
    assert 450 < ids.numel() <= 560
    recs = run_niah(
        smol, "wiki", load_text("wiki"), [RunSpec("spectrum", 0.5)], [512], [0.5], n_needles=1
    )
    by = {r.policy: r for r in recs}
    assert by["fp16"].success, by["fp16"].answer
    assert by["fp16"].budget == 1.0 and by["spectrum"].wire_budget <= 0.5


@pytest.mark.model
def test_probe_writes_a_valid_profile_and_report_renders(tmp_path, capsys):
    prof = tmp_path / "smol.json"
    rc = main(
        [
            "probe",
            "--model",
            "smollm2-135m",
            "--context",
            "384",
            "--trials",
            "2",
            "--out",
            str(prof),
        ]
    )
    assert rc == 0
    profile = load_profile(prof)
    assert profile["probe"] == "ppl+niah" and "int4_delta_ppl_pct" in profile["evidence"]

    niah = tmp_path / "niah.json"
    assert (
        main(
            [
                "eval",
                "niah",
                "--contexts",
                "384",
                "--depths",
                "2",
                "--needles",
                "1",
                "--budgets",
                "0.3",
                "--policies",
                f"spectrum,adaptive@profile={prof}",
                "--json",
                str(niah),
            ]
        )
        == 0
    )
    ppl = tmp_path / "ppl.json"
    assert (
        main(
            [
                "eval",
                "ppl",
                "--context",
                "192",
                "--continuation",
                "32",
                "--chunks",
                "1",
                "--budgets",
                "0.3,0.5",
                "--policies",
                "spectrum,pdtrim",
                "--json",
                str(ppl),
            ]
        )
        == 0
    )
    out = tmp_path / "report"
    assert main(["report", str(ppl), str(niah), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "Delta-PPL" in md and "NIAH" in md
    pngs = list(out.glob("*.png"))
    assert len(pngs) == 2 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
