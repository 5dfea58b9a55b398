"""Layer-wise relevance propagation (Bach et al., 2015; Captum's LRP): the target
logit handed back layer by layer as "relevance", each layer splitting the
relevance of its outputs among its inputs in proportion to their contributions.

A layer with weights (Conv2d, Linear, batch norm in eval mode) and a max-pool
pass, under the epsilon rule, R_in = a * J^T (R_out / (z + eps * sign(z))): a the
layer's input, z its output (its bias included, so a bias absorbs its share) and
J^T the layer's backward. ReLU and dropout pass the relevance unchanged (where a
ReLU's output is zero, the next layer already gave it none); flatten reshapes it.
Other rules change the weights the split is made with (gamma, alpha1-beta0),
bound the input (z-box, for the first layer, whose input is not a ReLU's) or
skip a layer (identity). ``fold_batchnorm`` merges each batch norm into the
conv or fc layer before it (the usual canonisation: a batch norm's own split
divides by its output, which its shift can push to zero). Relevance is
conserved where no bias and no epsilon absorbs it: the attributions then add up
to the target logit, which ``return_convergence_delta`` reports the remainder of.

As Captum, the walk starts from 1 at the target (each layer's split is linear in
its relevance) and the result is multiplied by the target logit at the end.
"""

import contextlib

import numpy as np

from .. import _backend as B
from ..nn import (BatchNorm1d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d,
                  Module, ReLU, Sequential)
from ._common import as_input, check_logits, check_model, data_bounds, preserved, \
    resolve_targets, unbatch
from .deeplift import _kept

__all__ = ["lrp", "layer_lrp", "lrp_composite", "EpsilonRule", "GammaRule", "Alpha1Beta0Rule", "ZBoxRule",
           "IdentityRule"]


def _number(value, name, rule, low=None):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)) \
            or not np.isfinite(value) or (low is not None and value < low):
        bound = "" if low is None else f" >= {low}"
        raise ValueError(f"{rule}: {name} must be a finite number{bound}, got {value!r}")
    return float(value)


class _Rule:
    """A propagation rule: the stabiliser ``epsilon`` of z + epsilon * sign(z) and
    the weights (weight, bias) the layer's split uses."""

    epsilon = 1e-9
    identity = False

    def weights(self, weight, bias, xp):
        return weight, bias

    def __eq__(self, other):
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self):
        return hash((type(self).__name__,) + tuple(sorted(
            (k, v.tobytes() if isinstance(v, np.ndarray) else v) for k, v in vars(self).items())))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class EpsilonRule(_Rule):
    """LRP-epsilon (the default): relevance split by the contributions a_i w_ij,
    over z_j + epsilon * sign(z_j). Captum's default epsilon, 1e-9, is LRP-0 in
    effect; a larger one absorbs the relevance of weak or contradictory outputs
    (sparser, less noisy maps; the middle layers' rule in Montavon et al.)."""

    def __init__(self, epsilon=1e-9):
        self.epsilon = _number(epsilon, "epsilon", "EpsilonRule", 0)


class GammaRule(_Rule):
    """LRP-gamma: the positive weights count (1 + gamma) times, w + gamma * max(w, 0),
    favouring positive contributions (the lower layers' rule in Montavon et al.).
    set_bias_to_zero: leave the bias out of z (and so out of the split)."""

    def __init__(self, gamma=0.25, set_bias_to_zero=False):
        self.gamma = _number(gamma, "gamma", "GammaRule", 0)
        self.set_bias_to_zero = bool(set_bias_to_zero)

    def weights(self, weight, bias, xp):
        weight = weight + self.gamma * xp.maximum(weight, 0)
        if bias is not None and self.set_bias_to_zero:
            bias = xp.zeros_like(bias)
        return weight, bias


