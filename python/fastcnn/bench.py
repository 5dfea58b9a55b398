"""Benchmarks: fastcnn beside NumPy and PyTorch, in the same run.

``fastcnn bench`` (or ``python benchmarks/bench_ops.py``) times

* ``gemm``: our SGEMM against NumPy's BLAS, on squares and on the GEMM
  shapes convolutions produce;
* ``ops``: every op's forward and forward+backward against PyTorch (CPU);
* ``net``: a training step (SGD with momentum) and inference of the
  reference MNIST CNN, with and without BatchNorm, against PyTorch eager.

Each figure is the median of repeats after a warm-up, with the spread
(min-max over repeats) beside it; the ratio is PyTorch's (or NumPy's) time
over ours, so > 1 means fastcnn is faster.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import _backend
from . import functional as F


def _loops_lasting(fn, min_time, warmup):
    """After ``warmup`` calls, how many calls of ``fn`` last ``min_time``."""
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    fn()
    return max(1, int(min_time / max(time.perf_counter() - start, 1e-7)))


def _seconds_per_call(fn, loops):
    start = time.perf_counter()
    for _ in range(loops):
        fn()
    return (time.perf_counter() - start) / loops


@dataclass
class Timing:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, fn, repeats=7, min_time=0.05, warmup=2, settle=0.3):
        """Median seconds per call: each repeat runs ``fn`` enough times to
        last ``min_time``.

        ``settle`` seconds of sleep come first: the thread pools of whatever
        ran just before (OpenBLAS, PyTorch's OpenMP, ours) keep spinning for a
        while after their last call and would steal the cores from ``fn``."""
        time.sleep(settle)
        loops = _loops_lasting(fn, min_time, warmup)
        return cls._of_samples([_seconds_per_call(fn, loops) for _ in range(repeats)])

    @classmethod
    def pair(cls, ours, theirs, repeats=7, min_time=0.05, warmup=2, settle=0.25):
        """Timings of ``ours`` and ``theirs`` with their repeats interleaved
        (ours, theirs, ours, ...), each after ``settle`` seconds of sleep (see
        :meth:`of`): a drift in the machine's speed during the run (clock,
        neighbours on a shared host) then falls on both sides alike rather
        than on whichever ran second."""
        sides = (ours, theirs)
        loops = []
        for fn in sides:
            time.sleep(settle)
            loops.append(_loops_lasting(fn, min_time, warmup))
        samples = ([], [])
        for _ in range(repeats):
            for side, fn in enumerate(sides):
                time.sleep(settle)
                fn()
                samples[side].append(_seconds_per_call(fn, loops[side]))
        return tuple(cls._of_samples(s) for s in samples)

    @classmethod
    def _of_samples(cls, samples):
        return cls(statistics.median(samples), min(samples), max(samples))

    def ms(self):
        return f"{self.median * 1e3:8.3f} ms ({self.low * 1e3:.3f}-{self.high * 1e3:.3f})"


@dataclass
class Row:
    section: str
    name: str
    ours: Timing
    theirs: Timing | None = None
    baseline: str = ""
    flops: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self):
        return None if self.theirs is None else self.theirs.median / self.ours.median

    def line(self):
        gf = f"{self.flops / self.ours.median / 1e9:7.1f} GFLOP/s" if self.flops else " " * 15
        out = f"  {self.name:<44} {self.ours.ms()}  {gf}"
        if self.theirs is not None:
            tgf = (f" {self.flops / self.theirs.median / 1e9:6.1f} GF" if self.flops else "")
            out += f"  | {self.baseline} {self.theirs.ms()}{tgf}  x{self.ratio:5.2f}"
        return out


def _torch():
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(_backend.get_num_threads())
    return torch


# ------------------------------------------------------------------- gemm --

GEMM_SQUARES = (256, 512, 1024, 2048)
# (M, K, N) of the convolutions the issues name: conv1 of the MNIST CNN,
# CIFAR's first layer and LeNet's.
GEMM_CONV_SHAPES = ((32, 9, 50176), (64, 27, 131072), (6, 25, 36864))


def bench_gemm(rng, quick=False):
    rows = []
    squares = GEMM_SQUARES[:2] if quick else GEMM_SQUARES
    shapes = [(s, s, s) for s in squares] + list(GEMM_CONV_SHAPES[:1] if quick else GEMM_CONV_SHAPES)
    for m, k, n in shapes:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        c = np.empty((m, n), np.float32)
        # Interleaved repeats, each after a sleep: OpenBLAS's threads spin for
        # ~0.1 s after each NumPy product before they sleep (OpenMP's, after
        # ours, more briefly) and would take the other side's cores.
        ours, theirs = Timing.pair(lambda: _backend._cpu.sgemm(False, False, 1.0, a, b, 0.0, c),
                                   lambda: np.matmul(a, b, out=c))
        rows.append(Row("gemm", f"sgemm {m}x{k}x{n}", ours, theirs, "numpy", 2.0 * m * n * k))
    return rows


# -------------------------------------------------------------------- ops --

# (name, N, C, H, W, K, kernel, padding): the reference networks' layers.
CONV_SHAPES = (
    ("mnist conv1 1->32 3x3 28x28 b64", 64, 1, 28, 28, 32, 3, 1),
    ("mnist conv2 32->64 3x3 14x14 b64", 64, 32, 14, 14, 64, 3, 1),
    ("lenet conv1 1->6 5x5 28x28 b64", 64, 1, 28, 28, 6, 5, 0),
    ("cifar 3->64 3x3 32x32 b128", 128, 3, 32, 32, 64, 3, 1),
    ("cifar 64->128 3x3 16x16 b128", 128, 64, 16, 16, 128, 3, 1),
    ("cifar 128->256 3x3 8x8 b128", 128, 128, 8, 8, 256, 3, 1),
    ("pointwise 64->64 1x1 32x32 b64", 64, 64, 32, 32, 64, 1, 0),
)


def _conv_rows(rng, torch, quick):
    rows = []
    for name, n, c, h, w, k, r, p in CONV_SHAPES[:2] if quick else CONV_SHAPES:
        x = rng.standard_normal((n, c, h, w), dtype=np.float32)
        wt = (rng.standard_normal((k, c, r, r), dtype=np.float32) * 0.1).astype(np.float32)
        b = np.zeros(k, np.float32)
        y = F.conv2d(x, wt, b, padding=p)
        gy = rng.standard_normal(y.shape, dtype=np.float32)
        flops = 2.0 * n * k * c * r * r * y.shape[2] * y.shape[3]
        fwd = Timing.of(lambda: F.conv2d(x, wt, b, padding=p))

        def fwd_bwd():
            F.conv2d(x, wt, b, padding=p)
            F.conv2d_backward(gy, x, wt, b, padding=p)

        both = Timing.of(fwd_bwd)
        t_fwd = t_both = None
        if torch is not None:
            tx = torch.from_numpy(x).requires_grad_()
            tw = torch.from_numpy(wt).requires_grad_()
            tb = torch.from_numpy(b).requires_grad_()
            tgy = torch.from_numpy(gy)
            with torch.no_grad():
                t_fwd = Timing.of(lambda: torch.nn.functional.conv2d(tx, tw, tb, padding=p))

            def torch_fwd_bwd():
                out = torch.nn.functional.conv2d(tx, tw, tb, padding=p)
                torch.autograd.grad(out, (tx, tw, tb), tgy)

            t_both = Timing.of(torch_fwd_bwd)
        rows.append(Row("conv", f"{name} fwd", fwd, t_fwd, "torch", flops))
        rows.append(Row("conv", f"{name} fwd+bwd", both, t_both, "torch", 3 * flops))
    return rows


def _elementwise_rows(rng, torch):
    """Memory-bound ops on MNIST-CNN-sized activations, with a memcpy of the
    same bytes as the yardstick (extra['memcpy'])."""
    rows = []
    x = rng.standard_normal((64, 32, 28, 28), dtype=np.float32)
    gy = rng.standard_normal(x.shape, dtype=np.float32)
    pooled_gy = rng.standard_normal((64, 32, 14, 14), dtype=np.float32)
    logits = rng.standard_normal((256, 10), dtype=np.float32)
    labels = rng.integers(0, 10, 256)
    rm, rv = np.zeros(32, np.float32), np.ones(32, np.float32)
    wgt, bias = np.ones(32, np.float32), np.zeros(32, np.float32)
    images = rng.integers(0, 256, (256, 1, 28, 28), dtype=np.uint8)
    fc_x = rng.standard_normal((256, 3136), dtype=np.float32)
    fc_w = rng.standard_normal((128, 3136), dtype=np.float32) * 0.02
    fc_b = np.zeros(128, np.float32)
    fc_gy = rng.standard_normal((256, 128), dtype=np.float32)

    cases = [
        ("relu fwd 64x32x28x28", lambda: F.relu(x), 2 * x.nbytes,
         (lambda t: (lambda: torch.relu(t["x"])))),
        ("relu bwd", lambda: F.relu_backward(gy, x), 3 * x.nbytes,
         (lambda t: (lambda: torch.ops.aten.threshold_backward(t["gy"], t["x"], 0.0)))),
        ("max_pool2d 2x2 fwd", lambda: F.max_pool2d(x, 2), x.nbytes * 5 // 4,
         (lambda t: (lambda: torch.nn.functional.max_pool2d(t["x"], 2)))),
        ("max_pool2d 2x2 bwd", lambda: F.max_pool2d_backward(pooled_gy, x, 2),
         x.nbytes * 9 // 4, None),
        ("relu+max_pool2d fused fwd", lambda: F.relu_max_pool2d(x, 2), x.nbytes * 5 // 4,
         (lambda t: (lambda: torch.nn.functional.max_pool2d(torch.relu(t["x"]), 2)))),
        ("relu+max_pool2d fused bwd", lambda: F.relu_max_pool2d_backward(pooled_gy, x, 2),
         x.nbytes * 9 // 4, None),
        ("batch_norm train fwd", lambda: F.batch_norm(x, rm.copy(), rv.copy(), wgt, bias, True),
         3 * x.nbytes,
         (lambda t: (lambda: torch.nn.functional.batch_norm(
             t["x"], t["rm"].clone(), t["rv"].clone(), t["w"], t["b"], True)))),
        ("batch_norm train bwd",
         lambda: F.batch_norm_backward(gy, x, rm, rv, wgt, bias, True), 4 * x.nbytes, None),
        ("dropout p=0.5 fwd", lambda: F.dropout(x, 0.5, seed=1), 2 * x.nbytes,
         (lambda t: (lambda: torch.nn.functional.dropout(t["x"], 0.5, True)))),
        ("softmax dim=1 fwd", lambda: F.softmax(x, 1), 2 * x.nbytes,
         (lambda t: (lambda: torch.softmax(t["x"], 1)))),
        ("cross_entropy fwd+bwd 256x10", lambda: (F.cross_entropy(logits, labels),
                                                  F.cross_entropy_backward(1.0, logits, labels)),
         3 * logits.nbytes, None),
        ("normalize uint8 256x1x28x28", lambda: F.normalize(images, 0.286, 0.353),
         images.nbytes * 5, None),
        ("linear 3136->128 b256 fwd", lambda: F.linear(fc_x, fc_w, fc_b), 0,
         (lambda t: (lambda: torch.nn.functional.linear(t["fc_x"], t["fc_w"], t["fc_b"])))),
        ("linear 3136->128 b256 bwd", lambda: F.linear_backward(fc_gy, fc_x, fc_w, fc_b), 0,
         (lambda t: (lambda: (t["fc_gy"] @ t["fc_w"], t["fc_gy"].T @ t["fc_x"],
                              t["fc_gy"].sum(0))))),
    ]
    tensors = None
    if torch is not None:
        tensors = {name: torch.from_numpy(v) for name, v in dict(
            x=x, gy=gy, rm=rm, rv=rv, w=wgt, b=bias, fc_x=fc_x, fc_w=fc_w, fc_b=fc_b,
            fc_gy=fc_gy).items()}
    for name, fn, nbytes, torch_fn in cases:
        ours = Timing.of(fn)
        theirs = None
        if torch is not None and torch_fn is not None:
            with torch.no_grad():
                theirs = Timing.of(torch_fn(tensors))
        extra = {}
        if nbytes:
            half = np.empty(nbytes // 8, np.float32)
            out = np.empty_like(half)
            extra["memcpy_ms"] = Timing.of(lambda: np.copyto(out, half)).median * 1e3
        flops = 2.0 * 256 * 3136 * 128 if name.startswith("linear") else 0.0
        if name.endswith("bwd") and flops:
            flops *= 2
        rows.append(Row("ops", name, ours, theirs, "torch", flops, extra))
    return rows


def bench_ops(rng, quick=False):
    torch = _torch()
    return _conv_rows(rng, torch, quick) + _elementwise_rows(rng, torch)


# -------------------------------------------------------------------- net --

def _torch_mnist_cnn(torch, batchnorm):
    nn = torch.nn

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1)] + ([nn.BatchNorm2d(cout)] if batchnorm else []) \
            + [nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(1, 32), *block(32, 64), nn.Flatten(), nn.Linear(3136, 128),
                         nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10))


def bench_net(rng, quick=False):
    """A training step (forward, loss, backward, SGD with momentum) and
    inference of the reference MNIST CNN, with and without BatchNorm."""
    from . import models, nn, optim

    torch = _torch()
    rows = []
    for batchnorm in (False, True):
        tag = "mnist_cnn_bn" if batchnorm else "mnist_cnn"
        for batch in ((64,) if quick else (64, 256)):
            x = rng.standard_normal((batch, 1, 28, 28), dtype=np.float32)
            y = rng.integers(0, 10, batch)
            model = models.mnist_cnn(batchnorm=batchnorm, seed=0)
            model.train()
            loss_fn = nn.CrossEntropyLoss()
            opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

            def step():
                opt.zero_grad()
                loss_fn.forward(model.forward(x), y)
                model.backward(loss_fn.backward(), input_grad=False)
                opt.step()

            ours = Timing.of(step, repeats=5, min_time=0.2)
            theirs = None
            if torch is not None:
                tm = _torch_mnist_cnn(torch, batchnorm)
                topt = torch.optim.SGD(tm.parameters(), lr=0.01, momentum=0.9)
                tx, ty = torch.from_numpy(x), torch.from_numpy(y)

                def torch_step():
                    topt.zero_grad()
                    torch.nn.functional.cross_entropy(tm(tx), ty).backward()
                    topt.step()

                theirs = Timing.of(torch_step, repeats=5, min_time=0.2)
            rows.append(Row("net", f"{tag} train step b{batch}", ours, theirs, "torch",
                            extra={"images_per_s": batch / ours.median,
                                   "torch_images_per_s": batch / theirs.median if theirs else None}))
        model.eval()
        for batch in (1, 256):
            x = rng.standard_normal((batch, 1, 28, 28), dtype=np.float32)
            theirs = None
            if torch is not None:
                tm = _torch_mnist_cnn(torch, batchnorm).eval()
                tx = torch.from_numpy(x)
                with torch.no_grad():
                    theirs = Timing.of(lambda: tm(tx), repeats=5, min_time=0.2)
            # Inference proper (torch.no_grad's counterpart: nothing recorded,
            # layers fused), then a forward that records every activation
            # (what the visualisations run), both against torch.no_grad.
            for label, record in (("inference", False), ("eval forward, recorded,", True)):
                ours = Timing.of(lambda: model.forward(x, record=record), repeats=5,
                                 min_time=0.2)
                rows.append(Row("net", f"{tag} {label} b{batch}", ours, theirs, "torch",
                                extra={"images_per_s": batch / ours.median}))
    return rows


# -------------------------------------------------------------------- run --

SECTIONS = {"gemm": bench_gemm, "ops": bench_ops, "net": bench_net}


def cpu_info():
    """The Python, NumPy and CPU-kernel facts a result depends on (also `fastcnn info`'s)."""
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "threads": _backend.get_num_threads(),
        "gemm_kernel": _backend._cpu.gemm_kernel(),
        "conv_winograd": _backend.get_conv_winograd(),
    }


