"""Activation maximisation: the input a unit responds to most (Erhan et al., 2009;
Simonyan et al., 2014; Yosinski et al., 2015), found by gradient ascent on the pixels."""

from dataclasses import dataclass

import numpy as np

from .. import _backend as B
from .. import functional as F
from ..nn import Parameter
from ..optim import Adam
from ._common import check_model, check_seed, data_bounds, layer_name, preserved
from .attribution import _real_arg

__all__ = ["MaximizedActivation", "maximize_activation"]


@dataclass
class MaximizedActivation:
    """What :func:`maximize_activation` found, one row per unit.

    images (K, C, H, W): the inputs (on the model's device); activation (K,): each
    unit's value at its image; history (steps + 1, K): the values before each step and
    at the end (NumPy, float64); layer, channels, position: the units.
    """

    images: object
    activation: object
    history: np.ndarray
    layer: str
    channels: list
    position: object = None


def _units(activation, channels, position):
    """d unit / d activation for each row k: channel ``channels[k]``'s mean over its map
    (position None), its value at ``position`` = (y, x), or the unit itself for a
    non-spatial layer."""
    xp = B.array_module(activation)
    seed = xp.zeros_like(activation)
    rows = xp.arange(len(channels))
    ch = xp.asarray(np.asarray(channels, np.int64))
    if activation.ndim == 2:
        seed[rows, ch] = 1.0
    elif position is None:
        seed[rows, ch] = 1.0 / (activation.shape[2] * activation.shape[3])
    else:
        y, x = position
        seed[rows, ch, y, x] = 1.0
    return seed


def _check_position(position, shape, op):
    if position is None:
        return None
    pair = tuple(position) if isinstance(position, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and
                                 not isinstance(v, (bool, np.bool_)) for v in pair):
        raise ValueError(f"{op}: position must be None or (y, x) with int y and x, got "
                         f"{position!r}")
    if len(shape) != 4:
        raise ValueError(f"{op}: position needs a layer with spatial output (N, C, H, W); "
                         f"this one gives {B.shape_str(shape)}")
    if not (0 <= pair[0] < shape[2] and 0 <= pair[1] < shape[3]):
        raise ValueError(f"{op}: position {pair} is outside the layer's output "
                         f"{B.shape_str(shape[1:])}")
    return tuple(int(v) for v in pair)


