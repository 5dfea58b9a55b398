"""Save and load models and training checkpoints: one ``.npz`` file, no pickle.

A file holds named arrays (weights, batch-norm statistics, optimizer state)
and one ``__header__`` entry, a UTF-8 JSON document with the file format, the
model's architecture (layer types and constructor arguments, enough to rebuild
it), its metadata (class names, input shape, normalisation) and any
non-array state. Reading uses ``allow_pickle=False``; writing goes to a
temporary file in the same folder that replaces the target only once complete.
"""

import json
import math
import os
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .nn.module import Module, from_spec

__all__ = ["ModelFileError", "save", "load", "save_checkpoint", "load_checkpoint",
           "check_metadata", "metadata_problems"]

#: the most values one input image may hold (``metadata['input_shape']``): past it a
#: model file is refused rather than have ``predict`` allocate (or hang on) it
MAX_INPUT_VALUES = 1 << 28
FORMAT_VERSION = 1
MODEL_FORMAT = "fastcnn-model"
CHECKPOINT_FORMAT = "fastcnn-checkpoint"
_HEADER = "__header__"


class ModelFileError(ValueError):
    """A model or checkpoint file that is truncated, corrupt or does not match."""


def _to_host(a):
    return a.get() if hasattr(a, "get") and type(a).__module__.startswith("cupy") else np.asarray(a)


def _pack(tree, prefix, arrays):
    """JSON-able copy of ``tree`` with every array moved into ``arrays`` and replaced by
    ``{"__array__": key}``."""
    if isinstance(tree, dict):
        return {str(k): _pack(v, f"{prefix}/{k}", arrays) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_pack(v, f"{prefix}/{i}", arrays) for i, v in enumerate(tree)]
    if isinstance(tree, np.generic):
        return tree.item()
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        arrays[prefix] = _to_host(tree)
        return {"__array__": prefix}
    return tree


def _unpack(tree, arrays, path):
    if isinstance(tree, dict):
        if set(tree) == {"__array__"}:
            key = tree["__array__"]
            if key not in arrays:
                raise ModelFileError(f"{path}: the header refers to array {key!r}, "
                                     f"which the file does not hold")
            return arrays[key]
        return {k: _unpack(v, arrays, path) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_unpack(v, arrays, path) for v in tree]
    return tree


def _write(path, header, arrays):
    """Write ``arrays`` + the JSON ``header`` to ``path`` atomically."""
    path = Path(path)
    payload = dict(arrays)
    payload[_HEADER] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would make models private
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _read(path, expected_formats):
    """(header, arrays) of a fastcnn file; any damage raises ModelFileError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        raise ModelFileError(f"{path}: a single .npy array, not a fastcnn .npz file")
    if magic[:4] != b"PK\x03\x04":
        raise ModelFileError(f"{path}: not a fastcnn model file (no .npz/zip signature; "
                             f"{'empty' if not magic else 'corrupt or another format'})")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError) as exc:
        raise ModelFileError(f"{path}: cannot read the file, it is truncated or corrupt "
                             f"({type(exc).__name__}: {exc})") from exc
    if _HEADER not in arrays:
        raise ModelFileError(f"{path}: an .npz file but not a fastcnn one (no {_HEADER} entry)")
    try:
        header = json.loads(arrays.pop(_HEADER).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: the header is corrupt ({exc})") from exc
    fmt = header.get("format") if isinstance(header, dict) else None
    if fmt not in expected_formats:
        raise ModelFileError(f"{path}: format {fmt!r}, expected {' or '.join(expected_formats)}")
    version = header.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ModelFileError(f"{path}: the header's version is {version!r}, not an int")
    if version > FORMAT_VERSION:
        raise ModelFileError(f"{path}: format version {header['version']} is newer than this "
                             f"fastcnn reads ({FORMAT_VERSION}); upgrade fastcnn")
    return header, arrays


def _plain(tree):
    """``tree`` with NumPy scalars and arrays as Python numbers and lists, tuples as
    lists: what JSON holds."""
    if isinstance(tree, dict):
        return {k: _plain(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_plain(v) for v in tree]
    if isinstance(tree, (np.generic, np.ndarray)):
        return tree.tolist()
    return tree


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _is_number(v):
    """A finite number that fits float32 (what the standardisation computes in)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v)) and abs(float(v)) <= _FLOAT32_MAX
    except OverflowError:   # an int past float's range
        return False


