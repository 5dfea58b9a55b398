"""Layers: thin Modules over ``fastcnn.functional``.

Each layer validates its constructor arguments, keeps what its backward needs
from the last forward (references, never copies), and accumulates parameter
gradients into ``param.grad``.
"""

import math

import numpy as np

from .. import _backend as B
from .. import capture
from .. import functional as F
from . import init
from .module import DECONVOLUTION, Module, Parameter

__all__ = ["Conv2d", "Linear", "ReLU", "MaxPool2d", "Flatten", "Dropout",
           "BatchNorm1d", "BatchNorm2d", "Softmax", "LogSoftmax"]


def _pair(value, name):
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair, got {value!r}")
        pair = tuple(value)
    else:
        pair = (value, value)
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return tuple(int(v) for v in pair)


def _positive(value, name):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _place(module, device, dtype):
    """torch's factory arguments of a layer with parameters: ``dtype`` float32 only
    (fastcnn's layers compute in float32), ``device`` 'cpu' or 'cuda' (moved there)."""
    if dtype is not None:
        try:
            ok = np.dtype(dtype) == np.float32
        except TypeError:
            ok = False
        if not ok:
            raise TypeError(f"{type(module).__name__}: dtype must be float32 (fastcnn's layers "
                            f"compute in float32), got {dtype!r}")
    if device is not None and str(device) != "cpu":
        module.to(device)


class _Deferred:
    """A cached forward value computed only if a backward pass asks for it
    (a batch norm's output that a fused pass never wrote)."""

    def __init__(self, compute, shape):
        self.compute, self.shape = compute, shape


def _weight_and_bias(layer):
    """A Conv2d's or Linear's weight Parameter and bias Parameter (or None), read
    from the registry at once rather than through Module.__getattr__ at each use
    (a dozen a training step)."""
    params = layer._parameters
    return params["weight"], params.get("bias")


def _data(param):
    return None if param is None else param.data


def _gemm_layer_backward(layer, grad_out, input_grad, backward, *args):
    """The backward of a Conv2d or Linear: ``backward(dy, x, w, b, *args,
    output_mask=...)`` for the gradients wanted, accumulated into the parameters;
    returns the input gradient (None when not wanted)."""
    x = _cached(layer, "_input")
    weight, bias = _weight_and_bias(layer)
    mask = (bool(input_grad), weight.requires_grad, bias is not None and bias.requires_grad)
    if not any(mask):
        return None
    dx, dw, db = backward(grad_out, x, weight.data, _data(bias), *args, output_mask=mask)
    weight.accumulate(dw)
    if bias is not None:
        bias.accumulate(db)
    return dx


def _cached(layer, attr):
    value = layer.__dict__.get(attr)
    if value is None:
        raise RuntimeError(f"{type(layer).__name__}.backward called before forward")
    if isinstance(value, _Deferred):
        value = value.compute()
        layer.__dict__[attr] = value
    return value


def _window_out(size, kernel, stride, pad_lo, pad_hi, dilation, ceil_mode=False):
    span = size + pad_lo + pad_hi - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad_lo:
        out -= 1
    if out < 1:
        raise ValueError(f"input size {size} is smaller than the kernel extent "
                         f"{dilation * (kernel - 1) + 1} (padding {pad_lo}+{pad_hi})")
    return out


#: Conv2d's padding modes -> F.pad's.
_PADDING_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate",
                  "circular": "circular"}


