"""Testing with concept activation vectors (Kim et al. 2018, Captum's TCAV): does a
class's score rise when a layer's activations move towards a human concept?

A concept is a set of example images (stripes, a sole, another class's pictures).
A linear classifier separates their activations at a layer from those of other
images; its normal, the concept activation vector (CAV), points from "not the
concept" to "the concept". The TCAV score of a class is the share of the class's
images whose score grows along the CAV (a positive directional derivative of the
target score at the layer). Random sets of "others" give as many CAVs, whose
spread says whether the concept's score is more than chance: runs with random
images as the concept give the scores to expect from no concept at all, and a
two-sided Welch t-test compares them.

>>> r = viz.tcav(model, trousers, "relu2", stripes, random_images, target=1)
>>> r.score, r.p_value          # the share of trousers the stripes concept lifts
"""

import math
from dataclasses import dataclass

import numpy as np

from .. import _backend as B
from ._common import (LayerPoint, as_input, check_finite, check_logits, check_model,
                      check_score, check_seed, preserved, resolve_targets, score_seed, to_host)

__all__ = ["ConceptVector", "TCAVResult", "concept_vector", "tcav", "CLASSIFIERS"]

#: The linear classifiers :func:`concept_vector` trains, by name.
CLASSIFIERS = ("ridge", "mean_difference")

#: The most runs :func:`tcav` makes (each trains two CAVs).
MAX_RUNS = 10000


@dataclass
class ConceptVector:
    """A CAV: ``vector``, the unit normal of the classifier's boundary (flattened
    like the layer's activations of one image, float64, on the model's device),
    pointing towards the concept; ``accuracy`` of the classifier on the held-out
    share of the examples (NaN when none were held out); ``layer`` (its name, or the
    name of the layer before it for a layer's input)."""

    vector: object
    accuracy: float
    layer: str


@dataclass
class TCAVResult:
    """What :func:`tcav` measured, over ``runs`` CAVs of the concept against random
    draws of the other images.

    score: the mean sign-count TCAV score (the share of the inputs whose target
    score grows along the CAV), scores its value per run; magnitude / magnitudes:
    the mean directional derivative (Captum's "magnitude"); accuracies: each CAV's
    held-out accuracy; random_scores: the same score for CAVs of random images
    against random images (the chance level), p_value: Welch's two-sided t-test of
    scores against random_scores (NaN with fewer than two runs of each, or when both
    are constant and equal; 0 when both are constant and differ; two-sided, so a
    concept that lowers the score below chance is significant too); derivatives:
    (runs, N) the directional derivatives themselves.
    """

    score: float
    scores: np.ndarray
    magnitude: float
    magnitudes: np.ndarray
    accuracies: np.ndarray
    random_scores: np.ndarray
    p_value: float
    derivatives: np.ndarray
    layer: str


def _activations(point, images, batch_size):
    """The layer's activations of ``images``, flattened, float64 (n, D)."""
    xp = B.array_module(images)
    parts = [point.activation(images[i:i + batch_size]) for i in range(0, len(images),
                                                                          batch_size)]
    if not parts:
        return xp.zeros((0, 0), np.float64)
    return xp.concatenate([p.reshape(len(p), -1) for p in parts]).astype(np.float64)


