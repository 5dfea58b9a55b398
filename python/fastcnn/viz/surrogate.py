"""Surrogate models over features (Captum's Lime and KernelShap): score copies of the
image in which each feature (a pixel, a superpixel, any labelled region) is either the
input's or the baseline's, and fit a linear model of the score on which features were
the input's; its coefficients are the attributions. KernelSHAP draws the copies and
fits them so that the coefficients estimate the Shapley values; LIME weighs each copy
by how close it is to the input and fits a lasso."""

import numpy as np

from .. import _backend as B
from ._common import as_input, check_seed, to_host, unbatch
from .ablation import _features, _spread
from .attribution import _real_arg

__all__ = ["kernel_shap", "lime"]

_DISTANCES = ("cosine", "euclidean")


def _score_coalitions(evaluate, index, coalitions, xp):
    """The scores (host float64) of the copies of each image i whose features where
    ``coalitions[i]`` (bool, (copies, features of image i)) holds are the input's."""
    sizes = [len(c) for c in coalitions]
    width = max([c.shape[1] for c in coalitions] + [1])
    table = np.zeros((sum(sizes), width), bool)
    start = 0
    for c in coalitions:
        table[start:start + len(c), :c.shape[1]] = c
        start += len(c)
    image = np.repeat(np.arange(len(coalitions)), sizes)
    table = xp.asarray(table)

    def keep(first, last):
        where = index[xp.asarray(image[first:last])]
        mine = xp.take_along_axis(table[first:last], where.reshape(last - first, -1), axis=1)
        return mine.reshape(where.shape)

    return np.split(evaluate(image, keep), np.cumsum(sizes)[:-1])


def _kernel_shap_coalitions(k, n_samples, seed):
    """The coalitions KernelSHAP scores for an image of k features besides the input
    itself: the empty one (the baseline), then n_samples - 2 drawn from the Shapley
    kernel (a size s in 1 .. k - 1 with probability proportional to 1 / (s (k - s)),
    then s features uniformly). Bool, (n_samples - 1, k); just the empty one if k < 2,
    where there is nothing to draw."""
    if k < 2:
        return np.zeros((1, k), bool)
    rng = np.random.default_rng(seed)
    sizes = np.arange(1, k)
    p = 1.0 / (sizes * (k - sizes))
    size = rng.choice(sizes, size=n_samples - 2, p=p / p.sum())
    rank = rng.random((n_samples - 2, k)).argsort(axis=1).argsort(axis=1)
    return np.concatenate([np.zeros((1, k), bool), rank < size[:, None]])


def _least_norm(a, y):
    """The least-squares solution of a b = y of least norm (numpy's lstsq), through the
    eigendecomposition of the smaller Gram matrix (a^T a or a a^T): several times faster
    than lstsq's SVD for the hundreds of samples and features of a pixel mask.
    Eigenvalues below 1e-11 of the largest count as zero (singular values below about
    3e-6 of the largest; 0/1 coalition matrices are far better conditioned than that, or
    exactly singular)."""
    m, k = a.shape
    if m == 0 or k == 0:
        return np.zeros(k)
    gram = a.T @ a if m >= k else a @ a.T
    lam, vec = np.linalg.eigh(gram)
    keep = lam > 1e-11 * max(lam[-1], 0.0)
    if not keep.any():
        return np.zeros(k)
    vec, lam = vec[:, keep], lam[keep]
    if m >= k:
        return vec @ ((vec.T @ (a.T @ y)) / lam)
    return a.T @ (vec @ ((vec.T @ y) / lam))


def _kernel_shap_fit(z, v, v0, v1):
    """The least-squares coefficients phi of v ~ v0 + z phi over the drawn coalitions z
    (bool (m, k)) with the ends held exactly: sum(phi) = v1 - v0. Of the minimisers the
    one of least norm (what Captum's regression, weighing the ends a million times the
    rest, approaches): phi = (v1 - v0) / k + u with u summing to 0, found by least
    squares on the row-centred z, whose least-norm solution sums to 0 by itself."""
    k = z.shape[1]
    if k == 0:
        return np.zeros(0)
    change = v1 - v0
    phi = np.full(k, change / k)
    if len(z):
        z = z.astype(np.float64)
        y = v - v0 - z.sum(axis=1) * (change / k)
        phi += _least_norm(z - z.mean(axis=1, keepdims=True), y)
    return phi


