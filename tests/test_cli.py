"""The fastcnn command line: demo, train and predict on small synthetic data (quick runs)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fastcnn import cli, data, io


def _idx_folder(folder, n=64, size=28, classes=10, seed=0):
    """MNIST-format files of ``n`` training and test images with a class-dependent blob."""
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    for prefix in ("train", "t10k"):
        labels = (np.arange(n) % classes).astype(np.uint8)
        images = g.integers(0, 40, (n, size, size)).astype(np.uint8)
        for i, c in enumerate(labels):
            r = 2 + 2 * int(c)
            images[i, r:r + 4, 4:24] = 230
        data.write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        data.write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One quick ``fastcnn train`` run shared by the tests below."""
    root = tmp_path_factory.mktemp("cli")
    folder = _idx_folder(root / "digits")
    (folder / "classes.txt").write_text("\n".join(f"thing{i}" for i in range(10)))
    out = root / "run"
    code = cli.main(["train", "--data", str(folder), "--out", str(out), "--epochs", "2",
                     "--batch-size", "16", "--arch", "mnist_cnn", "--optimizer", "adam",
                     "--val-size", "0", "--threads", "1", "--no-progress"])
    assert code == 0
    return folder, out


def test_train_writes_outputs(trained, capsys):
    folder, out = trained
    for name in ("model.npz", "checkpoint.npz", "history.json", "results.json", "curves.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["epochs_run"] == 2 and 0 <= results["test"]["accuracy"] <= 1
    assert results["recipe"]["arch"] == "mnist_cnn" and results["threads"] == 1
    model = io.load(out / "model.npz")
    assert model.metadata["classes"][3] == "thing3"
    assert model.metadata["input_shape"] == [1, 28, 28] and len(model.metadata["mean"]) == 1


def test_train_resume_continues(trained, capsys):
    folder, out = trained
    code = cli.main(["train", "--data", str(folder), "--out", str(out), "--epochs", "3",
                     "--batch-size", "16", "--arch", "mnist_cnn", "--optimizer", "adam",
                     "--val-size", "0", "--resume", "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "resumed from" in text and "epoch 3/3" in text and "epoch 1/3" not in text
    assert len(json.loads((out / "history.json").read_text())) == 3


def test_predict_prints_top_classes(trained, tmp_path, capsys):
    folder, out = trained
    images = data.read_idx(folder / "t10k-images-idx3-ubyte.gz")
    dark = tmp_path / "dark.png"
    Image.fromarray(images[3]).save(dark)
    light = tmp_path / "light.jpg"  # a light background, another size, RGB: inverted, resized
    Image.fromarray(255 - np.kron(images[5], np.ones((3, 2), np.uint8))).convert("RGB").save(light)
    code = cli.main(["predict", str(out / "model.npz"), str(dark), str(light), "--top-k", "2"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(dark) and lines[3] == str(light) and len(lines) == 6
    assert lines[1].strip().startswith("1. thing") and lines[1].endswith("%")
    probs = [float(line.split()[-1].rstrip("%")) for line in lines[1:3]]
    assert probs[0] >= probs[1]
    x = cli.load_image(light, [1, 28, 28])
    assert x.shape == (1, 28, 28) and x.dtype == np.uint8 and x[0, 0, 0] < 128  # inverted


def test_predict_refuses_a_model_that_gives_nan(trained, tmp_path, capsys):
    folder, out = trained
    model = io.load(out / "model.npz")
    model.fc1.weight.data[...] = np.nan
    io.save(model, tmp_path / "nan.npz")
    picture = tmp_path / "x.png"
    Image.fromarray(data.read_idx(folder / "t10k-images-idx3-ubyte.gz")[0]).save(picture)
    assert cli.main(["predict", str(tmp_path / "nan.npz"), str(picture)]) == 2
    err = capsys.readouterr().err
    assert "not finite numbers" in err and "weights hold NaN" in err and "nan%" not in err


def test_maximize_writes_the_picture_it_names(trained, tmp_path, capsys, monkeypatch):
    folder, out = trained
    monkeypatch.chdir(tmp_path)
    assert cli.main(["maximize", str(out / "model.npz"), "--layer", "relu2", "--channels",
                     "0,1", "--steps", "2", "--out", "relu2"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "wrote relu2.png"
    assert Image.open(tmp_path / "relu2.png").format == "PNG"
    for bad, message in (("x.bmp", "name it NAME.png"), ("none/x.png", "cannot write"),
                         (str(tmp_path), "is a folder"), ("", "is a folder")):
        assert cli.main(["maximize", str(out / "model.npz"), "--out", bad]) == 2
        assert message in capsys.readouterr().err


def test_demo_quick_run(tmp_path, capsys):
    folder = _idx_folder(tmp_path / "fashion-like", n=48)
    out = tmp_path / "demo"
    code = cli.main(["demo", "--data", str(folder), "--out", str(out), "--epochs", "1",
                     "--batch-size", "16", "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "test accuracy" in text and "confusion matrix" in text and "Ankle boot" in text
    assert (out / "model.npz").is_file() and (out / "curves.png").is_file()
    assert io.load(out / "model.npz").metadata["arch"] == "mnist_cnn_bn"


def test_errors_are_reported_clearly(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(tmp_path / "absent"))
    monkeypatch.delenv("FASTCNN_DATA", raising=False)
    assert cli.main(["demo", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "fastcnn demo: error" in err and "apt-get install dataset-fashion-mnist" in err
    assert cli.main(["predict", str(tmp_path / "none.npz"), "x.png"]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    assert cli.main(["predict", str(tmp_path / "bad.npz"), "x.png"]) == 2
    assert "not a fastcnn model file" in capsys.readouterr().err


def test_help_and_command_table(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(name in text for name in ("demo", "train", "predict"))
    calls = []
    cli.register("hello", "say hello", lambda p: p.add_argument("--name", default="x"),
                 lambda args: calls.append(args.name) or 0)
    try:
        assert cli.main(["hello", "--name", "fastcnn"]) == 0 and calls == ["fastcnn"]
    finally:
        del cli.COMMANDS["hello"]


def test_module_entry_point(tmp_path):
    """python -m fastcnn and python -m fastcnn.cli run the command, whose errors are
    the usual one line (exit 2), not a traceback."""
    for module in ("fastcnn", "fastcnn.cli"):
        result = subprocess.run([sys.executable, "-m", module, "train", "--help"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "--optimizer" in result.stdout, module
        result = subprocess.run([sys.executable, "-m", module, "predict",
                                 str(tmp_path / "none.npz"), str(tmp_path / "x.png")],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("fastcnn predict: error:"), result.stderr


def test_bench_runs_and_reports_ratios(tmp_path, capsys, monkeypatch):
    """`fastcnn bench` is reachable from the CLI and writes its figures; the
    quick GEMM section is enough to exercise the plumbing (PyTorch optional)."""
    from fastcnn import bench

    monkeypatch.setattr(bench, "GEMM_SQUARES", (64,))
    monkeypatch.setattr(bench, "GEMM_CONV_SHAPES", ((8, 9, 256),))
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "gemm", "--quick", "--threads", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sgemm 64x64x64" in text and "numpy" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["sgemm 64x64x64", "sgemm 8x9x256"]
    assert all(r["ratio"] > 0 for r in rows)


def test_bench_no_winograd_applies_for_the_run_only(tmp_path, capsys, monkeypatch):
    import fastcnn
    from fastcnn import bench

    monkeypatch.setattr(bench, "GEMM_SQUARES", (64,))
    monkeypatch.setattr(bench, "GEMM_CONV_SHAPES", ((8, 9, 256),))
    out = tmp_path / "bench.json"
    assert fastcnn.get_conv_winograd()
    assert cli.main(["bench", "gemm", "--quick", "--no-winograd", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["info"]["conv_winograd"] is False
    assert "conv_winograd=False" in capsys.readouterr().out
    assert fastcnn.get_conv_winograd()


def test_bench_cuda_without_gpu_fails_cleanly(capsys):
    from fastcnn import cuda

    if cuda.is_available():
        pytest.skip("a GPU is present: this checks the message on machines without one")
    assert cli.main(["bench", "--device", "cuda", "gemm", "--quick"]) == 2  # as every error
    assert "--device cuda: error: no usable GPU" in capsys.readouterr().err
    assert cli.main(["bench", "--device=cuda", "--quick"]) == 2
    assert "no usable GPU" in capsys.readouterr().err
    # the last --device counts: here the CPU benchmark's parser, which knows no --tf32
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--device", "cuda", "--device", "cpu", "--tf32", "on"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "usage: fastcnn bench [" in err and "--tf32" in err


def test_train_device_cuda_without_gpu_fails_cleanly(tmp_path, capsys):
    from fastcnn import cuda

    if cuda.is_available():
        pytest.skip("a GPU is present: this checks the message on machines without one")
    folder = _idx_folder(tmp_path / "digits", n=16)
    assert cli.main(["train", "--data", str(folder), "--out", str(tmp_path / "o"), "--epochs",
                     "1", "--device", "cuda", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: no usable GPU" in err
    assert not (tmp_path / "o").exists()
    assert cli.main(["train", "--data", str(folder), "--out", str(tmp_path / "o"), "--epochs",
                     "1", "--cuda-graph", "--no-progress"]) == 2
    assert "--cuda-graph needs --device cuda" in capsys.readouterr().err


def test_info_says_what_runs_where(capsys):
    """fastcnn info: the versions and CPU kernel, and whether the GPU is used,
    with the reason when it is not; --json gives the same facts."""
    import fastcnn
    import fastcnn.cuda
    from fastcnn import _backend

    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["fastcnn"] == fastcnn.__version__
    assert info["gemm_kernel"] == _backend._cpu.gemm_kernel()
    assert info["cuda_module"] == (fastcnn.cuda._cuda() is not None)
    assert len(info["gpus"]) == fastcnn.cuda.device_count()
    assert info["gpu"] == (_gpu_skip() is None)
    assert info["gpu"] != ("gpu_unavailable" in info)
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"GEMM kernel {info['gemm_kernel']}" in text
    if not info["gpu"]:
        assert f"GPU: not used: {info['gpu_unavailable']}" in text


@pytest.mark.skipif("not _has_cuda_module()", reason="fastcnn._cuda was not built")
def test_info_names_the_gpu(capsys, monkeypatch):
    import fake_cupy
    import fastcnn.cuda

    fake_cupy.install(monkeypatch)
    monkeypatch.setattr(fastcnn.cuda, "device_count", lambda: 1)
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "GPU 0: fake GPU (emulator)" in text and "CuPy fake" in text
    assert "GPU: used for CuPy arrays (cuda simt" in text and "TF32 off" in text


def _gpu_skip():
    from fastcnn import cuda

    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed"
    return None if cuda.is_available() else "no CUDA GPU"


def _has_cuda_module():
    try:
        from fastcnn import _cuda  # noqa: F401
    except ImportError:
        return False
    return True


#: The emulated GPU (tests/fake_cupy.py) and, where there is one, the real one.
ON_GPU = pytest.mark.parametrize("gpu", [
    pytest.param("fake", marks=pytest.mark.skipif(not _has_cuda_module(),
                                                  reason="fastcnn._cuda was not built")),
    pytest.param("gpu", marks=[pytest.mark.cuda,
                               pytest.mark.skipif(_gpu_skip() is not None,
                                                  reason=str(_gpu_skip()))])])


@ON_GPU
@pytest.mark.parametrize("command,optimizer", [("demo", None), ("train", "adam")])
def test_training_on_the_gpu_from_the_cli(tmp_path, capsys, monkeypatch, command, optimizer,
                                          gpu):
    """demo (BN model, SGD + cosine schedule, explanations) and train (Adam, as a
    replayed CUDA graph) with --device cuda: outputs written, the saved model
    loads on the CPU and predicts
    (on the GPU, and through tests/fake_cupy.py on the emulated kernels)."""
    if gpu == "fake":
        import fake_cupy

        fake_cupy.install(monkeypatch)
    epochs = 1 if gpu == "fake" else 2  # the emulated kernels are slow
    folder = _idx_folder(tmp_path / "digits", n=32 if gpu == "fake" else 64)
    out = tmp_path / "run"
    args = [command, "--data", str(folder), "--out", str(out), "--epochs", str(epochs),
            "--batch-size", "16", "--device", "cuda", "--no-progress"]
    if optimizer:  # train: Adam, its steps replayed as a CUDA graph
        args += ["--optimizer", optimizer, "--val-size", "0", "--cuda-graph"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "GPU" in text and "test accuracy" in text
    results = json.loads((out / "results.json").read_text())
    assert results["device"].startswith("GPU") and results["epochs_run"] == epochs
    model = io.load(out / "model.npz")
    assert model.device == "cpu"
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    assert model(x).shape == (2, 10)
    if command == "demo":
        assert (out / "explain").is_dir() and any((out / "explain").iterdir())


def test_bad_options_fail_before_any_work(tmp_path, capsys):
    """Each out-of-range option is a one-line error (exit 2) naming it, before data is read."""
    folder = _idx_folder(tmp_path / "digits", n=32)
    base = ["train", "--data", str(folder), "--epochs", "1", "--no-progress",
            "--out", str(tmp_path / "o")]
    for extra, message in [(["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"),
                           (["--momentum", "-1"], "--momentum"),
                           (["--weight-decay", "-0.1"], "--weight-decay"),
                           (["--warmup-epochs", "-1"], "--warmup-epochs"),
                           (["--val-size", "-5"], "--val-size"), (["--limit", "0"], "--limit"),
                           (["--patience", "0"], "--patience"), (["--shift", "-2"], "--shift"),
                           (["--val-size", "0", "--patience", "2"], "--val-size > 0"),
                           (["--val-size", "16"], "hold out less than half"),
                           (["--classes", "a,b"], "classes"), (["--seed", "-1"], "--seed"),
                           (["--batch-size", str(2 ** 70)], "--batch-size must fit"),
                           (["--threads", str(2 ** 40)], "--threads"),
                           (["--val-size", "0", "--shift", "28"], "--shift 28")]:
        assert cli.main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("fastcnn train: error:") and message in err, (extra, err)
        assert "Traceback" not in err
    (tmp_path / "file").write_text("x")
    assert cli.main(base[:-1] + [str(tmp_path / "file")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert cli.main(base[:-1] + [str(tmp_path / "file" / "run")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    for channels, message in (("0-10000000", "more than the 4096"), ("5-3", "backwards")):
        assert cli.main(["maximize", str(tmp_path / "none.npz"), "--channels", channels]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err) < 300, err
    with pytest.raises(SystemExit) as exit_info:  # argparse's error: usage and exit 2
        cli.main(["bench", "gemm", "--quick", "--json", str(tmp_path / "no" / "x.json")])
    assert exit_info.value.code == 2 and "cannot write" in capsys.readouterr().err


def test_resume_refuses_another_run_s_options(tmp_path, capsys):
    folder = _idx_folder(tmp_path / "digits", n=48)
    base = ["train", "--data", str(folder), "--out", str(tmp_path / "run"), "--batch-size", "16",
            "--arch", "mnist_cnn", "--val-size", "8", "--no-progress"]
    assert cli.main(base + ["--epochs", "1"]) == 0
    for extra, named in [(["--optimizer", "adam"], "--optimizer sgd (now adam)"),
                         (["--seed", "9"], "--seed 0 (now 9)"), (["--lr", "0.5"], "--lr")]:
        assert cli.main(base + ["--epochs", "2", "--resume"] + extra) == 2
        assert named in capsys.readouterr().err
    assert cli.main(base + ["--epochs", "2", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert cli.main(["train", "--data", str(folder), "--out", str(tmp_path / "none"),
                     "--resume", "--no-progress"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    # the same options on other data: another folder, other class names
    other = _idx_folder(tmp_path / "other", n=48, seed=5)
    for args, named in [(["--data", str(other)], "mean"),
                        (["--classes", ",".join("abcdefghij")], "classes")]:
        assert cli.main(base + ["--epochs", "3", "--resume"] + args) == 2
        err = capsys.readouterr().err
        assert "was trained on other data" in err and named in err, err
    # the demo cannot set a train run's options: it says so rather than name them
    assert cli.main(["demo", "--data", str(folder), "--out", str(tmp_path / "run"), "--epochs",
                     "3", "--batch-size", "16", "--resume", "--no-progress"]) == 2
    assert "not made by `fastcnn demo`" in capsys.readouterr().err


def test_pictures_are_read_as_they_look(tmp_path):
    """16-bit grey scaled (not clipped), also when it holds 12-bit levels; 24-bit
    integer and 0-1 float grey (TIFF) the same; transparency laid on white, EXIF
    orientation applied: each gives the same input as the plain 8-bit picture."""
    g = np.random.default_rng(0)
    plain = np.full((28, 28), 255, np.uint8)
    plain[6:22, 9:19] = g.integers(0, 60, (16, 10))
    Image.fromarray(plain).save(tmp_path / "plain.png")
    want = cli.load_image(tmp_path / "plain.png", [1, 28, 28])
    Image.fromarray(plain.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    levels12 = np.rint(plain * (4095 / 255)).astype(np.uint16)  # a 12-bit scan in 16 bits
    Image.fromarray(levels12).save(tmp_path / "grey12.png")
    Image.fromarray(plain.astype(np.int32) * 65793).save(tmp_path / "grey24.tiff")
    Image.fromarray(plain.astype(np.float32) / 255).save(tmp_path / "float.tiff")
    # floats past 1 are stretched from their lowest level, not from 0
    assert cli._grey_to_8bit(np.array([[0.2, 0.5, 1.5]]), True).tolist() == [[0, 59, 255]]
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3] = plain[..., None]
    rgba[..., 3] = np.where(plain == 255, 0, 255)  # the background transparent
    rgba[plain == 255, :3] = 0                     # and black under the transparency
    Image.fromarray(rgba, "RGBA").save(tmp_path / "transparent.png")
    rotated = Image.fromarray(np.rot90(plain, 1).copy())  # stored turned, tagged to turn back
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(tmp_path / "rotated.png", exif=exif)
    for name in ("grey16.png", "grey12.png", "grey24.tiff", "float.tiff", "transparent.png",
                 "rotated.png"):
        np.testing.assert_array_equal(cli.load_image(tmp_path / name, [1, 28, 28]), want,
                                      err_msg=name)


def test_a_closed_pipe_ends_quietly():
    """fastcnn ... | head: when the reader goes away the command stops with status
    141 (128 + SIGPIPE), without an error line or a traceback."""
    code = ("import sys\nfrom fastcnn import cli\n"
            "cli.register('spam', 'many lines', lambda parser: None,\n"
            "             lambda args: [print('y' * 80) for _ in range(10 ** 5)] and 0)\n"
            "sys.exit(cli.main(['spam']))\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=120) == 141
    assert b"Broken pipe" not in err and b"Traceback" not in err, err


@ON_GPU
def test_picture_commands_on_the_gpu(tmp_path, capsys, monkeypatch, gpu):
    """explain, channels, class-channels, tcav and predict with --device cuda print
    what they print on the CPU (on the GPU, and through tests/fake_cupy.py)."""
    from fastcnn import models

    folder = _idx_folder(tmp_path / "digits", n=20)
    model = models.mnist_cnn(channels=(4, 8), hidden=16, seed=0)
    model.metadata = {"input_shape": [1, 28, 28], "mean": [0.2], "std": [0.3],
                      "classes": [f"c{i}" for i in range(10)]}
    path = io.save(model, tmp_path / "model.npz")
    runs = [["explain", str(path), "test:0", "--method", "integrated", "--steps", "4",
             "--metrics", "--out", str(tmp_path / "e")],
            ["channels", str(path), "test:1", "--top", "3", "--out", str(tmp_path / "c.png")],
            ["class-channels", str(path), "--count", "1", "--top", "2",
             "--out", str(tmp_path / "k.png")],
            ["tcav", str(path), "--target", "3", "--concept", "test:1", "--count", "2",
             "--runs", "2", "--layer", "relu2"]]
    picture = np.zeros((30, 20), np.uint8)
    picture[5:25, 6:14] = 210
    Image.fromarray(picture).save(tmp_path / "shirt.png")
    runs.append(["predict", str(path), str(tmp_path / "shirt.png")])
    printed = {}
    for device in ("cpu", "cuda"):
        if device == "cuda" and gpu == "fake":
            import fake_cupy

            fake_cupy.install(monkeypatch)
        for args in runs:
            data_option = [] if args[0] == "predict" else ["--data", str(folder)]
            assert cli.main(args + data_option + ["--device", device]) == 0, args
            printed[device, args[0]] = capsys.readouterr().out
    for args in runs:
        cpu, cuda = printed["cpu", args[0]], printed["cuda", args[0]]
        assert cpu.splitlines()[0] == cuda.splitlines()[0], args[0]
        assert len(cpu.splitlines()) == len(cuda.splitlines()), args[0]