class Conv2d(Module):
    """2-D convolution over (N, C, H, W) input (torch.nn.Conv2d's arguments and init).

    padding: int, pair, 'valid' or 'same'. padding_mode: what the padding holds,
    torch's 'zeros' (the default), 'reflect', 'replicate' or 'circular' (the others
    pad the input with :func:`fastcnn.functional.pad` before a convolution without
    padding, as torch does). Weights and bias are drawn as PyTorch's defaults:
    kaiming_uniform_(a=sqrt(5)) and U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from ``rng``
    (a Generator, a seed, or None for ``fastcnn.nn.init``'s generator).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 dilation=1, groups=1, bias=True, padding_mode="zeros", device=None,
                 dtype=None, *, rng=None):
        super().__init__()
        self.in_channels = _positive(in_channels, "in_channels")
        self.out_channels = _positive(out_channels, "out_channels")
        self.groups = _positive(groups, "groups")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) "
                             f"must be divisible by groups ({groups})")
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        if isinstance(padding, str):
            if padding not in ("valid", "same"):
                raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', "
                                 f"got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' needs stride 1")
            self.padding = padding
        else:
            self.padding = _pair(padding, "padding")
        for name, v in (("kernel_size", self.kernel_size), ("stride", self.stride),
                        ("dilation", self.dilation)):
            if min(v) < 1:
                raise ValueError(f"{name} must be positive, got {v}")
        if not isinstance(self.padding, str) and min(self.padding) < 0:
            raise ValueError(f"padding must be non-negative, got {self.padding}")
        if not isinstance(padding_mode, str) or padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {tuple(_PADDING_MODES)}, got "
                             f"{padding_mode!r}")
        self.padding_mode = padding_mode
        self.weight = Parameter(np.empty((out_channels, in_channels // groups) + self.kernel_size,
                                         np.float32))
        self.bias = Parameter(np.empty(out_channels, np.float32)) if bias else None
        self.reset_parameters(rng)
        _place(self, device, dtype)

    def reset_parameters(self, rng=None):
        rng = init.get_generator(rng)
        init.kaiming_uniform_(self.weight.data, a=math.sqrt(5), rng=rng)
        if self.bias is not None:
            fan_in, _ = init.calculate_fan_in_and_fan_out(self.weight.shape)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            init.uniform_(self.bias.data, -bound, bound, rng)

    def paddings(self):
        """The padding before and after, ((top, left), (bottom, right))."""
        if self.padding == "same":
            lo = tuple(d * (k - 1) // 2 for k, d in zip(self.kernel_size, self.dilation))
            return lo, tuple(d * (k - 1) - p
                             for k, d, p in zip(self.kernel_size, self.dilation, lo))
        pads = (0, 0) if self.padding == "valid" else self.padding
        return pads, pads

    def explicit_pad(self):
        """F.pad's (left, right, top, bottom) when the padding is not zeros (the layer
        pads its input itself, then convolves without padding), else None."""
        if self.padding_mode == "zeros":
            return None
        (top, left), (bottom, right) = self.paddings()
        return (left, right, top, bottom) if top or left or bottom or right else None

    def _args(self):
        """The convolution's arguments after the input went through :meth:`_padded`."""
        padding = self.padding if self.explicit_pad() is None else (0, 0)
        return self.stride, padding, self.dilation, self.groups

    def _padded(self, x):
        """The input, padded by ``padding_mode`` when that is not zeros."""
        pads = self.explicit_pad()
        return x if pads is None else F.pad(x, pads, _PADDING_MODES[self.padding_mode])

    def forward(self, x):
        self._input = x = self._padded(x)
        weight, bias = _weight_and_bias(self)
        return F.conv2d(x, weight.data, _data(bias), *self._args())

    def forward_relu(self, x):
        """relu(forward(x)) in one op, the ReLU in the GEMM's epilogue (Sequential
        runs a Conv2d and the ReLU after it this way on the GPU)."""
        self._input = x = self._padded(x)
        weight, bias = _weight_and_bias(self)
        return F._conv2d(x, weight.data, _data(bias), *self._args(), True)

    def backward(self, grad_out, *, input_grad=True):
        dx = _gemm_layer_backward(self, grad_out, input_grad, F.conv2d_backward,
                                  *self._args())
        pads = self.explicit_pad()
        if dx is None or pads is None:
            return dx
        n, c, h, w = dx.shape
        left, right, top, bottom = pads
        return F.pad_backward(dx, (n, c, h - top - bottom, w - left - right), pads,
                              _PADDING_MODES[self.padding_mode])

    def backward_from_pool(self, grad_pooled, codes, *, input_grad=True):
        """Backward when this layer's output went through ReLU and a
        MaxPool2d(2) that kept window codes (see Sequential), straight from
        the pooled gradient: the parameter gradients only, so NotImplemented
        (nothing computed) when the input gradient is wanted or the fast path
        does not take the layer; else None (no input gradient)."""
        if input_grad:
            return NotImplemented
        x = _cached(self, "_input")
        weight, bias = _weight_and_bias(self)
        want_dw = weight.requires_grad
        want_db = bias is not None and bias.requires_grad
        if not (want_dw or want_db):
            return None
        grads = F._conv2d_grads_from_pool(grad_pooled, codes, x, weight.data, _data(bias),
                                          *self._args(), want_dw, want_db)
        if grads is None:
            return NotImplemented
        if want_dw:
            weight.accumulate(grads[0])
        if want_db:
            bias.accumulate(grads[1])
        return None

    def output_shape(self, input_shape):
        n, c, h, w = input_shape
        if c != self.in_channels:
            raise ValueError(f"Conv2d expects {self.in_channels} input channels, got shape "
                             f"{tuple(input_shape)}")
        (r, s), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        (top, left), (bottom, right) = self.paddings()
        return (n, self.out_channels, _window_out(h, r, sh, top, bottom, dh),
                _window_out(w, s, sw, left, right, dw))

    def get_config(self):
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups,
                "bias": self.bias is not None,
                **({} if self.padding_mode == "zeros" else {"padding_mode": self.padding_mode})}

    def extra_repr(self):
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode!r}"
        return text


