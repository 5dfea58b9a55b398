"""fastcnn.data: the IDX reader, data sets, the data search, augmentation and the loader."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from fastcnn import data

FASHION = Path(data.DEBIAN_FASHION_MNIST)
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def _idx_bytes(code, shape, payload):
    """An IDX file built by hand: magic 0x0000TTNN, big-endian uint32 dims, data."""
    return bytes([0, 0, code, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape) + payload


def make_idx_set(folder, n_train=40, n_test=20, size=8, classes=3, gz=True, seed=0):
    """A synthetic MNIST-format folder: class c has a bright square at a spot of its own."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % classes).astype(np.uint8)
        g.shuffle(labels)
        images = g.integers(0, 60, (n, size, size)).astype(np.uint8)
        for i, c in enumerate(labels):
            r = 1 + (int(c) * 2) % (size - 3)
            images[i, r:r + 2, r:r + 2] = 250
        data.write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        data.write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return folder


# ---------------------------------------------------------------- IDX reader

def test_read_idx_plain_and_gzip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = _idx_bytes(0x08, images.shape, images.tobytes())
    (tmp_path / "plain").write_bytes(raw)
    (tmp_path / "packed.gz").write_bytes(gzip.compress(raw))
    for name in ("plain", "packed.gz"):
        got = data.read_idx(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (2, 3, 4)
        np.testing.assert_array_equal(got, images)


@pytest.mark.parametrize("code,dtype", [(0x09, ">i1"), (0x0B, ">i2"), (0x0C, ">i4"),
                                        (0x0D, ">f4"), (0x0E, ">f8")])
def test_read_idx_big_endian_types(tmp_path, code, dtype):
    values = np.array([[-3, 7, 100], [1, 0, -1]], dtype=dtype)
    (tmp_path / "f").write_bytes(_idx_bytes(code, values.shape, values.tobytes()))
    got = data.read_idx(tmp_path / "f")
    assert got.dtype.isnative and got.dtype.kind == np.dtype(dtype).kind
    np.testing.assert_array_equal(got, values.astype(got.dtype))


def test_write_idx_round_trip(tmp_path):
    a = np.random.default_rng(0).integers(-5, 5, (3, 2, 2)).astype(np.int32)
    data.write_idx(tmp_path / "a.gz", a)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a.gz"), a)
    with pytest.raises(TypeError, match="IDX type"):
        data.write_idx(tmp_path / "b", np.zeros(3, np.int64))
    for name in ("none", "none.gz"):  # a set of zero images reads back as one
        data.write_idx(tmp_path / name, np.zeros((0, 28, 28), np.uint8))
        assert data.read_idx(tmp_path / name).shape == (0, 28, 28)


def test_read_idx_truncated_plain(tmp_path):
    raw = _idx_bytes(0x08, (10, 4, 4), bytes(160))
    (tmp_path / "short").write_bytes(raw[:-7])
    with pytest.raises(ValueError, match=r"truncated IDX file.*\(10, 4, 4\)"):
        data.read_idx(tmp_path / "short")
    (tmp_path / "header").write_bytes(raw[:9])
    with pytest.raises(ValueError, match="truncated IDX file: the header's 3 dimensions"):
        data.read_idx(tmp_path / "header")
    (tmp_path / "tiny").write_bytes(b"\0\0")
    with pytest.raises(ValueError, match="truncated IDX file: the header"):
        data.read_idx(tmp_path / "tiny")


def test_read_idx_truncated_gzip(tmp_path):
    raw = _idx_bytes(0x08, (50, 8, 8), np.random.default_rng(0).bytes(50 * 64))
    packed = gzip.compress(raw)
    (tmp_path / "cut.gz").write_bytes(packed[:len(packed) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated gzip|truncated IDX"):
        data.read_idx(tmp_path / "cut.gz")
    # a complete gzip stream whose content is cut short
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(ValueError, match="truncated IDX file"):
        data.read_idx(tmp_path / "short.gz")
    corrupt = bytearray(packed)
    corrupt[-8] ^= 0xFF  # the CRC
    (tmp_path / "crc.gz").write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="corrupt or truncated gzip"):
        data.read_idx(tmp_path / "crc.gz")


def test_read_idx_bad_magic_type_and_trailing_bytes(tmp_path):
    good = _idx_bytes(0x08, (2, 2), bytes(4))
    for name, raw in (("magic", b"\x01" + good[1:]), ("type", good[:2] + b"\x07" + good[3:]),
                      ("ndim", good[:3] + b"\x00" + good[4:]), ("text", b"hello world\n")):
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(ValueError, match="not an IDX file"):
            data.read_idx(tmp_path / name)
    (tmp_path / "long").write_bytes(good + b"xx")
    with pytest.raises(ValueError, match="2 unexpected bytes"):
        data.read_idx(tmp_path / "long")
    huge = _idx_bytes(0x08, (60000, 28, 28), bytes(10))
    (tmp_path / "huge.gz").write_bytes(gzip.compress(huge))
    with pytest.raises(ValueError, match="truncated IDX file"):
        data.read_idx(tmp_path / "huge.gz")


# ---------------------------------------------------------------- data sets and search

def test_load_idx_dataset_from_folder(tmp_path):
    folder = make_idx_set(tmp_path / "set", classes=3)
    train, test = data.load_idx_dataset(folder)
    assert len(train) == 40 and len(test) == 20
    assert train.images.shape == (40, 1, 8, 8) and train.labels.dtype == np.int64
    assert train.classes == ("0", "1", "2")
    assert test.mean == train.mean and test.std == train.std
    pixels = train.images.astype(np.float64) / 255
    assert train.mean[0] == pytest.approx(pixels.mean()) and train.std[0] == pytest.approx(pixels.std())
    (folder / "classes.txt").write_text("cat\ndog\nbird\n")
    assert data.load_idx_dataset(folder)[0].classes == ("cat", "dog", "bird")
    assert data.load_idx_dataset(folder, classes=["a", "b", "c"])[1].classes == ("a", "b", "c")
    with pytest.raises(ValueError, match=r"labels span \[0, 2\] but there are 2 classes"):
        data.load_idx_dataset(folder, classes=["a", "b"])
    # a corrupt label far past the others: refused, not 2**31 class names built
    labels = data.read_idx(folder / "train-labels-idx1-ubyte.gz").astype(np.int32)
    labels[5] = 2 ** 31 - 1
    data.write_idx(folder / "train-labels-idx1-ubyte.gz", labels)
    (folder / "classes.txt").unlink()
    with pytest.raises(ValueError, match="labels reach 2147483647.*pass the class names"):
        data.load_idx_dataset(folder)
    with pytest.raises(ValueError, match="labels reach 10000"):
        data.Dataset(np.zeros((1, 2, 2), np.uint8), [data.MAX_DEFAULT_CLASSES])
    named = data.Dataset(np.zeros((1, 2, 2), np.uint8), [data.MAX_DEFAULT_CLASSES],
                         classes=range(data.MAX_DEFAULT_CLASSES + 1))  # meant: fine
    assert named.num_classes == data.MAX_DEFAULT_CLASSES + 1


def test_load_plain_files_and_alternative_names(tmp_path):
    folder = make_idx_set(tmp_path / "fashion-copy", gz=False, classes=10, n_train=30)
    for p in folder.iterdir():
        p.rename(p.with_name("emnist-digits-" + p.name.replace("t10k", "test")))
    train, test = data.load_idx_dataset(folder)
    assert len(train) == 30 and train.classes == data.FASHION_MNIST_CLASSES  # "fashion" in path
    make_idx_set(tmp_path / "two", classes=3)
    make_idx_set(tmp_path / "two_b", classes=3)
    for p in (tmp_path / "two_b").iterdir():
        p.rename(tmp_path / "two" / ("x-" + p.name))
    with pytest.raises(ValueError, match="one data set per folder"):
        data.load_idx_dataset(tmp_path / "two")


def test_find_data_dir_search_order_and_message(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(tmp_path / "not-installed"))
    monkeypatch.delenv("FASTCNN_DATA", raising=False)
    with pytest.raises(data.DataNotFoundError) as err:
        data.find_data_dir()
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message and "--data" in message
    assert "train-images-idx3-ubyte" in message and "not-installed" in message
    folder = make_idx_set(tmp_path / "env")
    monkeypatch.setenv("FASTCNN_DATA", str(folder))
    assert data.find_data_dir() == folder
    explicit = make_idx_set(tmp_path / "explicit")
    assert data.find_data_dir(explicit) == explicit
    with pytest.raises(data.DataNotFoundError, match="--data .*nowhere.*no such folder"):
        data.find_data_dir(tmp_path / "nowhere")
    (tmp_path / "partial").mkdir()
    with pytest.raises(data.DataNotFoundError, match="no complete IDX set"):
        data.find_data_dir(tmp_path / "partial")


def test_dataset_indexing_and_split():
    images = np.arange(10 * 4, dtype=np.uint8).reshape(10, 2, 2)
    ds = data.Dataset(images, np.arange(10) % 2, classes=["even", "odd"], name="toy")
    assert ds.image_shape == (1, 2, 2) and ds.num_classes == 2
    img, label = ds[3]
    assert label == 1 and img.shape == (1, 2, 2)
    sub = ds[2:5]
    assert len(sub) == 3 and sub.classes == ds.classes and sub.mean == ds.mean
    train, val = ds.split(0.3, seed=1)
    assert len(train) == 7 and len(val) == 3
    ids = np.concatenate([train.images[:, 0, 0, 0], val.images[:, 0, 0, 0]])
    assert sorted(ids) == list(images[:, 0, 0])
    again = ds.split(3, seed=1)[1]
    np.testing.assert_array_equal(again.images, val.images)
    np.testing.assert_array_equal(ds.split(np.int64(3), seed=1)[1].images, val.images)
    assert len(ds.split(np.float32(0.5))[1]) == 5
    for bad, error, message in [(float("nan"), ValueError, "strictly between 0 and 1"),
                                (3.0, ValueError, "strictly between"),
                                (1.0, ValueError, "strictly between"),
                                ("3", TypeError, "a count .int. or a fraction"),
                                (True, TypeError, "a count"), (None, TypeError, "a count"),
                                (0, ValueError, "leaves no data"),
                                (10, ValueError, "leaves no data")]:
        with pytest.raises(error, match=message):
            ds.split(bad)
    with pytest.raises(TypeError, match="uint8"):
        data.Dataset(images.astype(np.float32), np.zeros(10, int))
    with pytest.raises(ValueError, match="labels must be"):
        data.Dataset(images, np.zeros(9, int))
    for mean, std, message in [(0.5, 0.0, "std must be finite and > 0"),
                               (float("nan"), 0.5, "mean must be finite")]:
        with pytest.raises(ValueError, match=message):
            data.Dataset(images, np.zeros(10, int), mean=mean, std=std)
        with pytest.raises(ValueError, match=message):
            data.DataLoader(ds, mean=mean, std=std)


@needs_fashion
def test_real_fashion_mnist():
    train, test = data.load_fashion_mnist(FASHION)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert train.classes[7] == "Sneaker" and train.classes[9] == "Ankle boot"
    sample = train.images[:5000].astype(np.float64) / 255
    assert sample.mean() == pytest.approx(train.mean[0], abs=0.01)
    assert sample.std() == pytest.approx(train.std[0], abs=0.01)


# ---------------------------------------------------------------- loader and augmentation

def _toy(n=50):
    g = np.random.default_rng(0)
    return data.Dataset(g.integers(0, 256, (n, 1, 4, 4)).astype(np.uint8), np.arange(n) % 5)


def test_loader_batches_normalises_and_keeps_labels_with_images():
    ds = _toy()
    loader = data.DataLoader(ds, batch_size=16, shuffle=True, seed=3)
    assert len(loader) == 4
    seen = []
    for x, y in loader:
        assert x.dtype == np.float32 and x.shape[1:] == (1, 4, 4) and y.dtype == np.int64
        seen.append(y)
        # undo the standardisation and find each image in the data set
        raw = np.rint((x.astype(np.float64) * ds.std[0] + ds.mean[0]) * 255).astype(np.uint8)
        for img, label in zip(raw, y):
            match = np.flatnonzero((ds.images == img).all(axis=(1, 2, 3)))
            assert len(match) == 1 and ds.labels[match[0]] == label
    assert [len(s) for s in seen] == [16, 16, 16, 2]
    x, _ = next(iter(data.DataLoader(ds, batch_size=50)))
    want = (ds.images.astype(np.float64) / 255 - ds.mean[0]) / ds.std[0]
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-5)
    assert len(data.DataLoader(ds, batch_size=16, drop_last=True)) == 3


def test_loader_shuffle_is_seeded_per_epoch():
    ds = _toy()

    def order(loader):
        return np.concatenate([x[:, 0, 0, 0] for x, _ in loader])

    a, b = data.DataLoader(ds, 8, shuffle=True, seed=1), data.DataLoader(ds, 8, shuffle=True, seed=1)
    first = order(a)
    np.testing.assert_array_equal(first, order(b))
    assert a.epoch == 1
    second = order(a)
    assert not np.array_equal(first, second)
    b.set_epoch(1)
    np.testing.assert_array_equal(second, order(b))
    assert sorted(first) == sorted(second)
    assert not np.array_equal(first, order(data.DataLoader(ds, 8, shuffle=True, seed=2)))


def test_random_shift_moves_whole_images():
    images = np.zeros((64, 1, 7, 7), np.uint8)
    images[:, 0, 3, 3] = 200
    shifted = data.random_shift(images, 2, np.random.default_rng(0))
    assert shifted.shape == images.shape and shifted.dtype == np.uint8
    offsets = set()
    for img in shifted[:, 0]:
        (r,), (c,) = np.nonzero(img)
        assert img.sum() == 200 and abs(r - 3) <= 2 and abs(c - 3) <= 2
        offsets.add((r - 3, c - 3))
    assert len(offsets) > 10
    corner = np.zeros((1, 1, 5, 5), np.uint8)
    corner[0, 0, 0, 0] = 9
    for seed in range(20):  # content shifted out is lost, and zeros come in
        out = data.random_shift(corner, 1, np.random.default_rng(seed))
        assert out.sum() in (0, 9)
    assert data.random_shift(images, 0, None) is images


def test_random_hflip_and_augment():
    images = np.arange(16 * 3 * 3, dtype=np.uint8).reshape(16, 1, 3, 3)
    flipped = data.random_hflip(images, np.random.default_rng(0))
    same = (flipped == images).all(axis=(1, 2, 3))
    mirrored = (flipped == images[..., ::-1]).all(axis=(1, 2, 3))
    assert (same | mirrored).all() and same.any() and mirrored.any()
    aug = data.Augment(shift=1, hflip=True)
    assert aug and not data.Augment()
    for bad, error in [(-1, ValueError), (1.7, TypeError), ("2", TypeError)]:
        with pytest.raises(error, match="shift"):
            data.Augment(shift=bad)
    for bad in ("no", 1, None):
        with pytest.raises(TypeError, match="hflip must be True or False"):
            data.Augment(hflip=bad)
    assert data.Augment(hflip=np.bool_(True)).hflip is True
    for bad, error in [(0, ValueError), (2.5, TypeError)]:
        with pytest.raises(error, match="batch_size"):
            data.DataLoader(_toy(), bad)
    out = aug(images, np.random.default_rng(0))
    assert out.shape == images.shape
    ds = _toy()
    plain = next(iter(data.DataLoader(ds, 50)))[0]
    augmented = next(iter(data.DataLoader(ds, 50, augment=aug)))[0]
    assert not np.array_equal(plain, augmented)
