"""Perturbation methods over features (groups of input elements: a pixel, a
superpixel, a channel, any labelled region), each feature either the input's or the
baseline's. Feature ablation removes one feature at a time (occlusion's sliding
window generalised to any partition; Captum's FeatureAblation); feature
permutation swaps a feature's values among the batch's images (Captum's
FeaturePermutation); Shapley values
average a feature's effect over the orders in which the features can be added
(Captum's ShapleyValues and ShapleyValueSampling)."""

import math


import numpy as np

from .. import _backend as B
from ._common import (LayerPoint, as_input, check_finite, check_logits, check_score,
                      check_seed, preserved, probabilities64, resolve_targets, to_host,
                      unbatch)
from .attribution import _fill_images, _neuron_seed, _unit_layer, _unit_value

__all__ = ["feature_ablation", "layer_feature_ablation", "feature_permutation",
           "layer_feature_permutation", "shapley_values",
           "shapley_value_sampling"]

#: The most features per image :func:`shapley_values` evaluates every coalition of.
MAX_EXACT_FEATURES = 20
_GROUP = 1 << 20   # coalitions whose copies' bookkeeping shapley_values holds at once


def _ids(mask, shape, xp, name, op):
    """Integer feature ids (an array of any shape, checked) as int64 of ``shape``."""
    if mask.dtype.kind not in "iu":
        raise TypeError(f"{op}: {name} must hold integer feature ids, got dtype {mask.dtype}")
    mask = xp.asarray(mask, dtype=np.int64).reshape(shape)
    if mask.size and int(mask.min()) < 0:
        raise ValueError(f"{op}: {name} ids must be >= 0, got {int(mask.min())}")
    return mask


def _each_its_own(x, xp):
    """Every element of an x-shaped sample its own feature: ids (1, ...)."""
    return xp.arange(int(np.prod(x.shape[1:])), dtype=np.int64).reshape((1,) + x.shape[1:])


def _feature_mask(feature_mask, x, xp, op):
    """The mask as int64 (N or 1, C or 1, H, W), broadcastable to x; None: every element
    its own feature."""
    if feature_mask is None:
        return _each_its_own(x, xp)
    mask = feature_mask if B.is_gpu_array(feature_mask) else np.asarray(feature_mask)
    shape = (1,) * (4 - mask.ndim) + tuple(mask.shape)
    fits = len(shape) == 4 and all(m in (1, d) for m, d in zip(shape, x.shape))
    if mask.dtype.kind in "iu" and (not fits or shape[2:] != x.shape[2:]):
        raise ValueError(f"{op}: feature_mask must be (H, W), (C, H, W) or (N, C, H, W), "
                         f"each of N and C either 1 or x's, with H, W as x's "
                         f"{B.shape_str(x.shape)}; got shape {B.shape_str(mask.shape)}")
    return _ids(mask, shape, xp, "feature_mask", op)


def _layer_mask(layer_mask, acts, xp, op):
    """A layer mask as int64, broadcastable to the activations ``acts`` (N, ...): any
    shape whose axes, counted from the last, are 1 or the activations' (a channel
    mask (1, C, 1, 1) or (C, 1, 1), say); None: every unit its own feature."""
    if layer_mask is None:
        return _each_its_own(acts, xp)
    mask = layer_mask if B.is_gpu_array(layer_mask) else np.asarray(layer_mask)
    shape = (1,) * (acts.ndim - mask.ndim) + tuple(mask.shape)
    fits = len(shape) == acts.ndim and all(m in (1, d) for m, d in zip(shape, acts.shape))
    if mask.dtype.kind in "iu" and not fits:
        raise ValueError(f"{op}: layer_mask must broadcast to the layer's output "
                         f"{B.shape_str(acts.shape)} (each axis 1 or the output's); got shape "
                         f"{B.shape_str(mask.shape)}")
    return _ids(mask, shape, xp, "layer_mask", op)


def _layer_fill(baseline, acts, xp, op):
    """The layer baseline as one array per image, (N, ...): a value, or an array
    broadcastable to the activations."""
    if baseline is None or isinstance(baseline, (str, bytes, bool, np.bool_)):
        raise TypeError(f"{op}: layer_baseline must be a number or an array, got {baseline!r}")
    fill = check_finite(B.as_float(baseline, "layer_baseline", xp), "layer_baseline", op)
    try:
        return xp.ascontiguousarray(xp.broadcast_to(fill, acts.shape))
    except ValueError:
        raise ValueError(f"{op}: layer_baseline of shape {B.shape_str(fill.shape)} does not "
                         f"broadcast to the layer's output {B.shape_str(acts.shape)}") from None


