"""How far to trust an attribution: Captum's two metrics.

Infidelity (Yeh et al. 2019, Captum's ``infidelity``) asks whether the
attribution predicts what perturbing the input does to the score: for
perturbations I, the mean of (I . a - (f(x) - f(x~)))^2, where a is the
attribution, f the target's score and x~ the perturbed input (x - I for noise;
for a removed subset of features, I their 0/1 mask). Zero for a linear model's
gradient under any noise and for its (x - baseline) * gradient under any subset.

Sensitivity (Captum's ``sensitivity_max``) asks whether the attribution is stable:
the largest change of the explanation over inputs drawn near x,
max ||e(x + d) - e(x)|| / ||e(x)||, d uniform in [-radius, radius].

The built-in draws are functions of (seed, draw, element or feature id) only, so an
image gets the same value alone or in any batch, and they are made a batch at a time.
"""

import inspect
import math
import numbers

import numpy as np

from .. import _backend as B
from ._common import (as_input, check_finite, check_logits, check_score, check_seed,
                      preserved, probabilities64, resolve_targets, unbatch)
from .ablation import _feature_mask
from .attribution import _fill_images

__all__ = ["infidelity", "unexplained_share", "sensitivity_max", "PERTURBATIONS",
           "SENSITIVITY_METHODS"]

#: infidelity's built-in perturbations.
PERTURBATIONS = ("noise", "subset")

#: The fastcnn.viz methods :func:`sensitivity_max` takes by name; each is called as
#: ``method(model, x, target, **kwargs)`` (occlusion's heatmap, the logit drop).
SENSITIVITY_METHODS = ("gradient", "saliency", "guided_backprop", "deconvolution",
                       "input_x_gradient", "integrated_gradients", "smooth_grad", "deep_lift",
                       "lrp", "grad_cam", "guided_grad_cam", "occlusion", "feature_ablation",
                       "shapley_value_sampling", "kernel_shap", "lime")

#: The most perturbed copies (images x draws) one call evaluates.
MAX_COPIES = 1 << 26

