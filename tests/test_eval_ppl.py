import json

import pytest

from spectrumkv.assets import load_text
from spectrumkv.cli import main
from spectrumkv.eval.ppl import run_ppl
from spectrumkv.eval.runs import RunSpec

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def records(smol):
    text = load_text("wiki")
    runs = [
        RunSpec("fp16", None),
        RunSpec("spectrum", 1.0),
        RunSpec("spectrum", 0.5),
        RunSpec("pdtrim", 0.5),
    ]
    recs = run_ppl(smol, "wiki", text, runs, context=320, continuation=64, n_chunks=4)
    return {(r.policy, r.budget): r for r in recs}


def test_budget_one_equals_fp16_exactly(records):
    for key in (("fp16", None), ("spectrum", 1.0)):
        assert records[key].ppl == records[key].ppl_fp16
        assert records[key].delta_pct == 0.0


def test_spectrum_beats_pdtrim_at_half_budget(records):
    spec, trim = records[("spectrum", 0.5)], records[("pdtrim", 0.5)]
    assert spec.wire_budget <= 0.5 and trim.wire_budget <= 0.5
    assert spec.delta_pct < trim.delta_pct


def test_eval_ppl_command_writes_records(tmp_path, capsys):
    corpus = tmp_path / "text.txt"
    corpus.write_text(load_text("wiki")[20000:40000], encoding="utf-8")
    out = tmp_path / "ppl.json"
    cmd = [
        "eval",
        "ppl",
        "--context",
        "192",
        "--continuation",
        "32",
        "--chunks",
        "1",
        "--budgets",
        "0.4",
        "--corpus",
    ]
    rc = main([*cmd, str(corpus), "--policies", "spectrum,uniform-int8", "--json", str(out)])
    assert rc == 0
    recs = json.loads(out.read_text())
    assert {(r["policy"], r["budget"]) for r in recs} == {("spectrum", 0.4), ("uniform-int8", None)}
    for r in recs:
        assert set(
            ["model", "corpus", "policy", "budget", "wire_budget", "ppl", "ppl_fp16", "delta_pct"]
        ) <= set(r)
    assert "dPPL" in capsys.readouterr().out
    # resume: a second run with one more spec only computes the new one
    specs = "spectrum,uniform-int8,pdtrim@fr=0.25"
    rc = main([*cmd, str(corpus), "--policies", specs, "--json", str(out)])
    assert rc == 0
    recs2 = json.loads(out.read_text())
    assert recs2[:2] == recs and recs2[2]["policy"] == "pdtrim@fr=0.25"


def test_paper_protocol_reference_and_kivi(smol):
    text = load_text("wiki")
    runs = [RunSpec("spectrum", 1.0), RunSpec("kivi2", None), RunSpec("spectrum", 0.3)]
    recs = run_ppl(
        smol, "wiki", text, runs, context=256, continuation=32, n_chunks=1, protocol="paper"
    )
    by = {r.policy: r for r in recs if r.budget != 0.3}
    assert by["spectrum"].delta_pct == 0.0 and by["spectrum"].protocol == "paper"
    assert by["kivi2"].wire_budget < 0.35 and by["kivi2"].delta_pct > 0
