"""Independent float64 NumPy references for every fastcnn op, forward and backward.

These are the yardstick the kernels are tested against, so they are written for
clarity, not speed, and deliberately *not* the way the kernels work (no
im2col + GEMM reshaping): convolution is a loop over kernel taps (r, s) that
accumulates one einsum per tap over a strided window of the padded input, and
its backward is the adjoint of the same loop; max pooling walks every window
element explicitly; the losses and batch norm follow their textbook formulas;
dropout carries its own Philox4x32-10.

Every function takes array-likes, computes in float64 and returns float64
(except the dropout helpers, which reproduce the kernel's float32 arithmetic
bit for bit).  The references themselves are checked against central finite
differences in tests/test_reference.py.
"""

import numpy as np

__all__ = [
    "pair", "conv2d_pads", "conv2d_out_size", "conv2d", "conv2d_backward",
    "linear", "linear_backward", "relu", "relu_backward",
    "pool_out_size", "max_pool2d", "max_pool_has_empty_window", "max_pool2d_backward",
    "softmax", "softmax_backward", "log_softmax", "log_softmax_backward",
    "cross_entropy", "cross_entropy_backward",
    "batch_norm", "batch_norm_backward",
    "philox4x32_10", "philox_uniform", "dropout_scale", "dropout_mask",
    "dropout", "dropout_backward", "normalize",
]


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def pair(v):
    """An int or a 2-sequence -> a tuple of two ints."""
    if isinstance(v, (tuple, list)):
        assert len(v) == 2, v
        return int(v[0]), int(v[1])
    return int(v), int(v)


# --------------------------------------------------------------------------- conv2d