class Alpha1Beta0Rule(_Rule):
    """LRP-alpha1-beta0 (deep Taylor decomposition for ReLU networks): only the
    positive weights, max(w, 0), so only positive relevance flows.
    set_bias_to_zero: leave the bias out of z."""

    def __init__(self, set_bias_to_zero=False):
        self.set_bias_to_zero = bool(set_bias_to_zero)

    def weights(self, weight, bias, xp):
        weight = xp.maximum(weight, 0)
        if bias is not None and self.set_bias_to_zero:
            bias = xp.zeros_like(bias)
        return weight, bias


class ZBoxRule(_Rule):
    """LRP-z^B (Montavon et al.'s rule for the input layer, whose values lie in a box
    [low, high] rather than being a ReLU's non-negative output): the share of input i
    is a_i w_ij - low_i max(w_ij, 0) - high_i min(w_ij, 0), over their sum. low and
    high: numbers, or arrays broadcastable to the layer's input (one per channel,
    (C, 1, 1), for standardised images: (0 - mean) / std and (1 - mean) / std).
    Conv2d and Linear layers only."""

    def __init__(self, low, high):
        def bound(value, name):
            arr = np.asarray(value, dtype=np.float64)
            if arr.dtype == object or not np.all(np.isfinite(arr)):
                raise ValueError(f"ZBoxRule: {name} must be finite numbers, got {value!r}")
            return float(arr) if arr.ndim == 0 else arr.astype(np.float32)

        self.low, self.high = bound(low, "low"), bound(high, "high")
        try:
            below = np.all(np.asarray(self.low) <= np.asarray(self.high))
        except ValueError:
            raise ValueError(f"ZBoxRule: low {np.shape(self.low)} and high "
                             f"{np.shape(self.high)} do not broadcast together") from None
        if not below:
            raise ValueError("ZBoxRule: low must not exceed high")

    def __eq__(self, other):
        return type(self) is type(other) and all(
            np.array_equal(getattr(self, k), getattr(other, k)) for k in ("low", "high"))

    __hash__ = _Rule.__hash__

    def __repr__(self):
        def show(v):
            return repr(v) if isinstance(v, float) else f"array{np.shape(v)}"
        return f"ZBoxRule(low={show(self.low)}, high={show(self.high)})"


class IdentityRule(_Rule):
    """Pass the relevance through unchanged (for a layer whose output is shaped like
    its input, such as a batch norm: Captum's IdentityRule)."""

    identity = True

    def __init__(self):
        pass


_WITH_RULES = (Conv2d, Linear, BatchNorm1d, BatchNorm2d, MaxPool2d, Flatten)
_PASS = (ReLU, Dropout)


def _leaves(model, prefix=""):
    """(qualified name, layer) in the order they run, nested Sequential blocks opened."""
    for name, layer in model.named_children():
        full = f"{prefix}{name}"
        if isinstance(layer, Sequential):
            yield from _leaves(layer, full + ".")
        else:
            yield full, layer


def _folded_pairs(leaves):
    """{batch norm name: the name of the Conv2d or Linear right before it}."""
    pairs = {}
    for (name, layer), (bn_name, bn) in zip(leaves, leaves[1:]):
        if (isinstance(layer, Conv2d) and isinstance(bn, BatchNorm2d)) or \
                (isinstance(layer, Linear) and isinstance(bn, BatchNorm1d)):
            pairs[bn_name] = name
    return pairs


