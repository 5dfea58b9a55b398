"""The ``fastcnn`` command line: ``fastcnn demo | train | predict | explain | bench | info``.

Each subcommand is a :class:`Command` in ``COMMANDS`` (name, help, a function
adding its arguments to an argparse parser, and a function running it with
the parsed arguments and returning the exit status); ``register`` adds one.
Heavy imports happen inside the run functions so ``fastcnn --help`` is quick.
"""

import argparse
import importlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = ["Command", "COMMANDS", "register", "main", "DEMO_RECIPE"]


@dataclass
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS = {}


def register(name, help, add_arguments, run):
    """Add the subcommand ``fastcnn NAME``."""
    COMMANDS[name] = Command(name, help, add_arguments, run)


class CommandError(Exception):
    """A user-facing failure: printed as 'fastcnn: error: ...' with exit status 2."""


# ---------------------------------------------------------------- training (demo, train)

#: What ``fastcnn demo`` trains: the reference CNN with batch norm on Fashion-MNIST.
DEMO_RECIPE = {
    "arch": "mnist_cnn_bn", "epochs": 15, "batch_size": 128, "optimizer": "sgd", "lr": 0.05,
    "momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine", "warmup_epochs": 1.0,
    "shift": 0, "hflip": True, "val_size": 5000, "seed": 0,
}


def _add_training_arguments(parser, defaults):
    parser.add_argument("--data", metavar="DIR",
                        help="folder with MNIST-format IDX files (default: $FASTCNN_DATA, then "
                             "Debian's /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--out", metavar="DIR", default=defaults["out"],
                        help="output folder for the model, checkpoint, history and curves "
                             "(default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=defaults["epochs"],
                        help="epochs (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"],
                        help="batch size (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults["seed"],
                        help="seed for weights, shuffling, augmentation and dropout "
                             "(default: %(default)s)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for the kernels (default: fastcnn's default)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="train on the CPU or on the GPU (CuPy and fastcnn's CUDA module; "
                             "default: %(default)s)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="with --device cuda: run each training step as a replayed CUDA "
                             "graph (the same results, without the per-kernel launch cost)")
    parser.add_argument("--limit", type=int, metavar="N",
                        help="use only the first N training and N test images (quick runs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_demo_arguments(parser):
    _add_training_arguments(parser, {**DEMO_RECIPE, "out": "fastcnn-demo"})


def _add_train_arguments(parser):
    from .models import PRESETS

    _add_training_arguments(parser, {**DEMO_RECIPE, "out": "fastcnn-run"})
    parser.add_argument("--arch", choices=sorted(PRESETS), default=DEMO_RECIPE["arch"],
                        help="architecture preset (default: %(default)s)")
    parser.add_argument("--optimizer", choices=["sgd", "adam", "adamw"],
                        default=DEMO_RECIPE["optimizer"], help="(default: %(default)s)")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default: 0.05 for sgd, 0.001 for adam/adamw)")
    parser.add_argument("--momentum", type=float, default=DEMO_RECIPE["momentum"],
                        help="SGD momentum, Nesterov (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=None,
                        help="weight decay (default: 5e-4 for sgd, 0 for adam, 0.01 for adamw)")
    parser.add_argument("--schedule", choices=["cosine", "step", "none"],
                        default=DEMO_RECIPE["schedule"],
                        help="learning-rate schedule: cosine with warm-up (per batch), step "
                             "(x0.1 every third of the run) or none (default: %(default)s)")
    parser.add_argument("--warmup-epochs", type=float, default=DEMO_RECIPE["warmup_epochs"],
                        help="linear warm-up for the cosine schedule (default: %(default)s)")
    parser.add_argument("--shift", type=int, default=DEMO_RECIPE["shift"],
                        help="augmentation: random shifts of up to this many pixels "
                             "(default: %(default)s, off)")
    parser.add_argument("--hflip", action=argparse.BooleanOptionalAction,
                        default=DEMO_RECIPE["hflip"],
                        help="augmentation: random left-right flips (default: on)")
    parser.add_argument("--val-size", type=int, default=DEMO_RECIPE["val_size"],
                        help="training images held out for validation (default: %(default)s; "
                             "0: none)")
    parser.add_argument("--patience", type=int, metavar="EPOCHS",
                        help="early stopping: stop after this many epochs without a better "
                             "validation accuracy, keeping the best weights")
    parser.add_argument("--classes", metavar="NAMES",
                        help="comma-separated class names (default: classes.txt in the data "
                             "folder, Fashion-MNIST's names, or the label numbers)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/checkpoint.npz")


def _set_threads(threads):
    if threads is not None:
        import fastcnn

        if threads < 1:
            raise CommandError(f"--threads must be >= 1, got {threads}")
        fastcnn.set_num_threads(threads)