def conv2d_pads(padding, kernel_hw, dilation=1):
    """((top, bottom), (left, right)) for an int / pair / 'valid' / 'same' padding.

    'same' follows torch: the total padding is d*(k-1); the extra pixel of an odd
    total goes to the bottom / right.
    """
    r, s = kernel_hw
    dh, dw = pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        assert padding == "same", padding
        th, tw = dh * (r - 1), dw * (s - 1)
        return (th // 2, th - th // 2), (tw // 2, tw - tw // 2)
    ph, pw = pair(padding)
    return (ph, ph), (pw, pw)


def conv2d_out_size(size, k, stride, pad_lo, pad_hi, dilation):
    return (size + pad_lo + pad_hi - dilation * (k - 1) - 1) // stride + 1


def _conv_setup(x, w, stride, padding, dilation, groups):
    x = _f64(x)
    w = _f64(w)
    unbatched = x.ndim == 3
    if unbatched:
        x = x[None]
    n, c, h, wd = x.shape
    k, cg, r, s = w.shape
    assert c == cg * groups and k % groups == 0, (x.shape, w.shape, groups)
    sh, sw = pair(stride)
    dh, dw = pair(dilation)
    (pt, pb), (pl, pr) = conv2d_pads(padding, (r, s), dilation)
    oh = conv2d_out_size(h, r, sh, pt, pb, dh)
    ow = conv2d_out_size(wd, s, sw, pl, pr, dw)
    assert oh >= 1 and ow >= 1, (oh, ow)
    geo = dict(n=n, c=c, h=h, w=wd, k=k, cg=cg, r=r, s=s, g=groups, sh=sh, sw=sw,
               dh=dh, dw=dw, pt=pt, pb=pb, pl=pl, pr=pr, oh=oh, ow=ow)
    return x, w, unbatched, geo


def _tap_window(geo, r, s):
    """Slices of the padded input that kernel tap (r, s) sees for every output pixel."""
    hs = slice(r * geo["dh"], r * geo["dh"] + geo["sh"] * (geo["oh"] - 1) + 1, geo["sh"])
    ws = slice(s * geo["dw"], s * geo["dw"] + geo["sw"] * (geo["ow"] - 1) + 1, geo["sw"])
    return hs, ws


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """x (N, C, H, W) or (C, H, W); w (K, C/groups, R, S); b (K,) or None."""
    x, w, unbatched, geo = _conv_setup(x, w, stride, padding, dilation, groups)
    n, g, cg, k = geo["n"], geo["g"], geo["cg"], geo["k"]
    xp = np.pad(x, ((0, 0), (0, 0), (geo["pt"], geo["pb"]), (geo["pl"], geo["pr"])))
    xg = xp.reshape(n, g, cg, xp.shape[2], xp.shape[3])
    wg = w.reshape(g, k // g, cg, geo["r"], geo["s"])
    out = np.zeros((n, g, k // g, geo["oh"], geo["ow"]))
    for r in range(geo["r"]):
        for s in range(geo["s"]):
            hs, ws = _tap_window(geo, r, s)
            out += np.einsum("ngcij,gkc->ngkij", xg[:, :, :, hs, ws], wg[:, :, :, r, s])
    out = out.reshape(n, k, geo["oh"], geo["ow"])
    if b is not None:
        out += _f64(b)[None, :, None, None]
    return out[0] if unbatched else out


def conv2d_backward(grad_out, x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """Adjoint of conv2d's tap loop -> (grad_x, grad_w, grad_b or None)."""
    x, w, unbatched, geo = _conv_setup(x, w, stride, padding, dilation, groups)
    n, g, cg, k = geo["n"], geo["g"], geo["cg"], geo["k"]
    go = _f64(grad_out)
    if unbatched:
        go = go[None]
    assert go.shape == (n, k, geo["oh"], geo["ow"]), go.shape
    gog = go.reshape(n, g, k // g, geo["oh"], geo["ow"])
    xp = np.pad(x, ((0, 0), (0, 0), (geo["pt"], geo["pb"]), (geo["pl"], geo["pr"])))
    hp, wp = xp.shape[2], xp.shape[3]
    xg = xp.reshape(n, g, cg, hp, wp)
    wg = w.reshape(g, k // g, cg, geo["r"], geo["s"])
    gxp = np.zeros((n, g, cg, hp, wp))
    gw = np.zeros_like(wg)
    for r in range(geo["r"]):
        for s in range(geo["s"]):
            hs, ws = _tap_window(geo, r, s)
            gxp[:, :, :, hs, ws] += np.einsum("ngkij,gkc->ngcij", gog, wg[:, :, :, r, s])
            gw[:, :, :, r, s] = np.einsum("ngkij,ngcij->gkc", gog, xg[:, :, :, hs, ws])
    gx = gxp.reshape(n, geo["c"], hp, wp)[:, :, geo["pt"]:geo["pt"] + geo["h"],
                                          geo["pl"]:geo["pl"] + geo["w"]]
    gb = go.sum(axis=(0, 2, 3)) if b is not None else None
    return (gx[0] if unbatched else gx), gw.reshape(w.shape), gb


# --------------------------------------------------------------------------- linear

def linear(x, w, b=None):
    """x (*, in), w (out, in), b (out,) -> (*, out)."""
    out = np.einsum("...i,oi->...o", _f64(x), _f64(w))
    if b is not None:
        out = out + _f64(b)
    return out


def linear_backward(grad_out, x, w, b=None):
    go, x, w = _f64(grad_out), _f64(x), _f64(w)
    gx = np.einsum("...o,oi->...i", go, w)
    lead = tuple(range(x.ndim - 1))  # the batch axes (any may be 0, as may in or out)
    gw = np.tensordot(go, x, axes=(lead, lead))
    gb = go.sum(axis=lead) if b is not None else None
    return gx, gw, gb


# --------------------------------------------------------------------------- relu

def relu(x):
    x = _f64(x)
    return np.where(x > 0, x, 0.0)


def relu_backward(grad_out, x, guided=False):
    go, x = _f64(grad_out), _f64(x)
    gx = np.where(x > 0, go, 0.0)
    if guided:
        gx = np.where(go > 0, gx, 0.0)
    return gx


# --------------------------------------------------------------------------- max_pool2d

def pool_out_size(size, k, stride, pad, dilation, ceil_mode):
    """torch's pooling_output_shape."""
    num = size + 2 * pad - dilation * (k - 1) - 1
    if ceil_mode:
        out = -(-num // stride) + 1
        # the last window must start inside the input or the left padding
        if (out - 1) * stride >= size + pad:
            out -= 1
    else:
        out = num // stride + 1
    return out


def _pool_params(kernel_size, stride, padding, dilation):
    kh, kw = pair(kernel_size)
    sh, sw = pair(kernel_size if stride is None else stride)
    ph, pw = pair(padding)
    dh, dw = pair(dilation)
    return kh, kw, sh, sw, ph, pw, dh, dw


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """-> (output float64, indices int64); x (N, C, H, W) or (C, H, W).

    Each window is walked in row-major order over its in-bounds elements
    (padding is never selected); an element replaces the running max when it is
    strictly greater or NaN -- torch's rule, so ties keep the first maximum and a
    NaN always wins (with several NaNs, the last one's index).
    """
    x = _f64(x)
    unbatched = x.ndim == 3
    if unbatched:
        x = x[None]
    n, c, h, w = x.shape
    kh, kw, sh, sw, ph, pw, dh, dw = _pool_params(kernel_size, stride, padding, dilation)
    oh = pool_out_size(h, kh, sh, ph, dh, ceil_mode)
    ow = pool_out_size(w, kw, sw, pw, dw, ceil_mode)
    assert oh >= 1 and ow >= 1, (oh, ow)
    out = np.empty((n, c, oh, ow))
    idx = np.empty((n, c, oh, ow), dtype=np.int64)
    for i in range(oh):
        for j in range(ow):
            best = best_idx = None
            for a in range(kh):
                y = i * sh - ph + a * dh
                if not 0 <= y < h:
                    continue
                for b in range(kw):
                    xx = j * sw - pw + b * dw
                    if not 0 <= xx < w:
                        continue
                    v = x[:, :, y, xx]
                    if best is None:
                        best = v.copy()
                        best_idx = np.full((n, c), y * w + xx, dtype=np.int64)
                    else:
                        take = (v > best) | np.isnan(v)
                        best = np.where(take, v, best)
                        best_idx = np.where(take, y * w + xx, best_idx)
            if best is None:
                raise ValueError(f"window ({i}, {j}) holds no input element")
            out[:, :, i, j] = best
            idx[:, :, i, j] = best_idx
    if unbatched:
        return out[0], idx[0]
    return out, idx


def max_pool_has_empty_window(h, w, kernel_size, stride=None, padding=0, dilation=1,
                              ceil_mode=False):
    """True when some window lies entirely in the padding (possible with dilation)."""
    kh, kw, sh, sw, ph, pw, dh, dw = _pool_params(kernel_size, stride, padding, dilation)
    for size, k, s, p, d in ((h, kh, sh, ph, dh), (w, kw, sw, pw, dw)):
        o = pool_out_size(size, k, s, p, d, ceil_mode)
        for i in range(o):
            if not any(0 <= i * s - p + a * d < size for a in range(k)):
                return True
    return False


def max_pool2d_backward(grad_out, x, kernel_size, stride=None, padding=0, dilation=1,
                        ceil_mode=False):
    """Scatter-add every output gradient onto its window's argmax."""
    x = _f64(x)
    _, idx = max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
    go = _f64(grad_out)
    unbatched = x.ndim == 3
    if unbatched:
        x, idx, go = x[None], idx[None], go[None]
    n, c, h, w = x.shape
    gx = np.zeros((n, c, h * w))
    for a in range(n):
        for b in range(c):
            np.add.at(gx[a, b], idx[a, b].ravel(), go[a, b].ravel())
    gx = gx.reshape(n, c, h, w)
    return gx[0] if unbatched else gx


# --------------------------------------------------------------------------- softmax

def softmax(x, dim=-1):
    x = _f64(x)
    e = np.exp(x - x.max(axis=dim, keepdims=True))
    return e / e.sum(axis=dim, keepdims=True)


def log_softmax(x, dim=-1):
    x = _f64(x)
    z = x - x.max(axis=dim, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=dim, keepdims=True))


def softmax_backward(grad_out, out, dim=-1):
    """Jacobian of softmax: dy_i/dx_j = y_i (delta_ij - y_j); takes y = softmax(x)."""
    go, y = _f64(grad_out), _f64(out)
    return y * (go - (go * y).sum(axis=dim, keepdims=True))


def log_softmax_backward(grad_out, out, dim=-1):
    """Jacobian of log_softmax: dy_i/dx_j = delta_ij - softmax_j; takes y = log_softmax(x)."""
    go, y = _f64(grad_out), _f64(out)
    return go - np.exp(y) * go.sum(axis=dim, keepdims=True)


# --------------------------------------------------------------------------- cross_entropy

def _ce_parts(x, target, ignore_index):
    x = _f64(x)
    t = np.asarray(target).astype(np.int64)
    keep = t != ignore_index
    safe = np.where(keep, t, 0)
    assert np.all((safe >= 0) & (safe < x.shape[1])), "target out of range"
    return x, t, keep, safe


def cross_entropy(x, target, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    """x (N, C, *d) logits, target (N, *d) ints.

    per element: (1-eps) * (-logp[y]) + eps * mean_c(-logp[c]), 0 where ignored;
    'mean' divides the sum by the number of non-ignored targets (nan if none).
    """
    x, t, keep, safe = _ce_parts(x, target, ignore_index)
    logp = log_softmax(x, dim=1)
    nll = -np.take_along_axis(logp, safe[:, None], axis=1)[:, 0]
    smooth = -logp.mean(axis=1)
    eps = float(label_smoothing)
    loss = np.where(keep, (1.0 - eps) * nll + eps * smooth, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return np.float64(loss.sum())
    assert reduction == "mean", reduction
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.float64(loss.sum()) / np.float64(keep.sum())


def weighted_cross_entropy(x, target, weight, reduction="mean", ignore_index=-100,
                           label_smoothing=0.0):
    """torch's class-weighted cross-entropy, element by element: (1-eps) w[y] (-logp[y])
    + eps/C sum_c w[c] (-logp[c]), 0 where ignored; 'mean' divides the sum by the
    weights of the counted targets, sum_i w[y_i]."""
    x, t, keep, safe = _ce_parts(x, target, ignore_index)
    logp = np.moveaxis(log_softmax(x, dim=1), 1, -1).reshape(-1, x.shape[1])
    w, eps, c = _f64(weight), float(label_smoothing), x.shape[1]
    losses, total_weight = [], 0.0
    for row, y, counted in zip(logp, safe.reshape(-1), keep.reshape(-1)):
        if not counted:
            losses.append(0.0)
            continue
        smooth = sum(w[k] * -row[k] for k in range(c))
        losses.append((1 - eps) * w[y] * -row[y] + eps / c * smooth)
        total_weight += w[y]
    loss = np.array(losses).reshape(t.shape)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return np.float64(loss.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.float64(loss.sum()) / np.float64(total_weight)


def soft_cross_entropy(x, probs, weight=None, reduction="mean", label_smoothing=0.0):
    """torch's cross-entropy with class-probability targets, row by row:
    -sum_c w[c] y[c] log softmax(x)[c], y = (1 - eps) probs + eps / C; 'mean' over rows."""
    x, y = _f64(x), _f64(probs)
    c = x.shape[0] if x.ndim == 1 else x.shape[1]
    rows = x[None] if x.ndim == 1 else np.moveaxis(x, 1, -1).reshape(-1, c)
    targets = y[None] if y.ndim == 1 else np.moveaxis(y, 1, -1).reshape(-1, c)
    w = np.ones(c) if weight is None else _f64(weight)
    eps = float(label_smoothing)
    losses = []
    for row, p in zip(rows, targets):
        lse = np.log(np.sum(np.exp(row - row.max()))) + row.max()
        losses.append(sum(-w[k] * ((1 - eps) * p[k] + eps / c) * (row[k] - lse)
                          for k in range(c)))
    shape = () if x.ndim == 1 else (x.shape[0],) + x.shape[2:]
    loss = np.array(losses).reshape(shape)
    if reduction == "none":
        return loss
    return np.float64(loss.sum() if reduction == "sum" else loss.mean())


def cross_entropy_backward(grad_out, x, target, reduction="mean", ignore_index=-100,
                           label_smoothing=0.0):
    """d loss_i / d x_ic = softmax_ic - (1-eps) [c == y_i] - eps / C, times the
    weight of sample i (grad_out[i] | grad_out | grad_out / count), 0 where ignored.

    'mean' with every target ignored gives zeros (what torch's autograd returns).
    """
    x, t, keep, safe = _ce_parts(x, target, ignore_index)
    c = x.shape[1]
    eps = float(label_smoothing)
    onehot = (np.arange(c).reshape((1, c) + (1,) * (x.ndim - 2)) == safe[:, None])
    dloss = softmax(x, dim=1) - (1.0 - eps) * onehot - eps / c
    go = _f64(grad_out)
    if reduction in ("none", "sum"):
        weight = go * keep
    else:
        count = keep.sum()
        weight = go / count * keep if count > 0 else np.zeros(keep.shape)
    return dloss * np.asarray(weight, dtype=np.float64)[:, None]


# --------------------------------------------------------------------------- batch_norm

def _bn_axes(x):
    return (0,) + tuple(range(2, x.ndim))


def _bn_bcast(v, x):
    return _f64(v).reshape((1, -1) + (1,) * (x.ndim - 2))


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """-> (output, new_running_mean, new_running_var); the running stats are
    returned (None when not given), never modified."""
    x = _f64(x)
    axes = _bn_axes(x)
    new_rm, new_rv = running_mean, running_var
    if training:
        n = x.size // x.shape[1]
        mean = x.mean(axis=axes)
        var = ((x - _bn_bcast(mean, x)) ** 2).mean(axis=axes)
        if running_mean is not None:
            new_rm = (1 - momentum) * _f64(running_mean) + momentum * mean
        if running_var is not None:
            new_rv = (1 - momentum) * _f64(running_var) + momentum * var * n / (n - 1)
    else:
        mean, var = _f64(running_mean), _f64(running_var)
    out = (x - _bn_bcast(mean, x)) / np.sqrt(_bn_bcast(var, x) + eps)
    if weight is not None:
        out = out * _bn_bcast(weight, x)
    if bias is not None:
        out = out + _bn_bcast(bias, x)
    return out, new_rm, new_rv


def batch_norm_backward(grad_out, x, running_mean, running_var, weight=None, bias=None,
                        training=False, eps=1e-5):
    """-> (grad_x, grad_weight or None, grad_bias or None).

    training: xhat = (x - mu) / sigma with batch stats, dxhat = g * gamma,
      dx = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) / sigma.
    eval: the running stats are constants, dx = g * gamma / sqrt(running_var + eps).
    """
    x, go = _f64(x), _f64(grad_out)
    axes = _bn_axes(x)
    if training:
        mean = x.mean(axis=axes)
        var = ((x - _bn_bcast(mean, x)) ** 2).mean(axis=axes)
    else:
        mean, var = _f64(running_mean), _f64(running_var)
    inv_std = 1.0 / np.sqrt(_bn_bcast(var, x) + eps)
    xhat = (x - _bn_bcast(mean, x)) * inv_std
    gamma = _bn_bcast(weight, x) if weight is not None else 1.0
    dxhat = go * gamma
    if training:
        gx = (dxhat - dxhat.mean(axis=axes, keepdims=True)
              - xhat * (dxhat * xhat).mean(axis=axes, keepdims=True)) * inv_std
    else:
        gx = dxhat * inv_std
    gw = (go * xhat).sum(axis=axes) if weight is not None else None
    gb = go.sum(axis=axes) if bias is not None else None
    return gx, gw, gb


# --------------------------------------------------------------------------- dropout

_MASK32 = np.uint64(0xFFFFFFFF)
_PHILOX_M0 = np.uint64(0xD2511F53)
_PHILOX_M1 = np.uint64(0xCD9E8D57)
_PHILOX_W0 = 0x9E3779B9
_PHILOX_W1 = 0xBB67AE85


def philox4x32_10(counter, key):
    """Philox4x32-10 (Random123).  counter: 4 arrays (or ints) of uint32 words,
    key: 2 ints.  Returns 4 uint64 arrays holding the uint32 output words.

    uint64 arithmetic: a 32x32-bit product fits exactly, hi = p >> 32, lo = p & mask.
    """
    c0, c1, c2, c3 = (np.asarray(v, dtype=np.uint64) & _MASK32 for v in counter)
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    for rnd in range(10):
        if rnd > 0:
            k0 = (k0 + _PHILOX_W0) & 0xFFFFFFFF
            k1 = (k1 + _PHILOX_W1) & 0xFFFFFFFF
        p0 = _PHILOX_M0 * c0
        p1 = _PHILOX_M1 * c2
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        c0, c1, c2, c3 = (hi1 ^ c1 ^ np.uint64(k0), lo1, hi0 ^ c3 ^ np.uint64(k1), lo0)
    return c0, c1, c2, c3


def philox_uniform(numel, seed, offset=0):
    """r in [0, 1) for flat element indices 0..numel-1: element e uses output lane
    e % 4 of the block with counter (e // 4 lo, e // 4 hi, offset lo, offset hi),
    key (seed lo, seed hi); r = (u >> 8) * 2**-24."""
    seed, offset = int(seed), int(offset)
    assert 0 <= seed < 2 ** 64 and 0 <= offset < 2 ** 64
    e = np.arange(numel, dtype=np.uint64)
    j = e // np.uint64(4)
    lanes = philox4x32_10(
        (j & _MASK32, j >> np.uint64(32),
         np.full_like(j, offset & 0xFFFFFFFF), np.full_like(j, offset >> 32)),
        (seed & 0xFFFFFFFF, seed >> 32))
    u = np.choose((e % np.uint64(4)).astype(np.intp), lanes)
    return (u >> np.uint64(8)).astype(np.float64) * 2.0 ** -24


def dropout_scale(p):
    """1 / (1 - p) computed in double, rounded to float32 (unused for p = 1: 0)."""
    return np.float32(1.0 / (1.0 - float(p))) if p < 1 else np.float32(0)


def dropout_mask(shape, p, seed, offset=0):
    """float32 multiplier: dropout_scale(p) where kept (r >= p), 0 where dropped."""
    shape = tuple(shape)
    numel = int(np.prod(shape, dtype=np.int64))
    r = philox_uniform(numel, seed, offset).reshape(shape)
    return np.where(r >= float(p), dropout_scale(p), np.float32(0)).astype(np.float32)


def dropout(x, p=0.5, training=True, seed=0, offset=0):
    """float32, bit-exact: x (float32) * mask (float32)."""
    x = np.asarray(x, dtype=np.float32)
    if not training or p == 0:
        return x.copy()
    return (x * dropout_mask(x.shape, p, seed, offset)).astype(np.float32)


def dropout_backward(grad_out, p=0.5, training=True, seed=0, offset=0):
    return dropout(grad_out, p, training, seed, offset)


# --------------------------------------------------------------------------- normalize

def normalize(x, mean=None, std=None, dim=-3):
    """x uint8 -> x / 255, then (out - mean[c]) / std[c] along axis dim."""
    x = np.asarray(x)
    out = x.astype(np.float64) / 255.0
    if mean is None and std is None:
        return out

    def along_dim(v, default):
        v = np.atleast_1d(_f64(default if v is None else v)).ravel()
        if v.size == 1:
            return v[0]
        shape = [1] * out.ndim
        shape[dim] = v.size
        return v.reshape(shape)

    return (out - along_dim(mean, 0.0)) / along_dim(std, 1.0)
