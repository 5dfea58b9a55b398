"""DeepLIFT (Shrikumar et al., 2017) with the rescale rule, and DeepLIFT-SHAP: how much
each pixel's difference from a reference moves the target logit, with the
differences carried through every nonlinearity instead of its local slope.

The model runs once on the inputs and their references side by side. Going back
from the target logit, linear layers (convolutions, fully-connected layers,
batch norm in eval mode, flatten, dropout in eval mode) pass the gradient as
usual; a ReLU passes it times delta_out / delta_in, the ratio of its output's to
its input's difference from the reference (the plain gradient where delta_in is
below ``eps``); a max-pool passes, to each input, its share of every window's
output difference divided by the input's own difference, where the pool picks
its maximum at x for the part of the change from the reference's output up to
the larger of the two outputs and at the reference for the rest (Captum's rule).
The products with (x - reference) then add up to logit(x) - logit(reference)
exactly: DeepLIFT's summation-to-delta, which ``return_convergence_delta``
reports the rounding error of.

As Captum's DeepLift and DeepLiftShap, with three differences where Captum 0.9
does not do what the method defines: a ReLU or max-pool whose output feeds
another one (conv-ReLU-pool) gets, in Captum, the later layer's plain gradient
instead of its DeepLIFT multiplier (the order of its tensor hooks), so Captum's
attributions there stop adding up to the logit change; where a max-pool's input
does not change (below ``eps``), each image falls back to its own pool gradient
(Captum uses the first image's for the whole batch); and an input that is the
maximum of several overlapping windows (stride < kernel) gets the sum of their
shares (Captum's unpooling keeps one window's). On networks without two such
layers in a row, with non-overlapping pools, the two agree.
"""

import numpy as np

from .. import _backend as B
from .. import functional as F
from ..nn import LogSoftmax, MaxPool2d, ReLU, Sequential, Softmax
from ._common import (as_input, check_finite, check_logits, layer_name, preserved,
                      resolve_targets, unbatch)
from .attribution import _fill_images, _neuron_seed, _unit_layer, _unit_value

__all__ = ["deep_lift", "deep_lift_shap", "layer_deep_lift", "layer_deep_lift_shap"]


def _leaves(model):
    """The layers in the order they run, nested Sequential blocks opened."""
    for layer in model.children():
        if isinstance(layer, Sequential):
            yield from _leaves(layer)
        else:
            yield layer


