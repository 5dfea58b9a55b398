"""Modules and init against torch.nn: the same constructor arguments, in torch's
positional order, mean the same thing; the init helpers give torch's numbers.
Skipped when torch is not installed (tests/test_nn.py checks the same without it)."""

import math

import numpy as np
import pytest

import fastcnn.functional as F
from fastcnn import nn
from fastcnn.nn import init

torch = pytest.importorskip("torch")
tnn = torch.nn


def _grad(layer, x, g):
    layer(x)
    return layer.backward(g)


def test_positional_arguments_mean_what_they_mean_in_torch(rng):
    x = rng.standard_normal((2, 3, 7, 7)).astype(np.float32)
    g = rng.standard_normal((2, 3, 7, 7)).astype(np.float32)
    tx = torch.tensor(x, requires_grad=True)
    tnn.ReLU(True)(tx.clone()).backward(torch.tensor(g))           # inplace=True
    np.testing.assert_array_equal(_grad(nn.ReLU(True), x, g), tx.grad.numpy())
    # MaxPool2d(kernel, stride, padding, dilation, return_indices, ceil_mode)
    ours, theirs = nn.MaxPool2d(3, 2, 1, 1, True, True), tnn.MaxPool2d(3, 2, 1, 1, True, True)
    (out, idx), (tout, tidx) = ours(x), theirs(torch.tensor(x))
    np.testing.assert_array_equal(out, tout.numpy())
    np.testing.assert_array_equal(idx, tidx.numpy())
    assert nn.MaxPool2d(3, 2, 1, 1, False, True).output_shape(x.shape) == tuple(
        tnn.MaxPool2d(3, 2, 1, 1, False, True)(torch.tensor(x)).shape)
    drop = nn.Dropout(0.3, True).eval()                             # inplace=True, not a seed
    np.testing.assert_array_equal(drop(x), x)
    # Conv2d(..., bias, padding_mode, device) and Linear(in, out, bias, device)
    conv = nn.Conv2d(3, 4, 3, 1, 1, 1, 1, False, "reflect", "cpu")
    tconv = tnn.Conv2d(3, 4, 3, 1, 1, 1, 1, False, "reflect", "cpu")
    conv.load_state_dict(tconv.state_dict())
    np.testing.assert_allclose(conv(x), tconv(torch.tensor(x)).detach().numpy(), rtol=1e-5,
                               atol=1e-5)
    assert nn.Linear(5, 2, False, "cpu").bias is None


def test_cross_entropy_loss_state_dict_as_torch():
    for weight in (None, [0.5, 2.0, 1.0]):
        ours = nn.CrossEntropyLoss(weight)
        theirs = tnn.CrossEntropyLoss(None if weight is None else torch.tensor(weight))
        assert list(ours.state_dict()) == list(theirs.state_dict())
        ours.load_state_dict(theirs.state_dict())
        ours.load_state_dict(ours.state_dict())


@pytest.mark.parametrize("name", ["linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
                                  "conv_transpose2d", "conv_transpose3d", "sigmoid", "tanh",
                                  "relu", "leaky_relu", "selu"])
def test_calculate_gain_vs_torch(name):
    assert init.calculate_gain(name) == pytest.approx(tnn.init.calculate_gain(name), rel=1e-15)
    if name == "leaky_relu":
        for slope in (0, 0.2, 3, -0.5):
            assert init.calculate_gain(name, slope) == pytest.approx(
                tnn.init.calculate_gain(name, slope), rel=1e-15)
        for bad in (True, "0.1"):
            with pytest.raises(ValueError):
                tnn.init.calculate_gain(name, bad)
            with pytest.raises(ValueError, match="negative_slope"):
                init.calculate_gain(name, bad)


@pytest.mark.parametrize("shape", [(4, 3), (8, 3, 5, 5), (2, 6, 3), (5, 1, 2, 2, 2)])
def test_fans_vs_torch(shape):
    t = torch.empty(shape)
    want = tnn.init._calculate_fan_in_and_fan_out(t)
    a = np.empty(shape, np.float32)
    assert init.calculate_fan_in_and_fan_out(a) == want
    assert init.calculate_fan_in_and_fan_out(shape) == want
    assert init.calculate_fan_in_and_fan_out(nn.Parameter(a)) == want
