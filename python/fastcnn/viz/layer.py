"""Attributions to a layer's units (Captum's layer methods): how much each channel
and position of a hidden layer carries of the target score, shaped like the
layer's output. :func:`layer_integrated_gradients` lives with integrated gradients;
:func:`fastcnn.viz.feature_maps` gives the activations themselves (Captum's
LayerActivation)."""

import numpy as np

from .. import _backend as B
from ._common import (LayerPoint, as_input, check_logits, check_score, layer_name, preserved,
                      resolve_targets, score_seed, unbatch)
from .attribution import (_fill_images, _gradient_shap, _neuron_seed, _path_args,
                          _path_integral, _path_steps, _target_change)

__all__ = ["layer_gradient_x_activation", "layer_conductance", "internal_influence",
           "layer_gradient_shap", "neuron_conductance"]


def _along_the_path(xp, point, base, diff, alpha, t, score, batch_size):
    """The layer's activations and target-score gradients at the input path's points
    base + alpha_k diff, image by image and point by point, ``batch_size`` a pass:
    yields (images, steps, activations, gradients), images and steps host arrays."""
    n, m = diff.shape[0], len(alpha)
    for first in range(0, n * m, batch_size):
        index = np.arange(first, min(first + batch_size, n * m))
        image, step = index // m, index % m
        im, st = xp.asarray(image), xp.asarray(step)
        acts = point.activation(base[im] + alpha[st][:, None, None, None] * diff[im])
        yield image, step, acts, point.gradient(score_seed(point.logits(acts), t[im], score))


def layer_gradient_x_activation(model, x, layer, target=None, *, score="logit",
                                multiply_by_inputs=True, attribute_to_layer_input=False,
                                train=False):
    """A layer's activation times the gradient of the target score with respect to it
    (Captum's LayerGradientXActivation), shaped like the layer's output (N, ...):
    the first-order share of each unit in the score.

    layer: a name, an index or the layer itself. multiply_by_inputs: False returns
    the layer gradient alone. attribute_to_layer_input: the layer's input instead of
    its output (the previous layer's output, or the image for the first layer).
    target: the class (default: the prediction); score: 'logit' or 'probability'.
    """
    op = "layer_gradient_x_activation"
    x, single, xp = as_input(model, x, op)
    check_score(score, op)
    point = LayerPoint(model, layer, attribute_to_layer_input, op)
    with preserved(model, train):
        acts = point.activation(x)
        logits = point.logits(acts)
        check_logits(logits, op)
        t = resolve_targets(target, logits, op)
        grad = point.gradient(score_seed(logits, t, score))
    return unbatch(grad * acts if multiply_by_inputs else grad, single)