def kernel_shap(model, x, target=None, *, feature_mask=None, baseline=0.0, n_samples=25,
                seed=0, score="logit", batch_size=256, train=False):
    """Kernel SHAP (Lundberg and Lee; Captum's KernelShap): Shapley values of the
    features estimated by a linear regression of the score on which features are the
    input's, over coalitions drawn from the Shapley kernel. ``n_samples`` counts the
    scored copies as Captum does: the input, the baseline and n_samples - 2 drawn ones.
    The coefficients add up to score(x) - score(baseline) exactly (Captum weighs the two
    ends a million times the others to approach it); where the draws do not determine
    them (fewer draws than features), the least-norm ones. They converge to
    :func:`shapley_values` as n_samples grows. A feature whose elements all equal the
    baseline's is a null player: its value is 0 exactly, and the coalitions are drawn
    over the other features (as the shap package's KernelExplainer does; Captum draws
    over all, so a null player gets sampling noise).

    The draws come from ``seed`` (numpy's default_rng), the same for every image, so an
    image gets the same result alone or in any batch; Captum draws torch's.
    feature_mask, baseline, score, batch_size, target: as :func:`feature_ablation`.
    Shaped like x.
    """
    op = "kernel_shap"
    seed = check_seed(seed, op)
    x, single, xp = as_input(model, x, op)
    n_samples = B.as_count(n_samples, f"{op}: n_samples (the input, the baseline and the "
                                      f"draws)", least=2)
    ids, index, base, initial, evaluate = _features(model, x, target, feature_mask, baseline,
                                                    score, batch_size, train, op)
    varying = [_varying(x[i], base[i], index[i], len(f), xp) for i, f in enumerate(ids)]
    drawn = [_kernel_shap_coalitions(int(v.sum()), n_samples, seed) for v in varying]
    coalitions = []
    for v, d in zip(varying, drawn):
        c = np.zeros((len(d), len(v)), bool)   # the null players stay the baseline's
        c[:, v] = d
        coalitions.append(c)
    values = _score_coalitions(evaluate, index, coalitions, xp)
    full = to_host(initial)
    phis = []
    for i, (v, d, scores) in enumerate(zip(varying, drawn, values)):
        phi = np.zeros(len(v))
        phi[v] = _kernel_shap_fit(d[1:], scores[1:], scores[0], full[i])
        phis.append(phi)
    return unbatch(_spread(phis, index, x, xp), single)


def _per_feature(values, index, k, xp):
    """Each array of ``values`` (one image's, (C, H, W)) summed over the elements of each
    of its k features (index: (C or 1, H, W)): host float64 arrays of k."""
    where = xp.broadcast_to(index, values[0].shape).ravel()
    return [to_host(xp.bincount(where, weights=v.ravel().astype(np.float64), minlength=k))
            for v in values]


def _varying(a, b, index, k, xp):
    """Which of an image's k features (host bool) have an element where the input
    differs from the baseline; the others are null players (no coalition's score
    depends on them)."""
    return _per_feature([a != b], index, k, xp)[0] > 0


def _lime_coalitions(k, n_samples, seed):
    """LIME's coalitions for an image of k features: every feature the input's with
    probability 1/2, independently. Bool, (n_samples, k)."""
    return np.random.default_rng(seed).random((n_samples, k)) < 0.5


