"""fastcnn.io: save / load round trips, checkpoints, atomic writes and damaged files."""

import json
import os
import zipfile

import numpy as np
import pytest

from fastcnn import io, models, nn, optim


def _trained(batchnorm=True, steps=2, seed=0):
    """A model after a few training steps: moved weights, running stats, dropout offset."""
    model = models.mnist_cnn(batchnorm=batchnorm, seed=seed)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    g = np.random.default_rng(seed)
    for _ in range(steps):
        x = g.standard_normal((8, 1, 28, 28)).astype(np.float32)
        loss_fn(model(x), g.integers(0, 10, 8))
        opt.zero_grad()
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step()
    return model, opt


def _x(seed=1, n=5):
    return np.random.default_rng(seed).standard_normal((n, 1, 28, 28)).astype(np.float32)


@pytest.mark.parametrize("batchnorm", [False, True], ids=["mnist_cnn", "mnist_cnn_bn"])
def test_round_trip_reproduces_outputs_bit_for_bit(tmp_path, batchnorm):
    model, _ = _trained(batchnorm)
    model.metadata = {"classes": ["a"] * 10, "input_shape": [1, 28, 28], "mean": [0.5]}
    path = io.save(model, tmp_path / "model.npz")
    loaded = io.load(path)
    assert repr(loaded) == repr(model) and loaded.metadata == model.metadata
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b, err_msg=name)
    x = _x()
    model.eval(), loaded.eval()
    np.testing.assert_array_equal(model(x).view(np.uint32), loaded(x).view(np.uint32))
    # the dropout offset travels with the model: the next training forward matches too
    model.train(), loaded.train()
    np.testing.assert_array_equal(model(x).view(np.uint32), loaded(x).view(np.uint32))
    with np.load(path, allow_pickle=False) as archive:  # plain arrays, no pickle anywhere
        assert "__header__" in archive.files and "model/fc1.weight" in archive.files


def test_file_is_self_describing(tmp_path):
    model = models.mnist_cnn_bn()
    path = io.save(model, tmp_path / "m.npz", metadata={"classes": ["x"]})
    with np.load(path, allow_pickle=False) as archive:
        header = json.loads(archive["__header__"].tobytes())
    assert header["format"] == "fastcnn-model" and header["version"] == 1
    layers = header["model"]["architecture"]["args"]["layers"]
    assert layers[0] == {"name": "conv1", "type": "Conv2d", "args": {
        "in_channels": 1, "out_channels": 32, "kernel_size": [3, 3], "stride": [1, 1],
        "padding": [1, 1], "dilation": [1, 1], "groups": 1, "bias": True}}
    assert header["model"]["metadata"] == {"classes": ["x"]}


def test_metadata_that_load_would_refuse_is_refused_by_save(tmp_path):
    model = nn.Sequential(nn.Flatten())
    for bad in ([1, 2], "classes"):
        with pytest.raises(TypeError, match="metadata must be a dict"):
            io.save(model, tmp_path / "m.npz", metadata=bad)
    with pytest.raises(TypeError, match="JSON values"):
        io.save(model, tmp_path / "m.npz", metadata={"mine": object()})
    # the entries fastcnn reads back must be usable: refused on save, named
    for bad, message in [({"input_shape": [1, 28]}, "input_shape must be"),
                         ({"input_shape": [1, 0, 28]}, "input_shape must be"),
                         ({"input_shape": [1, 28.0, 28]}, "input_shape must be"),
                         ({"input_shape": [3, 10 ** 6, 10 ** 6]}, "more than the"),
                         ({"classes": "abc"}, "classes must be"),
                         ({"classes": [["a"]]}, "classes must be"),
                         ({"mean": [], "std": [1.0]}, "mean must be"),
                         ({"mean": [float("nan")]}, "mean must be"),
                         ({"std": [0.0]}, "std must be > 0"),
                         ({"input_shape": [3, 4, 4], "std": [1.0, 2.0]}, "2 values for the 3"),
                         ({"std": 10 ** 400}, "std must be a finite number"),
                         ({"mean": [10 ** 39]}, "mean must be a finite number"),
                         ({"classes": [True]}, "classes must be")]:
        with pytest.raises(ValueError, match=message):
            io.save(model, tmp_path / "m.npz", metadata=bad)
    assert not (tmp_path / "m.npz").exists()
    # NumPy scalars and arrays, tuples and the user's own entries are saved as JSON
    mine = {"mine": {"any": [None, True]}, "arch": {"depth": 3}, "dataset": None, "std": 10}
    io.save(model, tmp_path / "m.npz", metadata={
        "mean": np.float32(0.5), "input_shape": (1, np.int64(2), 2), "classes": [0, 1], **mine})
    assert io.load(tmp_path / "m.npz").metadata == {
        "mean": 0.5, "input_shape": [1, 2, 2], "classes": [0, 1], **mine}


