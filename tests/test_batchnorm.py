"""batch_norm / batch_norm_backward against the float64 reference, running stats."""

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import fastcnn.functional as F
from fastcnn import nn
import reference as ref
from conftest import assert_close, randn


@st.composite
def bn_configs(draw):
    ndim = draw(st.sampled_from([2, 3, 4]))
    shape = (draw(st.integers(1, 5)), draw(st.integers(1, 5))) + \
        tuple(draw(st.integers(1, 5)) for _ in range(ndim - 2))
    training = draw(st.booleans())
    n = int(np.prod(shape)) // shape[1]
    assume(not training or n > 1)
    return dict(shape=shape, training=training, affine_w=draw(st.booleans()),
                affine_b=draw(st.booleans()),
                running=draw(st.booleans()) if training else True,
                momentum=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
                eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
                seed=draw(st.integers(0, 2 ** 32 - 1)))


def check_bn(x, rm, rv, w, b, training, momentum, eps, rng):
    """rm / rv: float32 arrays or None; checks forward, running stats, backward."""
    n = x.size // x.shape[1]
    rm0 = None if rm is None else rm.copy()
    rv0 = None if rv is None else rv.copy()
    want, want_rm, want_rv = ref.batch_norm(x, rm0, rv0, w, b, training, momentum, eps)
    out = F.batch_norm(x, rm, rv, w, b, training=training, momentum=momentum, eps=eps)
    # normalised values are O(1/sqrt(eps)) at worst; keep tolerances relative to that
    assert_close(out, want, rtol=1e-4, atol=1e-5 * np.sqrt(n), err_msg="batch_norm")
    if rm is not None:
        assert rm.dtype == np.float32
        assert_close(rm, want_rm, rtol=1e-5, atol=1e-6 * np.sqrt(n), err_msg="running_mean")
        assert_close(rv, want_rv, rtol=1e-4, atol=1e-6 * np.sqrt(n), err_msg="running_var")
    go = randn(rng, *x.shape)
    rm1 = None if rm is None else rm.copy()
    rv1 = None if rv is None else rv.copy()
    gx, gw, gb = F.batch_norm_backward(go, x, rm, rv, w, b, training=training, eps=eps)
    # the backward never touches the running stats
    if rm is not None:
        np.testing.assert_array_equal(rm, rm1)
        np.testing.assert_array_equal(rv, rv1)
    rgx, rgw, rgb = ref.batch_norm_backward(go, x, rm1, rv1, w, b, training, eps)
    assert_close(gx, rgx, rtol=1e-4, atol=2e-5 * np.sqrt(n), err_msg="grad_input")
    if w is None:
        assert gw is None
    else:
        assert_close(gw, rgw, red=n, atol=2e-5, err_msg="grad_weight")
    if b is None:
        assert gb is None
    else:
        assert_close(gb, rgb, red=n, err_msg="grad_bias")


@given(bn_configs())
def test_batch_norm_random(cfg):
    rng = np.random.default_rng(cfg["seed"])
    shape = cfg["shape"]
    c = shape[1]
    x = randn(rng, *shape, scale=2.0) + np.float32(0.5)
    rm = randn(rng, c) if cfg["running"] else None
    rv = rng.uniform(0.5, 2.0, c).astype(np.float32) if cfg["running"] else None
    w = randn(rng, c) if cfg["affine_w"] else None
    b = randn(rng, c) if cfg["affine_b"] else None
    check_bn(x, rm, rv, w, b, cfg["training"], cfg["momentum"], cfg["eps"], rng)


