"""Training loop, evaluation and prediction.

>>> trainer = Trainer(out_dir="run")
>>> history = trainer.fit(model, train_loader, val_loader, epochs=10, optimizer=opt)
>>> result = trainer.evaluate(model, test_set)      # accuracy, per class, confusion
>>> probs = trainer.predict(model, images)           # (N, classes) probabilities

``fit`` shows a tqdm bar (loss, accuracy, images/s), validates after every
epoch, writes ``history.json`` and a checkpoint (model, optimizer, scheduler,
epoch, history) after every epoch into ``out_dir``, resumes from one, and stops
early when the monitored metric stops improving. Shuffling, augmentation and
dropout masks are functions of seeds and counters that the checkpoint holds,
so a resumed run continues exactly as an uninterrupted one.
"""

import importlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import functional as F
from ._backend import array_module, as_count
from .capture import device_hits
from . import io
from .data import DataLoader, Dataset
from .nn import CrossEntropyLoss, Module, Sequential
from .optim import Adam, ReduceLROnPlateau

__all__ = ["Trainer", "Evaluation", "evaluate", "predict", "plot_history"]

CHECKPOINT_NAME = "checkpoint.npz"
BEST_NAME = "best.npz"
HISTORY_NAME = "history.json"


def _to_device(a, device):
    if device == "cpu":
        return a
    return importlib.import_module("cupy").asarray(a)


def _to_host(a):
    return a.get() if type(a).__module__.startswith("cupy") else np.asarray(a)


def _as_loader(data, batch_size, shuffle=False, seed=0, op=None):
    """A DataLoader for ``data``. ``op``: evaluate, which needs every image (a loader
    that drops the last batch is refused), or predict, which needs them in order too
    (nor one that shuffles)."""
    if op is not None:
        if isinstance(data, DataLoader) and (data.drop_last or (op == "predict" and
                                                                data.shuffle)):
            what = ("drops the last batch, so some images would be left out" if data.drop_last
                    else "shuffles, so the rows would not follow the data set")
            raise ValueError(f"{op}: the DataLoader {what}; pass the Dataset itself (or a "
                             f"loader without drop_last" +
                             (" and shuffle)" if op == "predict" else ")"))
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, Dataset):
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, seed=seed)
    raise TypeError(f"expected a fastcnn.data Dataset or DataLoader, got {type(data).__name__}")


@dataclass
class Evaluation:
    """Loss, accuracy, per-class accuracy and confusion matrix (rows: true class,
    columns: predicted) of a model on a data set."""

    loss: float
    accuracy: float
    per_class_accuracy: np.ndarray
    confusion: np.ndarray
    classes: tuple = field(default_factory=tuple)

    def format(self):
        """A printable report: accuracy, per-class accuracy and the confusion matrix."""
        k = len(self.confusion)
        names = list(self.classes) if len(self.classes) == k else [str(i) for i in range(k)]
        width = max(5, max(len(str(int(self.confusion.max(initial=0)))), 4) + 1)
        label_w = max(len(n) for n in names)
        lines = [f"accuracy {100 * self.accuracy:.2f}%   loss {self.loss:.4f}", "",
                 "per-class accuracy:"]
        for name, acc in zip(names, self.per_class_accuracy):
            lines.append(f"  {name:<{label_w}}  {'n/a' if np.isnan(acc) else f'{100 * acc:6.2f}%'}")
        lines += ["", "confusion matrix (rows: true class, columns: predicted):",
                  " " * (label_w + 2) + "".join(f"{i:>{width}}" for i in range(k))]
        for i, (name, row) in enumerate(zip(names, self.confusion)):
            lines.append(f"{name:>{label_w}} {i}" + "".join(f"{int(v):>{width}}" for v in row))
        return "\n".join(lines)

    def to_dict(self):
        return {"loss": self.loss, "accuracy": self.accuracy,
                "per_class_accuracy": [None if np.isnan(a) else float(a)
                                       for a in self.per_class_accuracy],
                "confusion": self.confusion.tolist(), "classes": list(self.classes)}


