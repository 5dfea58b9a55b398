"""What every visualisation method shares: input checks, targets, layer lookup, and
the guard that leaves a model exactly as it was found."""

from contextlib import contextmanager

import numpy as np

from .. import _backend as B
from ..nn import BatchNorm2d, Conv2d, Dropout, ReLU, Sequential

SCORES = ("logit", "probability")


def check_model(model, op):
    if not isinstance(model, Sequential):
        raise TypeError(f"{op}: model must be a fastcnn.nn.Sequential (its named layers give "
                        f"the activations and gradients), got {type(model).__name__}")


def as_input(model, x, op, name="x"):
    """``x`` as float32 (N, C, H, W) on the model's device, and whether it was one image.

    One image (C, H, W) or a batch (N, C, H, W); any real dtype (converted to float32).
    A NumPy input for a model on the GPU, or the reverse, is a ValueError.
    """
    check_model(model, op)
    on_gpu = model.device != "cpu"
    if B.is_gpu_array(x) != on_gpu:
        raise ValueError(f"{op}: {name} is a {'GPU' if B.is_gpu_array(x) else 'NumPy (CPU)'} "
                         f"array but the model is on the {'GPU' if on_gpu else 'CPU'}; move one "
                         f"of them (cupy.asarray(x) / model.to('cpu'))")
    xp = B.array_module(x) if on_gpu else np
    x = B.as_float(x, name, xp)
    if x.ndim not in (3, 4):
        raise ValueError(f"{op}: {name} must be one image (C, H, W) or a batch (N, C, H, W), "
                         f"got shape {B.shape_str(x.shape)}")
    single = x.ndim == 3
    return (x[None] if single else x), single, xp


def check_seed(seed, op):
    """``seed`` for numpy.random.default_rng: a non-negative int, None (fresh entropy),
    a Generator or a SeedSequence; anything else a TypeError / ValueError naming it."""
    if seed is None or isinstance(seed, (np.random.Generator, np.random.SeedSequence)):
        return seed
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{op}: seed must be a non-negative int, None or a "
                        f"numpy.random.Generator, got {seed!r}")
    if seed < 0:
        raise ValueError(f"{op}: seed must be a non-negative int, got {seed}")
    return int(seed)


def check_finite(a, name, op):
    """A ValueError where a baseline or fill (an array of the model's device) holds a
    NaN or an infinity: every attribution would be NaN."""
    xp = B.array_module(a)
    if a.size and not bool(xp.isfinite(a).all()):
        raise ValueError(f"{op}: {name} must be finite; it holds NaN or infinite values")
    return a


def to_host(a):
    """A NumPy copy of a CuPy array; NumPy arrays (and array-likes) as NumPy arrays."""
    return a.get() if B.is_gpu_array(a) else np.asarray(a)


def unbatch(a, single):
    """Drop the batch axis of ``a`` (or of every array in a tuple) for one-image calls."""
    if not single:
        return a
    if isinstance(a, tuple):
        return tuple(v[0] for v in a)
    return a[0]


def check_score(score, op):
    if score not in SCORES:
        raise ValueError(f"{op}: score must be one of {SCORES}, got {score!r}")


def check_logits(logits, op):
    if logits.ndim != 2:
        raise ValueError(f"{op}: the model must output class scores (N, classes); it gives "
                         f"shape {B.shape_str(logits.shape)}")


def resolve_targets(target, logits, op):
    """Target classes as an int64 (N,) array: ``target`` (an int, or one per sample) or,
    when None, each sample's predicted class."""
    xp = B.array_module(logits)
    n, k = logits.shape
    if target is None:
        return xp.argmax(logits, axis=1).astype(np.int64)
    t = to_host(target)
    if t.dtype.kind not in "iu":
        raise TypeError(f"{op}: target must be a class index (int) or an integer array, "
                        f"got dtype {t.dtype}")
    if t.ndim == 0:
        t = np.full(n, int(t), np.int64)
    if t.shape != (n,):
        raise ValueError(f"{op}: target must be an int or one class per sample, shape ({n},); "
                         f"got shape {B.shape_str(t.shape)}")
    if n and (t.min() < 0 or t.max() >= k):
        raise ValueError(f"{op}: target classes must be in [0, {k}), got {t.tolist()}")
    return xp.asarray(t, dtype=np.int64)


