"""Image data sets in the MNIST (IDX) format, and a batching loader.

Fashion-MNIST (60,000 training and 10,000 test 28x28 grey images of clothes,
10 classes) is read from ``--data`` / ``$FASTCNN_DATA`` / Debian's
``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``). Any
MNIST-format set (MNIST, KMNIST, EMNIST) loads the same way from a folder
holding its four IDX files. Images stay uint8 until a batch is formed; the
loader turns each batch into standardised float32 with the core ``normalize``
kernel in one pass.
"""

import gzip
import math
import os
import re
import zlib
from pathlib import Path

import numpy as np

from . import functional as F
from ._backend import as_count, as_int

__all__ = ["FASHION_MNIST_CLASSES", "DEBIAN_FASHION_MNIST", "DataNotFoundError",
           "read_idx", "write_idx", "Dataset", "find_data_dir", "load_idx_dataset",
           "load_fashion_mnist", "Augment", "random_shift", "random_hflip", "DataLoader"]

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
#: mean and standard deviation of the Fashion-MNIST training pixels (0-1 scale)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

_IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_IDX_CODES = {dt.newbyteorder("=") if dt.itemsize > 1 else dt: code
              for code, dt in _IDX_TYPES.items()}


#: the most classes a data set gets numbered names for when none are given: a label
#: past it is far more likely a corrupt file than a real class (pass ``classes`` to
#: mean it)
MAX_DEFAULT_CLASSES = 10_000


class DataNotFoundError(FileNotFoundError):
    """No data set where one was looked for; the message says how to get one."""


# ---------------------------------------------------------------- IDX files

def _read_exactly(stream, buffer, path, what):
    if not getattr(buffer, "nbytes", len(buffer)):
        return  # an empty array (a set of zero images): nothing to read
    view = memoryview(buffer).cast("B")
    filled = 0
    while filled < len(view):
        n = stream.readinto(view[filled:])
        if not n:
            raise ValueError(f"{path}: truncated IDX file: {what} needs {len(view)} bytes, "
                             f"found {filled}")
        filled += n


def read_idx(path):
    """Read an IDX file (plain or gzip-compressed) into an ndarray of its shape.

    The header is checked: magic (two zero bytes, a type code, the number of
    dimensions), then the data size against the dimensions. A truncated file, a
    corrupt gzip stream or trailing bytes raise ValueError naming the file.
    Multi-byte types are returned in native byte order.
    """
    path = Path(path)
    with open(path, "rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as f:
            header = bytearray(4)
            _read_exactly(f, header, path, "the header")
            if header[0] or header[1] or header[2] not in _IDX_TYPES or header[3] == 0:
                raise ValueError(f"{path}: not an IDX file (bad magic number "
                                 f"0x{int.from_bytes(header, 'big'):08x}; expected 0x0000TTNN "
                                 f"with type TT in {{08,09,0B,0C,0D,0E}} and NN >= 1 dimensions)")
            dtype, ndim = _IDX_TYPES[header[2]], header[3]
            dims = np.empty(ndim, dtype=">u4")
            _read_exactly(f, dims, path, f"the header's {ndim} dimensions")
            shape = tuple(int(d) for d in dims)
            needed = math.prod(shape) * dtype.itemsize
            # deflate expands at most ~1032:1, so this bounds what the file can hold
            room = os.path.getsize(path) * (1032 if compressed else 1) - (4 + 4 * ndim)
            if needed > room:
                raise ValueError(f"{path}: truncated IDX file: the header says shape {shape} "
                                 f"({dtype.name}, {needed} bytes of data) but the file holds "
                                 f"{'at most ' if compressed else ''}{max(room, 0)}")
            data = np.empty(shape, dtype=dtype)
            _read_exactly(f, data, path, f"data of shape {shape} ({dtype.name})")
            extra = len(f.read(1 << 16))
            if extra:
                raise ValueError(f"{path}: {'at least ' if extra == 1 << 16 else ''}{extra} "
                                 f"unexpected bytes after the data of shape {shape}; "
                                 f"the header does not match the file")
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise ValueError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc
    return data.astype(dtype.newbyteorder("="), copy=False) if dtype.itemsize > 1 else data


def write_idx(path, array):
    """Write ``array`` as an IDX file (gzip-compressed when the name ends in .gz)."""
    array = np.asarray(array)
    code = _IDX_CODES.get(array.dtype)
    if code is None:
        raise TypeError(f"write_idx: dtype {array.dtype} has no IDX type code")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"write_idx: IDX holds 1 to 255 dimensions, got {array.ndim}")
    payload = (bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
               + np.ascontiguousarray(array, _IDX_TYPES[code]).tobytes())
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