def test_unusable_metadata_in_a_file_is_dropped_with_a_warning(tmp_path):
    """A header (hand-edited, or from a fastcnn that did not check) whose input_shape
    would hang predict, or whose entries would fail later with an unpacking error:
    the weights load, the entry is dropped with a warning naming it, the rest kept."""
    model = models.mnist_cnn()
    path = io.save(model, tmp_path / "m.npz", metadata={"classes": ["a"] * 10, "own": 1})
    for key, value in [("input_shape", [1, 100000, 100000]), ("input_shape", 28),
                       ("mean", "0.5"), ("std", 10 ** 20 * 10 ** 20), ("classes", {"a": 1})]:
        def edit(header, key=key, value=value):
            header["model"]["metadata"][key] = value

        with pytest.warns(UserWarning, match=f"metadata entry {key!r} dropped"):
            loaded = io.load(_rewrite(path, tmp_path / "bad.npz", edit_header=edit))
        assert key not in loaded.metadata and loaded.metadata["own"] == 1
        if key != "classes":
            assert loaded.metadata["classes"] == ["a"] * 10
        for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_truncated_files_give_a_clear_error(tmp_path):
    model, _ = _trained(steps=1)
    raw = io.save(model, tmp_path / "m.npz").read_bytes()
    for cut in (len(raw) - 10, len(raw) // 2, 100, 3, 0):
        bad = tmp_path / f"cut{cut}.npz"
        bad.write_bytes(raw[:cut])
        with pytest.raises(io.ModelFileError, match="truncated or corrupt|not a fastcnn model"):
            io.load(bad)


def test_corrupt_bytes_give_a_clear_error(tmp_path):
    model, _ = _trained(steps=1)
    raw = bytearray(io.save(model, tmp_path / "m.npz").read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside fc1's weights
    (tmp_path / "flip.npz").write_bytes(bytes(raw))
    with pytest.raises(io.ModelFileError, match="corrupt.*CRC"):
        io.load(tmp_path / "flip.npz")
    (tmp_path / "junk.npz").write_bytes(b"definitely not a model" * 10)
    with pytest.raises(io.ModelFileError, match="not a fastcnn model file"):
        io.load(tmp_path / "junk.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(io.ModelFileError, match="single .npy array"):
        io.load(tmp_path / "single.npy")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(io.ModelFileError, match="not a fastcnn one"):
        io.load(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError):
        io.load(tmp_path / "missing.npz")


def _rewrite(path, out, edit_header=None, drop=None, replace=None):
    """Copy a saved file with its header edited or arrays dropped / replaced."""
    with np.load(path, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    header = json.loads(arrays.pop("__header__").tobytes())
    if edit_header:
        edit_header(header)
    if drop:
        del arrays[drop]
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    arrays.update(replace or {})
    np.savez(out, **arrays)
    return out


def test_mismatched_files_give_a_clear_error(tmp_path):
    path = io.save(models.mnist_cnn(), tmp_path / "m.npz")

    def layer(header, name):
        return next(entry for entry in header["model"]["architecture"]["args"]["layers"]
                    if entry["name"] == name)

    def narrower(header):
        layer(header, "fc1")["args"]["out_features"] = 64

    bad = _rewrite(path, tmp_path / "arch.npz", edit_header=narrower)
    with pytest.raises(io.ModelFileError, match=r"do not match.*fc1.weight.*\(128, 3136\).*\(64, 3136\)"):
        io.load(bad)
    bad = _rewrite(path, tmp_path / "drop.npz", drop="model/fc2.bias")
    with pytest.raises(io.ModelFileError, match="lacks arrays.*fc2.bias"):
        io.load(bad)
    bad = _rewrite(path, tmp_path / "str.npz", replace={"model/fc2.bias": np.array(["x"] * 10)})
    with pytest.raises(io.ModelFileError, match="non-numeric"):
        io.load(bad)

    def unknown(header):
        layer(header, "conv1")["type"] = "Evil"

    with pytest.raises(io.ModelFileError, match="unknown layer type 'Evil'"):
        io.load(_rewrite(path, tmp_path / "evil.npz", edit_header=unknown))

    def newer(header):
        header["version"] = 99

    with pytest.raises(io.ModelFileError, match="newer"):
        io.load(_rewrite(path, tmp_path / "new.npz", edit_header=newer))

    def bad_args(header):
        layer(header, "conv1")["args"]["colour"] = "red"

    with pytest.raises(io.ModelFileError, match="cannot rebuild.*colour"):
        io.load(_rewrite(path, tmp_path / "args.npz", edit_header=bad_args))

    broken = _rewrite(path, tmp_path / "hdr.npz",
                      replace={"__header__": np.frombuffer(b"{oops", np.uint8)})
    with pytest.raises(io.ModelFileError, match="header is corrupt"):
        io.load(broken)

    # hand-edited headers of the wrong types
    for key, value, message in [("version", "1", "version"), ("state", 5, "state list"),
                                ("metadata", [1], "metadata")]:
        def edit(header, key=key, value=value):
            if key == "version":
                header["version"] = value
            else:
                header["model"][key] = value

        with pytest.raises(io.ModelFileError, match=message):
            io.load(_rewrite(path, tmp_path / f"{key}.npz", edit_header=edit))


def test_checkpoint_of_another_optimizer_or_schedule_is_refused(tmp_path):
    model = models.mnist_cnn()
    sgd = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cosine = optim.CosineAnnealingLR(sgd, T_max=10)
    path = io.save_checkpoint(tmp_path / "c.npz", model, sgd, cosine)
    with pytest.raises(io.ModelFileError, match="another optimizer"):
        io.load_checkpoint(path, model, optim.Adam(model.parameters()))
    with pytest.raises(io.ModelFileError, match="CosineAnnealingLR"):
        io.load_checkpoint(path, model, sgd, optim.StepLR(sgd, step_size=2))
    io.load_checkpoint(path, model, optim.SGD(model.parameters()), cosine)  # the same kinds


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.npz"
    io.save(models.mnist_cnn(seed=1), path)
    before = path.read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600

    def failing_savez(f, **arrays):
        f.write(b"PK\x03\x04 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        io.save(models.mnist_cnn(seed=2), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]  # no temporary left behind


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_checkpoint_round_trip(tmp_path, name):
    model, _ = _trained(steps=0)
    opt = optim.build_optimizer(name, model.parameters(), lr=0.1, momentum=0.9)
    sched = optim.CosineAnnealingLR(opt, T_max=10, warmup=2, interval="step")
    loss_fn = nn.CrossEntropyLoss()
    x = _x(n=4)
    for _ in range(3):
        loss_fn(model(x), np.arange(4))
        opt.zero_grad()
        model.backward(loss_fn.backward())
        opt.step()
        sched.step()
    state = {"epoch": 3, "history": [{"loss": 1.5}], "best": None, "rng": np.arange(4)}
    path = io.save_checkpoint(tmp_path / "ck.npz", model, opt, sched, state)

    fresh = models.mnist_cnn_bn(seed=9)
    fresh_opt = optim.build_optimizer(name, fresh.parameters(), lr=0.1, momentum=0.9)
    fresh_sched = optim.CosineAnnealingLR(fresh_opt, T_max=10, warmup=2, interval="step")
    _, got = io.load_checkpoint(path, fresh, fresh_opt, fresh_sched)
    assert got["epoch"] == 3 and got["history"] == [{"loss": 1.5}] and got["best"] is None
    np.testing.assert_array_equal(got["rng"], np.arange(4))
    assert fresh_sched.last_step == 3 and fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=k)
    for i, entries in opt.state.items():
        for key, value in entries.items():
            np.testing.assert_array_equal(value, fresh_opt.state[i][key], err_msg=f"{i}.{key}")
    # one more step on both gives the same weights
    for m, o in ((model, opt), (fresh, fresh_opt)):
        loss_fn(m(x), np.arange(4))
        o.zero_grad()
        m.backward(loss_fn.backward())
        o.step()
    for a, b in zip(model.parameters(), fresh.parameters()):
        np.testing.assert_array_equal(a.data, b.data)
    assert io.load(path).spec() == model.spec()  # a checkpoint also loads as a model
    with pytest.raises(io.ModelFileError, match="architecture differs"):
        io.load_checkpoint(path, models.mnist_cnn())
    with pytest.raises(io.ModelFileError, match="format 'fastcnn-model'"):
        io.load_checkpoint(io.save(model, tmp_path / "plain.npz"))


def test_npz_member_listing_is_plain(tmp_path):
    path = io.save(models.mnist_cnn_bn(), tmp_path / "m.npz")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    assert all(n.endswith(".npy") for n in names) and "model/bn1.running_var.npy" in names
