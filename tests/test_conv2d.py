"""conv2d / conv2d_backward against the float64 reference."""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastcnn.functional as F
import reference as ref
from conftest import assert_close, randn


def _int_or_pair(draw, lo, hi):
    if draw(st.booleans()):
        return draw(st.integers(lo, hi))
    return (draw(st.integers(lo, hi)), draw(st.integers(lo, hi)))


@st.composite
def conv_configs(draw, max_cg=3, max_hw_extra=6):
    """A valid conv2d problem, built so that the output is at least 1x1."""
    depthwise = draw(st.booleans())
    g = draw(st.integers(1, 4))
    cg = 1 if depthwise else draw(st.integers(1, max_cg))
    kg = draw(st.integers(1, 3))
    r, s = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dilation = _int_or_pair(draw, 1, 3)
    mode = draw(st.sampled_from(["int", "pair", "pair", "valid", "same"]))
    if mode == "same":
        stride = 1
        padding = "same"
    else:
        stride = _int_or_pair(draw, 1, 4)
        padding = {"int": lambda: draw(st.integers(0, 3)),
                   "pair": lambda: (draw(st.integers(0, 3)), draw(st.integers(0, 3))),
                   "valid": lambda: "valid"}[mode]()
    dh, dw = ref.pair(dilation)
    (pt, pb), (pl, pr) = ref.conv2d_pads(padding, (r, s), dilation)
    h = max(1, dh * (r - 1) + 1 - pt - pb) + draw(st.integers(0, max_hw_extra))
    w = max(1, dw * (s - 1) + 1 - pl - pr) + draw(st.integers(0, max_hw_extra))
    n = draw(st.integers(1, 3))
    unbatched = draw(st.integers(0, 5)) == 0
    xshape = (g * cg, h, w) if unbatched else (n, g * cg, h, w)
    return dict(xshape=xshape, wshape=(g * kg, cg, r, s), bias=draw(st.booleans()),
                stride=stride, padding=padding, dilation=dilation, groups=g,
                seed=draw(st.integers(0, 2 ** 32 - 1)))


def make_problem(cfg):
    rng = np.random.default_rng(cfg["seed"])
    x = randn(rng, *cfg["xshape"])
    w = randn(rng, *cfg["wshape"])
    b = randn(rng, cfg["wshape"][0]) if cfg["bias"] else None
    kw = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"],
              groups=cfg["groups"])
    return rng, x, w, b, kw


