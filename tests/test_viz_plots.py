"""fastcnn.viz pictures, the HTML report and ``fastcnn explain``: rendered with Agg,
checked to exist, to have the figure's size, and to hold a picture (not blank)."""

import base64
import re

import numpy as np
import pytest

from fastcnn import io, models, viz

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")


def small_model(in_channels=1, seed=0):
    model = models.mnist_cnn_bn(num_classes=4, in_channels=in_channels, input_size=12,
                                channels=(4, 6), hidden=8, seed=seed)
    model.metadata = {"input_shape": [in_channels, 12, 12], "mean": [0.3] * in_channels,
                      "std": [0.4] * in_channels, "classes": ["ant", "bee", "cat", "dog"]}
    return model.eval()


def garment(seed=0, channels=1):
    """A bright blob on a dark background, standardised-looking values."""
    rng = np.random.default_rng(seed)
    x = np.full((channels, 12, 12), -0.8, np.float32)
    x[:, 3:10, 4:9] = rng.uniform(0.5, 2.0, (channels, 7, 5))
    return x


def check_png(path, fig=None):
    """The file is a PNG of the figure's size holding a picture, not a blank canvas."""
    assert path.is_file() and path.stat().st_size > 0
    with PIL.open(path) as img:
        assert img.format == "PNG"
        if fig is not None:
            want = tuple(int(round(v)) for v in fig.get_size_inches() * fig.dpi)
            assert img.size == want
        pixels = np.asarray(img.convert("RGB"))
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 20, f"{path.name}: only {len(colours)} colours"
    assert (pixels < 200).any(axis=2).mean() > 0.05, f"{path.name}: almost all white"


def test_plot_heatmap(tmp_path):
    model = small_model()
    x = garment()
    for name, heat, kwargs in [
        ("gradcam", viz.grad_cam(model, x), {}),
        ("saliency", viz.saliency(model, x), {"overlay": False}),
        ("guided", viz.guided_backprop(model, x), {"overlay": False, "title": "guided"}),
    ]:
        fig = viz.plot_heatmap(x, heat, path=tmp_path / f"{name}.png", **kwargs)
        check_png(tmp_path / f"{name}.png", fig)
        assert len(fig.axes) == 2                           # the map and its colour bar


def test_plot_feature_maps(tmp_path):
    model = small_model()
    maps = viz.feature_maps(model, garment(), "relu1")
    fig = viz.plot_feature_maps(maps, title="relu1", path=tmp_path / "maps.png")
    check_png(tmp_path / "maps.png", fig)
    assert len(fig.axes) == 4
    fig = viz.plot_feature_maps(viz.feature_maps(model, garment()[None], "relu2"),
                                max_maps=5, scale="map", path=tmp_path / "maps2.png")
    assert len(fig.axes) == 5
    check_png(tmp_path / "maps2.png", fig)


@pytest.mark.parametrize("in_channels, layer, panels, shown", [
    (1, None, 4, (3, 3)),             # grey kernels
    (3, "conv1", 4, (3, 3, 3)),       # colour kernels
    (1, "conv2", 6, (3, 4 * 3 + 3)),  # 4 input channels side by side, 1-pixel gaps
])
def test_plot_filters(tmp_path, in_channels, layer, panels, shown):
    model = small_model(in_channels)
    path = tmp_path / "filters.png"
    fig = viz.plot_filters(model, layer, path=path)
    check_png(path, fig)
    assert len(fig.axes) == panels
    assert np.asarray(fig.axes[0].images[0].get_array()).shape == shown


