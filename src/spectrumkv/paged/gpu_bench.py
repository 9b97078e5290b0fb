"""GPU decode-attention benchmark (issue 17, item 7): the Triton workqueue (`paged.gpu`)
against FlashInfer's paged decode (the GPU anchor, where it imports) and the padded torch
route, on the length mixes of `bench attention` (`paged.traces`), every method timed the same
way. Needs a CUDA device; run where one is:

    python -m spectrumkv.paged.gpu_bench --json OUT.json [--shapes smollm2-135m 7b-gqa]
        [--traces ...] [--batches 1 2 4 8 16 32] [--seeds 100 101 102] [--methods ...]

Per case (shape, trace, batch, seed): a ring of layers (at least RING_BYTES of K/V in all, so a
layer's pages are not in the 60 MB L2 when read again), random K/V on the GPU in `--dtype`, the
block tables of a real `PagedKVCache` (shuffled pool), q rounded to the KV dtype (so every
method sees the same values). Methods:
- workqueue: `gpu.plan` with `gpu.split_settings` (fill the SMs), `gpu.launch` per layer;
- workqueue-unsplit: the same kernels, one program per (request, KV head);
- flashinfer / flashinfer-tc: `BatchDecodeWithPagedKVCacheWrapper` over the same pages (HND
  layout), `plan` then `run` per layer, without / with `use_tensor_cores` (its CSR page
  indices are built once per case, outside the timing: an engine keeps them in that form);
- padded: `reference.padded` (gather into a padded batch, one masked SDPA) per layer.

Timing, the same for every method: a step is the method's planning (host, once) plus one call
per layer of the ring, then a device synchronize; step_ms = wall time / layers (planning
amortised over the layers, as an engine plans once per model step). Rounds interleave the
methods; the record keeps every round and the median. limit_ms = one layer's KV bytes / the
device-to-device copy bandwidth measured in the same run (bytes read + written per second).
max_abs_err: against the float64 reference (`reference.reference`) on layer 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from . import cost, gpu, reference, traces
from .cache import PagedConfig, PagedKVCache
from .errors import PagedInputError

SHAPES = {"smollm2-135m": (3, 9, 64), "7b-gqa": (8, 32, 128)}  # kv heads, q heads, head dim
METHODS = ("workqueue", "workqueue-unsplit", "flashinfer", "flashinfer-tc", "padded")
RING_BYTES = 1 << 29  # K/V bytes the ring of layers holds at least (L2: 60 MB)
MAX_LAYERS = 16
PADDED_CAP = 4 << 30  # skip `padded` when its dense batch would exceed this many bytes
WORKSPACE_BYTES = 256 << 20  # FlashInfer's float workspace
CPU_PROGRAMS = 8  # split_settings' target under Triton's interpreter (smoke runs on CPU)


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Bytes/s (read + written) of a device-to-device copy of nbytes, median of reps."""
    src = torch.randn(nbytes // 2, device="cuda").to(torch.float16)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return 2 * nbytes / statistics.median(times[2:])


def flashinfer_or_reason():
    """(the flashinfer module, None) or (None, why it does not import)."""
    try:
        import flashinfer
    except Exception as e:  # noqa: BLE001 - any failure means: no anchor, say why
        return None, f"{type(e).__name__}: {e}"
    return flashinfer, None


def _ring(hkv: int, d: int, lens: list[int], page_size: int, dtype, seed: int, device):
    """Block tables (a shuffled PagedKVCache pool), lengths, and the ring's (k, v) pages."""
    pages = sum(-(-n // page_size) for n in lens)
    cache = PagedKVCache(PagedConfig(1, hkv, d, pages, page_size, dtype), shuffle_seed=seed)
    for i, n in enumerate(lens):
        cache.allocate(i, n)
    tables, lengths = cache.block_tables(list(range(len(lens))))
    layer_bytes = 2 * pages * hkv * page_size * d * dtype.itemsize
    layers = max(1, min(MAX_LAYERS, -(-RING_BYTES // layer_bytes)))
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (pages, hkv, page_size, d)
    ring = [
        tuple(torch.randn(shape, generator=gen, device=device).to(dtype) for _ in range(2))
        for _ in range(layers)
    ]
    return tables, lengths, ring


def _flashinfer_runner(fi, tc: bool, q, tables, lengths, ring, page_size, scale, workspace):
    """plan() + per-layer run() of FlashInfer's batch paged decode over the same pages."""
    hkv, d = ring[0][0].shape[1], ring[0][0].shape[3]
    used = [-(-n // page_size) for n in lengths.tolist()]
    indptr = torch.tensor([0, *torch.tensor(used).cumsum(0).tolist()], dtype=torch.int32)
    indices = torch.cat([tables[b, :u] for b, u in enumerate(used)]).to(torch.int32)
    lens = lengths.tolist()
    last = torch.tensor([n - (u - 1) * page_size for n, u in zip(lens, used, strict=True)],
                        dtype=torch.int32)  # fmt: skip
    indptr, indices, last = (x.to(q.device) for x in (indptr, indices, last))
    wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(workspace, "HND", use_tensor_cores=tc)
    qd = q.to(ring[0][0].dtype)

    def step(layers: range) -> torch.Tensor:
        wrapper.plan(
            indptr, indices, last, q.shape[1], hkv, d, page_size, pos_encoding_mode="NONE",
            q_data_type=qd.dtype, kv_data_type=qd.dtype, sm_scale=scale,
        )  # fmt: skip
        for i in layers:
            out = wrapper.run(qd, ring[i])
        return out

    return step


def _programs(device: torch.device, per_sm: int = gpu.PROGRAMS_PER_SM) -> int:
    """What `gpu.split_settings` aims at: per_sm programs per SM of the device, or CPU_PROGRAMS
    under the interpreter."""
    return gpu.device_programs(device, per_sm) if device.type == "cuda" else CPU_PROGRAMS


def variant(spec: str) -> tuple[str, tuple[gpu.KernelConfig, int]]:
    """A `--variants` item PRECISION:BLOCK:WARPS:STAGES[:PROGRAMS_PER_SM] -> (method name,
    (its KernelConfig, the programs per SM its splits aim at; default gpu.PROGRAMS_PER_SM))."""
    try:
        prec, block, warps, stages, *per_sm = spec.split(":")
        config = gpu.KernelConfig(int(block), int(warps), int(stages), prec)
        (per_sm,) = [int(x) for x in per_sm] or [gpu.PROGRAMS_PER_SM]
        if per_sm < 1:
            raise ValueError
    except ValueError:
        raise PagedInputError(f"--variants: PRECISION:BLOCK:WARPS:STAGES[:PROGRAMS_PER_SM], "
                              f"got {spec!r}") from None  # fmt: skip
    return f"wq-{prec}-b{block}-w{warps}-s{stages}-p{per_sm}", (config, per_sm)


def _runners(methods, variants, fi, q, tables, lengths, ring, page_size, scale, workspace):
    """(method -> step(layers) -> the last layer's output, kernel method -> decode programs per
    launch); methods that cannot run are left out. Kernel methods: "workqueue" (the default
    KernelConfig), "workqueue-unsplit", and the names in `variants` (from `variant`: the
    default's splits, another KernelConfig)."""
    spans = lengths.tolist()
    hkv = ring[0][0].shape[1]
    default = (gpu.KernelConfig(), gpu.PROGRAMS_PER_SM)
    configs = {"workqueue": default, "workqueue-unsplit": default} | variants
    runners: dict[str, Callable] = {}
    programs: dict[str, int] = {}
    for method in [*methods, *variants]:
        if method in configs:
            config, per_sm = configs[method]
            splits = gpu.split_settings(spans, hkv, _programs(q.device, per_sm))
            if method == "workqueue-unsplit":
                splits = (1, 1 << 30)
            programs[method] = hkv * sum(cost.splits_of(n, *splits)[0] for n in spans)

            def step(layers, splits=splits, config=config):
                p = gpu.plan(q, *ring[0], tables, lengths, *splits)
                for i in layers:
                    out = gpu.launch(p, q, *ring[i], scale, config=config)
                return out

            runners[method] = step
        elif method.startswith("flashinfer") and fi is not None:
            runners[method] = _flashinfer_runner(
                fi, method.endswith("-tc"), q, tables, lengths, ring, page_size, scale, workspace
            )
        elif method == "padded":
            dense = len(spans) * max(spans) * 2 * hkv * ring[0][0].shape[3] * q.element_size()
            if dense <= PADDED_CAP:
                runners[method] = lambda layers: [
                    reference.padded(q, *ring[i], tables, lengths, scale) for i in layers
                ][-1]
    return runners, programs


def run_case(shape, trace, batch, seed, args, fi, workspace, copy_rate) -> list[dict]:
    """All methods on one case; one record per method (module doc)."""
    hkv, hq, d = SHAPES[shape]
    dtype = getattr(torch, args.dtype)
    lens = traces.lengths(trace, batch, seed, args.scale)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    tables, lengths, ring = _ring(hkv, d, lens, args.page_size, dtype, seed, device)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    q = torch.randn(batch, hq, d, generator=gen, device=device).to(dtype).float()
    scale = d**-0.5
    variants = dict(map(variant, args.variants))
    runners, programs = _runners(
        args.methods, variants, fi, q, tables, lengths, ring, args.page_size, scale, workspace
    )
    want = reference.reference(q.double(), *ring[0], tables, lengths, scale)
    errors = {}
    for m, step in list(runners.items()):
        try:
            errors[m] = (step(range(1)).double().cpu() - want).abs().max().item()
        except Exception as e:  # noqa: BLE001 - a method that fails is reported and left out
            print(f"{shape} {trace} B{batch} seed {seed}: {m} failed: {type(e).__name__}: {e}")
            del runners[m]
    layers = range(len(ring))
    times = {m: [] for m in runners}
    order = list(runners)
    for r in range(args.rounds + 1):  # round 0 warms every method up (not recorded)
        for m in order[r % len(order) :] + order[: r % len(order)]:
            sync()
            t0 = time.perf_counter()
            runners[m](layers)
            sync()
            if r:
                times[m].append((time.perf_counter() - t0) / len(ring))
    kv_bytes = sum(lens) * 2 * hkv * d * dtype.itemsize
    return [
        {
            "shape": shape, "dtype": args.dtype, "page_size": args.page_size, "trace": trace,
            "batch": batch, "seed": seed, "route": m, "lengths": lens,
            "tokens_per_s": batch / statistics.median(times[m]),
            "step_ms": statistics.median(times[m]) * 1e3,
            "step_rounds_ms": [t * 1e3 for t in times[m]],
            "limit_ms": kv_bytes / copy_rate * 1e3, "kv_bytes": kv_bytes,
            "layers_in_ring": len(ring), "programs": programs.get(m),
            "dispatches_per_step": None if m.startswith("flashinfer") else
                1 if m == "padded" else 2 if programs[m] > len(lens) * hkv else 1,
            "max_abs_err": errors[m],
        }
        for m in order
    ]  # fmt: skip


def summary(records: list[dict]) -> str:
    """One line per (shape, trace, batch): median step_ms over seeds per method, the
    workqueue's ratio to the best FlashInfer variant, and the limit over its step."""
    cases: dict[tuple, dict[str, list[float]]] = {}
    limits: dict[tuple, list[float]] = {}
    for r in records:
        key = (r["shape"], r["trace"], r["batch"])
        cases.setdefault(key, {}).setdefault(r["route"], []).append(r["step_ms"])
        limits.setdefault(key, []).append(r["limit_ms"])
    seen = {m for c in cases.values() for m in c}
    methods = [m for m in METHODS if m in seen] + sorted(seen - set(METHODS))
    head = f"{'shape':13} {'trace':9} {'B':>3} " + " ".join(f"{m:>17}" for m in methods)
    lines = [head + f" {'fi/wq':>6} {'limit/wq':>8}"]
    for key, c in cases.items():
        med = {m: statistics.median(v) for m, v in c.items()}
        cells = " ".join(f"{med[m]:17.4f}" if m in med else f"{'-':>17}" for m in methods)
        fis = [med[m] for m in ("flashinfer", "flashinfer-tc") if m in med]
        wq = med.get("workqueue")
        ratio = f"{min(fis) / wq:6.2f}" if fis and wq else f"{'-':>6}"
        limit = f"{statistics.median(limits[key]) / wq:8.2f}" if wq else f"{'-':>8}"
        lines.append(f"{key[0]:13} {key[1]:9} {key[2]:3} {cells} {ratio} {limit}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="write the records here")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--traces", nargs="+", default=list(traces.TRACES), choices=traces.TRACES)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--seeds", nargs="+", type=int, default=[100, 101, 102])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--variants", nargs="*", default=[],
                    help="PRECISION:BLOCK:WARPS:STAGES[:PROGRAMS_PER_SM] ...")  # fmt: skip
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--scale", type=float, default=1.0, help="trace length scale")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per case")
    args = ap.parse_args(argv)
    args.device = "cuda"
    if not torch.cuda.is_available():
        raise PagedInputError("gpu_bench needs a CUDA device (torch sees none)")
    fi, why = flashinfer_or_reason() if any("flashinfer" in m for m in args.methods) else (None, "")
    copy_rate = copy_bandwidth()
    workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    device = torch.cuda.get_device_name()
    print(f"{device}: copy {copy_rate / 1e12:.2f} TB/s (read + written); FlashInfer: "
          f"{fi.__version__ if fi else 'not used: ' + why}", flush=True)  # fmt: skip
    meta = {"device": device, "copy_bytes_per_s": copy_rate, "torch": torch.__version__,
            "flashinfer": fi.__version__ if fi else None, "flashinfer_error": why or None,
            "config": vars(args)}  # fmt: skip
    records = []
    for shape in args.shapes:
        for trace in args.traces:
            for batch in args.batches:
                for seed in args.seeds:
                    records += run_case(shape, trace, batch, seed, args, fi, workspace, copy_rate)
            print(summary([r for r in records if r["trace"] == trace and r["shape"] == shape]),
                  flush=True)  # fmt: skip
            with open(args.json, "w") as f:  # after every trace: a cut-short run keeps its part
                json.dump({"meta": meta, "records": records}, f, indent=1)
    print(summary(records))


if __name__ == "__main__":
    main()
