"""linear / linear_backward against the float64 reference."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastcnn.functional as F
import reference as ref
from conftest import assert_close, randn


def check_linear(x, w, b, rng):
    out = F.linear(x, w, b)
    want = ref.linear(x, w, b)
    out_f, in_f = w.shape
    assert_close(out, want, red=in_f, err_msg="linear forward")
    go = randn(rng, *want.shape)
    gx, gw, gb = F.linear_backward(go, x, w, b)
    rgx, rgw, rgb = ref.linear_backward(go, x, w, b)
    rows = max(1, int(np.prod(x.shape[:-1])))
    assert_close(gx, rgx, red=out_f, err_msg="grad_input")
    assert_close(gw, rgw, red=rows, err_msg="grad_weight")
    if b is None:
        assert gb is None
    else:
        assert_close(gb, rgb, red=rows, err_msg="grad_bias")


@given(lead=st.lists(st.integers(0, 5), min_size=0, max_size=3),
       in_f=st.integers(0, 40), out_f=st.integers(0, 40), bias=st.booleans(),
       seed=st.integers(0, 2 ** 32 - 1))
def test_linear_random(lead, in_f, out_f, bias, seed):
    rng = np.random.default_rng(seed)
    x = randn(rng, *lead, in_f)
    w = randn(rng, out_f, in_f)
    b = randn(rng, out_f) if bias else None
    check_linear(x, w, b, rng)


@pytest.mark.parametrize("xs, out_f", [
    ((64, 256), 128), ((33, 129), 65), ((1, 784), 10), ((7, 1), 1), ((2, 3, 4, 17), 19),
    ((300, 5), 3), ((17,), 9)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_shapes(xs, out_f, bias, rng):
    x = randn(rng, *xs)
    w = randn(rng, out_f, xs[-1])
    b = randn(rng, out_f) if bias else None
    check_linear(x, w, b, rng)


def test_linear_1d_input_shape(rng):
    x, w, b = randn(rng, 6), randn(rng, 4, 6), randn(rng, 4)
    out = F.linear(x, w, b)
    assert out.shape == (4,)
    gx, gw, gb = F.linear_backward(randn(rng, 4), x, w, b)
    assert gx.shape == (6,) and gw.shape == (4, 6) and gb.shape == (4,)


def test_linear_does_not_modify_inputs(rng):
    x, w, b = randn(rng, 5, 6), randn(rng, 4, 6), randn(rng, 4)
    go = randn(rng, 5, 4)
    copies = [a.copy() for a in (x, w, b, go)]
    F.linear(x, w, b)
    F.linear_backward(go, x, w, b)
    for a, c in zip((x, w, b, go), copies):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("xs, out_f", [
    ((145, 600), 300),      # more rows than one packed A block, depth over 2 blocks + tail
    ((20, 257), 3075),      # more columns than one packed B slab, depth one block + 1
    ((3075, 40), 17),
])
def test_linear_large_gemm_blocks(xs, out_f, rng):
    """Shapes that cross the GEMM's cache-blocking boundaries (and their tails)."""
    x, w, b = randn(rng, *xs), randn(rng, out_f, xs[-1]), randn(rng, out_f)
    check_linear(x, w, b, rng)