def _feature_sums(a, b, index, k, xp):
    """Per feature of one image (k, host float64): the sums over its elements of a*a,
    b*b, a*b and (a - b)**2."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return _per_feature([a * a, b * b, a * b, (a - b) ** 2], index, k, xp)


def _lime_weights(z, sums, distance, kernel_width):
    """exp(-d**2 / (2 kernel_width**2)) for each copy z (bool (m, k)), d its distance to
    the input: 1 - cosine similarity (each norm at least 1e-8, as torch's) or the
    Euclidean one, from the features' sums (copy = input where z, baseline elsewhere)."""
    xx, bb, xb, diff = sums
    z = z.astype(np.float64)
    if distance == "cosine":
        dot = z @ xx + (1 - z) @ xb
        norm = np.sqrt(np.maximum(z @ xx + (1 - z) @ bb, 0))
        d = 1 - dot / (max(np.sqrt(xx.sum()), 1e-8) * np.maximum(norm, 1e-8))
    else:
        d = np.sqrt(np.maximum((1 - z) @ diff, 0))
    return np.exp(-d ** 2 / (2 * kernel_width ** 2))


def _soft(v, t):
    return np.sign(v) * np.maximum(np.abs(v) - t, 0)


def _lasso_on_support(a, t, alpha, b):
    """The exact lasso solution with b's support and signs, if those are the optimal
    ones (the optimality conditions hold); None otherwise."""
    s = np.flatnonzero(b)
    sign = np.sign(b[s])
    out = np.zeros_like(b)
    if len(s):
        a_s = a[:, s]
        out[s] = np.linalg.lstsq(a_s.T @ a_s, a_s.T @ t - alpha * sign, rcond=None)[0]
        if np.any(np.sign(out[s]) != sign):
            return None
    g = a.T @ (t - a @ out)   # alpha * sign on the support, within [-alpha, alpha] off it
    slack = 1e-9 * max(alpha, np.abs(a.T @ t).max())
    on = np.zeros(len(b), bool)
    on[s] = True
    if np.all(np.abs(g[~on]) <= alpha + slack) and np.all(np.abs(g[on] - alpha * sign) <= slack):
        return out
    return None


def _lasso(a, t, alpha, max_iter=50000):
    """argmin_b 1/2 |t - a b|**2 + alpha |b|_1: accelerated proximal gradient (FISTA)
    until its support and signs are the optimal ones, then solved exactly on them."""
    b = np.zeros(a.shape[1])
    if b.size == 0 or np.abs(a.T @ t).max() <= alpha:
        return b   # zero is optimal
    lipschitz = np.linalg.norm(a, 2) ** 2
    y, step = b.copy(), 1.0
    for it in range(max_iter):
        new = _soft(y - a.T @ (a @ y - t) / lipschitz, alpha / lipschitz)
        following = (1 + np.sqrt(1 + 4 * step * step)) / 2
        y = new + (step - 1) / following * (new - b)
        b, step = new, following
        if it % 20 == 19:
            exact = _lasso_on_support(a, t, alpha, b)
            if exact is not None:
                return exact
    return b


def _lime_fit(z, v, w, alpha):
    """Coefficients of the weighted lasso with an intercept, as scikit-learn's Lasso
    (Captum's SkLearnLasso) defines it: minimise sum_i w_i (v_i - c - z_i b)**2 /
    (2 sum_i w) + alpha |b|_1; alpha = 0: weighted least squares, the least-norm b."""
    w = w / w.sum()
    z = z.astype(np.float64)
    root = np.sqrt(w)[:, None]
    a = (z - w @ z) * root
    t = (v - w @ v) * root[:, 0]
    if alpha == 0:
        return _least_norm(a, t)
    return _lasso(a, t, alpha)


def lime(model, x, target=None, *, feature_mask=None, baseline=0.0, n_samples=25, seed=0,
         alpha=0.01, kernel_width=1.0, distance="cosine", score="logit", batch_size=256,
         train=False):
    """LIME (Ribeiro et al.; Captum's Lime with its defaults): ``n_samples`` copies with
    each feature the input's or the baseline's at random (probability 1/2 each), each
    weighed by its closeness to the input, exp(-d**2 / (2 kernel_width**2)) with d the
    cosine distance (1 - cosine similarity) or the Euclidean one between the copy and
    the input; then a weighted lasso of the score on the features (alpha: scikit-learn's
    Lasso's, the L1 weight against the weight-normalised squared error; 0: least
    squares). The coefficients are the attributions, given to every element of their
    feature; shaped like x.

    The lasso is solved exactly (scikit-learn stops at its tolerance). The draws come
    from ``seed``, the same for every image; Captum draws torch's. feature_mask,
    baseline, score, batch_size, target: as :func:`feature_ablation`.
    """
    op = "lime"
    seed = check_seed(seed, op)
    x, single, xp = as_input(model, x, op)
    n_samples = B.as_count(n_samples, f"{op}: n_samples")
    alpha = _real_arg(alpha, "alpha", op)
    kernel_width = _real_arg(kernel_width, "kernel_width", op)
    if kernel_width == 0:
        raise ValueError(f"{op}: kernel_width must be > 0, got {kernel_width}")
    if distance not in _DISTANCES:
        raise ValueError(f"{op}: distance must be one of {_DISTANCES}, got {distance!r}")
    ids, index, base, _, evaluate = _features(model, x, target, feature_mask, baseline, score,
                                              batch_size, train, op)
    coalitions = [_lime_coalitions(len(f), n_samples, seed) for f in ids]
    values = _score_coalitions(evaluate, index, coalitions, xp)
    phis = []
    for i, (f, z, v) in enumerate(zip(ids, coalitions, values)):
        sums = _feature_sums(x[i], base[i], index[i], len(f), xp)
        w = _lime_weights(z, sums, distance, kernel_width)
        if not w.sum() > 0:
            raise ValueError(f"{op}: every copy of image {i} is too far from it for "
                             f"kernel_width={kernel_width}: all their weights are 0")
        phis.append(_lime_fit(z, v, w, alpha))
    return unbatch(_spread(phis, index, x, xp), single)
