"""conv2d's direct path for layers with few taps (c r s <= 27, stride 1: the
first layers) against the float64 reference, and the invariants every
conv2d keeps. The path is taken on CPUs with AVX-512; elsewhere these tests
check the im2col path."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastcnn
import fastcnn.functional as F
import reference as ref
from conftest import assert_close, randn


def check(x, w, b, padding, rng):
    y = F.conv2d(x, w, b, padding=padding)
    want = ref.conv2d(x, w, b, padding=padding)
    taps = w.shape[1] * w.shape[2] * w.shape[3]
    assert_close(y, want, red=taps, err_msg="forward")
    gy = randn(rng, *want.shape)
    gx, gw, gb = F.conv2d_backward(gy, x, w, b, padding=padding)
    rgx, rgw, rgb = ref.conv2d_backward(gy, x, w, b, padding=padding)
    red = x.shape[0] * want.shape[2] * want.shape[3]
    assert_close(gx, rgx, red=w.shape[0] * w.shape[2] * w.shape[3], err_msg="grad_input")
    assert_close(gw, rgw, red=red, err_msg="grad_weight")
    if b is not None:
        assert_close(gb, rgb, red=red, err_msg="grad_bias")


@st.composite
def first_layers(draw):
    c = draw(st.integers(1, 3))
    r = draw(st.integers(1, 7))
    s = draw(st.integers(1, 7))
    if c * r * s > 27 or c * r * s < 4:
        c, r, s = 1, 3, 3
    p = draw(st.integers(0, 3))
    h = draw(st.integers(max(1, r - 2 * p), 40))
    w = draw(st.integers(max(1, s - 2 * p), 40))
    return dict(n=draw(st.integers(1, 3)), c=c, k=draw(st.integers(1, 20)), r=r, s=s, h=h, w=w,
                p=p, bias=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)))


@given(first_layers())
def test_direct_random_layers(cfg):
    rng = np.random.default_rng(cfg["seed"])
    x = randn(rng, cfg["n"], cfg["c"], cfg["h"], cfg["w"])
    w = randn(rng, cfg["k"], cfg["c"], cfg["r"], cfg["s"])
    b = randn(rng, cfg["k"]) if cfg["bias"] else None
    check(x, w, b, cfg["p"], rng)


@pytest.mark.parametrize("xs, ws, padding", [
    ((3, 1, 28, 28), (32, 1, 3, 3), 1),    # MNIST conv1
    ((2, 3, 32, 32), (64, 3, 3, 3), 1),    # CIFAR conv1: 27 taps
    ((2, 1, 28, 28), (6, 1, 5, 5), 0),     # LeNet conv1
    ((1, 1, 70, 9), (4, 1, 7, 1), (3, 0)),  # tall kernel, narrow image
    ((2, 2, 5, 33), (3, 2, 2, 7), 2),      # 33 wide: two full blocks and one lane
])
def test_direct_shapes(xs, ws, padding, rng):
    check(randn(rng, *xs), randn(rng, *ws), randn(rng, ws[0]), padding, rng)


def test_direct_weight_grad_ignores_inputs_no_output_reads():
    """An input column that only the lanes past a row's outputs read for some
    tap (here the last column, for tap column 0) must not reach that tap's
    gradient: NaN there leaves it finite."""
    x = np.ones((1, 1, 6, 28), np.float32)
    x[..., -1] = np.nan
    w = np.ones((2, 1, 3, 3), np.float32)
    gy = np.ones((1, 2, 4, 26), np.float32)
    gw = F.conv2d_backward(gy, x, w, None, output_mask=(False, True, False))[1]
    assert np.isfinite(gw[..., 0]).all() and np.isfinite(gw[..., 1]).all()
    assert np.isnan(gw[..., 2]).all()
    y = F.conv2d(x, w)
    assert np.isfinite(y[..., :-1]).all() and np.isnan(y[..., -1]).all()


def test_direct_infinite_input_gives_no_spurious_nan():
    """Unused taps of the padded register set are zero, never 0 * inf."""
    x = np.zeros((1, 1, 6, 6), np.float32)
    x[0, 0, 0, 0] = np.inf
    y = F.conv2d(x, np.ones((3, 1, 2, 2), np.float32))  # 4 taps, padded to 9
    assert y[0, 0, 0, 0] == np.inf
    assert np.isfinite(y[0, :, 1:, 1:]).all() and np.isfinite(y[0, :, :, 1:]).all()


def test_direct_bitwise_across_threads_and_batches(rng):
    x = randn(rng, 13, 3, 20, 21)
    w = randn(rng, 16, 3, 3, 3)
    b = randn(rng, 16)
    gy = randn(rng, 13, 16, 20, 21)
    previous = fastcnn.get_num_threads()
    try:
        fastcnn.set_num_threads(1)
        one = [F.conv2d(x, w, b, padding=1), *F.conv2d_backward(gy, x, w, b, padding=1)]
        fastcnn.set_num_threads(3)
        three = [F.conv2d(x, w, b, padding=1), *F.conv2d_backward(gy, x, w, b, padding=1)]
    finally:
        fastcnn.set_num_threads(previous)
    for a, c in zip(one, three):
        np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(F.conv2d(x[4:5], w, b, padding=1), one[0][4:5])
