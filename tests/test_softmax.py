"""softmax, log_softmax, cross_entropy and their backwards against the float64 reference."""

import math
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastcnn.functional as F
import reference as ref
from conftest import assert_close, numerical_grad, randn

# --------------------------------------------------------------------------- softmax


@st.composite
def softmax_configs(draw):
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=1, max_size=4)))
    dim = draw(st.integers(-len(shape), len(shape) - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0, 100.0]))
    return shape, dim, scale, draw(st.integers(0, 2 ** 32 - 1))


def check_softmax(x, dim, rng):
    scale = float(np.abs(x).max()) if x.size else 1.0
    y = F.softmax(x, dim=dim)
    want = ref.softmax(x, dim)
    assert_close(y, want, rtol=1e-5, atol=1e-6, err_msg="softmax")
    ly = F.log_softmax(x, dim=dim)
    lwant = ref.log_softmax(x, dim)
    # log_softmax's absolute error scales with the size of the logits
    assert_close(ly, lwant, rtol=1e-5, atol=1e-6 * max(1.0, scale), err_msg="log_softmax")
    go = randn(rng, *x.shape)
    # the backwards take the forward output; give both sides the same float32 one
    y32 = want.astype(np.float32)
    ly32 = lwant.astype(np.float32)
    n = x.shape[dim]
    assert_close(F.softmax_backward(go, y32, dim=dim), ref.softmax_backward(go, y32, dim),
                 red=n, atol=1e-6, err_msg="softmax_backward")
    assert_close(F.log_softmax_backward(go, ly32, dim=dim),
                 ref.log_softmax_backward(go, ly32, dim), red=n, atol=1e-6,
                 err_msg="log_softmax_backward")


@given(softmax_configs())
def test_softmax_random(cfg):
    shape, dim, scale, seed = cfg
    rng = np.random.default_rng(seed)
    check_softmax(randn(rng, *shape, scale=scale), dim, rng)


@pytest.mark.parametrize("shape, dim", [
    ((8, 16, 20, 20), 1), ((8, 16, 20, 20), -1), ((64, 10), -1), ((64, 10), 0),
    ((3, 1000), 1), ((1000,), 0), ((5, 1), 1), ((2, 3, 33), -1), ((2, 17, 3), 1),
    ((1, 1, 1), 2)])
def test_softmax_shapes(shape, dim, rng):
    check_softmax(randn(rng, *shape, scale=3.0), dim, rng)


def test_softmax_default_dim_is_torchs_implicit_one(rng):
    """dim=None, the default: the last axis of 1-D and 2-D input, axis 0 of 3-D,
    axis 1 from 4-D up (PyTorch's rule), with a warning from 3-D up."""
    for shape, dim in (((5,), 0), ((4, 5), 1), ((3, 4, 5), 0), ((2, 3, 4, 5), 1)):
        x = randn(rng, *shape)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y, ly = F.softmax(x), F.log_softmax(x)
        assert len(caught) == (2 if len(shape) >= 3 else 0)
        assert all(f"dim={dim}" in str(w.message) for w in caught)
        np.testing.assert_array_equal(y, F.softmax(x, dim=dim))
        np.testing.assert_array_equal(ly, F.log_softmax(x, dim=dim))


@pytest.mark.parametrize("big", [1e4, 1e30, 3e38])
def test_softmax_huge_logits(big):
    x = np.array([[big, 0.0, -big], [big, big, -big], [-big, -big, -big]], dtype=np.float32)
    y = F.softmax(x, dim=1)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, [[1, 0, 0], [0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3]],
                               rtol=1e-6, atol=1e-7)
    ly = F.log_softmax(x, dim=1)
    assert np.isfinite(ly[2]).all() and np.isfinite(ly[:, :2]).all()
    np.testing.assert_allclose(ly[0, 0], 0, atol=1e-6)
    np.testing.assert_allclose(ly[1, :2], -math.log(2), rtol=1e-6)
    np.testing.assert_allclose(ly[2], -math.log(3), rtol=1e-6)
    if big == 1e4:
        np.testing.assert_allclose(ly, ref.log_softmax(x, 1), rtol=1e-6)


def test_softmax_shift_invariance(rng):
    x = randn(rng, 4, 9)
    np.testing.assert_allclose(F.softmax(x + np.float32(1000), dim=1), F.softmax(x, dim=1),
                               rtol=1e-3, atol=1e-6)