def _features(model, x, target, feature_mask, baseline, score, batch_size, train, op,
              unit=None, point=None):
    """What every feature method starts from: the checked arguments, each image's
    features (their ids, and each element's index among them, (N, C or 1, H, W)), the
    baseline as one image per input image, and a function scoring copies of the images
    made of the input's elements where ``keep`` holds and the baseline's elsewhere.
    unit: (layer, channel, position): score a unit of that layer (selected at x, as
    :func:`fastcnn.viz.gradient` selects one) instead of the target class.
    point: a LayerPoint: ``x`` is then the activations there, the features are the
    layer's units (``feature_mask`` a layer mask, ``baseline`` a layer baseline) and
    the copies run through the rest of the network."""
    check_score(score, op)
    batch_size = B.as_count(batch_size, f"{op}: batch_size")
    xp = B.array_module(x)
    if point is None:
        base = _fill_images(baseline, x, xp, op, "baseline")
        mask = _feature_mask(feature_mask, x, xp, op)
    else:
        base = _layer_fill(baseline, x, xp, op)
        mask = _layer_mask(feature_mask, x, xp, op)
    n = x.shape[0]
    full = xp.broadcast_to(mask, (n,) + mask.shape[1:])
    ids, index = [], np.zeros(full.shape, np.int64)
    for i in range(n):
        ids_i, index_i = np.unique(to_host(full[i]), return_inverse=True)
        ids.append(ids_i)
        index[i] = index_i.reshape(full.shape[1:])
    def class_scores(logits, targets):
        check_logits(logits, op)
        if score == "probability":
            logits = probabilities64(logits, axis=1)
        return logits[xp.arange(len(logits)), targets].astype(np.float64)

    if unit is not None:
        name = _unit_layer(model, target, *unit, op, score)
        scores = _unit_value   # (activations, the unit's selection per image)

        def run(copies):
            return model.forward(copies, stop=name, record=False)
    else:
        scores = class_scores

        def run(copies):
            return point.logits(copies) if point else model.forward(copies, record=False)

    with preserved(model, train):
        at_x = run(x)
    if unit is not None:
        t = _neuron_seed(at_x, unit[1], unit[2], op)
    else:
        check_logits(at_x, op)
        t = resolve_targets(target, at_x, op)

    def evaluate(image, keep, source=None):
        """Scores (float64) of the copies ``image`` (host ints, one image index per copy)
        with ``keep(first, last)`` (booleans, broadcastable to the copies) choosing the
        input's elements, the others the baseline's (or, with ``source``, host ints
        too, image source[c]'s), ``batch_size`` copies per forward pass."""
        out = xp.empty(len(image), np.float64)
        with preserved(model, train):
            for first in range(0, len(image), batch_size):
                last = min(first + batch_size, len(image))
                i = xp.asarray(image[first:last])
                other = base[i] if source is None else x[xp.asarray(source[first:last])]
                copies = xp.where(keep(first, last), x[i], other)
                out[first:last] = scores(run(copies), t[i])
        return to_host(out)

    return ids, xp.asarray(index), base, scores(at_x, t), evaluate


def _spread(values, index, x, xp):
    """Per-feature values (one host array per image) given to every element of their
    feature: float32, shaped like x."""
    out = xp.empty(x.shape, np.float32)
    for i, v in enumerate(values):
        out[i] = xp.broadcast_to(xp.asarray(v, np.float32)[index[i]], x.shape[1:])
    return out


def feature_ablation(model, x, target=None, *, feature_mask=None, baseline=0.0, score="logit",
                     layer=None, channel=None, position=None, batch_size=256, train=False):
    """Feature ablation (Captum's FeatureAblation): for each feature, score(x) minus the
    score with that feature's elements replaced by the baseline, given to every element
    of the feature. Shaped like x; positive where removing the feature lowers the score.

    feature_mask: integer feature ids, (H, W) (the same regions on every channel),
    (C, H, W) or one per image (N, C, H, W); a size-1 axis is shared. None (the
    default) makes every element its own feature. Ids need not be consecutive; each
    image evaluates only the features it has.
    baseline: the replacement, a value (in the model's input units), an image (C, H, W)
    or one per image (N, C, H, W).
    score: 'logit' or 'probability'. batch_size: ablated copies per forward pass.
    ``target`` defaults to the prediction on x.
    layer / channel / position: instead of a class score, a unit of a layer (as
    :func:`~fastcnn.viz.gradient` selects one, 'max' the channel's strongest unit at x,
    kept for every copy; Captum's NeuronFeatureAblation): the drop in its value.
    """
    op = "feature_ablation"
    x, single, xp = as_input(model, x, op)
    unit = None if layer is None and channel is None and position is None else \
        (layer, channel, position)
    ids, index, _, initial, evaluate = _features(model, x, target, feature_mask, baseline, score,
                                              batch_size, train, op, unit)
    return unbatch(_drops(ids, index, initial, evaluate, x, xp), single)


