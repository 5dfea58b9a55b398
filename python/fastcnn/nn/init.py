"""Parameter initialisation, as PyTorch's defaults, drawn from a seeded NumPy generator.

Every function fills an array in place (NumPy or CuPy, or a layer's
Parameter, as torch's take ``layer.weight``), returns it, and the random ones take ``rng``: a
``numpy.random.Generator``, an int seed, or None for the module-wide generator
that :func:`manual_seed` resets (it starts seeded with 0, so a fresh process
builds the same model every time).
"""

import math

import numpy as np

from .module import Parameter, _array_module

__all__ = ["manual_seed", "get_generator", "calculate_fan_in_and_fan_out",
           "calculate_gain", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
           "xavier_normal_", "uniform_", "normal_", "constant_", "zeros_", "ones_"]

_default_generator = np.random.default_rng(0)


def manual_seed(seed):
    """Reset the generator used for initialisation and default dropout seeds."""
    global _default_generator
    _default_generator = np.random.default_rng(seed)


def get_generator(rng=None):
    """A Generator from ``rng``: a Generator (returned as is), an int seed, or None."""
    if rng is None:
        return _default_generator
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy.random.Generator, an int seed or None, "
                    f"got {type(rng).__name__}")


def calculate_fan_in_and_fan_out(shape):
    """(fan_in, fan_out) of a weight, (out, in) or (out, in, *kernel): the weight itself
    (an array or Parameter, as torch takes the tensor) or its shape."""
    if hasattr(shape, "shape"):
        shape = shape.shape
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        raise ValueError(f"fan in and fan out need a weight with at least 2 dimensions, "
                         f"got shape {tuple(shape)}")
    receptive_field = math.prod(shape[2:])
    return shape[1] * receptive_field, shape[0] * receptive_field


_LINEAR = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
           "conv_transpose3d", "sigmoid")


def calculate_gain(nonlinearity, param=None):
    """The recommended gain for ``nonlinearity`` (as torch.nn.init.calculate_gain): 1 for
    linear layers and sigmoid, 5/3 for tanh, sqrt(2) for relu, sqrt(2 / (1 + slope^2))
    for leaky_relu (``param``: the slope, 0.01 by default), 3/4 for selu."""
    if nonlinearity in _LINEAR:
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        if param is None:
            slope = 0.01
        elif isinstance(param, (int, float, np.integer, np.floating)) and \
                not isinstance(param, (bool, np.bool_)):
            slope = float(param)
        else:
            raise ValueError(f"calculate_gain: negative_slope {param!r} is not a valid number")
        return math.sqrt(2.0 / (1 + slope ** 2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"calculate_gain: unsupported nonlinearity {nonlinearity!r}")


def _fill(array, values, fn):
    """Write ``values`` (host numbers or an array of ``array``'s shape) into
    ``array`` (or a Parameter's data) in place; returns ``array``."""
    target = array.data if isinstance(array, Parameter) else array
    if not (hasattr(target, "shape") and hasattr(target, "__setitem__")):
        raise TypeError(f"{fn}: array must be a NumPy or CuPy array or a Parameter, "
                        f"got {type(array).__name__}")
    xp = _array_module(target)
    target[...] = values if xp is np or np.isscalar(values) else xp.asarray(values)
    return array


def uniform_(array, low=0.0, high=1.0, rng=None):
    """Fill ``array`` with U(low, high)."""
    return _fill(array, get_generator(rng).uniform(low, high, size=array.shape), "uniform_")


def normal_(array, mean=0.0, std=1.0, rng=None):
    """Fill ``array`` with N(mean, std^2)."""
    return _fill(array, get_generator(rng).normal(mean, std, size=array.shape), "normal_")


def constant_(array, val):
    return _fill(array, val, "constant_")


def _kaiming_std(array, a, mode, nonlinearity):
    """gain / sqrt(fan) (0 for an empty fan, as torch warns and leaves the array)."""
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")
    fan_in, fan_out = calculate_fan_in_and_fan_out(array.shape)
    fan = fan_in if mode == "fan_in" else fan_out
    return calculate_gain(nonlinearity, a) / math.sqrt(fan) if fan > 0 else 0.0


def kaiming_uniform_(array, a=0.0, mode="fan_in", nonlinearity="leaky_relu", rng=None):
    """He et al. uniform init: U(-b, b), b = gain * sqrt(3 / fan).

    With a = sqrt(5) (PyTorch's default for Conv2d and Linear weights) this is
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    """
    bound = math.sqrt(3.0) * _kaiming_std(array, a, mode, nonlinearity)
    return uniform_(array, -bound, bound, rng)


def kaiming_normal_(array, a=0.0, mode="fan_in", nonlinearity="leaky_relu", rng=None):
    """He et al. normal init: N(0, std^2), std = gain / sqrt(fan)."""
    return normal_(array, 0.0, _kaiming_std(array, a, mode, nonlinearity), rng)


def _xavier_std(array, gain):
    fan_in, fan_out = calculate_fan_in_and_fan_out(array.shape)
    return gain * math.sqrt(2.0 / (fan_in + fan_out)) if fan_in + fan_out else 0.0


def xavier_uniform_(array, gain=1.0, rng=None):
    """Glorot & Bengio uniform init: U(-b, b), b = gain * sqrt(6 / (fan_in + fan_out))."""
    bound = math.sqrt(3.0) * _xavier_std(array, gain)
    return uniform_(array, -bound, bound, rng)


def xavier_normal_(array, gain=1.0, rng=None):
    """Glorot & Bengio normal init: N(0, std^2), std = gain * sqrt(2 / (fan_in + fan_out))."""
    return normal_(array, 0.0, _xavier_std(array, gain), rng)


def zeros_(array):
    return _fill(array, 0, "zeros_")


def ones_(array):
    return _fill(array, 1, "ones_")