def test_softmax_does_not_modify_inputs(rng):
    x = randn(rng, 4, 9)
    copy = x.copy()
    y = F.softmax(x, dim=1)
    go = randn(rng, 4, 9)
    go_copy, y_copy = go.copy(), y.copy()
    F.softmax_backward(go, y, dim=1)
    F.log_softmax_backward(go, F.log_softmax(x, dim=1), dim=1)
    np.testing.assert_array_equal(x, copy)
    np.testing.assert_array_equal(go, go_copy)
    np.testing.assert_array_equal(y, y_copy)


# --------------------------------------------------------------------------- cross_entropy


@st.composite
def ce_configs(draw):
    n = draw(st.integers(1, 6))
    c = draw(st.integers(1, 7))
    extra = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=2)))
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    ignore_index = draw(st.sampled_from([-100, -1, 0, c - 1, 255]))
    eps = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    ignored_frac = draw(st.sampled_from([0.0, 0.3, 1.0]))
    label_dtype = draw(st.sampled_from([np.int64, np.int32]))
    return n, c, extra, reduction, ignore_index, eps, ignored_frac, label_dtype, \
        draw(st.integers(0, 2 ** 32 - 1))


def make_ce(n, c, extra, ignore_index, ignored_frac, rng, scale=2.0):
    x = randn(rng, n, c, *extra, scale=scale)
    t = rng.integers(0, c, (n,) + extra)
    if ignore_index < 0 or ignore_index >= c:
        t = np.where(rng.random(t.shape) < ignored_frac, ignore_index, t)
    return x, t


def check_ce(x, t, reduction, ignore_index, eps, rng):
    kw = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=eps)
    loss = F.cross_entropy(x, t, **kw)
    want = ref.cross_entropy(x, t, **kw)
    red = t.size * x.shape[1]
    got = np.asarray(loss)
    assert got.dtype == np.float32, got.dtype
    assert got.shape == np.shape(want), (got.shape, np.shape(want))
    assert_close(got, want, red=red, err_msg=f"cross_entropy {kw}")
    go = randn(rng, *t.shape) if reduction == "none" else np.float32(rng.uniform(0.5, 2))
    gx = F.cross_entropy_backward(go, x, t, **kw)
    assert_close(gx, ref.cross_entropy_backward(go, x, t, **kw), red=x.shape[1],
                 atol=1e-6, err_msg=f"cross_entropy_backward {kw}")


@given(ce_configs(), st.integers(0, 2 ** 32 - 1))
def test_weighted_cross_entropy_random(cfg, wseed):
    """weight= against the element-by-element reference; the gradient against central
    differences of that reference (float64)."""
    n, c, extra, reduction, ignore_index, eps, frac, label_dtype, seed = cfg
    rng = np.random.default_rng(seed)
    x, t = make_ce(n, c, extra, ignore_index, frac, rng)
    t = t.astype(label_dtype)
    w = np.random.default_rng(wseed).uniform(0.1, 3.0, c).astype(np.float32)
    kw = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=eps)
    want = ref.weighted_cross_entropy(x, t, w, **kw)
    got = np.asarray(F.cross_entropy(x, t, w, **kw))
    assert got.dtype == np.float32 and got.shape == np.shape(want)
    assert_close(got, want, red=t.size * c, err_msg=f"weighted cross_entropy {kw}")
    go = randn(rng, *t.shape) if reduction == "none" else np.float32(rng.uniform(0.5, 2))
    gx = F.cross_entropy_backward(go, x, t, weight=w, **kw)
    numeric = numerical_grad(lambda v: np.asarray(go, np.float64) *
                             ref.weighted_cross_entropy(v, t, w, **kw), x)
    if not np.isnan(want).any():  # all ignored: NaN loss, zero gradient (as torch)
        assert_close(gx, numeric, red=c, atol=1e-5, err_msg=f"weighted backward {kw}")
    else:
        assert not gx.any()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(5, 4), (3, 4, 2, 3), (4,)])
