"""relu / relu_backward (plain and guided): exact operations, compared exactly."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastcnn.functional as F
import reference as ref
from conftest import randn


@given(shape=st.lists(st.integers(1, 7), min_size=1, max_size=4),
       seed=st.integers(0, 2 ** 32 - 1))
def test_relu_random(shape, seed):
    rng = np.random.default_rng(seed)
    x = randn(rng, *shape)
    x.reshape(-1)[:: 3] = 0.0  # exact zeros: relu'(0) is 0
    go = randn(rng, *shape)
    out = F.relu(x)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_array_equal(out, ref.relu(x))
    for guided in (False, True):
        gx = F.relu_backward(go, x, guided=guided)
        assert gx.dtype == np.float32 and gx.shape == x.shape
        np.testing.assert_array_equal(gx, ref.relu_backward(go, x, guided=guided))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 15, 16, 17, 31, 33, 1000, 100003])
def test_relu_lengths(n, rng):
    """Lengths around SIMD widths and the threading threshold."""
    x, go = randn(rng, n), randn(rng, n)
    np.testing.assert_array_equal(F.relu(x), ref.relu(x))
    np.testing.assert_array_equal(F.relu_backward(go, x), ref.relu_backward(go, x))
    np.testing.assert_array_equal(F.relu_backward(go, x, guided=True),
                                  ref.relu_backward(go, x, guided=True))


def test_relu_backward_at_zero_and_signs():
    x = np.array([-1.0, 0.0, -0.0, 1e-30, 2.0, 3.0], dtype=np.float32)
    g = np.array([5.0, 5.0, 5.0, 5.0, -4.0, 4.0], dtype=np.float32)
    np.testing.assert_array_equal(F.relu(x), np.array([0, 0, 0, 1e-30, 2, 3], np.float32))
    np.testing.assert_array_equal(F.relu_backward(g, x), [0, 0, 0, 5, -4, 4])
    np.testing.assert_array_equal(F.relu_backward(g, x, guided=True), [0, 0, 0, 5, 0, 4])


def test_guided_differs_from_plain_where_grad_negative(rng):
    x = randn(rng, 4, 5, 6)
    go = randn(rng, 4, 5, 6)
    plain = F.relu_backward(go, x)
    guided = F.relu_backward(go, x, guided=True)
    differs = (x > 0) & (go < 0)
    assert differs.any()
    np.testing.assert_array_equal(guided[differs], 0)
    np.testing.assert_array_equal(plain[differs], go[differs])
    np.testing.assert_array_equal(guided[~differs], plain[~differs])
    assert not (guided < 0).any()


def test_relu_does_not_modify_input(rng):
    x = randn(rng, 3, 4)
    copy = x.copy()
    out = F.relu(x)
    np.testing.assert_array_equal(x, copy)
    assert not np.shares_memory(out, x)
