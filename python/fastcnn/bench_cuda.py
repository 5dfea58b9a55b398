"""GPU benchmark: fastcnn's CUDA kernels beside PyTorch + cuDNN, in the same run.

    fastcnn bench --device cuda [gemm] [conv] [ops] [net] [--quick]
                                [--tf32 off|on|both] [--json FILE] [--markdown FILE]
    (or python benchmarks/bench_cuda.py ...)

Every figure is the median over repeats of CUDA-event times (after warm-up;
each repeat loops the call enough times to last a few milliseconds), with
the min-max spread beside it. ratio = PyTorch time / fastcnn time, so > 1
means fastcnn is faster. Each section runs with TF32 off on both sides
(fastcnn.cuda.matmul.allow_tf32; torch.backends.cuda.matmul.allow_tf32 and
torch.backends.cudnn.allow_tf32), then with TF32 on on both.

Sections:
  gemm  our SGEMM against torch.matmul (cuBLAS) on 1024-8192 squares and on the
        GEMM shapes of the reference convolutions (target: >= 0.8x cuBLAS);
  conv  conv2d forward, backward and forward+backward on fastcnn.bench's
        CONV_SHAPES against cuDNN (torch.backends.cudnn.benchmark on);
  ops   the memory-bound ops on MNIST-CNN-sized activations;
  net   a training step (forward, loss, backward, SGD with momentum), eager
        and captured as a CUDA graph (fastcnn.cuda.CapturedStep), and inference
        of the reference MNIST CNN, batch 64 and 256, against PyTorch eager.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict

import numpy as np

from . import cuda as fcuda
from . import functional as F
from . import __version__
from .bench import (CONV_SHAPES, GEMM_CONV_SHAPES, Row, Timing, _torch_mnist_cnn,
                    check_output_files)

GEMM_SQUARES = (1024, 2048, 4096, 8192)
MIN_MS = 5.0  # each repeat lasts at least this long


# ------------------------------------------------------------------ timing --

class _Clock:
    """CUDA events of one library, recorded on its current stream."""

    def __init__(self, lib):
        self.lib = lib

    def pair(self):
        if self.lib.__name__ == "torch":
            return (self.lib.cuda.Event(enable_timing=True),
                    self.lib.cuda.Event(enable_timing=True))
        return self.lib.cuda.Event(), self.lib.cuda.Event()

    def elapsed_ms(self, start, end):
        if self.lib.__name__ == "torch":
            return start.elapsed_time(end)
        return self.lib.cuda.get_elapsed_time(start, end)


def gpu_timing(fn, clock, repeats=15, warmup=3):
    """Seconds per call of fn (which enqueues GPU work), by CUDA events."""
    for _ in range(warmup):
        fn()
    start, end = clock.pair()
    start.record()
    fn()
    end.record()
    end.synchronize()
    once = max(clock.elapsed_ms(start, end), 1e-3)
    loops = max(1, min(2000, int(MIN_MS / once)))
    samples = []
    for _ in range(repeats):
        start.record()
        for _ in range(loops):
            fn()
        end.record()
        end.synchronize()
        samples.append(clock.elapsed_ms(start, end) / loops / 1e3)
    return Timing(statistics.median(samples), min(samples), max(samples))


class Bench:
    def __init__(self, quick, tf32):
        import cupy
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None and not torch.cuda.is_available():
            torch = None
        self.cp, self.torch, self.quick, self.tf32 = cupy, torch, quick, tf32
        self.ours = _Clock(cupy)
        self.theirs = _Clock(torch) if torch is not None else None
        self.rng = np.random.default_rng(0)
        fcuda.set_allow_tf32(tf32)
        if torch is not None:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cudnn.benchmark = True

    def randn(self, *shape, scale=1.0):
        return self.cp.asarray((self.rng.standard_normal(shape) * scale).astype(np.float32))

    def t(self, a):
        """A torch view of a CuPy array (no copy)."""
        return self.torch.from_dlpack(a)

    def row(self, section, name, ours, theirs=None, flops=0.0, repeats=15):
        mine = gpu_timing(ours, self.ours, repeats)
        other = None
        if theirs is not None and self.theirs is not None:
            other = gpu_timing(theirs, self.theirs, repeats)
        tag = " [tf32]" if self.tf32 else ""
        return Row(section, name + tag, mine, other, "torch", flops)

    # ---------------------------------------------------------------- gemm --
    def gemm(self):
        from . import _cuda

        rows = []
        squares = GEMM_SQUARES[:2] if self.quick else GEMM_SQUARES
        for m, k, n in [(s, s, s) for s in squares] + list(GEMM_CONV_SHAPES):
            a, b = self.randn(m, k), self.randn(k, n)
            c = self.cp.empty((m, n), np.float32)
            ours = lambda: _cuda.sgemm(False, False, 1.0, a, b, 0.0, c)  # noqa: E731
            theirs = None
            if self.torch is not None:
                ta, tb, tc = self.t(a), self.t(b), self.t(c)
                theirs = lambda: self.torch.matmul(ta, tb, out=tc)  # noqa: E731
            rows.append(self.row("gemm", f"sgemm {m}x{k}x{n}", ours, theirs, 2.0 * m * n * k))
        return rows

    # ---------------------------------------------------------------- conv --
    def conv(self):
        rows = []
        for name, n, c, h, w, k, r, p in CONV_SHAPES[:2] if self.quick else CONV_SHAPES:
            x, wt, b = self.randn(n, c, h, w), self.randn(k, c, r, r, scale=0.1), self.randn(k)
            y = F.conv2d(x, wt, b, padding=p)
            gy = self.randn(*y.shape)
            flops = 2.0 * n * k * c * r * r * y.shape[2] * y.shape[3]
            fwd = lambda: F.conv2d(x, wt, b, padding=p)  # noqa: E731
            bwd = lambda: F.conv2d_backward(gy, x, wt, b, padding=p)  # noqa: E731

            def both():
                fwd()
                bwd()

            t_fwd = t_bwd = t_both = None
            if self.torch is not None:
                torch = self.torch
                tx, tw, tb, tgy = self.t(x), self.t(wt), self.t(b), self.t(gy)

                def t_fwd():
                    return torch.nn.functional.conv2d(tx, tw, tb, padding=p)

                def t_bwd():
                    return torch.ops.aten.convolution_backward(
                        tgy, tx, tw, [k], [1, 1], [p, p], [1, 1], False, [0, 0], 1,
                        [True, True, True])

                def t_both():
                    t_fwd()
                    t_bwd()

            rows.append(self.row("conv", f"{name} fwd", fwd, t_fwd, flops))
            rows.append(self.row("conv", f"{name} bwd", bwd, t_bwd, 2 * flops))
            rows.append(self.row("conv", f"{name} fwd+bwd", both, t_both, 3 * flops))
        return rows

    # ----------------------------------------------------------------- ops --
    def ops(self):
        cp = self.cp
        x, gy = self.randn(64, 32, 28, 28), self.randn(64, 32, 28, 28)
        pooled_gy = self.randn(64, 32, 14, 14)
        logits = self.randn(256, 10)
        labels = cp.asarray(self.rng.integers(0, 10, 256))
        rm, rv = cp.zeros(32, np.float32), cp.ones(32, np.float32)
        wgt, bias = cp.ones(32, np.float32), cp.zeros(32, np.float32)
        images = cp.asarray(self.rng.integers(0, 256, (256, 1, 28, 28), dtype=np.uint8))
        fc_x, fc_w = self.randn(256, 3136), self.randn(128, 3136, scale=0.02)
        fc_b, fc_gy = cp.zeros(128, np.float32), self.randn(256, 128)
        cases = [
            ("relu fwd 64x32x28x28", lambda: F.relu(x),
             lambda t: lambda: self.torch.relu(t(x))),
            ("relu bwd", lambda: F.relu_backward(gy, x),
             lambda t: lambda: self.torch.ops.aten.threshold_backward(t(gy), t(x), 0.0)),
            ("max_pool2d 2x2 fwd", lambda: F.max_pool2d(x, 2),
             lambda t: lambda: self.torch.nn.functional.max_pool2d(t(x), 2)),
            ("max_pool2d 2x2 bwd", lambda: F.max_pool2d_backward(pooled_gy, x, 2), None),
            ("batch_norm train fwd", lambda: F.batch_norm(x, rm, rv, wgt, bias, True),
             lambda t: lambda: self.torch.nn.functional.batch_norm(
                 t(x), t(rm), t(rv), t(wgt), t(bias), True)),
            ("batch_norm train bwd", lambda: F.batch_norm_backward(gy, x, rm, rv, wgt, bias, True),
             None),
            ("dropout p=0.5 fwd", lambda: F.dropout(x, 0.5, seed=1),
             lambda t: lambda: self.torch.nn.functional.dropout(t(x), 0.5, True)),
            ("softmax dim=1 fwd", lambda: F.softmax(x, 1),
             lambda t: lambda: self.torch.softmax(t(x), 1)),
            ("cross_entropy fwd+bwd 256x10",
             lambda: (F.cross_entropy(logits, labels), F.cross_entropy_backward(1.0, logits, labels)),
             None),
            ("normalize uint8 256x1x28x28", lambda: F.normalize(images, 0.286, 0.353), None),
            ("linear 3136->128 b256 fwd", lambda: F.linear(fc_x, fc_w, fc_b),
             lambda t: lambda: self.torch.nn.functional.linear(t(fc_x), t(fc_w), t(fc_b))),
            ("linear 3136->128 b256 bwd", lambda: F.linear_backward(fc_gy, fc_x, fc_w, fc_b),
             lambda t: lambda: (t(fc_gy) @ t(fc_w), t(fc_gy).T @ t(fc_x), t(fc_gy).sum(0))),
        ]
        rows = []
        for name, ours, theirs in cases:
            theirs = theirs(self.t) if (theirs is not None and self.torch is not None) else None
            if theirs is not None:
                with self.torch.no_grad():
                    rows.append(self.row("ops", name, ours, theirs))
            else:
                rows.append(self.row("ops", name, ours))
        return rows

    # ----------------------------------------------------------------- net --
    def net(self):
        from . import models, nn, optim

        cp, rows = self.cp, []
        for batchnorm in (False, True):
            tag = "mnist_cnn_bn" if batchnorm else "mnist_cnn"
            for batch in (64,) if self.quick else (64, 256):
                x = self.randn(batch, 1, 28, 28)
                y = cp.asarray(self.rng.integers(0, 10, batch))
                try:
                    model = models.mnist_cnn(batchnorm=batchnorm, seed=0).to("cuda")
                except Exception as exc:  # noqa: BLE001 - report and go on
                    print(f"  {tag}: fastcnn model on the GPU unavailable ({exc})")
                    return rows
                model.train()
                loss_fn = nn.CrossEntropyLoss()
                opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

                y_host = cp.asnumpy(y)

                def step():
                    # A step as fastcnn.train.Trainer runs it: the labels checked on
                    # the host (cross_entropy would otherwise wait for the GPU to
                    # check them, which PyTorch's step does not do), all else eager.
                    opt.zero_grad()
                    logits = model.forward(x)
                    with F._checked_targets(y_host, logits.shape[1]):
                        loss_fn.forward(logits, y)
                    model.backward(loss_fn.backward(), input_grad=False)
                    opt.step()

                theirs = None
                if self.torch is not None:
                    torch = self.torch
                    tm = _torch_mnist_cnn(torch, batchnorm).cuda()
                    topt = torch.optim.SGD(tm.parameters(), lr=0.01, momentum=0.9)
                    tx, ty = self.t(x), self.t(y)

                    def theirs():
                        topt.zero_grad()
                        torch.nn.functional.cross_entropy(tm(tx), ty).backward()
                        topt.step()

                row = self.row("net", f"{tag} train step b{batch}", step, theirs, repeats=7)
                row.extra["images_per_s"] = batch / row.ours.median
                rows.append(row)
                # The same step captured once as a CUDA graph and replayed
                # (fastcnn.cuda.CapturedStep), against the same PyTorch eager step.
                # Labels from the host, as a training loop's (checked there,
                # copied in), so that no step waits for the GPU.
                try:
                    captured = fcuda.CapturedStep(model, loss_fn, opt)
                    captured(x, y_host)  # the eager warm-up step
                    captured(x, y_host)  # the capture
                except Exception as exc:  # noqa: BLE001 - report and go on
                    print(f"  {tag}: CUDA-graph step unavailable ({type(exc).__name__}: {exc})")
                else:
                    row = self.row("net", f"{tag} train step b{batch} [graph]",
                                   lambda: captured(x, y_host), theirs, repeats=7)
                    row.extra["images_per_s"] = batch / row.ours.median
                    rows.append(row)
                model.eval()
                inf_theirs = None
                if self.torch is not None:
                    tm.eval()

                    def inf_theirs():
                        with self.torch.no_grad():
                            tm(tx)

                # record=False, torch.no_grad's counterpart (a replayed graph after
                # the first two calls, see fastcnn.capture.CapturedForward)
                row = self.row("net", f"{tag} inference b{batch}",
                               lambda: model.forward(x, record=False), inf_theirs, repeats=7)
                row.extra["images_per_s"] = batch / row.ours.median
                rows.append(row)
        return rows


SECTIONS = ("gemm", "conv", "ops", "net")


def machine_info():
    import cupy

    rt = cupy.cuda.runtime
    info = {"date": time.strftime("%Y-%m-%d"), "gpu": fcuda.device_name(0),
            "cuda_runtime": rt.runtimeGetVersion(), "cuda_driver": rt.driverGetVersion(),
            "cupy": cupy.__version__, "fastcnn": __version__}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cudnn"] = torch.backends.cudnn.version()
    except ImportError:
        pass
    return info


def markdown(info, rows):
    lines = [f"### GPU: {info['gpu']} ({info['date']})", "",
             ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("gpu", "date")), "",
             "| case | fastcnn ms | torch ms | ratio (torch / fastcnn) | fastcnn GFLOP/s |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        theirs = f"{r.theirs.median * 1e3:.3f}" if r.theirs else ""
        ratio = f"{r.ratio:.2f}" if r.ratio else ""
        gflops = f"{r.flops / r.ours.median / 1e9:.0f}" if r.flops else ""
        lines.append(f"| {r.name} | {r.ours.median * 1e3:.3f} | {theirs} | {ratio} | {gflops} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastcnn bench --device cuda",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("sections", nargs="*", default=list(SECTIONS),
                        help=f"what to time: {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes, for a smoke test")
    parser.add_argument("--tf32", choices=("off", "on", "both"), default="both",
                        help="TF32 on both sides: off, on, or off then on (default)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="also write a Markdown table")
    args = parser.parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    check_output_files(parser, args.json, args.markdown)
    if not fcuda.is_available():
        print(f"fastcnn bench --device cuda: error: no usable GPU "
              f"({fcuda.unavailable_reason()})", file=sys.stderr)
        return 2
    info = machine_info()
    print("fastcnn GPU bench: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print("ratio = torch time / fastcnn time (> 1: fastcnn faster); CUDA-event medians "
          "(min-max) over repeats")
    rows = []
    for tf32 in {"off": (False,), "on": (True,), "both": (False, True)}[args.tf32]:
        bench = Bench(args.quick, tf32)
        for name in args.sections:
            print(f"\n[{name}] tf32 {'on' if tf32 else 'off'}")
            for row in getattr(bench, name)():
                rows.append(row)
                line = row.line()
                if "images_per_s" in row.extra:
                    line += f"  {row.extra['images_per_s']:.0f} img/s"
                print(line, flush=True)
    fcuda.set_allow_tf32(False)
    for tf32 in (False, True):
        tag = " [tf32]" if tf32 else ""
        for section, what, suffix in (("gemm", "sgemm", ""), ("conv", "conv2d fwd+bwd", "fwd+bwd")):
            ratios = [r.ratio for r in rows if r.section == section and r.ratio
                      and ("[tf32]" in r.name) == tf32 and r.name.removesuffix(tag).endswith(suffix)]
            if ratios:
                print(f"{what}{tag} vs {'cuBLAS' if section == 'gemm' else 'cuDNN'}: median "
                      f"x{statistics.median(ratios):.2f}, min x{min(ratios):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": [{**asdict(r), "ratio": r.ratio} for r in rows]}, f,
                      indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(info, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
