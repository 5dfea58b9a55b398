"""max_pool2d / max_pool2d_backward against the explicit-window reference."""

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import fastcnn.functional as F
from fastcnn import nn
import reference as ref
from conftest import randn


@st.composite
def pool_configs(draw):
    square = draw(st.booleans())
    kh = draw(st.integers(1, 4))
    kw = kh if square else draw(st.integers(1, 4))
    kernel = kh if square and draw(st.booleans()) else (kh, kw)
    stride = draw(st.one_of(
        st.none(), st.integers(1, 4), st.tuples(st.integers(1, 4), st.integers(1, 4))))
    if draw(st.booleans()) and kh == kw:
        padding = draw(st.integers(0, kh // 2))
    else:
        padding = (draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2)))
    dilation = draw(st.one_of(st.integers(1, 3),
                              st.tuples(st.integers(1, 3), st.integers(1, 3))))
    ceil_mode = draw(st.booleans())
    ph, pw = ref.pair(padding)
    dh, dw = ref.pair(dilation)
    h = max(1, dh * (kh - 1) + 1 - 2 * ph) + draw(st.integers(0, 7))
    w = max(1, dw * (kw - 1) + 1 - 2 * pw) + draw(st.integers(0, 7))
    kw_args = dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation,
                   ceil_mode=ceil_mode)
    # windows lying wholly in the padding (possible only with dilation) are excluded:
    # their output is unspecified (torch returns -inf with an out-of-range index)
    assume(not ref.max_pool_has_empty_window(h, w, **kw_args))
    unbatched = draw(st.integers(0, 4)) == 0
    c = draw(st.integers(1, 3))
    shape = (c, h, w) if unbatched else (draw(st.integers(1, 2)), c, h, w)
    data = draw(st.sampled_from(["normal", "ties", "constant"]))
    return shape, kw_args, data, draw(st.integers(0, 2 ** 32 - 1))


def make_input(shape, data, rng):
    if data == "normal":
        return randn(rng, *shape)
    if data == "ties":
        return rng.integers(0, 3, shape).astype(np.float32)
    return np.full(shape, -2.5, dtype=np.float32)


def check_pool(x, kw, rng):
    want, want_idx = ref.max_pool2d(x, **kw)
    out = F.max_pool2d(x, **kw)
    assert out.dtype == np.float32 and out.shape == want.shape
    np.testing.assert_array_equal(out, want)
    out2, idx = F.max_pool2d(x, **kw, return_indices=True)
    np.testing.assert_array_equal(out2, want)
    assert idx.dtype == np.int64, idx.dtype
    np.testing.assert_array_equal(idx, want_idx)
    go = randn(rng, *want.shape)
    rgx = ref.max_pool2d_backward(go, x, **kw)
    gx = F.max_pool2d_backward(go, x, **kw)
    assert gx.dtype == np.float32 and gx.shape == x.shape
    np.testing.assert_allclose(gx, rgx, rtol=1e-6, atol=1e-6)
    gx_idx = F.max_pool2d_backward(go, x, **kw, indices=idx)
    np.testing.assert_allclose(gx_idx, rgx, rtol=1e-6, atol=1e-6)


@given(pool_configs())
def test_max_pool2d_random(cfg):
    shape, kw, data, seed = cfg
    rng = np.random.default_rng(seed)
    check_pool(make_input(shape, data, rng), kw, rng)