@pytest.mark.parametrize("eps,weighted", [(0.0, False), (0.3, False), (0.1, True)])
def test_cross_entropy_with_probability_targets(reduction, shape, eps, weighted, rng):
    """A float target shaped like the input is class probabilities (torch's soft labels):
    against the row-by-row reference, the gradient against central differences."""
    x = randn(rng, *shape)
    probs = rng.random(shape).astype(np.float32)
    probs /= probs.sum(axis=0 if len(shape) == 1 else 1, keepdims=True)
    c = shape[0] if len(shape) == 1 else shape[1]
    w = rng.uniform(0.2, 2.0, c).astype(np.float32) if weighted else None
    kw = dict(reduction=reduction, label_smoothing=eps)
    want = ref.soft_cross_entropy(x, probs, w, **kw)
    got = np.asarray(F.cross_entropy(x, probs, w, **kw))
    assert got.dtype == np.float32 and got.shape == np.shape(want)
    assert_close(got, want, red=x.size, err_msg=f"soft cross_entropy {kw}")
    go = randn(rng, *np.shape(want)) if reduction == "none" else np.float32(0.8)
    gx = F.cross_entropy_backward(go, x, probs, weight=w, **kw)
    numeric = numerical_grad(lambda v: np.asarray(go, np.float64) *
                             ref.soft_cross_entropy(v, probs, w, **kw), x)
    assert_close(gx, numeric, red=c, atol=1e-5, err_msg=f"soft backward {kw}")
    from fastcnn import nn

    loss = nn.CrossEntropyLoss(weight=w, **kw)
    np.testing.assert_array_equal(np.asarray(loss(x, probs)), got)
    np.testing.assert_array_equal(loss.backward(go), gx)


def test_weighted_cross_entropy_checks_the_weights(rng):
    x, t = randn(rng, 4, 3), np.array([0, 1, 2, 1])
    with pytest.raises(ValueError, match=r"one value per class, shape \(3,\)"):
        F.cross_entropy(x, t, np.ones(4, np.float32))
    with pytest.raises(ValueError, match="target contains 3"):
        F.cross_entropy(x, np.array([0, 1, 3, 1]), np.ones(3, np.float32))
    from fastcnn import nn

    loss = nn.CrossEntropyLoss(weight=[1.0, 2.0, 0.5], label_smoothing=0.1)
    value = loss(x, t)
    assert_close(np.asarray(value), ref.weighted_cross_entropy(x, t, [1, 2, 0.5],
                                                               label_smoothing=0.1), red=12)
    assert loss.backward().shape == x.shape and loss.get_config()["weight"] == [1.0, 2.0, 0.5]


@given(ce_configs())
def test_cross_entropy_random(cfg):
    n, c, extra, reduction, ignore_index, eps, frac, label_dtype, seed = cfg
    rng = np.random.default_rng(seed)
    x, t = make_ce(n, c, extra, ignore_index, frac, rng)
    check_ce(x, t.astype(label_dtype), reduction, ignore_index, eps, rng)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("xs", [(64, 10), (256, 1000), (8, 16, 20, 20), (3, 5, 7)])
def test_cross_entropy_shapes(reduction, eps, xs, rng):
    x, t = make_ce(xs[0], xs[1], xs[2:], -100, 0.1, rng)
    check_ce(x, t, reduction, -100, eps, rng)


def test_cross_entropy_default_is_mean(rng):
    x, t = make_ce(5, 4, (), -100, 0.0, rng)
    np.testing.assert_array_equal(np.asarray(F.cross_entropy(x, t)),
                                  np.asarray(F.cross_entropy(x, t, reduction="mean")))
    np.testing.assert_array_equal(F.cross_entropy_backward(np.float32(1), x, t),
                                  F.cross_entropy_backward(np.float32(1), x, t,
                                                           reduction="mean"))


def test_cross_entropy_ignore_index_in_class_range(rng):
    x = randn(rng, 6, 4)
    t = np.array([0, 1, 2, 3, 1, 1])
    loss = F.cross_entropy(x, t, ignore_index=1, reduction="none")
    np.testing.assert_array_equal(np.asarray(loss)[[1, 4, 5]], 0)
    mean = float(F.cross_entropy(x, t, ignore_index=1))
    np.testing.assert_allclose(mean, np.asarray(loss).sum() / 3, rtol=1e-6)
    gx = F.cross_entropy_backward(np.float32(1), x, t, ignore_index=1)
    np.testing.assert_array_equal(gx[[1, 4, 5]], 0)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_cross_entropy_all_ignored(eps):
    """mean over zero targets: nan, as torch; sum: 0; none: zeros; gradients: zeros
    (torch's autograd gives zeros in mean mode too)."""
    x = np.ones((3, 4), dtype=np.float32)
    t = np.full(3, -100)
    assert np.isnan(float(F.cross_entropy(x, t, label_smoothing=eps)))
    assert float(F.cross_entropy(x, t, reduction="sum", label_smoothing=eps)) == 0
    np.testing.assert_array_equal(
        np.asarray(F.cross_entropy(x, t, reduction="none", label_smoothing=eps)), 0)
    for reduction in ("mean", "sum"):
        gx = F.cross_entropy_backward(np.float32(1), x, t, reduction=reduction,
                                      label_smoothing=eps)
        np.testing.assert_array_equal(gx, np.zeros((3, 4), np.float32), err_msg=reduction)
    gx = F.cross_entropy_backward(np.ones(3, np.float32), x, t, reduction="none",
                                  label_smoothing=eps)
    np.testing.assert_array_equal(gx, np.zeros((3, 4), np.float32))