# ---------------------------------------------------------------- data sets

class Dataset:
    """uint8 images (N, C, H, W), int64 labels (N,), class names, and the mean /
    standard deviation (per channel, 0-1 scale) used to standardise them.

    Indexing with a slice or an index array gives a Dataset over those samples.
    """

    def __init__(self, images, labels, classes=None, mean=None, std=None, name=""):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8:
            raise TypeError(f"Dataset: images must be uint8, got {images.dtype}")
        if images.ndim == 3:
            images = images[:, None]
        if images.ndim != 4:
            raise ValueError(f"Dataset: images must be (N, H, W) or (N, C, H, W), "
                             f"got shape {images.shape}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"Dataset: labels must be (N,) with N = {images.shape[0]} images, "
                             f"got shape {labels.shape}")
        if labels.dtype.kind not in "iu":
            raise TypeError(f"Dataset: labels must be integers, got {labels.dtype}")
        self.images, self.labels = images, labels.astype(np.int64, copy=False)
        if classes is None:
            classes = _numbered_classes(int(self.labels.max(initial=-1)), "Dataset")
        self.classes = tuple(str(c) for c in classes)
        if len(self.labels) and not 0 <= self.labels.min() <= self.labels.max() < len(self.classes):
            raise ValueError(f"Dataset: labels span [{self.labels.min()}, {self.labels.max()}] "
                             f"but there are {len(self.classes)} classes")
        if mean is None or std is None:
            mean, std = self._pixel_stats()
        self.mean, self.std = self._per_channel(mean, "mean"), self._per_channel(std, "std")
        self.name = name

    def _per_channel(self, values, what):
        values = tuple(float(v) for v in np.atleast_1d(values))
        channels = self.images.shape[1]
        if len(values) == 1 and channels > 1:
            values = values * channels
        if len(values) != channels:
            raise ValueError(f"Dataset: {what} has {len(values)} values for {channels} channels")
        if not all(math.isfinite(v) and (what == "mean" or v > 0) for v in values):
            raise ValueError(f"Dataset: {what} must be finite{' and > 0' if what == 'std' else ''}"
                             f", got {values}")
        return values

    def _pixel_stats(self):
        if not len(self.images):
            return (0.0,), (1.0,)
        mean, var = [], []
        for c in range(self.images.shape[1]):
            plane = self.images[:, c]
            total = plane.sum(dtype=np.float64)
            squares = np.einsum("ijk,ijk->", plane, plane, dtype=np.float64)
            m = total / plane.size
            mean.append(m / 255)
            var.append(max(squares / plane.size - m * m, 0.0) / 255 ** 2)
        return tuple(mean), tuple(math.sqrt(v) if v > 0 else 1.0 for v in var)

    @property
    def image_shape(self):
        return self.images.shape[1:]

    @property
    def num_classes(self):
        return len(self.classes)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return self.images[index], int(self.labels[index])
        return Dataset(self.images[index], self.labels[index], self.classes, self.mean,
                       self.std, self.name)

    def split(self, val_size, seed=0):
        """(train, validation): a seeded random split; ``val_size`` a count (an int) or a
        fraction (a float strictly between 0 and 1)."""
        n = len(self)
        if isinstance(val_size, (float, np.floating)):
            if not 0 < val_size < 1:
                raise ValueError(f"split: a fractional val_size must lie strictly between 0 "
                                 f"and 1, got {val_size} (a count is an int)")
            count = int(round(float(val_size) * n))
        else:
            try:
                count = as_int(val_size, "split: val_size")
            except TypeError:
                raise TypeError(f"split: val_size must be a count (int) or a fraction (float), "
                                f"got {val_size!r}") from None
        if not 0 < count < n:
            raise ValueError(f"split: val_size {val_size} leaves no data on one side of {n}")
        order = np.random.default_rng(seed).permutation(n)
        return self[np.sort(order[count:])], self[np.sort(order[:count])]

    def __repr__(self):
        return (f"Dataset({self.name or 'unnamed'}: {len(self)} images of "
                f"{tuple(self.image_shape)}, {self.num_classes} classes)")


