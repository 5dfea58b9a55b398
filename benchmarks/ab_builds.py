"""Interleaved A/B of two builds of fastcnn's CPU module on sgemm, in one process.

On a shared or noisy machine, timing build A in one process and build B in
another confounds the builds with the machine's drift. This loads both
``_cpu`` extension files side by side and alternates them (and NumPy) round
by round, each round the best of a few calls after a short warm-up.

    python benchmarks/ab_builds.py OLD/_cpu*.so NEW/_cpu*.so \\
        --shapes 2048x2048x2048,1024x1024x1024 --rounds 12

Shapes are MxKxN. Prints GFLOP/s as median-of-rounds / best-round.
"""
import argparse
import importlib.machinery
import importlib.util
import time

import numpy as np


def load(path):
    loader = importlib.machinery.ExtensionFileLoader("_cpu", path)
    spec = importlib.util.spec_from_file_location("_cpu", path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def best_of(fn, calls, warm=0.01):
    end = time.perf_counter() + warm
    while time.perf_counter() < end:
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("builds", nargs=2, help="two _cpu extension files")
    ap.add_argument("--shapes", default="2048x2048x2048,1024x1024x1024")
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    mods = {f"build{i}": load(p) for i, p in enumerate(args.builds)}
    rng = np.random.default_rng(0)
    for shape in args.shapes.split(","):
        m, k, n = map(int, shape.split("x"))
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        c = np.empty((m, n), np.float32)
        calls = max(3, int(0.02 / (2 * m * n * k / 250e9)))
        fns = {name: (lambda mod=mod: mod.sgemm(False, False, 1.0, a, b, 0.0, c))
               for name, mod in mods.items()}
        fns["numpy"] = lambda: np.matmul(a, b, out=c)
        times = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                times[name].append(best_of(fn, calls))
            time.sleep(0.2)  # OpenBLAS's threads spin for a while after NumPy's call
        flops = 2.0 * m * n * k
        print(f"{shape}: " + "  ".join(
            f"{name} {flops / np.median(t) / 1e9:6.1f}/{flops / min(t) / 1e9:5.1f}"
            for name, t in times.items()), flush=True)


if __name__ == "__main__":
    main()