@pytest.mark.parametrize("shape, kw", [
    ((8, 16, 20, 20), dict(kernel_size=2)),
    ((2, 3, 28, 28), dict(kernel_size=2, stride=2)),
    ((2, 3, 7, 7), dict(kernel_size=3, stride=2, padding=1)),
    ((2, 3, 7, 7), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ((1, 2, 6, 6), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ((1, 2, 5, 5), dict(kernel_size=2, stride=2, padding=1, ceil_mode=True)),  # last dropped
    ((1, 2, 5, 8), dict(kernel_size=2, ceil_mode=True)),
    ((2, 2, 9, 7), dict(kernel_size=(3, 2), stride=(1, 3), padding=(1, 0))),
    ((1, 1, 9, 9), dict(kernel_size=3, stride=1, dilation=2)),
    ((1, 1, 10, 11), dict(kernel_size=(2, 3), stride=(3, 1), padding=(1, 1),
                          dilation=(3, 2), ceil_mode=True)),
    ((2, 3, 9, 10), dict(kernel_size=3, stride=1, padding=1)),
    ((2, 3, 9, 10), dict(kernel_size=3, stride=1)),
    ((2, 3, 11, 13), dict(kernel_size=3, stride=2)),
    ((2, 3, 11, 13), dict(kernel_size=2, stride=2, padding=1, ceil_mode=True)),
    ((2, 3, 5, 5), dict(kernel_size=5)),                         # one window
    ((2, 3, 5, 5), dict(kernel_size=1)),                         # identity
    ((2, 3, 6, 6), dict(kernel_size=1, stride=2)),               # stride > kernel
    ((2, 3, 8, 9), dict(kernel_size=2, stride=3)),               # stride > kernel
    ((3, 9, 9), dict(kernel_size=3, stride=2)),                  # unbatched
    ((2, 1, 1, 1), dict(kernel_size=1)),
    # ceil mode: a window may run past the input, even one longer than it (torch's rule)
    ((1, 2, 2, 3), dict(kernel_size=3, stride=3, ceil_mode=True)),
    ((2, 1, 2, 3), dict(kernel_size=(1, 2), stride=2, dilation=(1, 3), ceil_mode=True)),
    ((1, 1, 4, 1), dict(kernel_size=(2, 3), stride=(2, 4), padding=(1, 1), ceil_mode=True)),
])
def test_max_pool2d_cases(shape, kw, rng):
    check_pool(randn(rng, *shape), kw, rng)
    check_pool(rng.integers(0, 2, shape).astype(np.float32), kw, rng)


def test_max_pool2d_ceil_mode_needs_one_window(rng):
    """Floor mode needs the (dilated) kernel inside the padded input; ceil mode one
    window starting inside it."""
    x = randn(rng, 1, 1, 2, 3)
    with pytest.raises(ValueError, match="larger than the padded input"):
        F.max_pool2d(x, 3, 3)
    with pytest.raises(ValueError, match="larger than the padded input"):
        F.max_pool2d(x, 3, 1, ceil_mode=True)     # room -1, stride 1: no window
    layer = nn.MaxPool2d(3, 3, ceil_mode=True)
    assert layer.output_shape((1, 1, 2, 3)) == (1, 1, 1, 1)
    np.testing.assert_array_equal(layer(x), x.max().reshape(1, 1, 1, 1))
    with pytest.raises(ValueError, match="smaller than the kernel extent"):
        nn.MaxPool2d(3, 3).output_shape((1, 1, 2, 3))


def test_max_pool2d_default_stride_is_kernel(rng):
    x = randn(rng, 2, 3, 9, 8)
    np.testing.assert_array_equal(F.max_pool2d(x, 3), F.max_pool2d(x, 3, stride=3))
    np.testing.assert_array_equal(F.max_pool2d(x, (3, 2)), F.max_pool2d(x, (3, 2), (3, 2)))


def test_max_pool2d_ties_pick_first_maximum():
    x = np.zeros((1, 1, 4, 4), dtype=np.float32)
    x[0, 0, 1, 1] = x[0, 0, 1, 0] = x[0, 0, 0, 1] = 1.0   # window (0,0): first max at (0,1)
    x[0, 0, 2:, 2:] = 7.0                                 # window (1,1): all equal
    out, idx = F.max_pool2d(x, 2, return_indices=True)
    np.testing.assert_array_equal(out[0, 0], [[1, 0], [0, 7]])
    np.testing.assert_array_equal(idx[0, 0], [[1, 2], [8, 10]])
    go = np.ones((1, 1, 2, 2), dtype=np.float32)
    gx = F.max_pool2d_backward(go, x, 2)
    want = np.zeros((4, 4), dtype=np.float32)
    want[0, 1] = want[0, 2] = want[2, 0] = want[2, 2] = 1
    np.testing.assert_array_equal(gx[0, 0], want)


def test_max_pool2d_padding_never_selected():
    """All-negative input with padding: -inf padding must never win."""
    x = -np.arange(1, 26, dtype=np.float32).reshape(1, 1, 5, 5)
    out, idx = F.max_pool2d(x, 3, stride=2, padding=1, return_indices=True)
    want, want_idx = ref.max_pool2d(x, 3, stride=2, padding=1)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(idx, want_idx)
    assert np.isfinite(out).all()
    # -inf inputs: the maximum is -inf and the index is the window's first in-bounds element
    x = np.full((1, 1, 4, 4), -np.inf, dtype=np.float32)
    out, idx = F.max_pool2d(x, 3, stride=2, padding=1, return_indices=True)
    assert np.all(out == -np.inf)
    np.testing.assert_array_equal(idx, ref.max_pool2d(x, 3, stride=2, padding=1)[1])


def test_max_pool2d_nan_propagates():
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    x[0, 0, 0, 0] = np.nan      # window (0,0): NaN is not the last element
    x[0, 0, 3, 3] = np.nan      # window (1,1): NaN is the last element
    out, idx = F.max_pool2d(x, 2, return_indices=True)
    assert np.isnan(out[0, 0, 0, 0]) and np.isnan(out[0, 0, 1, 1])
    np.testing.assert_array_equal(out[0, 0, 0, 1], 7)
    np.testing.assert_array_equal(out[0, 0, 1, 0], 13)
    np.testing.assert_array_equal(idx[0, 0], [[0, 7], [13, 15]])
    gx = F.max_pool2d_backward(np.ones((1, 1, 2, 2), np.float32), x, 2)
    assert gx[0, 0, 0, 0] == 1 and gx[0, 0, 3, 3] == 1
    # overlapping windows (stride 1): exactly the windows holding a NaN return NaN
    out = F.max_pool2d(x, 3, stride=1)
    np.testing.assert_array_equal(np.isnan(out[0, 0]), [[True, False], [False, True]])
    np.testing.assert_array_equal(out[0, 0, 0, 1], 11)


def test_max_pool2d_backward_accumulates_overlaps():
    x = np.zeros((1, 1, 3, 3), dtype=np.float32)
    x[0, 0, 1, 1] = 5.0                 # the max of all four 2x2 windows (stride 1)
    go = np.array([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=np.float32)
    gx = F.max_pool2d_backward(go, x, 2, stride=1)
    want = np.zeros((1, 1, 3, 3), dtype=np.float32)
    want[0, 0, 1, 1] = 10.0
    np.testing.assert_array_equal(gx, want)


def test_max_pool2d_backward_uses_given_indices(rng):
    """With indices given, the gradient is routed by them (not recomputed)."""
    x = randn(rng, 1, 2, 4, 4)
    go = randn(rng, 1, 2, 2, 2)
    idx = np.zeros((1, 2, 2, 2), dtype=np.int64)     # everything to element 0
    gx = F.max_pool2d_backward(go, x, 2, indices=idx)
    want = np.zeros_like(x)
    want[0, :, 0, 0] = go[0].sum(axis=(1, 2))
    np.testing.assert_allclose(gx, want, rtol=1e-6, atol=1e-6)


def test_max_pool2d_does_not_modify_inputs(rng):
    x = randn(rng, 2, 3, 6, 6)
    copy = x.copy()
    out = F.max_pool2d(x, 2)
    go = randn(rng, *out.shape)
    go_copy = go.copy()
    F.max_pool2d_backward(go, x, 2)
    np.testing.assert_array_equal(x, copy)
    np.testing.assert_array_equal(go, go_copy)


def test_max_pool2d_window_wholly_in_padding():
    """With dilation, a window can hold only padding taps: H = W = 2, k = 2, p = 1,
    d = 3 puts the taps at -1 and 2.  torch returns -inf (and drops the gradient);
    raising a ValueError would also be acceptable.  Reading another plane's
    values (or memory past the array) is not."""
    x = np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2)
    kw = dict(kernel_size=2, stride=1, padding=1, dilation=3)
    try:
        out = F.max_pool2d(x, **kw)
    except ValueError as e:
        assert any(name in str(e) for name in ("padding", "dilation", "kernel_size", "input"))
        return
    np.testing.assert_array_equal(out, np.full((1, 2, 1, 1), -np.inf, np.float32))
    gx = F.max_pool2d_backward(np.ones((1, 2, 1, 1), np.float32), x, **kw)
    np.testing.assert_array_equal(gx, np.zeros_like(x))


@pytest.mark.parametrize("kernel, stride", [(2, 2), (3, 2), (3, 1)])
@pytest.mark.parametrize("w", [2, 17, 33, 34, 70])
def test_max_pool2d_wide_rows_with_ties_and_nans(kernel, stride, w, rng):
    """Rows wider than one SIMD step of the interior kernels, and their tails;
    ties (first maximum wins) and NaNs (a NaN wins, the last one) included."""
    x = rng.integers(0, 3, (2, 3, 5, w)).astype(np.float32)
    x[rng.random(x.shape) < 0.05] = np.nan
    check_pool(x, dict(kernel_size=kernel, stride=stride, padding=1 if kernel == 3 else 0), rng)


@given(pool_configs())
def test_relu_max_pool2d_equals_relu_then_pool(cfg):
    """The fused op: the same values as max_pool2d(relu(x)) and the same input
    gradient as relu_backward(max_pool2d_backward(g, relu(x)), x), bit for bit,
    with or without indices (ties, all-negative windows and NaN included)."""
    shape, kw, data, seed = cfg
    rng = np.random.default_rng(seed)
    x = make_input(shape, data, rng) - (1.0 if data == "ties" else 0.0)
    if data == "normal" and x.size > 2:
        x.reshape(-1)[rng.integers(0, x.size)] = np.nan
    a = F.relu(x)
    want = F.max_pool2d(a, **kw)
    out, idx = F.relu_max_pool2d(x, **kw, return_indices=True)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(F.relu_max_pool2d(x, **kw), want)
    go = randn(rng, *want.shape)
    want_dx = F.relu_backward(F.max_pool2d_backward(go, a, **kw), x)
    np.testing.assert_array_equal(F.relu_max_pool2d_backward(go, x, **kw), want_dx)
    np.testing.assert_array_equal(F.relu_max_pool2d_backward(go, x, **kw, indices=idx), want_dx)


@pytest.mark.parametrize("kw", [  # on 2 x 8 planes: rows of windows with no tap inside
    dict(kernel_size=(2, 3), padding=(1, 1), dilation=(3, 3), ceil_mode=True),
    dict(kernel_size=2, stride=1, padding=1, dilation=3),
    dict(kernel_size=(2, 2), stride=(1, 2), padding=(1, 0), dilation=(3, 1))])
def test_relu_max_pool2d_window_wholly_in_the_padding(kw, rng):
    """A window with no tap inside the input is -inf (index -1) in max_pool2d(relu(x)):
    the fused op gives that too, not relu(-inf) = 0, so that a model's fused
    training forward equals its unfused one; such a window takes no gradient."""
    x = randn(rng, 2, 3, 2, 8)
    want = F.max_pool2d(F.relu(x), **kw)
    assert np.isneginf(want).any()
    out, idx = F.relu_max_pool2d(x, **kw, return_indices=True)
    np.testing.assert_array_equal(out, want)
    assert (idx[np.isneginf(want)] == -1).all()
    go = randn(rng, *want.shape)
    want_dx = F.relu_backward(F.max_pool2d_backward(go, F.relu(x), **kw), x)
    np.testing.assert_array_equal(F.relu_max_pool2d_backward(go, x, **kw, indices=idx), want_dx)


def test_pool_backward_rejects_out_of_range_indices_in_the_kernel_pass():
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    _, idx = F.max_pool2d(x, 2, return_indices=True)
    go = np.ones((1, 1, 2, 2), np.float32)
    for bad in (-1, 16, -5):
        wrong = idx.copy()
        wrong[0, 0, 1, 1] = bad
        for fn in (F.max_pool2d_backward, F.relu_max_pool2d_backward):
            with pytest.raises(ValueError, match=r"indices must lie in \[0, 16\)"):
                fn(go, x, 2, indices=wrong)


def test_pool_backward_follows_any_valid_index_even_outside_its_window(rng):
    """Indices need not come from the forward: one pointing into another window
    (or several at one position) still routes each gradient there."""
    x = randn(rng, 2, 3, 6, 8)
    _, idx = F.max_pool2d(x, 2, return_indices=True)
    go = randn(rng, *idx.shape)
    moved = idx.copy()
    moved[0, 1, 2, 3] = 0          # into the first window
    moved[1, 2, 0, 0] = 6 * 8 - 1  # into the last window
    want = np.zeros(x.shape, np.float64)
    for n, c, i, j in np.ndindex(*idx.shape):
        want[n, c].reshape(-1)[moved[n, c, i, j]] += go[n, c, i, j]
    np.testing.assert_allclose(F.max_pool2d_backward(go, x, 2, indices=moved), want, rtol=1e-6)
    np.testing.assert_allclose(F.max_pool2d_backward(go, x, 2, indices=idx),
                               ref.max_pool2d_backward(go, x, 2), rtol=1e-6)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 7, 9), (1, 2, 2, 3), (4, 5, 6),
                                   (2, 3, 4, 40)])
