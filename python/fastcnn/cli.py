"""The ``fastcnn`` command line: ``fastcnn demo | train | predict | explain | channels |
maximize | tcav | bench | info``.

Each subcommand is a :class:`Command` in ``COMMANDS`` (name, help, a function
adding its arguments to an argparse parser, and a function running it with
the parsed arguments and returning the exit status); ``register`` adds one.
Heavy imports happen inside the run functions so ``fastcnn --help`` is quick.
"""

import argparse
import importlib
import json
import math
import os
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
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted demo from OUT/checkpoint.npz")


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


def layer_arg(text):
    """A --layer value as the viz functions take it: an index when it is an integer
    (negative counts from the end), else a name; None stays None."""
    return int(text) if text and text.lstrip("-").isdigit() else text


def _set_threads(threads):
    if threads is not None:
        import fastcnn

        try:
            fastcnn.set_num_threads(threads)
        except ValueError as exc:
            raise CommandError(f"--threads: {exc}") from None


def _check_gpu():
    import fastcnn.cuda

    if not fastcnn.cuda.is_available():
        raise CommandError(f"--device cuda: no usable GPU ({fastcnn.cuda.unavailable_reason()})")


def _move_to_device(model, device):
    """Put ``model`` on --device; returns where it trains, in words."""
    import fastcnn
    import fastcnn.cuda

    if device == "cpu":
        return f"{fastcnn.get_num_threads()} CPU threads"
    _check_gpu()
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
    if args.limit is not None:
        train, test = train[:args.limit], test[:args.limit]
    return train, test


def _check_training_arguments(args, recipe):
    """Every option's range, before any data is read or model built."""
    def need(ok, what):
        if not ok:
            raise CommandError(what)

    finite = math.isfinite
    need(args.epochs >= 1 and args.batch_size >= 1, "--epochs and --batch-size must be >= 1")
    need(args.limit is None or args.limit >= 1, f"--limit must be >= 1, got {args.limit}")
    need(finite(recipe["lr"]) and recipe["lr"] >= 0,
         f"--lr must be a finite number >= 0, got {recipe['lr']}")
    need(finite(recipe["momentum"]) and recipe["momentum"] >= 0,
         f"--momentum must be >= 0, got {recipe['momentum']}")
    need(finite(recipe["weight_decay"]) and recipe["weight_decay"] >= 0,
         f"--weight-decay must be >= 0, got {recipe['weight_decay']}")
    need(finite(recipe["warmup_epochs"]) and recipe["warmup_epochs"] >= 0,
         f"--warmup-epochs must be >= 0, got {recipe['warmup_epochs']}")
    need(recipe["shift"] >= 0, f"--shift must be >= 0, got {recipe['shift']}")
    need(0 <= args.seed < 2**63, f"--seed must be in [0, 2**63), got {args.seed}")
    patience = recipe.get("patience")
    for name, value in (("--batch-size", args.batch_size), ("--limit", args.limit),
                        ("--val-size", recipe["val_size"]), ("--patience", patience)):
        need(value is None or value < 2**63, f"{name} must fit in 64 bits, got {value}")
    need(recipe["val_size"] >= 0, f"--val-size must be >= 0, got {recipe['val_size']}")
    need(patience is None or patience >= 1, f"--patience must be >= 1, got {patience}")
    need(patience is None or recipe["val_size"] > 0,
         "--patience stops on the validation accuracy: give --val-size > 0")
    need(not args.cuda_graph or args.device == "cuda", "--cuda-graph needs --device cuda")
    if args.device == "cuda":
        _check_gpu()


