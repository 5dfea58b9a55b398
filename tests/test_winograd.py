"""conv2d's Winograd F(2x2, 3x3) path (3x3, stride 1, >= 16 channels) against
the float64 reference, against the im2col + GEMM path, and for the
invariants every conv2d keeps: bitwise the same for any thread count, and a
sample's output and input gradient independent of the rest of its batch.

The path is taken on CPUs with AVX-512 (the GEMM's AVX-512 kernel); elsewhere
these tests still run and check the im2col path.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastcnn
import fastcnn.functional as F
import reference as ref
from conftest import assert_close, randn


@pytest.fixture(autouse=True)
def _winograd_on():
    previous = fastcnn.get_conv_winograd()
    fastcnn.set_conv_winograd(True)
    yield
    fastcnn.set_conv_winograd(previous)


def check(x, w, b, padding, rng):
    k, c = w.shape[:2]
    y = F.conv2d(x, w, b, padding=padding)
    want = ref.conv2d(x, w, b, padding=padding)
    n = x.shape[0]
    assert_close(y, want, red=9 * c, err_msg="forward")
    gy = randn(rng, *want.shape)
    gx, gw, gb = F.conv2d_backward(gy, x, w, b, padding=padding)
    rgx, rgw, rgb = ref.conv2d_backward(gy, x, w, b, padding=padding)
    assert_close(gx, rgx, red=9 * k, err_msg="grad_input")
    assert_close(gw, rgw, red=n * want.shape[2] * want.shape[3], err_msg="grad_weight")
    if b is not None:
        assert_close(gb, rgb, red=n * want.shape[2] * want.shape[3], err_msg="grad_bias")


@st.composite
def layers(draw):
    c = draw(st.sampled_from([16, 17, 24, 32, 33, 48]))
    k = draw(st.sampled_from([16, 19, 32, 40]))
    p = draw(st.integers(0, 3))
    # any output from 1 x 1 up: 1-4 tiles a row (4 rows to a vector), 5-8
    # (2 rows), 9-16 and past 16 (column groups)
    h = draw(st.integers(max(1, 3 - 2 * p), 40))
    w = draw(st.integers(max(1, 3 - 2 * p), 40))
    return dict(n=draw(st.integers(1, 3)), c=c, k=k, h=h, w=w, p=p, bias=draw(st.booleans()),
                seed=draw(st.integers(0, 2**32 - 1)))


@given(layers())
def test_winograd_random_layers(cfg):
    rng = np.random.default_rng(cfg["seed"])
    x = randn(rng, cfg["n"], cfg["c"], cfg["h"], cfg["w"])
    w = randn(rng, cfg["k"], cfg["c"], 3, 3, scale=0.2)
    b = randn(rng, cfg["k"]) if cfg["bias"] else None
    check(x, w, b, cfg["p"], rng)


@pytest.mark.parametrize("shape, k, padding", [
    ((2, 32, 14, 14), 64, 1),     # the MNIST CNN's second layer
    ((1, 32, 70, 66), 16, 1),     # a large image: chunks of tile rows, in order
    ((2, 40, 37, 90), 24, 2),     # rows of 46 tiles: three column groups
    ((1, 32, 9, 32), 16, 1),      # 16 tiles a row: a full group, spilling past it
    ((2, 32, 6, 64), 16, 1),      # two full groups
    ((2, 32, 11, 16), 24, 1),     # 8 tiles a row: two rows a vector, 18 columns
    ((3, 16, 3, 3), 16, 0),       # one tile
    ((2, 32, 1, 1), 32, 1),       # a 1x1 image, all padding around it
    ((1, 32, 2, 9), 32, 3),       # padding wider than the image
    ((4, 64, 7, 7), 64, 1),       # 7x7: the backward keeps im2col (tiles overhang)
])
def test_winograd_shapes(shape, k, padding, rng):
    x = randn(rng, *shape)
    w = randn(rng, k, shape[1], 3, 3, scale=0.2)
    check(x, w, randn(rng, k), padding, rng)


def test_winograd_matches_gemm_path(rng):
    x = randn(rng, 5, 32, 14, 14)
    w = randn(rng, 48, 32, 3, 3, scale=0.2)
    b = randn(rng, 48)
    gy = randn(rng, 5, 48, 14, 14)
    wino = [F.conv2d(x, w, b, padding=1), *F.conv2d_backward(gy, x, w, b, padding=1)]
    fastcnn.set_conv_winograd(False)
    assert fastcnn.get_conv_winograd() is False
    gemm = [F.conv2d(x, w, b, padding=1), *F.conv2d_backward(gy, x, w, b, padding=1)]
    for got, want in zip(wino, gemm):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    if fastcnn._backend._cpu.gemm_kernel() == "avx512":  # the Winograd path was taken
        assert not np.array_equal(wino[0], gemm[0])
        assert not np.array_equal(wino[1], gemm[1])


def _all_results(x, w, b, gy, padding=1):
    return [F.conv2d(x, w, b, padding=padding), *F.conv2d_backward(gy, x, w, b, padding=padding)]


@pytest.mark.parametrize("shape", [(9, 32, 14, 14), (1, 32, 14, 14), (2, 32, 64, 40)])
def test_winograd_bitwise_across_thread_counts(shape, rng):
    x = randn(rng, *shape)
    w = randn(rng, 24, shape[1], 3, 3, scale=0.2)
    b = randn(rng, 24)
    gy = randn(rng, shape[0], 24, shape[2], shape[3])
    previous = fastcnn.get_num_threads()
    try:
        fastcnn.set_num_threads(1)
        one = _all_results(x, w, b, gy)
        fastcnn.set_num_threads(3)
        three = _all_results(x, w, b, gy)
    finally:
        fastcnn.set_num_threads(previous)
    for a, c in zip(one, three):
        np.testing.assert_array_equal(a, c)


def test_winograd_sample_independent_of_batch(rng):
    x = randn(rng, 11, 32, 16, 16)
    w = randn(rng, 32, 32, 3, 3, scale=0.2)
    gy = randn(rng, 11, 32, 16, 16)
    y_all = F.conv2d(x, w, padding=1)
    gx_all = F.conv2d_backward(gy, x, w, padding=1)[0]
    for i in (0, 5, 10):
        np.testing.assert_array_equal(F.conv2d(x[i:i + 1], w, padding=1), y_all[i:i + 1])
        np.testing.assert_array_equal(
            F.conv2d_backward(gy[i:i + 1], x[i:i + 1], w, padding=1)[0], gx_all[i:i + 1])


def test_winograd_output_mask(rng):
    """Only the gradients asked for are computed, and each alone is right."""
    x = randn(rng, 2, 32, 10, 12)
    w = randn(rng, 16, 32, 3, 3, scale=0.2)
    gy = randn(rng, 2, 16, 10, 12)
    rgx, rgw, _ = ref.conv2d_backward(gy, x, w, None, padding=1)
    gx, gw, _ = F.conv2d_backward(gy, x, w, None, padding=1, output_mask=(True, False, False))
    assert gw is None
    assert_close(gx, rgx, red=9 * 16)
    gx, gw, _ = F.conv2d_backward(gy, x, w, None, padding=1, output_mask=(False, True, False))
    assert gx is None
    assert_close(gw, rgw, red=2 * 120)


def test_winograd_nan_propagates(rng):
    x = randn(rng, 1, 16, 8, 8)
    x[0, 3, 4, 4] = np.nan
    y = F.conv2d(x, randn(rng, 16, 16, 3, 3), padding=1)
    assert np.isnan(y[0, :, 3:6, 3:6]).all()
    assert np.isfinite(y[0, :, :2, :]).all()


def test_set_conv_winograd_rejects_non_bool():
    with pytest.raises(TypeError, match="enabled must be a bool"):
        fastcnn.set_conv_winograd(1)


def test_transformed_weights_follow_changes_in_place(rng):
    """The transformed weights are kept between calls and found by content:
    weights changed in place (same array, one float, first or last), six
    layers of one shape taking turns (more than the cache holds), and the
    backward's transposed layout after the forward's all give the fresh
    result."""
    x = randn(rng, 2, 32, 9, 9)
    layers = [randn(rng, 24, 32, 3, 3) for _ in range(6)]
    for _ in range(2):
        for w in layers:
            assert_close(F.conv2d(x, w, padding=1), ref.conv2d(x, w, padding=1), red=9 * 32)
    w = layers[0]
    gy = randn(rng, 2, 24, 9, 9)
    for where in ((0, 0, 0, 0), (23, 31, 2, 2), (11, 7, 1, 0)):
        w[where] += 0.5
        assert_close(F.conv2d(x, w, padding=1), ref.conv2d(x, w, padding=1), red=9 * 32)
        gx, _, _ = F.conv2d_backward(gy, x, w, None, padding=1)
        assert_close(gx, ref.conv2d_backward(gy, x, w, None, padding=1)[0], red=9 * 24)
