"""GPU benchmark beside PyTorch + cuDNN; the same as ``fastcnn bench --device cuda``.

    python benchmarks/bench_cuda.py [gemm] [conv] [ops] [net] [--quick] [--tf32 off|on|both]
                                    [--json FILE] [--markdown FILE]
"""
import sys

from fastcnn.bench_cuda import main

if __name__ == "__main__":
    sys.exit(main())