def _layer_rules(model, leaves, rules, folded, op):
    """The rule of every leaf (None: the relevance passes unchanged; a batch norm
    in ``folded`` passes it too, its layer's rule splitting for both)."""
    chosen = {}
    for name, layer in leaves:
        if isinstance(layer, _PASS):
            chosen[name] = None
        elif isinstance(layer, Flatten):
            chosen[name] = IdentityRule()  # a reshape: Captum's models flatten with torch.flatten
        elif name in folded:
            chosen[name] = None
        elif isinstance(layer, _WITH_RULES):
            chosen[name] = EpsilonRule()
        else:
            raise ValueError(f"{op}: layer {name!r} is a {type(layer).__name__}, which has no "
                             f"relevance rule (LRP attributes the logits: pass the model "
                             f"without a last Softmax, model[:-1])")
    if rules is None:
        return chosen
    if not isinstance(rules, dict):
        raise TypeError(f"{op}: rules must be a dict {{layer: rule}}, got "
                        f"{type(rules).__name__}")
    by_id = {id(layer): name for name, layer in leaves}
    for key, rule in rules.items():
        if not isinstance(rule, _Rule):
            raise TypeError(f"{op}: rules[{key!r}] must be an EpsilonRule, GammaRule, "
                            f"Alpha1Beta0Rule, ZBoxRule or IdentityRule, got {rule!r}")
        names = _rule_targets(model, key, by_id, op)
        if len(names) > 1:  # a block: its ReLU, dropout and folded batch norm layers
            names = [name for name in names
                     if not isinstance(dict(leaves)[name], _PASS) and name not in folded]
        for name in names:
            layer = dict(leaves)[name]
            if isinstance(layer, _PASS):
                raise ValueError(f"{op}: rules[{key!r}]: layer {name!r} is a "
                                 f"{type(layer).__name__}, which passes relevance unchanged; "
                                 f"rules apply to Conv2d, Linear, batch norm and MaxPool2d")
            if name in folded:
                raise ValueError(f"{op}: rules[{key!r}]: batch norm {name!r} is folded into "
                                 f"{folded[name]!r} (fold_batchnorm=True); give the rule to "
                                 f"{folded[name]!r}")
            if isinstance(rule, ZBoxRule) and not isinstance(layer, (Conv2d, Linear)):
                raise ValueError(f"{op}: rules[{key!r}]: ZBoxRule applies to Conv2d and "
                                 f"Linear layers; {name!r} is a {type(layer).__name__}")
            if rule.identity and isinstance(layer, (Conv2d, Linear, MaxPool2d)):
                raise ValueError(f"{op}: rules[{key!r}]: IdentityRule needs a layer whose "
                                 f"output is shaped like its input; {name!r} is a "
                                 f"{type(layer).__name__}")
            chosen[name] = rule
    return chosen


def _rule_targets(model, key, by_id, op):
    """The leaf names a rules key names: a (dotted) name, a top-level index or a layer;
    a nested block names all its leaves."""
    if isinstance(key, Module):
        found = key
        if id(key) in by_id:
            return [by_id[id(key)]]
    elif isinstance(key, str):
        found = dict(model.named_modules()).get(key)
    elif isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        try:
            found = model[model.names[model.index(key)]]
        except IndexError as exc:
            raise ValueError(f"{op}: rules: {exc.args[0]}") from exc
    else:
        raise TypeError(f"{op}: rules keys must be layer names, indices or layers, got {key!r}")
    if found is None or (isinstance(found, Module) and found is model):
        raise ValueError(f"{op}: rules: no layer {key!r}; layers are {list(by_id.values())}")
    names = [by_id[id(m)] for m in found.modules() if id(m) in by_id]
    if not names:
        raise ValueError(f"{op}: rules: {key!r} is not a layer of the model; layers are "
                         f"{list(by_id.values())}")
    return names


def lrp_composite(model, low=None, high=None, *, gamma=0.25, epsilon=0.25):
    """Montavon et al.'s composite for a CNN, as ``rules`` for :func:`lrp` (with
    ``fold_batchnorm=True``): ``ZBoxRule(low, high)`` on the first Conv2d or Linear
    layer, ``GammaRule(gamma)`` on the other Conv2d layers, ``EpsilonRule(epsilon)``
    on the Linear layers but the last, which keeps the default (LRP-0).
    low, high: the input's range, numbers or one per channel (default: the pixel
    range [0, 1] through the standardisation in ``model.metadata``)."""
    op = "lrp_composite"
    check_model(model, op)
    gemms = [(name, layer) for name, layer in _leaves(model) if isinstance(layer, (Conv2d,
                                                                                   Linear))]
    if not gemms:
        raise ValueError(f"{op}: the model has no Conv2d or Linear layer")
    first_name, first = gemms[0]
    if (low is None) != (high is None):
        raise ValueError(f"{op}: give both low and high, or neither")
    if low is None:
        meta = getattr(model, "metadata", None) or {}
        channels = first.in_channels if isinstance(first, Conv2d) else \
            max(np.size(meta.get("mean", 1)), np.size(meta.get("std", 1)))
        found = data_bounds(model, channels)
        if found is None:
            raise ValueError(f"{op}: the model's metadata has no mean and std to find the "
                             f"input's range from; pass low and high")
        low, high = found
        if isinstance(first, Conv2d):
            low, high = low.reshape(-1, 1, 1), high.reshape(-1, 1, 1)
        else:  # a flattened input: the box of all channels
            low, high = float(low.min()), float(high.max())
    rules = {first_name: ZBoxRule(low, high)}
    for name, layer in gemms[1:]:
        if isinstance(layer, Conv2d):
            rules[name] = GammaRule(gamma)
        elif name != gemms[-1][0]:
            rules[name] = EpsilonRule(epsilon)
    return rules