class Linear(Module):
    """y = x W^T + b over (*, in_features) input (torch.nn.Linear's arguments and init)."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *,
                 rng=None):
        super().__init__()
        self.in_features = _positive(in_features, "in_features")
        self.out_features = _positive(out_features, "out_features")
        self.weight = Parameter(np.empty((out_features, in_features), np.float32))
        self.bias = Parameter(np.empty(out_features, np.float32)) if bias else None
        self.reset_parameters(rng)
        _place(self, device, dtype)

    def reset_parameters(self, rng=None):
        rng = init.get_generator(rng)
        init.kaiming_uniform_(self.weight.data, a=math.sqrt(5), rng=rng)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            init.uniform_(self.bias.data, -bound, bound, rng)

    def forward(self, x):
        self._input = x
        weight, bias = _weight_and_bias(self)
        return F.linear(x, weight.data, _data(bias))

    def forward_relu(self, x):
        """relu(forward(x)) in one op, the ReLU in the GEMM's epilogue (Sequential
        runs a Linear and the ReLU after it this way on the GPU)."""
        self._input = x
        weight, bias = _weight_and_bias(self)
        return F._linear(x, weight.data, _data(bias), True)

    def backward(self, grad_out, *, input_grad=True):
        return _gemm_layer_backward(self, grad_out, input_grad, F.linear_backward)

    def output_shape(self, input_shape):
        if input_shape[-1] != self.in_features:
            raise ValueError(f"Linear expects {self.in_features} input features, got shape "
                             f"{tuple(input_shape)}")
        return tuple(input_shape[:-1]) + (self.out_features,)

    def get_config(self):
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None}

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}"
                + ("" if self.bias is not None else ", bias=False"))


class ReLU(Module):
    """max(x, 0). With ``guided`` (or ``backward(g, guided=True)``) the backward pass
    uses the guided-backpropagation rule: gradient passes only where the forward
    input is > 0 *and* the incoming gradient is > 0. ``backward(g,
    guided="deconvolution")`` uses the deconvnet rule (Zeiler & Fergus): max(g, 0),
    whatever the forward input.

    ``inplace`` is torch's first argument, accepted so that ``ReLU(True)`` means
    what it does there; the output is always a new array (the layer keeps its
    input for the backward), which gives the same values."""

    accepts_guided = True
    # Sequential may run this ReLU and a MaxPool2d right after it as one op
    # (MaxPool2d.forward_after_relu) in training.
    fuses_into_pool = True

    def __init__(self, inplace=False, *, guided=False):
        super().__init__()
        self.inplace = bool(inplace)
        self.guided = bool(guided)

    def forward(self, x):
        self._input = x
        return F.relu(x)

    def backward(self, grad_out, *, input_grad=True, guided=None):
        rule = self.guided if guided is None else guided
        if isinstance(rule, str):
            if rule != DECONVOLUTION:
                raise ValueError(f"ReLU.backward: guided must be True, False, None or "
                                 f"{DECONVOLUTION!r}, got {rule!r}")
            return F.relu(grad_out)
        x = _cached(self, "_input")
        return F.relu_backward(grad_out, x, guided=bool(rule))

    def set_fused_forward(self, y):
        """Record a forward that the layer before ran with this ReLU (forward_relu):
        the backward's mask comes from the output y, which gives the same gradient
        as the input would, guided or not (y > 0 exactly where x > 0, y is NaN
        where x is, and y is +-0 where x <= 0)."""
        self._input = y

    def get_config(self):
        return {"guided": self.guided} if self.guided else {}


class MaxPool2d(Module):
    """Max pooling over (N, C, H, W) input (torch.nn.MaxPool2d's arguments, in its order).

    ``return_indices``: forward returns (output, indices), the argmax of each window
    as a flat index into its input plane (torch's); such a layer is for use on its
    own, as in torch, since the next layer would get the pair."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices=False,
                 ceil_mode=False):
        super().__init__()
        self.return_indices = bool(return_indices)
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        self.ceil_mode = bool(ceil_mode)
        if min(self.kernel_size + self.stride + self.dilation) < 1:
            raise ValueError("kernel_size, stride and dilation must be positive")
        if any(p < 0 or p > k // 2 for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(f"padding must be between 0 and half the kernel size, got "
                             f"padding={self.padding}, kernel_size={self.kernel_size}")

    def _args(self):
        return self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode

    def forward(self, x):
        return self._forward(x, F.max_pool2d, relu_first=False)

    def forward_after_relu(self, x):
        """``forward(relu(x))`` as one op, the ReLU'd ``x`` never written out:
        Sequential runs a ReLU and the MaxPool2d after it this way in training.
        ``backward_through_relu`` then gives the gradient w.r.t. ``x``."""
        return self._forward(x, F.relu_max_pool2d, relu_first=True)

    def _forward(self, x, pool, relu_first):
        # Argmaxes are kept for a training step's backward; in eval mode a
        # backward (visualisation) recomputes them, so inference skips them.
        # 2x2 / stride-2 pooling on the CPU keeps a byte per window instead
        # of an int64 index (with the ReLU's rule folded in).
        self._indices = self._codes = None
        fast = self.training and self.keeps_codes() and F._max_pool2d_2x2_codes(x, relu_first)
        if fast:
            out, self._codes = fast
        elif self.training or self.return_indices:
            out, self._indices = pool(x, *self._args(), return_indices=True)
        else:
            out = pool(x, *self._args())
        self._input = x
        self._relu_first = relu_first
        return (out, self._indices) if self.return_indices else out

    def backward(self, grad_out, *, input_grad=True):
        x = _cached(self, "_input")
        if self._relu_first:
            # The gradient w.r.t. this layer's own input, relu(x): the
            # indices are x's, which can differ from relu(x)'s where a window
            # holds no positive value, so the argmaxes are recomputed.
            return F.max_pool2d_backward(grad_out, F.relu(x), *self._args())
        if self._codes is not None:
            return F._max_pool2d_2x2_codes_backward(grad_out, self._codes, x.shape)
        return F._pool_backward_own_indices(grad_out, x, self._args(), self._indices, False)

    _CODES_ARGS = ((2, 2), (2, 2), (0, 0), (1, 1), False)

    def keeps_codes(self):
        """Whether a training forward here keeps window codes (2x2, stride 2)."""
        return self._args() == self._CODES_ARGS and not self.return_indices

    def set_fused_forward(self, x, codes):
        """Record a forward that a batch norm ran for this layer and the ReLU
        before it (see _BatchNorm.forward_relu_pool): x, the ReLU's input, may
        be a deferred value."""
        self._input, self._codes, self._indices, self._relu_first = x, codes, None, True

    def backward_through_relu(self, grad_out):
        """After ``forward_after_relu(x)``: the gradient w.r.t. ``x``."""
        x = self.__dict__.get("_input")
        if self._codes is not None and self._relu_first:  # x's shape is all it needs
            return F._max_pool2d_2x2_codes_backward(grad_out, self._codes, x.shape)
        x = _cached(self, "_input")
        if not self._relu_first:
            raise RuntimeError("MaxPool2d.backward_through_relu needs forward_after_relu first")
        if self._codes is not None:
            return F._max_pool2d_2x2_codes_backward(grad_out, self._codes, x.shape)
        return F._pool_backward_own_indices(grad_out, x, self._args(), self._indices, True)

    def output_shape(self, input_shape):
        *lead, h, w = input_shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (self.kernel_size, self.stride,
                                                  self.padding, self.dilation)
        return tuple(lead) + (_window_out(h, kh, sh, ph, ph, dh, self.ceil_mode),
                              _window_out(w, kw, sw, pw, pw, dw, self.ceil_mode))

    def get_config(self):
        config = {"kernel_size": list(self.kernel_size), "stride": list(self.stride),
                  "padding": list(self.padding), "dilation": list(self.dilation),
                  "ceil_mode": self.ceil_mode}
        if self.return_indices:
            config["return_indices"] = True
        return config

    def extra_repr(self):
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
                + (f", dilation={self.dilation}" if self.dilation != (1, 1) else "")
                + (", ceil_mode=True" if self.ceil_mode else ""))