@pytest.mark.parametrize("shape", [(8, 16, 20, 20), (64, 100), (16, 8, 33), (2, 3, 1, 1),
                                   (1, 4, 3, 3), (3, 1, 5, 7), (2, 5)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_shapes(shape, training, rng):
    c = shape[1]
    x = randn(rng, *shape) * np.float32(3) - np.float32(1)
    rm, rv = randn(rng, c), rng.uniform(0.5, 2.0, c).astype(np.float32)
    w, b = randn(rng, c), randn(rng, c)
    check_bn(x, rm, rv, w, b, training, 0.1, 1e-5, rng)


def test_batch_norm_running_stats_in_place(rng):
    x = randn(rng, 4, 3, 5, 5) + np.float32(2)
    rm = np.zeros(3, np.float32)
    rv = np.ones(3, np.float32)
    rm_id, rv_id = id(rm), id(rv)
    F.batch_norm(x, rm, rv, training=True, momentum=0.1)
    assert id(rm) == rm_id and id(rv) == rv_id
    moved = np.moveaxis(x.astype(np.float64), 1, 0).reshape(3, -1)
    np.testing.assert_allclose(rm, 0.1 * moved.mean(axis=1), rtol=1e-5)
    # unbiased variance (n / (n - 1)), n = N*H*W = 100
    np.testing.assert_allclose(rv, 0.9 + 0.1 * moved.var(axis=1, ddof=1), rtol=1e-5)
    # a second step compounds
    F.batch_norm(x, rm, rv, training=True, momentum=0.1)
    np.testing.assert_allclose(rm, 0.19 * moved.mean(axis=1), rtol=1e-5)


def test_batch_norm_momentum_one_and_zero(rng):
    x = randn(rng, 6, 2)
    rm, rv = np.full(2, 5, np.float32), np.full(2, 7, np.float32)
    F.batch_norm(x, rm, rv, training=True, momentum=0.0)
    np.testing.assert_array_equal(rm, [5, 5])
    np.testing.assert_array_equal(rv, [7, 7])
    F.batch_norm(x, rm, rv, training=True, momentum=1.0)
    np.testing.assert_allclose(rm, x.astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rv, x.astype(np.float64).var(axis=0, ddof=1), rtol=1e-5)


def test_batch_norm_eval_uses_running_stats(rng):
    x = randn(rng, 5, 3, 4, 4)
    rm = np.array([0.5, -1.0, 2.0], np.float32)
    rv = np.array([4.0, 0.25, 1.0], np.float32)
    rm0, rv0 = rm.copy(), rv.copy()
    out = F.batch_norm(x, rm, rv, training=False, eps=0.0)
    want = (x - rm[None, :, None, None]) / np.sqrt(rv)[None, :, None, None]
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    # default is eval mode
    np.testing.assert_array_equal(F.batch_norm(x, rm, rv, eps=0.0), out)


def test_batch_norm_training_without_running_stats(rng):
    x = randn(rng, 7, 3)
    out = F.batch_norm(x, None, None, training=True)
    assert_close(out, ref.batch_norm(x, None, None, training=True)[0], atol=1e-5)
    np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-5)
    # one running statistic without the other: torch's ValueError, in either mode
    stat = np.zeros(3, np.float32)
    for training in (True, False):
        for args, only in (((stat, None), "running_mean"), ((None, stat), "running_var")):
            with pytest.raises(ValueError, match=f"go together .* got only {only}"):
                F.batch_norm(x, *args, training=training)
    np.testing.assert_array_equal(stat, 0)  # and nothing updated


def test_batch_norm_training_two_values_per_channel():
    """n == 2 is the smallest legal batch; (1, C, 2, 1) counts H*W too."""
    x = np.array([[[[1.0], [3.0]]]], dtype=np.float32)      # (1, 1, 2, 1)
    rm, rv = np.zeros(1, np.float32), np.ones(1, np.float32)
    out = F.batch_norm(x, rm, rv, training=True, momentum=1.0, eps=1e-12)
    np.testing.assert_allclose(out.ravel(), [-1, 1], rtol=1e-6)
    np.testing.assert_allclose(rm, [2.0])
    np.testing.assert_allclose(rv, [2.0])   # unbiased: ((1-2)^2 + (3-2)^2) / 1


def test_batch_norm_constant_channel(rng):
    """Zero batch variance: output ~ bias, finite; gradient finite.

    The tolerance allows the fused form y = x * scale + shift (scale = w / sqrt(var +
    eps), shift = b - mean * scale), which torch's CPU kernel also uses: its rounding
    error is about ulp(|mean| * |scale|), here 3 * 632 -> ~1e-4."""
    x = np.full((4, 2, 3, 3), 3.0, dtype=np.float32)
    w, b = np.array([2.0, -1.0], np.float32), np.array([0.5, 0.25], np.float32)
    out = F.batch_norm(x, None, None, w, b, training=True, eps=1e-5)
    np.testing.assert_allclose(out, np.broadcast_to(b[None, :, None, None], x.shape),
                               atol=1e-3)
    go = randn(rng, *x.shape)
    gx, gw, gb = F.batch_norm_backward(go, x, None, None, w, b, training=True, eps=1e-5)
    assert np.isfinite(gx).all() and np.isfinite(gw).all()
    assert_close(gx, ref.batch_norm_backward(go, x, None, None, w, b, True, 1e-5)[0],
                 atol=1e-3)


def test_batch_norm_does_not_modify_inputs(rng):
    x, w, b = randn(rng, 4, 3, 2, 2), randn(rng, 3), randn(rng, 3)
    copies = [a.copy() for a in (x, w, b)]
    F.batch_norm(x, None, None, w, b, training=True)
    F.batch_norm_backward(randn(rng, 4, 3, 2, 2), x, None, None, w, b, training=True)
    for a, c in zip((x, w, b), copies):
        np.testing.assert_array_equal(a, c)


def test_batch_norm_eps_and_buffer_types():
    """As torch: eps > 0 in training (0 is allowed in eval mode); running statistics
    must be floating-point, since training updates them in place."""
    x = np.ones((4, 2), np.float32)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        F.batch_norm(x, None, None, training=True, eps=0.0)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        F.batch_norm_backward(x, x, None, None, training=True, eps=-1.0)
    np.testing.assert_array_equal(F.batch_norm(x, np.zeros(2), np.ones(2), eps=0.0), x)
    for rm, rv in ((np.zeros(2, np.int64), np.ones(2)), (np.zeros(2), np.ones(2, np.int32))):
        with pytest.raises(TypeError, match="running_(mean|var) must be a floating-point array"):
            F.batch_norm(x, rm, rv, training=True)
    rm, rv = np.zeros(2), np.ones(2)        # float64 buffers: updated, not truncated
    F.batch_norm(np.array([[0.0, 1.0], [1.0, 4.0]]), rm, rv, training=True, momentum=0.5)
    np.testing.assert_allclose(rm, [0.25, 1.25])
    np.testing.assert_allclose(rv, [0.75, 2.75])


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4, 4), (2, 3, 0, 4)])
def test_batch_norm_empty_batch_in_training(shape):
    """torch: an empty batch normalises to an empty output, leaves the running statistics
    as they were and gets zero parameter gradients (one value per channel is still an
    error)."""
    x = np.zeros(shape, np.float32)
    rm, rv = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
    assert F.batch_norm(x, rm, rv, training=True).shape == shape
    np.testing.assert_array_equal(rm, 0.5)
    np.testing.assert_array_equal(rv, 2.0)
    dx, dw, db = F.batch_norm_backward(x, x, rm, rv, np.ones(3), np.ones(3), training=True)
    assert dx.shape == shape
    np.testing.assert_array_equal(dw, 0)
    np.testing.assert_array_equal(db, 0)
    layer = (nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(3).train()
    assert layer(x).shape == shape and int(layer.num_batches_tracked) == 1
    assert layer.backward(x).shape == shape
    np.testing.assert_array_equal(layer.weight.grad, 0)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm(np.zeros((1, 3, 1, 1), np.float32), None, None, training=True)


def test_batch_norm_backward_takes_eps_by_keyword():
    """The forward's (..., training, momentum, eps) order would put momentum in eps's
    place: eps and the saved statistics are keyword-only."""
    x = np.ones((4, 2), np.float32)
    with pytest.raises(TypeError, match="positional"):
        F.batch_norm_backward(x, x, None, None, None, None, True, 0.1, 1e-5)
