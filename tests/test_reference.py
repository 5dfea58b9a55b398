"""Validates the float64 references themselves (no fastcnn needed).

Every reference backward is checked against central finite differences of the
reference forward; the forwards are checked against even plainer scalar loops
or definitions; the Philox reference against Random123's known-answer vectors.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from conftest import check_vjp

# --------------------------------------------------------------------------- conv2d


def naive_conv2d(x, w, b, stride, padding, dilation, groups):
    """Seven nested scalar loops: the definition of a grouped, dilated convolution."""
    n_, c_, h_, w_ = x.shape
    k_, cg, r_, s_ = w.shape
    sh, sw = ref.pair(stride)
    dh, dw = ref.pair(dilation)
    (pt, pb), (pl, pr) = ref.conv2d_pads(padding, (r_, s_), dilation)
    oh = (h_ + pt + pb - dh * (r_ - 1) - 1) // sh + 1
    ow = (w_ + pl + pr - dw * (s_ - 1) - 1) // sw + 1
    kg = k_ // groups
    out = np.zeros((n_, k_, oh, ow))
    for n in range(n_):
        for k in range(k_):
            g = k // kg
            for i in range(oh):
                for j in range(ow):
                    acc = 0.0 if b is None else b[k]
                    for c in range(cg):
                        for r in range(r_):
                            for s in range(s_):
                                y = i * sh - pt + r * dh
                                xx = j * sw - pl + s * dw
                                if 0 <= y < h_ and 0 <= xx < w_:
                                    acc += x[n, g * cg + c, y, xx] * w[k, c, r, s]
                    out[n, k, i, j] = acc
    return out


CONV_CASES = [
    # x shape, w shape, bias, stride, padding, dilation, groups
    ((2, 3, 5, 6), (4, 3, 3, 2), False, 1, 0, 1, 1),
    ((1, 2, 7, 6), (3, 2, 3, 3), True, (2, 1), (1, 2), (1, 2), 1),
    ((1, 4, 6, 5), (6, 2, 3, 3), True, 2, 1, 1, 2),
    ((2, 3, 5, 5), (6, 1, 3, 3), False, 1, 2, 2, 3),          # depthwise, multiplier 2
    ((1, 3, 6, 7), (2, 3, 4, 2), True, 1, "same", (1, 2), 1),  # asymmetric 'same'
    ((1, 2, 5, 5), (2, 2, 2, 2), False, 1, "valid", 1, 1),
    ((2, 2, 7, 8), (3, 2, 1, 1), True, 3, 0, 1, 1),           # 1x1, stride > kernel
    ((1, 2, 4, 9), (2, 1, 2, 5), True, (1, 3), (0, 2), (2, 1), 2),
]


@pytest.mark.parametrize("xs, ws, bias, stride, padding, dilation, groups", CONV_CASES)
def test_conv2d_reference_matches_naive_loops(xs, ws, bias, stride, padding, dilation,
                                              groups, rng):
    x = rng.standard_normal(xs)
    w = rng.standard_normal(ws)
    b = rng.standard_normal(ws[0]) if bias else None
    np.testing.assert_allclose(ref.conv2d(x, w, b, stride, padding, dilation, groups),
                               naive_conv2d(x, w, b, stride, padding, dilation, groups),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("xs, ws, bias, stride, padding, dilation, groups", CONV_CASES)
def test_conv2d_reference_backward_vs_finite_differences(xs, ws, bias, stride, padding,
                                                         dilation, groups, rng):
    x = rng.standard_normal(xs)
    w = rng.standard_normal(ws)
    b = rng.standard_normal(ws[0]) if bias else None
    go = rng.standard_normal(ref.conv2d(x, w, b, stride, padding, dilation, groups).shape)
    gx, gw, gb = ref.conv2d_backward(go, x, w, b, stride, padding, dilation, groups)

    def fwd(x_, w_, b_):
        return ref.conv2d(x_, w_, b_, stride, padding, dilation, groups)

    check_vjp(fwd, [x, w, b], 0, go, gx)
    check_vjp(fwd, [x, w, b], 1, go, gw)
    if bias:
        check_vjp(fwd, [x, w, b], 2, go, gb)
    else:
        assert gb is None


def test_conv2d_reference_unbatched(rng):
    x = rng.standard_normal((3, 6, 5))
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    out = ref.conv2d(x, w, b, 1, 1)
    np.testing.assert_allclose(out, ref.conv2d(x[None], w, b, 1, 1)[0])
    go = rng.standard_normal(out.shape)
    gx, gw, gb = ref.conv2d_backward(go, x, w, b, 1, 1)
    gx1, gw1, gb1 = ref.conv2d_backward(go[None], x[None], w, b, 1, 1)
    np.testing.assert_allclose(gx, gx1[0])
    np.testing.assert_allclose(gw, gw1)
    np.testing.assert_allclose(gb, gb1)


@settings(max_examples=10)
@given(st.data())
def test_conv2d_reference_random_params_vs_naive(data):
    g = data.draw(st.integers(1, 2))
    cg, kg = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))
    r, s = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    sh, sw, dh, dw = (data.draw(st.integers(1, 3)) for _ in range(4))
    ph, pw = data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2))
    h = max(1, dh * (r - 1) + 1 - 2 * ph) + data.draw(st.integers(0, 3))
    w_ = max(1, dw * (s - 1) + 1 - 2 * pw) + data.draw(st.integers(0, 3))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    x = rng.standard_normal((2, g * cg, h, w_))
    w = rng.standard_normal((g * kg, cg, r, s))
    b = rng.standard_normal(g * kg)
    args = ((sh, sw), (ph, pw), (dh, dw), g)
    np.testing.assert_allclose(ref.conv2d(x, w, b, *args), naive_conv2d(x, w, b, *args),
                               rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- linear / relu


@pytest.mark.parametrize("xs", [(5,), (3, 5), (2, 3, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_reference(xs, bias, rng):
    x = rng.standard_normal(xs)
    w = rng.standard_normal((4, 5))
    b = rng.standard_normal(4) if bias else None
    out = ref.linear(x, w, b)
    direct = x @ w.T + (b if bias else 0.0)
    np.testing.assert_allclose(out, direct, rtol=1e-12, atol=1e-12)
    go = rng.standard_normal(out.shape)
    gx, gw, gb = ref.linear_backward(go, x, w, b)
    check_vjp(ref.linear, [x, w, b], 0, go, gx)
    check_vjp(ref.linear, [x, w, b], 1, go, gw)
    if bias:
        check_vjp(ref.linear, [x, w, b], 2, go, gb)
    else:
        assert gb is None


def test_relu_reference(rng):
    x = rng.standard_normal((3, 4, 5))
    x[np.abs(x) < 1e-3] = 0.5  # keep finite differences away from the kink
    np.testing.assert_array_equal(ref.relu(x), np.maximum(x, 0))
    go = rng.standard_normal(x.shape)
    check_vjp(ref.relu, [x], 0, go, ref.relu_backward(go, x))
    guided = ref.relu_backward(go, x, guided=True)
    np.testing.assert_array_equal(guided, np.where((x > 0) & (go > 0), go, 0.0))


# --------------------------------------------------------------------------- max_pool2d

POOL_CASES = [
    # x shape, kernel, stride, padding, dilation, ceil_mode
    ((2, 3, 6, 6), 2, None, 0, 1, False),
    ((1, 2, 7, 5), 3, 2, 1, 1, False),
    ((1, 2, 7, 5), 3, 2, 1, 1, True),
    ((2, 1, 8, 9), (3, 2), (1, 2), (1, 1), (2, 1), True),
    ((1, 2, 5, 7), (2, 4), 3, (1, 2), 1, True),
    ((1, 1, 9, 9), 3, 1, 0, 3, False),
    ((3, 5, 5), 2, 1, 1, 1, False),                            # unbatched
]


def naive_pool_out(size, k, s, p, d, ceil_mode):
    """Output size by enumerating windows in padded coordinates: floor mode keeps the
    windows that fit in the padded input; ceil mode also keeps one partial window
    when the previous one stopped short of the last padded element, provided it
    starts inside the input or the left padding."""
    padded, span = size + 2 * p, d * (k - 1) + 1
    count = 0
    while True:
        start = count * s
        if start + span > padded:
            if not ceil_mode or count == 0:
                break
            if (count - 1) * s + span - 1 >= padded - 1:
                break
        if ceil_mode and start >= size + p:
            break
        count += 1
    return count


@pytest.mark.parametrize("size, k, s, p, d", [
    (7, 3, 2, 1, 1), (8, 3, 2, 0, 1), (5, 2, 2, 1, 1), (6, 3, 3, 1, 1), (9, 2, 3, 1, 2),
    (4, 4, 4, 2, 1), (10, 3, 4, 1, 1), (1, 1, 1, 0, 1), (5, 5, 1, 2, 1)])
def test_pool_out_size_matches_enumeration(size, k, s, p, d):
    for ceil_mode in (False, True):
        assert ref.pool_out_size(size, k, s, p, d, ceil_mode) == \
            naive_pool_out(size, k, s, p, d, ceil_mode), ceil_mode


def test_pool_out_size_hand_examples():
    assert ref.pool_out_size(5, 2, 2, 0, 1, True) == 3
    assert ref.pool_out_size(5, 2, 2, 0, 1, False) == 2
    assert ref.pool_out_size(4, 2, 2, 0, 1, True) == 2
    # ceil mode's extra window would start in the right padding -> dropped
    assert ref.pool_out_size(5, 2, 2, 1, 1, True) == 3
    assert ref.pool_out_size(5, 2, 2, 1, 1, False) == 3


@pytest.mark.parametrize("xs, k, s, p, d, ceil_mode", POOL_CASES)
def test_max_pool2d_reference_backward_vs_finite_differences(xs, k, s, p, d, ceil_mode, rng):
    x = rng.permutation(np.prod(xs)).reshape(xs) * 0.01 + rng.uniform(0, 1e-3, xs)
    out, idx = ref.max_pool2d(x, k, s, p, d, ceil_mode)
    go = rng.standard_normal(out.shape)
    gx = ref.max_pool2d_backward(go, x, k, s, p, d, ceil_mode)

    def fwd(x_):
        return ref.max_pool2d(x_, k, s, p, d, ceil_mode)[0]

    check_vjp(fwd, [x], 0, go, gx)
    # indices point at the maximum
    flat = x.reshape(x.shape[:-2] + (-1,))
    np.testing.assert_array_equal(
        np.take_along_axis(flat, idx.reshape(idx.shape[:-2] + (-1,)), axis=-1),
        out.reshape(out.shape[:-2] + (-1,)))


def test_max_pool2d_reference_ties_and_nan():
    x = np.array([[[[1.0, 3.0, 3.0, 0.0],
                    [3.0, 2.0, np.nan, 5.0],
                    [0.0, 0.0, -np.inf, -np.inf],
                    [0.0, 0.0, -np.inf, -np.inf]]]])
    out, idx = ref.max_pool2d(x, 2)
    np.testing.assert_array_equal(out[0, 0], [[3.0, np.nan], [0.0, -np.inf]])
    np.testing.assert_array_equal(idx[0, 0], [[1, 6], [8, 10]])


# --------------------------------------------------------------------------- softmax


@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2])
def test_softmax_references(dim, rng):
    x = rng.standard_normal((3, 4, 5))
    y = ref.softmax(x, dim)
    np.testing.assert_allclose(y.sum(axis=dim), 1.0)
    np.testing.assert_allclose(y, np.exp(x) / np.exp(x).sum(axis=dim, keepdims=True))
    ly = ref.log_softmax(x, dim)
    np.testing.assert_allclose(ly, np.log(y))
    go = rng.standard_normal(x.shape)
    check_vjp(lambda v: ref.softmax(v, dim), [x], 0, go, ref.softmax_backward(go, y, dim))
    check_vjp(lambda v: ref.log_softmax(v, dim), [x], 0, go,
              ref.log_softmax_backward(go, ly, dim))


def test_softmax_reference_huge_logits():
    x = np.array([[1e4, 0.0, -1e4], [1e4, 1e4, -1e4]])
    np.testing.assert_allclose(ref.softmax(x), [[1, 0, 0], [0.5, 0.5, 0]])
    np.testing.assert_allclose(ref.log_softmax(x),
                               [[0, -1e4, -2e4], [-math.log(2), -math.log(2), -2e4 - math.log(2)]])


# --------------------------------------------------------------------------- cross_entropy


def loop_cross_entropy(x, t, reduction, ignore_index, eps):
    """Per-sample scalar loops over (N, C, *d) flattened to (N*prod(d), C)."""
    c = x.shape[1]
    rows = np.moveaxis(x, 1, -1).reshape(-1, c)
    targets = t.reshape(-1)
    losses, count = [], 0
    for row, y in zip(rows, targets):
        if y == ignore_index:
            losses.append(0.0)
            continue
        count += 1
        lse = math.log(sum(math.exp(v - row.max()) for v in row)) + row.max()
        logp = [v - lse for v in row]
        losses.append((1 - eps) * -logp[y] + eps * -sum(logp) / c)
    if reduction == "none":
        return np.array(losses).reshape(t.shape)
    if reduction == "sum":
        return sum(losses)
    return sum(losses) / count if count else float("nan")


CE_CASES = [((4, 5), ()), ((2, 3, 2, 3), (2, 3)), ((3, 1), ()), ((2, 4, 3), (3,))]


@pytest.mark.parametrize("xs, _d", CE_CASES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("eps", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("ignore_index", [-100, 0])
def test_cross_entropy_reference(xs, _d, reduction, eps, ignore_index, rng):
    x = rng.standard_normal(xs)
    t = rng.integers(0, xs[1], (xs[0],) + xs[2:])
    t.reshape(-1)[0] = ignore_index if ignore_index < 0 else t.reshape(-1)[0]
    loss = ref.cross_entropy(x, t, reduction, ignore_index, eps)
    np.testing.assert_allclose(loss, loop_cross_entropy(x, t, reduction, ignore_index, eps),
                               rtol=1e-12, atol=1e-12)
    if np.isnan(loss).any():
        return
    go = rng.standard_normal(t.shape) if reduction == "none" else 1.7
    gx = ref.cross_entropy_backward(go, x, t, reduction, ignore_index, eps)
    check_vjp(lambda v: ref.cross_entropy(v, t, reduction, ignore_index, eps), [x], 0, go, gx)


def test_cross_entropy_reference_all_ignored():
    x = np.ones((3, 4))
    t = np.full(3, -100)
    assert np.isnan(ref.cross_entropy(x, t))
    assert ref.cross_entropy(x, t, "sum") == 0.0
    np.testing.assert_array_equal(ref.cross_entropy(x, t, "none"), 0.0)
    np.testing.assert_array_equal(ref.cross_entropy_backward(1.0, x, t), 0.0)


# --------------------------------------------------------------------------- batch_norm


@pytest.mark.parametrize("xs", [(5, 3), (3, 2, 4), (2, 3, 3, 2)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_reference(xs, training, affine, rng):
    c = xs[1]
    x = rng.standard_normal(xs) * 2 + 1
    rm, rv = rng.standard_normal(c), rng.uniform(0.5, 2, c)
    w = rng.standard_normal(c) if affine else None
    b = rng.standard_normal(c) if affine else None
    out, nrm, nrv = ref.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
    axes = (0,) + tuple(range(2, len(xs)))
    if training:
        moved = np.moveaxis(x, 1, 0).reshape(c, -1)
        np.testing.assert_allclose(nrm, 0.9 * rm + 0.1 * moved.mean(axis=1))
        np.testing.assert_allclose(nrv, 0.9 * rv + 0.1 * moved.var(axis=1, ddof=1))
        if not affine:
            np.testing.assert_allclose(out.mean(axis=axes), 0, atol=1e-12)
            np.testing.assert_allclose(out.var(axis=axes), 1, rtol=1e-4)
    else:
        assert nrm is rm and nrv is rv
    go = rng.standard_normal(xs)
    gx, gw, gb = ref.batch_norm_backward(go, x, rm, rv, w, b, training, 1e-5)

    def fwd(x_, w_, b_):
        return ref.batch_norm(x_, rm, rv, w_, b_, training, 0.1, 1e-5)[0]

    check_vjp(fwd, [x, w, b], 0, go, gx)
    if affine:
        check_vjp(fwd, [x, w, b], 1, go, gw)
        check_vjp(fwd, [x, w, b], 2, go, gb)
    else:
        assert gw is None and gb is None


# --------------------------------------------------------------------------- dropout / Philox

# Random123 tests/kat_vectors: counter (4 words), key (2 words) -> output (4 words)
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    got = ref.philox4x32_10(counter, key)
    assert tuple(int(v) for v in got) == expected


def scalar_philox(counter, key):
    """Philox4x32-10 on Python ints, key bumped before rounds 2..10 (Random123's order)."""
    c = list(counter)
    k0, k1 = key
    for rnd in range(10):
        if rnd:
            k0, k1 = (k0 + 0x9E3779B9) % 2 ** 32, (k1 + 0xBB67AE85) % 2 ** 32
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 % 2 ** 32, (p0 >> 32) ^ c[3] ^ k1, p0 % 2 ** 32]
    return c