class Flatten(Module):
    """Flattens dimensions start_dim..end_dim into one (a view, no copy)."""

    def __init__(self, start_dim=1, end_dim=-1):
        super().__init__()
        self.start_dim, self.end_dim = int(start_dim), int(end_dim)

    def _flat_shape(self, shape):
        ndim = len(shape)  # 0-d: flattened to (1,), as torch.flatten does
        start = B.normalize_dim(self.start_dim, ndim, "Flatten", "start_dim")
        end = B.normalize_dim(self.end_dim, ndim, "Flatten", "end_dim")
        if start > end:
            raise ValueError(f"Flatten: start_dim {self.start_dim} is after end_dim "
                             f"{self.end_dim} for input shape {tuple(shape)}")
        middle = None if None in shape[start:end + 1] else math.prod(shape[start:end + 1])
        return tuple(shape[:start]) + (middle,) + tuple(shape[end + 1:])

    def forward(self, x):
        self._input_shape = x.shape
        return x.reshape(self._flat_shape(x.shape))

    def backward(self, grad_out, *, input_grad=True):
        return grad_out.reshape(_cached(self, "_input_shape"))

    def output_shape(self, input_shape):
        return self._flat_shape(tuple(input_shape))

    def get_config(self):
        return {"start_dim": self.start_dim, "end_dim": self.end_dim}