def _pairs(a):
    """A batch run side by side as (2, N, ...): [0] the inputs' part, [1] the references'."""
    return a.reshape((2, a.shape[0] // 2) + a.shape[1:])


def _ratio(change, delta_in, eps):
    """change / delta_in (each image's, (N, ...)) and where |delta_in| < eps, with 0 there."""
    xp = B.array_module(delta_in)
    small = xp.abs(delta_in) < eps
    return change / xp.where(small, 1, delta_in), small


def _cpu_rule(a):
    """fastcnn._cpu when the one-pass CPU rules apply to ``a`` (NumPy float32,
    C-contiguous), else None (the array expressions below, e.g. CuPy's)."""
    if type(a) is np.ndarray and a.dtype == np.float32 and a.flags.c_contiguous:
        return B.dispatch(a)[1]
    return None


def _relu_rule(g, a, out, eps):
    """The rescale rule: g * delta_out / delta_in (the plain gradient where delta_in ~ 0).
    The ratio is the same for both halves; only the fallback differs."""
    K = _cpu_rule(a)
    if K is not None and _cpu_rule(out) and _cpu_rule(g):
        result = np.empty_like(a)
        K.deeplift_relu(a, out, g, eps, result)
        return result
    xp = B.array_module(a)
    ins, outs = _pairs(a), _pairs(out)
    ratio, small = _ratio(outs[0] - outs[1], ins[0] - ins[1], eps)
    return g * xp.where(small, ~(ins <= 0), ratio).reshape(a.shape)


def _pool_rule(g, pool, a, out, eps):
    """Max-pool: the output's change from the reference's, m = max(out_x, out_ref),
    split into m - out_ref routed through x's argmax and out_x - m through the
    reference's, each scattered back (summed over windows), over delta_in."""
    xp = B.array_module(out)
    args = pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode
    K = _cpu_rule(a)
    fused = K is not None and _cpu_rule(out) and _cpu_rule(g)
    if fused:
        split = np.empty_like(out)
        K.deeplift_pool_split(out, g, split)
    else:
        outs = _pairs(out)
        top = xp.maximum(outs[0], outs[1])
        split = g * xp.concatenate([top - outs[1], outs[0] - top])
    routed = F.max_pool2d_backward(split, a, *args)  # each half at its own argmax
    plain = F.max_pool2d_backward(g, a, *args)
    if fused:
        result = np.empty_like(a)
        K.deeplift_rescale(a, routed, plain, eps, result)
        return result
    ins, routed, plain = _pairs(a), _pairs(routed), _pairs(plain)
    ratio, small = _ratio(routed[0] + routed[1], ins[0] - ins[1], eps)
    return xp.where(small, plain, ratio).reshape(a.shape)


def _multipliers(model, x, base, target, eps, op, keep=0, unit=None):
    """DeepLIFT's multipliers d logit / d x for inputs ``x`` against ``base`` (both
    (N, C, H, W)), each image's logit change (float64), and x and base side by side.

    keep: how many of the model's first layers (nested blocks opened) the multipliers
    do not go back through: they are then those of the activation after them, returned
    in x's and base's place (2N, ...).
    unit: (layers, channel, position): the multipliers of a unit of the output of the
    model's first ``layers`` leaf layers instead of the logit (``target`` unused),
    selected as :func:`fastcnn.viz.gradient` selects one ('max': the strongest at x)."""
    layers = list(_leaves(model))
    if unit is not None:
        layers = layers[:unit[0]]
    for name, layer in model.named_modules():
        if isinstance(layer, (Softmax, LogSoftmax)) and (unit is None or layer in layers):
            raise ValueError(f"{op}: DeepLIFT attributes the logits, but layer {name!r} is a "
                             f"{type(layer).__name__}; pass the model without it "
                             f"(model[:-1] for a last layer)")
    xp = B.array_module(x)
    n = x.shape[0]
    a = xp.concatenate([x, base])
    inputs, outputs = [], []
    for layer in layers:
        inputs.append(a)
        a = layer.forward(a)
        outputs.append(a)
    if unit is None:
        check_logits(a, op)
        t = resolve_targets(target, a[:n], op)
        rows = xp.arange(n)
        change = a[rows, t].astype(np.float64) - a[rows + n, t]
        g = xp.zeros_like(a)
        g[xp.arange(2 * n), xp.concatenate([t, t])] = 1.0
    else:
        seed = _neuron_seed(a[:n], unit[1], unit[2], op)
        change = _unit_value(a[:n] - a[n:], seed)
        g = xp.concatenate([seed, seed])
    for p in model.parameters():
        p.requires_grad = False  # preserved() puts them back
    for layer, a_in, a_out in list(zip(layers, inputs, outputs))[keep:][::-1]:
        if isinstance(layer, ReLU):
            g = _relu_rule(g, a_in, a_out, eps)
        elif isinstance(layer, MaxPool2d):
            g = _pool_rule(g, layer, a_in, a_out, eps)
        else:
            g = layer.backward(g, input_grad=True)
    return g[:n], change, inputs[keep] if keep < len(layers) else a


def _check_eps(eps, op):
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, (int, float, np.number)) or \
            not np.isfinite(eps) or eps < 0:
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


def _finish(mult, x, base, change, multiply_by_inputs):
    """Attributions (float64) and each pair's sum minus its logit change."""
    attributions = mult * (x - base).astype(np.float64)
    delta = attributions.sum(axis=tuple(range(1, x.ndim))) - change
    return (attributions if multiply_by_inputs else mult.astype(np.float64)), delta


def _unit(model, target, layer, channel, position, op):
    """_multipliers' ``unit`` for layer / channel / position (None: the target logit)."""
    name = _unit_layer(model, target, layer, channel, position, op)
    return None if name is None else (_kept(model, name, False, op), channel, position)


def deep_lift(model, x, target=None, *, baseline=0.0, layer=None, channel=None, position=None,
              multiply_by_inputs=True, return_convergence_delta=False, eps=1e-10, train=False):
    """DeepLIFT with the rescale rule (Shrikumar et al.; Captum's DeepLift): each pixel's
    share of logit(x) - logit(baseline), signed, shaped like x. See the module's
    docstring for the rules and where they differ from Captum's.

    baseline: the reference, a value (in the model's input units), an image (C, H, W)
    or one per sample (N, C, H, W). ``target`` defaults to the prediction on x.
    multiply_by_inputs: True (the default) gives the attributions, multiplier times
    (x - baseline); False gives the multipliers themselves (Captum's "local" variant).
    return_convergence_delta: also return, per image, the attributions' sum minus the
    logit change (zero up to rounding: DeepLIFT's summation-to-delta).
    eps: a ReLU or max-pool whose input changes by less than this passes the plain
    gradient (Captum's default, 1e-10).
    layer / channel / position: instead of the target logit, a unit of a layer (as
    :func:`~fastcnn.viz.gradient` selects one, 'max' the channel's strongest at x;
    Captum's NeuronDeepLift): its change from the baseline's, shared out the same way;
    the delta is then the sum minus that change.
    The model must end in logits: DeepLIFT here has no rule for a Softmax layer.
    """
    op = "deep_lift"
    x, single, xp = as_input(model, x, op)
    eps = _check_eps(eps, op)
    unit = _unit(model, target, layer, channel, position, op)
    base = _fill_images(baseline, x, xp, op, "baseline")
    with preserved(model, train):
        mult, change, _ = _multipliers(model, x, base, target, eps, op, unit=unit)
    attributions, delta = _finish(mult, x, base, change, multiply_by_inputs)
    out = attributions.astype(np.float32)
    if not return_convergence_delta:
        return unbatch(out, single)
    return unbatch((out, delta.astype(np.float32)), single)


def deep_lift_shap(model, x, baselines, target=None, *, batch_size=64, layer=None, channel=None,
                   position=None, multiply_by_inputs=True, return_convergence_delta=False,
                   eps=1e-10, train=False):
    """DeepLIFT-SHAP (Lundberg & Lee; Captum's DeepLiftShap): the mean of the DeepLIFT
    attributions of x against each of a set of reference images, an approximation of
    SHAP values with the references as the background distribution.

    baselines: the reference images, (B, C, H, W) (a few dozen training images are
    typical). batch_size: (image, reference) pairs per pass; the result does not
    depend on it. return_convergence_delta: also return the (N * B,) deltas of every
    pair, image by image (Captum's order: image i against reference j at i * B + j).
    layer / channel / position: a unit instead of the logit, as :func:`deep_lift`'s
    (Captum's NeuronDeepLiftShap). Other arguments as :func:`deep_lift`.
    """
    op = "deep_lift_shap"
    return _deep_lift_shap(op, model, x, baselines, target, None, False,
                           batch_size, multiply_by_inputs, return_convergence_delta, eps, train,
                           _unit(model, target, layer, channel, position, op))


def _deep_lift_shap(op, model, x, baselines, target, layer, to_input, batch_size,
                    multiply_by_inputs, return_convergence_delta, eps, train, unit=None):
    """deep_lift_shap, or with ``layer`` layer_deep_lift_shap (to its units), or with
    ``unit`` (see _multipliers) of a unit's change."""
    x, single, xp = as_input(model, x, op)
    eps = _check_eps(eps, op)
    keep = 0 if layer is None else _kept(model, layer, to_input, op)
    batch_size = B.as_count(batch_size, f"{op}: batch_size")
    refs = check_finite(B.as_float(baselines, "baselines", xp), "baselines", op)
    if refs.ndim != 4 or refs.shape[1:] != x.shape[1:] or refs.shape[0] < 1:
        raise ValueError(f"{op}: baselines must be reference images (B, C, H, W) with C, H, "
                         f"W as x's {B.shape_str(x.shape[1:])}; got shape "
                         f"{B.shape_str(refs.shape)}")
    n, k = x.shape[0], refs.shape[0]
    total, deltas = None, []
    with preserved(model, train):
        if unit is None:
            logits = model.forward(x)
            check_logits(logits, op)
            t = resolve_targets(target, logits, op)
        for first in range(0, n * k, batch_size):
            pair = np.arange(first, min(first + batch_size, n * k))
            image, ref = xp.asarray(pair // k), xp.asarray(pair % k)
            m = len(pair)
            mult, change, acts = _multipliers(model, x[image], refs[ref],
                                              None if unit else t[image], eps, op, keep, unit)
            attr, delta = _finish(mult, acts[:m], acts[m:], change, multiply_by_inputs)
            if total is None:
                total = xp.zeros((n,) + attr.shape[1:], np.float64)
            for row, i in enumerate(pair // k):  # each image's references in order
                total[i] += attr[row]
            deltas.append(delta.astype(np.float32))
        if total is None:   # an empty batch: the layer's shape from one pass
            shape = x.shape[1:] if not keep else \
                _multipliers(model, refs[:1], refs[:1], None, eps, op, keep)[2].shape[1:]
            total = xp.zeros((0,) + tuple(shape), np.float64)
    out = unbatch((total / k).astype(np.float32), single)
    if not return_convergence_delta:
        return out
    return out, (xp.concatenate(deltas) if deltas else xp.zeros(0, np.float32))


def _kept(model, layer, to_input, op):
    """How many of the model's first leaf layers run before ``layer``'s output (or,
    ``to_input``, its input): the multipliers are taken there."""
    if not isinstance(to_input, (bool, np.bool_)):
        raise TypeError(f"{op}: attribute_to_layer_input must be True or False, got "
                        f"{to_input!r}")
    index = model.names.index(layer_name(model, layer, op))
    before = list(model.children())[:index + (not to_input)]
    return sum(len(list(_leaves(c))) if isinstance(c, Sequential) else 1 for c in before)


def layer_deep_lift(model, x, layer, target=None, *, baseline=0.0, multiply_by_inputs=True,
                    attribute_to_layer_input=False, return_convergence_delta=False,
                    eps=1e-10, train=False):
    """DeepLIFT's attributions to a layer's units (Captum's LayerDeepLift): the
    multipliers of the layer's output, carried back from the target logit with the
    rules of :func:`deep_lift`, times the output's difference between x and the
    baseline. Shaped like the layer's output (N, ...); each image's units add up to
    logit(x) - logit(baseline) (``return_convergence_delta`` reports the rounding).

    layer: a name, an index or the layer itself (a nested block: its output).
    attribute_to_layer_input: the layer's input instead (the previous layer's output, or
    the image for the first layer), the multipliers then taken back through the layer's
    own rule. multiply_by_inputs: False returns the multipliers. baseline, eps, target:
    as :func:`deep_lift`; it and Captum differ in the same places, and at the input
    of a ReLU or max-pool, where Captum takes the layer's plain gradient instead of
    its rule (so Captum's units there do not add up to the logit change).
    """
    op = "layer_deep_lift"
    x, single, xp = as_input(model, x, op)
    eps = _check_eps(eps, op)
    keep = _kept(model, layer, attribute_to_layer_input, op)
    base = _fill_images(baseline, x, xp, op, "baseline")
    n = x.shape[0]
    with preserved(model, train):
        mult, change, acts = _multipliers(model, x, base, target, eps, op, keep)
    attributions, delta = _finish(mult, acts[:n], acts[n:], change, multiply_by_inputs)
    out = attributions.astype(np.float32)
    if not return_convergence_delta:
        return unbatch(out, single)
    return unbatch((out, delta.astype(np.float32)), single)


def layer_deep_lift_shap(model, x, layer, baselines, target=None, *, batch_size=64,
                         multiply_by_inputs=True, attribute_to_layer_input=False,
                         return_convergence_delta=False, eps=1e-10, train=False):
    """DeepLIFT-SHAP to a layer's units (Captum's LayerDeepLiftShap): the mean over the
    reference images of :func:`layer_deep_lift` against each. Shaped like the layer's
    output (N, ...); each image's units add up to logit(x) minus the references' mean
    logit. baselines, batch_size, return_convergence_delta: as :func:`deep_lift_shap`;
    layer, attribute_to_layer_input, multiply_by_inputs, eps: as
    :func:`layer_deep_lift` (and where it and Captum differ).
    """
    return _deep_lift_shap("layer_deep_lift_shap", model, x, baselines, target, layer,
                           attribute_to_layer_input, batch_size, multiply_by_inputs,
                           return_convergence_delta, eps, train)