def _gaussian_blur(images, sigma):
    """Each channel blurred by a Gaussian of ``sigma`` pixels (reflected at the edges)."""
    radius = max(1, int(np.ceil(2 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    c = images.shape[1]
    if min(images.shape[2:]) <= radius:          # too small to reflect that far
        return images
    xp = B.array_module(images)
    kernel = xp.asarray(np.broadcast_to(np.outer(taps, taps), (c, 1) + (len(taps),) * 2).copy())
    padded = F.pad(images, (radius,) * 4, "reflect")
    return F.conv2d(padded, kernel, groups=c)


def maximize_activation(model, layer=None, channels=None, *, position=None, shape=None,
                        steps=200, lr=0.05, weight_decay=1e-3, jitter=1, blur_every=4,
                        blur_sigma=0.5, bounds="data", start=None, seed=0, train=False):
    """Synthesise, for each unit, an input that maximises it: gradient ascent (Adam,
    ``maximize``) on the pixels of the mean of a channel's map at ``layer`` (its
    value at ``position`` = (y, x); a unit itself for a non-spatial layer such as
    'fc1'), with the usual regularisers against adversarial noise: L2 decay
    (``weight_decay``), a random shift of up to ``jitter`` pixels each step (the
    gradient shifted back), a Gaussian blur of ``blur_sigma`` pixels every
    ``blur_every`` steps (0: never), and the pixels kept in ``bounds``.

    layer: a name, an index or the layer (default: the model's output, the class
    scores: channels are then classes). channels: an int or a list (default: every
    channel of the layer); one image each, optimised together. shape: the input
    (C, H, W) (default: ``model.metadata['input_shape']``). bounds: (lo, hi) in the
    model's input units (numbers or one per channel), 'data' (default: pixels 0 to 1
    through the standardisation in ``model.metadata``; none when it has none) or
    None. start: the initial image(s), (C, H, W) or one per unit; default: small
    noise drawn from ``seed`` around the middle of the bounds (0 without bounds).
    The model runs in eval mode (``train=True``: training mode) and is left as it was.
    Returns a :class:`MaximizedActivation`.
    """
    op = "maximize_activation"
    seed = check_seed(seed, op)
    check_model(model, op)
    xp = B.array_module(next(iter(model.parameters())).data) if model.device != "cpu" else np
    name = model.names[-1] if layer is None else layer_name(model, layer, op)
    steps = B.as_count(steps, f"{op}: steps", least=0)
    jitter = B.as_count(jitter, f"{op}: jitter", least=0)
    blur_every = B.as_count(blur_every, f"{op}: blur_every", least=0)
    lr, weight_decay, blur_sigma = (_real_arg(value, what, op) for value, what in (
        (lr, "lr"), (weight_decay, "weight_decay"), (blur_sigma, "blur_sigma")))
    if shape is None:
        shape = (getattr(model, "metadata", None) or {}).get("input_shape")
        if shape is None:
            raise ValueError(f"{op}: the model's metadata has no input_shape; pass "
                             f"shape=(C, H, W)")
    shape = tuple(B.as_count(v, f"{op}: shape") for v in shape)
    if len(shape) != 3:
        raise ValueError(f"{op}: shape must be (C, H, W), got {shape}")
    with preserved(model, train):
        probe = model.forward(xp.zeros((1,) + shape, np.float32), stop=name)
        if probe.ndim not in (2, 4):
            raise ValueError(f"{op}: layer {name!r} gives {B.shape_str(probe.shape)}; its "
                             f"units are channels of (N, C, H, W) or features of (N, F)")
        count = probe.shape[1]
        if channels is None:
            channels = list(range(count))
        elif isinstance(channels, (int, np.integer)) and not isinstance(channels, bool):
            channels = [int(channels)]
        else:
            channels = [B.as_int(c, f"{op}: channels") for c in channels]
        bad = [c for c in channels if not 0 <= c < count]
        if bad or not channels:
            raise ValueError(f"{op}: channels must be in [0, {count}) for layer {name!r} "
                             f"(output {B.shape_str(probe.shape[1:])}), got {channels}")
        position = _check_position(position, probe.shape, op)
        lo, hi = _bounds(bounds, model, shape[0], op)
        k = len(channels)
        rng = np.random.default_rng(seed)
        if start is None:
            middle = 0.0 if lo is None else (lo + hi)[:, None, None] / 2
            start = xp.asarray((middle + 0.01 * rng.standard_normal((k,) + shape))
                               .astype(np.float32))
        start = B.as_float(start, "start", xp)
        if start.shape == shape:
            start = xp.broadcast_to(start, (k,) + shape)
        if start.shape != (k,) + shape:
            raise ValueError(f"{op}: start must be an image {shape} or one per unit "
                             f"{(k,) + shape}, got {B.shape_str(start.shape)}")
        image = Parameter(xp.array(start))
        if lo is not None:
            lo, hi = (xp.asarray(v.reshape(1, -1, 1, 1)) for v in (lo, hi))
        optimizer = Adam([image], lr=lr, weight_decay=weight_decay, maximize=True)
        history = []
        for step in range(steps + 1):
            dy, dx = (rng.integers(-jitter, jitter + 1, 2) if jitter and step < steps
                      else (0, 0))
            shifted = xp.roll(image.data, (int(dy), int(dx)), axis=(2, 3)) if dy or dx \
                else image.data
            activation = model.forward(shifted, stop=name)
            units = _units(activation, channels, position)
            history.append((units * activation).reshape(k, -1).sum(axis=1))
            if step == steps:
                break
            grad = model.backward(units, start=name, param_grads=False)
            image.grad = xp.roll(grad, (-int(dy), -int(dx)), axis=(2, 3)) if dy or dx else grad
            optimizer.step()
            if blur_every and blur_sigma > 0 and (step + 1) % blur_every == 0:
                image.data[...] = _gaussian_blur(image.data, blur_sigma)
            if lo is not None:
                xp.clip(image.data, lo, hi, out=image.data)
    history = np.stack([np.asarray(h.get() if B.is_gpu_array(h) else h, np.float64)
                        for h in history])
    return MaximizedActivation(images=image.data, activation=history[-1].astype(np.float32),
                               history=history, layer=name, channels=channels,
                               position=position)


def _bounds(bounds, model, c, op):
    """(lo, hi) float32 arrays of one value per channel, or (None, None)."""
    if isinstance(bounds, str):
        if bounds != "data":
            raise ValueError(f"{op}: bounds must be 'data', None or (lo, hi), got {bounds!r}")
        found = data_bounds(model, c)
        return (None, None) if found is None else found
    if bounds is None:
        return None, None
    try:
        lo, hi = (np.broadcast_to(np.asarray(v, np.float32).reshape(-1), (c,)) for v in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"{op}: bounds must be 'data', None or (lo, hi) (numbers or one per "
                         f"channel of {c}), got {bounds!r}") from None
    if not (np.all(lo < hi) and np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError(f"{op}: bounds must have finite lo < hi, got {bounds!r}")
    return lo.copy(), hi.copy()
