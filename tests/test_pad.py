"""F.pad / pad_backward and Conv2d(padding_mode=): against numpy.pad (the reference
for every mode), the adjoint identity, central differences and a float64 model."""

from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastcnn.functional as F
import reference as ref
from conftest import numerical_grad, randn
from fastcnn import io, nn
from nn_reference import NP_PAD_MODES

MODES = ("constant", "reflect", "replicate", "circular")
NUMPY_MODE = {"constant": "constant", "reflect": "reflect", "replicate": "edge",
              "circular": "wrap"}


def numpy_pad(x, pad, mode, value=0.0):
    """F.pad's result by numpy.pad: pad lists (lo, hi) from the last dimension."""
    widths = [(0, 0)] * x.ndim
    for k in range(len(pad) // 2):
        widths[x.ndim - 1 - k] = (pad[2 * k], pad[2 * k + 1])
    kwargs = {"constant_values": value} if mode == "constant" else {}
    return np.pad(x, widths, mode=NUMPY_MODE[mode], **kwargs)


@st.composite
def pad_cases(draw):
    mode = draw(st.sampled_from(MODES))
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    dims = draw(st.integers(1, len(shape)))
    pad = []
    for k in range(dims):
        n = shape[-1 - k]
        most = {"reflect": n - 1, "circular": n}.get(mode, 4)
        pad += [draw(st.integers(0, most)), draw(st.integers(0, most))]
    return mode, tuple(shape), tuple(pad), draw(st.integers(0, 2 ** 32 - 1))


@given(case=pad_cases())
def test_pad_and_its_adjoint(case):
    """pad equals numpy.pad (bit for bit: it only copies); pad_backward is its adjoint,
    <pad(x), g> == <x, pad_backward(g)>, and equals the sum over every copy of each
    element, counted by padding an index map."""
    mode, shape, pad, seed = case
    rng = np.random.default_rng(seed)
    x = randn(rng, *shape)
    y = F.pad(x, pad, mode, value=0.25)
    np.testing.assert_array_equal(y, numpy_pad(x, pad, mode, 0.25))
    g = randn(rng, *y.shape)
    gx = F.pad_backward(g, shape, pad, mode)
    assert gx.shape == shape and gx.dtype == np.float32
    zero_padded = F.pad(x, pad, mode) if mode != "constant" else F.pad(x, pad, mode, 0.0)
    np.testing.assert_allclose(np.vdot(zero_padded.astype(np.float64), g),
                               np.vdot(x.astype(np.float64), gx), rtol=1e-5, atol=1e-5)
    source = numpy_pad(np.arange(x.size).reshape(shape), pad, mode, -1)
    want = np.zeros(x.size)
    np.add.at(want, source[source >= 0], g[source >= 0].astype(np.float64))
    np.testing.assert_allclose(gx.reshape(-1), want, rtol=1e-6, atol=1e-6)


def test_pad_corners_and_no_padding():
    x = np.arange(6, dtype=np.float32).reshape(1, 2, 3)          # [[0 1 2] [3 4 5]]
    np.testing.assert_array_equal(F.pad(x, (1, 1, 1, 0), "reflect")[0],
                                  [[4, 3, 4, 5, 4], [1, 0, 1, 2, 1], [4, 3, 4, 5, 4]])
    np.testing.assert_array_equal(F.pad(x, (2, 0), "circular")[0], [[1, 2, 0, 1, 2],
                                                                     [4, 5, 3, 4, 5]])
    same = F.pad(x, (0, 0), "reflect")
    np.testing.assert_array_equal(same, x)
    assert same is not x
    np.testing.assert_array_equal(F.pad_backward(x, x.shape, ()), x)


def test_pad_errors_name_the_problem():
    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="mode must be one of"):
        F.pad(x, (1, 1), "symmetric")
    with pytest.raises(TypeError, match="pad must be a tuple of ints"):
        F.pad(x, (1,))
    with pytest.raises(TypeError, match="pad must be a tuple of ints"):
        F.pad(x, (1.0, 1))
    with pytest.raises(ValueError, match="pads 4 dimensions"):
        F.pad(x, (1, 1) * 4)
    with pytest.raises(ValueError, match="non-negative"):
        F.pad(x, (-1, 0))
    with pytest.raises(ValueError, match="reflect padding \\(4, 0\\) must be less than the size 4"):
        F.pad(x, (4, 0), "reflect")
    with pytest.raises(ValueError, match="circular padding \\(0, 5\\) must not exceed"):
        F.pad(x, (0, 5), "circular")
    with pytest.raises(ValueError, match="replicate padding of the empty dimension"):
        F.pad(np.zeros((2, 0), np.float32), (1, 0), "replicate")
    with pytest.raises(ValueError, match="grad_output has shape"):
        F.pad_backward(np.zeros((2, 3, 6), np.float32), (2, 3, 4), (1, 2))


