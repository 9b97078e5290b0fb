"""`scd eval`: the PD protocol of `eval ppl` with model A's prefix reaching model B through each
method, B scoring the continuation. Text: the corpus' `eval` split (no fine-tune, calibration
or layer-selection text). Per method and chunk: NLL, mean token KL against B's own prefill
(the oracle), greedy agreement with the oracle's greedy continuation, exact bytes, and the
seconds B spends rebuilding its cache (the oracle: its own prefill)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..config import PolicyConfig, ScoreConfig
from ..engines.hf import Engine, Prefilled, decode_state, generate, prefill
from ..errors import BudgetError, ConfigError
from ..eval.ppl import corpus_chunks
from ..importance import score_tokens
from ..kv import LayerKV
from ..payload import decode_payload
from ..pipeline import encode, plan_transfer
from . import droidspeak, rope
from .artifact import Artifact, check_models
from .budget import code_plan, placed_tiers
from .capture import Captured, capture, check_pair
from .codes import encode as encode_codes
from .codes import encode_layer, reconstruct_layer
from .metrics import Scored, agreement, delta_pct_interval, kl, ratio_to_raw, score
from .refresh import coded_tokens, refresh
from .splits import DEFAULT_CORPUS, split_text
from .wire import Layout, ScdHeader, decode, frame_bytes, header_bytes


@dataclass(frozen=True)
class EvalConfig:
    corpus: str = DEFAULT_CORPUS
    # 24: at 8 chunks (127 scored tokens each) the chunk-to-chunk spread of ΔPPL (sd ~3 %) left
    # raw reuse's +1-3 % ΔPPL, and so every ratio to it, unresolved (RESULTS, SCD round 12)
    chunks: int = 24
    context: int = 1024
    continuation: int = 128
    greedy_tokens: int = 16
    budgets: tuple[float, ...] = (0.5, 0.3)
    quant_budgets: tuple[float, ...] = (0.5, 0.25)
    droid_width: int = 4
    droid_dev_chunks: int = 2
    # (head, tail) tokens B recomputes (scd.refresh) in the scd methods, None: the artifact's;
    # each pair of `refreshes` is measured as well, as raw-h{h}t{t} (raw reuse of the rest) and
    # scd-h{h}t{t}
    refresh: tuple[int, int] | None = None
    refreshes: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if not all(0 < b <= 1 for b in self.budgets + self.quant_budgets):
            raise ConfigError(f"budgets must be in (0, 1], got {self.budgets + self.quant_budgets}")
        if any(x < 0 for pair in (*self.refreshes, self.refresh or (0, 0)) for x in pair):
            raise ConfigError("refreshed head and tail tokens must be >= 0")


@dataclass
class Chunk:
    """One eval chunk: A's capture (+ its residual at the DroidSpeak span), B's (oracle)."""

    prompt: torch.Tensor  # the prefix both models prefill
    a: Captured
    hidden: torch.Tensor
    b: Captured
    feed: torch.Tensor
    oracle: Scored
    greedy: list[int]
    own_a: Scored  # A scoring the continuation from its own cache (how far apart A and B are)


Built = tuple[list[LayerKV], int, float]  # B's layers, bytes sent, seconds B spent rebuilding


def kv_bytes(layers: list[LayerKV]) -> int:
    """Raw FP16 bytes of a cache (keys and values)."""
    return sum(2 * (kv.keys.numel() + kv.values.numel()) for kv in layers)


def rerotated(a: Engine, b: Engine, layers: list[LayerKV]) -> list[LayerKV]:
    """A's cache for B: as is when their RoPE settings agree, else keys re-rotated with B's."""
    if a.fingerprint.rope == b.fingerprint.rope:
        return layers
    out = []
    for i, kv in enumerate(layers):
        ca, sa = rope.rotary(a.model, i, kv.positions)
        cb, sb = rope.rotary(b.model, i, kv.positions)
        k = rope.apply(rope.remove(kv.keys.float(), ca, sa), cb, sb).to(b.kv_dtype)
        out.append(LayerKV(k, kv.values.to(b.kv_dtype), kv.positions))
    return out


def _chunk(a: Engine, b: Engine, ids: torch.Tensor, split: int, span: int, cfg, inputs) -> Chunk:
    store: dict = {}
    hook = droidspeak.residual_hook(a, span, store)
    try:
        ca = capture(a, ids[: split - 1], input_layers=inputs)
    finally:
        hook.remove()
    cb = capture(b, ids[: split - 1], input_layers=inputs)
    feed = ids[split - 1 :]
    oracle = score(b, decode_state(b, cb.pre.layers, cb.pre.n_tokens), feed)
    ref = generate(b, decode_state(b, cb.pre.layers, cb.pre.n_tokens), int(feed[0]),
                   cfg.greedy_tokens)  # fmt: skip
    own_a = score(a, decode_state(a, ca.pre.layers, ca.pre.n_tokens), feed)
    return Chunk(ids[: split - 1], ca, store["hidden"], cb, feed, oracle, ref, own_a)


def methods(
    a: Engine, b: Engine, art: Artifact, control: Artifact | None, span: int, cfg: EvalConfig
) -> dict[str, Callable[[Chunk], Built]]:
    """Every method: name -> chunk -> (B's layers, bytes, rebuild seconds)."""

    def oracle(c: Chunk) -> Built:
        return c.b.pre.layers, kv_bytes(c.b.pre.layers), c.b.pre.prefill_s

    def raw(c: Chunk) -> Built:
        t0 = time.perf_counter()
        layers = rerotated(a, b, c.a.pre.layers)
        return layers, kv_bytes(c.a.pre.layers), time.perf_counter() - t0

    captured: dict[tuple[int, str, int], Captured] = {}
    inputs = set(art.manifest.patch_layers) | set(control.manifest.patch_layers if control else ())

    def coded(c: Chunk, src: str, m: int) -> Captured:
        """A's capture of the chunk's first m prompt tokens (for the control, B's): the tokens
        a tail refresh leaves to the codes; made once per chunk and m."""
        cap = c.a if src == "a" else c.b
        if m == cap.pre.n_tokens:
            return cap
        key = (id(c), src, m)
        if key not in captured:
            eng = a if src == "a" else b
            captured[key] = capture(eng, c.prompt[:m], input_layers=inputs)
        return captured[key]

    def raw_refresh(head: int, tail: int) -> Callable[[Chunk], Built]:
        def run(c: Chunk) -> Built:  # A's raw KV of all but the last `tail` tokens
            m = coded_tokens(c.a.pre.n_tokens, tail)
            sent = coded(c, "a", m).pre.layers
            t0 = time.perf_counter()
            layers = refresh(b, rerotated(a, b, sent), m, c.prompt, head)
            return layers, kv_bytes(sent), time.perf_counter() - t0

        return run

    def spectrum(budget: float) -> Callable[[Chunk], Built]:
        def run(c: Chunk) -> Built:
            header, plan = plan_transfer(a, c.a.pre, PolicyConfig(budget=budget))
            payload = encode(header, c.a.pre, plan)
            t0 = time.perf_counter()
            layers = rerotated(a, b, decode_payload(payload, expect=a.fingerprint).layers)
            return layers, len(payload), time.perf_counter() - t0

        return run

    def codes(artifact: Artifact, layout: Layout, src: str, quant: float | None = None,
              fresh: tuple[int, int] | None = None):  # fmt: skip
        def run(c: Chunk) -> Built:  # through the SCD wire: the bytes B would receive
            head, tail = fresh or refresh_of(art, cfg)
            cap = coded(c, src, coded_tokens(c.a.pre.n_tokens, tail))
            eng = a if src == "a" else b
            cs = [
                encode_layer(artifact, eng, i, kv, cap.inputs.get(i))
                for i, kv in enumerate(cap.pre.layers)
            ]
            payload = _payload(layout, cs, cap.pre, quant)
            t0 = time.perf_counter()
            _, got = decode(payload, layout)
            layers = [reconstruct_layer(artifact, b, x) for x in got]
            layers = refresh(b, layers, cap.pre.n_tokens, c.prompt, head)
            return layers, len(payload), time.perf_counter() - t0

        return run

    def droid(c: Chunk) -> Built:
        layers = list(rerotated(a, b, c.a.pre.layers))
        stop = min(span + cfg.droid_width, len(layers))
        fresh, secs = droidspeak.recompute_span(b, c.hidden, span, stop)
        layers[span:stop] = fresh
        sent = kv_bytes(c.a.pre.layers) - kv_bytes(c.a.pre.layers[span:stop])
        return layers, sent + 2 * c.hidden.numel(), secs

    reuse_only = Artifact(_no_patches(art), art.tensors)
    lay = Layout.of(art)  # Layout.of digests every tensor: once per artifact
    out = {"oracle": oracle, "raw": raw}
    out |= {f"raw-spectrum-b{b_:g}": spectrum(b_) for b_ in cfg.budgets}
    out |= {"reuse-only": codes(reuse_only, Layout.of(reuse_only), "a"), "droidspeak": droid,
            "scd": codes(art, lay, "a")}  # fmt: skip
    for h, t in cfg.refreshes:
        if h or t:  # raw-h0t0 is raw
            out[f"raw-h{h}t{t}"] = raw_refresh(h, t)
        out[f"scd-h{h}t{t}"] = codes(art, lay, "a", fresh=(h, t))
    # quantized codes at each budget they can meet (else that point is left out)
    n = cfg.context - cfg.continuation - 1  # a chunk's prefix
    feasible = [q for q in cfg.quant_budgets if _fits(lay, n, q)]
    out |= {f"scd-q{q:g}": codes(art, lay, "a", q) for q in feasible}
    if control is not None:
        ctl = Layout.of(control)
        out["control-same-model"] = codes(control, ctl, "b")
        if feasible and _fits(ctl, n, feasible[-1]):
            out[f"control-same-model-q{feasible[-1]:g}"] = codes(control, ctl, "b", feasible[-1])
    return out


def refresh_of(art: Artifact, cfg: EvalConfig) -> tuple[int, int]:
    """The (head, tail) tokens B recomputes in the scd methods: the config's, else the
    artifact's."""
    return cfg.refresh or (art.manifest.head_tokens, art.manifest.tail_tokens)


def _no_patches(art: Artifact):
    import msgspec

    return msgspec.structs.replace(art.manifest, patch_layers=[])


def _header(layout: Layout, n_tokens: int) -> ScdHeader:
    return ScdHeader(layout.producer, layout.consumer, layout.artifact, n_tokens)


def _fits(layout: Layout, n_tokens: int, budget: float) -> bool:
    """Whether codes of a prompt of n_tokens can meet `budget` on the SCD wire."""
    try:
        code_plan(layout, n_tokens, budget, len(header_bytes(_header(layout, n_tokens))))
    except BudgetError:
        return False
    return True


def _payload(layout: Layout, codes: list, pre: Prefilled, budget: float | None) -> bytes:
    """The SCD payload of `codes`: FP16 (`budget` None), else quantized as the prefill worker
    does (`budget.code_plan`: the most INT8 tokens by the project's importance scores, or the
    fewest dropped, that fit `budget` x B's raw FP16 KV bytes, every byte counted; the drops
    then fitted to the tokens' placement, `budget.placed_tiers`)."""
    n = pre.n_tokens
    header = _header(layout, n)
    head = header_bytes(header)
    plan = code_plan(layout, n, budget, len(head))
    scores = None
    if plan.needs_scores(n):
        scores, _ = score_tokens(ScoreConfig(), n, pre.layers, pre.window)
    tiers = placed_tiers(layout, n, budget, len(head), scores, plan)
    return head + b"".join(frame_bytes(c, tiers, header, layout) for c in codes)


def layer_errors(got: list[LayerKV], ref: list[LayerKV]) -> list[tuple[float, float]]:
    """Per layer relative squared error of keys and values against B's own cache, over the
    positions a method delivered (a payload that drops tokens holds a subset of B's)."""

    def rel(x, y):
        return float(((x.float() - y.float()) ** 2).sum() / (y.float() ** 2).sum())

    out = []
    for g, r in zip(got, ref, strict=True):
        rows = torch.searchsorted(r.positions, g.positions)
        k, v = r.keys.index_select(1, rows), r.values.index_select(1, rows)
        out.append((rel(g.keys, k), rel(g.values, v)))
    return out


def droid_span(a: Engine, b: Engine, cfg: EvalConfig) -> tuple[int, list[float]]:
    """DroidSpeak's profile on the dev split: per layer, KL of B with only that layer's KV
    taken from A; returns the chosen span's start and the per-layer damage."""
    split = cfg.context - cfg.continuation
    text = split_text(cfg.corpus, "dev")
    damage = [0.0] * a.fingerprint.n_layers
    for ids in corpus_chunks(a, text, cfg.context, cfg.droid_dev_chunks):
        pa, pb = prefill(a, ids[: split - 1]), prefill(b, ids[: split - 1])
        ra, feed = rerotated(a, b, pa.layers), ids[split - 1 :]
        oracle = score(b, decode_state(b, pb.layers, pb.n_tokens), feed)
        for i in tqdm(range(len(damage)), desc="droidspeak profile", leave=False):
            layers = list(pb.layers)
            layers[i] = ra[i]
            damage[i] += kl(score(b, decode_state(b, layers, pb.n_tokens), feed), oracle)
    return droidspeak.choose_span(damage, cfg.droid_width), damage


def run_eval(
    a: Engine, b: Engine, art: Artifact, control: Artifact | None, cfg: EvalConfig
) -> dict:
    """All methods on the eval split; returns {'records': [...], 'layer_errors': {...}, ...}."""
    check_models(art, a.fingerprint, b.fingerprint)
    if control is not None:
        check_models(control, b.fingerprint, b.fingerprint)
    span, damage = droid_span(a, b, cfg)
    split = cfg.context - cfg.continuation
    inputs = set(art.manifest.patch_layers) | set(control.manifest.patch_layers if control else ())
    ids_all = corpus_chunks(a, split_text(cfg.corpus, "eval"), cfg.context, cfg.chunks)
    chunks = [_chunk(a, b, ids, split, span, cfg, inputs) for ids in tqdm(ids_all, desc="prefills")]
    per: dict[str, dict] = {}
    errors: dict[str, list] = {}
    for name, build in tqdm(methods(a, b, art, control, span, cfg).items(), desc="methods"):
        keys = ("nll", "n", "kl", "rebuild", "prefill", "prefix", "f1")
        acc = per.setdefault(name, {k: [] for k in keys} | {"bytes": 0, "raw": 0, "kept": 0})
        errs = []
        for c in chunks:
            layers, nbytes, secs = build(c)
            got = score(b, decode_state(b, layers, c.b.pre.n_tokens), c.feed)
            out = generate(b, decode_state(b, layers, c.b.pre.n_tokens), int(c.feed[0]),
                           cfg.greedy_tokens)  # fmt: skip
            prefix, f1 = agreement(out, c.greedy)
            acc["nll"].append(got.nll)
            acc["n"].append(got.n)
            acc["kl"].append(kl(got, c.oracle))
            acc["bytes"] += nbytes
            acc["raw"] += kv_bytes(c.b.pre.layers)
            acc["kept"] += sum(kv.positions.numel() for kv in layers) / sum(
                kv.positions.numel() for kv in c.b.pre.layers
            )
            acc["rebuild"].append(secs)
            acc["prefill"].append(c.b.pre.prefill_s)
            acc["prefix"].append(prefix)
            acc["f1"].append(f1)
            errs.append(layer_errors(layers, c.b.pre.layers))
        errors[name] = [[statistics.fmean(e[i][j] for e in errs) for j in (0, 1)]
                        for i in range(len(errs[0]))]  # fmt: skip
    oracle_ppl = _ppl(per["oracle"])
    ora = per["oracle"]
    oracle_chunks = [math.exp(x / n) for x, n in zip(ora["nll"], ora["n"], strict=True)]
    records = []
    for name, acc in per.items():
        chunk_delta = [
            100 * (math.exp(x / n) / o - 1)
            for x, n, o in zip(acc["nll"], acc["n"], oracle_chunks, strict=True)
        ]
        ppl = _ppl(acc)
        records.append({
            "method": name, "bytes": acc["bytes"] / len(chunks),
            "bytes_ratio": acc["bytes"] / acc["raw"], "kept_ratio": acc["kept"] / len(chunks),
            "ppl": ppl, "ppl_oracle": oracle_ppl,
            "delta_pct": 100 * (ppl / oracle_ppl - 1),
            "delta_pct_chunk_std": statistics.stdev(chunk_delta) if len(chunks) > 1 else 0.0,
            "kl": statistics.fmean(acc["kl"]),
            "kl_chunk_std": statistics.stdev(acc["kl"]) if len(chunks) > 1 else 0.0,
            "exact_prefix": statistics.fmean(acc["prefix"]),
            "token_f1": statistics.fmean(acc["f1"]),
            "rebuild_s": statistics.fmean(acc["rebuild"]),
            "oracle_prefill_s": statistics.fmean(acc["prefill"]),
            "chunks": len(chunks), "context": cfg.context, "continuation": cfg.continuation,
            "nll_chunks": acc["nll"], "tokens_chunks": acc["n"], "kl_chunks": acc["kl"],
        } | _vs_raw(acc, per["raw"], ora))  # fmt: skip
    return {
        "records": records,
        "layer_errors": errors,
        "ppl_producer_own": math.exp(
            sum(c.own_a.nll for c in chunks) / sum(c.own_a.n for c in chunks)
        ),
        "droidspeak": {"start": span, "width": cfg.droid_width, "damage": damage},
        "manifest": {
            "patch_layers": art.manifest.patch_layers,
            "kl_dev": art.manifest.kl_dev,
            "eps": art.manifest.eps,
            "alphas": art.manifest.alphas,
            "kl_dev_identity": art.manifest.kl_dev_identity,
            "refresh": [art.manifest.head_tokens, art.manifest.tail_tokens],
            "refresh_dev": art.manifest.refresh_dev,
        },  # fmt: skip
    }


def _vs_raw(acc: dict, raw: dict, oracle: dict) -> dict:
    """A method's ΔPPL and KL as fractions of raw reuse's on the same chunks, each with a 95 %
    paired bootstrap interval over chunks (`metrics.ratio_to_raw`). An unbounded figure (raw
    reuse not resolved above the oracle) is None, so the JSON stays strict (no Infinity)."""
    d = ratio_to_raw(acc["nll"], raw["nll"], oracle["nll"], oracle["n"])
    k = ratio_to_raw(acc["kl"], raw["kl"])

    def bounded(x: float) -> float | None:
        return x if math.isfinite(x) else None

    out = {}
    for name, r in (("delta", d), ("kl", k)):
        out[f"{name}_ratio"] = bounded(r.value)
        out[f"{name}_ratio_ci95"] = [bounded(r.lo), bounded(r.hi)]
    return out


def pair_check(a: Engine, b: Engine, cfg: EvalConfig) -> dict:
    """How healthy and how different a pair is, on the same eval chunks as `run_eval`: A's and
    B's own PPL on the continuations, and B's PPL and token KL (vs its own prefill) when it
    decodes from A's raw cache (raw reuse). ConfigError for models that cache different rows."""
    check_pair(a, b)
    split = cfg.context - cfg.continuation
    acc: dict[str, list] = {"a": [], "b": [], "raw": [], "n": [], "kl": []}
    for ids in tqdm(corpus_chunks(a, split_text(cfg.corpus, "eval"), cfg.context, cfg.chunks),
                    desc="pair"):  # fmt: skip
        feed = ids[split - 1 :]
        pa, pb = prefill(a, ids[: split - 1]), prefill(b, ids[: split - 1])
        own_a = score(a, decode_state(a, pa.layers, pa.n_tokens), feed)
        own_b = score(b, decode_state(b, pb.layers, pb.n_tokens), feed)
        got = score(b, decode_state(b, rerotated(a, b, pa.layers), pb.n_tokens), feed)
        for k, v in (("a", own_a.nll), ("b", own_b.nll), ("raw", got.nll), ("n", own_b.n)):
            acc[k].append(v)
        acc["kl"].append(kl(got, own_b))
    ppl = {k: math.exp(sum(acc[k]) / sum(acc["n"])) for k in ("a", "b", "raw")}
    return {
        "ppl_producer": ppl["a"], "ppl_consumer": ppl["b"], "ppl_raw_reuse": ppl["raw"],
        "raw_delta_pct": 100 * (ppl["raw"] / ppl["b"] - 1),
        "raw_delta_pct_ci95": list(delta_pct_interval(acc["raw"], acc["b"], acc["n"])),
        "raw_kl": statistics.fmean(acc["kl"]),
        "chunks": len(acc["n"]), "context": cfg.context, "continuation": cfg.continuation,
    }  # fmt: skip


def _ppl(acc: dict) -> float:
    return math.exp(sum(acc["nll"]) / sum(acc["n"]))


def rebuild_timing(
    a: Engine, b: Engine, art: Artifact, tokens: int, corpus: str, reps: int = 3,
    fresh: tuple[int, int] | None = None,
) -> dict:  # fmt: skip
    """At `tokens` tokens: B's own prefill vs B rebuilding from SCD codes (and A's encode), in
    seconds; the rebuild includes B's refresh (`fresh` = (head, tail), None: the artifact's,
    `scd.refresh`). A's prefill and encode run once; the rebuild and B's prefill alternate
    `reps` times, and the figures are the medians (every rep is kept under `reps_s`), so one
    stall of a shared machine does not decide the ratio."""
    if reps < 1:
        raise ConfigError(f"timing reps must be >= 1, got {reps}")
    ids = corpus_chunks(a, split_text(corpus, "eval"), tokens, 1)[0]
    t0 = time.perf_counter()
    head, tail = fresh or (art.manifest.head_tokens, art.manifest.tail_tokens)
    m = coded_tokens(tokens, tail)
    cs = encode_codes(art, a, ids[:m])
    encode_s = time.perf_counter() - t0
    rebuild, own = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        layers = refresh(b, [reconstruct_layer(art, b, x) for x in cs], m, ids, head)
        decode_state(b, layers, tokens)
        rebuild.append(time.perf_counter() - t0)
        own.append(prefill(b, ids).prefill_s)
    rebuild_s, prefill_s = statistics.median(rebuild), statistics.median(own)
    return {
        "tokens": tokens,
        "refresh": [head, tokens - m],
        "b_prefill_s": prefill_s,
        "scd_rebuild_s": rebuild_s,
        "rebuild_over_prefill": rebuild_s / prefill_s,
        "a_prefill_encode_s": encode_s,
        "reps_s": {"scd_rebuild": rebuild, "b_prefill": own},
    }
