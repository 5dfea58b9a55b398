"""Parameter initialisation, as PyTorch's defaults, drawn from a seeded NumPy generator.

Every function fills a float32 array in place and takes ``rng``: a
``numpy.random.Generator``, an int seed, or None for the module-wide generator
that :func:`manual_seed` resets (it starts seeded with 0, so a fresh process
builds the same model every time).
"""

import math

import numpy as np

__all__ = ["manual_seed", "get_generator", "calculate_fan_in_and_fan_out",
           "calculate_gain", "kaiming_uniform_", "uniform_", "zeros_", "ones_"]

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
    """(fan_in, fan_out) of a weight of ``shape``: (out, in) or (out, in, *kernel)."""
    if len(shape) < 2:
        raise ValueError(f"fan in and fan out need a weight with at least 2 dimensions, "
                         f"got shape {tuple(shape)}")
    receptive_field = math.prod(shape[2:])
    return shape[1] * receptive_field, shape[0] * receptive_field


def calculate_gain(nonlinearity, param=None):
    """The recommended gain for ``nonlinearity`` (as torch.nn.init.calculate_gain)."""
    if nonlinearity in ("linear", "conv2d", "sigmoid"):
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else float(param)
        return math.sqrt(2.0 / (1 + slope ** 2))
    raise ValueError(f"unsupported nonlinearity {nonlinearity!r}")


def uniform_(array, low=0.0, high=1.0, rng=None):
    """Fill ``array`` with U(low, high)."""
    array[...] = get_generator(rng).uniform(low, high, size=array.shape)
    return array


def kaiming_uniform_(array, a=0.0, mode="fan_in", nonlinearity="leaky_relu", rng=None):
    """He et al. uniform init: U(-b, b), b = gain * sqrt(3 / fan).

    With a = sqrt(5) (PyTorch's default for Conv2d and Linear weights) this is
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    """
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")
    fan_in, fan_out = calculate_fan_in_and_fan_out(array.shape)
    fan = fan_in if mode == "fan_in" else fan_out
    bound = calculate_gain(nonlinearity, a) * math.sqrt(3.0 / fan) if fan > 0 else 0.0
    return uniform_(array, -bound, bound, rng)


def zeros_(array):
    array[...] = 0
    return array


def ones_(array):
    array[...] = 1
    return array
