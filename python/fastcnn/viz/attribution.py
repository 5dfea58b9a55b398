"""Attribution: which input pixels a prediction depends on.

Every function takes a ``Sequential`` model and one image (C, H, W) or a batch
(N, C, H, W), returns NumPy arrays (CuPy when the model is on the GPU) with the
batch axis only when one was given, and leaves the model exactly as it found
it: it runs in eval mode (``train=True`` asks for training mode), parameter
gradients, modes, ReLU ``guided`` flags, buffers and recorded activations are
restored afterwards.

``target`` is a class index, one per sample, or None for each sample's
predicted class. ``score`` is 'logit' (the model's output before softmax, the
default) or 'probability' (its softmax).

- :func:`gradient`: d score / d input, signed (the raw saliency).
- :func:`saliency`: max over channels of |gradient| (Simonyan et al., 2014).
- :func:`guided_backprop`: the gradient with ReLU's guided rule (Springenberg et
  al., 2015), of a class score or of any neuron / channel of any layer.
- :func:`deconvolution`: the gradient with the deconvnet's ReLU rule (Zeiler &
  Fergus, 2014).
- :func:`input_x_gradient`: input times gradient (Shrikumar et al., 2016).
- :func:`integrated_gradients`: the gradient integrated along the straight path
  from a baseline to the input, times their difference (Sundararajan et al., 2017).
- :func:`layer_integrated_gradients`: integrated gradients of a layer's units.
- :func:`gradient_shap`: expected gradients over a set of references (Lundberg &
  Lee, 2017; Captum's GradientShap).
- :func:`grad_cam`, :func:`guided_grad_cam` (Selvaraju et al., 2017).
- :func:`smooth_grad`: the average over noisy copies (Smilkov et al., 2017).
- :func:`occlusion`: the score as a window slides over the image (Zeiler &
  Fergus, 2014), evaluated in batches and, by default, recomputing only what
  each window changes.
"""

import itertools
from dataclasses import dataclass

import numpy as np

from .. import _backend as B
from .. import functional as F
from ..nn import BatchNorm2d, Conv2d, Dropout, MaxPool2d, ReLU
from ..nn.module import DECONVOLUTION
from ._common import (LayerPoint, as_input, check_finite, check_logits, check_model,
                      check_score, check_seed, default_cam_layer, layer_name, preserved,
                      probabilities64, resolve_targets, score_seed, unbatch)

__all__ = ["gradient", "saliency", "guided_backprop", "deconvolution", "input_x_gradient",
           "integrated_gradients", "layer_integrated_gradients", "gradient_shap", "grad_cam",
           "guided_grad_cam", "smooth_grad", "occlusion", "OcclusionResult",
           "upsample_bilinear"]


# ---------------------------------------------------------------- gradients

def _neuron_seed(activation, channel, position, op):
    """Gradient seed at a layer's output: one-hot at ``channel`` (all of the channel's
    map when ``position`` is None, the channel's strongest unit per sample for 'max',
    else the unit at ``position`` = (y, x))."""
    xp = B.array_module(activation)
    shape = activation.shape
    if not isinstance(channel, (int, np.integer)) or isinstance(channel, bool) or \
            not 0 <= channel < shape[1]:
        raise ValueError(f"{op}: channel must be an int in [0, {shape[1]}) for a layer "
                         f"output of shape {B.shape_str(shape)}, got {channel!r}")
    seed = xp.zeros_like(activation)
    n = shape[0]
    if position is None:
        seed[:, channel] = 1.0
    elif activation.ndim != 4:
        raise ValueError(f"{op}: position needs a layer with spatial output (N, C, H, W); "
                         f"this one gives {B.shape_str(shape)}")
    elif isinstance(position, str) and position == "max":
        flat = xp.argmax(activation[:, channel].reshape(n, shape[2] * shape[3]), axis=1)
        seed[xp.arange(n), channel, flat // shape[3], flat % shape[3]] = 1.0
    else:
        pair = tuple(position) if isinstance(position, (tuple, list)) else ()
        if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and
                                     not isinstance(v, (bool, np.bool_)) for v in pair):
            raise ValueError(f"{op}: position must be None, 'max' or (y, x) with int y and x, "
                             f"got {position!r}")
        y, x = (int(v) for v in pair)
        if not (0 <= y < shape[2] and 0 <= x < shape[3]):
            raise ValueError(f"{op}: position {(y, x)} is outside the layer's "
                             f"{shape[2]}x{shape[3]} map")
        seed[:, channel, y, x] = 1.0
    return seed


def _unit_layer(model, target, layer, channel, position, op, score="logit"):
    """The name of the layer whose unit (layer / channel / position) a method explains
    instead of a class score, or None for the class score; the two are exclusive, and
    ``score`` (logit or probability) belongs to the class score."""
    check_model(model, op)
    if layer is None:
        if channel is not None or position is not None:
            raise ValueError(f"{op}: channel and position select a unit of a layer; pass "
                             f"layer= too")
        return None
    if target is not None:
        raise ValueError(f"{op}: pass either target (a class score) or layer/channel "
                         f"(a unit of a layer), not both")
    if score != "logit":
        raise ValueError(f"{op}: score={score!r} is a class score's; a unit of a layer is "
                         f"explained as it is (leave score='logit')")
    return layer_name(model, layer, op)


def _unit_value(activation, seed):
    """Each image's unit (the seed's one-hot selection, or a channel's sum) in float64."""
    return (seed * activation).sum(axis=tuple(range(1, seed.ndim)), dtype=np.float64)


def _class_backward(model, x, target, score, guided, op):
    """Forward ``x``, seed at the target score, backward to the input.
    Returns (input gradient, logits, targets); the forward's activations stay on
    the model (inside ``preserved``)."""
    logits = model.forward(x)
    check_logits(logits, op)
    t = resolve_targets(target, logits, op)
    grad = model.backward(score_seed(logits, t, score), guided=guided, param_grads=False)
    return grad, logits, t


def _input_gradient(model, x, target, score, guided, layer, channel, position, op):
    """d score / d x, or of a unit of a layer; ``guided``: the ReLUs' rule (False,
    True or DECONVOLUTION, as Sequential.backward)."""
    check_score(score, op)
    name = _unit_layer(model, target, layer, channel, position, op, score)
    if name is None:
        return _class_backward(model, x, target, score, guided, op)[0]
    activation = model.forward(x, stop=name)
    seed = _neuron_seed(activation, channel, position, op)
    return model.backward(seed, start=name, guided=guided, param_grads=False)


