"""Modules and init against torch.nn: the same constructor arguments, in torch's
positional order, mean the same thing; the init helpers give torch's numbers.
Skipped when torch is not installed (tests/test_nn.py checks the same without it)."""

import contextlib
import warnings

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


def test_cross_entropy_loss_takes_only_weight_by_position():
    """torch's second and fourth positions are its deprecated size_average and
    reduce: a positional reduction would mean something else there."""
    nn.CrossEntropyLoss([1.0, 2.0])
    with pytest.raises(TypeError):
        nn.CrossEntropyLoss(None, "sum")
    with pytest.raises(TypeError):
        nn.CrossEntropyLoss(None, None, 1)


@pytest.mark.parametrize("shape", [(5,), (3, 5), (2, 3, 4), (2, 3, 4, 5), (2, 3, 2, 2, 2)])
@pytest.mark.parametrize("log", [False, True])
def test_softmax_without_dim_takes_torchs_implicit_dim(shape, log, rng):
    """nn.Softmax() / F.softmax(x), as torch's with dim=None: dim 0 for 1-D and
    3-D input, 1 otherwise (with a warning from 3-D up, where that is not the
    last axis)."""
    x = rng.standard_normal(shape).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    ours = nn.LogSoftmax() if log else nn.Softmax()
    theirs = tnn.LogSoftmax() if log else tnn.Softmax()
    tx = torch.tensor(x, requires_grad=True)
    with pytest.warns(UserWarning) if len(shape) >= 3 else _no_warning():
        y = ours(x)
    with pytest.warns(UserWarning):  # torch warns for every shape
        ty = theirs(tx)
    ty.backward(torch.tensor(g))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-5, atol=1e-6)
    with _no_warning():  # the backward takes the forward's axis without warning again
        dx = ours.backward(g)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-5, atol=1e-6)
    f, fb = (F.log_softmax, F.log_softmax_backward) if log else (F.softmax, F.softmax_backward)
    with pytest.warns(UserWarning) if len(shape) >= 3 else _no_warning():
        np.testing.assert_array_equal(f(x), y)
        np.testing.assert_array_equal(fb(g, y), dx)


@contextlib.contextmanager
def _no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_a_layer_twice_in_a_sequential_is_refused_and_shared_parameters_tie_weights(rng):
    """A layer keeps its last forward for its backward, so torch's weight tying
    by running one layer twice is refused; sharing the Parameter between two
    layers gives torch's gradients, and parameters() lists it once, as torch's."""
    lin = nn.Linear(4, 4, rng=0)
    with pytest.raises(ValueError, match="layer '0'"):
        nn.Sequential(lin, nn.ReLU(), lin)
    with pytest.raises(ValueError, match="cannot run twice"):
        nn.Sequential(lin, nn.Sequential(nn.ReLU(), lin))
    seq = nn.Sequential(lin)
    with pytest.raises(ValueError, match="itself"):
        seq.append(seq)
    a, b = nn.Linear(4, 4, rng=0), nn.Linear(4, 4, rng=1)
    b.weight, b.bias = a.weight, a.bias
    ours = nn.Sequential(a, nn.ReLU(), b)
    tl = tnn.Linear(4, 4)
    theirs = tnn.Sequential(tl, tnn.ReLU(), tl)
    tl.load_state_dict({k: torch.tensor(v) for k, v in a.state_dict().items()})
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters())
    x = rng.standard_normal((3, 4)).astype(np.float32)
    g = rng.standard_normal((3, 4)).astype(np.float32)
    ours(x)
    ours.backward(g)
    theirs(torch.tensor(x)).backward(torch.tensor(g))
    np.testing.assert_allclose(a.weight.grad, tl.weight.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.bias.grad, tl.bias.grad.numpy(), rtol=1e-5, atol=1e-6)
    from fastcnn import optim
    optim.SGD(ours.parameters(), lr=0.1).step()
    torch.optim.SGD(theirs.parameters(), lr=0.1).step()
    np.testing.assert_allclose(b.weight.data, tl.weight.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fill", ["kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                                  "xavier_normal_", "uniform_", "normal_", "zeros_", "ones_"])
def test_init_fills_a_layers_parameter_as_torchs_take_its_weight(fill):
    """init.kaiming_normal_(layer.weight), torch's idiom, fills the Parameter's
    data in place and returns the Parameter."""
    layer = nn.Linear(30, 20, rng=0)
    before = layer.weight.data
    assert getattr(init, fill)(layer.weight) is layer.weight
    assert layer.weight.data is before
    tw = torch.empty(20, 30)
    getattr(tnn.init, fill)(tw)
    w = layer.weight.data
    if fill in ("zeros_", "ones_"):
        np.testing.assert_array_equal(w, tw.numpy())
    else:  # the same distribution: compare the spread
        assert abs(w.std() / tw.std().item() - 1) < 0.25
    with pytest.raises(TypeError, match="array"):
        init.zeros_([1.0, 2.0])


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
