"""kernel4: the paged decode kernel before (commit 176bdd4) and after the kernel4 changes, side by
side. Builds the old `_attention.c` from git into a temporary directory (gcc, setup.py's flags)
and loads it by path next to the installed (new) one. Run from the repository root:

  .venv/bin/python benchmarks/results/kernel4-oldnew.py micro [THREADS] [ROUNDS]
      one decode-attention layer, old and new alternating in one process over a ring of layers
      (> L3): the issue-18 mix (uniform x 1/16, seed 0: 16 requests, 19,624 tokens), SmolLM2
      (3 KV / 9 query heads, d=64) and the 7B shape (8 / 32, d=128), fp16 and bf16 pages, the
      calibrated workqueue split settings (<= 4 splits of >= 8192 tokens); GB/s of K/V read and
      that over a torch sum's read rate measured between rounds
  KERNEL=old .venv/bin/python benchmarks/results/kernel4-oldnew.py cli bench attention ...
      any `spectrumkv` command with the old kernel (KERNEL=new: the current one)
  .venv/bin/python benchmarks/results/kernel4-oldnew.py step [ROUNDS]
      the engine's bf16 batch-16 decode step (serve.step_bench's batch, route adaptive, 1
      thread), old and new kernel alternating per round: step and paged-attention ms
"""

import collections
import importlib.util
import os
import statistics as st
import subprocess
import sys
import sysconfig
import tempfile
import time

import torch

from spectrumkv.paged import _attention as new
from spectrumkv.paged import kernel, traces
from spectrumkv.paged.cache import PagedConfig, PagedKVCache

OLD_COMMIT = "176bdd4"


