import json

import pytest

from spectrumkv import assets
from spectrumkv.cli import main
from spectrumkv.errors import AssetError


def test_text_file_corpus(tmp_path):
    f = tmp_path / "my.txt"
    f.write_text("hello world", encoding="utf-8")
    assert assets.load_text(str(f)) == "hello world"


def test_wiki_corpus_is_real_text():
    text = assets.load_text("wiki")
    assert len(text) > 1_000_000 and "music" in text


def test_unknown_corpus_and_bad_model_dir(tmp_path):
    with pytest.raises(AssetError, match="neither a file nor a known alias"):
        assets.load_text("no-such-corpus")
    with pytest.raises(AssetError, match="config.json"):
        assets.model_dir(str(tmp_path))


def test_hub_ids_pass_through():
    assert assets.model_dir("someorg/some-model") == "someorg/some-model"


@pytest.mark.model
def test_alias_loads_fast_from_converted_directory(smol):
    import time

    from spectrumkv.engines.hf import load

    path = assets.model_dir("smollm2-135m")
    assert (path / "model.safetensors").is_file() and (path / ".complete").is_file()
    t0 = time.perf_counter()
    engine = load(str(path))  # a local HF directory, as a user would bring
    assert time.perf_counter() - t0 < 10  # generous for a noisy CI box; ~0.7 s measured
    assert engine.fingerprint == smol.fingerprint


@pytest.mark.model
def test_demo_json_records(tmp_path, capsys):
    out = tmp_path / "demo.json"
    rc = main(["demo", "--prompt", "Name a color.", "--max-new-tokens", "4", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert {r["policy"] for r in rows} == {"spectrum", "pdtrim"}
    for r in rows:
        assert {
            "policy",
            "budget",
            "wire_bytes",
            "fp16_bytes",
            "matched_tokens",
            "generated_tokens",
            "text",
        } <= r.keys()
        assert r["wire_bytes"] <= r["budget"] * r["fp16_bytes"] or r["budget"] == 1.0
    assert "wire/fp16" in capsys.readouterr().out


def test_cli_reports_typed_errors(capsys):
    assert main(["demo", "--model", "/nonexistent/model/dir"]) == 2
    assert "AssetError" in capsys.readouterr().err