def test_cross_entropy_huge_logits():
    x = np.array([[1e4, 0, -1e4], [-1e4, 0, 1e4], [1e4, 1e4, -1e4]], dtype=np.float32)
    t = np.array([0, 0, 2])
    loss = np.asarray(F.cross_entropy(x, t, reduction="none"))
    assert np.isfinite(loss).all()
    np.testing.assert_allclose(loss, [0, 2e4, 2e4 + math.log(2)], rtol=1e-6, atol=1e-6)
    gx = F.cross_entropy_backward(np.ones(3, np.float32), x, t, reduction="none")
    assert np.isfinite(gx).all()
    np.testing.assert_allclose(gx, [[0, 0, 0], [-1, 0, 1], [0.5, 0.5, -1]], atol=1e-6)
    mean = float(F.cross_entropy(x, t, label_smoothing=0.1))
    assert np.isfinite(mean)
    np.testing.assert_allclose(mean, ref.cross_entropy(x, t, label_smoothing=0.1), rtol=1e-5)


def test_cross_entropy_scalar_result_and_grad_output_forms(rng):
    x, t = make_ce(4, 3, (), -100, 0.0, rng)
    for reduction in ("mean", "sum"):
        loss = F.cross_entropy(x, t, reduction=reduction)
        assert np.ndim(loss) == 0 and np.asarray(loss).dtype == np.float32
        want = F.cross_entropy_backward(np.float32(2.0), x, t, reduction=reduction)
        for go in (2.0, np.array(2.0, np.float32), np.float64(2.0)):
            np.testing.assert_array_equal(
                F.cross_entropy_backward(go, x, t, reduction=reduction), want)
    assert np.asarray(F.cross_entropy(x, t, reduction="none")).shape == (4,)


def test_cross_entropy_does_not_modify_inputs(rng):
    x, t = make_ce(4, 3, (2,), -100, 0.3, rng)
    xc, tc = x.copy(), t.copy()
    F.cross_entropy(x, t)
    F.cross_entropy_backward(np.float32(1), x, t)
    np.testing.assert_array_equal(x, xc)
    np.testing.assert_array_equal(t, tc)


def test_softmax_masked_logits():
    """-inf logits (masking) get probability 0 and log-probability -inf; the rest
    is the softmax of the finite entries, as in torch."""
    x = np.array([[1.0, -np.inf, 2.0], [-np.inf, 0.5, -np.inf]], dtype=np.float32)
    y = F.softmax(x, dim=1)
    np.testing.assert_allclose(y, [[1 / (1 + np.e), 0, np.e / (1 + np.e)], [0, 1, 0]],
                               rtol=1e-6)
    ly = F.log_softmax(x, dim=1)
    assert ly[0, 1] == -np.inf and ly[1, 0] == -np.inf
    np.testing.assert_allclose(ly[1, 1], 0, atol=1e-7)
    np.testing.assert_allclose(ly[0, [0, 2]], np.log(y[0, [0, 2]]), rtol=1e-6)


def test_cross_entropy_uint8_segmentation_target(rng):
    """The common segmentation set-up: uint8 label maps with 255 = ignore."""
    x = randn(rng, 2, 4, 5, 6)
    t = rng.integers(0, 4, (2, 5, 6)).astype(np.uint8)
    t[0, :2] = 255
    for reduction in ("mean", "sum", "none"):
        got = F.cross_entropy(x, t, reduction=reduction, ignore_index=255)
        want = ref.cross_entropy(x, t, reduction, ignore_index=255)
        assert_close(np.asarray(got), want, red=t.size * 4, err_msg=reduction)
    go = np.float32(1)
    assert_close(F.cross_entropy_backward(go, x, t, ignore_index=255),
                 ref.cross_entropy_backward(go, x, t, ignore_index=255), atol=1e-6)