def test_plot_explanation_and_report(tmp_path):
    model = small_model()
    x = np.stack([garment(0), garment(1)])
    explanations = viz.explain(model, x, labels=[1, 2], names=["first", "second/x"],
                               n_samples=4)
    assert len(explanations) == 2
    e = explanations[0]
    assert list(e.maps) == list(viz.METHODS)
    assert e.maps["occlusion"].shape == (12, 12) and e.maps["guided"].shape == (1, 12, 12)
    assert e.classes == ["ant", "bee", "cat", "dog"] and e.layer == "relu2"
    np.testing.assert_allclose(float(np.sum(e.probabilities)), 1.0, rtol=1e-5)
    fig = viz.plot_explanation(e, path=tmp_path / "panel.png")
    check_png(tmp_path / "panel.png", fig)
    page = viz.write_report(explanations, tmp_path / "report")
    assert page.name == "report.html"
    text = page.read_text()
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    # per image: the input, one per method, the side-by-side panel
    assert len(uris) == 2 * (len(viz.METHODS) + 2)
    assert base64.b64decode(uris[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'src="(?!data:)', text)           # self-contained
    assert "ant" in text and "first" in text and "second/x" in text
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert len(pngs) == 2 * (len(viz.METHODS) + 2)
    assert "01_second_x_gradcam.png" in pngs
    check_png(tmp_path / "report" / "00_first_occlusion.png")


def test_plot_maximized(tmp_path):
    model = small_model()
    r = viz.maximize_activation(model, None, [0, 2, 3], shape=(1, 12, 12), steps=5)
    fig = viz.plot_maximized(r, names=["ant", "cat", "dog"], path=tmp_path / "max.png")
    check_png(tmp_path / "max.png", fig)
    assert len(fig.axes) == 3 and fig.axes[1].get_title().startswith("cat: ")
    with pytest.raises(ValueError, match="2 names for 3 images"):
        viz.plot_maximized(r, names=["ant", "cat"])


def test_explain_subset_of_methods_and_target():
    model = small_model()
    e = viz.explain(model, garment(), target=3,
                    methods=["saliency", "gradcam", "integrated", "deeplift", "lrp"], fill=0.5,
                    n_steps=8)
    assert list(e.maps) == ["saliency", "gradcam", "integrated", "deeplift", "lrp"]
    assert e.target == 3
    assert e.occlusion is None and e.settings["n_steps"] == 8
    np.testing.assert_array_equal(e.maps["saliency"], viz.saliency(model, garment(), 3))
    np.testing.assert_array_equal(e.maps["integrated"], viz.integrated_gradients(
        model, garment(), 3, baseline=0.5, n_steps=8))
    np.testing.assert_array_equal(e.maps["deeplift"], viz.deep_lift(model, garment(), 3,
                                                                    baseline=0.5))
    np.testing.assert_array_equal(e.maps["lrp"], viz.lrp(
        model, garment(), 3, rules=viz.lrp_composite(model), fold_batchnorm=True))
    bare = small_model()
    bare.metadata = None           # no standardisation: the box is the image's range
    box = viz.lrp_composite(bare, float(garment().min()), float(garment().max()))
    np.testing.assert_array_equal(
        viz.explain(bare, garment(), 3, methods=["lrp"]).maps["lrp"],
        viz.lrp(bare, garment(), 3, rules=box, fold_batchnorm=True))
    shap = viz.explain(model, garment(), 3, methods=["kernel_shap"], window=(5, 3), fill=0.5,
                       shap_samples=60, seed=2)
    cells = (np.arange(12)[:, None] // 5) * 4 + np.arange(12)[None, :] // 3   # 3 x 4 cells
    np.testing.assert_array_equal(shap.maps["kernel_shap"], viz.kernel_shap(
        model, garment(), 3, feature_mask=cells, baseline=0.5, n_samples=60, seed=2)[0])
    assert shap.maps["kernel_shap"].shape == (12, 12)
    assert "5x3 cell" in viz.report._caption(shap, "kernel_shap")
    with pytest.raises(ValueError, match="window must be >= 1"):
        viz.explain(model, garment(), methods=["kernel_shap"], window=0)
    with pytest.raises(ValueError, match="unknown methods"):
        viz.explain(model, garment(), methods=["lime"])
    one = viz.explain(model, garment(), methods="saliency")        # a name, not a list
    assert list(one.maps) == ["saliency"]
    pair = np.stack([garment(0), garment(1)])
    with pytest.raises(ValueError, match="one class per sample"):
        viz.explain(model, pair, [1, 2, 3], methods=["saliency"])
    assert [e.target for e in viz.explain(model, pair, 2, methods=["saliency"])] == [2, 2]


def test_explain_metrics(tmp_path):
    """explain(metrics=True): per method, the unexplained share (noise for the local
    maps, the window's cells set to the fill for the others) and the sensitivity, the
    same numbers as the viz functions give; the report shows them."""
    from fastcnn.viz import report

    model = small_model()
    pair = np.stack([garment(0), garment(1)])
    methods = ["saliency", "gradcam", "integrated", "kernel_shap", "occlusion"]
    es = viz.explain(model, pair, 3, methods=methods, fill=0.5, n_steps=8, shap_samples=40,
                     window=3, metrics=True)
    assert all(list(e.metrics) == methods for e in es)
    cells = report._cells((12, 12), 3)
    local = viz.unexplained_share(model, pair, viz.saliency(model, pair, 3), 3,
                                  stdev=report.INFIDELITY_NOISE,
                                  n_samples=report.INFIDELITY_SAMPLES)
    ig = viz.integrated_gradients(model, pair, 3, baseline=0.5, n_steps=8)
    shared = viz.unexplained_share(model, pair, ig, 3, perturb="subset", feature_mask=cells,
                                   baseline=0.5, n_samples=report.INFIDELITY_SAMPLES)
    steady = viz.sensitivity_max("grad_cam", model, pair, 3, radius=report.SENSITIVITY_RADIUS,
                                 n_samples=report.SENSITIVITY_SAMPLES)
    for i, e in enumerate(es):
        assert e.metrics["saliency"]["unexplained"] == pytest.approx(float(local[i]), rel=1e-12)
        assert e.metrics["integrated"]["unexplained"] == pytest.approx(float(shared[i]),
                                                                       rel=1e-12)
        assert e.metrics["gradcam"]["sensitivity"] == pytest.approx(float(steady[i]), rel=1e-12)
        for values in e.metrics.values():
            assert 0 <= values["unexplained"] <= 1 and values["sensitivity"] >= 0
    page = viz.write_report(es, tmp_path / "r").read_text()
    assert page.count("How far to trust each map") == 2 and "cells removed" in page
    assert viz.explain(model, garment(), methods=["saliency"]).metrics is None


def test_cli_explain(tmp_path, capsys):
    from fastcnn import cli

    if "explain" not in cli.COMMANDS:
        pytest.skip("fastcnn explain is not registered in this cli.py")
    model_path = io.save(small_model(), tmp_path / "model.npz")
    picture = np.zeros((40, 30), np.uint8)
    picture[8:32, 10:20] = 200
    PIL.fromarray(picture).save(tmp_path / "shirt.png")
    out = tmp_path / "out"
    status = cli.main(["explain", str(model_path), str(tmp_path / "shirt.png"), "--out", str(out),
                       "--method", "gradcam", "--target", "cat"])
    assert status == 0
    assert "predicted" in capsys.readouterr().out
    check_png(out / "00_shirt_png_gradcam.png")
    assert (out / "report.html").is_file()
    assert cli.main(["explain", str(model_path), str(tmp_path / "shirt.png"), "--out", str(out),
                     "--target", "zebra"]) == 2
    assert "zebra" in capsys.readouterr().err
    assert cli.main(["explain", str(model_path), str(tmp_path / "shirt.png"), "--out", str(out),
                     "--method", "integrated", "--steps", "6"]) == 0
    check_png(out / "00_shirt_png_integrated.png")
    assert "6 steps" in (out / "report.html").read_text()
    assert cli.main(["explain", str(model_path), str(tmp_path / "shirt.png"), "--out", str(out),
                     "--method", "deeplift"]) == 0
    check_png(out / "00_shirt_png_deeplift.png")
    assert "DeepLIFT" in (out / "report.html").read_text()
    assert cli.main(["explain", str(model_path), str(tmp_path / "shirt.png"), "--out", str(out),
                     "--method", "lrp"]) == 0
    check_png(out / "00_shirt_png_lrp.png")
    assert "gamma = 0.25" in (out / "report.html").read_text()
    assert cli.main(["explain", str(model_path), str(tmp_path / "shirt.png"), "--out", str(out),
                     "--method", "guided", "--metrics"]) == 0
    printed = capsys.readouterr().out
    assert "unexplained" in printed and "sensitivity" in printed and "noise" in printed
    assert "How far to trust each map" in (out / "report.html").read_text()
    assert cli.main(["explain", str(model_path), str(tmp_path / "shirt.png"), "--out", str(out),
                     "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_plot_channels(tmp_path):
    model = small_model()
    x = garment()
    scores = viz.channel_importance(model, x, "relu2", 1)
    fig = viz.plot_channels(model, x, "relu2", scores, top=4, path=tmp_path / "ch.png")
    check_png(tmp_path / "ch.png", fig)
    best = int(np.argmax(scores))
    assert len(fig.axes) == 2 + 4 and fig.axes[2].get_title().startswith(f"{best}: ")
    fig = viz.plot_channels(model, x, top=99)   # its own scores, the default layer: all 6
    assert len(fig.axes) == 2 + 6
    with pytest.raises(ValueError, match="3 scores for the 6 channels"):
        viz.plot_channels(model, x, "relu2", scores[:3])
    with pytest.raises(ValueError, match="one image"):
        viz.plot_channels(model, np.stack([x, x]), "relu2")


def test_cli_channels(tmp_path, capsys):
    from fastcnn import cli

    model_path = io.save(small_model(), tmp_path / "model.npz")
    picture = np.zeros((40, 30), np.uint8)
    picture[8:32, 10:20] = 200
    PIL.fromarray(picture).save(tmp_path / "shirt.png")
    out = tmp_path / "channels.png"
    assert cli.main(["channels", str(model_path), str(tmp_path / "shirt.png"), "--target", "cat",
                     "--top", "3", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("shirt.png: class cat; 6 channels of relu2 by the target "
                               "logit's drop")
    ranked = [int(line.split()[2]) for line in lines[1:4]]
    model = io.load(model_path)
    x = cli.load_image(tmp_path / "shirt.png", [1, 12, 12])
    x = (x.astype(np.float32) / 255 - 0.3) / 0.4
    want = viz.channel_importance(model, x, "relu2", 2)
    assert ranked == list(np.argsort(-want, kind="stable")[:3])
    assert lines[-1] == f"wrote {out}"
    check_png(out)
    assert cli.main(["channels", str(model_path), str(tmp_path / "shirt.png"), "--method",
                     "conductance", "--steps", "4", "--layer", "fc1", "--out",
                     str(tmp_path / "fc1")]) == 0
    assert "8 channels of fc1 by the channel's share" in capsys.readouterr().out
    check_png(tmp_path / "fc1.png")
    for bad, message in ((["--top", "0"], "--top and --steps must be >= 1"),
                         (["--layer", "relu9"], "no layer"),
                         (["--out", "x.bmp"], "name it NAME.png")):
        assert cli.main(["channels", str(model_path), str(tmp_path / "shirt.png")] + bad) == 2
        assert message in capsys.readouterr().err


def test_cli_maximize(tmp_path, capsys):
    from fastcnn import cli

    model_path = io.save(small_model(), tmp_path / "model.npz")
    out = tmp_path / "classes.png"
    assert cli.main(["maximize", str(model_path), "--steps", "5", "--out", str(out)]) == 0
    assert "fc2: 4 units reach" in capsys.readouterr().out
    check_png(out)
    assert cli.main(["maximize", str(model_path), "--layer", "relu1", "--channels", "0,2-3",
                     "--steps", "3", "--out", str(out)]) == 0
    assert "relu1: 3 units" in capsys.readouterr().out
    assert cli.main(["maximize", str(model_path), "--channels", "1-x"]) == 2
    assert "--channels" in capsys.readouterr().err
    assert cli.main(["maximize", str(model_path), "--layer", "relu1", "--channels", "9"]) == 2
    assert "channels must be in [0, 4)" in capsys.readouterr().err


def test_cli_explain_test_index(tmp_path):
    from fastcnn import cli, data

    if "explain" not in cli.COMMANDS:
        pytest.skip("fastcnn explain is not registered in this cli.py")
    try:
        data.find_data_dir()
    except data.DataNotFoundError:
        pytest.skip("Fashion-MNIST is not installed")
    model = models.mnist_cnn_bn(channels=(4, 6), hidden=8).eval()
    model_path = io.save(model, tmp_path / "model.npz")     # no metadata: the data set's
    out = tmp_path / "out"
    assert cli.main(["explain", str(model_path), "test:3", "test:7", "--method", "occlusion",
                     "--window", "7", "--stride", "7", "--out", str(out)]) == 0
    text = (out / "report.html").read_text()
    assert "test:3" in text and "test:7" in text and "Trouser" in text
    assert cli.main(["explain", str(model_path), "test:99999", "--out", str(out)]) == 2


def test_cli_tcav(tmp_path, capsys):
    """fastcnn tcav over folders of pictures: the score printed is viz.tcav's on the
    same images; test: sets from an IDX folder; bad sets are one-line errors."""
    from fastcnn import cli, data

    model_path = io.save(small_model(), tmp_path / "model.npz")
    rng = np.random.default_rng(0)
    folders = {}
    for name, count, make in (
            ("stripes", 6, lambda i: np.tile(np.where(np.arange(24) % 6 < 3, 220, 20), (30, 1))),
            ("random", 16, lambda i: rng.integers(0, 256, (30, 24))),
            ("inputs", 5, lambda i: np.pad(rng.integers(100, 256, (10, 8)), 10))):
        folder = folders[name] = tmp_path / name
        folder.mkdir()
        for i in range(count):
            PIL.fromarray(make(i).astype(np.uint8)).save(folder / f"{i:02d}.png")
    args = ["tcav", str(model_path), "--concept", str(folders["stripes"]), "--target", "cat",
            "--images", str(folders["inputs"]), "--random", str(folders["random"]), "--runs",
            "3", "--layer", "pool1"]
    assert cli.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("tcav: the cat logit at pool1, for 5 images")
    row = lines[2].split()
    assert row[0] == str(folders["stripes"])

    def load(folder):
        batch = np.stack([cli.load_image(p, [1, 12, 12]) for p in sorted(folder.iterdir())])
        return (batch.astype(np.float32) / 255 - np.float32(0.3)) / np.float32(0.4)

    want = viz.tcav(io.load(model_path), load(folders["inputs"]), "pool1",
                    load(folders["stripes"]), load(folders["random"]), 2, runs=3)
    assert float(row[1]) == pytest.approx(want.score, abs=0.005)
    # test: sets from an IDX folder (12x12 images, classes 0-3)
    idx = tmp_path / "idx"
    idx.mkdir()
    labels = (np.arange(40) % 4).astype(np.uint8)
    for prefix in ("train", "t10k"):
        data.write_idx(idx / f"{prefix}-images-idx3-ubyte.gz",
                       rng.integers(0, 256, (40, 12, 12)).astype(np.uint8))
        data.write_idx(idx / f"{prefix}-labels-idx1-ubyte.gz", labels)
    assert cli.main(["tcav", str(model_path), "--concept", "test:1", "--target", "2", "--data",
                     str(idx), "--count", "5", "--runs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "for 5 images (test:2)" in printed and "test:1" in printed
    bare = small_model()
    bare.metadata = {"mean": [0.3], "std": [0.4]}
    bare_path = io.save(bare, tmp_path / "bare.npz")
    assert cli.main(["tcav", str(bare_path), "--target", "1", "--concept", str(folders["stripes"]),
                     "--images", str(folders["inputs"]), "--random", str(folders["random"])]) == 2
    assert "has no input_shape" in capsys.readouterr().err
    # a bad set is found before anything is printed
    assert cli.main(["tcav", str(model_path), "--target", "cat", "--data", str(idx),
                     "--concept", "test:1", "--concept", "test:7"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "test:7: '7' is not a class of the test set: an index in [0, 4)" in err
    for bad, message in ((["--concept", str(tmp_path / "none")], "expected test:CLASS"),
                         (["--concept", "test:zebra"], "is not a class of the test set"),
                         (["--runs", "0"], "--count and --runs must be >= 1"),
                         (["--layer", "relu9"], "no layer")):
        assert cli.main(["tcav", str(model_path), "--target", "cat", "--data", str(idx),
                         "--concept", "test:1"] + bad) == 2, bad
        assert message in capsys.readouterr().err


def test_class_channels_plot_and_cli(tmp_path, capsys):
    from fastcnn import cli, data

    model = small_model()
    means = np.array([[0.5, -0.1, 0.0, 0.2, 0.1, 0.0], [0.0, 0.9, 0.1, 0.0, 0.0, 0.3],
                      [np.nan] * 6, [0.1, 0.0, 0.0, 0.0, 0.6, 0.0]])
    fig = viz.plot_class_channels(means, ["ant", "bee", "cat", "dog"], layer="relu2",
                                  path=tmp_path / "m.png")
    check_png(tmp_path / "m.png", fig)
    # channels ordered by the class they matter most to, then by their score
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["0", "3", "1", "5", "2", "4"]
    with pytest.raises(ValueError, match="3 class names for 4 rows"):
        viz.plot_class_channels(means, ["a", "b", "c"])
    with pytest.raises(TypeError, match="not the \\(means, counts\\) pair"):
        viz.plot_class_channels((means, np.ones(4)))
    with pytest.raises(TypeError, match="classes must be a list of names"):
        viz.plot_class_channels(means, "abcd")
    model_path = io.save(model, tmp_path / "model.npz")
    idx = tmp_path / "idx"
    idx.mkdir()
    rng = np.random.default_rng(3)
    for prefix in ("train", "t10k"):
        data.write_idx(idx / f"{prefix}-images-idx3-ubyte.gz",
                       rng.integers(0, 256, (20, 12, 12)).astype(np.uint8))
        data.write_idx(idx / f"{prefix}-labels-idx1-ubyte.gz",
                       (np.arange(20) % 4).astype(np.uint8))
    out = tmp_path / "classes.png"
    assert cli.main(["class-channels", str(model_path), "--data", str(idx), "--count", "3",
                     "--top", "2", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("6 channels of relu2, each class's ablation scores averaged")
    assert lines[1].startswith("  ant") and "(   3)" in lines[1] and len(lines[1].split()) == 5
    assert len(lines) == 6 and lines[-1] == f"wrote {out}"
    check_png(out)
    # the rows are class_channel_importance over the first 3 test images of each class
    test = data.load_idx_dataset(idx)[1]
    index = np.concatenate([np.flatnonzero(test.labels == k)[:3] for k in range(4)])
    x = (test.images[index].astype(np.float32) / 255 - np.float32(0.3)) / np.float32(0.4)
    means, _ = viz.class_channel_importance(io.load(model_path), x,
                                            test.labels[index].astype(np.int64), "relu2")
    best = np.argsort(-means[0], kind="stable")[:2]
    assert lines[1].split()[3].startswith(f"{best[0]}:")   # ant ( 3) c:score ...
    for bad, message in ((["--count", "0"], "--count must be >= 1, got 5, 50 and 0"),
                         (["--layer", "relu9"], "no layer")):
        assert cli.main(["class-channels", str(model_path), "--data", str(idx)] + bad) == 2, bad
        assert message in capsys.readouterr().err
