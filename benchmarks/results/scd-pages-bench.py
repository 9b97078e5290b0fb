"""SCD rebuild into the batch engine's pages: straight into pages (staged) vs the previous path
(a list of rebuilt LayerKV, then copied into pages by the engine), on one prompt.

    python scd-pages-bench.py encode PAYLOAD [TOKENS]   # A prefills + encodes once (FP16 codes)
    python scd-pages-bench.py run PAYLOAD list|staged   # one measurement, one JSON line
    python scd-pages-bench.py compare PAYLOAD ROUNDS OUT.json   # interleaved, fresh processes
    python scd-pages-bench.py writes PAYLOAD REPS       # rebuild and page writes timed apart

Pair: producer smollm2-135m, consumer smollm2-135m-wiki, artifact /work/scd-artifacts4/main
(env SCD_ARTIFACT), wiki-es eval text. `run` loads B and the artifact, resets the process's peak
RSS (/proc/self/clear_refs 5), then feeds the SCD messages to the decode worker's ScdReceiver
(verify + rebuild frame by frame) and submits the result to a BatchEngine (max_tokens 1; after
one warm-up request, so lazily built model state is not counted): `peak_mb`
= peak RSS over that, minus RSS before; `rebuild_s` = ScdReceiver.reconstruct_s (rebuild, and for
staged the page writes); `to_token_s` = first frame fed -> first token sampled (includes the list
path's copy into pages and one decode step); `cache_mb`: B's FP16 KV of the prompt. The payload
file is this script's own framing (u8 kind, u32 length, bytes), never pickle. 1 torch thread per
process.
"""

import json
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ART = os.environ.get("SCD_ARTIFACT", "/work/scd-artifacts4/main")
A, B = "smollm2-135m", "smollm2-135m-wiki"