class Dropout(Module):
    """Inverted dropout with a reproducible, counter-based mask.

    The mask of each training forward is drawn from (``seed``, ``offset``); the
    offset then advances by one, so the same seed gives the same sequence of
    masks. Both are buffers, saved with the model, so a resumed run continues
    the sequence. ``seed`` None draws one from ``fastcnn.nn.init``'s generator.
    ``inplace`` (torch's second argument) is accepted; the output is a new array.
    """

    optional_state = frozenset({"seed", "offset"})

    def __init__(self, p=0.5, inplace=False, *, seed=None):
        super().__init__()
        p = float(p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1], got {p}")
        self.p = p
        self.inplace = bool(inplace)
        if seed is None:
            seed = int(init.get_generator().integers(0, 2 ** 32))
        self.register_buffer("seed", np.array(int(seed), np.int64))
        self.register_buffer("offset", np.zeros((), np.int64))
        self._used = None

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self._used = None
            return x
        on_device = capture.dropout_offset(self)  # a graph being captured: a device slot
        if on_device is not None:
            self._used = int(self.seed), on_device
            return F._dropout_offset_on_device(x, self.p, int(self.seed), on_device)
        self._used = int(self.seed), int(self.offset)
        self.offset += 1
        seed, offset = self._used
        return F.dropout(x, self.p, training=True, seed=seed, offset=offset)

    def backward(self, grad_out, *, input_grad=True):
        if self._used is None:
            return grad_out
        seed, offset = self._used
        if not isinstance(offset, int):  # the device slot of a captured forward
            return F._dropout_offset_on_device(grad_out, self.p, seed, offset)
        return F.dropout_backward(grad_out, self.p, training=True, seed=seed, offset=offset)

    def get_config(self):
        return {"p": self.p}