# ---------------------------------------------------------------- Conv2d(padding_mode=)

def conv64(layer, x):
    """The layer's output in float64: numpy.pad by the mode, then a convolution
    without padding (reference.conv2d)."""
    (top, left), (bottom, right) = layer.paddings()
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)),
               mode=NP_PAD_MODES[layer.padding_mode])
    b = None if layer.bias is None else layer.bias.data
    return ref.conv2d(x, layer.weight.data, b, layer.stride, 0, layer.dilation, layer.groups)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular", "zeros"])
@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(3, 2), padding=(2, 1), stride=2),
    dict(kernel_size=4, padding="same"),                       # 1 before, 2 after
    dict(kernel_size=3, padding="same", dilation=2, groups=2),
    dict(kernel_size=3, padding="valid"),
])
def test_conv2d_padding_modes(mode, kwargs, rng):
    layer = nn.Conv2d(4, 6, padding_mode=mode, rng=1, **kwargs)
    x = randn(rng, 2, 4, 7, 6)
    y = layer.forward(x)
    want = conv64(layer, x)
    assert y.shape == want.shape == layer.output_shape(x.shape)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    g = randn(rng, *y.shape)
    dx = layer.backward(g)
    assert dx.shape == x.shape
    np.testing.assert_allclose(
        dx, numerical_grad(lambda v: np.sum(conv64(layer, v) * g), x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        layer.weight.grad,
        numerical_grad(lambda w: np.sum(ref.conv2d(
            np.pad(x.astype(np.float64), ((0, 0), (0, 0)) + tuple(zip(*layer.paddings())),
                   mode=NP_PAD_MODES[mode]), w, layer.bias.data, layer.stride, 0,
            layer.dilation, layer.groups) * g), layer.weight.data), rtol=1e-4, atol=1e-4)
    assert ("padding_mode" in repr(layer)) == (mode != "zeros")


def padded_model():
    rng = np.random.default_rng(0)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect", rng=rng),
        bn1=nn.BatchNorm2d(4), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(4, 6, 3, padding=2, dilation=2, padding_mode="circular", rng=rng),
        relu2=nn.ReLU(), flatten=nn.Flatten(), fc=nn.Linear(6 * 4 * 4, 3, rng=rng)))


def test_model_with_padding_modes_trains_infers_and_saves(tmp_path, rng):
    """The fused training paths (ReLU + pool, batch norm and the first conv from the
    pool's codes) and the inference plan give the plain layer-by-layer results; the
    mode survives save / load."""
    x, y = randn(rng, 5, 1, 8, 8), rng.integers(0, 3, 5)
    results = []
    for fuse in (False, True):
        model = padded_model()
        model.fuse = fuse
        loss_fn = nn.CrossEntropyLoss()
        loss = loss_fn(model(x), y)
        model.backward(loss_fn.backward(), input_grad=False)
        results.append([float(loss)] + [p.grad for p in model.parameters()])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    model.eval()
    np.testing.assert_allclose(model.forward(x, record=False), model.forward(x), rtol=1e-5,
                               atol=1e-6)
    loaded = io.load(io.save(model, tmp_path / "m.npz"))
    assert loaded.conv1.padding_mode == "reflect" and loaded.conv2.padding_mode == "circular"
    np.testing.assert_array_equal(loaded.eval()(x), model(x))


def test_padding_mode_errors():
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        nn.Conv2d(1, 2, 3, padding=1, padding_mode="symmetric")
    layer = nn.Conv2d(1, 2, 3, padding=3, padding_mode="reflect")
    with pytest.raises(ValueError, match="reflect padding"):
        layer(np.zeros((1, 1, 3, 3), np.float32))