def layer_feature_ablation(model, x, layer, target=None, *, layer_mask=None,
                           layer_baseline=0.0, score="logit", attribute_to_layer_input=False,
                           batch_size=256, train=False):
    """Feature ablation of a layer's units (Captum's LayerFeatureAblation): for each
    group of units, score(x) minus the score with the group set to ``layer_baseline``
    and the rest of the network run from there, given to every unit of the group.
    Shaped like the layer's output (N, ...): which channels (or regions, or units) the
    prediction needs.

    layer_mask: integer group ids broadcastable to the layer's output, e.g.
    ``np.arange(C)[:, None, None]`` for one group per channel, or one per image; None
    (the default) makes every unit its own group. layer_baseline: the replacement, a
    value or an array broadcastable to the output (default 0: the unit switched off).
    attribute_to_layer_input: ablate the layer's input instead. score, batch_size,
    target: as :func:`feature_ablation`.
    """
    op = "layer_feature_ablation"
    x, single, xp = as_input(model, x, op)
    point = LayerPoint(model, layer, attribute_to_layer_input, op)
    with preserved(model, train):
        acts = point.activation(x)
    ids, index, _, initial, evaluate = _features(model, acts, target, layer_mask,
                                                 layer_baseline, score, batch_size, train, op,
                                                 point=point)
    return unbatch(_drops(ids, index, initial, evaluate, acts, xp), single)


def _drops(ids, index, initial, evaluate, x, xp):
    """Each feature's score drop as it alone takes the baseline, spread over its elements."""
    image = np.repeat(np.arange(len(ids)), [len(f) for f in ids])
    removed = xp.asarray(np.concatenate([np.arange(len(f)) for f in ids] + [[]])
                         .astype(np.int64))
    expand = (slice(None),) + (None,) * (index.ndim - 1)
    values = evaluate(image, lambda first, last: index[xp.asarray(image[first:last])] !=
                      removed[first:last][expand])
    drops = to_host(initial)[image] - values
    ends = np.cumsum([len(f) for f in ids])
    return _spread(np.split(drops, ends[:-1]) if len(ids) else [], index, x, xp)


def feature_permutation(model, x, target=None, *, feature_mask=None, seed=0, score="logit",
                        batch_size=256, train=False):
    """Permutation feature importance (Captum's FeaturePermutation): for each feature,
    its values are shuffled among the batch's images (image i takes image perm[i]'s,
    perm a random permutation of the batch other than the identity, drawn anew for
    each feature from ``seed``), and each image's score(x) minus its score with the
    shuffled feature is given to every element of the feature. Shaped like x; large
    where the model relies on the feature (for the values the batch holds).

    x: a batch of at least two images (the features are swapped between them), the
    importance of a feature depending on the rest of the batch, as Captum's.
    feature_mask: as :func:`feature_ablation`, but the same for every image ((H, W) or
    (C, H, W)). score, batch_size, target: as :func:`feature_ablation`. Captum draws
    torch's permutations: the same distribution, other samples.
    """
    op = "feature_permutation"
    seed = check_seed(seed, op)
    x, single, xp = as_input(model, x, op)
    _check_permutable(x, single, op)
    if feature_mask is not None and np.ndim(feature_mask) == 4 and \
            np.shape(feature_mask)[0] != 1:
        raise ValueError(f"{op}: feature_mask must be the same for every image, (H, W) or "
                         f"(C, H, W), since features are swapped between the images; got "
                         f"shape {B.shape_str(np.shape(feature_mask))}")
    return _permutation_drops(model, x, target, feature_mask, seed, score, batch_size, train,
                              op)


