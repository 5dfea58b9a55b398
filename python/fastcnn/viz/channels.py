"""Which channels of a layer a prediction needs: one number per channel, from the
layer methods (switching the channel off, its conductance, its LRP relevance, its
gradient x activation), and a picture of the strongest channels' maps.

>>> scores = viz.channel_importance(model, x[0], "relu2")        # (64,): the logit's drop
>>> viz.plot_channels(model, x[0], "relu2", scores, top=8, path="channels.png")
>>> means, counts = viz.class_channel_importance(model, x, labels, "relu2")   # (K, 64)
>>> viz.plot_class_channels(means, classes, path="classes.png")
"""

import numpy as np

from .. import _backend as B
from ._common import as_input, check_model, default_cam_layer, layer_name, to_host, unbatch
from .ablation import layer_feature_ablation
from .features import feature_maps
from .layer import layer_conductance, layer_gradient_x_activation
from .lrp import layer_lrp

__all__ = ["CHANNEL_METHODS", "channel_importance", "plot_channels",
           "class_channel_importance", "plot_class_channels"]

#: What :func:`channel_importance` measures, by name.
CHANNEL_METHODS = {
    "ablation": "the target logit's drop when the channel is set to 0",
    "conductance": "the channel's share of logit(x) - logit(baseline) (layer conductance)",
    "lrp": "the LRP relevance (epsilon rule) the channel receives",
    "gradient_x_activation": "activation x gradient, summed over the channel",
}


def channel_importance(model, x, layer=None, target=None, *, method="ablation", baseline=0.0,
                       n_steps=50, batch_size=256, train=False):
    """One score per channel of ``layer``'s output for the target class: (C,) for one
    image, (N, C) for a batch (for a layer without spatial axes, e.g. 'fc1', one per
    unit). Large where the prediction relies on the channel.

    layer: a name, an index or the layer itself (default: the last conv block's
    output, Grad-CAM's layer). method (see :data:`CHANNEL_METHODS`): 'ablation' (the
    default; :func:`~fastcnn.viz.layer_feature_ablation` with one group per channel),
    'conductance' (:func:`~fastcnn.viz.layer_conductance` summed over each channel:
    the channels' scores add up to logit(x) - logit(baseline), ``baseline`` and
    ``n_steps`` its), 'lrp' (:func:`~fastcnn.viz.layer_lrp` summed over each channel:
    they add up to the logit, less what the biases absorb) or 'gradient_x_activation'.
    target: the class (default: the prediction); batch_size: copies or path points
    per pass.
    """
    op = "channel_importance"
    check_model(model, op)
    if method not in CHANNEL_METHODS:
        raise ValueError(f"{op}: method must be one of {tuple(CHANNEL_METHODS)}, got {method!r}")
    x, single, xp = as_input(model, x, op)
    n_steps = B.as_count(n_steps, f"{op}: n_steps")
    name = default_cam_layer(model, op) if layer is None else layer_name(model, layer, op)
    if method == "ablation":
        shape = feature_maps(model, x[:1], name).shape[1:]
        groups = np.arange(shape[0]).reshape((shape[0],) + (1,) * (len(shape) - 1))
        maps = layer_feature_ablation(model, x, name, target, layer_mask=groups,
                                      batch_size=batch_size, train=train)
        scores = _per_channel(maps)[:, :, 0]   # every unit of a channel has its drop
    else:
        if method == "conductance":
            maps = layer_conductance(model, x, name, target, baseline=baseline, n_steps=n_steps,
                                     batch_size=batch_size, train=train)
        elif method == "lrp":
            maps = layer_lrp(model, x, name, target, train=train)
        else:
            maps = layer_gradient_x_activation(model, x, name, target, train=train)
        scores = _per_channel(maps).astype(np.float64).sum(axis=2)
    return unbatch(xp.asarray(scores, dtype=np.float32), single)


def _per_channel(maps):
    """(N, C, ...) maps as (N, C, units per channel); a flat layer's (N, F) as (N, F, 1)."""
    return maps.reshape(maps.shape[:2] + (int(np.prod(maps.shape[2:])),))