def _numbered_classes(top, where):
    """Names "0" ... str(top) for labels that come without any."""
    if top >= MAX_DEFAULT_CLASSES:
        raise ValueError(f"{where}: labels reach {top}, so {top + 1} classes; numbered class "
                         f"names are made for at most {MAX_DEFAULT_CLASSES} (a label that large "
                         f"is most likely a corrupt file): pass the class names (classes=, or "
                         f"a classes.txt beside the IDX files) if the labels are right")
    return [str(i) for i in range(top + 1)]


def _idx_file(root, split, kind):
    prefixes = ("train",) if split == "train" else ("t10k", "test")
    suffix = "idx3-ubyte" if kind == "images" else "idx1-ubyte"
    pattern = re.compile(rf"(^|.*[-_.])({'|'.join(prefixes)})-{kind}[-.]{suffix}(\.gz)?$")
    found = sorted(p for p in root.iterdir() if pattern.match(p.name) and p.is_file())
    stems = {p.name[:-3] if p.name.endswith(".gz") else p.name for p in found}
    if len(stems) > 1:
        names = ", ".join(p.name for p in found)
        raise ValueError(f"{root}: several {split} {kind} files ({names}); "
                         f"keep one data set per folder")
    # prefer the uncompressed copy when both are there
    return min(found, key=lambda p: p.name.endswith(".gz")) if found else None


def _has_idx_set(root):
    return root.is_dir() and all(_idx_file(root, split, kind) for split in ("train", "test")
                                 for kind in ("images", "labels"))


_HOW_TO_GET = (
    "Get Fashion-MNIST with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; it "
    f"installs to {DEBIAN_FASHION_MNIST}), or point --data (or $FASTCNN_DATA) at a folder "
    "holding the four IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (plain or .gz), e.g. from "
    "https://github.com/zalandoresearch/fashion-mnist. MNIST, KMNIST and EMNIST files work too.")


def find_data_dir(data=None):
    """The folder to load from: ``data`` if given, else $FASTCNN_DATA, else Debian's.

    Raises DataNotFoundError saying where it looked and how to get the data.
    """
    if data is not None:
        candidates = [("--data", Path(data))]
    else:
        candidates = []
        if os.environ.get("FASTCNN_DATA"):
            candidates.append(("$FASTCNN_DATA", Path(os.environ["FASTCNN_DATA"])))
        candidates.append(("the Debian package location", Path(DEBIAN_FASHION_MNIST)))
    for _, root in candidates:
        if _has_idx_set(root):
            return root
    looked = "; ".join(
        f"{label} {root} ({'no complete IDX set' if root.is_dir() else 'no such folder'})"
        for label, root in candidates)
    if data is None and not os.environ.get("FASTCNN_DATA"):
        looked = "--data not given; $FASTCNN_DATA not set; " + looked
    raise DataNotFoundError(f"no data set found. Looked in: {looked}. {_HOW_TO_GET}")


def _read_classes(root):
    for name in ("classes.txt", "class_names.txt"):
        path = root / name
        if path.is_file():
            return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return None


def load_idx_dataset(root, classes=None, mean=None, std=None, name=None):
    """(train, test) Datasets from a folder with an MNIST-format IDX set.

    classes: class names; default ``classes.txt`` in the folder (one per line),
    else Fashion-MNIST's names when the folder's name says "fashion", else
    "0", "1", ... . mean / std: standardisation statistics; default those of
    the training images, used for both splits.
    """
    root = Path(root)
    if not _has_idx_set(root):
        raise DataNotFoundError(f"{root}: no complete IDX set (need train and t10k/test "
                                f"images and labels). {_HOW_TO_GET}")
    arrays = {}
    for split in ("train", "test"):
        for kind in ("images", "labels"):
            arrays[split, kind] = read_idx(_idx_file(root, split, kind))
    for split in ("train", "test"):
        images, labels = arrays[split, "images"], arrays[split, "labels"]
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"{root}: {split} images must be uint8 (N, H, W) or (N, C, H, W), "
                             f"got {images.dtype} {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"{root}: {len(images)} {split} images but labels of shape "
                             f"{labels.shape}")
    fashion = "fashion" in str(root.resolve()).lower()
    if classes is None:
        classes = _read_classes(root)
    if classes is None and fashion:
        classes = FASHION_MNIST_CLASSES
    if classes is None:
        top = max((int(arrays[split, "labels"].max()) for split in ("train", "test")
                   if arrays[split, "labels"].size), default=-1)
        classes = _numbered_classes(top, str(root))
    name = name or ("Fashion-MNIST" if fashion else root.name)
    train = Dataset(arrays["train", "images"], arrays["train", "labels"], classes, mean, std,
                    f"{name} train")
    test = Dataset(arrays["test", "images"], arrays["test", "labels"], classes, train.mean,
                   train.std, f"{name} test")
    return train, test