def _fit(classifier, alpha, acts, labels, op):
    """The classifier's weight vector (D,) for activations (n, D), labels +1 / -1."""
    xp = B.array_module(acts)
    if callable(classifier):
        w = classifier(acts, labels)
        try:
            w = w if B.is_gpu_array(w) else np.asarray(w)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{op}: the classifier must return one weight per activation, "
                             f"({acts.shape[1]},) numbers; got {type(w).__name__} ({exc})") \
                from None
        if w.shape == (1,) + acts.shape[1:]:   # scikit-learn's coef_ of a binary model
            w = w[0]
        if B.is_gpu_array(w) != (xp is not np) or w.shape != acts.shape[1:] or \
                w.dtype.kind not in "fiu":
            raise ValueError(f"{op}: the classifier must return one weight per activation, "
                             f"({acts.shape[1]},) numbers on the model's device; got shape "
                             f"{B.shape_str(w.shape)}, dtype {w.dtype}")
        w = xp.asarray(w, dtype=np.float64)
        if not bool(xp.isfinite(w).all()):
            raise ValueError(f"{op}: the classifier returned NaN or infinite weights")
        return w
    positive, negative = acts[labels > 0], acts[labels < 0]
    if classifier == "mean_difference":
        return positive.mean(axis=0) - negative.mean(axis=0)
    # ridge regression of the labels on the centred activations, solved in the dual
    # (n examples << D activations): w = Xc^T (Xc Xc^T + lambda I)^-1 (y - mean y),
    # lambda = alpha times the mean squared norm of the centred examples
    xc = acts - acts.mean(axis=0)
    gram = xc @ xc.T
    size = float(xp.trace(gram)) / len(acts)     # the mean squared norm
    if size == 0:
        return xp.zeros(acts.shape[1])
    # only the direction matters: solve (gram / size + alpha I) coef = y - mean y
    y = labels - labels.mean()
    coef = xp.linalg.solve(gram / size + alpha * xp.eye(len(acts)), y)
    return xc.T @ coef


def _cav(concept_acts, other_acts, classifier, alpha, test_fraction, rng, op):
    """(unit vector, held-out accuracy) of concept vs other activations."""
    xp = B.array_module(concept_acts)
    acts = xp.concatenate([concept_acts, other_acts])
    labels = np.concatenate([np.ones(len(concept_acts)), -np.ones(len(other_acts))])
    order = rng.permutation(len(acts))
    held = int(test_fraction * len(acts))
    test, train = order[:held], order[held:]
    train_labels = labels[train]
    if (train_labels > 0).all() or (train_labels < 0).all():
        raise ValueError(f"{op}: the training share holds one kind of example only; give more "
                         f"examples or a smaller test_fraction")
    fitted = acts[xp.asarray(train)]
    w = _fit(classifier, alpha, fitted, xp.asarray(train_labels), op)
    top = float(xp.abs(w).max()) if w.size else 0.0
    w = w / top if top else w     # no overflow in the norm
    norm = float(xp.sqrt((w * w).sum())) if bool(xp.isfinite(w).all()) else 0.0
    proj = acts @ (w / (norm or 1.0))
    ins, outs = (xp.asarray(train[train_labels > 0]), xp.asarray(train[train_labels < 0]))
    gap = float(proj[ins].mean()) - float(proj[outs].mean()) if norm else 0.0
    # a direction that does not separate the training classes' means is rounding noise
    # (the same activations on both sides)
    if abs(gap) <= 1e-9 * float(xp.abs(fitted - fitted.mean(axis=0)).max()):
        raise ValueError(f"{op}: the classifier found no direction: the concept's and the "
                         f"others' activations at the layer do not differ on average")
    w = w / norm
    accuracy = math.nan
    if held:   # the boundary through the midpoint of the training classes' projections
        cut = float(proj[ins].mean()) - gap / 2
        guess = np.where(to_host(proj[xp.asarray(test)]) > cut, 1.0, -1.0)
        accuracy = float((guess == labels[test]).mean())
    return w, accuracy