def layer_conductance(model, x, layer, target=None, *, baseline=0.0, n_steps=50,
                      method="gausslegendre", batch_size=128, score="logit",
                      attribute_to_layer_input=False, return_convergence_delta=False,
                      train=False):
    """Conductance of a layer's units (Dhamdhere et al., 2018; Captum's
    LayerConductance): the flow of integrated gradients through each unit. Along
    the straight path from the baseline to x in the input, at ``n_steps + 1``
    points alpha_0 < ... < alpha_n of the quadrature ``method``, it adds up the
    gradient of the target score with respect to the unit times the unit's change
    to the next point, sum_k dF/dy(alpha_k) * (y(alpha_k+1) - y(alpha_k)). Shaped
    like the layer's output (N, ...); the units of a layer every path crosses add
    up to about score(x) - score(baseline).

    baseline: a value, an image (C, H, W) or one per sample (N, C, H, W).
    n_steps: the number of steps (n_steps + 1 points, as Captum; >= 1); method:
    'gausslegendre' (Captum's default; its points stop short of both ends, so the
    sum falls short of the full change by the ends' share) or a Riemann rule
    ('riemann_trapezoid' runs from end to end). batch_size: path points per pass (the
    result does not depend on it). attribute_to_layer_input: the layer's input
    instead of its output. return_convergence_delta: also return, per image, the
    attributions' sum minus score(x) - score(baseline) (Captum's delta).
    """
    op = "layer_conductance"
    x, single, xp = as_input(model, x, op)
    check_score(score, op)
    n_steps = B.as_count(n_steps, f"{op}: n_steps")
    if n_steps < 1:
        raise ValueError(f"{op}: n_steps must be >= 1, got {n_steps}")
    batch_size = B.as_count(batch_size, f"{op}: batch_size")
    alphas, _ = _path_steps(method, n_steps + 1, op)
    base = _fill_images(baseline, x, xp, op, "baseline")
    point = LayerPoint(model, layer, attribute_to_layer_input, op)
    n = x.shape[0]
    alpha = xp.asarray(alphas.astype(np.float32))
    with preserved(model, train):
        ends = point.activation(xp.concatenate([x, base]))
        total = xp.zeros((n,) + ends.shape[1:], np.float64)
        t, change = _target_change(point.logits(ends), target, score, n, op)
        diff, last = x - base, None  # last: (activation, gradient) at the previous point
        for image, step, acts, grad in _along_the_path(xp, point, base, diff, alpha, t, score,
                                                       batch_size):
            acts = acts.astype(np.float64)
            for row, (i, k) in enumerate(zip(image, step)):  # in order, whatever the batch
                if k:
                    total[i] += last[1] * (acts[row] - last[0])
                last = acts[row], grad[row].astype(np.float64)
    out = total.astype(np.float32)
    if not return_convergence_delta:
        return unbatch(out, single)
    delta = (total.sum(axis=tuple(range(1, total.ndim))) - change).astype(np.float32)
    return unbatch((out, delta), single)


def internal_influence(model, x, layer, target=None, *, baseline=0.0, n_steps=50,
                       method="gausslegendre", batch_size=128, score="logit",
                       attribute_to_layer_input=False, train=False):
    """Internal influence (Leino et al., 2018; Captum's InternalInfluence): the gradient
    of the target score with respect to a layer's units, integrated along the straight
    path from the baseline to x in the input, sum_k w_k dF/dy(baseline + alpha_k (x -
    baseline)) with integrated gradients' quadrature. Shaped like the layer's output
    (N, ...): how strongly each unit drives the score over the whole path (a gradient,
    not multiplied by any change, so it does not add up to the score change).

    baseline, n_steps, method, batch_size, score, attribute_to_layer_input, target: as
    :func:`layer_conductance` (n_steps points here, as Captum).
    """
    op = "internal_influence"
    x, single, xp, base, alphas, widths, batch_size = _path_args(
        model, x, baseline, n_steps, method, batch_size, score, op)
    point = LayerPoint(model, layer, attribute_to_layer_input, op)
    n = x.shape[0]
    alpha = xp.asarray(alphas.astype(np.float32))
    with preserved(model, train):
        logits = model.forward(x)
        check_logits(logits, op)
        t = resolve_targets(target, logits, op)
        total, diff = None, x - base
        for image, step, _, grad in _along_the_path(xp, point, base, diff, alpha, t, score,
                                                    batch_size):
            if total is None:
                total = xp.zeros((n,) + grad.shape[1:], np.float64)
            grad = grad.astype(np.float64)
            for row, (i, k) in enumerate(zip(image, step)):  # in order, whatever the batch
                total[i] += widths[k] * grad[row]
        if total is None:   # an empty batch: the layer's shape from one forward pass
            total = xp.zeros((0,) + point.activation(x).shape[1:], np.float64)
    return unbatch(total.astype(np.float32), single)


