"""normalize: uint8 -> float32, x / 255 then per-channel (x - mean) / std."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastcnn.functional as F
import reference as ref

MEAN3, STD3 = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def check(x, mean=None, std=None, **kw):
    out = F.normalize(x, mean, std, **kw) if kw else F.normalize(x, mean, std)
    want = ref.normalize(x, mean, std, **kw)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == x.shape
    scale = 1.0 if std is None else float(np.max(1.0 / np.abs(np.asarray(std, float))))
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=2e-7 * max(1.0, scale) * 4)
    return out


@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 3, 4, 5), (3, 1, 1), (8, 3, 28, 28)])
def test_normalize_per_channel_default_dim(shape, rng):
    x = rng.integers(0, 256, shape).astype(np.uint8)
    check(x, MEAN3, STD3)


@pytest.mark.parametrize("shape", [(5,), (4, 5), (2, 3, 4, 5), (1, 28, 28)])
def test_normalize_no_stats_is_div_255(shape, rng):
    x = rng.integers(0, 256, shape).astype(np.uint8)
    out = check(x)
    np.testing.assert_allclose(out, x / np.float32(255), rtol=2.5e-7)


def test_normalize_extremes():
    x = np.array([0, 1, 127, 128, 254, 255], dtype=np.uint8)
    np.testing.assert_allclose(F.normalize(x), x / 255.0, rtol=2.5e-7)
    assert F.normalize(x)[0] == 0 and F.normalize(x)[-1] == 1


@pytest.mark.parametrize("mean, std", [(0.5, 0.5), (0.1307, 0.3081), ([0.5], [0.25]),
                                       (np.float32(0.2), np.float64(2.0)), (-1.0, 1e-3)])
def test_normalize_scalar_stats(mean, std, rng):
    x = rng.integers(0, 256, (2, 1, 6, 7)).astype(np.uint8)
    check(x, mean, std)


@pytest.mark.parametrize("shape, dim", [((4, 5, 3), -1), ((4, 5, 3), 2), ((3, 4, 5), 0),
                                        ((2, 3, 4, 5), 1), ((2, 4, 5, 3), -1),
                                        ((2, 3, 4, 5), -3)])
def test_normalize_along_dim(shape, dim, rng):
    c = shape[dim]
    x = rng.integers(0, 256, shape).astype(np.uint8)
    mean = rng.uniform(0, 1, c).tolist()
    std = rng.uniform(0.1, 1, c).tolist()
    check(x, mean, std, dim=dim)
    check(x, np.array(mean), np.array(std, np.float32), dim=dim)


@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
       data=st.data(), seed=st.integers(0, 2 ** 32 - 1))
def test_normalize_random(shape, data, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, shape).astype(np.uint8)
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    c = shape[dim]
    per_channel = data.draw(st.booleans())
    n = c if per_channel else 1
    mean = rng.uniform(-1, 1, n).tolist()
    std = rng.uniform(0.05, 2, n).tolist()
    check(x, mean, std, dim=dim)


def test_normalize_non_contiguous(rng):
    x = rng.integers(0, 256, (5, 4, 3)).astype(np.uint8).transpose(2, 0, 1)   # (3, 5, 4)
    check(x, MEAN3, STD3)
    check(x[:, ::2, ::-1], MEAN3, STD3)


def test_normalize_does_not_modify_input(rng):
    x = rng.integers(0, 256, (3, 4, 4)).astype(np.uint8)
    copy = x.copy()
    F.normalize(x, MEAN3, STD3)
    np.testing.assert_array_equal(x, copy)


def test_repeated_statistics_are_reused_and_bad_ones_always_refused():
    x = np.arange(3 * 2 * 4, dtype=np.uint8).reshape(3, 2, 4)  # (C, H, W)
    first = F.normalize(x, (0.1, 0.2, 0.3), (0.5, 0.25, 2.0))
    again = F.normalize(x, (0.1, 0.2, 0.3), (0.5, 0.25, 2.0))
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(F.normalize(x, 0.5, 2), F.normalize(x, 0.5, 2.0))
    for _ in range(2):
        with pytest.raises(ValueError, match="std must be finite and non-zero"):
            F.normalize(x, (0.1, 0.2, 0.3), (0.5, 0.0, 2.0))
        with pytest.raises(ValueError, match="has 2 values but input has 3 channels"):
            F.normalize(x, (0.1, 0.2), (0.5, 0.25))