def _move_to_device(model, device):
    """Put ``model`` on --device; returns where it trains, in words."""
    import fastcnn
    import fastcnn.cuda

    if device == "cpu":
        return f"{fastcnn.get_num_threads()} CPU threads"
    if not fastcnn.cuda.is_available():
        why = ("fastcnn was built without its CUDA module" if fastcnn.cuda._cuda() is None
               else "no CUDA GPU or driver on this machine")
        raise CommandError(f"--device cuda: no usable GPU ({why})")
    try:
        model.to("cuda")
    except RuntimeError as exc:  # CuPy missing: the message says what to install
        raise CommandError(f"--device cuda: {exc}") from None
    device_id = int(importlib.import_module("cupy").cuda.runtime.getDevice())
    return f"GPU {device_id} ({fastcnn.cuda.device_name(device_id)})"


def _load_data(args, demo):
    from . import data

    if demo:
        train, test = data.load_fashion_mnist(args.data)
    else:
        names = args.classes.split(",") if args.classes else None
        train, test = data.load_idx_dataset(data.find_data_dir(args.data), names)
    if args.limit:
        train, test = train[:args.limit], test[:args.limit]
    return train, test


def _train_and_report(args, recipe, demo):
    """The body of ``demo`` and ``train``: load, build, fit, evaluate, save, plot."""
    import fastcnn

    from . import data, io, models, optim
    from .train import Trainer, evaluate, plot_history

    began = time.perf_counter()
    _set_threads(args.threads)
    if args.epochs < 1 or args.batch_size < 1:
        raise CommandError("--epochs and --batch-size must be >= 1")
    train_set, test_set = _load_data(args, demo)
    print(f"data: {train_set!r}, {test_set!r}")
    val_set = None
    if recipe["val_size"] and len(train_set) > 2 * recipe["val_size"]:
        train_set, val_set = train_set.split(recipe["val_size"], seed=args.seed)
    c, h, w = train_set.image_shape
    if h != w:
        raise CommandError(f"the presets need square images, got {h}x{w}")
    model = models.build(recipe["arch"], num_classes=train_set.num_classes, in_channels=c,
                         input_size=h, seed=args.seed)
    model.metadata = {"input_shape": [c, h, w], "classes": list(train_set.classes),
                      "mean": list(train_set.mean), "std": list(train_set.std),
                      "dataset": train_set.name.replace(" train", ""), "arch": recipe["arch"]}
    print(model.summary())
    where = _move_to_device(model, args.device)
    augment = data.Augment(shift=recipe["shift"], hflip=recipe["hflip"])
    loader = data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                             seed=args.seed, drop_last=len(train_set) > args.batch_size,
                             augment=augment)
    optimizer = optim.build_optimizer(recipe["optimizer"], model.parameters(), recipe["lr"],
                                      momentum=recipe["momentum"],
                                      weight_decay=recipe["weight_decay"])
    scheduler = None
    total_steps = args.epochs * len(loader)
    if recipe["schedule"] == "cosine":
        warmup = min(int(recipe["warmup_epochs"] * len(loader)), total_steps - 1)
        scheduler = optim.CosineAnnealingLR(optimizer, T_max=total_steps, warmup=warmup,
                                            interval="step")
    elif recipe["schedule"] == "step":
        scheduler = optim.StepLR(optimizer, step_size=max(1, -(-args.epochs // 3)), gamma=0.1)
    print(f"training {recipe['arch']} for {args.epochs} epochs: {recipe['optimizer']} "
          f"lr {recipe['lr']}, batch {args.batch_size}, schedule {recipe['schedule']}, "
          f"augmentation {augment!r}, {where}")
    out = Path(args.out)
    patience = recipe.get("patience")
    if args.cuda_graph and args.device != "cuda":
        raise CommandError("--cuda-graph needs --device cuda")
    trainer = Trainer(out_dir=out, progress=not args.no_progress,
                      early_stopping=patience if val_set is not None else None,
                      restore_best=bool(patience and val_set is not None),
                      cuda_graph=args.cuda_graph)
    history = trainer.fit(model, loader, val_set, epochs=args.epochs, optimizer=optimizer,
                          scheduler=scheduler, resume=bool(getattr(args, "resume", False)))
    result = evaluate(model, test_set)
    print()
    print(f"test set ({len(test_set)} images):")
    print(result.format())
    model_path = io.save(model, out / "model.npz")
    curves = plot_history(history, out / "curves.png",
                          title=f"{recipe['arch']} on {model.metadata['dataset']}")
    train_time = sum(h["time_s"] for h in history)
    images = sum(h["images_per_s"] * h["time_s"] for h in history)
    summary = {"test": result.to_dict(), "recipe": recipe, "epochs_run": len(history),
               "train_time_s": train_time, "train_images_per_s": images / max(train_time, 1e-9),
               "total_time_s": time.perf_counter() - began,
               "threads": fastcnn.get_num_threads(), "device": where}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print()
    print(f"test accuracy {100 * result.accuracy:.2f}% after {len(history)} epochs; "
          f"training {train_time:.0f} s ({summary['train_images_per_s']:.0f} img/s), "
          f"total {summary['total_time_s']:.0f} s")
    print(f"saved {model_path}, {curves}, {out / 'history.json'}, {out / 'results.json'}")
    if demo:
        _explain_demo(model, test_set, out / "explain")
    return 0


def _run_demo(args):
    return _train_and_report(args, {**DEMO_RECIPE, "epochs": args.epochs,
                                    "batch_size": args.batch_size, "seed": args.seed}, demo=True)


def _run_train(args):
    optimizer = args.optimizer
    lr = args.lr if args.lr is not None else (0.05 if optimizer == "sgd" else 1e-3)
    wd = args.weight_decay if args.weight_decay is not None else {
        "sgd": 5e-4, "adam": 0.0, "adamw": 0.01}[optimizer]
    recipe = {"arch": args.arch, "epochs": args.epochs, "batch_size": args.batch_size,
              "optimizer": optimizer, "lr": lr, "momentum": args.momentum, "weight_decay": wd,
              "schedule": args.schedule, "warmup_epochs": args.warmup_epochs,
              "shift": args.shift, "hflip": args.hflip, "val_size": args.val_size,
              "seed": args.seed, "patience": args.patience}
    return _train_and_report(args, recipe, demo=False)


# ---------------------------------------------------------------- predict

def _add_predict_arguments(parser):
    parser.add_argument("model", help="a model file saved by fastcnn (e.g. fastcnn-demo/model.npz)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files")
    parser.add_argument("--top-k", type=int, default=3,
                        help="classes to show (default: %(default)s)")
    parser.add_argument("--invert", choices=["auto", "yes", "no"], default="auto",
                        help="invert grey levels: 'auto' inverts a light-background picture "
                             "for a one-channel model, as Fashion-MNIST and MNIST are light "
                             "on dark (default: %(default)s)")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads")


def load_image(path, input_shape, invert="auto"):
    """A picture as a uint8 (C, H, W) array for a model with ``input_shape``: converted
    to grey or RGB, padded to a square with its border colour, resized, and for
    one-channel models inverted when its background is light (``invert='auto'``)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    c, h, w = input_shape
    try:
        with Image.open(path) as img:
            img = img.convert("L" if c == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise CommandError(f"{path}: not a readable image ({exc})") from exc
    pixels = np.asarray(img)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]).reshape(-1, c)
    fill = tuple(int(v) for v in np.median(border, axis=0))
    side = max(img.size)
    if img.size[0] != img.size[1]:
        square = Image.new(img.mode, (side, side), fill[0] if c == 1 else fill)
        square.paste(img, ((side - img.size[0]) // 2, (side - img.size[1]) // 2))
        img = square
    img = img.resize((w, h), Image.Resampling.LANCZOS)
    array = np.asarray(img, dtype=np.uint8).reshape(h, w, c).transpose(2, 0, 1)
    if invert == "yes" or (invert == "auto" and c == 1 and fill[0] > 127):
        array = 255 - array
    return np.ascontiguousarray(array)


def _run_predict(args):
    import numpy as np

    from . import io
    from .train import predict

    _set_threads(args.threads)
    model = io.load(args.model)
    meta = model.metadata
    missing = [k for k in ("input_shape", "mean", "std") if k not in meta]
    if missing:
        raise CommandError(f"{args.model}: the model's metadata lacks {missing}; save it with "
                           f"fastcnn.io.save(model, path, metadata={{'input_shape': [C, H, W], "
                           f"'mean': [...], 'std': [...], 'classes': [...]}})")
    batch = np.stack([load_image(p, meta["input_shape"], args.invert) for p in args.images])
    probs = predict(model, batch)
    classes = meta.get("classes") or [str(i) for i in range(probs.shape[1])]
    k = max(1, min(args.top_k, probs.shape[1]))
    width = max(len(str(c)) for c in classes)
    for path, p in zip(args.images, probs):
        print(path)
        for rank, i in enumerate(np.argsort(-p, kind="stable")[:k], 1):
            print(f"  {rank}. {classes[i]:<{width}}  {100 * p[i]:6.2f}%")
    return 0


# ---------------------------------------------------------------- info

def environment():
    """What this installation of fastcnn runs on, as a dict: the versions, the
    CPU kernels' settings, and whether (and if not, why not) the GPU is used."""
    import fastcnn
    import fastcnn.cuda
    from .bench import cpu_info

    info = {"fastcnn": fastcnn.__version__, "location": str(Path(fastcnn.__file__).parent),
            **cpu_info()}
    cuda = fastcnn.cuda._cuda()
    info["cuda_module"] = cuda is not None
    if cuda is None:
        info["gpu_unavailable"] = (f"fastcnn._cuda was not built ({fastcnn.cuda._import_error}); "
                                   "reinstall where nvcc is found (FASTCNN_CUDA=ON)")
    count = fastcnn.cuda.device_count()
    info["gpus"] = [fastcnn.cuda.device_name(i) for i in range(count)]
    if not count:
        info.setdefault("gpu_unavailable", "no CUDA device or driver found")
    try:
        import cupy
        info["cupy"] = cupy.__version__
    except Exception as exc:  # noqa: BLE001 - ImportError, or CuPy failing to load its CUDA
        info["cupy"] = None
        info.setdefault("gpu_unavailable", f"CuPy is not usable ({type(exc).__name__}: {exc}); "
                                           "pip install 'fastcnn[cuda]'")
    info["gpu"] = "gpu_unavailable" not in info
    if cuda is not None:
        info["gpu_gemm"] = cuda.gemm_kernel()
    info["allow_tf32"] = fastcnn.cuda.get_allow_tf32()
    return info


def _add_info_arguments(parser):
    parser.add_argument("--json", action="store_true", help="print the facts as one JSON object")


def _run_info(args):
    info = environment()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"fastcnn {info['fastcnn']} ({info['location']})")
    print(f"python {info['python']}, numpy {info['numpy']}, CuPy {info['cupy'] or 'not usable'}")
    print(f"CPU: {info['cpu']}, {info['threads']} threads, GEMM kernel {info['gemm_kernel']}, "
          f"Winograd {'on' if info['conv_winograd'] else 'off'}")
    print(f"CUDA module: {'built' if info['cuda_module'] else 'not built'}")
    for i, name in enumerate(info["gpus"]):
        print(f"GPU {i}: {name}")
    if info["gpu"]:
        print(f"GPU: used for CuPy arrays ({info['gpu_gemm']}, TF32 "
              f"{'on' if info['allow_tf32'] else 'off'})")
    else:
        print(f"GPU: not used: {info['gpu_unavailable']}")
    return 0


# ---------------------------------------------------------------- entry point

register("demo", "train the reference CNN (with batch norm) on Fashion-MNIST and report "
                 "test accuracy; saves model, curves and history in --out",
         _add_demo_arguments, _run_demo)
register("train", "train a preset architecture on an MNIST-format data set",
         _add_train_arguments, _run_train)
register("predict", "classify PNG/JPEG images with a saved model", _add_predict_arguments,
         _run_predict)
register("info", "what fastcnn runs on: versions, CPU kernels, and whether the GPU is used "
                 "(and if not, why not)", _add_info_arguments, _run_info)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fastcnn", description="fastcnn: a lightweight CNN library with hand-written "
                                    "C++ kernels behind a NumPy API.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS.values():
        command.add_arguments(sub.add_parser(command.name, help=command.help,
                                             description=command.help))
    return parser


def main(argv=None):
    """Run ``fastcnn`` with ``argv`` (default: sys.argv[1:]); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # The benchmark parses its own options (the GPU one has others).
        from . import bench

        return bench.main(argv[1:])
    args = build_parser().parse_args(argv)
    from .data import DataNotFoundError
    from .io import ModelFileError

    try:
        return COMMANDS[args.command].run(args)
    except (CommandError, DataNotFoundError, ModelFileError, FileNotFoundError) as exc:
        print(f"fastcnn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastcnn {args.command}: interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------- explain (fastcnn.viz)

def _explain_demo(model, test_set, out):
    """The demo's last step: the attribution report for a few test images."""
    from .viz.report import demo_report

    print(f"explained a few test images: {demo_report(model, test_set, out)}")


def _add_explain_arguments(parser):
    from .viz.report import add_cli_arguments

    add_cli_arguments(parser)


def _run_explain(args):
    from .viz.report import run_cli

    return run_cli(args)


register("explain", "show which pixels a saved model's prediction depends on: occlusion, "
                    "saliency, guided backprop, Grad-CAM; writes PNGs and an HTML report",
         _add_explain_arguments, _run_explain)


# ---------------------------------------------------------------- bench (fastcnn.bench)

def _add_bench_arguments(parser):
    parser.add_argument("options", nargs=argparse.REMAINDER,
                        help="see 'fastcnn bench --help' (sections gemm ops net, --device, "
                             "--quick, --threads, --json)")


def _run_bench(args):
    from . import bench

    return bench.main(args.options)


register("bench", "time fastcnn beside NumPy and PyTorch (GEMM, every op, the reference "
                  "networks); --device cuda for the GPU", _add_bench_arguments, _run_bench)


if __name__ == "__main__":
    sys.exit(main())
