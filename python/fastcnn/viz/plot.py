"""Pictures: matplotlib figures drawn on the Agg canvas (no display needed, pyplot's
global state untouched). Each ``plot_*`` returns the Figure and, given ``path``,
saves it as a PNG. Arrays may be NumPy or CuPy."""

import math

import numpy as np

from .. import _backend as B
from ._common import to_host
from .features import filter_images, filters

__all__ = ["plot_heatmap", "plot_feature_maps", "plot_filters", "plot_explanation",
           "plot_maximized",
           "METHOD_TITLES", "figure_png"]

#: Panel titles of the methods an :class:`~fastcnn.viz.report.Explanation` may hold.
METHOD_TITLES = {
    "occlusion": "Occlusion: probability drop",
    "kernel_shap": "Kernel SHAP: cell Shapley values",
    "saliency": "Saliency: max |gradient|",
    "smoothgrad": "SmoothGrad saliency",
    "integrated": "Integrated gradients",
    "deeplift": "DeepLIFT",
    "lrp": "LRP",
    "guided": "Guided backprop",
    "gradcam": "Grad-CAM",
    "guided_gradcam": "Guided Grad-CAM",
}
#: Methods drawn over the image (coarse maps); the others are drawn on their own.
OVERLAID = ("occlusion", "kernel_shap", "gradcam")


