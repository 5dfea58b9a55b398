"""Sequential.forward(x, record=False): the recording-free inference path
(fastcnn.nn.inference) gives the recorded forward's output bit for bit, keeps
nothing for a backward pass, and follows every change to the model."""

from collections import OrderedDict

import numpy as np
import pytest

import fastcnn
from fastcnn import models, nn, optim


def _x(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _perturb_batch_norms(model, seed=1):
    """Running statistics and affine parameters away from their defaults."""
    g = np.random.default_rng(seed)
    for layer in model.modules():
        if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)) and layer.track_running_stats:
            c = layer.num_features
            layer.running_mean[...] = g.standard_normal(c)
            layer.running_var[...] = g.uniform(0.2, 3.0, c)
            if layer.affine:
                layer.weight.data[...] = g.uniform(-2, 2, c)
                layer.bias.data[...] = g.standard_normal(c)
    return model


def _assert_same_as_recorded(model, x):
    expected = model.forward(x)
    for _ in range(2):  # the call that builds the plan, then one that uses it
        got = model.forward(x, record=False)
        np.testing.assert_array_equal(got, expected)
    return expected


def _custom_models():
    g = np.random.default_rng(3)
    yield "conv-bn-relu (no pool), relu-pool, same padding", nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, rng=g), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 4, padding="same", rng=g), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 5, rng=g))
    yield "bn-relu-pool on its own, conv-bn without relu, pool 3x3", nn.Sequential(
        nn.Conv2d(3, 16, 3, rng=g), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 1, bias=False, rng=g), nn.BatchNorm2d(16),
        nn.MaxPool2d(3, stride=1, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(16 * 3 * 3, 7, bias=False, rng=g), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(7, 4, rng=g), nn.LogSoftmax(dim=1))
    yield "odd map pooled (floor), strided conv, batch norm without running stats", nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1, rng=g), nn.ReLU(), nn.MaxPool2d(2),
        nn.BatchNorm2d(6, track_running_stats=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 3, rng=g), nn.Softmax(dim=1))
    yield "nested Sequential and BatchNorm1d", nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, rng=g), nn.ReLU()), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 6, rng=g), nn.BatchNorm1d(6), nn.ReLU(),
        nn.Linear(6, 2, rng=g))


@pytest.mark.parametrize("name", ["mnist_cnn", "mnist_cnn_bn", "cifar_cnn"])
@pytest.mark.parametrize("batch", [1, 3])
def test_presets_give_the_recorded_bits(name, batch):
    model = _perturb_batch_norms(models.build(name, seed=0)).eval()
    c, h, _ = model.metadata["input_shape"]
    _assert_same_as_recorded(model, _x((batch, c, h, h)))


@pytest.mark.parametrize("case", list(range(4)))
@pytest.mark.parametrize("batch", [1, 2, 5])
def test_every_fusion_and_fallback_gives_the_recorded_bits(case, batch):
    name, model = list(_custom_models())[case]
    model = _perturb_batch_norms(model).eval()
    _assert_same_as_recorded(model, _x((batch, 3, 9 if "odd" in name else 8,
                                        9 if "odd" in name else 8), seed=batch))


def test_nothing_is_recorded_and_backward_refuses():
    model = models.mnist_cnn(seed=0).eval()
    x = _x((2, 1, 28, 28))
    model.forward(x)
    assert len(model.activations) == len(model)
    model.forward(x, record=False)
    assert len(model.activations) == 0 and model.input is None
    with pytest.raises(RuntimeError, match="record=False"):
        model.backward(np.ones((2, 10), np.float32))
    model.forward(x)  # a recorded forward makes backward available again
    assert model.backward(np.ones((2, 10), np.float32)).shape == x.shape
    # ... and the next record=False call (the plan is built: its fast path)
    # forgets the recording again.
    model.forward(x, record=False)
    assert len(model.activations) == 0 and model.input is None
    with pytest.raises(RuntimeError, match="record=False"):
        model.backward(np.ones((2, 10), np.float32))


def test_the_plan_follows_every_change_to_the_model():
    model = _perturb_batch_norms(models.mnist_cnn_bn(seed=0)).eval()
    x = _x((2, 1, 28, 28))
    _assert_same_as_recorded(model, x)
    # in-place updates (an optimizer step): read on every call
    model.conv1.weight.data *= 0.5
    model.bn2.running_var[...] += 1.0
    _assert_same_as_recorded(model, x)
    # replaced arrays and changed settings
    model.conv2.weight.data = model.conv2.weight.data * 2.0
    _assert_same_as_recorded(model, x)
    model.bn1.running_mean = np.ones(32, np.float32)
    _assert_same_as_recorded(model, x)
    model.bn1.eps = 0.5
    _assert_same_as_recorded(model, x)
    model.conv1.weight.data = model.conv1.weight.data.astype(np.float64)  # converted on use
    _assert_same_as_recorded(model, x)
    model.fc1 = nn.Linear(3136, 128, rng=7)
    _assert_same_as_recorded(model, x)
    model.pool1.stride = (1, 1)  # 27x27, then 26x26 maps: a different model
    model.pool2.stride = (1, 1)
    model.fc1 = nn.Linear(64 * 26 * 26, 128, rng=7)
    _assert_same_as_recorded(model, x)
    # another input shape; a single layer switched to training mode
    _assert_same_as_recorded(model, _x((5, 1, 28, 28)))
    model.dropout.train()
    y = model.forward(x, record=False)
    assert not np.array_equal(y, model.eval().forward(x, record=False))