def metadata_problems(metadata):
    """{key: why it is unusable} for ``metadata``'s entries that fastcnn reads to run a
    model (input_shape, classes, mean, std); empty when they are fine. Every other
    entry is the user's own and may hold any JSON value."""
    problems = {}
    shape = metadata.get("input_shape")
    if shape is not None:
        if (not isinstance(shape, list) or len(shape) != 3
                or not all(_is_int(v) and v >= 1 for v in shape)):
            problems["input_shape"] = f"input_shape must be [C, H, W] of ints >= 1, got " \
                                      f"{shape!r:.80}"
        elif shape[0] * shape[1] * shape[2] > MAX_INPUT_VALUES:
            problems["input_shape"] = (f"input_shape {shape} holds "
                                       f"{shape[0] * shape[1] * shape[2]} values, more than "
                                       f"the {MAX_INPUT_VALUES} one image may")
    channels = None if "input_shape" in problems or shape is None else shape[0]
    classes = metadata.get("classes")
    if classes is not None and (not isinstance(classes, list) or not all(
            isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in classes)):
        problems["classes"] = f"classes must be a list of names (str or numbers), got " \
                              f"{classes!r:.80}"
    for key in ("mean", "std"):
        value = metadata.get(key)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if not values or not all(_is_number(v) for v in values):
            problems[key] = f"{key} must be a finite number or a list of them, got {value!r:.80}"
        elif key == "std" and not all(v > 0 for v in values):
            problems[key] = f"std must be > 0, got {value!r:.80}"
        elif channels is not None and len(values) not in (1, channels):
            problems[key] = (f"{key} has {len(values)} values for the {channels} channels of "
                             f"input_shape {shape}")
    return problems


def check_metadata(metadata):
    """Why ``metadata`` is unusable (:func:`metadata_problems`), in a line; None when it
    is fine."""
    problems = metadata_problems(metadata)
    return "; ".join(problems.values()) or None


def _model_record(model, metadata, arrays, prefix):
    if not isinstance(model, Module):
        raise TypeError(f"expected a fastcnn.nn Module, got {type(model).__name__}")
    if metadata is None:
        metadata = getattr(model, "metadata", None) or {}
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict (class names, input shape, ...), got "
                        f"{type(metadata).__name__}")
    metadata = _plain(metadata)
    try:
        metadata = json.loads(json.dumps(metadata))  # what load will read back
    except (TypeError, ValueError) as exc:
        raise TypeError(f"metadata must hold only JSON values (str, int, float, list, dict; "
                        f"NumPy scalars and arrays become numbers and lists): {exc}") from None
    problem = check_metadata(metadata)
    if problem:
        raise ValueError(f"metadata: {problem}")
    state = model.state_dict()
    for name, value in state.items():
        arrays[f"{prefix}/{name}"] = _to_host(value)
    return {"architecture": model.spec(), "metadata": metadata, "state": list(state)}


