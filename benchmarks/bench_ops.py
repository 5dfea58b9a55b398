"""Per-op timings beside PyTorch (and our SGEMM beside NumPy).

    python benchmarks/bench_ops.py [gemm] [ops] [--quick] [--threads N] [--json FILE]

The same as ``fastcnn bench``; the code lives in ``fastcnn.bench`` so the CLI
and this script time exactly the same things.
"""
import sys

from fastcnn.bench import main

if __name__ == "__main__":
    sys.exit(main())