_GOLDEN, _ID_MIX = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xD1B54A32D192ED03)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _positive(value, name, op):
    """A number that is finite and > 0 in float32 (where it is applied), as a float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a number, got {value!r}")
    with np.errstate(over="ignore", under="ignore"):
        single = float(np.float32(value)) if math.isfinite(value) else math.inf
    if not (math.isfinite(single) and single > 0):
        raise ValueError(f"{op}: {name} must be finite and > 0 in float32 (about 1e-38 to "
                         f"3e38), got {value}")
    return single


def _key(seed):
    """A 63-bit key for the draws from ``seed`` (checked)."""
    return int(np.random.default_rng(seed).integers(0, 2 ** 63))


def _coins(key, sample, ids):
    """Fair coins, a function of (key, sample, id) only (splitmix64's finalizer):
    True where feature ``ids`` is removed in draw ``sample``; arrays broadcast."""
    xp = B.array_module(ids)
    z = (xp.asarray(sample, dtype=np.uint64) * _GOLDEN + ids.astype(np.uint64) * _ID_MIX +
         np.uint64(key))
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(63)).astype(bool)


def _noise(key, sample, shape, stdev):
    """Draw ``sample``'s Gaussian noise (float32, ``shape``) for ``key``."""
    rng = np.random.default_rng([key, int(sample)])
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(stdev)


def _scores(model, score, op):
    """score(images, targets) -> the targets' logits (or softmax probabilities, taken
    in float64: a confident image's probability is 1.0 in float32), float64."""
    def scores(images, targets):
        logits = model.forward(images, record=False)
        check_logits(logits, op)
        xp = B.array_module(logits)
        values = logits.astype(np.float64) if score == "logit" else probabilities64(logits, 1)
        return values[xp.arange(len(values)), targets]
    return scores


def _attributions(attributions, x, single, xp, op):
    """The attributions as float32 shaped like x: x's shape, or one map per image
    without the channel axis ((N, H, W), or (N, 1, H, W)) given to every channel;
    for one image, without the batch axis."""
    if B.is_gpu_array(attributions) != (xp is not np):
        raise ValueError(f"{op}: attributions must be on the model's device, as x")
    a = B.as_float(attributions, "attributions", xp)
    if single and a.ndim in (2, 3):
        a = a[None]
    if a.shape == x.shape[:1] + x.shape[2:]:
        a = a[:, None]
    if a.ndim != 4 or a.shape[0] != x.shape[0] or a.shape[2:] != x.shape[2:] or \
            a.shape[1] not in (1, x.shape[1]):
        given = a[0].shape if single and a.ndim == 4 and len(a) == 1 else a.shape
        raise ValueError(f"{op}: attributions must be shaped like x {B.shape_str(x.shape)} or "
                         f"be one map per image {B.shape_str(x.shape[:1] + x.shape[2:])}; got "
                         f"shape {B.shape_str(given)}")
    return check_finite(xp.broadcast_to(a, x.shape), "attributions", op)


def _unused(op, perturb, **given):
    """A ValueError for an option ``perturb`` does not use (given, i.e. not None)."""
    for name, value in given.items():
        if value is not None:
            raise ValueError(f"{op}: {name} is not used with perturb={perturb!r}; leave it "
                             f"unset")


def infidelity(model, x, attributions, target=None, *, perturb="noise", n_samples=10,
               stdev=None, feature_mask=None, baseline=None, normalize=False, score="logit",
               seed=0, batch_size=256, train=False):
    """Infidelity of ``attributions`` (Yeh et al.; Captum's ``infidelity``): over
    ``n_samples`` perturbations of each image, the mean of
    (sum(I * attributions) - (score(x) - score(x~)))^2, x~ the perturbed image and I
    the perturbation (see ``perturb``); float64, (N,) (a scalar for one image).
    Lower is better; 0 for a linear model's exact attribution.

    attributions: shaped like x, or one map per image ((N, H, W) or (N, 1, H, W),
    e.g. a saliency or Grad-CAM map) given to every channel; for one image (C, H, W),
    (C, H, W) or (H, W).
    perturb: 'noise' (I Gaussian, standard deviation ``stdev`` in the model's input
    units, 0.01 by default, x~ = x - I: for local attributions, the gradient and its
    kin), 'subset' (each feature of ``feature_mask``, every element its own by
    default, set to ``baseline`` (0.0 by default; a value, an image or one per
    image) with probability 1/2, I = 1 there and 0 elsewhere, so that I . a sums the
    removed features' attributions: for attributions that already carry the factor
    x - baseline, such as integrated gradients, DeepLIFT, SHAP and ablation;
    Sensitivity-n, Captum's ``multiply_by_inputs`` perturbations), or a function
    ``perturb(inputs) -> (perturbations, perturbed_inputs)`` as Captum's
    ``perturb_func``, called once (as Captum's) with ``inputs`` holding ``n_samples``
    copies of each image in turn (image 0's first: N x n_samples images in memory
    at once); the returned arrays are shaped like them. Options a perturbation does not use are refused.
    The built-in draws come from ``seed`` and are functions of (draw, element) for
    the noise and of (draw, feature id) for the subsets, so an image gets the same
    value alone or in any batch.
    normalize: scale the attributions by the beta minimizing the error first
    (Captum's ``normalize``): invariant to scaling the attributions.
    score: 'logit' or 'probability' (softmax in float64); ``target`` defaults to the
    prediction on x. batch_size: perturbed copies per forward pass. train: run the
    model in training mode (batch norm then normalises each pass's copies by their
    own statistics, so the values depend on batch_size).
    """
    dots, diffs, single = _infidelity_terms(
        model, x, attributions, target, perturb, n_samples, stdev, feature_mask, baseline,
        normalize, score, seed, batch_size, train, "infidelity")
    return unbatch(((dots - diffs) ** 2).mean(axis=1), single)


def unexplained_share(model, x, attributions, target=None, *, perturb="noise", n_samples=10,
                      stdev=None, feature_mask=None, baseline=None, score="logit", seed=0,
                      batch_size=256, train=False):
    """Normalized infidelity over the mean squared score change: the share of what the
    perturbations do to the score that the attribution, best scaled, leaves
    unexplained, in [0, 1] (0: it predicts every change; 1: none of them; NaN where
    no perturbation moves the score at all). Arguments as :func:`infidelity`'s, the
    same draws."""
    dots, diffs, single = _infidelity_terms(
        model, x, attributions, target, perturb, n_samples, stdev, feature_mask, baseline,
        True, score, seed, batch_size, train, "unexplained_share")
    xp = B.array_module(dots)
    energy = (diffs * diffs).sum(axis=1)
    error = ((dots - diffs) ** 2).sum(axis=1)
    share = xp.where(energy == 0, np.nan, error / xp.where(energy == 0, 1.0, energy))
    return unbatch(xp.clip(share, 0.0, 1.0), single)


def _infidelity_terms(model, x, attributions, target, perturb, n_samples, stdev, feature_mask,
                      baseline, normalize, score, seed, batch_size, train, op):
    """infidelity's checked arguments and its per-draw terms: (I . a (times beta when
    normalizing), score(x) - score(perturbed)), each (N, n_samples) float64, and
    whether x was one image."""
    x, single, xp = as_input(model, x, op)
    check_score(score, op)
    a = _attributions(attributions, x, single, xp, op)
    n_samples = B.as_count(n_samples, f"{op}: n_samples")
    batch_size = B.as_count(batch_size, f"{op}: batch_size")
    if not isinstance(normalize, (bool, np.bool_)):
        raise TypeError(f"{op}: normalize must be True or False, got {normalize!r}")
    key = _key(check_seed(seed, op))
    n = x.shape[0]
    if n * n_samples > MAX_COPIES:
        raise ValueError(f"{op}: n_samples={n_samples} for {n} images makes {n * n_samples} "
                         f"perturbed copies, more than {MAX_COPIES}")
    if callable(perturb):
        _unused(op, "a function", stdev=stdev, feature_mask=feature_mask, baseline=baseline)
        draw, image_major = _custom_perturbations(perturb, x, n_samples, xp, op), True
    elif isinstance(perturb, str) and perturb == "noise":
        _unused(op, perturb, feature_mask=feature_mask, baseline=baseline)
        stdev = _positive(0.01 if stdev is None else stdev, "stdev", op)

        def draw(image, sample):
            drawn, where = np.unique(sample, return_inverse=True)
            noise = xp.asarray(np.stack([_noise(key, j, x.shape[1:], stdev) for j in drawn]))
            change = noise[xp.asarray(where)]
            return change, x[xp.asarray(image)] - change
        image_major = False
    elif isinstance(perturb, str) and perturb == "subset":
        _unused(op, perturb, stdev=stdev)
        draw = _subset_perturbations(feature_mask, 0.0 if baseline is None else baseline, x, xp,
                                     key, op)
        image_major = False
    else:
        raise ValueError(f"{op}: perturb must be one of {PERTURBATIONS} or a function, got "
                         f"{perturb!r}")
    scores = _scores(model, score, op)
    dots = xp.empty((n, n_samples), np.float64)    # I . a per image and draw
    diffs = xp.empty((n, n_samples), np.float64)   # score(x) - score(x~)
    with preserved(model, train):
        logits = model.forward(x, record=False)
        check_logits(logits, op)
        t = resolve_targets(target, logits, op)
        at_x = scores(x, t)
        # built-in draws: draw-major, so that a pass makes few draws; a function's:
        # image-major (Captum's order)
        for first in range(0, n * n_samples, batch_size):
            c = np.arange(first, min(first + batch_size, n * n_samples))
            image, sample = (c // n_samples, c % n_samples) if image_major else (c % n, c // n)
            change, perturbed = draw(image, sample)
            i, j = xp.asarray(image), xp.asarray(sample)
            dots[i, j] = (change.astype(np.float64) * a[i]).reshape(len(c), -1).sum(axis=1)
            diffs[i, j] = at_x[i] - scores(perturbed, t[i])
    if normalize:
        aa, ad = (dots * dots).sum(axis=1), (dots * diffs).sum(axis=1)
        beta = xp.where(aa == 0, 0.0, ad / xp.where(aa == 0, 1.0, aa))
        dots = dots * beta[:, None]
    return dots, diffs, single


def _subset_perturbations(feature_mask, baseline, x, xp, key, op):
    """draw(image, sample) for perturb='subset': each feature of each copy set to the
    baseline by a fair coin of (key, draw, feature id); I is 1 where set, 0 elsewhere
    (a global attribution already holds the factor x - baseline: Captum's
    multiply_by_inputs perturbations)."""
    base = _fill_images(baseline, x, xp, op, "baseline")
    mask = _feature_mask(feature_mask, x, xp, op)
    per_image = mask.shape[0] != 1

    def draw(image, sample):
        i = xp.asarray(image)
        ids = mask[i] if per_image else mask
        removed = _coins(key, xp.asarray(sample).reshape((-1, 1, 1, 1)), ids)
        removed = xp.broadcast_to(removed, (len(image),) + x.shape[1:])
        return removed.astype(np.float32), xp.where(removed, base[i], x[i])
    return draw


def _custom_perturbations(perturb, x, n_samples, xp, op):
    """draw(image, sample) from a user's perturb(inputs) -> (perturbations, perturbed),
    called once, as Captum calls its perturb_func, on ``n_samples`` copies of each
    image in turn (image 0's first)."""
    inputs = xp.repeat(x, n_samples, axis=0)
    got = perturb(inputs)
    if not isinstance(got, tuple) or len(got) != 2:
        raise ValueError(f"{op}: perturb must return (perturbations, perturbed_inputs), "
                         f"got {type(got).__name__}")
    change, perturbed = (B.as_float(v, name, xp) for v, name in
                         zip(got, ("perturbations", "perturbed_inputs")))
    for v, name in ((change, "perturbations"), (perturbed, "perturbed_inputs")):
        if v.shape != inputs.shape:
            raise ValueError(f"{op}: perturb's {name} must be shaped like its inputs "
                             f"{B.shape_str(inputs.shape)}, got {B.shape_str(v.shape)}")
        check_finite(v, f"perturb's {name}", op)

    def draw(image, sample):
        rows = xp.asarray(image * n_samples + sample)
        return change[rows], perturbed[rows]
    return draw


def _parameter_count(fn):
    """How many parameters ``fn`` declares: Captum passes the radius to a perturb_func
    of more than one, and so does sensitivity_max."""
    try:
        return len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return 1


def _method(method, op):
    """fn(model, x, targets, **kwargs) -> an array (N, ...) for a name or a callable."""
    if callable(method):
        return method
    if not isinstance(method, str) or method not in SENSITIVITY_METHODS:
        raise ValueError(f"{op}: method must be a function or one of {SENSITIVITY_METHODS}, "
                         f"got {method!r}")
    from .. import viz

    fn = getattr(viz, method)
    if method == "occlusion":
        return lambda model, x, target, **kwargs: fn(model, x, target, **kwargs).logit_heatmap
    return fn


def _norms(values, order):
    """Each row's vector norm (float64): 'fro' (2), a number p > 0, or inf; a large p
    taken relative to the row's largest magnitude (no underflow)."""
    xp = B.array_module(values)
    a = xp.abs(values.astype(np.float64))
    if order == "fro" or order == 2:
        return xp.sqrt((a * a).sum(axis=1))
    top = a.max(axis=1) if a.shape[1] else xp.zeros(len(a))
    if math.isinf(order):
        return top
    scale = xp.where(top == 0, 1.0, top)
    return scale * ((a / scale[:, None]) ** order).sum(axis=1) ** (1.0 / order)


def _norm_order(norm, op):
    if isinstance(norm, str) and norm == "fro":
        return norm
    if isinstance(norm, (bool, np.bool_)) or not isinstance(norm, numbers.Real):
        raise TypeError(f"{op}: norm must be 'fro', a number > 0 or inf, got {norm!r}")
    if not norm > 0:
        raise ValueError(f"{op}: norm must be 'fro', a number > 0 or inf, got {norm}")
    return float(norm)


def sensitivity_max(method, model, x, target=None, *, radius=None, n_samples=10, norm="fro",
                    perturb=None, seed=0, train=False, method_args=None, **kwargs):
    """Max-sensitivity of an explanation (Yeh et al.; Captum's ``sensitivity_max``): over
    ``n_samples`` inputs x + d near each image, d uniform in [-radius, radius] per
    element (radius 0.02 by default), the largest ||e(x + d) - e(x)|| / ||e(x)||
    (float64, (N,); a scalar for one image; ||e(x)|| = 0 counts as 1). Lower is
    steadier.

    method: one of :data:`SENSITIVITY_METHODS` (a fastcnn.viz function; occlusion's
    logit heatmap) or a function ``method(model, x, target, **kwargs)`` returning one
    explanation per image, (N, ...); ``kwargs`` and ``method_args`` (a dict, for
    the method's options named as this function's own: ``{"n_samples": 400}`` for
    kernel_shap) go to it, the same for every call.
    The target is held at x's (``target``, by default the prediction on x) for the
    perturbed inputs. Each draw is one call on the whole batch, as the explanation
    of x itself; draw j is a function of (seed, j) only, the same for every image.
    norm: 'fro' (Euclidean, of the explanation flattened), a number p > 0 or inf.
    perturb: a function ``perturb(inputs) -> perturbed inputs``, or
    ``perturb(inputs, radius)`` (Captum's ``perturb_func``: as Captum, a function that
    declares more than one parameter gets the radius, as given), instead of the
    uniform draws; called once, as Captum's, with all ``n_samples`` copies of each
    image in turn (image 0's first: N x n_samples images in memory at once);
    ``radius`` is refused for a function of the inputs only.
    train: the model's mode for the target's forward pass (the method has its own).
    """
    op = "sensitivity_max"
    fn = _method(method, op)
    x, single, xp = as_input(model, x, op)
    n_samples = B.as_count(n_samples, f"{op}: n_samples")
    order = _norm_order(norm, op)
    key = _key(check_seed(seed, op))
    if method_args is not None and not isinstance(method_args, dict):
        raise TypeError(f"{op}: method_args must be a dict or None, got {method_args!r}")
    clash = sorted(set(kwargs) & set(method_args or {}))
    if clash:
        raise ValueError(f"{op}: {clash} given both as keywords and in method_args")
    options = {**kwargs, **(method_args or {})}
    if perturb is not None and not callable(perturb):
        raise TypeError(f"{op}: perturb must be a function or None, got {perturb!r}")
    takes_radius = perturb is None or _parameter_count(perturb) > 1
    if takes_radius:
        given = 0.02 if radius is None else radius
        radius = _positive(given, "radius", op)   # the draws' (float32) radius
    else:
        _unused(op, "a function of the inputs only", radius=radius)
    with preserved(model, train):
        logits = model.forward(x, record=False)
        check_logits(logits, op)
        t = resolve_targets(target, logits, op)
    n = x.shape[0]

    def explain(images):
        e = fn(model, images, t, **options)
        if isinstance(e, tuple):
            raise ValueError(f"{op}: the method must return one array of explanations, got a "
                             f"tuple (leave return_convergence_delta off)")
        e = e if B.is_gpu_array(e) else np.asarray(e)
        if B.is_gpu_array(e) != (xp is not np) or e.ndim < 1 or e.shape[0] != n or \
                e.dtype.kind not in "fiub":
            raise ValueError(f"{op}: the method must return one explanation per image, "
                             f"({n}, ...) numbers on the model's device; got "
                             f"{type(e).__name__} of shape {B.shape_str(e.shape)}, dtype "
                             f"{e.dtype}")
        return e.reshape(n, int(np.prod(e.shape[1:])))

    nears = None
    if perturb is not None:   # one call, as Captum's: n_samples copies of each image in turn
        inputs = xp.repeat(x, n_samples, axis=0)
        nears = perturb(inputs, given) if takes_radius else perturb(inputs)
        nears = B.as_float(nears, "perturb(inputs)", xp)
        if nears.shape != inputs.shape:
            raise ValueError(f"{op}: perturb(inputs) must be shaped like its inputs "
                             f"{B.shape_str(inputs.shape)}, got {B.shape_str(nears.shape)}")
        check_finite(nears, "perturb(inputs)", op)
        nears = nears.reshape((n, n_samples) + x.shape[1:])
    at_x = explain(x)
    scale = _norms(at_x, order)
    scale = xp.where(scale == 0, 1.0, scale)
    out = xp.zeros(n, np.float64)
    for j in range(n_samples):
        if nears is None:
            rng = np.random.default_rng([key, j])
            d = rng.uniform(-radius, radius, x.shape[1:]).astype(np.float32)
            near = x + xp.asarray(d)
        else:
            near = xp.ascontiguousarray(nears[:, j])
        e = explain(near)
        if e.shape != at_x.shape:
            raise ValueError(f"{op}: the method's explanations changed shape, "
                             f"{B.shape_str(at_x.shape)} then {B.shape_str(e.shape)}")
        out = xp.maximum(out, _norms(e.astype(np.float64) - at_x, order) / scale)
    return unbatch(out, single)