def _check_resume(path, recipe, demo):
    """--resume continues the run the checkpoint was made by: the same recipe (the
    seed decides the validation split, the options the schedule). --epochs may
    grow; the schedule then follows the new length. Returns the checkpoint's
    model metadata, for _check_resume_data once the data is loaded."""
    from . import io

    if not path.is_file():
        raise CommandError(f"--resume: no checkpoint at {path}")
    metadata = io.load_checkpoint(path)[0].metadata or {}
    saved = metadata.get("recipe")
    if saved is None:
        return metadata
    changed = [k for k in sorted(set(saved) | set(recipe))
               if k != "epochs" and saved.get(k) != recipe.get(k)]
    named = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} (now {recipe.get(k)})"
                      for k in changed)
    if demo and any(k not in DEMO_OPTIONS for k in changed):
        raise CommandError(f"--resume: {path} was not made by `fastcnn demo` ({named}); "
                           f"resume it with `fastcnn train --resume` and that run's options, "
                           f"or give the demo another --out")
    if changed:
        raise CommandError(f"--resume: {path} was made with other options: {named}; "
                           f"resume with the run's own options")
    if saved.get("epochs") != recipe["epochs"]:
        print(f"note: resuming a {saved.get('epochs')}-epoch run for {recipe['epochs']} epochs: "
              f"the schedule follows the new length")
    return metadata


#: what the checkpoint's metadata says about the data it was trained on
_DATA_KEYS = ("dataset", "train_images", "input_shape", "classes", "mean", "std")


def _check_resume_data(path, saved, metadata):
    """--resume on other data (another --data folder, --classes or --limit) is refused:
    the checkpoint's record of its training data must match the data loaded now."""
    changed = [f"{k} {saved[k]!r:.60} (now {metadata[k]!r:.60})" for k in _DATA_KEYS
               if k in saved and k in metadata and saved[k] != metadata[k]]
    if changed:
        raise CommandError(f"--resume: {path} was trained on other data: {', '.join(changed)}; "
                           f"resume with the run's own --data and --classes")


def _train_and_report(args, recipe, demo):
    """The body of ``demo`` and ``train``: load, build, fit, evaluate, save, plot."""
    import fastcnn

    from . import data, io, models, optim
    from .train import Trainer, evaluate, plot_history

    began = time.perf_counter()
    _set_threads(args.threads)
    recipe = {**recipe, "limit": args.limit}
    _check_training_arguments(args, recipe)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out}: exists and is not a folder")
    for parent in out.parents:   # a file on the way there fails after the training
        if parent.exists() and not parent.is_dir():
            raise CommandError(f"--out {out}: {parent} is a file, not a folder")
    resume = bool(getattr(args, "resume", False))
    checkpoint = out / "checkpoint.npz"
    saved = _check_resume(checkpoint, recipe, demo) if resume else None
    train_set, test_set = _load_data(args, demo)
    print(f"data: {train_set!r}, {test_set!r}")
    val_size = recipe["val_size"]
    if demo:  # at most the full demo's share, 5000 of 60000 (--limit, a smaller --data set)
        val_size = min(val_size, len(train_set) // 12)
    val_set = None
    if val_size:
        if 2 * val_size >= len(train_set):
            raise CommandError(f"--val-size {val_size} would leave {len(train_set) - val_size} "
                               f"of {len(train_set)} images to train on; hold out less than "
                               f"half")
        train_set, val_set = train_set.split(val_size, seed=args.seed)
    c, h, w = train_set.image_shape
    if h != w:
        raise CommandError(f"the presets need square images, got {h}x{w}")
    if recipe["shift"] >= h:
        raise CommandError(f"--shift {recipe['shift']} would move {h}x{w} images out of the "
                           f"picture; give less than {h}")
    if test_set.image_shape != train_set.image_shape:
        raise CommandError(f"the test images are {'x'.join(map(str, test_set.image_shape))} but "
                           f"the training images {'x'.join(map(str, train_set.image_shape))}")
    model = models.build(recipe["arch"], num_classes=train_set.num_classes, in_channels=c,
                         input_size=h, seed=args.seed)
    model.metadata = {"input_shape": [c, h, w], "classes": list(train_set.classes),
                      "mean": list(train_set.mean), "std": list(train_set.std),
                      "dataset": train_set.name.replace(" train", ""), "arch": recipe["arch"],
                      "train_images": len(train_set), "recipe": recipe}
    if resume:
        _check_resume_data(checkpoint, saved, model.metadata)
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
    patience = recipe.get("patience")
    trainer = Trainer(out_dir=out, progress=not args.no_progress,
                      early_stopping=patience if val_set is not None else None,
                      restore_best=bool(patience and val_set is not None),
                      cuda_graph=args.cuda_graph)
    history = trainer.fit(model, loader, val_set, epochs=args.epochs, optimizer=optimizer,
                          scheduler=scheduler, resume=resume)
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


#: the recipe entries `fastcnn demo` has options for (the rest are DEMO_RECIPE's)
DEMO_OPTIONS = ("epochs", "batch_size", "seed", "limit")


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
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="run the model on the CPU or the GPU (default: %(default)s)")