def _status(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    line = next(x for x in text.splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # MiB


def encode(path: str, tokens: int) -> None:
    import torch

    from spectrumkv.engines.hf import load
    from spectrumkv.eval.ppl import corpus_chunks
    from spectrumkv.scd.artifact import load as load_artifact
    from spectrumkv.scd.capture import capture
    from spectrumkv.scd.protocol import ScdRequest
    from spectrumkv.scd.serve_prefill import ScdStreamer
    from spectrumkv.scd.splits import split_text
    from spectrumkv.scd.wire import Layout

    torch.set_num_threads(1)
    a, art = load(A), load_artifact(ART)
    layout = Layout.of(art)
    ids = corpus_chunks(a, split_text("wiki-es", "eval"), tokens, 1)[0]
    req = ScdRequest("bench", ids.tolist(), layout.artifact, art.manifest.consumer)
    msgs: list[tuple[int, bytes]] = []
    s = ScdStreamer(a, art, layout, ids, req, lambda k, b: msgs.append((k == "frame", b)))
    capture(a, ids, input_layers=art.manifest.patch_layers, on_layer=s.on_layer)
    with open(path, "wb") as f:
        for kind, body in msgs:
            f.write(struct.pack("<BI", kind, len(body)) + body)
    print(f"{len(msgs)} messages, {sum(len(b) for _, b in msgs):,} bytes, {tokens} tokens")


def _messages(path: str) -> list[tuple[int, bytes]]:
    data, out, pos = Path(path).read_bytes(), [], 0
    while pos < len(data):
        kind, n = struct.unpack_from("<BI", data, pos)
        out.append((kind, data[pos + 5 : pos + 5 + n]))
        pos += 5 + n
    return out


def run(path: str, variant: str) -> dict:
    import torch

    from spectrumkv.engines.hf import load
    from spectrumkv.pd.sampling import SamplingParams
    from spectrumkv.scd.artifact import load as load_artifact
    from spectrumkv.scd.serve_decode import ScdReceiver
    from spectrumkv.scd.wire import Layout, raw_kv_bytes, read_header
    from spectrumkv.serve.engine import BatchEngine, EngineConfig

    torch.set_num_threads(1)
    b, art = load(B), load_artifact(ART)
    layout, msgs = Layout.of(art), _messages(path)
    batch = BatchEngine(b, EngineConfig(pool_mb=256))
    header, _ = read_header(msgs[0][1], layout)
    n, p = header.n_tokens, SamplingParams(max_tokens=1)
    batch.submit(p, 0, 3, context=torch.tensor([1, 2, 3])).wait(120)  # warm-up step
    time.sleep(0.5)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := RSS now
    rss0 = _status("VmRSS")
    t0 = time.perf_counter()
    staged = None
    if variant == "staged":
        staged = batch.stage(p, n)
        staged.wait_admitted(60)
    rx = ScdReceiver(art, layout, b, n, header.tokens_digest, staged)
    for kind, body in msgs:
        (rx.feed_frame if kind else rx.feed_header)(body)
    layers, n_tokens = rx.finish()
    src = {"staged": layers} if staged is not None else {"layers": layers}
    gen = batch.submit(p, 0, n_tokens, **src).wait(120)
    to_token = time.perf_counter() - t0
    del layers, src
    out = {
        "variant": variant,
        "tokens": n,
        "rebuild_s": rx.reconstruct_s,
        "to_token_s": to_token,
        "peak_mb": _status("VmHWM") - rss0,
        "rss_before_mb": rss0,
        "cache_mb": raw_kv_bytes(art.manifest.consumer, n) / 2**20,
        "token": gen.token_ids[0],
        "pages_free_after": batch.cache.free_pages == batch.total_pages,
    }
    batch.close()
    return out


def writes(path: str, reps: int) -> dict:
    """Rebuild and page writes timed apart, one thread, interleaved, a fresh engine (pool pages
    touched for the first time) per rep: the list path (rebuild every layer, then the engine's
    write_prompt) vs staged (rebuild a layer, write it into the pages). Medians and ranges, s."""
    import torch

    from spectrumkv.engines.hf import load
    from spectrumkv.pd.sampling import SamplingParams
    from spectrumkv.scd.artifact import load as load_artifact
    from spectrumkv.scd.codes import reconstruct_layer
    from spectrumkv.scd.wire import Layout, ScdDecoder
    from spectrumkv.serve.engine import BatchEngine, EngineConfig

    torch.set_num_threads(1)
    b, art = load(B), load_artifact(ART)
    layout, msgs = Layout.of(art), _messages(path)
    dec = ScdDecoder(layout)
    dec.feed_header(msgs[0][1])
    codes = [dec.feed_frame(body) for _, body in msgs[1:]]
    n, p = int(codes[0].positions.numel()), SamplingParams(max_tokens=1)
    out: dict[str, list[float]] = {k: [] for k in ("list_rebuild", "list_write",
                                                   "staged_rebuild", "staged_write")}  # fmt: skip
    for r in range(reps):
        for how in ("list", "staged") if r % 2 == 0 else ("staged", "list"):
            batch, rebuild, write = BatchEngine(b, EngineConfig(pool_mb=256)), 0.0, 0.0
            if how == "list":
                t0 = time.perf_counter()
                layers = [reconstruct_layer(art, b, c) for c in codes]
                t1 = time.perf_counter()
                batch.runner.write_prompt("x", layers, n)
                rebuild, write = t1 - t0, time.perf_counter() - t1
                del layers
            else:
                st = batch.stage(p, n)
                st.wait_admitted(60)
                for c in codes:
                    t0 = time.perf_counter()
                    kv = reconstruct_layer(art, b, c)
                    t1 = time.perf_counter()
                    st.write(c.layer, kv)
                    rebuild, write = rebuild + t1 - t0, write + time.perf_counter() - t1
                st.abort()
            batch.close()
            out[how + "_rebuild"].append(rebuild)
            out[how + "_write"].append(write)
    return {k: {"median": statistics.median(v), "range": [min(v), max(v)]} for k, v in out.items()}


def compare(path: str, rounds: int, out_path: str) -> None:
    rows = []
    for r in range(rounds):
        for variant in ("list", "staged") if r % 2 == 0 else ("staged", "list"):
            cmd = [sys.executable, __file__, "run", path, variant]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(line.strip().splitlines()[-1]) | {"round": r})
            print(rows[-1], flush=True)
    summary = {}
    for v in ("list", "staged"):
        mine = [x for x in rows if x["variant"] == v]
        summary[v] = {k: statistics.median(x[k] for x in mine)
                      for k in ("peak_mb", "rebuild_s", "to_token_s")}  # fmt: skip
        summary[v] |= {k + "_range": [min(x[k] for x in mine), max(x[k] for x in mine)]
                       for k in ("peak_mb", "rebuild_s", "to_token_s")}  # fmt: skip
    summary["same_token"] = len({x["token"] for x in rows}) == 1
    summary["load_avg"] = os.getloadavg()
    Path(out_path).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "encode":
        encode(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 2048)
    elif cmd == "writes":
        print(json.dumps(writes(sys.argv[2], int(sys.argv[3]))))
    elif cmd == "run":
        print(json.dumps(run(sys.argv[2], sys.argv[3])))
    else:
        compare(sys.argv[2], int(sys.argv[3]), sys.argv[4])