def gradient(model, x, target=None, *, score="logit", layer=None, channel=None,
             position=None, guided=False, train=False):
    """The signed gradient of the target score with respect to the input, shaped like x.

    layer / channel / position: instead of a class score, differentiate a unit of a
    layer: the sum of ``channel``'s map (position None), its strongest unit per
    sample (position 'max'), or the unit at position (y, x). For a non-spatial
    layer (e.g. 'fc1'), channel is the unit's index.
    guided: use guided backpropagation's ReLU rule (see :func:`guided_backprop`);
    False always means the true gradient, whatever the ReLUs' own ``guided`` flags.
    """
    x, single, _ = as_input(model, x, "gradient")
    with preserved(model, train):
        grad = _input_gradient(model, x, target, score, bool(guided), layer, channel,
                               position, "gradient")
    return unbatch(grad, single)


def saliency(model, x, target=None, *, score="logit", train=False):
    """Saliency map (Simonyan et al.): max over channels of |d score / d input|,
    (H, W) for one image, (N, H, W) for a batch. The signed gradient is
    :func:`gradient`."""
    x, single, xp = as_input(model, x, "saliency")
    with preserved(model, train):
        grad = _input_gradient(model, x, target, score, False, None, None, None, "saliency")
    return unbatch(xp.abs(grad).max(axis=1), single)


def guided_backprop(model, x, target=None, *, score="logit", layer=None, channel=None,
                    position=None, train=False):
    """Guided backpropagation (Springenberg et al.): the input gradient of the target
    score, or of a unit of any layer (layer / channel / position as in
    :func:`gradient`), where every ReLU passes gradient only where its forward input
    and the incoming gradient are both positive. Signed, shaped like x."""
    return gradient(model, x, target, score=score, layer=layer, channel=channel,
                    position=position, guided=True, train=train)


def deconvolution(model, x, target=None, *, score="logit", layer=None, channel=None,
                  position=None, train=False):
    """The deconvnet's reconstruction (Zeiler & Fergus; Captum's Deconvolution): the
    input gradient of the target score, or of a unit of any layer (layer / channel /
    position as in :func:`gradient`), where every ReLU passes max(gradient, 0)
    whatever its forward input (max pooling keeps its switches). Signed, shaped
    like x."""
    op = "deconvolution"
    x, single, _ = as_input(model, x, op)
    with preserved(model, train):
        grad = _input_gradient(model, x, target, score, DECONVOLUTION, layer, channel,
                               position, op)
    return unbatch(grad, single)


def input_x_gradient(model, x, target=None, *, score="logit", train=False):
    """Input times gradient (Shrikumar et al.; Captum's InputXGradient): x * d score / d x,
    signed, shaped like x: the first-order share of each pixel in the score, for a
    baseline of 0."""
    op = "input_x_gradient"
    x, single, _ = as_input(model, x, op)
    with preserved(model, train):
        grad = _input_gradient(model, x, target, score, False, None, None, None, op)
    return unbatch(x * grad, single)


def _batched_gradients(xp, n, per_image, batch_size, points, gradient):
    """Gradients at ``per_image`` points of each of the ``n`` images, ``batch_size``
    points per pass, image by image and in order: yields (images, steps, gradients),
    the gradients ``gradient(points(images, steps), images)`` (device index arrays
    in), whose rows belong to the host arrays images / steps."""
    for first in range(0, n * per_image, batch_size):
        index = np.arange(first, min(first + batch_size, n * per_image))
        image, step = index // per_image, index % per_image
        on_device = xp.asarray(image)
        yield image, step, gradient(points(on_device, xp.asarray(step)), on_device)


def _unit_gradient(model, name, seed):
    """gradient(points, images) of each image's unit at layer ``name`` (``seed``: the
    one-hot selection per image, for _batched_gradients)."""
    def gradient(points, image):
        model.forward(points, stop=name)
        return model.backward(seed[image], start=name, guided=False, param_grads=False)
    return gradient


def _class_gradient(model, target, score, guided, op):
    """gradient(points, images) of each image's target score (for _batched_gradients)."""
    def gradient(points, image):
        return _class_backward(model, points, target[image], score, guided, op)[0]
    return gradient


_PATH_METHODS = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_middle",
                 "riemann_right")


def _path_steps(method, n_steps, op):
    """Captum's quadrature for integrated gradients: (alphas, widths) over [0, 1]."""
    if not isinstance(method, str) or method not in _PATH_METHODS:
        raise ValueError(f"{op}: method must be one of {_PATH_METHODS}, got {method!r}")
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n_steps)
        return 0.5 * (1.0 + nodes), 0.5 * weights
    if n_steps < 2:
        raise ValueError(f"{op}: {method} needs n_steps >= 2, got {n_steps}")
    n = n_steps
    widths = np.full(n, 1.0 / n)
    if method == "riemann_trapezoid":
        widths[[0, -1]] /= 2
        return np.linspace(0.0, 1.0, n), widths
    lo = {"riemann_left": 0.0, "riemann_middle": 0.5 / n, "riemann_right": 1.0 / n}[method]
    return np.linspace(lo, lo + 1.0 - 1.0 / n, n), widths


def _path_args(model, x, baseline, n_steps, method, batch_size, score, op):
    """The integrated-gradients methods' checked arguments: (x, single, xp, baseline
    images, quadrature alphas, widths, batch_size)."""
    x, single, xp = as_input(model, x, op)
    check_score(score, op)
    n_steps = B.as_count(n_steps, f"{op}: n_steps")
    batch_size = B.as_count(batch_size, f"{op}: batch_size")
    alphas, widths = _path_steps(method, n_steps, op)
    return x, single, xp, _fill_images(baseline, x, xp, op, "baseline"), alphas, widths, \
        batch_size


def _path_integral(xp, start, diff, alphas, widths, batch_size, gradient):
    """sum over the quadrature of width * gradient(start + alpha * diff), per image
    (float64), the points ``batch_size`` at a time and summed image by image in order."""
    alpha = xp.asarray(alphas.astype(np.float32))
    total = xp.zeros(diff.shape, np.float64)
    expand = (slice(None),) + (None,) * (diff.ndim - 1)

    def points(image, step):
        return start[image] + alpha[step][expand] * diff[image]

    for image, step, grad in _batched_gradients(xp, diff.shape[0], len(alphas), batch_size,
                                                points, gradient):
        weighted = grad.astype(np.float64) * xp.asarray(widths[step])[expand]
        for row, i in enumerate(image):  # each image's steps in order, whatever the batch
            total[i] += weighted[row]
    return total