def load_image(path, input_shape, invert="auto"):
    """A picture as a uint8 (C, H, W) array for a model with ``input_shape``: converted
    to grey or RGB, padded to a square with its border colour, resized, and for
    one-channel models inverted when its background is light (``invert='auto'``)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    c, h, w = input_shape
    try:
        with Image.open(path) as img:
            img = _as_8bit(img, c)
    except Image.DecompressionBombError as exc:
        raise CommandError(f"{path}: too large to read safely ({exc})") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
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


#: the bit depths a deep grey picture's levels are read in: a 12-bit scan stored in
#: 16 bits (levels 0..4095) is scaled by 4095, not 65535 (which would make it black)
_DEPTHS = (8, 10, 12, 14, 16, 24, 32)


def _grey_to_8bit(values, floating):
    """Deep grey levels (16/32-bit integers or floats) as uint8: floats in [0, 1] by 255;
    non-negative integer levels by the smallest of _DEPTHS that holds the brightest;
    anything else (negative or fractional levels past 1) stretched from its lowest
    to its highest value. The files do not say how many bits their levels use, so the
    depth is read off the brightest level: a picture far darker than its format's
    range (a 16-bit scan whose brightest level is 1000) comes out brighter, and one
    level more can move it a depth (1023 is 10-bit, 1024 12-bit)."""
    import numpy as np

    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if floating and lo >= 0 and hi <= 1:
        scaled = values * 255
    elif lo >= 0 and (not floating or np.array_equal(values, np.rint(values))):
        depth = next((d for d in _DEPTHS if hi < 2 ** d), _DEPTHS[-1])
        scaled = values * (255 / (2 ** depth - 1))
    else:
        scaled = (values - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _as_8bit(img, channels):
    """A picture as 8-bit grey ('L') or 'RGB': turned upright by its EXIF orientation,
    transparent parts laid on white (paper), 16- and 32-bit grey scaled to 8 bits
    (_grey_to_8bit) rather than clipped."""
    import numpy as np
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = Image.fromarray(_grey_to_8bit(np.asarray(img), img.mode == "F"))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(paper, rgba)
    return img.convert("L" if channels == 1 else "RGB")


def _run_predict(args):
    import numpy as np

    from .train import predict
    from .viz._common import to_host

    _set_threads(args.threads)
    if args.top_k < 1:
        raise CommandError(f"--top-k must be >= 1, got {args.top_k}")
    model = load_cli_model(args)
    meta = model.metadata
    missing = [k for k in ("input_shape", "mean", "std") if k not in meta]
    if missing:
        raise CommandError(f"{args.model}: the model's metadata lacks {missing}; save it with "
                           f"fastcnn.io.save(model, path, metadata={{'input_shape': [C, H, W], "
                           f"'mean': [...], 'std': [...], 'classes': [...]}})")
    batch = np.stack([load_image(p, meta["input_shape"], args.invert) for p in args.images])
    probs = to_host(predict(model, batch))
    broken = [p for p, row in zip(args.images, probs) if not np.isfinite(row).all()]
    if broken:
        weights = all(np.isfinite(to_host(v)).all() for v in model.state_dict().values())
        raise CommandError(f"{args.model}: the model's outputs for {', '.join(broken)} are not "
                           f"finite numbers" + ("" if weights else "; its weights hold NaN or "
                                                "inf (did the training diverge?)"))
    named = list(meta.get("classes") or [])
    classes = [str(named[i]) if i < len(named) else str(i) for i in range(probs.shape[1])]
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
    if not fastcnn.cuda.is_available():
        info.setdefault("gpu_unavailable", fastcnn.cuda.unavailable_reason())
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

        name, run = "bench", lambda: bench.main(argv[1:])
    else:
        args = build_parser().parse_args(argv)
        name, run = args.command, lambda: COMMANDS[args.command].run(args)
    try:
        return run()
    except KeyboardInterrupt:
        print(f"fastcnn {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of stdout went away (fastcnn ... | head): stop quietly, as other
        # command-line tools do, and keep Python's exit-time flush from failing too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (CommandError, OSError, ValueError, TypeError, FloatingPointError) as exc:
        # What fastcnn (or the system) says about a bad argument, input file or
        # output path; FASTCNN_TRACEBACK=1 shows where it came from.
        if os.environ.get("FASTCNN_TRACEBACK"):
            raise
        print(f"fastcnn {name}: error: {exc}", file=sys.stderr)
        return 2


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


def add_image_options(parser, data_help, pictures=True):
    """--data (the IDX folder for test: images), --invert (for commands reading
    pictures), --threads and --device."""
    parser.add_argument("--data", metavar="DIR", help=data_help)
    if pictures:
        parser.add_argument("--invert", choices=["auto", "yes", "no"], default="auto",
                            help="invert grey levels of PNG/JPEG pictures, as for predict "
                                 "(default: %(default)s)")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="run the model on the CPU or the GPU (default: %(default)s)")


def load_cli_model(args):
    """The saved model ``args.model``, on ``args.device``."""
    from . import io

    model = io.load(args.model)
    _move_to_device(model, args.device)
    return model


def _add_channel_options(parser, top, top_help, out):
    """--layer, --method, --top, --steps and --out, as the channel commands take them."""
    from .viz.channels import CHANNEL_METHODS

    parser.add_argument("--layer", help="a layer name or index (default: the last conv "
                                        "block's output)")
    parser.add_argument("--method", choices=list(CHANNEL_METHODS), default="ablation",
                        help="how a channel is scored: " + "; ".join(
                            f"{k}: {v}" for k, v in CHANNEL_METHODS.items())
                        + " (default: %(default)s)")
    parser.add_argument("--top", type=int, default=top, help=f"{top_help} (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=50, metavar="N",
                        help="conductance's steps along the path (default: %(default)s)")
    parser.add_argument("--out", default=out,
                        help="the picture to write: .png (default: %(default)s), .pdf or .svg")


def _add_channels_arguments(parser):
    parser.add_argument("model", help="a model file saved by fastcnn (e.g. fastcnn-demo/model.npz)")
    parser.add_argument("image", metavar="IMAGE",
                        help="a PNG/JPEG file, or test:INDEX for image INDEX of the test set")
    parser.add_argument("--target", metavar="C",
                        help="the class, an index or a name (default: the predicted class)")
    _add_channel_options(parser, 8, "channels to list and draw", "channels.png")
    add_image_options(parser, "folder with the MNIST-format IDX set for test:INDEX")


def _run_channels(args):
    import numpy as np

    from . import viz
    from .viz._common import default_cam_layer, layer_name, to_host
    from .viz.report import _resolve_class, load_cli_images

    if args.top < 1 or args.steps < 1:
        raise CommandError(f"--top and --steps must be >= 1, got {args.top} and {args.steps}")
    _set_threads(args.threads)
    out = _picture_path(args.out)
    model = load_cli_model(args)
    _, x, _, names, meta = load_cli_images(args, model, [args.image])
    classes = meta.get("classes")
    layer = layer_arg(args.layer)
    try:
        logits = to_host(viz.feature_maps(model, x, layer=-1))[0]
        target = _resolve_class(args.target, classes, len(logits))
        target = int(logits.argmax()) if target is None else target
        name = default_cam_layer(model, "channels") if layer is None else \
            layer_name(model, layer, "channels")
        scores = to_host(viz.channel_importance(model, x[0], name, target, method=args.method,
                                                n_steps=args.steps))
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    label = classes[target] if classes and target < len(classes) else str(target)
    print(f"{names[0]}: class {label}; {len(scores)} channels of {name} by "
          f"{viz.CHANNEL_METHODS[args.method]}")
    total = float(np.abs(scores).sum()) or 1.0
    for rank, c in enumerate(np.argsort(-scores, kind="stable")[:args.top], 1):
        print(f"  {rank:2d}. channel {int(c):4d}  {float(scores[c]):+10.4g}  "
              f"({100 * abs(float(scores[c])) / total:4.1f}% of the total |score|)")
    viz.plot_channels(model, x[0], name, scores, top=args.top, method=args.method, path=out)
    print(f"wrote {out}")
    return 0


def _add_class_channels_arguments(parser):
    parser.add_argument("model", help="a model file saved by fastcnn (e.g. fastcnn-demo/model.npz)")
    parser.add_argument("--count", type=int, default=100, metavar="N",
                        help="test images per class, each scored for its true class "
                             "(default: %(default)s)")
    _add_channel_options(parser, 5, "channels to list per class", "class_channels.png")
    add_image_options(parser, "folder with the MNIST-format IDX set (default: Fashion-MNIST)",
                      pictures=False)


def _run_class_channels(args):
    """fastcnn class-channels: the classes x channels matrix over the test set."""
    import numpy as np

    from . import viz
    from .viz._common import default_cam_layer, layer_name
    from .viz.report import cli_test_set, standardised

    if args.top < 1 or args.steps < 1 or args.count < 1:
        raise CommandError(f"--top, --steps and --count must be >= 1, got {args.top}, "
                           f"{args.steps} and {args.count}")
    _set_threads(args.threads)
    out = _picture_path(args.out)
    model = load_cli_model(args)
    meta = dict(getattr(model, "metadata", None) or {})
    test_set = cli_test_set(args, meta)
    if list(test_set.image_shape) != list(meta["input_shape"]):
        raise CommandError(f"the test set's images are {list(test_set.image_shape)}, the "
                           f"model's input {list(meta['input_shape'])}")
    index = np.concatenate([np.flatnonzero(test_set.labels == k)[:args.count]
                            for k in range(test_set.num_classes)])
    x = standardised(model, test_set.images[index], meta["mean"], meta["std"])
    layer = layer_arg(args.layer)
    try:
        name = default_cam_layer(model, "class-channels") if layer is None else \
            layer_name(model, layer, "class-channels")
        means, counts = viz.class_channel_importance(
            model, x, test_set.labels[index].astype(np.int64), name, method=args.method,
            n_steps=args.steps)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    classes = list(meta["classes"])[:len(means)]
    classes += [str(k) for k in range(len(classes), len(means))]   # outputs without a name
    top = min(args.top, means.shape[1])
    print(f"{means.shape[1]} channels of {name}, each class's {args.method} scores averaged "
          f"over its test images ({viz.CHANNEL_METHODS[args.method]}); its top {top}:")
    width = max(len(str(c)) for c in classes) + 2
    for k, row in enumerate(means):
        if not counts[k]:
            continue
        print(f"  {str(classes[k]):<{width}}({counts[k]:4d})  " +
              "  ".join(f"{int(c)}:{row[c]:+.3g}" for c in np.argsort(-row, kind="stable")[:top]))
    viz.plot_class_channels(means, classes, layer=name, method=args.method, path=out)
    print(f"wrote {out}")
    return 0


register("channels", "rank a layer's channels by how much a saved model's prediction for "
                     "one image needs them (switched off, conductance, LRP); writes a picture "
                     "of the strongest channels' maps", _add_channels_arguments, _run_channels)
register("class-channels", "each class's mean channel scores over its test images: which "
                           "channels of a layer each class needs; writes the classes x "
                           "channels matrix", _add_class_channels_arguments, _run_class_channels)


def _add_maximize_arguments(parser):
    parser.add_argument("model", help="a model file saved by fastcnn (e.g. fastcnn-demo/model.npz)")
    parser.add_argument("--layer", help="a layer name or index (default: the output, whose "
                                        "units are the classes)")
    parser.add_argument("--channels", metavar="LIST",
                        help="units to show: 0,3,5 or 0-7 (default: every one)")
    parser.add_argument("--steps", type=int, default=200,
                        help="gradient-ascent steps (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=0.05,
                        help="Adam's step size on the pixels (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="start noise and shifts")
    parser.add_argument("--out", default="maximized.png",
                        help="the picture to write: .png (default: %(default)s), .pdf or .svg")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads")


#: The most units ``fastcnn maximize`` draws in one picture.
MAX_CHANNELS = 4096


def _channel_list(text):
    ranges = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        try:
            ranges.append((int(first), int(last or first)))
        except ValueError:
            raise CommandError(f"--channels {text!r}: expected indices and ranges like "
                               f"0,3,5-7") from None
        if ranges[-1][1] < ranges[-1][0]:
            raise CommandError(f"--channels {text!r}: the range {part.strip()} runs backwards")
    count = sum(last - first + 1 for first, last in ranges)
    if count > MAX_CHANNELS:
        raise CommandError(f"--channels {text!r}: {count} units, more than the "
                           f"{MAX_CHANNELS} one picture takes")
    return [c for first, last in ranges for c in range(first, last + 1)]


#: the picture formats an --out file may name (matplotlib writes each)
PICTURE_SUFFIXES = (".png", ".pdf", ".svg")


def _picture_path(text):
    """--out as the picture it names: '.png' added to a name without a suffix (as
    matplotlib does when it writes), other formats than PICTURE_SUFFIXES refused, a
    folder or an unwritable place refused before any work."""
    out = Path(text).expanduser()
    if out.is_dir() or not out.name or out.name in (".", ".."):
        raise CommandError(f"--out {text!r}: {'is a folder' if out.is_dir() else 'no file name'}"
                           f"; name the picture to write, e.g. --out "
                           f"{Path(text) / 'picture.png' if out.is_dir() else 'picture.png'}")
    if not out.suffix:
        out = out.with_name(out.name + ".png")
    if out.suffix.lower() not in PICTURE_SUFFIXES:
        raise CommandError(f"--out {text}: writes a picture: name it NAME.png "
                           f"(or .pdf, .svg)")
    folder = out.parent
    if out.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
        raise CommandError(f"--out {text}: cannot write {out} "
                           f"({'a folder' if out.is_dir() else f'no writable folder {folder}'})")
    return out


def _run_maximize(args):
    from . import io, viz

    if args.steps < 0:
        raise CommandError(f"--steps must be >= 0, got {args.steps}")
    _set_threads(args.threads)
    channels = None if args.channels is None else _channel_list(args.channels)
    out = _picture_path(args.out)
    model = io.load(args.model)
    layer = layer_arg(args.layer)
    try:
        result = viz.maximize_activation(model, layer, channels, steps=args.steps, lr=args.lr,
                                         seed=args.seed)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    classes = (model.metadata or {}).get("classes")
    names = ([classes[c] for c in result.channels]
             if classes and result.layer == model.names[-1] and
             max(result.channels) < len(classes) else None)
    viz.plot_maximized(result, names=names, path=out)
    print(f"{result.layer}: {len(result.channels)} units reach "
          f"{float(result.activation.min()):.3g} to {float(result.activation.max()):.3g} "
          f"(from {float(result.history[0].min()):.3g} to {float(result.history[0].max()):.3g})")
    print(f"wrote {out}")
    return 0


register("maximize", "synthesise the input each unit of a layer (or each class) responds to "
                     "most, by gradient ascent on the pixels; writes a PNG grid",
         _add_maximize_arguments, _run_maximize)


def _add_tcav_arguments(parser):
    parser.add_argument("model", help="a model file saved by fastcnn (e.g. fastcnn-demo/model.npz)")
    parser.add_argument("--concept", action="append", required=True, metavar="SET",
                        help="a concept's example images: test:CLASS (the test set's images "
                             "of a class, a name or an index) or a folder of PNG/JPEG "
                             "pictures; give several --concept to compare them")
    parser.add_argument("--target", metavar="C", required=True,
                        help="the class whose score is tested, an index or a name")
    parser.add_argument("--images", metavar="SET",
                        help="the inputs tested, as --concept (default: test:TARGET, the "
                             "test set's images of the target class)")
    parser.add_argument("--random", metavar="SET", default="test:random",
                        help="the pool of images without the concept, as --concept, or "
                             "test:random for random test images (default: %(default)s)")
    parser.add_argument("--layer", help="a layer name or index (default: the last conv "
                                        "block's output)")
    parser.add_argument("--count", type=int, default=100, metavar="N",
                        help="the most images taken from each set; the --random pool takes "
                             "twice as many, for the random controls (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=10, metavar="N",
                        help="CAVs against fresh random draws, and as many random controls "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the draws' seed (default: 0)")
    add_image_options(parser, "folder with the MNIST-format IDX set for test: sets")


def _image_set(spec, args, model, meta, count, test_set):
    """The images a --concept / --images / --random SET names, standardised for the
    model (at most ``count``; test:random draws ``count`` with --seed)."""
    import numpy as np

    from .viz.report import _resolve_class, standardised

    if spec.startswith("test:"):
        name = spec[5:]
        if name == "random":
            rng = np.random.default_rng(args.seed)
            index = np.sort(rng.choice(len(test_set), min(count, len(test_set)), replace=False))
        else:
            try:
                k = _resolve_class(name, test_set.classes, test_set.num_classes)
            except ValueError:
                raise CommandError(f"{spec}: {name!r} is not a class of the test set: an index "
                                   f"in [0, {test_set.num_classes}) or one of "
                                   f"{', '.join(test_set.classes)}") from None
            index = np.flatnonzero(test_set.labels == k)[:count]
        batch = test_set.images[index]
    else:
        folder = Path(spec)
        if not folder.is_dir():
            raise CommandError(f"{spec}: expected test:CLASS, test:random or a folder of "
                               f"PNG/JPEG pictures")
        files = sorted(p for p in folder.iterdir()
                       if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:count]
        if "input_shape" not in meta:
            raise CommandError(f"{args.model}: the model's metadata has no input_shape, so "
                               f"pictures cannot be fitted to it; use test: sets")
        batch = np.stack([load_image(p, meta["input_shape"], args.invert) for p in files]) \
            if files else np.zeros((0,) + tuple(meta["input_shape"]), np.uint8)
    if len(batch) == 0:
        raise CommandError(f"{spec}: no images")
    return standardised(model, batch, meta["mean"], meta["std"])


def _run_tcav(args):
    import numpy as np

    from . import viz
    from .viz._common import default_cam_layer, layer_name
    from .viz.report import _resolve_class, cli_test_set, standardised

    if args.count < 1 or args.runs < 1:
        raise CommandError(f"--count and --runs must be >= 1, got {args.count} and {args.runs}")
    if args.seed < 0:
        raise CommandError(f"--seed must be >= 0, got {args.seed}")
    _set_threads(args.threads)
    model = load_cli_model(args)
    meta = dict(getattr(model, "metadata", None) or {})
    specs = args.concept + [args.random] + ([args.images] if args.images else [])
    test_set = None
    if any(s.startswith("test:") for s in specs) or not args.images:
        test_set = cli_test_set(args, meta)
    missing = [k for k in ("mean", "std") if k not in meta]
    if missing:
        raise CommandError(f"{args.model}: the model's metadata lacks {missing} (the input "
                           f"standardisation)")
    if "input_shape" not in meta:
        raise CommandError(f"{args.model}: the model's metadata has no input_shape, so "
                           f"pictures cannot be fitted to it; use test: sets")
    classes = meta.get("classes")
    layer = layer_arg(args.layer)
    try:
        blank = standardised(model, np.zeros((1,) + tuple(meta["input_shape"]), np.uint8),
                             meta["mean"], meta["std"])
        num_classes = viz.feature_maps(model, blank, layer=-1).shape[-1]
        target = _resolve_class(args.target, classes, num_classes)
        name = default_cam_layer(model, "tcav") if layer is None else \
            layer_name(model, layer, "tcav")
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    label = classes[target] if classes and target < len(classes) else str(target)
    images = args.images or f"test:{target}"   # by index: the model's names may differ
    # every set read (and checked) before any work
    x = _image_set(images, args, model, meta, args.count, test_set)
    pool = _image_set(args.random, args, model, meta, 2 * args.count, test_set)
    concepts = [(spec, _image_set(spec, args, model, meta, args.count, test_set))
                for spec in args.concept]
    results = []
    for spec, concept in concepts:
        try:
            results.append(viz.tcav(model, x, name, concept, pool, target, runs=args.runs,
                                    seed=args.seed))
        except ValueError as exc:
            raise CommandError(f"{spec}: {exc}") from exc
    print(f"tcav: the {label} logit at {name}, for {len(x)} images ({images}); {args.runs} "
          f"CAV{'s' if args.runs > 1 else ''} per concept against draws from {len(pool)} "
          f"images ({args.random})")
    width = max(len("concept"), *map(len, args.concept)) + 2
    print(f"  {'concept':<{width}}{'score':>6} {'+- std':<10}{'magnitude':>10}{'accuracy':>10}"
          f"{'random':>8}{'p-value':>10}")
    for (spec, _), r in zip(concepts, results):
        spread = f"+-{r.scores.std():.2f}" if len(r.scores) > 1 else ""
        chance = f"{r.random_scores.mean():.2f}" if len(r.random_scores) else "-"
        p = "-" if np.isnan(r.p_value) else f"{r.p_value:.2g}"
        star = " *" if r.p_value < 0.05 else ""
        held = r.accuracies[np.isfinite(r.accuracies)]
        accuracy = f"{held.mean():.2f}" if len(held) else "-"
        print(f"  {spec:<{width}}{r.score:>6.2f} {spread:<10}{r.magnitude:>10.3g}"
              f"{accuracy:>10}{chance:>8}{p:>10}{star}")
    print("  score: the share of the images whose logit grows towards the concept (mean and "
          "std over the runs);\n  random: the same for random sets as concepts; * p < 0.05 "
          "(Welch's two-sided t-test: above or below chance)")
    if any(not len(r.random_scores) for r in results):
        print(f"  no random controls where the pool ({len(pool)} images) holds fewer than "
              f"twice the concept's images")
    return 0


register("tcav", "test how much a class's score rises towards a concept (example images) at "
                 "a layer: TCAV scores with random controls and a t-test",
         _add_tcav_arguments, _run_tcav)


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
    # As fastcnn.cli, not __main__: the commands raise fastcnn.cli.CommandError.
    from fastcnn.cli import main as _main

    sys.exit(_main())