class _BatchNorm(Module):
    _ndims = ()
    optional_state = frozenset({"num_batches_tracked"})

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None):
        super().__init__()
        self.num_features = _positive(num_features, "num_features")
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        if self.affine:
            self.weight = Parameter(np.ones(num_features, np.float32))
            self.bias = Parameter(np.zeros(num_features, np.float32))
        else:
            self.weight = self.bias = None
        if self.track_running_stats:
            self.register_buffer("running_mean", np.zeros(num_features, np.float32))
            self.register_buffer("running_var", np.ones(num_features, np.float32))
            self.register_buffer("num_batches_tracked", np.zeros((), np.int64))
        _place(self, device, dtype)

    def _stats(self):
        if not self.track_running_stats:
            return None, None
        return self.running_mean, self.running_var

    def _affine(self):
        return (None, None) if not self.affine else (self.weight.data, self.bias.data)

    def _check_input(self, x):
        if x.ndim not in self._ndims or x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) expects input of "
                             f"{' or '.join(f'{d}-D' for d in self._ndims)} with "
                             f"{self.num_features} channels, got shape {tuple(x.shape)}")

    def _step_momentum(self):
        """The momentum of this forward's running-statistics update (counting
        the batch when training)."""
        momentum = self.momentum if self.momentum is not None else 0.0
        if self.training and self.track_running_stats and not capture.batch_norm_count(self):
            self.num_batches_tracked += 1
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        return momentum

    def forward_relu_pool(self, x, relu, pool):
        """Training forward of this layer, the ReLU and the MaxPool2d(2) after
        it (Sequential in training) as one pass over the normalised values,
        which are never written (computed again, to the bit, only if a
        backward pass needs them). The pooled output, or NotImplemented where
        this path does not apply (nothing done then)."""
        if (not self.training or type(x) is not np.ndarray or x.ndim != 4 or
                min(x.shape[2:]) < 2 or not pool.keeps_codes()):
            return NotImplemented
        self._check_input(x)
        running_mean, running_var = self._stats()
        pooled, codes, mean, invstd, scale, shift = F._batch_norm_relu_max_pool2d_2x2(
            x, running_mean, running_var, *self._affine(), self._step_momentum(), self.eps)
        self._input, self._batch_stats, self._saved_stats = x, True, (mean, invstd)
        normalized = _Deferred(lambda: F._batch_norm_normalize(x, scale, shift), x.shape)
        relu._input = normalized
        pool.set_fused_forward(normalized, codes)
        return pooled

    def forward(self, x):
        self._check_input(x)
        batch_stats = self.training or not self.track_running_stats
        momentum = self._step_momentum()
        running_mean, running_var = self._stats()
        # The statistics the forward normalised with, kept so that backward
        # need not recompute them.
        out, mean, invstd = F._batch_norm_forward(x, running_mean, running_var, *self._affine(),
                                                  batch_stats, momentum, self.eps)
        self._input, self._batch_stats, self._saved_stats = x, batch_stats, (mean, invstd)
        return out

    def backward_from_pool(self, grad_pooled, codes, *, input_grad=True):
        """Backward when this layer's output went through ReLU and a
        MaxPool2d(2) that kept window codes (see Sequential), straight from
        the pooled gradient: returns the input gradient (None when not
        wanted), or NotImplemented (nothing computed) where this path does not
        apply (batch statistics only; 4-D NumPy input)."""
        x = _cached(self, "_input")
        if not self._batch_stats:
            return NotImplemented
        mean, invstd = self._saved_stats
        weight, bias = self._affine()
        grads = F._batch_norm_backward_from_pool(grad_pooled, codes, x, mean, invstd, weight,
                                                 bias, bool(input_grad))
        if grads is None:
            return NotImplemented
        dx, dw, db = grads
        if self.affine:
            self.weight.accumulate(dw)
            self.bias.accumulate(db)
        return dx

    def backward(self, grad_out, *, input_grad=True):
        x = _cached(self, "_input")
        running_mean, running_var = self._stats()
        mean, invstd = self._saved_stats if self._batch_stats else (None, None)
        dx, dw, db = F.batch_norm_backward(grad_out, x, running_mean, running_var,
                                           *self._affine(), training=self._batch_stats,
                                           eps=self.eps, save_mean=mean, save_invstd=invstd)
        if self.affine:
            self.weight.accumulate(dw)
            self.bias.accumulate(db)
        return dx

    def get_config(self):
        return {"num_features": self.num_features, "eps": self.eps, "momentum": self.momentum,
                "affine": self.affine, "track_running_stats": self.track_running_stats}

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")


