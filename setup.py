"""Build the optional compiled extensions. Everything else is in pyproject.toml.

- `spectrumkv._codec`, the fused frame codec: if it cannot be compiled, SpectrumKV runs on the
  torch reference codec (same bytes, slower). `-ffp-contract=off` keeps its float arithmetic
  identical to torch's.
- `spectrumkv.paged._attention`, paged decode attention: if it cannot be compiled, the paged
  routes that need it are unavailable and the torch routes (`padded`, the reference) still run.
- `spectrumkv.engines._flash`, causal prefill attention on AMX-BF16 tiles: if it cannot be
  compiled (or the CPU has no AMX), prefill attention stays torch's SDPA.
- `spectrumkv.engines._bf16dot`, few-row bf16 linear layers on AVX512-BF16 (decode steps on CPUs
  without AMX): if it cannot be compiled, those layers stay on oneDNN.
- `spectrumkv.engines._rowops`, the fused RMSNorm / RoPE of the Llama decode step: if it cannot be
  compiled, engines.llama_step runs their torch references.

The codec runs on the persistent thread pool in `src/spectrumkv/_pool.h`; paged attention, the
prefill kernel, the bf16 dot products and the row ops run on OpenMP (`-fopenmp`), the same
libgomp and threads as torch's own ops (see `_attention.c`).
"""

from setuptools import Extension, setup

_FLAGS = ["-O3", "-std=gnu11", "-fno-math-errno"]

setup(
    ext_modules=[
        Extension(
            "spectrumkv._codec",
            sources=["src/spectrumkv/_codec.c"],
            depends=["src/spectrumkv/_xxh3.h", "src/spectrumkv/_pool.h"],
            extra_compile_args=[*_FLAGS, "-ffp-contract=off"],
            extra_link_args=["-pthread"],
            optional=True,
        ),
        Extension(
            "spectrumkv.paged._attention",
            sources=["src/spectrumkv/paged/_attention.c"],
            depends=["src/spectrumkv/_amx.h"],
            extra_compile_args=[*_FLAGS, "-fopenmp"],
            extra_link_args=["-fopenmp"],
            optional=True,
        ),
        Extension(
            "spectrumkv.engines._flash",
            sources=["src/spectrumkv/engines/_flash.c"],
            depends=["src/spectrumkv/_amx.h"],
            extra_compile_args=[*_FLAGS, "-fopenmp"],
            extra_link_args=["-fopenmp"],
            optional=True,
        ),
        Extension(
            "spectrumkv.engines._bf16dot",
            sources=["src/spectrumkv/engines/_bf16dot.c"],
            extra_compile_args=[*_FLAGS, "-fopenmp"],
            extra_link_args=["-fopenmp"],
            optional=True,
        ),
        Extension(
            "spectrumkv.engines._rowops",
            sources=["src/spectrumkv/engines/_rowops.c"],
            extra_compile_args=[*_FLAGS, "-ffp-contract=off", "-fno-trapping-math", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            optional=True,
        ),
    ]
)
