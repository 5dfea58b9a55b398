"""Gradient clipping, as ``torch.nn.utils``: call between the backward pass and the
optimizer's step.

>>> model.backward(loss_fn.backward())
>>> total = nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
>>> optimizer.step()

The gradients are scaled in place, on whichever device they are (NumPy or CuPy
arrays); the norm is computed in float64 and stays on that device (a 0-d array:
reading it on the GPU is the only wait).
"""

import math
import numbers

import numpy as np

from .module import Parameter, _array_module

__all__ = ["clip_grad_norm_", "clip_grad_value_"]


def _gradients(parameters, op):
    if isinstance(parameters, Parameter):
        parameters = [parameters]
    params = list(parameters)
    if not all(isinstance(p, Parameter) for p in params):
        bad = next(p for p in params if not isinstance(p, Parameter))
        raise TypeError(f"{op}: parameters must be fastcnn.nn Parameters, got "
                        f"{type(bad).__name__}")
    return [p.grad for p in params if p.grad is not None]


def _number(value, name, op):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a number, got {value!r}")
    return float(value)


def _norm_type(value, op):
    """``float(value)``, as torch reads norm_type ('inf' and float('inf') alike)."""
    try:
        norm_type = float(value)
    except (TypeError, ValueError):
        raise (TypeError if not isinstance(value, str) else ValueError)(
            f"{op}: norm_type must be a number (or 'inf'), got {value!r}") from None
    if math.isnan(norm_type):
        raise ValueError(f"{op}: norm_type must be a number, got {value!r}")
    return norm_type


def _total_norm(grads, norm_type, xp):
    """The ``norm_type``-norm of the gradients' per-parameter norms, in float64, as
    torch computes it: for p != 0 that is the p-norm of all the entries (inf: the
    largest |g|, -inf: the smallest, p < 0: 0 as soon as one entry is 0); for
    p = 0, the number of gradients with a non-zero entry (torch's 0-"norm" of the
    per-parameter counts). Empty gradients have no entries and are left out."""
    grads = [g for g in grads if g.size]
    if not grads:
        return xp.zeros((), np.float64)
    if norm_type == 0:
        return xp.stack([xp.count_nonzero(g) != 0 for g in grads]).sum().astype(np.float64)
    if math.isinf(norm_type):
        reduce = xp.max if norm_type > 0 else xp.min
        return reduce(xp.stack([reduce(xp.abs(g)).astype(np.float64) for g in grads]))
    with np.errstate(divide="ignore"):  # |0| ** p, p < 0: inf, and the norm 0, as torch's
        sums = xp.stack([(xp.abs(g.astype(np.float64)) ** norm_type).sum() for g in grads])
        return sums.sum() ** (1.0 / norm_type)


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False,
                    foreach=None):
    """Scale the gradients of ``parameters`` (an iterable of Parameters, or one) so that
    their total ``norm_type``-norm (the norm of the per-parameter norms, as torch:
    read with ``float(norm_type)``, so 'inf' works; inf: the largest |g|, -inf the
    smallest, 0 the number of gradients with a non-zero entry, negative p as torch)
    is at most ``max_norm``: each is multiplied by min(1, max_norm / (total + 1e-6)),
    as torch does. Parameters without a gradient, and empty gradients, are
    skipped (torch raises for an empty one with p = +-inf or p < 0). Returns the
    total norm before clipping, a float32 0-d array on the gradients' device.
    error_if_nonfinite: raise if that norm is NaN or infinite (else the gradients
    become NaN, as torch's). foreach: accepted for torch's signature; the norm is
    always accumulated in float64 here."""
    op = "clip_grad_norm_"
    grads = _gradients(parameters, op)
    max_norm = _number(max_norm, "max_norm", op)
    norm_type = _norm_type(norm_type, op)
    if foreach is not None and not isinstance(foreach, (bool, np.bool_)):
        raise TypeError(f"{op}: foreach must be None, True or False, got {foreach!r}")
    if not grads:
        return np.zeros((), np.float32)
    xp = _array_module(grads[0])
    if any(_array_module(g) is not xp for g in grads):
        raise ValueError(f"{op}: the gradients are on different devices (CPU and GPU)")
    total = _total_norm(grads, norm_type, xp)
    if error_if_nonfinite and not bool(xp.isfinite(total)):
        raise RuntimeError(f"{op}: the total {norm_type}-norm of the gradients is "
                           f"{float(total)}; pass error_if_nonfinite=False to clip anyway")
    scale = xp.minimum(max_norm / (total + 1e-6), 1.0).astype(np.float32)
    for g in grads:
        g *= scale
    return total.astype(np.float32)


def clip_grad_value_(parameters, clip_value):
    """Clamp every gradient of ``parameters`` to [-clip_value, clip_value], in place
    (NaN stays NaN), as torch.nn.utils.clip_grad_value_."""
    op = "clip_grad_value_"
    clip_value = _number(clip_value, "clip_value", op)
    if clip_value < 0:
        raise ValueError(f"{op}: clip_value must be >= 0, got {clip_value}")
    for g in _gradients(parameters, op):
        xp = _array_module(g)
        xp.clip(g, -clip_value, clip_value, out=g)