def machine_info():
    info = {"date": time.strftime("%Y-%m-%d"), **cpu_info()}
    torch = _torch()
    if torch is not None:
        info["torch"] = torch.__version__
    return info


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(sections=tuple(SECTIONS), quick=False, threads=None, seed=0, out=None,
        winograd=True):
    """Time ``sections``; returns (machine info, rows). ``threads`` and
    ``winograd`` (conv2d's Winograd path, see fastcnn.set_conv_winograd)
    apply for the run only."""
    previous = _backend.get_num_threads()
    previous_winograd = _backend.get_conv_winograd()
    if threads is not None:
        _backend.set_num_threads(threads)
    _backend.set_conv_winograd(bool(winograd))
    try:
        return _run(sections, quick, seed, out)
    finally:
        _backend.set_num_threads(previous)
        _backend.set_conv_winograd(previous_winograd)


def _run(sections, quick, seed, out):
    out = sys.stdout if out is None else out  # looked up per call, not at import
    rng = np.random.default_rng(seed)
    info = machine_info()
    print("fastcnn bench: " + ", ".join(f"{k}={v}" for k, v in info.items()), file=out)
    print("ratio = baseline time / fastcnn time (> 1: fastcnn faster); times are medians "
          "(min-max) over repeats", file=out)
    rows = []
    for name in sections:
        print(f"\n[{name}]", file=out)
        for row in SECTIONS[name](rng, quick=quick):
            rows.append(row)
            line = row.line()
            if "memcpy_ms" in row.extra:
                line += f"  (memcpy of its bytes {row.extra['memcpy_ms']:.3f} ms)"
            if "images_per_s" in row.extra:
                line += f"  {row.extra['images_per_s']:.0f} img/s"
            print(line, file=out, flush=True)
    ratios = [r.ratio for r in rows if r.section == "conv" and r.ratio and "fwd+bwd" in r.name]
    if ratios:
        print(f"\nconv2d fwd+bwd vs torch: median x{statistics.median(ratios):.2f}, "
              f"min x{min(ratios):.2f}", file=out)
    return info, rows