def load_fashion_mnist(data=None):
    """(train, test) Fashion-MNIST, from ``data`` / $FASTCNN_DATA / Debian's package."""
    root = find_data_dir(data)
    classes = _read_classes(root) or FASHION_MNIST_CLASSES
    return load_idx_dataset(root, classes, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
                            name="Fashion-MNIST")


# ---------------------------------------------------------------- augmentation

def random_shift(images, max_shift, rng):
    """Shift each image by its own random (dy, dx) in [-max_shift, max_shift], zero fill."""
    if max_shift <= 0:
        return images
    n, c, h, w = images.shape
    s = int(max_shift)
    padded = np.zeros((n, c, h + 2 * s, w + 2 * s), images.dtype)
    padded[:, :, s:s + h, s:s + w] = images
    dy = rng.integers(0, 2 * s + 1, n)
    dx = rng.integers(0, 2 * s + 1, n)
    rows = (dy[:, None] + np.arange(h))[:, None, :, None]
    cols = (dx[:, None] + np.arange(w))[:, None, None, :]
    return padded[np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None], rows, cols]


def random_hflip(images, rng, p=0.5):
    """Mirror each image left-right with probability p."""
    flip = rng.random(len(images)) < p
    if not flip.any():
        return images
    out = images.copy()
    out[flip] = images[flip, :, :, ::-1]
    return out


class Augment:
    """Light augmentation on uint8 batches: random shifts of up to ``shift`` pixels
    and (``hflip``) random left-right mirroring."""

    def __init__(self, shift=0, hflip=False):
        if not isinstance(hflip, (bool, np.bool_)):
            raise TypeError(f"Augment: hflip must be True or False, got {hflip!r}")
        self.shift, self.hflip = as_count(shift, "Augment: shift", 0), bool(hflip)

    def __call__(self, images, rng):
        images = random_shift(images, self.shift, rng)
        return random_hflip(images, rng) if self.hflip else images

    def __bool__(self):
        return self.shift > 0 or self.hflip

    def __repr__(self):
        return f"Augment(shift={self.shift}, hflip={self.hflip})"


# ---------------------------------------------------------------- loader

class DataLoader:
    """Batches (x float32 (B, C, H, W) standardised, y int64 (B,)) from a Dataset.

    Shuffling and augmentation draw from a generator seeded by (seed, epoch), so
    every epoch is reproducible on its own (``set_epoch`` picks one; iterating
    advances it). mean / std default to the data set's.
    """

    def __init__(self, dataset, batch_size=128, shuffle=False, seed=0, drop_last=False,
                 augment=None, mean=None, std=None):
        if not isinstance(dataset, Dataset):
            raise TypeError(f"DataLoader needs a fastcnn.data.Dataset, "
                            f"got {type(dataset).__name__}")
        as_count(batch_size, "DataLoader: batch_size")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.augment = augment if augment else None
        self.mean = dataset.mean if mean is None else dataset._per_channel(mean, "mean")
        self.std = dataset.std if std is None else dataset._per_channel(std, "std")
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.dataset)
        order = rng.permutation(n) if self.shuffle else None
        images, labels = self.dataset.images, self.dataset.labels
        for b in range(len(self)):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, n)
            index = slice(lo, hi) if order is None else order[lo:hi]
            batch = images[index]
            if self.augment is not None:
                batch = self.augment(batch, rng)
            yield F.normalize(batch, self.mean, self.std, dim=-3), labels[index]
        self.epoch += 1