def layer_feature_permutation(model, x, layer, target=None, *, layer_mask=None, seed=0,
                              score="logit", attribute_to_layer_input=False, batch_size=256,
                              train=False):
    """Permutation importance of a layer's units (Captum's LayerFeaturePermutation): each
    group of units shuffled among the batch's images (the draws of
    :func:`feature_permutation`) and the rest of the network run from there; each
    image's score(x) minus its score with the group shuffled, given to the group's
    units. Shaped like the layer's output (N, ...).

    x: a batch of at least two images. layer_mask: group ids broadcastable to the
    layer's output, the same for every image (e.g. ``np.arange(C)[:, None, None]``,
    one group per channel); None: every unit its own group. Other arguments as
    :func:`feature_permutation` and :func:`layer_feature_ablation`.
    """
    op = "layer_feature_permutation"
    seed = check_seed(seed, op)
    x, single, xp = as_input(model, x, op)
    _check_permutable(x, single, op)
    point = LayerPoint(model, layer, attribute_to_layer_input, op)
    with preserved(model, train):
        acts = point.activation(x)
    if layer_mask is not None and np.ndim(layer_mask) == acts.ndim and \
            np.shape(layer_mask)[0] != 1:
        raise ValueError(f"{op}: layer_mask must be the same for every image (no batch axis, "
                         f"or one of size 1), since units are swapped between the images; got "
                         f"shape {B.shape_str(np.shape(layer_mask))}")
    return _permutation_drops(model, acts, target, layer_mask, seed, score, batch_size, train,
                              op, point)


def _check_permutable(x, single, op):
    if single or x.shape[0] < 2:
        raise ValueError(f"{op}: x must be a batch of at least 2 images (their features are "
                         f"swapped between them), got shape "
                         f"{B.shape_str(x.shape[1:] if single else x.shape)}")


def _permutation_drops(model, x, target, mask, seed, score, batch_size, train, op, point=None):
    """feature_permutation's drops for inputs (or, with ``point``, activations) x."""
    xp = B.array_module(x)
    n = x.shape[0]
    ids, index, _, initial, evaluate = _features(model, x, target, mask, 0.0, score,
                                              batch_size, train, op, point=point)
    k = len(ids[0])
    rng = np.random.default_rng(seed)
    perms = []
    for _ in range(k):
        perm = rng.permutation(n)
        while (perm == np.arange(n)).all():
            perm = rng.permutation(n)
        perms.append(perm)
    image = np.tile(np.arange(n), k)           # copy j * n + i: image i, feature j shuffled
    feature = xp.asarray(np.repeat(np.arange(k), n))
    expand = (slice(None),) + (None,) * (index.ndim - 1)
    values = evaluate(image, lambda first, last: index[xp.asarray(image[first:last])] !=
                      feature[first:last][expand],
                      np.concatenate(perms + [np.zeros(0, np.int64)]))
    drops = (to_host(initial)[image] - values).reshape(k, n)
    return _spread(list(drops.T), index, x, xp)


def shapley_values(model, x, target=None, *, feature_mask=None, baseline=0.0, score="logit",
                   batch_size=256, train=False):
    """Exact Shapley values of the features (Captum's ShapleyValues): each feature's
    marginal effect on the score, v(S + f) - v(S), averaged over every order in which
    the features can be added to the baseline, where v(S) is the score of the image
    whose features in S are the input's and the rest the baseline's. Given to every
    element of the feature; shaped like x. Each image's features add up to
    score(x) - score(baseline) exactly (efficiency).

    The 2**F coalitions of an image's F features are each evaluated once (Captum runs
    F! orders of F steps), so F is limited to :data:`MAX_EXACT_FEATURES` (20: about a
    million forward passes); :func:`shapley_value_sampling` estimates more.
    feature_mask, baseline, score, batch_size, target: as :func:`feature_ablation`.
    """
    op = "shapley_values"
    x, single, xp = as_input(model, x, op)
    ids, index, _, _, evaluate = _features(model, x, target, feature_mask, baseline, score,
                                        batch_size, train, op)
    for i, f in enumerate(ids):
        if len(f) > MAX_EXACT_FEATURES:
            raise ValueError(f"{op}: image {i} has {len(f)} features, more than the "
                             f"{MAX_EXACT_FEATURES} whose 2**F coalitions are evaluated; give "
                             f"a coarser feature_mask or use shapley_value_sampling")
    sizes = [len(f) for f in ids]
    phis, group = [], []
    for i in range(len(ids) + 1):   # images in groups of at most _GROUP coalitions (or one)
        if group and (i == len(ids) or sum(1 << sizes[j] for j in group + [i]) > _GROUP):
            image = np.repeat(group, [1 << sizes[j] for j in group])
            members = xp.asarray(np.concatenate([np.arange(1 << sizes[j]) for j in group]))
            values = evaluate(image, lambda first, last: (
                (members[first:last, None, None, None] >> index[xp.asarray(image[first:last])])
                & 1) == 1)
            start = 0
            for j in group:
                phis.append(_shapley_from_coalitions(values[start:start + (1 << sizes[j])],
                                                     sizes[j]))
                start += 1 << sizes[j]
            group = []
        group.append(i)
    return unbatch(_spread(phis, index, x, xp), single)