def add_arguments(parser):
    parser.add_argument("sections", nargs="*", default=list(SECTIONS),
                        help=f"what to time: {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (default), or cuda: the GPU benchmark (fastcnn.bench_cuda, "
                             "which takes its own options: see --device cuda --help)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes, for a smoke test")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--no-winograd", dest="winograd", action="store_false",
                        help="every convolution as im2col + GEMM (no Winograd F(2x2,3x3))")


def check_output_files(parser, *paths):
    """Fail at once (not after the whole run) on an output file that cannot be written."""
    import os
    from pathlib import Path

    for path in paths:
        if path is None:
            continue
        folder = Path(path).parent
        if Path(path).is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
            parser.error(f"cannot write {path}")


def run_args(args, parser):
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    check_output_files(parser, args.json)
    info, rows = run(args.sections, quick=args.quick, threads=args.threads,
                     winograd=args.winograd)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": [
                {**asdict(r), "ratio": r.ratio} for r in rows]}, f, indent=1)
    return 0


def main(argv=None):
    """``fastcnn bench``: the CPU benchmark, or with ``--device cuda`` the GPU one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # --device picks the benchmark (the last one given counts, as argparse's options);
    # the GPU one takes its own options
    device = argparse.ArgumentParser(prog="fastcnn bench", add_help=False)
    device.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    chosen, rest = device.parse_known_args(argv)
    if chosen.device == "cuda":
        from . import bench_cuda

        return bench_cuda.main(rest)
    argv = rest
    parser = argparse.ArgumentParser(prog="fastcnn bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_args(parser.parse_args(argv), parser)


if __name__ == "__main__":
    sys.exit(main())