def _check_box(rule, name, shape, op):
    for bound in (rule.low, rule.high):
        try:
            fits = np.broadcast_shapes(np.shape(bound), shape) == tuple(shape)
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"{op}: ZBoxRule on {name!r}: bounds of shape {np.shape(bound)} "
                             f"do not broadcast to its input {tuple(shape)}")


def _stabilised(z, epsilon, xp):
    """z + epsilon * sign(z), sign(0) = +1. (At z = -0.0 the copysign gives -epsilon
    instead; every contribution to such a z is zero, so no share changes.)"""
    out = xp.abs(z)
    out += z.dtype.type(epsilon)
    return xp.copysign(out, z, out=out)


def _ratio(relevance, z, epsilon, xp):
    """relevance / (z + epsilon * sign(z)), in one new array."""
    d = _stabilised(z, epsilon, xp)
    return xp.divide(relevance, d, out=d)


def _share(layer, a, relevance, z, epsilon, xp):
    """a * J^T (relevance / (z + epsilon * sign(z))) through ``layer``'s backward."""
    share = layer.backward(_ratio(relevance, z, epsilon, xp), input_grad=True)
    share *= a
    return share


def _bn_affine(bn, xp):
    """A batch norm as it last ran, as a per-channel scale and shift (float64)."""
    if bn._batch_stats:
        mean, invstd = (v.astype(np.float64) for v in bn._saved_stats)
    else:
        mean = bn.running_mean.astype(np.float64)
        invstd = 1.0 / xp.sqrt(bn.running_var.astype(np.float64) + bn.eps)
    scale, shift = invstd, -mean * invstd
    if bn.affine:
        scale = scale * bn.weight.data
        shift = shift * bn.weight.data + bn.bias.data
    return scale, shift


def _folded(layer, bn, xp):
    """The weight and bias of ``layer`` followed by ``bn``, as one layer."""
    scale, shift = _bn_affine(bn, xp)
    weight = layer.weight.data.astype(np.float64)
    weight = weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    bias = shift if layer.bias is None else layer.bias.data * scale + shift
    return weight.astype(np.float32), bias.astype(np.float32)


@contextlib.contextmanager
def _weights(layer, weight, xp):
    """``layer`` with ``weight`` in place of its weight and no bias, for the block."""
    saved = [(layer.weight, layer.weight.data)]
    layer.weight.data = weight
    if layer.bias is not None:
        saved.append((layer.bias, layer.bias.data))
        layer.bias.data = xp.zeros_like(layer.bias.data)
    try:
        yield
    finally:
        for param, data in saved:
            param.data = data


def _plus_bias(layer, z, bias):
    if bias is None:
        return z
    return z + (bias.reshape((1, -1) + (1,) * (z.ndim - 2)) if isinstance(layer, Conv2d)
                else bias)