def build_old():
    out = tempfile.mkdtemp(prefix="kernel4-old-")
    src = os.path.join(out, "_attention.c")
    old_src = f"{OLD_COMMIT}:src/spectrumkv/paged/_attention.c"
    with open(src, "w") as f:
        f.write(subprocess.check_output(["git", "show", old_src], text=True))
    so = os.path.join(out, "_attention_old.so")
    # as setup.py compiles: Python's CFLAGS first (they hold -fwrapv), then setup.py's flags.
    # Until exp18 this was a plain `gcc -O3`, under which gcc 12 deletes prefetch_tile's loops
    # in commits 14a86af..2045b44 (see prefetch_line in _attention.c; earlier kernels keep
    # theirs, so the figures recorded with this script are not affected).
    flags = sysconfig.get_config_var("CFLAGS").split()
    subprocess.check_call(["gcc", *flags, "-fPIC", "-shared", "-pthread", "-Isrc/spectrumkv",
                           "-I" + sysconfig.get_paths()["include"], src, "-o", so,
                           "-O3", "-std=gnu11", "-fno-math-errno", "-fopenmp"])  # fmt: skip
    spec = importlib.util.spec_from_file_location("_attention", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


LENS = traces.lengths("uniform", 16, 0, 1 / 16)


def mix_layers(layers, hkv, hq, d, page, dtype):
    """`layers` layers of the mix's 16 requests (LENS) in a shuffled page pool, random K/V;
    returns (cache, block tables, lengths, queries [16, hq, d], K+V bytes read per layer)."""
    pages = sum(-(-n // page) for n in LENS) + 16
    c = PagedKVCache(PagedConfig(layers, hkv, d, pages, page, dtype), shuffle_seed=1)
    c.k.normal_()
    c.v.normal_()
    for r, n in enumerate(LENS):
        c.allocate(r, n)
    tables, lengths = c.block_tables(list(range(16)))
    return c, tables, lengths, torch.randn(16, hq, d), sum(LENS) * 2 * hkv * d * 2


def micro(old, threads=1, rounds=15):
    torch.set_num_threads(threads)
    buf = torch.ones((256 << 20) // 4)
    print(f"tokens {sum(LENS)} threads {threads} load {os.getloadavg()[0]:.1f}")
    for shape, (hkv, d, hq, layers) in {"smol": (3, 64, 9, 8), "7b": (8, 128, 32, 3)}.items():
        for dt in (torch.float16, torch.bfloat16):
            c, tables, lengths, q, kvb = mix_layers(layers, hkv, hq, d, 16, dt)
            outs = {m: torch.empty(16, hq, d) for m in ("old", "new")}
            times, rates = {"old": [], "new": []}, []
            for rd in range(rounds + 1):
                for name, mod in (("old", old), ("new", new)):
                    t0 = time.perf_counter()
                    for layer in range(layers):
                        kp, vp = c.layer(layer)
                        mod.decode(q.data_ptr(), kp.data_ptr(), vp.data_ptr(), kp.numel(),
                                   tables.numpy(), lengths.numpy(), outs[name].data_ptr(), hq,
                                   hkv, d, 16, kernel._DTYPE_CODES[dt], d**-0.5, 4, 8192,
                                   threads)  # fmt: skip
                    if rd:
                        times[name].append((time.perf_counter() - t0) / layers)
                if rd:
                    t0 = time.perf_counter()
                    buf.sum()
                    rates.append(buf.numel() * 4 / (time.perf_counter() - t0))
            assert (outs["old"] - outs["new"]).abs().max() < 1e-4
            sr = st.median(rates)
            line = [f"{shape} {str(dt)[6:]} sum {sr / 1e9:.2f} GB/s"]
            for name, x in times.items():
                t = st.median(x)
                line.append(f"{name} {1e3 * t:.2f} ms [{1e3 * min(x):.2f}-{1e3 * max(x):.2f}] "
                            f"{kvb / t / 1e9:.2f} GB/s = {kvb / t / sr:.2f}x sum")  # fmt: skip
            r = [a / b for a, b in zip(times["new"], times["old"], strict=True)]
            line.append(f"new/old median {st.median(r):.3f} [{min(r):.3f}-{max(r):.3f}]")
            print(" | ".join(line), flush=True)
    print(f"load {os.getloadavg()[0]:.1f}")


def ab_steps(batch, setters, rounds):
    """The engine's decode step of `batch` (serve.step_bench's _Batch) under each variant (name ->
    a function switching to it), alternating the order per round: per round and variant one
    untimed step, then 4 timed. Prints and returns per variant the step and paged-attention
    seconds."""
    from spectrumkv.serve import runner as runner_mod

    names = list(setters)
    res = {k: {"step": [], "att": []} for k in names}
    batch.step()
    for rd in range(rounds):
        for name in names if rd % 2 == 0 else names[::-1]:
            setters[name]()
            batch.step()
            for _ in range(4):
                acc = runner_mod.timed_parts = collections.defaultdict(float)
                t0 = time.perf_counter()
                batch.step()
                res[name]["step"].append(time.perf_counter() - t0)
                runner_mod.timed_parts = None
                res[name]["att"].append(acc["paged attention"])
    print(f"load {os.getloadavg()[0]:.1f}, 1 thread, tokens {sum(LENS)}")
    for name, r in res.items():
        print(f"{name}: step median {1e3 * st.median(r['step']):.1f} ms, paged attention median "
              f"{1e3 * st.median(r['att']):.1f} ms (min {1e3 * min(r['att']):.1f})")  # fmt: skip
    return res


def step(old, rounds=6):
    from spectrumkv.serve.step_bench import _Batch, load

    torch.set_num_threads(1)
    b = _Batch(load("smollm2-135m", dtype="bfloat16"), LENS, "adaptive", 0, "serve")
    use = {"old": old, "new": new}
    res = ab_steps(b, {k: (lambda m=m: setattr(kernel, "_attention", m)) for k, m in use.items()},
                   rounds)  # fmt: skip
    ra = [a / b for a, b in zip(res["new"]["att"], res["old"]["att"], strict=True)]
    print(f"new/old paged attention, paired steps: median {st.median(ra):.3f} "
          f"[{min(ra):.3f}-{max(ra):.3f}]")  # fmt: skip


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    old = build_old()
    if mode == "micro":
        micro(old, *map(int, args))
    elif mode == "step":
        step(old, *map(int, args))
    else:  # cli
        if os.environ.get("KERNEL") == "old":
            kernel._attention = old
        from spectrumkv.cli import main

        sys.exit(main(args))