def plot_channels(model, image, layer=None, scores=None, *, top=8, target=None,
                  method="ablation", title=None, cell=1.3, path=None):
    """The ``top`` channels of ``layer`` with the largest scores for one image: their
    feature maps, each titled with its channel and score, beside the image and a bar
    chart of every channel's score (largest first, the ones shown in red).

    scores: (C,) from :func:`channel_importance` (computed with ``target`` and
    ``method`` when None). Returns the Figure (saved to ``path`` when given).
    """
    from .plot import _figure, _finish, display_image

    op = "plot_channels"
    x, single, _ = as_input(model, image, op)
    if not single and len(x) != 1:
        raise ValueError(f"{op}: one image (C, H, W), got a batch of {len(x)}")
    name = default_cam_layer(model, op) if layer is None else layer_name(model, layer, op)
    if scores is None:
        scores = channel_importance(model, x[0], name, target, method=method)
    scores = to_host(scores).astype(np.float64).reshape(-1)
    acts = to_host(feature_maps(model, x[0], name))
    if len(scores) != acts.shape[0]:
        raise ValueError(f"{op}: {len(scores)} scores for the {acts.shape[0]} channels of "
                         f"{name!r}")
    top = min(B.as_count(top, f"{op}: top"), len(scores))
    order = np.argsort(-scores, kind="stable")
    shown = order[:top]
    cols = max(4, min(top, 8))
    rows = 1 + -(-top // cols)
    fig = _figure(cols * cell, rows * (cell + 0.2) + 0.5)
    grid = fig.add_gridspec(rows, cols)
    ax = fig.add_subplot(grid[0, 0])
    picture = display_image(to_host(x[0]))
    ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("input", fontsize=7)
    bars = fig.add_subplot(grid[0, 1:])
    colours = np.where(np.isin(order, shown), "tab:red", "tab:gray")
    bars.bar(np.arange(len(scores)), scores[order], color=colours, width=0.9)
    bars.axhline(0, color="black", linewidth=0.5)
    bars.set_xticks([])
    bars.tick_params(axis="y", labelsize=6)
    bars.set_title(f"{name}: every channel's score, largest first", fontsize=7)
    for k, c in enumerate(shown):
        ax = fig.add_subplot(grid[1 + k // cols, k % cols])
        maps = acts[c] if acts.ndim == 3 else np.full((1, 1), acts[c])
        ax.imshow(maps, cmap="viridis", interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{c}: {scores[c]:+.3g}", fontsize=6, pad=1)
    fig.suptitle(title or f"the channels of {name} the prediction needs most ({method})",
                 fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.94), pad=0.3)
    return _finish(fig, path)


def class_channel_importance(model, x, labels=None, layer=None, *, num_classes=None,
                             method="ablation", baseline=0.0, n_steps=50, batch_size=256,
                             train=False):
    """Which channels each class needs: :func:`channel_importance` of every image for
    its class (``labels``, e.g. the true classes; by default each image's predicted
    class), averaged over the images of each class. Returns (means (K, C) float64,
    counts (K,) int64) on the host; a class without images has a row of NaN.

    K: ``num_classes`` (default: the model's output size). ``method``, ``baseline``,
    ``n_steps``, ``batch_size`` and ``train`` as :func:`channel_importance`'s.
    """
    op = "class_channel_importance"
    x = as_input(model, x, op)[0]
    if not len(x):
        raise ValueError(f"{op}: x holds no images")
    logits = to_host(feature_maps(model, x if labels is None else x[:1], layer=-1))
    outputs = logits.shape[-1]
    k = outputs if num_classes is None else B.as_count(num_classes, f"{op}: num_classes")
    labels = logits.argmax(axis=1) if labels is None else to_host(labels)
    if labels.shape != (len(x),):
        raise ValueError(f"{op}: labels must hold one class per image, ({len(x)},); got shape "
                         f"{B.shape_str(labels.shape)}")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"{op}: labels must be integer classes, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= min(k, outputs):
        raise ValueError(f"{op}: labels must be classes in [0, {min(k, outputs)}) (the "
                         f"model's outputs), got {int(labels.min())} to {int(labels.max())}")
    scores = to_host(channel_importance(model, x, layer, labels.astype(np.int64),
                                        method=method, baseline=baseline, n_steps=n_steps,
                                        batch_size=batch_size, train=train))
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    means = np.full((k, scores.shape[1]), np.nan)
    for c in np.flatnonzero(counts):
        means[c] = scores[labels == c].astype(np.float64).mean(axis=0)
    return means, counts


def plot_class_channels(means, classes=None, *, layer=None, method="ablation", title=None,
                        path=None):
    """The classes x channels matrix of :func:`class_channel_importance` as a heatmap,
    the channels ordered by the class they matter most to (then by their score), so
    that each class's own channels stand together; a class without images (a NaN
    row) is grey. Returns the Figure (saved to ``path`` when given)."""
    import matplotlib

    from .plot import _figure, _finish

    op = "plot_class_channels"
    if isinstance(means, tuple):
        raise TypeError(f"{op}: means must be the matrix, class_channel_importance(...)[0], "
                        f"not the (means, counts) pair")
    means = to_host(means)
    if means.dtype.kind not in "fiu":
        raise TypeError(f"{op}: means must hold numbers, got dtype {means.dtype}")
    means = means.astype(np.float64)
    if means.ndim != 2 or means.size == 0:
        raise ValueError(f"{op}: means must be a (classes, channels) matrix, got shape "
                         f"{B.shape_str(means.shape)}")
    k, c = means.shape
    if classes is not None:
        if isinstance(classes, (str, bytes)) or not hasattr(classes, "__len__"):
            raise TypeError(f"{op}: classes must be a list of names, got {classes!r}")
        if len(classes) != k:
            raise ValueError(f"{op}: {len(classes)} class names for {k} rows")
    filled = np.where(np.isnan(means), -np.inf, means)
    best = filled.argmax(axis=0)
    order = np.lexsort((-filled.max(axis=0), best))
    shown = means[:, order]
    top = np.nanmax(np.abs(shown)) if np.isfinite(shown).any() else 1.0
    fig = _figure(min(2.0 + 0.12 * c, 12.0), 1.0 + 0.28 * k)
    ax = fig.add_subplot(1, 1, 1)
    # a class without images: grey, not the white of 0
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.6")
    image = ax.imshow(shown, cmap=cmap, vmin=-top, vmax=top, aspect="auto",
                      interpolation="nearest")
    ax.set_yticks(np.arange(k))
    ax.set_yticklabels([str(n) for n in classes] if classes is not None else
                       [str(i) for i in range(k)], fontsize=6)
    ticks = np.arange(0, c, max(1, c // 16))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(int(order[t])) for t in ticks], fontsize=5)
    ax.set_xlabel("channel (ordered by the class it matters most to)", fontsize=6)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01).ax.tick_params(labelsize=5)
    where = f" of {layer}" if layer else ""
    ax.set_title(title or f"each class's mean channel scores{where} ({method})", fontsize=8)
    fig.tight_layout(pad=0.3)
    return _finish(fig, path)