def _figure(width, height, dpi=100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _finish(fig, path):
    if path is not None:
        fig.savefig(path)
    return fig


def figure_png(fig):
    """The figure as PNG bytes."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def display_image(image):
    """An image for imshow: (H, W) grey or (H, W, 3) colour in [0, 1], stretched to its
    own range. Takes (C, H, W) with C 1 or 3, (H, W) or (H, W, 3), any scale."""
    a = to_host(image).astype(np.float32)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise ValueError(f"an image must be (H, W), (H, W, 3) or (C, H, W) with C 1 or 3; "
                         f"got shape {a.shape}")
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _as_map(heatmap):
    """(H, W) from (H, W) or (C, H, W) (channels summed)."""
    m = to_host(heatmap).astype(np.float32)
    if m.ndim == 3:
        m = m.sum(axis=0)
    if m.ndim != 2:
        raise ValueError(f"a heatmap must be (H, W) or (C, H, W), got shape {m.shape}")
    return m


def _draw_map(fig, ax, cax, image, heatmap, *, overlay, signed=None, cmap=None, alpha=0.55,
              clip=None, outline=None, title=None):
    m = _as_map(heatmap)
    if signed is None:
        signed = bool(m.min() < 0)
    if clip is None:
        clip = 100.0 if overlay else 99.5
    peak = float(np.percentile(np.abs(m), clip)) or float(np.abs(m).max()) or 1.0
    vmin, vmax = (-peak, peak) if signed else (0.0, peak)
    if cmap is None:
        cmap = "RdBu_r" if signed else ("jet" if overlay else "inferno")
    shown = None if image is None else display_image(image)
    if overlay and shown is not None:
        ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, interpolation="nearest")
        im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, alpha=alpha, interpolation="nearest")
    else:
        im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        if outline is None:
            outline = shown is not None and shown.ndim == 2
        if outline:
            # the object's outline (grey images on a dark background, as Fashion-MNIST),
            # so that a reader can tell the object's pixels from the background's
            ax.contour(shown, levels=[0.1], colors=["limegreen"], linewidths=0.6, alpha=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    if cax is not None:
        bar = fig.colorbar(im, cax=cax)
        bar.ax.tick_params(labelsize=7)
    return im


# Fixed layouts (no tight_layout, which draws every figure twice): a picture is a grid of
# cells, each a square image of SIDE inches with room for a two-line title above it and a
# colour bar with its labels to its right.
_PAD, _BAR, _BAR_ROOM, _TITLE = 0.1, 0.12, 0.8, 0.5


def _cell_size(side, colorbar=True):
    return side + 2 * _PAD + (_BAR_ROOM if colorbar else 0.0), side + _TITLE + _PAD


def _cell_axes(fig, row, col, side, colorbar=True, top_inches=0.0, width=None):
    """The image axes of grid cell (row, col) (``width`` inches wide instead of square)
    and, with ``colorbar``, the colour bar's axes beside it."""
    fig_w, fig_h = fig.get_size_inches()
    cell_w, cell_h = _cell_size(side)
    left = col * cell_w + _PAD
    bottom = fig_h - top_inches - (row + 1) * cell_h + _PAD
    ax = fig.add_axes((left / fig_w, bottom / fig_h, (width or side) / fig_w, side / fig_h))
    if not colorbar:
        return ax, None
    cax = fig.add_axes(((left + side + 0.08) / fig_w, bottom / fig_h, _BAR / fig_w,
                        side / fig_h))
    return ax, cax


def plot_heatmap(image, heatmap, *, title=None, overlay=True, signed=None, cmap=None,
                 alpha=0.55, clip=None, outline=None, colorbar=True, size=3.0, path=None):
    """A heatmap over its image with a colour bar.

    image: (C, H, W), (H, W) or (H, W, 3), shown in grey/colour stretched to its range
    (or None); heatmap: (H, W), or (C, H, W) summed over channels.
    signed (default: whether the map has negative values) uses a diverging colour map
    centred on zero ('RdBu_r'), else 'jet' from zero over the image.
    overlay=False draws the map alone ('inferno' when not signed), with the outline
    of a grey image's object (``outline``) and the colour scale clipped at the
    ``clip`` percentile of |map| (default 99.5, as Captum's visualiser clips outliers,
    so that one extreme pixel does not leave the rest black; 100 with overlay).
    """
    fig = _figure(*_cell_size(size, colorbar))
    ax, cax = _cell_axes(fig, 0, 0, size, colorbar)
    _draw_map(fig, ax, cax, image, heatmap, overlay=overlay, signed=signed, cmap=cmap,
              alpha=alpha, clip=clip, outline=outline, title=title)
    return _finish(fig, path)


def _grid_layout(fig, title, title_inches=0.4):
    """Tight layout of a grid, leaving ``title_inches`` at the top for the title."""
    top = 1.0
    if title:
        fig.suptitle(title, fontsize=10)
        top = 1.0 - title_inches / fig.get_size_inches()[1]
    fig.tight_layout(pad=0.3, h_pad=0.3, w_pad=0.2, rect=(0, 0, 1, top))


def _grid(count, ncols=None):
    ncols = ncols or max(1, math.ceil(math.sqrt(count)))
    return math.ceil(count / ncols), ncols


def plot_feature_maps(maps, *, max_maps=64, ncols=None, scale="shared", cmap="viridis",
                      title=None, cell=1.0, path=None):
    """A grid of a layer's feature maps: (C, h, w) (a batch (N, C, h, w) shows the first
    sample). scale 'shared' draws every map on one colour scale (dead channels look
    dark); 'map' stretches each to its own range."""
    a = to_host(maps).astype(np.float32)
    if a.ndim == 4:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"plot_feature_maps: maps must be (C, h, w) or (N, C, h, w), "
                         f"got shape {a.shape}")
    if scale not in ("shared", "map"):
        raise ValueError(f"plot_feature_maps: scale must be 'shared' or 'map', got {scale!r}")
    count = min(len(a), int(max_maps))
    rows, cols = _grid(count, ncols)
    fig = _figure(cols * cell, rows * cell + (0.4 if title else 0.0))
    vmin, vmax = float(a[:count].min()), float(a[:count].max())
    for i in range(count):
        ax = fig.add_subplot(rows, cols, i + 1)
        if scale == "shared":
            ax.imshow(a[i], cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        else:
            ax.imshow(a[i], cmap=cmap, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(str(i), fontsize=6, pad=1)
    _grid_layout(fig, title)
    return _finish(fig, path)


def _kernel_mosaic(images, max_channels):
    """(C, R, S) grey kernels -> one (R, S * c + (c - 1)) strip, 1-pixel white gaps."""
    c, r, s = images.shape
    c = min(c, max_channels)
    strip = np.ones((r, s * c + c - 1), np.float32)
    for j in range(c):
        strip[:, j * (s + 1):j * (s + 1) + s] = images[j]
    return strip


def plot_filters(weights, layer=None, *, max_filters=64, max_channels=8, scale="filter",
                 ncols=None, cell=0.8, title=None, path=None):
    """A grid of convolution kernels, zero weight grey (see :func:`filter_images`).

    weights: a (K, C, R, S) array, or a Sequential model and ``layer`` (default: its
    first conv). Three input channels give colour kernels; one channel grey ones;
    more show each kernel's first ``max_channels`` input channels side by side.
    """
    from ..nn import Module

    if isinstance(weights, Module):
        if title is None:
            title = f"filters of {layer or 'the first conv layer'}"
        weights = filters(weights, layer)
    images = filter_images(weights, scale)
    count = min(len(images), int(max_filters))
    channels = np.shape(weights)[1]
    colour, wide = channels == 3, channels not in (1, 3)
    aspect = min(channels, max_channels) if wide else 1
    rows, cols = _grid(count, ncols or (max(1, math.ceil(math.sqrt(count / aspect)))
                                        if wide else None))
    fig = _figure(cols * cell * aspect, rows * cell + (0.4 if title else 0.0))
    for i in range(count):
        ax = fig.add_subplot(rows, cols, i + 1)
        if colour:
            ax.imshow(images[i], interpolation="nearest")
        else:
            img = _kernel_mosaic(images[i], max_channels) if wide else images[i, 0]
            ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(str(i), fontsize=6, pad=1)
    _grid_layout(fig, title)
    return _finish(fig, path)


def plot_maximized(result, *, names=None, ncols=None, cell=1.2, title=None, path=None):
    """A grid of :func:`~fastcnn.viz.maximize_activation`'s images, each stretched to its
    own range (grey, or colour for three channels), titled with its unit (``names``:
    one label per unit, e.g. class names) and the value it reaches."""
    images = to_host(result.images)
    count = len(images)
    if names is not None and len(names) != count:
        raise ValueError(f"plot_maximized: {len(names)} names for {count} images")
    rows, cols = _grid(count, ncols)
    if title is None:
        title = f"what maximises each unit of {result.layer}"
    fig = _figure(cols * cell, rows * (cell + 0.15) + 0.4)
    for i in range(count):
        ax = fig.add_subplot(rows, cols, i + 1)
        shown = display_image(images[i])
        ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        label = str(result.channels[i]) if names is None else str(names[i])
        ax.set_title(f"{label}: {float(result.activation[i]):.3g}", fontsize=6, pad=1)
    _grid_layout(fig, title)
    return _finish(fig, path)


def class_name(explanation, k):
    """The name of class ``k`` (its index when the explanation has no class names)."""
    classes = explanation.classes
    return classes[k] if classes and k < len(classes) else str(k)


def draw_probabilities(ax, explanation, top=5):
    """The ``top`` class probabilities as bars labelled inside (the explained class in
    red, the true class marked when known)."""
    p = to_host(explanation.probabilities)
    order = np.argsort(-p, kind="stable")[:top]
    for row, k in enumerate(order):
        k = int(k)
        colour = "tab:red" if k == explanation.target else "tab:blue"
        ax.barh(row, p[k], color=colour, alpha=0.35, height=0.8)
        name = class_name(explanation, k) + (" (true)" if k == explanation.label else "")
        ax.text(0.02, row, f"{name}  {100 * p[k]:.1f}%", va="center", fontsize=8)
    ax.set_ylim(len(order) - 0.5, -0.5)
    ax.set_xlim(0, 1)
    ax.set_yticks([])
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title("class probabilities", fontsize=9)


def input_title(explanation):
    pred = class_name(explanation, explanation.predicted)
    text = f"predicted: {pred}"
    if explanation.label is not None:
        truth = class_name(explanation, explanation.label)
        text = f"true: {truth}\n" + text + ("" if explanation.label == explanation.predicted
                                            else " (wrong)")
    return text


def _draw_input(ax, explanation):
    shown = explanation.display
    ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(input_title(explanation), fontsize=9)


def plot_input(explanation, *, size=3.0, path=None):
    """The explained image, titled with the prediction (and the true class when known)."""
    fig = _figure(*_cell_size(size, colorbar=False))
    _draw_input(_cell_axes(fig, 0, 0, size, colorbar=False)[0], explanation)
    return _finish(fig, path)


def method_title(explanation, method):
    title = METHOD_TITLES.get(method, method)
    if method == "occlusion" and explanation.settings.get("occlusion_score") == "logit":
        title = "Occlusion: logit drop"
    if method in ("gradcam", "guided_gradcam") and explanation.layer:
        title += f" ({explanation.layer})"
    return title


def plot_explanation(explanation, *, methods=None, ncols=None, cell=2.4, title=None, path=None):
    """All of an explanation's maps for one image side by side: the input, the class
    probabilities, then each method's map (see :func:`fastcnn.viz.explain`), in rows
    of ``ncols`` panels (default: as even rows as five columns at most allow)."""
    methods = [m for m in (methods or explanation.maps) if m in explanation.maps]
    panels = 2 + len(methods)
    if ncols is None:
        ncols = math.ceil(panels / math.ceil(panels / 5))
    ncols = min(B.as_count(ncols, "plot_explanation: ncols"), panels)
    rows = math.ceil(panels / ncols)
    cell_w, cell_h = _cell_size(cell)
    top = 0.35 if title else 0.0
    fig = _figure(ncols * cell_w, rows * cell_h + top)
    _draw_input(_cell_axes(fig, 0, 0, cell, colorbar=False, top_inches=top)[0], explanation)
    draw_probabilities(_cell_axes(fig, 0, 1, cell, colorbar=False, top_inches=top,
                                  width=cell + _BAR_ROOM)[0], explanation)
    for i, method in enumerate(methods):
        ax, cax = _cell_axes(fig, (2 + i) // ncols, (2 + i) % ncols, cell, top_inches=top)
        _draw_map(fig, ax, cax, explanation.display, explanation.maps[method],
                  overlay=method in OVERLAID, title=method_title(explanation, method))
    if title:
        fig.suptitle(title, fontsize=11)
    return _finish(fig, path)
