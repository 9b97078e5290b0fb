"""The calibration artifact: a directory with `tensors.safetensors` (every encoder, decoder,
mean, PCA basis and aligner weight, float32) and `manifest.json` (both models' fingerprints,
ranks, patch layers, epsilon, calibration corpus and split, the tensors' sha256). Nothing is
pickled. A corrupted artifact or one used with other models is a typed error.

Tensor names, per layer i: `i.k.{mu_a,enc,dec,mu_b}` and `i.v.{...}` (reuse path; `dec` and
`mu_b` are the blend alpha * cross-model + (1 - alpha) * self decoder, see fit.py, so the wire
and the workers only ever see one decoder);
at patch layers `i.h.{mu,basis}` (A's attention-input PCA) and `i.al.{lin,up,down}.{weight,bias}`
(the aligner).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..assets import sha256_file
from ..errors import IncompatiblePayloadError, SpectrumKVError
from ..wire import Fingerprint
from .fit import Aligner

VERSION = 1


class ArtifactError(SpectrumKVError):
    """An SCD artifact is missing, malformed or corrupted."""


class ArtifactMismatchError(ArtifactError, IncompatiblePayloadError):
    """An SCD artifact calibrated for other models than the ones given."""


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """What an artifact was calibrated for and how. `ranks[i]` = (r_K, r_V) of layer i's reuse
    path (unused at patch layers); `patch_rank` = r_H; `kl_dev` = mean token
    KL(B with codes || oracle) measured on the dev split with these settings (nats);
    `code_budget` = reuse-path code bytes as a fraction of raw FP16 KV bytes.
    `alphas[i]` = (alpha_K, alpha_V) of layer i's decoders (1: the cross-model map, 0: A's own
    K/V, what raw reuse sends), baked into the tensors; `kl_dev_identity` = dev KL with every
    alpha 0 and no patches. Both are absent (empty, 0) in artifacts made before the shrinkage,
    whose decoders are the cross-model maps (alpha 1); omitted defaults keep their digests.
    `head_tokens` / `tail_tokens`: B recomputes a prompt's first / last this many tokens
    itself (`scd.refresh`; A codes all but the tail); 0 (and absent, in older artifacts): B
    uses the rebuilt cache of every token. `refresh_dev`: (head, tail, dev KL) of every refresh
    candidate calibration scored before choosing `head_tokens` / `tail_tokens` (empty: none)."""

    version: int
    producer: Fingerprint
    consumer: Fingerprint
    ranks: list[tuple[int, int]]
    patch_layers: list[int]
    patch_rank: int
    aligner_width: int
    eps: float
    kl_dev: float
    code_budget: float
    corpus: str
    split: str
    prompts: int
    prompt_tokens: int
    tensors_sha256: str = ""
    alphas: list[tuple[float, float]] = []
    kl_dev_identity: float = 0.0
    head_tokens: int = 0
    tail_tokens: int = 0
    refresh_dev: list[tuple[int, int, float]] = []


@dataclass
class Artifact:
    manifest: Manifest
    tensors: dict[str, torch.Tensor]
    _aligners: dict[int, Aligner] = field(default_factory=dict, repr=False)

    def aligner(self, layer: int) -> Aligner:
        """Layer's aligner module (built once)."""
        if layer not in self._aligners:
            t = self.tensors
            basis, w = t[f"{layer}.h.basis"], t[f"{layer}.al.up.weight"]
            al = Aligner(basis.shape[1], t[f"{layer}.al.lin.weight"].shape[0], w.shape[0])
            prefix = f"{layer}.al."
            al.load_state_dict({k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)})
            self._aligners[layer] = al.eval()
        return self._aligners[layer]


def digest(art: Artifact) -> str:
    """The artifact's identity on the wire: sha256 (hex) of its manifest, which records the
    tensors' sha256, so two artifacts share a digest only when both agree."""
    return hashlib.sha256(msgspec.json.encode(art.manifest)).hexdigest()


def check_models(art: Artifact, producer: Fingerprint, consumer: Fingerprint) -> None:
    """ArtifactMismatchError unless the artifact was calibrated for this producer and consumer."""
    for role, want, got in (
        ("producer", art.manifest.producer, producer),
        ("consumer", art.manifest.consumer, consumer),
    ):
        if want != got:
            raise ArtifactMismatchError(
                f"artifact calibrated for {role} {want.arch}/{want.weights_digest}, "
                f"got {got.arch}/{got.weights_digest}"
            )


def save(art: Artifact, out: str | Path) -> Path:
    """Write the artifact directory (tensors first, then the manifest with their sha256)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous() for k, v in art.tensors.items()}
    save_file(tensors, str(out / "tensors.safetensors"))
    sha = sha256_file(out / "tensors.safetensors")
    manifest = msgspec.structs.replace(art.manifest, tensors_sha256=sha)
    (out / "manifest.json").write_bytes(msgspec.json.format(msgspec.json.encode(manifest)))
    art.manifest = manifest
    return out


def load(path: str | Path) -> Artifact:
    """Read and verify an artifact directory; ArtifactError on anything wrong."""
    path = Path(path)
    try:
        raw = (path / "manifest.json").read_bytes()
        manifest = msgspec.json.decode(raw, type=Manifest)
    except OSError as e:
        raise ArtifactError(f"no readable SCD artifact at {path}: {e}") from None
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise ArtifactError(f"{path}/manifest.json is not a valid SCD manifest: {e}") from None
    if manifest.version != VERSION:
        raise ArtifactError(f"artifact version {manifest.version}, this code reads {VERSION}")
    tfile = path / "tensors.safetensors"
    if not tfile.is_file() or sha256_file(tfile) != manifest.tensors_sha256:
        raise ArtifactError(f"{tfile} is missing or does not match the manifest's sha256")
    try:
        tensors = load_file(str(tfile))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{tfile}: {e}") from None
    art = Artifact(manifest, tensors)
    _check_layout(art)
    return art


def _check_layout(art: Artifact) -> None:
    """Every tensor the manifest implies is present with consistent shapes."""
    m, t = art.manifest, art.tensors
    width = m.consumer.n_kv_heads * m.consumer.head_dim
    if len(m.ranks) != m.consumer.n_layers or m.producer.n_layers != m.consumer.n_layers:
        raise ArtifactError("manifest ranks do not cover every layer")
    if m.alphas and (
        len(m.alphas) != len(m.ranks) or not all(0 <= x <= 1 for p in m.alphas for x in p)
    ):
        raise ArtifactError("manifest alphas must be one (alpha_K, alpha_V) in [0, 1] per layer")
    if m.head_tokens < 0 or m.tail_tokens < 0:
        raise ArtifactError(f"manifest head_tokens / tail_tokens must be >= 0, got "
                            f"{m.head_tokens} / {m.tail_tokens}")  # fmt: skip
    try:
        for i, (rk, rv) in enumerate(m.ranks):
            if i in m.patch_layers:
                if t[f"{i}.h.basis"].shape[1] != m.patch_rank:
                    raise ArtifactError(f"layer {i}: patch basis is not rank {m.patch_rank}")
                art.aligner(i)
                continue
            for kv, r in (("k", rk), ("v", rv)):
                if t[f"{i}.{kv}.enc"].shape[1] != r or t[f"{i}.{kv}.dec"].shape != (r, width):
                    raise ArtifactError(f"layer {i} {kv}: maps are not rank {r} x {width}")
    except KeyError as e:
        raise ArtifactError(f"artifact lacks tensor {e}") from None
    except RuntimeError as e:  # load_state_dict shape mismatch
        raise ArtifactError(f"aligner tensors: {e}") from None