def _split_gemm(layer, rule, a, z, relevance, xp, rerun, bn):
    """A Conv2d's or Linear's split (with ``bn`` folded in, when given)."""
    weight, bias = ((layer.weight.data, None if layer.bias is None else layer.bias.data)
                    if bn is None else _folded(layer, bn, xp))
    if isinstance(rule, ZBoxRule):
        low, high = (xp.broadcast_to(xp.asarray(v, dtype=a.dtype), a.shape)
                     for v in (rule.low, rule.high))
        parts = ((weight, a), (xp.maximum(weight, 0), low), (xp.minimum(weight, 0), high))
        outputs = []
        for w, v in parts:
            with _weights(layer, w, xp):
                outputs.append(layer.forward(v))
        z = _plus_bias(layer, outputs[0] - outputs[1] - outputs[2], bias)
        s = _ratio(relevance, z, rule.epsilon, xp)
        shares = []
        for w, v in parts:  # each backward needs only its weights (the inputs' shapes agree)
            with _weights(layer, w, xp):
                shares.append(v * layer.backward(s, input_grad=True))
        return shares[0] - shares[1] - shares[2]
    w, b = rule.weights(weight, bias, xp)
    if bn is None and w is weight and b is bias:  # the layer as it ran: its recorded z
        if rerun:
            layer.forward(a)
        return _share(layer, a, relevance, z, rule.epsilon, xp)
    with _weights(layer, w, xp):
        z = _plus_bias(layer, layer.forward(a), b)
        return _share(layer, a, relevance, z, rule.epsilon, xp)


def _split(layer, rule, a, z, relevance, xp, rerun, bn=None):
    """One layer's relevance split: a * J^T (R / (z + eps * sign(z))), with the rule's
    weights in z and J. The layer runs forward again on ``a`` when they differ, or
    when ``rerun`` (a layer used twice, whose record holds its later input)."""
    if isinstance(layer, (Conv2d, Linear)):
        return _split_gemm(layer, rule, a, z, relevance, xp, rerun, bn)
    swapped = []  # a max-pool, or a batch norm: the rule's weights swapped in
    weight = getattr(layer, "weight", None)
    if weight is not None:
        bias = getattr(layer, "bias", None)
        w, b = rule.weights(weight.data, None if bias is None else bias.data, xp)
        if w is not weight.data:
            swapped.append((weight, weight.data))
            weight.data = w
        if bias is not None and b is not bias.data:
            swapped.append((bias, bias.data))
            bias.data = b
    try:
        if swapped:
            z = layer.forward(a)
        elif rerun:
            layer.forward(a)
        return _share(layer, a, relevance, z, rule.epsilon, xp)
    finally:
        for param, data in reversed(swapped):
            param.data = data


def lrp(model, x, target=None, *, rules=None, fold_batchnorm=False,
        return_convergence_delta=False, train=False):
    """Layer-wise relevance propagation (Captum's LRP): each input element's share of
    the target logit, signed, shaped like x. See the module's docstring for the rules.

    rules: ``{layer: rule}`` for the layers that should not use the default
    ``EpsilonRule()`` (epsilon 1e-9, Captum's default for every layer with weights
    and for max-pools); a layer is a (dotted) name, a top-level index or the layer
    itself, and a nested block sets the rule of all its layers. Rules:
    ``EpsilonRule(epsilon)``, ``GammaRule(gamma, set_bias_to_zero)``,
    ``Alpha1Beta0Rule(set_bias_to_zero)``, ``ZBoxRule(low, high)`` (for the first
    layer), ``IdentityRule()`` (for a batch norm). Montavon et al.'s composite, for
    instance: z-box for the first layer, gamma for the other convolutions, epsilon
    = 0.25 for the middle ones, the default for the last layers.
    fold_batchnorm: merge each BatchNorm2d (BatchNorm1d) into the Conv2d (Linear)
    right before it, with the statistics it normalises with, and split by the
    merged layer under that layer's rule (Captum splits at the batch norm itself,
    the default here).
    target: the class (default: the prediction). return_convergence_delta: also
    return, per image, the target logit minus the attributions' sum (Captum's
    sign): the relevance the biases and the epsilons absorbed.
    The model must end in logits (there is no rule for a Softmax) and may hold
    Conv2d, Linear, BatchNorm1d/2d, MaxPool2d, ReLU, Dropout and Flatten layers.
    """
    op = "lrp"
    x, single, xp = as_input(model, x, op)
    attributions, logit = _relevance(model, x, target, rules, fold_batchnorm, train, op)
    return _finish(attributions, logit, return_convergence_delta, single)


