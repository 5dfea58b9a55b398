"""What the layers compute (feature maps) and what the convolutions look for (filters)."""

from collections import OrderedDict

import numpy as np

from ..nn import Conv2d
from ._common import as_input, check_model, layer_name, preserved, to_host, unbatch

__all__ = ["feature_maps", "conv_layers", "filters", "filter_images"]


def feature_maps(model, x, layer=None, *, train=False):
    """The output of ``layer`` for input ``x`` (one image (C, H, W) or a batch).

    layer: a name, index or the layer itself -> that layer's output ((C, h, w) for one image,
    (N, C, h, w) for a batch; (features,) / (N, features) after Flatten);
    a list of them -> an OrderedDict name -> output; None -> every layer's output.
    The forward pass stops at the last layer asked for.
    """
    op = "feature_maps"
    x, single, _ = as_input(model, x, op)
    if layer is None:
        names = model.names
    elif isinstance(layer, (list, tuple)):
        if not layer:
            raise ValueError(f"{op}: layer is an empty list; give layer names or indices, or "
                             f"None for every layer")
        names = [layer_name(model, item, op) for item in layer]
    else:
        names = [layer_name(model, layer, op)]
    last = max(model.index(name) for name in names)
    with preserved(model, train):
        model.forward(x, stop=model.names[last])
        maps = OrderedDict((name, unbatch(model.activations[name], single)) for name in names)
    if layer is None or isinstance(layer, (list, tuple)):
        return maps
    return maps[names[0]]


def conv_layers(model):
    """Names of the model's Conv2d layers, in order."""
    check_model(model, "conv_layers")
    return [name for name, layer in model.named_children() if isinstance(layer, Conv2d)]


def filters(model, layer=None):
    """A copy of a Conv2d layer's kernels, (K, C/groups, R, S) (default: the first conv)."""
    op = "filters"
    check_model(model, op)
    if layer is None:
        names = conv_layers(model)
        if not names:
            raise ValueError(f"{op}: the model has no Conv2d layer")
        name = names[0]
    else:
        name = layer_name(model, layer, op)
    conv = model[name]
    if not isinstance(conv, Conv2d):
        raise ValueError(f"{op}: layer {name!r} is a {type(conv).__name__}, not a Conv2d; "
                         f"the conv layers are {conv_layers(model)}")
    return conv.weight.data.copy()


def filter_images(weights, scale="filter"):
    """Kernels (K, C, R, S) as float32 images in [0, 1], zero weight at 0.5 (grey).

    Three input channels give colour images (K, R, S, 3); otherwise the result
    keeps one grey image per kernel and input channel, (K, C, R, S).
    scale: 'filter' divides each kernel by its own largest |weight| (every kernel's
    pattern visible); 'layer' by the layer's (their strengths comparable).
    """
    w = to_host(weights).astype(np.float32)
    if w.ndim != 4:
        raise ValueError(f"filter_images: weights must be (K, C, R, S), got shape {w.shape}")
    if scale == "filter":
        peak = np.abs(w).reshape(len(w), -1).max(axis=1).reshape(-1, 1, 1, 1)
    elif scale == "layer":
        peak = np.abs(w).max(keepdims=True)
    else:
        raise ValueError(f"filter_images: scale must be 'filter' or 'layer', got {scale!r}")
    images = 0.5 + 0.5 * w / np.maximum(peak, np.finfo(np.float32).tiny)
    return images.transpose(0, 2, 3, 1) if w.shape[1] == 3 else images