def test_after_a_training_step_the_plan_uses_the_new_weights():
    model = models.mnist_cnn(seed=0)
    x, labels = _x((4, 1, 28, 28)), np.arange(4)
    before = model.eval().forward(x, record=False)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    loss_fn(model(x), labels)
    model.backward(loss_fn.backward())
    opt.step()
    after = model.eval().forward(x, record=False)
    assert not np.array_equal(before, after)
    np.testing.assert_array_equal(after, model.forward(x))


def test_training_mode_and_partial_runs_do_not_record():
    model = models.mnist_cnn(seed=0)
    x = _x((2, 1, 28, 28))
    offset = int(model.dropout.offset)
    model.train().forward(x, record=False)  # dropout active: its offset moves on
    assert int(model.dropout.offset) == offset + 1 and len(model.activations) == 0
    model.eval()
    hidden = model.forward(x, stop="pool2", record=False)
    np.testing.assert_array_equal(hidden, model.forward(x, stop="pool2"))
    np.testing.assert_array_equal(model.forward(hidden, start="pool2", record=False),
                                  model.forward(x))


def test_inputs_are_converted_and_errors_raised_as_in_a_recorded_forward():
    model = models.mnist_cnn(seed=0).eval()
    x = _x((2, 1, 28, 28))
    expected = model.forward(x)
    np.testing.assert_array_equal(model.forward(x.astype(np.float64), record=False), expected)
    np.testing.assert_array_equal(model.forward(np.asfortranarray(x), record=False), expected)
    np.testing.assert_array_equal(model.forward(x.tolist(), record=False), expected)
    assert model.forward(np.zeros((0, 1, 28, 28), np.float32), record=False).shape == (0, 10)
    for _ in range(2):
        with pytest.raises(ValueError, match="channels"):
            model.forward(_x((2, 3, 28, 28)), record=False)
    with pytest.raises(TypeError):
        model.forward(x.astype(np.complex64), record=False)


def test_same_bits_for_any_thread_count():
    model = _perturb_batch_norms(models.mnist_cnn_bn(seed=0)).eval()
    x = _x((3, 1, 28, 28))
    threads = fastcnn.get_num_threads()
    try:
        fastcnn.set_num_threads(1)
        one = model.forward(x, record=False)
        fastcnn.set_num_threads(2)
        np.testing.assert_array_equal(model.forward(x, record=False), one)
    finally:
        fastcnn.set_num_threads(threads)


def test_a_sample_gives_the_same_bits_alone_and_in_a_batch():
    model = _perturb_batch_norms(models.mnist_cnn_bn(seed=0)).eval()
    x = _x((64, 1, 28, 28))
    batch = model.forward(x, record=False)
    for i in (0, 17, 63):
        np.testing.assert_array_equal(model.forward(x[i:i + 1], record=False), batch[i:i + 1])


def test_evaluate_and_predict_use_it_and_agree_with_the_recorded_forward():
    from fastcnn import train
    from fastcnn.data import Dataset
    model = models.mnist_cnn(seed=0)
    x = _x((6, 1, 28, 28))
    probs = train.predict(model, x, batch_size=4)
    np.testing.assert_array_equal(
        probs, fastcnn.functional.softmax(model.eval().forward(x), dim=1))
    images = np.random.default_rng(0).integers(0, 256, (6, 1, 28, 28), dtype=np.uint8)
    data = Dataset(images, np.arange(6), classes=[str(i) for i in range(10)], mean=[0.3],
                   std=[0.4])
    ev = train.evaluate(model, data, batch_size=4)
    logits = model.forward(fastcnn.functional.normalize(images, [0.3], [0.4]))
    assert ev.accuracy == np.mean(logits.argmax(1) == np.arange(6))


def test_an_ordered_dict_model_with_unknown_layers_runs_their_forward():
    class Double(nn.Module):
        def forward(self, x):
            return x * 2

    model = nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 2, 3, rng=0), double=Double(),
                                      relu=nn.ReLU(), pool=nn.MaxPool2d(2))).eval()
    _assert_same_as_recorded(model, _x((2, 1, 6, 6)))
