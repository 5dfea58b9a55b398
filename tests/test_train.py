"""fastcnn.train: learning on real data, reproducibility, resume, early stopping, evaluation."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastcnn import data, models, optim
from fastcnn.train import Trainer, evaluate, plot_history, predict

FASHION = Path(data.DEBIAN_FASHION_MNIST)
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def toy_dataset(n=96, size=16, classes=4, seed=0):
    """Noise with a bright square at a position that depends on the class."""
    g = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = g.integers(0, 80, (n, 1, size, size)).astype(np.uint8)
    for i, c in enumerate(labels):
        r, col = 2 + 6 * (c // 2), 2 + 6 * (c % 2)
        images[i, 0, r:r + 4, col:col + 4] = 240
    return data.Dataset(images, labels, [f"class{c}" for c in range(classes)], name="toy")


def toy_model(seed=0, classes=4):
    return models.mnist_cnn_bn(num_classes=classes, input_size=16, channels=(4, 8), hidden=16,
                               seed=seed)


def _fit(tmp=None, epochs=2, seed=0, resume=None, model_seed=0, schedule_epochs=4,
         **trainer_kwargs):
    model = toy_model(model_seed)
    loader = data.DataLoader(toy_dataset(), batch_size=16, shuffle=True, seed=seed,
                             augment=data.Augment(shift=1, hflip=True))
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    sched = optim.CosineAnnealingLR(opt, T_max=schedule_epochs * len(loader), warmup=3, interval="step")
    trainer = Trainer(out_dir=tmp, progress=False, log=None, **trainer_kwargs)
    history = trainer.fit(model, loader, toy_dataset(32, seed=1), epochs=epochs, optimizer=opt,
                          scheduler=sched, resume=resume)
    return model, history


def _strip_times(history):
    return [{k: v for k, v in h.items() if k not in ("time_s", "images_per_s")} for h in history]


@needs_fashion
def test_training_on_real_fashion_mnist_lowers_loss_and_beats_chance():
    """200 Adam steps of batch 32 on a slice of the real training set."""
    train, test = data.load_fashion_mnist(FASHION)
    loader = data.DataLoader(train[:3200], batch_size=32, shuffle=True, seed=0, drop_last=True)
    model = models.mnist_cnn_bn(seed=0)
    opt = optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    loss_fn = Trainer().loss_fn
    for epoch in range(2):
        loader.set_epoch(epoch)
        for x, y in loader:
            losses.append(float(loss_fn(model(x), y)))
            opt.zero_grad()
            model.backward(loss_fn.backward(), input_grad=False)
            opt.step()
    assert len(losses) == 200
    assert np.mean(losses[:10]) > 1.5 and np.mean(losses[-20:]) < 0.9
    result = evaluate(model, test[:2000])
    assert result.accuracy > 0.7, result.format()
    assert result.confusion.sum() == 2000


def test_same_seed_same_run_and_different_seed_differs():
    a, ha = _fit(seed=3)
    b, hb = _fit(seed=3)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        np.testing.assert_array_equal(pa.data, pb.data, err_msg=name)
    for (name, sa), sb in zip(a.state_dict().items(), b.state_dict().values()):
        np.testing.assert_array_equal(sa, sb, err_msg=name)
    assert _strip_times(ha) == _strip_times(hb)
    c, _ = _fit(seed=4)
    assert not np.array_equal(a["fc1"].weight.data, c["fc1"].weight.data)


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    straight, h_straight = _fit(tmp_path / "a", epochs=3)
    _fit(tmp_path / "b", epochs=1)
    resumed, h_resumed = _fit(tmp_path / "b", epochs=3, resume=True, model_seed=99)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert _strip_times(h_straight) == _strip_times(h_resumed)
    saved = json.loads((tmp_path / "b" / "history.json").read_text())
    assert [h["epoch"] for h in saved] == [1, 2, 3]
    assert (tmp_path / "b" / "checkpoint.npz").is_file() and (tmp_path / "b" / "best.npz").is_file()


def test_history_learns_and_records_everything(tmp_path):
    model, history = _fit(tmp_path, epochs=4)
    ds = toy_dataset()
    assert model.metadata == {"input_shape": [1, 16, 16], "classes": list(ds.classes),
                              "mean": list(ds.mean), "std": list(ds.std), "dataset": "toy"}
    assert len(history) == 4
    keys = {"epoch", "loss", "accuracy", "lr", "time_s", "images_per_s", "val_loss",
            "val_accuracy"}
    assert all(keys <= set(h) for h in history)
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["val_accuracy"] > 0.9
    assert json.loads((tmp_path / "history.json").read_text()) == json.loads(json.dumps(history))


def test_early_stopping_and_restore_best(tmp_path):
    model = toy_model()
    loader = data.DataLoader(toy_dataset(), batch_size=16, shuffle=True)
    opt = optim.SGD(model.parameters(), lr=0.0)  # nothing improves after the first epoch
    lines = []
    trainer = Trainer(early_stopping=2, monitor="val_loss", restore_best=True, progress=False,
                      log=lines.append)
    history = trainer.fit(model, loader, toy_dataset(32, seed=1), epochs=10, optimizer=opt)
    assert len(history) == 3
    assert any("early stopping" in line for line in lines)
    with pytest.raises(ValueError, match="needs validation data"):
        Trainer(early_stopping=1).fit(model, loader, None, epochs=1)
    with pytest.raises(ValueError, match="needs validation data"):
        Trainer(restore_best=True).fit(model, loader, None, epochs=1)


def test_trainer_arguments_and_empty_data(tmp_path):
    """A misspelt monitor, a patience below 1, resume without a folder, and empty data
    sets are errors naming the problem, not fake numbers; predict on no images is
    (0, classes)."""
    model = toy_model()
    with pytest.raises(ValueError, match="monitor must be one of"):
        Trainer(monitor="val_acc")
    for patience in (0, -1, 1.5, True):
        with pytest.raises((TypeError, ValueError), match="early_stopping"):
            Trainer(early_stopping=patience)
    with pytest.raises(ValueError, match="out_dir"):
        Trainer(progress=False).fit(model, toy_dataset(32), epochs=1, resume=True)
    for epochs, error in [(1.5, TypeError), (-1, ValueError), (0, ValueError), ("2", TypeError)]:
        with pytest.raises(error, match="fit: epochs"):
            Trainer(progress=False, log=None).fit(model, toy_dataset(32), epochs=epochs)
    for delta in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="min_delta"):
            Trainer(min_delta=delta)
    empty = toy_dataset(32)[:0]
    with pytest.raises(ValueError, match="no batches"):
        Trainer(progress=False, log=None).fit(model, empty, epochs=1)
    with pytest.raises(ValueError, match="no images"):
        Trainer(progress=False, log=None).fit(model, toy_dataset(32), empty, epochs=1)
    with pytest.raises(ValueError, match="no images"):
        evaluate(model, empty)
    assert predict(model, empty).shape == (0, 4)
    assert predict(model, np.zeros((0, 1, 16, 16), np.float32)).shape == (0, 4)
    with pytest.raises(ValueError, match="batch axis"):
        predict(model, np.zeros((1, 16, 16), np.uint8))


def test_progress_bar_runs(capsys):
    model = toy_model()
    Trainer(progress=True).fit(model, toy_dataset(32), epochs=1, batch_size=16)
    captured = capsys.readouterr()
    assert "epoch 1/1: loss" in captured.out  # the epoch summary
    assert "epoch 1/1" in captured.err and "batch" in captured.err  # the bar


def test_evaluate_confusion_and_per_class():
    model = toy_model().eval()
    ds = toy_dataset(40)
    result = evaluate(model, ds, batch_size=7)
    probs = predict(model, ds, batch_size=9)
    preds = probs.argmax(1)
    assert result.accuracy == pytest.approx((preds == ds.labels).mean())
    confusion = np.zeros((4, 4), int)
    np.add.at(confusion, (ds.labels, preds), 1)
    np.testing.assert_array_equal(result.confusion, confusion)
    np.testing.assert_allclose(result.per_class_accuracy,
                               np.diag(confusion) / confusion.sum(1))
    text = result.format()
    assert "class3" in text and "confusion matrix" in text
    assert json.dumps(result.to_dict())


def test_predict_inputs_and_mode_restored():
    model = toy_model()
    ds = toy_dataset(20)
    model.train()
    probs = predict(model, ds)
    assert model.training and probs.shape == (20, 4) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    x = next(iter(data.DataLoader(ds, 20)))[0]
    np.testing.assert_array_equal(predict(model, x, batch_size=6), probs)
    model.metadata["mean"], model.metadata["std"] = list(ds.mean), list(ds.std)
    np.testing.assert_array_equal(predict(model, ds.images), probs)
    del model.metadata["mean"]
    with pytest.raises(ValueError, match="mean and std"):
        predict(model, ds.images)


def test_evaluate_and_predict_refuse_loaders_that_skip_or_reorder_images():
    """A result per image needs every image, in order: a loader that drops its last
    batch (evaluate, predict) or shuffles (predict) is refused, and so is a batch
    size below 1."""
    model, ds = toy_model(), toy_dataset(20)
    for fn in (evaluate, predict):
        with pytest.raises(ValueError, match="drops the last batch"):
            fn(model, data.DataLoader(ds, 8, drop_last=True))
        with pytest.raises(ValueError, match="batch_size must be >= 1"):
            fn(model, ds, batch_size=0)
    with pytest.raises(ValueError, match="shuffles"):
        predict(model, data.DataLoader(ds, 8, shuffle=True))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        predict(model, ds.images.astype(np.float32), batch_size=-1)
    shuffled = evaluate(model, data.DataLoader(ds, 8, shuffle=True))  # totals: order is moot
    assert shuffled.accuracy == pytest.approx(evaluate(model, ds).accuracy)


def test_plot_history_writes_a_picture(tmp_path):
    history = [{"epoch": e, "loss": 2 / e, "accuracy": 0.5 + e / 20, "val_loss": 2.2 / e,
                "val_accuracy": 0.45 + e / 20} for e in range(1, 6)]
    path = plot_history(history, tmp_path / "curves.png", title="test")
    with Image.open(path) as img:
        assert img.size == (1000, 400)
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 10  # not blank


def test_epoch_stats_deferred_reads_give_the_same_sums():
    """The GPU trainer keeps each step's loss and hits on the device and reads them
    every few steps: the sums must be those of reading every step."""
    from fastcnn.train import _EpochStats

    rng = np.random.default_rng(3)
    now, later = _EpochStats(), _EpochStats(defer=True)
    for step in range(23):
        n = int(rng.integers(1, 9))
        logits = rng.standard_normal((n, 5)).astype(np.float32)
        y = rng.integers(0, 5, n)
        loss = np.float32(rng.uniform(0, 3))
        now.add(np.asarray(loss), logits, y)
        later.add(np.asarray(loss), logits, y)
        if step % 7 == 0:
            assert later.read() == now.read()
    assert later.read() == now.read() and now.read()[0] > 0
    assert later._pending == []
