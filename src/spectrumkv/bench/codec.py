"""`spectrumkv bench codec`: encode/decode throughput against a plain copy of the same cache.

Throughputs are in GB/s of FP16-equivalent input (2 bytes per cached element, K and V, all
layers), so every policy is measured against the same amount of cache. `copy_gbps` is a plain
tensor copy of that cache, measured right before each row; the ratios are what the codec targets
are stated in. Each figure is the best of `repeats` passes (the least disturbed by other work on a
shared machine). Scoring runs the real observation-window attention scorer on random queries of
the model's shape; planning is the real planner. Memory: the peak temporaries of encoding and of
decoding layer 0 once (`memory.peak_extra_bytes`, less the frame or tensors the call returns
where it allocates them), against the layer's size (its K and V in the source dtype).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch

from .. import fused
from ..config import PolicyConfig, QuantConfig, ScoreConfig
from ..importance import WindowQueries, score_tokens
from ..kv import LayerKV
from ..policy import layer_firsts, plan
from ..wire import Fingerprint, Header, frame_bytes, read_frame
from . import memory

DEFAULT_POLICIES = (
    ("uniform-int8", None),
    ("uniform-int4", None),
    ("spectrum", 0.5),
    ("spectrum", 0.3),
)


@dataclass(frozen=True)
class CacheShape:
    """A model's cache geometry (default: SmolLM2-135M at 4096 tokens). `q_heads` only shapes
    the scorer's window queries; it must be a multiple of `kv_heads`."""

    layers: int = 30
    kv_heads: int = 3
    head_dim: int = 64
    tokens: int = 4096
    q_heads: int = 9

    def __post_init__(self) -> None:
        if self.q_heads % self.kv_heads:
            raise ValueError(
                f"q_heads {self.q_heads} is not a multiple of kv_heads {self.kv_heads}"
            )

    @property
    def fp16_bytes(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.tokens * 2


@dataclass
class CodecRecord:
    codec: str  # "fused" or "reference"
    buffers: str  # "reused" or "fresh"
    pause_ms: float  # idle time before each frame (0: back to back)
    policy: str
    budget: float | None
    dtype: str
    tokens: int
    layers: int
    threads: int
    wire_bytes: int
    wire_ratio: float
    score_s: float
    plan_s: float
    encode_s: float
    decode_s: float
    encode_gbps: float
    decode_gbps: float
    copy_gbps: float
    encode_ratio: float
    decode_ratio: float
    layer_bytes: int  # layer 0's K and V in the source dtype
    encode_temp_bytes: int | None  # peak temporaries encoding layer 0 (None: not measurable)
    decode_temp_bytes: int | None


def parse_policy(spec: str) -> tuple[str, float | None]:
    """ "spectrum@0.5" -> ("spectrum", 0.5); "uniform-int4" -> ("uniform-int4", None)."""
    name, _, budget = spec.partition("@")
    return name, float(budget) if budget else None


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    """Fastest of `repeats` timed calls, seconds."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def synthetic_cache(shape: CacheShape, dtype: torch.dtype, seed: int = 0) -> list[LayerKV]:
    """Random K/V of the given shape: the codec's speed does not depend on the values."""
    g = torch.Generator().manual_seed(seed)
    size = (shape.kv_heads, shape.tokens, shape.head_dim)
    pos = torch.arange(shape.tokens)

    def rand(scale: float) -> torch.Tensor:
        return (torch.randn(size, generator=g) * scale).to(dtype)

    return [LayerKV(rand(2.0), rand(1.0), pos) for _ in range(shape.layers)]


def synthetic_header(shape: CacheShape, dtype: str, name: str, budget: float | None) -> Header:
    """The header of a payload of the synthetic cache (a made-up model fingerprint)."""
    fp = Fingerprint(
        arch="bench", n_layers=shape.layers, n_kv_heads=shape.kv_heads, head_dim=shape.head_dim,
        kv_dtype=dtype, rope="none", sliding_window=0, sliding_layers=(), weights_digest="0" * 16,
    )  # fmt: skip
    group = QuantConfig(64).group_for(shape.head_dim)  # 64, or what a non-power-of-two dim allows
    return Header(fp, shape.tokens, "asym-group", group, True, name, budget)


def copy_gbps(layers: list[LayerKV], fp16_bytes: int, repeats: int) -> float:
    """Throughput of a plain tensor copy of every layer's K and V."""
    dst = [(torch.empty_like(kv.keys), torch.empty_like(kv.values)) for kv in layers]

    def copy() -> None:
        for (k, v), kv in zip(dst, layers, strict=True):
            k.copy_(kv.keys)
            v.copy_(kv.values)

    copy()
    return fp16_bytes / best_of(repeats, copy) / 1e9


@dataclass
class Buffers:
    """Per-layer send buffers and receive tensors reused across passes, as a serving system
    reuses registered send memory and its KV cache pages."""

    send: list[bytearray]
    recv: list[tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def for_layers(cls, layers: list[LayerKV]) -> Buffers:
        send = [bytearray(64 + 4 * kv.keys.numel() + kv.keys.shape[1]) for kv in layers]
        recv = [(torch.empty_like(kv.keys), torch.empty_like(kv.values)) for kv in layers]
        return cls(send, recv)


def encode_calls(
    layers: list[LayerKV],
    header: Header,
    tiers: torch.Tensor,
    use_fused: bool,
    bufs: Buffers | None,
) -> list[Callable[[], memoryview]]:
    """One call per layer, encoding its frame (into its reused send buffer, with `bufs`)."""
    return [
        partial(frame_bytes, i, first, tiers[i, first:], layers[i], header, use_fused,
                bufs.send[i] if bufs else None)
        for i, first in enumerate(layer_firsts(header))
    ]  # fmt: skip


def encode_all(
    layers: list[LayerKV], header: Header, tiers: torch.Tensor, use_fused: bool
) -> list[memoryview]:
    """Every layer's frame, in new memory."""
    return [encode() for encode in encode_calls(layers, header, tiers, use_fused, None)]


def paced_seconds(calls: list[Callable[[], object]], pause_s: float) -> float:
    """The calls' own time, summed, each timed alone; with `pause_s` > 0, the process idles that
    long (untimed) before each call, as a prefill worker computes a layer between two frames."""
    total = 0.0
    for call in calls:
        if pause_s:
            time.sleep(pause_s)
        t0 = time.perf_counter()
        call()
        total += time.perf_counter() - t0
    return total


def measure(
    layers: list[LayerKV],
    header: Header,
    tiers: torch.Tensor,
    use_fused: bool,
    repeats: int,
    bufs: Buffers | None,
    pause_s: float = 0.0,
) -> tuple[int, float, float]:
    """(wire bytes, best encode seconds, best decode seconds) for one plan, each the sum of the
    frames' own times (`paced_seconds`). With `bufs`, frames are encoded into and decoded into
    reused memory; without, every pass allocates afresh."""
    frames = [bytes(f) for f in encode_all(layers, header, tiers, use_fused)]
    encodes = encode_calls(layers, header, tiers, use_fused, bufs)
    decodes = [
        partial(read_frame, frame, 0, header, i, use_fused, bufs.recv[i] if bufs else None)
        for i, frame in enumerate(frames)
    ]
    enc = min(paced_seconds(encodes, pause_s) for _ in range(repeats))
    dec = min(paced_seconds(decodes, pause_s) for _ in range(repeats))
    return sum(len(f) for f in frames), enc, dec


def temporaries(
    layers: list[LayerKV],
    header: Header,
    tiers: torch.Tensor,
    use_fused: bool,
    bufs: Buffers | None,
) -> tuple[int, int]:
    """Peak bytes of temporaries while encoding, then decoding, layer 0 once: what each call
    touches beyond the process's memory before it, less the frame (encode) or K/V tensors
    (decode) it returns when it allocates them (`bufs` None). OSError where not measurable."""
    first = layer_firsts(header)[0]
    send, recv = (bufs.send[0], bufs.recv[0]) if bufs else (None, None)
    encode = partial(frame_bytes, 0, first, tiers[0, first:], layers[0], header, use_fused, send)
    enc, frame = memory.peak_extra_bytes(encode)
    frame = bytes(frame)
    decode = partial(read_frame, frame, 0, header, 0, use_fused, recv)
    dec, (kv, _, _) = memory.peak_extra_bytes(decode)
    if bufs is None:
        enc -= len(frame)
        dec -= kv.keys.nbytes + kv.values.nbytes
    return max(0, enc), max(0, dec)


def run_codec(
    shape: CacheShape,
    dtypes: list[str],
    policies: list[tuple[str, float | None]],
    repeats: int,
    codecs: list[str],
    threads: int | None = None,
    fresh: bool = False,
    pause_ms: float = 0.0,
) -> list[CodecRecord]:
    """`fresh`: allocate every frame and every decoded tensor anew (page faults included);
    default: reuse send buffers and receive tensors across passes. `pause_ms`: idle time before
    each frame (`paced_seconds`), the streamed case where the codec's helper threads go to sleep
    between frames; 0 = frames back to back."""
    if threads:
        torch.set_num_threads(threads)
    n_threads = torch.get_num_threads()
    records = []
    for dtype in dtypes:
        layers = synthetic_cache(shape, getattr(torch, dtype))
        bufs = None if fresh else Buffers.for_layers(layers)
        g = torch.Generator().manual_seed(1)
        window = [
            WindowQueries(torch.randn(shape.q_heads, 32, shape.head_dim, generator=g), 0.125, 0)
            for _ in range(shape.layers)
        ]
        for name, budget in policies:
            header = synthetic_header(shape, dtype, name, budget)
            policy = PolicyConfig(name, budget=budget)
            t0 = time.perf_counter()
            scores, per_layer = score_tokens(ScoreConfig(), shape.tokens, layers, window)
            t1 = time.perf_counter()
            p = plan(scores, header, policy, per_layer)
            t2 = time.perf_counter()
            for codec in codecs:
                reps = repeats if codec == "fused" else 1
                # the baseline next to each row: this machine's speed drifts over a run
                copy = copy_gbps(layers, shape.fp16_bytes, repeats)
                wire, enc, dec = measure(
                    layers, header, p.tiers, codec == "fused", reps, bufs, pause_ms / 1e3
                )
                temp = (
                    temporaries(layers, header, p.tiers, codec == "fused", bufs)
                    if memory.available()
                    else (None, None)
                )
                records.append(
                    CodecRecord(
                        codec=codec, buffers="fresh" if fresh else "reused", pause_ms=pause_ms,
                        policy=name,
                        budget=budget, dtype=dtype, tokens=shape.tokens,
                        layers=shape.layers, threads=n_threads, wire_bytes=wire,
                        wire_ratio=wire / shape.fp16_bytes, score_s=t1 - t0, plan_s=t2 - t1,
                        encode_s=enc, decode_s=dec, encode_gbps=shape.fp16_bytes / enc / 1e9,
                        decode_gbps=shape.fp16_bytes / dec / 1e9, copy_gbps=copy,
                        encode_ratio=shape.fp16_bytes / enc / 1e9 / copy,
                        decode_ratio=shape.fp16_bytes / dec / 1e9 / copy,
                        layer_bytes=2 * layers[0].keys.nbytes, encode_temp_bytes=temp[0],
                        decode_temp_bytes=temp[1],
                    )
                )  # fmt: skip
                print_row(records[-1])
    return records


_COLUMNS = (
    ("codec", 9, "{}"),
    ("buffers", 7, "{}"),
    ("policy", 13, "{}"),
    ("budget", 6, "{}"),
    ("dtype", 8, "{}"),
    ("wire_ratio", 10, "{:.3f}"),
    ("score_s", 8, "{:.3f}"),
    ("plan_s", 7, "{:.3f}"),
    ("encode_gbps", 11, "{:.2f}"),
    ("decode_gbps", 11, "{:.2f}"),
    ("copy_gbps", 9, "{:.2f}"),
    ("encode_ratio", 12, "{:.1%}"),
    ("decode_ratio", 12, "{:.1%}"),
    ("encode_temp_x", 13, "{:.3f}"),
    ("decode_temp_x", 13, "{:.3f}"),
)


def print_header(shape: CacheShape, pause_ms: float = 0.0) -> None:
    simd = "AVX2" if fused.AVAILABLE and fused.simd_enabled() else "scalar"
    kernels = f"fused kernels: {simd}" if fused.AVAILABLE else "fused kernels: NOT BUILT"
    pacing = f"; {pause_ms:g} ms idle before each frame" if pause_ms else ""
    print(
        f"cache: {shape.layers} layers x {shape.kv_heads} KV heads x {shape.head_dim} dims x "
        f"{shape.tokens} tokens, K and V = {shape.fp16_bytes / 1e6:.1f} MB at FP16; "
        f"{torch.get_num_threads()} threads; {kernels}{pacing}"
    )
    print(" ".join(f"{name:>{w}}" for name, w, _ in _COLUMNS))


def print_row(r: CodecRecord) -> None:
    """One table row; `*_temp_x`: peak temporaries in multiples of the layer's size."""
    d = asdict(r)
    for op in ("encode", "decode"):
        temp = d[f"{op}_temp_bytes"]
        d[f"{op}_temp_x"] = "n/a" if temp is None else temp / r.layer_bytes
    cells = (fmt.format(d[name]) if d[name] != "n/a" else "n/a" for name, _, fmt in _COLUMNS)
    print(" ".join(f"{c:>{w}}" for c, (_, w, _) in zip(cells, _COLUMNS, strict=True)), flush=True)


def write_json(records: list[CodecRecord], path: str) -> None:
    with open(path, "w") as f:
        json.dump([asdict(r) for r in records], f, indent=1)