def _check_cav_options(classifier, alpha, test_fraction, op):
    if not callable(classifier) and (not isinstance(classifier, str) or
                                     classifier not in CLASSIFIERS):
        raise ValueError(f"{op}: classifier must be one of {CLASSIFIERS} or a function "
                         f"(activations, labels) -> weights, got {classifier!r}")
    for name, value, low, high in (("alpha", alpha, 0.0, math.inf),
                                   ("test_fraction", test_fraction, 0.0, 1.0)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
            raise TypeError(f"{op}: {name} must be a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not (low <= value < high) or not math.isfinite(value):
            raise ValueError(f"{op}: {name} must be in [{low}, {high}), got {value}")
        if name == "alpha" and value == 0 and classifier == "ridge":
            raise ValueError(f"{op}: alpha must be > 0 for the ridge classifier")
    return float(alpha), float(test_fraction)


def _examples(model, images, name, op, like=None):
    """``images`` checked: a batch (N, C, H, W) on the model's device, finite, shaped
    like ``like``'s images when given."""
    x = as_input(model, images, op, name)[0]
    if like is not None and x.shape[1:] != like.shape[1:]:
        raise ValueError(f"{op}: {name} images must be shaped as the others "
                         f"{B.shape_str(like.shape[1:])}, got {B.shape_str(x.shape[1:])}")
    return check_finite(x, name, op)


def concept_vector(model, layer, concept, others, *, classifier="ridge", alpha=0.1,
                   test_fraction=0.33, seed=0, attribute_to_layer_input=False, batch_size=256,
                   train=False):
    """The concept activation vector of ``concept`` (example images, (N, C, H, W))
    against ``others`` (images without the concept, e.g. random ones) at ``layer``'s
    output (or input): a :class:`ConceptVector`.

    classifier: 'ridge' (the default: ridge regression of +1 / -1 labels on the
    centred activations, its penalty ``alpha`` times their mean squared norm; exact
    and deterministic), 'mean_difference' (the concept's mean activation minus the
    others'), or a function ``(activations (n, D) float64, labels (n,) of +1 / -1) ->
    weights (D,)`` (or (1, D), e.g. a scikit-learn model's ``coef_``; the arrays are
    CuPy ones for a model on the GPU: ``cupy.asnumpy`` them for scikit-learn).
    Captum's default classifier is an SGD-trained linear model whose weight vector
    is not normalised; fastcnn's CAV is the unit vector, so Captum's magnitude
    equals fastcnn's given the same (unit) CAV. ``test_fraction`` of the
    examples (shuffled by ``seed``) is held out to measure the accuracy, as Captum's
    default classifier does with 0.33; the accuracy is that of the boundary halfway
    between the two training classes' mean projections on the vector.
    """
    op = "concept_vector"
    check_model(model, op)
    alpha, test_fraction = _check_cav_options(classifier, alpha, test_fraction, op)
    batch_size = B.as_count(batch_size, f"{op}: batch_size")
    rng = np.random.default_rng(check_seed(seed, op))
    point = LayerPoint(model, layer, attribute_to_layer_input, op)
    c = _examples(model, concept, "concept", op)
    o = _examples(model, others, "others", op, like=c)
    if len(c) == 0 or len(o) == 0:
        raise ValueError(f"{op}: concept and others need at least one image each, got "
                         f"{len(c)} and {len(o)}")
    with preserved(model, train):
        ca, oa = _activations(point, c, batch_size), _activations(point, o, batch_size)
    w, accuracy = _cav(ca, oa, classifier, alpha, test_fraction, rng, op)
    return ConceptVector(w, accuracy, point.name or "input")


def _welch_p(a, b):
    """Two-sided p-value of Welch's t-test of samples a and b (NaN when undefined)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return math.nan if a.mean() == b.mean() else 0.0
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    # P(|T| > |t|) for Student's t with df degrees of freedom = I_{df/(df+t^2)}(df/2, 1/2)
    return _betainc(df / 2, 0.5, df / (df + t * t))


def _betainc(a, b, x):
    """The regularized incomplete beta function I_x(a, b), by Lentz's continued
    fraction (on the side where it converges fast)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) +
                     a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            numerator = 1.0
        elif i % 2 == 0:
            numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            numerator = -((a + m) * (a + b + m) * x) / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + numerator * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + numerator / c
        c = c if abs(c) > tiny else tiny
        step = c * d
        f *= step
        if abs(1.0 - step) < 1e-15:
            break
    return front * (f - 1.0) / a


def tcav(model, x, layer, concept, others, target=None, *, runs=10, score="logit",
         classifier="ridge", alpha=0.1, test_fraction=0.33, seed=0,
         attribute_to_layer_input=False, batch_size=256, train=False):
    """TCAV (Kim et al.; Captum's TCAV with its default layer gradient): how many of
    the inputs ``x`` (e.g. images of one class) have a target score that grows
    along ``concept``'s activation vector at ``layer``. A :class:`TCAVResult`.

    concept: the concept's example images (N, C, H, W); others: a pool of images
    without it (random ones), at least as many as the concept's. Each of ``runs``
    CAVs (see :func:`concept_vector`; ``classifier``, ``alpha``, ``test_fraction``)
    takes a fresh random draw of len(concept) images from the pool (all of it when
    it holds no more), and as many control CAVs take one draw as the "concept" and
    another as the others, all from ``seed``; the controls (and so the p-value) need
    a pool of at least twice the concept's count. Each input's directional derivative is its target score's gradient at
    the layer (Captum's LayerGradientXActivation without the activation) dotted with
    the unit CAV; its sign-count score is the share of positive ones, its magnitude
    their mean. score: 'logit' or 'probability'; ``target`` defaults to the
    prediction on each input.
    """
    op = "tcav"
    check_model(model, op)
    check_score(score, op)
    alpha, test_fraction = _check_cav_options(classifier, alpha, test_fraction, op)
    runs = B.as_count(runs, f"{op}: runs")
    if runs > MAX_RUNS:
        raise ValueError(f"{op}: runs must be at most {MAX_RUNS}, got {runs}")
    batch_size = B.as_count(batch_size, f"{op}: batch_size")
    rng = np.random.default_rng(check_seed(seed, op))
    point = LayerPoint(model, layer, attribute_to_layer_input, op)
    x, _, xp = as_input(model, x, op)
    if len(x) == 0:
        raise ValueError(f"{op}: x holds no images")
    check_finite(x, "x", op)
    c = _examples(model, concept, "concept", op, like=x)
    pool = _examples(model, others, "others", op, like=x)
    if len(c) == 0 or len(pool) < len(c):
        raise ValueError(f"{op}: give at least one concept image and at least as many other "
                         f"images (got {len(c)} and {len(pool)})")
    with preserved(model, train):
        ca, pa = _activations(point, c, batch_size), _activations(point, pool, batch_size)
        grads = []
        for i in range(0, len(x), batch_size):
            acts = point.activation(x[i:i + batch_size])
            logits = point.logits(acts)
            check_logits(logits, op)
            t = resolve_targets(None if target is None else _target_slice(target, i, batch_size,
                                                                          len(x)),
                                logits, op)
            g = point.gradient(score_seed(logits, t, score))
            grads.append(g.reshape(len(g), -1).astype(np.float64))
    grads = xp.concatenate(grads) if grads else xp.zeros((0, ca.shape[1]), np.float64)
    k = len(c)

    def draw(count, exclude=None):
        choices = np.arange(len(pool)) if exclude is None else np.setdiff1d(
            np.arange(len(pool)), exclude)
        return choices if len(choices) <= count else np.sort(rng.choice(choices, count,
                                                                        replace=False))

    scores, magnitudes, accuracies, derivatives, random_scores = [], [], [], [], []
    for _ in range(runs):
        other = draw(k)
        w, accuracy = _cav(ca, pa[xp.asarray(other)], classifier, alpha, test_fraction, rng, op)
        d = grads @ w
        derivatives.append(to_host(d))
        scores.append(float((d > 0).mean()) if len(d) else math.nan)
        magnitudes.append(float(d.mean()) if len(d) else math.nan)
        accuracies.append(accuracy)
        if len(pool) >= 2 * k:
            fake = draw(k)
            rest = draw(k, exclude=fake)
            w, _ = _cav(pa[xp.asarray(fake)], pa[xp.asarray(rest)], classifier, alpha,
                        test_fraction, rng, op)
            d = grads @ w
            random_scores.append(float((d > 0).mean()) if len(d) else math.nan)
    scores, random_scores = np.array(scores), np.array(random_scores)
    return TCAVResult(
        score=float(scores.mean()), scores=scores, magnitude=float(np.mean(magnitudes)),
        magnitudes=np.array(magnitudes), accuracies=np.array(accuracies),
        random_scores=random_scores, p_value=_welch_p(scores, random_scores),
        derivatives=np.stack(derivatives), layer=point.name or "input")


def _target_slice(target, start, size, n):
    """The targets of inputs [start, start + size): an int for all, or one per input."""
    t = to_host(target)
    if np.ndim(t) == 0:
        return target
    if np.shape(t) != (n,):
        raise ValueError(f"tcav: target must be an int or one class per input, shape ({n},); "
                         f"got shape {B.shape_str(np.shape(t))}")
    return t[start:start + size]
