"""Run the spectrumkv CLI with the paged kernel capped at one ISA, e.g. to record `bench attention`
with the AVX-512 kernel on an AMX machine:

    ISA=avx512 .venv/bin/python benchmarks/results/amx-cli.py bench attention ...
"""

import os
import sys

from spectrumkv.cli import main
from spectrumkv.paged import kernel

if __name__ == "__main__":
    kernel.set_isa(os.environ.get("ISA", "amx"))
    print(f"paged kernel ISA: {kernel.isa()}", file=sys.stderr)
    sys.exit(main(sys.argv[1:]))