def layer_lrp(model, x, layer, target=None, *, rules=None, fold_batchnorm=False,
              attribute_to_layer_input=False, return_convergence_delta=False, train=False):
    """LRP's relevance at a layer (Captum's LayerLRP): the target logit split among the
    units of ``layer``'s output (or, with ``attribute_to_layer_input``, its input), by
    the rules of the layers after it. Shaped like the layer's output (N, ...); the
    units add up to the logit minus what the later layers' biases and epsilons
    absorbed (``return_convergence_delta``: the logit minus the sum, per image).

    layer: a name, an index or the layer itself (a nested block: its output). rules,
    fold_batchnorm, target: as :func:`lrp` (a layer inside a folded conv and batch
    norm pair has no relevance of its own: refused).
    """
    op = "layer_lrp"
    x, single, xp = as_input(model, x, op)
    keep = _kept(model, layer, attribute_to_layer_input, op)
    attributions, logit = _relevance(model, x, target, rules, fold_batchnorm, train, op, keep)
    return _finish(attributions, logit, return_convergence_delta, single)


def _finish(attributions, logit, return_convergence_delta, single):
    out = attributions.astype(np.float32)
    if not return_convergence_delta:
        return unbatch(out, single)
    spent = attributions.sum(axis=tuple(range(1, attributions.ndim)))
    return unbatch((out, (logit - spent).astype(np.float32)), single)


def _relevance(model, x, target, rules, fold_batchnorm, train, op, keep=0):
    """The relevance (float64, times the logit) at the output of the model's first
    ``keep`` leaf layers (0: at the input), and each image's target logit."""
    xp = B.array_module(x)
    if not isinstance(fold_batchnorm, (bool, np.bool_)):
        raise TypeError(f"{op}: fold_batchnorm must be True or False, got {fold_batchnorm!r}")
    leaves = list(_leaves(model))
    folded = _folded_pairs(leaves) if fold_batchnorm else {}
    chosen = _layer_rules(model, leaves, rules, folded, op)
    if 0 < keep < len(leaves) and leaves[keep][0] in folded:
        raise ValueError(f"{op}: {leaves[keep - 1][0]!r} and {leaves[keep][0]!r} are folded "
                         f"into one layer (fold_batchnorm=True), so there is no relevance "
                         f"between them; take the batch norm's output, or fold_batchnorm=False")
    n = x.shape[0]
    with preserved(model, train):
        for p in model.parameters():
            p.requires_grad = False  # preserved() puts them back
        inputs, outputs, a = [], [], x
        for _, layer in leaves:
            inputs.append(a)
            a = layer.forward(a)
            outputs.append(a)
        check_logits(a, op)
        for (name, _), a_in in zip(leaves[keep:], inputs[keep:]):
            if isinstance(chosen[name], ZBoxRule):
                _check_box(chosen[name], name, a_in.shape, op)
        t = resolve_targets(target, a, op)
        rows = xp.arange(n)
        logit = a[rows, t].astype(np.float64)
        relevance = xp.zeros_like(a)
        relevance[rows, t] = 1.0
        uses = {}
        for _, layer in leaves:
            uses[id(layer)] = uses.get(id(layer), 0) + 1
        merged = {conv: dict(leaves)[bn] for bn, conv in folded.items()}
        for (name, layer), a_in, a_out in list(zip(leaves, inputs, outputs))[keep:][::-1]:
            rule = chosen[name]
            if rule is None or rule.identity:
                relevance = relevance.reshape(a_in.shape)
                continue
            relevance = _split(layer, rule, a_in, a_out, relevance, xp, uses[id(layer)] > 1,
                               merged.get(name))
    return relevance.astype(np.float64) * logit.reshape((n,) + (1,) * (relevance.ndim - 1)), \
        logit
