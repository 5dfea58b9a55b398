"""Feature ablation: how much the score falls when a group of input elements (a
feature: a pixel, a superpixel, a channel, any labelled region) is replaced by a
baseline, each group in turn. Occlusion's sliding window, generalised to any
partition of the input (Captum's FeatureAblation)."""

import numpy as np

from .. import _backend as B
from .. import functional as F
from ._common import (as_input, check_logits, check_score, preserved, resolve_targets,
                      to_host, unbatch)
from .attribution import _fill_images

__all__ = ["feature_ablation"]


def _feature_mask(feature_mask, x, xp, op):
    """The mask as int64 (N or 1, C or 1, H, W), broadcastable to x; None: every element
    its own feature."""
    if feature_mask is None:
        size = int(np.prod(x.shape[1:]))
        return xp.arange(size, dtype=np.int64).reshape((1,) + x.shape[1:])
    mask = feature_mask if B.is_gpu_array(feature_mask) else np.asarray(feature_mask)
    if mask.dtype.kind not in "iu":
        raise TypeError(f"{op}: feature_mask must hold integer feature ids, got dtype "
                        f"{mask.dtype}")
    shape = tuple(mask.shape)
    while len(shape) < 4:
        shape = (1,) + shape
    fits = len(shape) == 4 and all(m in (1, d) for m, d in zip(shape, x.shape))
    if not fits or shape[2:] != x.shape[2:]:
        raise ValueError(f"{op}: feature_mask must be (H, W), (C, H, W) or (N, C, H, W), "
                         f"each of N and C either 1 or x's, with H, W as x's "
                         f"{B.shape_str(x.shape)}; got shape {B.shape_str(mask.shape)}")
    mask = xp.asarray(mask, dtype=np.int64).reshape(shape)
    if mask.size and int(mask.min()) < 0:
        raise ValueError(f"{op}: feature_mask ids must be >= 0, got {int(mask.min())}")
    return mask


def feature_ablation(model, x, target=None, *, feature_mask=None, baseline=0.0, score="logit",
                     batch_size=256, train=False):
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
    """
    op = "feature_ablation"
    x, single, xp = as_input(model, x, op)
    check_score(score, op)
    batch_size = B.as_count(batch_size, f"{op}: batch_size")
    base = _fill_images(baseline, x, xp, op, "baseline")
    mask = _feature_mask(feature_mask, x, xp, op)
    n = x.shape[0]
    full = xp.broadcast_to(mask, (n,) + mask.shape[1:])
    # each image's own features, in id order, and each element's place among them
    features = [np.unique(to_host(full[i]), return_inverse=True) for i in range(n)]
    pairs = [(i, int(f)) for i, (ids, _) in enumerate(features) for f in ids]
    drops = xp.zeros(len(pairs), np.float32)

    def scores(logits, t):
        check_logits(logits, op)
        if score == "probability":
            logits = F.softmax(logits, dim=1)
        return logits[xp.arange(len(logits)), t]

    with preserved(model, train):
        logits = model.forward(x, record=False)
        check_logits(logits, op)
        t = resolve_targets(target, logits, op)
        initial = scores(logits, t)
        for first in range(0, len(pairs), batch_size):
            chunk = pairs[first:first + batch_size]
            image = xp.asarray([i for i, _ in chunk])
            ids = xp.asarray([f for _, f in chunk], dtype=np.int64)
            hit = xp.broadcast_to(full[image] == ids[:, None, None, None], (len(chunk),) +
                                  x.shape[1:])
            ablated = xp.where(hit, base[image], x[image])
            drops[first:first + len(chunk)] = initial[image] - scores(
                model.forward(ablated, record=False), t[image])
    attributions = xp.empty(x.shape, np.float32)
    start = 0
    for i, (ids, inverse) in enumerate(features):
        own = drops[start:start + len(ids)][xp.asarray(inverse.reshape(full.shape[1:]))]
        attributions[i] = xp.broadcast_to(own, x.shape[1:])
        start += len(ids)
    return unbatch(attributions, single)