def integrated_gradients(model, x, target=None, *, baseline=0.0, n_steps=50,
                         method="gausslegendre", batch_size=128, score="logit", layer=None,
                         channel=None, position=None, return_convergence_delta=False,
                         train=False):
    """Integrated gradients (Sundararajan et al.; Captum's IntegratedGradients):
    (x - baseline) times the gradient of the target score averaged along the straight
    path from the baseline to x, signed, shaped like x. The attributions add up to
    score(x) - score(baseline), up to the quadrature's error.

    baseline: a value (in the model's input units), an image (C, H, W) or one per
    sample (N, C, H, W). n_steps / method: the integral's quadrature, Captum's:
    'gausslegendre' (the default; exact for polynomials of degree < 2 * n_steps),
    'riemann_left', 'riemann_middle', 'riemann_right' or 'riemann_trapezoid' (as
    Captum's: n_steps points from 0 to 1, widths 1 / n_steps with the end ones
    halved). batch_size: path points per forward pass; the points are summed image
    by image in order (float64), so an image gets the same result alone or in a
    batch. ``target`` defaults to the prediction on x.
    layer / channel / position: instead of a class score, integrate a unit of a layer
    (as :func:`gradient`; Captum's NeuronIntegratedGradients): the sum of
    ``channel``'s map (position None), the unit at position (y, x), or, for 'max',
    the channel's strongest unit at x, the same unit all along the path.
    return_convergence_delta: also return, per image, the attributions' sum minus
    (score(x) - score(baseline)): how far the quadrature is from exact.
    """
    op = "integrated_gradients"
    x, single, xp, base, alphas, widths, batch_size = _path_args(
        model, x, baseline, n_steps, method, batch_size, score, op)
    diff = x - base
    n = x.shape[0]
    name = _unit_layer(model, target, layer, channel, position, op, score)
    with preserved(model, train):
        if name is None:
            ends = model.forward(xp.concatenate([x, base]))          # (2N, classes)
            t, change = _target_change(ends, target, score, n, op)
            gradient = _class_gradient(model, t, score, False, op)
        else:
            ends = model.forward(xp.concatenate([x, base]), stop=name)
            seed = _neuron_seed(ends[:n], channel, position, op)   # 'max': the strongest at x
            change = _unit_value(ends[:n] - ends[n:], seed)
            gradient = _unit_gradient(model, name, seed)

        total = _path_integral(xp, base, diff, alphas, widths, batch_size, gradient)
    attributions = total * diff
    out = attributions.astype(np.float32)
    if not return_convergence_delta:
        return unbatch(out, single)
    delta = (attributions.sum(axis=(1, 2, 3)) - change).astype(np.float32)
    return unbatch((out, delta), single)


def layer_integrated_gradients(model, x, layer, target=None, *, baseline=0.0, n_steps=50,
                               method="gausslegendre", batch_size=128, score="logit",
                               attribute_to_layer_input=False, return_convergence_delta=False,
                               train=False):
    """Integrated gradients of a layer's output (Captum's LayerIntegratedGradients): the
    layer's activation is moved along the straight path from its value on the baseline
    to its value on x, the rest of the network run from there, and the gradient of the
    target score averaged along the path times the activations' difference. Shaped like
    the layer's output (N, ...); the attributions add up to score(x) - score(baseline),
    up to the quadrature's error: how much each unit (channel, position) of the layer
    carries of the change.

    layer: a name, an index or the layer itself. attribute_to_layer_input: take the
    path in the layer's input instead (the previous layer's output, or the image for
    the first layer). Other arguments as :func:`integrated_gradients`.
    """
    op = "layer_integrated_gradients"
    x, single, xp, base, alphas, widths, batch_size = _path_args(
        model, x, baseline, n_steps, method, batch_size, score, op)
    point = LayerPoint(model, layer, attribute_to_layer_input, op)
    n = x.shape[0]
    with preserved(model, train):
        acts = point.activation(xp.concatenate([x, base]))
        t, change = _target_change(point.logits(acts), target, score, n, op)
        start, diff = acts[n:], acts[:n] - acts[n:]

        def gradient(points, image):
            return point.gradient(score_seed(point.logits(points), t[image], score))

        total = _path_integral(xp, start, diff, alphas, widths, batch_size, gradient)
    attributions = total * diff
    out = attributions.astype(np.float32)
    if not return_convergence_delta:
        return unbatch(out, single)
    spent = attributions.sum(axis=tuple(range(1, attributions.ndim)))  # (0,) for no images
    delta = (spent - change).astype(np.float32)
    return unbatch((out, delta), single)


def gradient_shap(model, x, baselines, target=None, *, n_samples=5, stdev=0.0, batch_size=128,
                  seed=0, score="logit", layer=None, channel=None, position=None,
                  multiply_by_inputs=True, return_convergence_delta=False, train=False):
    """GradientSHAP (Lundberg & Lee; Captum's GradientShap), expected gradients: the mean
    over ``n_samples`` draws of gradient(point) * (x' - b), where b is a reference drawn
    from ``baselines``, x' = x plus Gaussian noise of ``stdev``, and point a uniformly
    random place on the segment from b to x'. It estimates SHAP values with the
    references as the background distribution; in expectation the attributions add up
    to score(x) - mean score(baselines) (exactly, for a linear model).

    baselines: reference images (B, C, H, W), or one image (C, H, W). The draws come from
    ``seed`` in this order: the noise (n_samples, C, H, W), the path positions
    (n_samples,) and the reference indices (n_samples,); every image gets the same
    draws, so an image gets the same result alone or in a batch. multiply_by_inputs:
    False returns the mean gradient alone. return_convergence_delta: also return, for
    each (image, sample) in that order (image i's sample s at i * n_samples + s), the
    sample's attributions' sum minus score(x') - score(b) (Captum's delta).
    layer / channel / position: instead of a class score, a unit of a layer (as
    :func:`gradient`; Captum's NeuronGradientShap), 'max' the channel's strongest unit
    at x; the delta is then each sample's sum minus the unit's change.
    """
    op = "gradient_shap"
    unit = _unit_layer(model, target, layer, channel, position, op, score)
    return _gradient_shap(op, model, x, baselines, target, None, n_samples, stdev,
                          batch_size, seed, score, multiply_by_inputs,
                          return_convergence_delta, train,
                          None if unit is None else (unit, channel, position))