@pytest.mark.parametrize("seed, offset", [(0, 0), (42, 7), (2 ** 40 + 3, 2 ** 33 + 5),
                                          (2 ** 64 - 1, 2 ** 64 - 1)])
def test_philox_uniform_layout(seed, offset):
    numel = 23
    r = ref.philox_uniform(numel, seed, offset)
    for e in range(numel):
        j = e // 4
        u = scalar_philox((j % 2 ** 32, j >> 32, offset % 2 ** 32, offset >> 32),
                          (seed % 2 ** 32, seed >> 32))[e % 4]
        assert r[e] == (u >> 8) / 2 ** 24, e


def test_dropout_reference_mask():
    p = 0.25
    m = ref.dropout_mask((1000, 100), p, seed=1, offset=0)
    assert m.dtype == np.float32
    assert set(np.unique(m)) == {np.float32(0), np.float32(1 / 0.75)}
    assert abs((m > 0).mean() - 0.75) < 0.01
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(ref.dropout(x, 0.5, True, 3, 1),
                                  x * ref.dropout_mask((3, 4), 0.5, 3, 1))
    np.testing.assert_array_equal(ref.dropout(x, 0.5, False, 3, 1), x)


# --------------------------------------------------------------------------- normalize


def test_normalize_reference(rng):
    x = rng.integers(0, 256, (2, 3, 4, 5)).astype(np.uint8)
    np.testing.assert_allclose(ref.normalize(x), x / 255.0)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    out = ref.normalize(x, mean, std)
    for c in range(3):
        np.testing.assert_allclose(out[:, c], (x[:, c] / 255.0 - mean[c]) / std[c])
    out = ref.normalize(x, 0.5, 0.25, dim=-1)
    np.testing.assert_allclose(out, (x / 255.0 - 0.5) / 0.25)
    out = ref.normalize(x, [1, 2, 3, 4, 5], [1, 2, 3, 4, 5], dim=-1)
    np.testing.assert_allclose(out[..., 4], (x[..., 4] / 255.0 - 5) / 5)
