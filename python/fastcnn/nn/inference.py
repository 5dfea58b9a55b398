"""Inference without recording: what ``Sequential.forward(x, record=False)`` runs.

A forward that keeps nothing for a backward pass and records no activation
can run a model's layers as a few kernel calls: a convolution with the
batch norm, ReLU and 2x2 max-pool after it (the convolution's output is
pooled straight away, the normalised and ReLU'd values never written), a
fully connected layer with its ReLU applied in place, dropout (evaluation)
and flatten as nothing at all. Python then does per layer only what it must:
no argument parsing, no validation, no dispatch.

A plan is built for one input shape from a first forward through the
ordinary layer path (which validates every argument and raises the usual
errors) and is used again while the input shape and the layers stay the
same and no module has changed since (``module.state_version``: any
public attribute set, parameter data or buffer replaced, train() / eval()).
The arrays' contents are read on every call, so weights updated in place (an
optimizer step) take effect. Each step does the layers' arithmetic in the same
order (convolutions and linears through the same kernels; the pooling pass is
the training path's, bit-identical to the eval pool, the batch norm's affine
the eval kernel's), so the output is bitwise the layer path's.
"""

import numpy as np

from .. import _backend as B
from .. import functional as F
from .layers import BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU
from .module import state_version

__all__ = ["InferencePlan"]

_F32 = np.float32
_cpu = B._cpu


def _plain(layer):
    """Whether the kernels can take the layer's arrays as they are (float32,
    C-contiguous NumPy); others (converted by the layer path) go that way."""
    arrays = [p.data for p in layer._parameters.values() if p is not None]
    arrays += [b for b in layer._buffers.values() if b is not None and b.dtype.kind == "f"]
    return all(type(a) is np.ndarray and a.dtype == _F32 and a.flags.c_contiguous
               for a in arrays)


def _eval_batch_norm(layer):
    return (type(layer) is BatchNorm2d and not layer.training and layer.track_running_stats and
            _plain(layer))


# A step captures the arrays it reads (replacing one bumps the state version,
# so the plan is rebuilt); their contents are read on every call.

def _conv_step(conv, x):
    """conv2d as F.conv2d calls it (x: an input it validated), into a fresh array."""
    weight, bias = conv.weight.data, None if conv.bias is None else conv.bias.data
    g = F._geometry(F._ConvArgs, "conv2d", (x, weight, bias), conv._args())
    out_shape, kernel_args, padded = g.out_shape, g.kernel_args(), g.extra != (0, 0)

    def run(x):
        y = np.empty(out_shape, _F32)
        _cpu.conv2d_forward(g.batched(x) if padded else x, weight, bias, y, *kernel_args)
        return y
    return run


def _batch_norm_arrays(bn):
    return (*bn._affine(), bn.running_mean, bn.running_var)


def _affine_step(bn):
    """The batch norm's y = x * scale + shift, as the eval kernel computes it."""
    c, arrays, eps = bn.num_features, _batch_norm_arrays(bn), bn.eps

    def affine():
        scale, shift = np.empty(c, _F32), np.empty(c, _F32)
        _cpu.batch_norm_eval_affine(*arrays, eps, scale, shift)
        return scale, shift
    return affine


def _pool_step(relu, affine):
    """max_pool2d(relu(x * scale + shift), 2) in one pass (2x2 windows inside x)."""
    def run(x):
        n, c, h, w = x.shape
        y = np.empty((n, c, h // 2, w // 2), _F32)
        codes = np.empty(y.shape, np.uint8)
        _cpu.max_pool2d_2x2_codes_forward(x, y, codes, relu,
                                          *(affine() if affine is not None else (None, None)))
        return y
    return run


def _normalize_relu_step(bn, relu):
    """eval batch_norm (and ReLU), in place on an array the plan owns."""
    arrays, eps = _batch_norm_arrays(bn), bn.eps

    def run(x):
        n, c = x.shape[:2]
        _cpu.batch_norm_forward_eval(x, *arrays, x, n, c, x.size // max(n * c, 1), eps)
        if relu:
            _cpu.relu_forward(x, x)
        return x
    return run


def _linear_step(linear, relu):
    weight, out = linear.weight.data, linear.out_features
    bias = None if linear.bias is None else linear.bias.data

    def run(x):
        y = np.empty((x.shape[0], out), _F32)
        _cpu.linear_forward(x, weight, bias, y)
        if relu:
            _cpu.relu_forward(y, y)
        return y
    return run


class InferencePlan:
    """The steps of one recording-free forward through ``layers`` (Modules),
    built from an ordinary forward: ``inputs[i]`` the array layer i got
    (``inputs[0]`` float32, C-contiguous NumPy, the shape the plan is for)."""

    def __init__(self, layers, inputs):
        self.layers, self.shape = tuple(layers), inputs[0].shape
        self.steps = []
        self._build(self.layers, inputs)
        self.version = state_version()

    def matches(self, layers, x):
        """Whether this plan computes ``layers`` on ``x`` as built: the same
        input shape, the same layers, and no module changed since."""
        return (x.shape == self.shape and self.version == state_version() and
                tuple(layers) == self.layers)

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x

    def _build(self, layers, inputs):
        count = len(layers)

        def at(j, kind):
            return (j < count and type(layers[j]) is kind and not layers[j].training and
                    _plain(layers[j]))

        def pools(j):  # a 2x2 / stride-2 max-pool whose windows lie inside its input
            return (at(j, MaxPool2d) and layers[j].keeps_codes() and inputs[j].ndim == 4 and
                    min(inputs[j].shape[2:]) >= 2)

        def four_d(j):
            return type(inputs[j]) is np.ndarray and inputs[j].ndim == 4

        i = 0
        while i < count:
            layer = layers[i]
            if at(i, Conv2d) and four_d(i) and layer.explicit_pad() is None:
                self.steps.append(_conv_step(layer, inputs[i]))
                bn = layers[i + 1] if i + 1 < count and _eval_batch_norm(layers[i + 1]) else None
                j = i + 1 + (bn is not None)
                relu = at(j, ReLU)
                if relu and pools(j + 1):
                    self.steps.append(_pool_step(True, None if bn is None else _affine_step(bn)))
                    i = j + 2
                else:
                    if bn is not None or relu:
                        # the convolution's output is the plan's own: in place
                        self.steps.append(_conv_tail(bn, relu))
                    i = j + relu
            elif _eval_batch_norm(layer) and four_d(i) and at(i + 1, ReLU) and pools(i + 2):
                self.steps.append(_pool_step(True, _affine_step(layer)))
                i += 3
            elif at(i, ReLU) and pools(i + 1):
                self.steps.append(_pool_step(True, None))
                i += 2
            elif at(i, Linear) and type(inputs[i]) is np.ndarray and inputs[i].ndim == 2:
                relu = at(i + 1, ReLU)
                self.steps.append(_linear_step(layer, relu))
                i += 1 + relu
            elif at(i, Dropout):
                i += 1  # the identity in evaluation
            elif at(i, Flatten):
                self.steps.append(_reshape_step(inputs[i + 1].shape if i + 1 < count
                                                else layer.output_shape(inputs[i].shape)))
                i += 1
            else:
                # any other layer (or a mode or shape the steps above do not
                # take) runs its own forward
                self.steps.append(layer.forward)
                i += 1


def _conv_tail(bn, relu):
    if bn is not None:
        return _normalize_relu_step(bn, relu)

    def run(x):
        _cpu.relu_forward(x, x)
        return x
    return run


def _reshape_step(shape):
    def run(x):
        return x.reshape(shape)
    return run