def _gradient_shap(op, model, x, baselines, target, point, n_samples, stdev, batch_size, seed,
                   score, multiply_by_inputs, return_convergence_delta, train, unit=None):
    """gradient_shap, or with ``point`` (a function of the checked x making a
    LayerPoint) layer_gradient_shap: the gradient and the change taken at the layer;
    or with ``unit`` (layer name, channel, position) the gradient of that unit."""
    seed = check_seed(seed, op)
    x, single, xp = as_input(model, x, op)
    check_score(score, op)
    n_samples = B.as_count(n_samples, f"{op}: n_samples")
    batch_size = B.as_count(batch_size, f"{op}: batch_size")
    stdev = _real_arg(stdev, "stdev", op)
    refs = check_finite(B.as_float(baselines, "baselines", xp), "baselines", op)
    if refs.ndim == 3:
        refs = refs[None]
    if refs.ndim != 4 or refs.shape[1:] != x.shape[1:] or refs.shape[0] < 1:
        raise ValueError(f"{op}: baselines must be reference images (B, C, H, W) or one image "
                         f"{B.shape_str(x.shape[1:])}; got shape {B.shape_str(refs.shape)}")
    point = None if point is None else point()
    rng = np.random.default_rng(seed)
    noise = xp.asarray(rng.standard_normal((n_samples,) + x.shape[1:], dtype=np.float32))
    alpha = xp.asarray(rng.random(n_samples).astype(np.float32))
    which = xp.asarray(rng.integers(0, refs.shape[0], n_samples))
    n = x.shape[0]
    deltas = xp.zeros(n * n_samples, np.float64)
    with preserved(model, train):
        if unit is None:
            logits = model.forward(x)
            check_logits(logits, op)
            t = resolve_targets(target, logits, op)
        else:
            name = unit[0]
            selection = _neuron_seed(model.forward(x, stop=name), *unit[1:], op)
        total = xp.zeros((n,) + (x.shape[1:] if point is None else
                                 point.activation(x).shape[1:]), np.float64)

        def noisy(image, sample):
            return x[image] + stdev * noise[sample]

        def points(image, sample):
            b = refs[which[sample]]
            return b + alpha[sample][:, None, None, None] * (noisy(image, sample) - b)

        if unit is not None:
            gradient = _unit_gradient(model, name, selection)
        elif point is None:
            gradient = _class_gradient(model, t, score, False, op)
        else:
            def gradient(at, image):
                return point.gradient(score_seed(point.logits(point.activation(at)), t[image],
                                                 score))
        for image, sample, grad in _batched_gradients(xp, n, n_samples, batch_size, points,
                                                      gradient):
            on_device = xp.asarray(image), xp.asarray(sample)
            ends = xp.concatenate([noisy(*on_device), refs[which[on_device[1]]]])
            m = len(image)
            if point is not None:   # the change at the layer
                ends = point.activation(ends)
            diff = (ends[:m] - ends[m:]).astype(np.float64)
            values = grad.astype(np.float64) * (diff if multiply_by_inputs else 1.0)
            for row, i in enumerate(image):  # each image's samples in order, whatever the batch
                total[i] += values[row]
            if not return_convergence_delta:
                continue
            if unit is not None:
                ends = model.forward(ends, stop=name)
                change = _unit_value(ends[:m] - ends[m:], selection[on_device[0]])
            else:
                ends = point.logits(ends) if point is not None else model.forward(ends)
                ends = ends if score == "logit" else probabilities64(ends, axis=1)
                rows = xp.arange(m)
                tt = t[on_device[0]]
                change = ends[rows, tt].astype(np.float64) - ends[rows + m, tt]
            spent = (grad.astype(np.float64) * diff).sum(axis=tuple(range(1, diff.ndim)))
            deltas[xp.asarray(image * n_samples + sample)] = spent - change
    out = unbatch((total / n_samples).astype(np.float32), single)
    if not return_convergence_delta:
        return out
    return out, deltas.astype(np.float32)


# ---------------------------------------------------------------- Grad-CAM