def reduction_lengths(x, w, out):
    k, cg, r, s = w.shape
    n = x.shape[0] if x.ndim == 4 else 1
    ohw = out.shape[-1] * out.shape[-2]
    groups = x.shape[-3] // cg
    return cg * r * s, (k // groups) * r * s, n * ohw


def run_and_check(x, w, b, kw, rng, backward=True):
    out = F.conv2d(x, w, b, **kw)
    want = ref.conv2d(x, w, b, **kw)
    red_fwd, red_gx, red_gw = reduction_lengths(x, w, want)
    assert_close(out, want, red=red_fwd, err_msg="conv2d forward")
    if not backward:
        return
    go = randn(rng, *want.shape)
    gx, gw, gb = F.conv2d_backward(go, x, w, b, **kw)
    rgx, rgw, rgb = ref.conv2d_backward(go, x, w, b, **kw)
    assert_close(gx, rgx, red=red_gx, err_msg="grad_input")
    assert_close(gw, rgw, red=red_gw, err_msg="grad_weight")
    if b is None:
        assert gb is None
    else:
        assert_close(gb, rgb, red=red_gw, err_msg="grad_bias")


@given(conv_configs())
def test_conv2d_forward_backward_random(cfg):
    rng, x, w, b, kw = make_problem(cfg)
    run_and_check(x, w, b, kw, rng)


@given(conv_configs(max_cg=8, max_hw_extra=12))
def test_conv2d_forward_random_wider(cfg):
    rng, x, w, b, kw = make_problem(cfg)
    run_and_check(x, w, b, kw, rng, backward=False)


@pytest.mark.parametrize("xs, ws, kw", [
    ((4, 16, 20, 20), (32, 16, 3, 3), dict(padding=1)),                 # typical layer
    ((2, 3, 28, 28), (8, 3, 5, 5), dict()),                             # first layer
    ((3, 13, 17, 11), (7, 13, 3, 2), dict(stride=(2, 1), padding=(1, 0))),  # odd sizes
    ((2, 16, 15, 15), (16, 1, 3, 3), dict(padding=1, groups=16)),       # depthwise
    ((2, 16, 12, 12), (48, 1, 3, 3), dict(padding=1, groups=16)),       # depthwise x3
    ((2, 8, 9, 10), (12, 8, 1, 1), dict()),                             # 1x1
    ((2, 8, 9, 10), (12, 8, 1, 1), dict(stride=3)),                     # stride > kernel
    ((2, 4, 11, 10), (6, 4, 2, 2), dict(stride=(4, 3))),                # stride > kernel
    ((1, 6, 14, 9), (9, 2, 3, 4), dict(stride=(2, 3), padding=(2, 1), dilation=(2, 1),
                                       groups=3)),                     # non-square all
    ((2, 4, 9, 9), (5, 4, 9, 9), dict()),                               # kernel == input
    ((2, 4, 7, 7), (5, 4, 9, 9), dict(padding=1)),                      # kernel == padded
    ((1, 3, 1, 1), (4, 3, 1, 1), dict()),                               # 1x1 image
    ((2, 3, 10, 12), (4, 3, 4, 3), dict(padding="same", dilation=(1, 2))),  # same, even k
    ((2, 3, 10, 12), (4, 3, 3, 3), dict(padding="valid")),
    ((64, 2, 5, 5), (3, 2, 3, 3), dict(padding=1)),                     # many images
])
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_special_shapes(xs, ws, kw, bias, rng):
    x, w = randn(rng, *xs), randn(rng, *ws)
    b = randn(rng, ws[0]) if bias else None
    run_and_check(x, w, b, kw, rng)


def test_conv2d_unbatched_input(rng):
    x = randn(rng, 3, 9, 8)
    w = randn(rng, 5, 3, 3, 2)
    b = randn(rng, 5)
    out = F.conv2d(x, w, b, stride=2, padding=1)
    assert out.shape == ref.conv2d(x, w, b, stride=2, padding=1).shape
    assert out.ndim == 3
    batched = F.conv2d(x[None], w, b, stride=2, padding=1)[0]
    np.testing.assert_array_equal(out, batched)
    go = randn(rng, *out.shape)
    gx, gw, gb = F.conv2d_backward(go, x, w, b, stride=2, padding=1)
    assert gx.shape == x.shape
    gx1, gw1, gb1 = F.conv2d_backward(go[None], x[None], w, b, stride=2, padding=1)
    np.testing.assert_array_equal(gx, gx1[0])
    np.testing.assert_array_equal(gw, gw1)
    np.testing.assert_array_equal(gb, gb1)
    run_and_check(x, w, b, dict(stride=2, padding=1), rng)


@pytest.mark.parametrize("mask", list(itertools.product([True, False], repeat=3)))
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_backward_output_mask(mask, bias, rng):
    x = randn(rng, 2, 4, 7, 6)
    w = randn(rng, 6, 2, 3, 3)
    b = randn(rng, 6) if bias else None
    kw = dict(stride=1, padding=1, groups=2)
    go = randn(rng, *ref.conv2d(x, w, b, **kw).shape)
    full = ref.conv2d_backward(go, x, w, b, **kw)
    got = F.conv2d_backward(go, x, w, b, output_mask=mask, **kw)
    assert len(got) == 3
    for i, (want_it, flag) in enumerate(zip(full, mask)):
        if not flag or want_it is None:
            assert got[i] is None, f"entry {i} should be None (mask {mask}, bias {bias})"
        else:
            assert_close(got[i], want_it, red=100, err_msg=f"entry {i}")


def test_conv2d_integer_valued(rng):
    """Small integers: every product and partial sum of a direct or GEMM convolution
    is exact in float32 (a Winograd/FFT kernel may round, hence the small atol)."""
    x = rng.integers(-3, 4, (2, 6, 9, 8)).astype(np.float32)
    w = rng.integers(-3, 4, (4, 3, 3, 3)).astype(np.float32)
    b = rng.integers(-3, 4, 4).astype(np.float32)
    kw = dict(stride=(1, 2), padding=(2, 1), dilation=(1, 2), groups=2)
    np.testing.assert_allclose(F.conv2d(x, w, b, **kw), ref.conv2d(x, w, b, **kw),
                               rtol=0, atol=1e-3)
    go = rng.integers(-3, 4, ref.conv2d(x, w, b, **kw).shape).astype(np.float32)
    for got, want in zip(F.conv2d_backward(go, x, w, b, **kw),
                         ref.conv2d_backward(go, x, w, b, **kw)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)


def test_conv2d_does_not_modify_inputs(rng):
    x, w, b = randn(rng, 2, 3, 6, 6), randn(rng, 4, 3, 3, 3), randn(rng, 4)
    copies = [a.copy() for a in (x, w, b)]
    out = F.conv2d(x, w, b, padding=1)
    go = randn(rng, *out.shape)
    go_copy = go.copy()
    F.conv2d_backward(go, x, w, b, padding=1)
    for a, c in zip((x, w, b, go), copies + [go_copy]):
        np.testing.assert_array_equal(a, c)


def test_conv2d_padding_int_equals_pair(rng):
    x, w = randn(rng, 2, 3, 8, 7), randn(rng, 4, 3, 3, 2)
    np.testing.assert_array_equal(F.conv2d(x, w, stride=2, padding=1, dilation=2),
                                  F.conv2d(x, w, stride=(2, 2), padding=(1, 1),
                                           dilation=(2, 2)))


def test_conv2d_valid_equals_zero_padding(rng):
    x, w = randn(rng, 2, 3, 8, 7), randn(rng, 4, 3, 3, 2)
    np.testing.assert_array_equal(F.conv2d(x, w, padding="valid"), F.conv2d(x, w, padding=0))


def test_conv2d_same_keeps_size(rng):
    for r, s, d in [(3, 3, 1), (4, 2, 1), (3, 4, 2), (5, 1, 3)]:
        x, w = randn(rng, 1, 2, 7, 6), randn(rng, 3, 2, r, s)
        out = F.conv2d(x, w, padding="same", dilation=d)
        assert out.shape == (1, 3, 7, 6)
        assert_close(out, ref.conv2d(x, w, padding="same", dilation=d), red=2 * r * s)


@pytest.mark.parametrize("xs, ws, kw", [
    ((1, 32, 60, 60), (150, 32, 3, 3), dict(padding=1)),         # 3600 pixels, 288 deep
    ((2, 70, 13, 11), (33, 70, 2, 2), dict(stride=1)),            # 280 deep, odd tails
    ((2, 40, 20, 20), (40, 8, 3, 3), dict(padding=1, groups=5)),  # grouped, many pixels
])
def test_conv2d_large_gemm_blocks(xs, ws, kw, rng):
    """Shapes that cross the GEMM's cache-blocking boundaries (and their tails)."""
    x, w, b = randn(rng, *xs), randn(rng, *ws), randn(rng, ws[0])
    run_and_check(x, w, b, kw, rng)