def probabilities64(logits, axis=-1):
    """The softmax of float32 logits, in float64. A confident image's probability is
    1 - 1e-9, which float32 rounds to 1: its changes, and 1 - p in the softmax's
    Jacobian, would vanish (Captum on a float64 model sees them)."""
    xp = B.array_module(logits)
    z = logits.astype(np.float64)
    e = xp.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def score_seed(logits, target, score):
    """d score / d logits: one-hot at the target (logit), or the softmax Jacobian's
    target row p_t * (onehot - p) (probability; in float64, then float32)."""
    xp = B.array_module(logits)
    n = logits.shape[0]
    rows = xp.arange(n)
    seed = xp.zeros_like(logits)
    seed[rows, target] = 1.0
    if score == "probability":
        p = probabilities64(logits, axis=1)
        seed = (p[rows, target][:, None] * (seed - p)).astype(logits.dtype)
    return seed


def layer_name(model, layer, op):
    """The name of layer ``layer`` (a name, an index or the layer itself) of ``model``."""
    try:
        return model.names[model.index(layer)]
    except (KeyError, IndexError) as exc:
        raise ValueError(f"{op}: {exc.args[0]}") from exc


def default_cam_layer(model, op):
    """The last conv block's output: the last Conv2d (or child holding one, such as a
    nested Sequential block) and the batch norm / ReLU / dropout layers right after it
    (for mnist_cnn: 'relu2'), where the maps are still spatial and rectified."""
    layers = list(model.named_children())
    convs = [i for i, (_, m) in enumerate(layers)
             if any(isinstance(part, Conv2d) for part in m.modules())]
    if not convs:
        raise ValueError(f"{op}: the model has no Conv2d layer; pass layer=")
    i = convs[-1]
    while i + 1 < len(layers) and isinstance(layers[i + 1][1], (BatchNorm2d, ReLU, Dropout)):
        i += 1
    return layers[i][0]


@contextmanager
def preserved(model, train=False):
    """Run the body with ``model`` in eval mode (``train=True``: training mode), with no
    ReLU/MaxPool fusion, and put everything back afterwards: each module's mode, flags and cached tensors,
    Sequential's recorded activations and gradients, parameter gradients and
    requires_grad, and buffers (batch-norm running statistics, dropout counters)."""
    modules = list(model.modules())
    attributes = [(m, dict(m.__dict__)) for m in modules]
    params = [(p, p.grad, p.requires_grad) for p in model.parameters()]
    buffers = [(b, b.copy()) for b in model.buffers() if b is not None]
    model.train(bool(train))
    for m in modules:
        if hasattr(m, "fuse"):
            m.fuse = False  # every layer's activation and gradient is recorded
    try:
        yield model
    finally:
        for m, saved in attributes:
            m.__dict__.clear()
            m.__dict__.update(saved)
        for p, grad, requires_grad in params:
            p.grad, p.requires_grad = grad, requires_grad
        for b, saved in buffers:
            b[...] = saved


class LayerPoint:
    """Where a layer method reads the network: the output of a layer (or, with
    ``to_input``, its input: the output of the layer before it, or the model's input
    for the first layer), with the forward and backward passes split there."""

    def __init__(self, model, layer, to_input, op):
        if not isinstance(to_input, (bool, np.bool_)):
            raise TypeError(f"{op}: attribute_to_layer_input must be True or False, got "
                            f"{to_input!r}")
        self.model = model
        name = layer_name(model, layer, op)
        index = model.names.index(name)
        self.name = (model.names[index - 1] if index else None) if to_input else name

    def activation(self, x):
        """The activation at this point for model inputs ``x`` (recorded)."""
        return x if self.name is None else self.model.forward(x, stop=self.name)

    def logits(self, activation):
        """The rest of the network from an activation at this point (recorded)."""
        if self.name is None:
            return self.model.forward(activation)
        return self.model.forward(activation, start=self.name)

    def gradient(self, seed):
        """d (seed . logits) / d activation, after :meth:`logits`."""
        return self.model.backward(seed, stop=self.name, guided=False, param_grads=False)


def data_bounds(model, channels):
    """The pixel range [0, 1] in the model's input units, per channel, from the
    standardisation in its metadata (mean, std), or None when it has none."""
    meta = getattr(model, "metadata", None) or {}
    if "mean" not in meta or "std" not in meta:
        return None
    mean = np.broadcast_to(np.asarray(meta["mean"], np.float64).reshape(-1), (channels,))
    std = np.broadcast_to(np.asarray(meta["std"], np.float64).reshape(-1), (channels,))
    return (-mean / std).astype(np.float32), ((1.0 - mean) / std).astype(np.float32)