def _build_model(record, arrays, prefix, path):
    try:
        model = from_spec(record["architecture"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: cannot rebuild the architecture: {exc}") from exc
    names = record.get("state", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ModelFileError(f"{path}: the header's state list is corrupt ({names!r:.80})")
    missing = [n for n in names if f"{prefix}/{n}" not in arrays]
    if missing:
        raise ModelFileError(f"{path}: the file lacks arrays {missing}")
    try:
        model.load_state_dict({n: arrays[f"{prefix}/{n}"] for n in names})
    except (ValueError, TypeError) as exc:
        raise ModelFileError(f"{path}: the weights do not match the architecture: {exc}") from exc
    metadata = record.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ModelFileError(f"{path}: the header's metadata is not a dict ({metadata!r:.80})")
    for key, problem in metadata_problems(metadata).items():
        # the weights are fine: load them, without the entry (so that what needs it
        # says it is missing) rather than refuse the file
        warnings.warn(f"{path}: metadata entry {key!r} dropped, it is unusable: {problem}",
                      stacklevel=3)
        del metadata[key]
    model.metadata = metadata
    return model


def _spec_difference(saved, model):
    """The first place where two module specs differ, in a line."""
    layers = [s.get("args", {}).get("layers") for s in (saved, model)]
    if saved.get("type") == model.get("type") == "Sequential" and all(layers):
        for i, (a, b) in enumerate(zip(*layers)):
            if a != b:
                return f"layer {i} is {a} in the file, {b} in the model"
        return f"{len(layers[0])} layers in the file, {len(layers[1])} in the model"
    return f"{saved} in the file, {model} in the model"


def save(model, path, metadata=None):
    """Save ``model`` (architecture, weights, buffers, metadata) to one .npz file.

    metadata: a JSON-able dict (class names, input shape, mean/std ...); default
    ``model.metadata``. Returns the path.
    """
    arrays = {}
    header = {"format": MODEL_FORMAT, "version": FORMAT_VERSION,
              "model": _model_record(model, metadata, arrays, "model")}
    return _write(path, header, arrays)


def load(path, device="cpu"):
    """Rebuild the model saved at ``path`` (a model file or a checkpoint), on ``device``."""
    header, arrays = _read(path, (MODEL_FORMAT, CHECKPOINT_FORMAT))
    if not isinstance(header.get("model"), dict):
        raise ModelFileError(f"{path}: the header has no model record")
    model = _build_model(header["model"], arrays, "model", path)
    return model.to(device) if device != "cpu" else model


def save_checkpoint(path, model, optimizer=None, scheduler=None, state=None):
    """Save model, optimizer and scheduler state and ``state`` (a JSON-able dict whose
    leaves may be arrays) to one .npz file."""
    arrays = {}
    header = {"format": CHECKPOINT_FORMAT, "version": FORMAT_VERSION,
              "model": _model_record(model, None, arrays, "model"),
              "optimizer": None if optimizer is None else _pack(optimizer.state_dict(),
                                                                "optimizer", arrays),
              "scheduler": None if scheduler is None else _pack(scheduler.state_dict(),
                                                                "scheduler", arrays),
              "state": _pack(state or {}, "state", arrays)}
    return _write(path, header, arrays)


def load_checkpoint(path, model=None, optimizer=None, scheduler=None):
    """Read a checkpoint; restore it into ``model`` / ``optimizer`` / ``scheduler`` when
    given (the model's architecture must match). Returns ``(model, state)``, the model
    rebuilt from the file when none was given."""
    header, arrays = _read(path, (CHECKPOINT_FORMAT,))
    if not isinstance(header.get("model"), dict):
        raise ModelFileError(f"{path}: the header has no model record")
    saved = _build_model(header["model"], arrays, "model", path)
    if model is None:
        model = saved
    else:
        if model.spec() != saved.spec():
            raise ModelFileError(f"{path}: the checkpoint's architecture differs from the "
                                 f"model's: {_spec_difference(saved.spec(), model.spec())}")
        model.load_state_dict(saved.state_dict())
    for target, key in ((optimizer, "optimizer"), (scheduler, "scheduler")):
        if target is None:
            continue
        if header.get(key) is None:
            raise ModelFileError(f"{path}: the checkpoint holds no {key} state")
        try:
            target.load_state_dict(_unpack(header[key], arrays, path))
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelFileError(f"{path}: the {key} state does not match: {exc}") from exc
    return model, _unpack(header.get("state", {}), arrays, path)