def _infer(model, x):
    """model(x) for inference: a Sequential records nothing (and may fuse its
    layers, see Sequential.forward's record=False); other Modules run as is."""
    return model(x, record=False) if isinstance(model, Sequential) else model(x)


def evaluate(model, data, batch_size=500):
    """Evaluate ``model`` (in eval mode; its mode is restored) on a Dataset or DataLoader
    (not an empty one: its loss and accuracy would mean nothing)."""
    loader = _as_loader(data, as_count(batch_size, "evaluate: batch_size"), op="evaluate")
    if len(loader.dataset) == 0:
        raise ValueError(f"evaluate: {loader.dataset!r} has no images")
    was_training = model.training
    model.eval()
    device = model.device
    loss_sum, labels, preds = 0.0, [], []
    try:
        for x, y in loader:
            logits = _infer(model, _to_device(x, device))
            y_dev = _to_device(y, device)
            loss_sum += float(F.cross_entropy(logits, y_dev, reduction="sum"))
            preds.append(_to_host(logits.argmax(axis=1)))
            labels.append(y)
    finally:
        model.train(was_training)
    classes = loader.dataset.classes
    y = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    p = np.concatenate(preds) if preds else np.zeros(0, np.int64)
    k = max(len(classes), int(max(y.max(initial=-1), p.max(initial=-1))) + 1)
    confusion = np.bincount(y * k + p, minlength=k * k).reshape(k, k)
    totals = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(totals > 0, np.diag(confusion) / np.maximum(totals, 1), np.nan)
    n = max(len(y), 1)
    return Evaluation(loss_sum / n, float((y == p).sum()) / n, per_class, confusion,
                      tuple(classes))


def predict(model, data, batch_size=500, mean=None, std=None):
    """Class probabilities (N, classes) of ``model`` in eval mode.

    data: a Dataset or DataLoader; a float array (N, C, H, W), already
    standardised; or a uint8 array, standardised here with ``mean`` / ``std``
    (default: ``model.metadata``'s).
    """
    batch_size = as_count(batch_size, "predict: batch_size")
    was_training = model.training
    model.eval()
    device = model.device
    out = []
    try:
        if isinstance(data, (Dataset, DataLoader)):
            batches = (x for x, _ in _as_loader(data, batch_size, op="predict"))
        else:
            array = np.asarray(data) if not type(data).__module__.startswith("cupy") else data
            if array.ndim != 4:
                raise ValueError(f"predict: images must be a batch (N, C, H, W), got shape "
                                 f"{tuple(array.shape)}" + ("; one image (C, H, W) needs a "
                                                             "batch axis: x[None]"
                                                             if array.ndim == 3 else ""))
            if array.dtype == np.uint8:
                meta = getattr(model, "metadata", {}) or {}
                mean = meta.get("mean") if mean is None else mean
                std = meta.get("std") if std is None else std
                if mean is None or std is None:
                    raise ValueError("predict: uint8 images need mean and std (the model's "
                                     "metadata has none); pass them or standardised floats")
                array = F.normalize(array, mean, std, dim=-3)
            batches = (array[i:i + batch_size] for i in range(0, len(array), batch_size))
        for x in batches:
            out.append(F.softmax(_infer(model, _to_device(x, device)), dim=1))
        if not out:  # no images: (0, classes), the model run on an empty batch of their shape
            empty = np.zeros((0,) + _image_shape(data), np.float32)
            out.append(F.softmax(_infer(model, _to_device(empty, device)), dim=1))
    finally:
        model.train(was_training)
    xp = importlib.import_module("cupy") if device != "cpu" else np
    return xp.concatenate(out)


def _image_shape(data):
    """(C, H, W) of a Dataset's, a DataLoader's or an (N, C, H, W) array's images."""
    if isinstance(data, DataLoader):
        data = data.dataset
    return tuple(data.image_shape) if isinstance(data, Dataset) else tuple(data.shape[1:])


