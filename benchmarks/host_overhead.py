"""The host side of a GPU training step, without a GPU: what Python, the
bindings' argument checks and the array bookkeeping cost per step.

Small CNNs are launch-bound: at batch 64 the H100/H200 finishes a step's
kernels in well under a millisecond, so an eager step takes as long as its
host side does (a CUDA graph, ``fastcnn.cuda.CapturedStep``, removes it).
This runs the reference CNN's step through tests/fake_cupy.py (NumPy arrays
taken for CuPy arrays) with the kernel calls answered at once instead of
emulated, and times forward, loss, backward and optimizer separately.

    python benchmarks/host_overhead.py [--batchnorm] [--adam] [--steps N]

CuPy's own costs (its allocator, array creation) are not CuPy's here but the
stand-in's (NumPy allocations, a few microseconds for a large array, about
what CuPy's pool costs); launch latency and the bindings' reading of CuPy
arrays are not included.
"""
import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import fake_cupy  # noqa: E402


class _Instant:
    """fastcnn._cuda.emulator with every kernel answered at once (outputs left
    as allocated), except the cross-entropy's target counts, which the step
    reads: all targets valid."""

    def __init__(self, emulator):
        self._emu = emulator

    def __getattr__(self, name):
        real = getattr(self._emu, name)
        if not callable(real) or isinstance(real, type) or name.startswith(
                ("graph", "use_", "launches", "set_", "get_", "allow")):
            return real
        if name == "cross_entropy_total":
            def counts(rows, *args):
                args[-1][...] = (rows.shape[0], 0, 0)
            return counts
        return lambda *args, **kwargs: None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batchnorm", action="store_true")
    parser.add_argument("--adam", action="store_true")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import pytest

    with pytest.MonkeyPatch.context() as mp:
        cp = fake_cupy.install(mp)
        from fastcnn import _backend as B
        from fastcnn import _cuda, models, nn, optim

        mp.setattr(B, "_cuda_kernels", lambda: (cp, _Instant(_cuda.emulator)))
        rng = np.random.default_rng(0)
        model = models.mnist_cnn(batchnorm=args.batchnorm, seed=0).to("cuda")
        loss_fn = nn.CrossEntropyLoss()
        opt = (optim.Adam(model.parameters()) if args.adam else
               optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
        x = cp.asarray(rng.standard_normal((64, 1, 28, 28)).astype(np.float32))
        y = cp.asarray(rng.integers(0, 10, 64))

        def step():
            t0 = time.perf_counter()
            opt.zero_grad()
            out = model(x)
            t1 = time.perf_counter()
            loss_fn(out, y)
            grad = loss_fn.backward()
            t2 = time.perf_counter()
            model.backward(grad, input_grad=False)
            t3 = time.perf_counter()
            opt.step()
            t4 = time.perf_counter()
            return np.array([t1 - t0, t2 - t1, t3 - t2, t4 - t3])

        for _ in range(5):
            step()
        best = None
        for _ in range(args.repeats):
            total = sum(step() for _ in range(args.steps)) / args.steps
            if best is None or total.sum() < best.sum():
                best = total
    parts = ", ".join(f"{name} {1e6 * t:.0f}" for name, t in
                      zip(("forward", "loss", "backward", "optimizer"), best))
    print(f"host side of a GPU training step (mnist_cnn{' + BN' if args.batchnorm else ''}, "
          f"{'Adam' if args.adam else 'SGD momentum'}, batch 64): {1e6 * best.sum():.0f} us "
          f"({parts} us), best of {args.repeats} x {args.steps} steps")


if __name__ == "__main__":
    main()
