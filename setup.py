"""Build the optional fused codec (`spectrumkv._codec`). Everything else is in pyproject.toml.

The extension is optional: if it cannot be compiled, SpectrumKV runs on the torch reference
codec (same bytes, slower). `-ffp-contract=off` keeps its float arithmetic identical to torch's.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "spectrumkv._codec",
            sources=["src/spectrumkv/_codec.c"],
            depends=["src/spectrumkv/_xxh3.h"],
            extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-math-errno"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)
