"""dropout / dropout_backward / dropout_mask: the Philox4x32-10 mask, bit for bit."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastcnn
import fastcnn.functional as F
from fastcnn import nn
import reference as ref
from conftest import assert_bitwise, randn

SEEDS_OFFSETS = [(0, 0), (1, 0), (0, 1), (12345, 3), (2 ** 32 + 7, 2 ** 32 + 1),
                 (2 ** 64 - 1, 2 ** 64 - 1), (0xDEADBEEF, 2 ** 40)]
SHAPES = [(1,), (3,), (4,), (5,), (7, 9), (2, 3, 4, 5), (1000,), (8, 16, 20, 20)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.75])
def test_dropout_mask_matches_reference(shape, p):
    for seed, offset in SEEDS_OFFSETS[:4] if len(shape) > 2 else SEEDS_OFFSETS:
        m = F.dropout_mask(shape, p, seed, offset)
        assert isinstance(m, np.ndarray) and m.dtype == np.float32 and m.shape == shape
        assert_bitwise(m, ref.dropout_mask(shape, p, seed, offset),
                       err_msg=f"seed={seed} offset={offset}")


@pytest.mark.parametrize("seed, offset", SEEDS_OFFSETS)
@pytest.mark.parametrize("p", [0.2, 0.5, 0.875])
def test_dropout_forward_backward_match_reference(seed, offset, p, rng):
    x = randn(rng, 3, 5, 7)
    out = F.dropout(x, p, training=True, seed=seed, offset=offset)
    assert_bitwise(out, ref.dropout(x, p, True, seed, offset))
    go = randn(rng, 3, 5, 7)
    gx = F.dropout_backward(go, p, training=True, seed=seed, offset=offset)
    assert_bitwise(gx, ref.dropout_backward(go, p, True, seed, offset))
    # the backward uses the forward's mask: zero exactly where the output is zero
    np.testing.assert_array_equal(gx == 0, out == 0)


@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4),
       p=st.integers(0, 255).map(lambda k: k / 256),
       seed=st.integers(0, 2 ** 64 - 1), offset=st.integers(0, 2 ** 64 - 1),
       data_seed=st.integers(0, 2 ** 32 - 1))
def test_dropout_random(shape, p, seed, offset, data_seed):
    rng = np.random.default_rng(data_seed)
    x = randn(rng, *shape)
    assert_bitwise(F.dropout(x, p, training=True, seed=seed, offset=offset),
                   ref.dropout(x, p, True, seed, offset))
    assert_bitwise(F.dropout_mask(tuple(shape), p, seed, offset),
                   ref.dropout_mask(shape, p, seed, offset))
    assert_bitwise(F.dropout_backward(x, p, training=True, seed=seed, offset=offset),
                   ref.dropout_backward(x, p, True, seed, offset))


def test_dropout_same_seed_same_mask_different_seed_or_offset_differs(rng):
    x = randn(rng, 64, 64)
    a = F.dropout(x, 0.5, seed=7, offset=0)
    assert_bitwise(a, F.dropout(x, 0.5, seed=7, offset=0))
    assert (F.dropout(x, 0.5, seed=8, offset=0) != a).any()
    assert (F.dropout(x, 0.5, seed=7, offset=1) != a).any()
    assert (F.dropout(x, 0.5, seed=7 + 2 ** 32, offset=0) != a).any()   # high key word used
    assert (F.dropout(x, 0.5, seed=7, offset=2 ** 32) != a).any()       # high offset word used


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_fraction(p):
    n = 100_000
    m = F.dropout_mask((n,), p, seed=2024)
    kept = (m != 0).mean()
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 5 * sigma, (kept, 1 - p)
    np.testing.assert_array_equal(np.unique(m), [0, ref.dropout_scale(p)])
    # inverted dropout preserves the mean
    assert abs(m.astype(np.float64).mean() - 1.0) < 6 * sigma / (1 - p)


def test_dropout_mask_equals_dropout_of_ones():
    for shape, p, seed, offset in [((4, 5, 6), 0.3, 11, 0), ((1001,), 0.5, 2 ** 50, 9)]:
        ones = np.ones(shape, np.float32)
        assert_bitwise(F.dropout_mask(shape, p, seed, offset),
                       F.dropout(ones, p, training=True, seed=seed, offset=offset))


def test_dropout_mask_depends_on_flat_index_only():
    flat = F.dropout_mask((120,), 0.5, 5, 2)
    assert_bitwise(F.dropout_mask((2, 3, 4, 5), 0.5, 5, 2), flat.reshape(2, 3, 4, 5))
    assert_bitwise(F.dropout_mask((12, 10), 0.5, 5, 2), flat.reshape(12, 10))


def test_dropout_non_contiguous_input_uses_c_order_index(rng):
    x = randn(rng, 6, 8).T                      # (8, 6), Fortran-ordered view
    out = F.dropout(x, 0.5, seed=3)
    assert_bitwise(out, ref.dropout(np.ascontiguousarray(x), 0.5, True, 3, 0))


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_dropout_eval_is_identity_copy(p, rng):
    x = randn(rng, 4, 5)
    out = F.dropout(x, p, training=False, seed=1)
    assert_bitwise(out, x)
    assert not np.shares_memory(out, x)
    out[...] = 0
    assert (x != 0).any()
    gx = F.dropout_backward(x, p, training=False, seed=1)
    assert_bitwise(gx, x)
    assert not np.shares_memory(gx, x)


def test_dropout_p_zero_training_is_identity_copy(rng):
    x = randn(rng, 4, 5)
    out = F.dropout(x, 0.0, training=True, seed=1)
    assert_bitwise(out, x)
    assert not np.shares_memory(out, x)
    assert_bitwise(F.dropout_backward(x, 0.0, training=True, seed=1), x)
    np.testing.assert_array_equal(F.dropout_mask((4, 5), 0.0, 1), 1)


def test_dropout_p_one_is_times_zero_as_torch(rng):
    """p = 1 drops everything: x * 0 (NaN where x is NaN or infinite, as
    PyTorch's), a zero gradient and a zero mask; the module too."""
    x = randn(rng, 3, 70)
    x[0, :3] = [np.nan, np.inf, -np.inf]
    with np.errstate(invalid="ignore"):
        zero = x * np.float32(0)
    out = F.dropout(x, 1.0, seed=5)
    assert_bitwise(out, zero)
    assert np.isnan(out[0, :3]).all() and (out[1:] == 0).all()
    assert_bitwise(F.dropout_backward(x, 1.0, seed=5), zero)
    np.testing.assert_array_equal(F.dropout_mask((4, 5), 1.0, 1), 0)
    layer = nn.Dropout(1.0, seed=2)
    y = layer(x[1:])
    assert (y == 0).all()
    assert (layer.backward(np.ones_like(y)) == 0).all()
    layer.eval()
    assert_bitwise(layer(x), x)


def test_dropout_seed_none_uses_global_generator(rng):
    x = randn(rng, 32, 32)
    fastcnn.manual_seed(123)
    a = F.dropout(x, 0.5)
    b = F.dropout(x, 0.5)
    fastcnn.manual_seed(123)
    a2 = F.dropout(x, 0.5)
    b2 = F.dropout(x, 0.5)
    assert_bitwise(a, a2)
    assert_bitwise(b, b2)
    assert (a != b).any(), "successive draws from the global generator gave the same mask"
    fastcnn.manual_seed(124)
    assert (F.dropout(x, 0.5) != a).any()


def test_dropout_does_not_modify_input(rng):
    x = randn(rng, 10, 10)
    copy = x.copy()
    F.dropout(x, 0.5, seed=1)
    F.dropout_backward(x, 0.5, seed=1)
    np.testing.assert_array_equal(x, copy)