@pytest.mark.parametrize("relu_first", [False, True])
def test_maxpool2x2_training_codes_match_indices(shape, relu_first):
    """In training, MaxPool2d(2) on the CPU keeps one byte per window instead
    of int64 indices: outputs and input gradients equal the index path's bit
    for bit, with ties, NaNs, zeros and negative-only windows."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1)
    flat[::7] = 0.0
    flat[::11] = -0.0
    flat[3::13] = np.nan
    flat[5::9] = flat[4::9][: len(flat[5::9])]  # ties between neighbours
    x[..., :2, :2] = -1.0  # a window with nothing positive
    pool = nn.MaxPool2d(2).train()
    out = pool.forward_after_relu(x) if relu_first else pool.forward(x)
    assert pool._codes is not None and pool._indices is None
    g = rng.standard_normal(out.shape).astype(np.float32)
    gx = pool.backward_through_relu(g) if relu_first else pool.backward(g)
    want_out, idx = (F.relu_max_pool2d if relu_first else F.max_pool2d)(x, 2, return_indices=True)
    want_gx = (F.relu_max_pool2d_backward if relu_first else F.max_pool2d_backward)(
        g, x, 2, indices=idx)
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(gx, want_gx)


def test_maxpool_training_keeps_indices_where_codes_do_not_apply():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 3, 7, 7)).astype(np.float32)
    for pool in (nn.MaxPool2d(2, ceil_mode=True), nn.MaxPool2d(3, 2), nn.MaxPool2d(2, padding=1)):
        pool.train()
        out = pool.forward(x)
        assert pool._codes is None and pool._indices is not None
        g = rng.standard_normal(out.shape).astype(np.float32)
        want = F.max_pool2d_backward(g, x, *pool._args())
        np.testing.assert_array_equal(pool.backward(g), want)