def _interpolation_matrix(size_in, size_out, xp):
    """(size_out, size_in) weights of 1-D linear interpolation with half-pixel centres
    (align_corners=False, as torch.nn.functional.interpolate)."""
    scale = size_in / size_out
    src = np.maximum((np.arange(size_out) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    i1 = np.minimum(i0 + 1, size_in - 1)
    frac = src - i0
    m = np.zeros((size_out, size_in), np.float64)
    np.add.at(m, (np.arange(size_out), i0), 1.0 - frac)
    np.add.at(m, (np.arange(size_out), i1), frac)
    return xp.asarray(m.astype(np.float32))


def upsample_bilinear(maps, size):
    """Resize (..., h, w) maps to ``size`` = (H, W) bilinearly (half-pixel centres,
    as torch's ``interpolate(mode='bilinear', align_corners=False)``)."""
    xp = B.array_module(maps)
    maps = xp.asarray(maps, dtype=np.float32)
    rows = _interpolation_matrix(maps.shape[-2], int(size[0]), xp)
    cols = _interpolation_matrix(maps.shape[-1], int(size[1]), xp)
    return xp.matmul(xp.matmul(rows, maps), cols.T)


def _nearest_sources(size_in, size_out):
    """Source index of each output of a nearest-neighbour resize, as torch's
    ``interpolate(mode='nearest')``: floor(i * in / out), the scale in float32."""
    scale = np.float32(size_in) / np.float32(size_out)
    src = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, size_in - 1)


_INTERPOLATIONS = ("bilinear", "nearest")


def _check_interpolate(mode, op):
    if not isinstance(mode, str) or mode not in _INTERPOLATIONS:
        raise ValueError(f"{op}: interpolate must be one of {_INTERPOLATIONS}, got {mode!r}")


def _upsample(maps, size, mode):
    """(..., h, w) maps resized to ``size`` by ``mode``: 'bilinear' (upsample_bilinear)
    or 'nearest' (each output pixel the map's value at floor(i * h / H), as torch's and
    Captum's 'nearest')."""
    if mode == "bilinear":
        return upsample_bilinear(maps, size)
    xp = B.array_module(maps)
    rows = xp.asarray(_nearest_sources(maps.shape[-2], int(size[0])))
    cols = xp.asarray(_nearest_sources(maps.shape[-1], int(size[1])))
    return xp.ascontiguousarray(maps[..., rows[:, None], cols[None, :]])


def _cam(model, x, target, layer, score, op, relu=True):
    """Grad-CAM at layer-resolution (N, h, w) and the logits; leaves the forward and
    the plain backward's records on the model."""
    check_score(score, op)
    name = default_cam_layer(model, op) if layer is None else layer_name(model, layer, op)
    logits = model.forward(x)
    check_logits(logits, op)
    t = resolve_targets(target, logits, op)
    grad = model.backward(score_seed(logits, t, score), stop=name, guided=False,
                          param_grads=False)
    activation = model.activations[name]
    if activation.ndim != 4:
        raise ValueError(f"{op}: Grad-CAM needs a layer with spatial output (N, C, H, W); "
                         f"{name!r} gives {B.shape_str(activation.shape)}")
    xp = B.array_module(activation)
    weights = grad.mean(axis=(2, 3))                               # (N, K)
    cam = xp.einsum("nk,nkhw->nhw", weights, activation)
    return (xp.maximum(cam, 0.0) if relu else cam), logits, t


def grad_cam(model, x, target=None, layer=None, *, score="logit", upsample=True,
             interpolate="bilinear", relu=True, train=False):
    """Grad-CAM (Selvaraju et al.) for a conv layer (default: the last conv block's
    output, e.g. 'relu2').

    With A the layer's output (K maps) and g the gradient of the target score at it:
    w_k = mean over space of g_k, map = ReLU(sum_k w_k A_k) (``relu=False``: the signed
    sum, as Captum's LayerGradCam by default), resized to the input's size by
    ``interpolate`` ('bilinear' or 'nearest'; ``upsample=False``: at the layer's
    resolution). Returns (H, W) for one image, (N, H, W) for a batch.
    """
    op = "grad_cam"
    x, single, _ = as_input(model, x, op)
    _check_interpolate(interpolate, op)
    with preserved(model, train):
        cam, _, _ = _cam(model, x, target, layer, score, op, bool(relu))
    if upsample:
        cam = _upsample(cam, x.shape[2:], interpolate)
    return unbatch(cam, single)


def guided_grad_cam(model, x, target=None, layer=None, *, score="logit",
                    interpolate="bilinear", train=False):
    """Guided Grad-CAM: guided backpropagation times the Grad-CAM map resized to the
    input by ``interpolate`` ('bilinear', or 'nearest' as Captum's GuidedGradCam
    by default), per pixel and channel. Signed, shaped like x."""
    op = "guided_grad_cam"
    x, single, _ = as_input(model, x, op)
    _check_interpolate(interpolate, op)
    with preserved(model, train):
        cam, logits, t = _cam(model, x, target, layer, score, op)
        guided = model.backward(score_seed(logits, t, score), guided=True, param_grads=False)
    cam = _upsample(cam, x.shape[2:], interpolate)
    return unbatch(guided * cam[:, None], single)


# ---------------------------------------------------------------- SmoothGrad

_SMOOTH_METHODS = ("saliency", "gradient", "guided", "input_x_gradient", "integrated",
                   "deeplift")
_NT_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")


def _real_arg(value, name, op):
    """A finite, non-negative real number argument."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                     np.floating)):
        raise TypeError(f"{op}: {name} must be a number, got {value!r}")
    if not 0 <= float(value) < np.inf:
        raise ValueError(f"{op}: {name} must be finite and >= 0, got {value}")
    return float(value)


def smooth_grad(model, x, target=None, *, method="saliency", n_samples=25, sigma=None,
                stdev=None, nt_type="smoothgrad", batch_size=128, seed=0, score="logit",
                method_args=None, train=False):
    """SmoothGrad (Smilkov et al.): ``method``'s attribution over ``n_samples`` noisy
    copies of each image, aggregated by ``nt_type``, as Captum's NoiseTunnel.

    method: 'gradient' (the signed gradient), 'guided' (guided backpropagation), both
    shaped like x, or 'saliency': |gradient| per channel, aggregated, then the max over
    channels ((H, W); Captum's NoiseTunnel(Saliency) followed by that max); or any of
    'input_x_gradient', 'integrated' (:func:`integrated_gradients`) and 'deeplift'
    (:func:`~fastcnn.viz.deep_lift`) of each noisy copy, as Captum's NoiseTunnel around
    them, with ``method_args`` passed on (e.g. ``{"baseline": 0.0, "n_steps": 20}``;
    ``batch_size`` is then the method's own).
    nt_type: 'smoothgrad' (the mean), 'smoothgrad_sq' (the mean of the squares) or
    'vargrad' (their variance: mean of squares minus the squared mean).
    Noise: Gaussian, with standard deviation ``stdev`` (absolute, in the input's units,
    as Captum's ``stdevs``) or ``sigma`` times each image's range (max - min; the
    paper's noise level; the default, 0.15, when neither is given; an image of one
    value then gets no noise). The copies go through the model ``batch_size`` at a
    time. The noise is drawn from ``seed`` once, (n_samples, C, H, W), and scaled per
    image, and the samples are summed in order, so an image gets the same result
    alone or in any batch. ``target`` defaults to the prediction on the clean image.
    """
    op = "smooth_grad"
    seed = check_seed(seed, op)
    x, single, xp = as_input(model, x, op)
    check_score(score, op)
    if not isinstance(method, str) or method not in _SMOOTH_METHODS:
        raise ValueError(f"{op}: method must be one of {_SMOOTH_METHODS}, got {method!r}")
    if not isinstance(nt_type, str) or nt_type not in _NT_TYPES:
        raise ValueError(f"{op}: nt_type must be one of {_NT_TYPES}, got {nt_type!r}")
    n_samples = B.as_count(n_samples, f"{op}: n_samples")
    batch_size = B.as_count(batch_size, f"{op}: batch_size")
    n = x.shape[0]
    if stdev is not None:
        if sigma is not None:
            raise ValueError(f"{op}: give the noise as sigma (relative to each image's "
                             f"range) or stdev (absolute), not both")
        scale = xp.full(n, _real_arg(stdev, "stdev", op), np.float32)
    else:
        sigma = 0.15 if sigma is None else _real_arg(sigma, "sigma", op)
        flat = x.reshape(n, x[0].size) if n else None
        scale = sigma * (flat.max(axis=1) - flat.min(axis=1)) if n else xp.zeros(0)
    noise = xp.asarray(np.random.default_rng(seed).standard_normal(
        (n_samples,) + x.shape[1:], dtype=np.float32))
    total = xp.zeros(x.shape, np.float64)
    squares = None if nt_type == "smoothgrad" else xp.zeros(x.shape, np.float64)
    if method in ("input_x_gradient", "integrated", "deeplift"):
        attribution = _noise_tunnel_method(method, score, batch_size, method_args, train, op)
        with preserved(model, train):
            logits = model.forward(x)
            check_logits(logits, op)
            t = resolve_targets(target, logits, op)
        for sample in range(n_samples):  # every image's copy of one draw, draw by draw
            values = attribution(model, x + scale[:, None, None, None] * noise[sample], t)
            values = values.astype(np.float64)
            total += values
            if squares is not None:
                squares += values * values
        return unbatch(_aggregate(total, squares, n_samples, nt_type), single)
    if method_args:
        raise ValueError(f"{op}: method_args is for input_x_gradient, integrated and deeplift; "
                         f"{method!r} takes none")
    with preserved(model, train):
        logits = model.forward(x)
        check_logits(logits, op)
        t = resolve_targets(target, logits, op)

        def noisy(image, sample):
            return x[image] + scale[image][:, None, None, None] * noise[sample]

        gradient = _class_gradient(model, t, score, method == "guided", op)
        for image, _, grad in _batched_gradients(xp, n, n_samples, batch_size, noisy, gradient):
            values = (xp.abs(grad) if method == "saliency" else grad).astype(np.float64)
            for row, i in enumerate(image):  # each image's samples in order, whatever the batch
                total[i] += values[row]
                if squares is not None:
                    squares[i] += values[row] * values[row]
    out = _aggregate(total, squares, n_samples, nt_type)
    if method == "saliency":
        out = out.max(axis=1)
    return unbatch(out, single)


def _aggregate(total, squares, n_samples, nt_type):
    """NoiseTunnel's aggregate of the samples' sum (and sum of squares), as float32."""
    mean = total / n_samples
    if nt_type == "smoothgrad_sq":
        mean = squares / n_samples
    elif nt_type == "vargrad":
        mean = squares / n_samples - mean * mean
    return mean.astype(np.float32)


def _noise_tunnel_method(method, score, batch_size, method_args, train, op):
    """attribution(model, noisy_batch, targets) for smooth_grad's attribution methods."""
    args = dict(method_args or {})
    taken = {"target", "train", "return_convergence_delta", "layer", "channel", "position"}
    if taken & set(args):
        raise ValueError(f"{op}: method_args may not set {sorted(taken & set(args))}")
    if method == "deeplift":
        if score != "logit":
            raise ValueError(f"{op}: DeepLIFT attributes the logit; score must be 'logit'")
        from .deeplift import deep_lift

        return lambda model, x, t: deep_lift(model, x, t, train=train, **args)
    if method == "integrated":
        args.setdefault("batch_size", batch_size)
        return lambda model, x, t: integrated_gradients(model, x, t, score=score, train=train,
                                                        **args)
    return lambda model, x, t: input_x_gradient(model, x, t, score=score, train=train, **args)


# ---------------------------------------------------------------- occlusion

@dataclass
class OcclusionResult:
    """What :func:`occlusion` measured. Per-window-position maps are (PH, PW) (with a
    leading N for a batch), heatmaps are at input resolution (H, W); for windows over
    some of the channels, (PC, PH, PW) and (C, H, W).

    probability, logit: the target's softmax probability and logit with the window
      at each position; drop, logit_drop: how much each fell from the unoccluded
      image's (positive = the window hid evidence for the target);
    predicted: the predicted class with the window at each position;
    heatmap, logit_heatmap: drop and logit_drop at each pixel, averaged over the
      windows covering it (0 where none does); logit_heatmap is Captum's Occlusion
      attribution of the logit with the same window, stride and baseline;
    base_probability, base_logit: the unoccluded image's; target: the class scored;
    window, stride: (height, width) pairs (or (channels, height, width)); positions:
      (ys, xs) (or (cs, ys, xs)), the windows' top-left corners along each axis (the
      last windows may be clipped at the image's edge).
    """

    probability: object
    logit: object
    drop: object
    logit_drop: object
    predicted: object
    heatmap: object
    logit_heatmap: object
    base_probability: object
    base_logit: object
    target: object
    window: tuple
    stride: tuple
    positions: tuple


def _pointwise(layer):
    """Layers whose output at a pixel depends only on their input at that pixel."""
    if isinstance(layer, ReLU):
        return True
    if isinstance(layer, BatchNorm2d):
        return not layer.training and layer.track_running_stats
    if isinstance(layer, Dropout):
        return not layer.training or layer.p == 0.0
    return False


def _window_geometry(layer, in_shape, out_shape):
    """(kernel, stride, dilation, (top, left) padding, (bottom, right) padding, pad
    value) of a Conv2d or MaxPool2d, the padding enough to compute every output."""
    kernel, stride, dilation = layer.kernel_size, layer.stride, layer.dilation
    if isinstance(layer, Conv2d):
        lo, value = layer.paddings()[0], 0.0
    else:
        lo, value = layer.padding, -np.inf
    hi = tuple(max(0, (o - 1) * s + (k - 1) * d + 1 - size - p) for o, s, k, d, size, p in
               zip(out_shape[-2:], stride, kernel, dilation, in_shape[-2:], lo))
    return kernel, stride, dilation, tuple(lo), hi, value


def _windows(padded, ys, xs, h, w):
    """(B, C, h, w) crops of a (C, Hp, Wp) map at top-left corners (ys[b], xs[b])."""
    xp = B.array_module(padded)
    c, hp, wp = padded.shape
    sc, sh, sw = padded.strides
    view = xp.lib.stride_tricks.as_strided(padded, shape=(hp - h + 1, wp - w + 1, c, h, w),
                                           strides=(sh, sw, sc, sh, sw))
    return view[xp.asarray(ys), xp.asarray(xs)]


def _paste(crops, patch, ry, rx):
    """Write ``patch`` (B, C, ph, pw) into ``crops`` (B, C, ch, cw) at (ry[b], rx[b]),
    clipped to the crop. Neighbouring windows mostly share an offset, so the copies
    are written in runs of equal offsets, each one slice assignment."""
    ph, pw = patch.shape[2:]
    ch, cw = crops.shape[2:]
    change = np.flatnonzero((np.diff(ry) != 0) | (np.diff(rx) != 0)) + 1
    for a, b in zip([0] + change.tolist(), change.tolist() + [len(ry)]):
        oy, ox = int(ry[a]), int(rx[a])
        y0, y1 = max(oy, 0), min(oy + ph, ch)
        x0, x1 = max(ox, 0), min(ox + pw, cw)
        if y0 < y1 and x0 < x1:
            crops[a:b, :, y0:y1, x0:x1] = patch[a:b, :, y0 - oy:y1 - oy, x0 - ox:x1 - ox]


def _touched(start, size, lo_pad, kernel, stride, dilation, out_size):
    """First output index and count of outputs whose window reads input rows
    [start, start + size), per copy, before clamping to a common count."""
    first = -((-(start + lo_pad - (kernel - 1) * dilation)) // stride)
    last = (start + size - 1 + lo_pad) // stride
    return np.clip(first, 0, out_size - 1), np.clip(last, 0, out_size - 1)


def _fold_batch_norm(weight, bias, bn):
    """Conv weights and bias with an eval-mode batch norm after the conv folded in."""
    xp = B.array_module(weight)
    scale = 1.0 / xp.sqrt(bn.running_var.astype(np.float64) + bn.eps)
    shift = -bn.running_mean * scale
    if bn.affine:
        scale, shift = scale * bn.weight.data, shift * bn.weight.data + bn.bias.data
    if bias is not None:
        shift = shift + bias * scale
    return ((weight * scale[:, None, None, None]).astype(np.float32),
            shift.astype(np.float32))


class _OcclusionPlan:
    """Occlusion by patches: a window changes the first layers' outputs only in a small
    region, so each occluded copy carries just that region (a patch and its corner)
    from layer to layer, computed from a crop of the unoccluded image's activation
    with the patch pasted in. Conv2d (with an eval batch norm after it folded in) and
    MaxPool2d turn a patch into the patch of outputs whose windows touch it; ReLU,
    eval batch norm and dropout act on it directly. At the first other layer
    (Flatten, usually) the copies are materialised in full and the rest of the model
    runs on them as a batch. An empty plan (``incremental=False``) materialises at
    the input: plain batched re-evaluation."""

    def __init__(self, model, incremental):
        self.model = model
        self.steps = []          # (layer, input's layer name, output's layer name, conv params)
        self.last = None         # the last layer the patches go through (None: the input)
        layers = list(model.named_children()) if incremental else []
        i = 0
        while i < len(layers):
            name, layer = layers[i]
            conv = None
            if isinstance(layer, Conv2d) and layer.explicit_pad() is not None:
                break  # reflected / wrapped padding copies changed pixels elsewhere too
            if isinstance(layer, Conv2d):
                conv = (layer.weight.data, None if layer.bias is None else layer.bias.data)
                after = layers[i + 1][1] if i + 1 < len(layers) else None
                if isinstance(after, BatchNorm2d) and _pointwise(after):
                    conv = _fold_batch_norm(*conv, after)
                    i += 1
                    name = layers[i][0]
            elif not (isinstance(layer, MaxPool2d) or _pointwise(layer)):
                break
            self.steps.append((layer, self.last, name, conv))
            self.last = name
            i += 1

    def set_image(self, image):
        """Run the unoccluded image (C, H, W); keep what the patches are computed from.
        Returns its logits (1, classes)."""
        model = self.model
        logits = model.forward(image[None])
        xp = B.array_module(image)

        def output(name):
            return image if name is None else model.activations[name][0]

        self.geometry = []
        for layer, source, name, _ in self.steps:
            if not isinstance(layer, (Conv2d, MaxPool2d)):
                self.geometry.append(None)
                continue
            before, after = output(source), output(name)
            kernel, stride, dilation, lo, hi, value = _window_geometry(layer, before.shape,
                                                                       after.shape)
            padded = xp.pad(before, ((0, 0), (lo[0], hi[0]), (lo[1], hi[1])),
                            constant_values=value)
            self.geometry.append((padded, kernel, stride, dilation, lo, after.shape[-2:]))
        self.base = output(self.last)
        return logits

    def logits(self, patch, ys, xs):
        """Logits (B, classes) of the copies whose input differs from the image by
        ``patch`` (B, C, ph, pw) at corners (ys, xs) (host int arrays)."""
        xp = B.array_module(patch)
        for (layer, _, _, conv), geometry in zip(self.steps, self.geometry):
            if geometry is None:
                patch = xp.maximum(patch, 0.0) if isinstance(layer, ReLU) else layer.forward(patch)
                continue
            padded, kernel, stride, dilation, lo, out_hw = geometry
            corners, sizes = [], []
            for axis, start in ((0, ys), (1, xs)):
                first, last = _touched(start, patch.shape[2 + axis], lo[axis], kernel[axis],
                                       stride[axis], dilation[axis], out_hw[axis])
                size = max(int((last - first).max()), 0) + 1
                corners.append(np.minimum(first, out_hw[axis] - size))
                sizes.append(size)
            crop = [(sizes[a] - 1) * stride[a] + (kernel[a] - 1) * dilation[a] + 1
                    for a in (0, 1)]
            top = [corners[a] * stride[a] for a in (0, 1)]
            crops = _windows(padded, top[0], top[1], crop[0], crop[1])
            _paste(crops, patch, ys + lo[0] - top[0], xs + lo[1] - top[1])
            if conv is not None:
                patch = F.conv2d(crops, conv[0], conv[1], layer.stride, 0, layer.dilation,
                                 layer.groups)
            else:
                patch = F.max_pool2d(crops, layer.kernel_size, layer.stride, 0, layer.dilation)
            ys, xs = corners
        full = xp.broadcast_to(self.base, (len(ys),) + self.base.shape).copy()
        ph, pw = patch.shape[2:]
        rows = xp.asarray(ys[:, None] + np.arange(ph))[:, :, None]
        cols = xp.asarray(xs[:, None] + np.arange(pw))[:, None, :]
        full[xp.arange(len(ys))[:, None, None], :, rows, cols] = patch.transpose(0, 2, 3, 1)
        return self.model.forward(full, start=self.last)


def _window_args(window, stride, channels, op):
    """occlusion's window and stride: (height, width) pairs, or (channels, height,
    width) triples for windows over some channels. An int is the same size on every
    axis; a stride tuple has the window's length."""
    def sizes(value, name, length=None):
        if isinstance(value, (tuple, list)):
            items = tuple(value)
            lengths = (length,) if length else (2, 3)
        else:
            items = (value,) * (length or 2)
            lengths = (len(items),)
        if len(items) not in lengths or not all(
                isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1
                for v in items):
            shapes = " or ".join({2: "(height, width)", 3: "(channels, height, width)"}[k]
                                 for k in lengths)
            raise ValueError(f"{op}: {name} must be a positive int or {shapes} of them, "
                             f"got {value!r}")
        return tuple(int(v) for v in items)

    window = sizes(window, "window")
    stride = sizes(stride, "stride", len(window))
    if len(window) == 3 and window[0] > channels:
        raise ValueError(f"{op}: window {window} covers more channels than the input's "
                         f"{channels}")
    return window, stride


def _starts(size, window, stride):
    """Top-left corners along an axis of ``size``: 0, stride, ... up to the first window
    that reaches the far edge (a clipped last one); a stride above the window leaves
    gaps, and no window starts past the edge."""
    return np.arange(0, min(size - window + stride, size), stride)


def _target_change(ends, target, score, n, op):
    """From the logits of n images and then their baselines: the target classes, and
    each image's target score minus its baseline's (float64)."""
    check_logits(ends, op)
    t = resolve_targets(target, ends[:n], op)
    scores = ends if score == "logit" else probabilities64(ends, axis=1)
    rows = B.array_module(ends).arange(n)
    return t, scores[rows, t].astype(np.float64) - scores[rows + n, t]


def _fill_images(fill, x, xp, op, name="fill"):
    """The replacement pixels (or baseline ``name``), (N, C, H, W): a value, an image or
    one image per sample."""
    if fill is None or isinstance(fill, (str, bytes)):
        raise TypeError(f"{op}: {name} must be a number or an image array, got {fill!r}")
    if np.ndim(fill) == 0 and not B.is_gpu_array(fill):
        if isinstance(fill, (bool, np.bool_)) or not isinstance(fill, (int, float, np.number)):
            raise TypeError(f"{op}: {name} must be a number or an image array, got {fill!r}")
        fill = xp.full(x.shape[1:], float(fill), np.float32)
    fill = check_finite(B.as_float(fill, name, xp), name, op)
    if fill.shape == x.shape[1:]:
        fill = fill[None]
    if fill.ndim != 4 or fill.shape[1:] != x.shape[1:] or fill.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"{op}: {name} must be a value, an image {B.shape_str(x.shape[1:])} or "
                         f"one per sample {B.shape_str(x.shape)}; got shape "
                         f"{B.shape_str(fill.shape)}")
    return xp.broadcast_to(fill, x.shape)


def _window_average(values, starts, window, size, xp):
    """Each element's mean of ``values`` (N, P1, P2[, P3]: one per window position) over
    the windows covering it (the windows at the ``starts`` on each axis, clipped at the
    edge ``size``): (N,) + size, 0 where no window does."""
    n = values.shape[0]
    total = xp.zeros((n,) + tuple(size), np.float32)
    count = np.zeros(tuple(size), np.float32)
    for offset in itertools.product(*(range(k) for k in window)):
        inside = [s + o < m for s, o, m in zip(starts, offset, size)]
        at = np.ix_(*[(s[i] + o) for s, i, o in zip(starts, inside, offset)])
        total[(slice(None),) + tuple(xp.asarray(a) for a in at)] += \
            values[(slice(None),) + tuple(xp.asarray(a) for a in np.ix_(*inside))]
        count[at] += 1
    count = xp.asarray(count)
    return xp.where(count > 0, total / xp.maximum(count, 1), 0.0).astype(np.float32)


def occlusion(model, x, target=None, *, window=4, stride=1, fill=0.0, batch_size=256,
              incremental=True, train=False):
    """Occlusion sensitivity (Zeiler & Fergus): slide a window over the image, replace
    the pixels under it by ``fill`` and score the target class at every position.

    window, stride: an int or (height, width); the windows' top-left corners at 0,
    stride, 2*stride, ... until a window reaches the image's far edge, the last ones
    clipped there (PH = ceil((H - window) / stride) + 1), as Captum's Occlusion: every
    pixel is covered when stride <= window (a larger stride leaves gaps, 0 in the
    heatmaps). A window (channels, height, width) with fewer channels than the
    input's hides those channels only and slides along the channels too (Captum's
    ``sliding_window_shapes=(c, h, w)``, stride an int or (channels, height, width)):
    the per-position maps are then (PC, PH, PW) and the heatmaps (C, H, W).
    fill: a value (in the model's input units: 0.0 is the mean pixel for standardised
    input), a baseline image (C, H, W), or one per sample (N, C, H, W).
    batch_size: occluded copies per forward pass.
    incremental: carry only the region each window changes through the first layers
    (conv, pool, ReLU, eval batch norm), materialising full copies at the first
    other layer; False re-evaluates whole copies. Both give the same numbers up to
    float rounding.
    Returns an :class:`OcclusionResult`.
    """
    op = "occlusion"
    x, single, xp = as_input(model, x, op)
    n, c, h, w = x.shape
    window, stride = _window_args(window, stride, c, op)
    batch_size = B.as_count(batch_size, f"{op}: batch_size")
    if window[-2] > h or window[-1] > w:
        raise ValueError(f"{op}: window {window} is larger than the {h}x{w} image")
    fills = _fill_images(fill, x, xp, op)
    by_channel = len(window) == 3 and window[0] < c
    if len(window) == 3 and not by_channel:   # all the channels: the plain windows
        window, stride = window[1:], stride[1:]
    size = (c, h, w) if by_channel else (h, w)
    starts = [_starts(*args) for args in zip(size, window, stride)]
    grid = [a.ravel() for a in np.meshgrid(*starts, indexing="ij")]
    start_y, start_x = grid[-2:]
    positions = len(start_y)
    # A clipped window is a whole one moved back inside the image, whose first
    # rows / columns (``keep``) keep the image's pixels; a window over some
    # channels keeps the others'.
    corner_y, corner_x = np.minimum(start_y, h - window[-2]), np.minimum(start_x, w - window[-1])
    keep = ((np.arange(window[-2])[None, :, None] < (start_y - corner_y)[:, None, None]) |
            (np.arange(window[-1])[None, None, :] < (start_x - corner_x)[:, None, None]))
    keep = keep[:, None]                                            # (P, 1, wh, ww)
    if by_channel:
        channel = np.arange(c)[None, :]
        keep = keep | ~((channel >= grid[0][:, None]) &
                        (channel < grid[0][:, None] + window[0]))[:, :, None, None]
    keep = xp.asarray(keep) if keep.any() else None
    base, logits = [], []
    with preserved(model, train):
        plan = _OcclusionPlan(model, incremental)
        if n == 0:  # an empty batch: empty results (the model gives the classes)
            empty = model.forward(x)
            check_logits(empty, op)
        for i in range(n):
            base_logits = plan.set_image(x[i])
            check_logits(base_logits, op)
            base.append(base_logits[0])
            patches = _windows(fills[i], corner_y, corner_x, *window[-2:])
            if keep is not None:
                patches = xp.where(keep, _windows(x[i], corner_y, corner_x, *window[-2:]),
                                   patches)
            logits.append(xp.concatenate([
                plan.logits(patches[lo:lo + batch_size], corner_y[lo:lo + batch_size],
                            corner_x[lo:lo + batch_size])
                for lo in range(0, positions, batch_size)]))
    if n:
        logits = xp.stack(logits)                                   # (N, positions, classes)
        base = xp.stack(base)
    else:
        base, logits = empty, xp.zeros((0, positions, empty.shape[1]), np.float32)
    t = resolve_targets(target, base, op)
    rows = xp.arange(n)
    base_logit = base[rows, t]
    base_probability = probabilities64(base, axis=1)[rows, t]
    shape = (n,) + tuple(len(a) for a in starts)
    logit = logits[rows, :, t].reshape(shape)
    probability = probabilities64(logits, axis=2)[rows, :, t].reshape(shape)
    predicted = xp.argmax(logits, axis=2).reshape(shape)
    # in float64, then float32: a confident image's drops are 1e-9, below float32's
    # resolution at 1
    drop = (base_probability.reshape((n,) + (1,) * len(size)) - probability).astype(np.float32)
    probability, base_probability = (a.astype(np.float32) for a in (probability,
                                                                   base_probability))
    logit_drop = base_logit.reshape((n,) + (1,) * len(size)) - logit
    result = OcclusionResult(
        probability=probability, logit=logit, drop=drop, logit_drop=logit_drop,
        predicted=predicted,
        heatmap=_window_average(drop, starts, window, size, xp),
        logit_heatmap=_window_average(logit_drop, starts, window, size, xp),
        base_probability=base_probability, base_logit=base_logit, target=t,
        window=window, stride=stride, positions=tuple(starts))
    if single:
        for field in ("probability", "logit", "drop", "logit_drop", "predicted", "heatmap",
                      "logit_heatmap", "base_probability", "base_logit", "target"):
            setattr(result, field, getattr(result, field)[0])
    return result