def layer_gradient_shap(model, x, layer, baselines, target=None, *, n_samples=5, stdev=0.0,
                        batch_size=128, seed=0, score="logit", multiply_by_inputs=True,
                        attribute_to_layer_input=False, return_convergence_delta=False,
                        train=False):
    """GradientSHAP to a layer's units (Captum's LayerGradientShap): the mean over
    ``n_samples`` draws of the gradient with respect to the layer at a random point
    between a reference b and x' (x plus noise of ``stdev``), times the layer's change
    from b to x', layer(x') - layer(b). Shaped like the layer's output (N, ...); in
    expectation each image's units add up to score(x) - mean score(baselines).

    The draws, baselines, n_samples, stdev, seed, batch_size, score, multiply_by_inputs
    and return_convergence_delta are :func:`gradient_shap`'s (the same draws give the
    same points); attribute_to_layer_input: the layer's input instead of its output.
    """
    op = "layer_gradient_shap"
    return _gradient_shap(op, model, x, baselines, target,
                          lambda: LayerPoint(model, layer, attribute_to_layer_input, op),
                          n_samples, stdev, batch_size, seed, score, multiply_by_inputs,
                          return_convergence_delta, train)


def neuron_conductance(model, x, layer, channel, target=None, *, position=None, baseline=0.0,
                       n_steps=50, method="riemann_trapezoid", batch_size=128, score="logit",
                       multiply_by_inputs=True, train=False):
    """Conductance of one hidden unit (Dhamdhere et al., 2018; Captum's
    NeuronConductance): how much of the target score's integrated gradients flows
    through the unit, per input element: (x - baseline) times the sum over the
    quadrature of width_k * dF/dy(p_k) * dy/dx(p_k), y the unit, F the target score and
    p_k the points of the straight path from the baseline to x. Signed, shaped like x.
    Summed over the units of a layer every path crosses, the conductances give the
    integrated gradients.

    layer / channel / position: the unit, as :func:`gradient`'s: ``channel`` of
    ``layer`` at ``position`` (y, x), or 'max' (the channel's strongest unit at x, the
    same unit all along the path); a layer without spatial axes (e.g. 'fc1') takes
    ``channel`` as the unit's index and position None. One unit, as Captum's.
    baseline, n_steps, batch_size, score, target: as :func:`integrated_gradients`;
    method: the quadrature, by default Captum's default for this method,
    'riemann_trapezoid'. multiply_by_inputs: False returns the integrated product of
    gradients alone.
    """
    op = "neuron_conductance"
    x, single, xp, base, alphas, widths, batch_size = _path_args(
        model, x, baseline, n_steps, method, batch_size, score, op)
    name = layer_name(model, layer, op)
    with preserved(model, train):
        logits = model.forward(x)
        check_logits(logits, op)
        t = resolve_targets(target, logits, op)
        at_x = model.activations[name]
        if at_x.ndim > 2 and position is None:
            raise ValueError(f"{op}: the conductance of one unit: give position=(y, x) or "
                             f"'max' for layer {name!r}'s {B.shape_str(at_x.shape[1:])} output")
        if at_x.ndim == 2 and position is not None:
            raise ValueError(f"{op}: layer {name!r} has no spatial axes (output "
                             f"{B.shape_str(at_x.shape)}); channel is the unit, position None")
        unit = _neuron_seed(at_x, channel, position, op)          # one-hot per image
        axes = tuple(range(1, unit.ndim))

        def gradient(points, image):
            """dF/dy at the unit times dy/dx: the gradient through the unit alone."""
            out = model.forward(points)
            through = (model.backward(score_seed(out, t[image], score), stop=name,
                                      guided=False, param_grads=False)
                       * unit[image]).sum(axis=axes)
            seed = unit[image] * through.reshape((-1,) + (1,) * len(axes))
            return model.backward(seed, start=name, guided=False, param_grads=False)

        diff = x - base
        total = _path_integral(xp, base, diff, alphas, widths, batch_size, gradient)
    return unbatch((total * diff if multiply_by_inputs else total).astype(np.float32), single)