class BatchNorm1d(_BatchNorm):
    """Batch normalisation over (N, C) or (N, C, L) input."""
    _ndims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch normalisation over (N, C, H, W) input, per channel."""
    _ndims = (4,)


def _dim_of(layer, y):
    """The axis a Softmax / LogSoftmax layer's forward took (its implicit one,
    without warning again, where ``dim`` is None)."""
    return F._implicit_dim(type(layer).__name__, y.ndim, warn=False) if layer.dim is None \
        else layer.dim


class Softmax(Module):
    """softmax along ``dim``; None (the default, as torch) is PyTorch's implicit
    choice, per input: see :func:`fastcnn.functional.softmax`."""

    def __init__(self, dim=None):
        super().__init__()
        self.dim = None if dim is None else int(dim)

    def forward(self, x):
        self._output = F.softmax(x, dim=self.dim)
        return self._output

    def backward(self, grad_out, *, input_grad=True):
        y = _cached(self, "_output")
        return F.softmax_backward(grad_out, y, dim=_dim_of(self, y))

    def get_config(self):
        return {"dim": self.dim}


class LogSoftmax(Module):
    """log(softmax) along ``dim``, computed stably; ``dim`` as :class:`Softmax`."""

    def __init__(self, dim=None):
        super().__init__()
        self.dim = None if dim is None else int(dim)

    def forward(self, x):
        self._output = F.log_softmax(x, dim=self.dim)
        return self._output

    def backward(self, grad_out, *, input_grad=True):
        y = _cached(self, "_output")
        return F.log_softmax_backward(grad_out, y, dim=_dim_of(self, y))

    def get_config(self):
        return {"dim": self.dim}