def _shapley_from_coalitions(v, k):
    """phi_f = sum over coalitions S without f of |S|! (k - |S| - 1)! / k! (v(S + f) - v(S)),
    v indexed by the coalition's bit mask."""
    phi = np.zeros(k)
    if k == 0:
        return phi
    coalitions = np.arange(1 << k)
    size = np.zeros(1 << k, np.int64)
    for f in range(k):
        size += (coalitions >> f) & 1
    weight = np.array([math.factorial(s) * math.factorial(k - s - 1) / math.factorial(k)
                       for s in range(k)])
    for f in range(k):
        without = coalitions[(coalitions >> f) & 1 == 0]
        phi[f] = weight[size[without]] @ (v[without | (1 << f)] - v[without])
    return phi


def _orders(k, n_samples, seed):
    """n_samples random orders of k features, (n_samples, k), the same for every image."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(k) for _ in range(n_samples)])


def shapley_value_sampling(model, x, target=None, *, feature_mask=None, baseline=0.0,
                           n_samples=25, seed=0, score="logit", batch_size=256, train=False):
    """Shapley values estimated from ``n_samples`` random orders of the features
    (Captum's ShapleyValueSampling): starting from the baseline, the features are set to
    the input's one at a time in each order, and each feature's score change averaged
    over the orders. Each order's changes add up to score(x) - score(baseline), so the
    estimate keeps efficiency exactly; an image of F features takes
    n_samples * (F - 1) + 2 forward passes.

    The orders are drawn from ``seed`` for each image alike (numpy's default_rng), so
    an image gets the same result alone or in any batch. Captum draws torch's: the same
    distribution, other samples. feature_mask, baseline, score, batch_size, target: as
    :func:`feature_ablation`. Shaped like x.
    """
    op = "shapley_value_sampling"
    seed = check_seed(seed, op)
    x, single, xp = as_input(model, x, op)
    n_samples = B.as_count(n_samples, f"{op}: n_samples")
    ids, index, _, initial, evaluate = _features(model, x, target, feature_mask, baseline, score,
                                              batch_size, train, op)
    if not ids:
        return unbatch(xp.zeros(x.shape, np.float32), single)
    sizes = [len(f) for f in ids]
    perms = [_orders(k, n_samples, seed) for k in sizes]
    width = max(sizes)
    rank = np.full((len(ids), n_samples, width), width, np.int64)  # each feature's place
    for i, (k, p) in enumerate(zip(sizes, perms)):
        np.put_along_axis(rank[i, :, :k], p, np.arange(k)[None], axis=1)
    # the copies with 1 .. F - 1 features the input's, for every order of every image
    # (none and all of them, the baseline and the input, are scored once an image)
    steps = [k - 1 for k in sizes]
    image = np.repeat(np.arange(len(ids)), [n_samples * m for m in steps])
    order = xp.asarray(np.concatenate([np.repeat(np.arange(n_samples), m) for m in steps]))
    added = xp.asarray(np.concatenate([np.tile(np.arange(1, m + 1), n_samples)
                                       for m in steps]))
    rank = xp.asarray(rank)

    def keep(first, last):
        i = xp.asarray(image[first:last])
        where = index[i]
        mine = xp.take_along_axis(rank[i, order[first:last]],
                                  where.reshape(last - first, -1), axis=1)
        return mine.reshape(where.shape) < added[first:last, None, None, None]

    inner = evaluate(image, keep)
    none = evaluate(np.arange(len(ids)), lambda first, last: xp.zeros((1, 1, 1, 1), bool))
    everything = to_host(initial)
    phis, start = [], 0
    for i, (k, p) in enumerate(zip(sizes, perms)):
        v = np.empty((n_samples, k + 1))
        v[:, 0], v[:, k] = none[i], everything[i]
        v[:, 1:k] = inner[start:start + n_samples * (k - 1)].reshape(n_samples, k - 1)
        start += n_samples * (k - 1)
        phi = np.zeros(k)
        np.add.at(phi, p, np.diff(v, axis=1))  # order p's changes, feature by feature
        phis.append(phi / n_samples)
    return unbatch(_spread(phis, index, x, xp), single)