def plot_history(history, path, title=None):
    """Training curves (loss and accuracy, train and validation, per epoch) as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    epochs = [h["epoch"] for h in history]
    for ax, key, label in ((fig.add_subplot(1, 2, 1), "loss", "loss"),
                           (fig.add_subplot(1, 2, 2), "accuracy", "accuracy")):
        ax.plot(epochs, [h[key] for h in history], "o-", label="train")
        if any(f"val_{key}" in h for h in history):
            ax.plot(epochs, [h.get(f"val_{key}", math.nan) for h in history], "s-",
                    label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def _write_json(path, obj):
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


class Trainer:
    """Runs training with progress bars, validation, checkpoints and early stopping.

    loss_fn: default CrossEntropyLoss(). out_dir: where checkpoint.npz, best.npz
    and history.json go (None: nothing written). early_stopping: patience in
    epochs (None: never stop early), on ``monitor`` ('val_accuracy', 'val_loss',
    'accuracy' or 'loss'; 'val_*' needs validation data); restore_best: load the
    best epoch's weights at the end. progress: show the tqdm bar. log: a
    function for one-line epoch summaries (None: silent). cuda_graph: for a
    model on the GPU, run the training steps of full batches as a replayed
    CUDA graph (fastcnn.cuda.CapturedStep: the same results, without the
    per-kernel launch cost); a last, smaller batch runs eagerly.
    """

    MONITORS = ("val_accuracy", "val_loss", "accuracy", "loss")

    def __init__(self, loss_fn=None, out_dir=None, early_stopping=None, monitor="val_accuracy",
                 min_delta=0.0, restore_best=False, progress=True, log=print, cuda_graph=False):
        if monitor not in self.MONITORS:
            raise ValueError(f"Trainer: monitor must be one of {self.MONITORS}, got {monitor!r}")
        if early_stopping is not None:  # a patience in epochs
            early_stopping = as_count(early_stopping, "Trainer: early_stopping")
        self.loss_fn = loss_fn if loss_fn is not None else CrossEntropyLoss()
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.early_stopping = early_stopping
        self.monitor = monitor
        self.min_delta = float(min_delta)
        if not (math.isfinite(self.min_delta) and self.min_delta >= 0):
            raise ValueError(f"Trainer: min_delta must be a finite number >= 0, got {min_delta}")
        self.restore_best = restore_best
        self.progress = progress
        self.log = log or (lambda *_: None)
        self.cuda_graph = bool(cuda_graph)
        self.history = []

    evaluate = staticmethod(evaluate)
    predict = staticmethod(predict)

    def _improved(self, value, best):
        if best is None:
            return True
        if "loss" in self.monitor:
            return value < best - self.min_delta
        return value > best + self.min_delta

    def fit(self, model, train, val=None, epochs=10, optimizer=None, scheduler=None,
            resume=None, batch_size=128, seed=0):
        """Train ``model`` for ``epochs`` epochs (counted from 0, also when resuming).

        train / val: DataLoaders, or Datasets (batched with ``batch_size``; train
        shuffled with ``seed``). optimizer: default Adam(lr=1e-3). scheduler: an
        ``fastcnn.optim`` schedule, stepped per epoch or, if its ``interval`` is
        'step', per batch; a ReduceLROnPlateau is stepped per epoch with the
        validation loss (it needs ``val``). resume: a checkpoint path, or True for
        ``out_dir/checkpoint.npz``. The training data's input shape, class names
        and mean / std go into ``model.metadata`` (saved with the model). Returns
        the history: one dict per epoch.
        """
        epochs = as_count(epochs, "fit: epochs")
        train = _as_loader(train, batch_size, shuffle=True, seed=seed)
        val = None if val is None else _as_loader(val, 500)
        if len(train) == 0:
            raise ValueError(f"fit: the training data ({train.dataset!r}) gives no batches")
        if val is not None and len(val.dataset) == 0:
            raise ValueError(f"fit: the validation data ({val.dataset!r}) has no images; "
                             f"pass val=None for none")
        if resume is True and self.out_dir is None:
            raise ValueError("fit: resume=True reads out_dir/checkpoint.npz; give the Trainer an "
                             "out_dir, or resume= a checkpoint path")
        _record_training_data(model, train)
        if self.monitor.startswith("val_") and val is None and (self.early_stopping or
                                                                 self.restore_best):
            raise ValueError(f"{'early stopping' if self.early_stopping else 'restore_best'} "
                             f"on {self.monitor!r} needs validation data")
        optimizer = optimizer if optimizer is not None else Adam(model.parameters(), lr=1e-3)
        per_step = scheduler is not None and getattr(scheduler, "interval", "epoch") == "step"
        on_plateau = isinstance(scheduler, ReduceLROnPlateau)
        if on_plateau and (per_step or val is None):
            raise ValueError("fit: a ReduceLROnPlateau scheduler is stepped once per epoch with "
                             "the validation loss: give it interval='epoch' and pass val data")
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        history, start, best, best_epoch, bad_epochs = [], 0, None, None, 0
        best_state = None
        if resume:
            path = self.out_dir / CHECKPOINT_NAME if resume is True else Path(resume)
            _, state = io.load_checkpoint(path, model, optimizer, scheduler)
            history = list(state["history"])
            start, best, best_epoch = int(state["epoch"]), state["best"], state["best_epoch"]
            bad_epochs = int(state["bad_epochs"])
            train.seed = int(state["loader_seed"])
            best_path = path.parent / BEST_NAME
            if self.restore_best and best_epoch is not None and best_path.is_file():
                best_state = io.load(best_path).state_dict()
            self.log(f"resumed from {path} after epoch {start}" + (
                f": nothing to train for epochs={epochs}" if start >= epochs else ""))
        device = model.device
        loss_fn = self.loss_fn
        if isinstance(loss_fn, Module) and any(b is not None for b in loss_fn.buffers()):
            loss_fn.to(device)  # a class-weighted loss's weights, beside the model's
        captured = None
        if self.cuda_graph and device != "cpu":
            from .capture import CapturedStep

            captured = CapturedStep(model, loss_fn, optimizer, fallback=True)
        for epoch in range(start, epochs):
            model.train()
            train.set_epoch(epoch)
            lr = optimizer.param_groups[0]["lr"]
            stats = _EpochStats(defer=device != "cpu")
            bar = _progress(train, f"epoch {epoch + 1}/{epochs}", not self.progress)
            began = time.perf_counter()
            for i, (x, y) in enumerate(bar):
                if captured is not None and len(y) == train.batch_size:
                    loss = captured(x, y)  # the host batch goes straight to the graph's buffers
                    logits, y, hits = captured.logits, captured.targets, captured.hits
                    if captured.disabled is not None:
                        self.log(f"cuda_graph: training eagerly ({captured.disabled})")
                        captured = None
                else:
                    y_host = y
                    x, y = _to_device(x, device), _to_device(y, device)
                    logits = model(x)
                    if device != "cpu" and isinstance(y_host, np.ndarray) and logits.ndim == 2:
                        # the labels are on the host: checked there, no wait for the GPU
                        with F._checked_targets(y_host, logits.shape[1],
                                               getattr(loss_fn, "ignore_index", -100)):
                            loss = loss_fn(logits, y)
                    else:
                        loss = loss_fn(logits, y)
                    optimizer.zero_grad()
                    model.backward(loss_fn.backward(), input_grad=False)
                    optimizer.step()
                    hits = device_hits(loss_fn)
                if per_step:
                    scheduler.step()
                stats.add(loss, logits, y, hits)
                if self.progress and (i % 10 == 0 or i == len(train) - 1):
                    seen, loss_sum, correct = stats.read()
                    rate = seen / max(time.perf_counter() - began, 1e-9)
                    bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}",
                                    img_s=f"{rate:.0f}", refresh=False)
            bar.close()
            seen, loss_sum, correct = stats.read()
            elapsed = time.perf_counter() - began
            if not math.isfinite(loss_sum):
                raise FloatingPointError(f"epoch {epoch + 1}: the training loss is {loss_sum}; "
                                         f"lower the learning rate")
            record = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1),
                      "accuracy": correct / max(seen, 1), "lr": lr, "time_s": elapsed,
                      "images_per_s": seen / max(elapsed, 1e-9)}
            if val is not None:
                result = evaluate(model, val)
                record["val_loss"], record["val_accuracy"] = result.loss, result.accuracy
            if on_plateau:
                scheduler.step(record["val_loss"])
            elif scheduler is not None and not per_step:
                scheduler.step()
            history.append(record)
            self.log(_epoch_line(record, epochs))
            if self.monitor in record and self._improved(record[self.monitor], best):
                best, best_epoch, bad_epochs = record[self.monitor], epoch + 1, 0
                if self.restore_best:
                    best_state = {k: _to_host(v).copy() for k, v in model.state_dict().items()}
                if self.out_dir is not None:
                    io.save(model, self.out_dir / BEST_NAME)
            else:
                bad_epochs += 1
            if self.out_dir is not None:
                io.save_checkpoint(self.out_dir / CHECKPOINT_NAME, model, optimizer, scheduler,
                                   {"epoch": epoch + 1, "history": history, "best": best,
                                    "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                                    "loader_seed": train.seed})
                _write_json(self.out_dir / HISTORY_NAME, history)
            if self.early_stopping is not None and bad_epochs >= self.early_stopping:
                self.log(f"early stopping: no improvement in {self.monitor} for {bad_epochs} "
                         f"epochs (best {best:.4f} at epoch {best_epoch})")
                break
        if self.restore_best and best_state is not None:
            model.load_state_dict(best_state)
            self.log(f"restored the weights of epoch {best_epoch} ({self.monitor} {best:.4f})")
        self.history = history
        return history


class _EpochStats:
    """An epoch's running loss and accuracy. With ``defer`` (training on the GPU)
    each step's results stay on the device until ``read()`` fetches the pending
    ones in one transfer, so that the host does not wait for the GPU after every
    step; otherwise they are read at once. The sums are the same either way: each
    step's float32 loss times its batch size, added in step order in double."""

    def __init__(self, defer=False):
        self.seen, self.loss_sum, self.correct = 0, 0.0, 0
        self._defer = defer
        self._pending = []  # (loss, hits, batch size) not read yet

    def add(self, loss, logits, y, hits=None):
        """hits: the rows predicted right, if the loss counted them (the GPU's
        cross-entropy does, in its own kernel); else counted here."""
        if hits is None:
            hits = (logits.argmax(axis=1) == y).sum()
        if self._defer:
            self._pending.append((loss, hits, len(y)))
        else:
            self._count(float(loss), int(hits), len(y))

    def _count(self, loss, hits, n):
        self.seen += n
        self.correct += hits
        self.loss_sum += loss * n

    def read(self):
        """(images seen, sum of loss x batch size, correct predictions) so far."""
        if self._pending:
            xp = array_module(self._pending[0][0])
            losses = _to_host(xp.stack([xp.asarray(p[0], dtype=np.float32).reshape(())
                                        for p in self._pending]))
            hits = _to_host(xp.stack([xp.asarray(p[1]).reshape(()) for p in self._pending]))
            for loss, h, (_, _, n) in zip(losses.tolist(), hits.tolist(), self._pending):
                self._count(loss, int(h), n)
            self._pending = []
        return self.seen, self.loss_sum, self.correct


def _record_training_data(model, loader):
    """Note in ``model.metadata`` what the model learns from (saved with it by fastcnn.io,
    read by ``predict`` and ``fastcnn predict``): input shape, class names, mean / std."""
    metadata = getattr(model, "metadata", None)
    if metadata is None:
        model.metadata = metadata = {}
    dataset = loader.dataset
    metadata.update(input_shape=list(dataset.image_shape), classes=list(dataset.classes),
                    mean=list(loader.mean), std=list(loader.std))
    metadata.setdefault("dataset", dataset.name)


def _progress(loader, desc, disable):
    from tqdm import tqdm

    return tqdm(loader, total=len(loader), desc=desc, unit="batch", disable=disable,
                dynamic_ncols=True, mininterval=0.5, file=sys.stderr, leave=False)


def _epoch_line(record, epochs):
    text = (f"epoch {record['epoch']}/{epochs}: loss {record['loss']:.4f} "
            f"acc {100 * record['accuracy']:.2f}%")
    if "val_loss" in record:
        text += f" | val loss {record['val_loss']:.4f} acc {100 * record['val_accuracy']:.2f}%"
    return text + f" | {record['time_s']:.1f} s, {record['images_per_s']:.0f} img/s"
