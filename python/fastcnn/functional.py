"""The NumPy-compatible functional API.

Names and argument order follow ``torch.nn.functional``; every op has a
``*_backward`` that returns the gradients in argument order. NumPy arrays (or
array-likes) in, float32 NumPy arrays out; see ``fastcnn._backend`` for the
dtype rule. Every function validates its arguments first and raises
``ValueError`` / ``TypeError`` naming the argument and the shapes.
"""
from __future__ import annotations

import math
import numbers
import warnings
from contextlib import contextmanager

import numpy as np

from . import _backend as B
from ._backend import shape_str

__all__ = [
    "conv2d", "conv2d_backward", "linear", "linear_backward", "relu", "relu_backward",
    "max_pool2d", "max_pool2d_backward", "relu_max_pool2d", "relu_max_pool2d_backward", "softmax", "softmax_backward", "log_softmax",
    "log_softmax_backward", "cross_entropy", "cross_entropy_backward", "batch_norm",
    "batch_norm_backward", "dropout", "dropout_mask", "dropout_backward", "normalize",
    "pad", "pad_backward", "matmul", "manual_seed",
]

_F32 = np.float32


def _empty(xp, shape):
    return xp.empty(shape, dtype=_F32)


# --------------------------------------------------- validated geometries --

_GEOMETRIES = {}


_PLAIN_TYPES = frozenset((int, bool, str, type(None)))


def _plain(value):
    """An exact int, bool, str or None, or a tuple of exact ints: hashable, and
    equal only to values that validate the same way (2.0 == 2 but is refused)."""
    kind = type(value)
    if kind is tuple:
        for v in value:
            if type(v) is not int:
                return False
        return True
    return kind in _PLAIN_TYPES


def _geometry(cls, op, arrays, params):
    """``cls(op, *arrays, *params)``: the validated geometry of a call, which
    depends only on the arrays' shapes and the parameters, so repeated calls
    (every layer, every step) reuse it. Failures are never stored: a bad
    call raises every time."""
    for p in params:
        if not _plain(p):
            return cls(op, *arrays, *params)
    key = (cls, op, tuple([None if a is None else a.shape for a in arrays]), params,
           tuple(map(type, params)))
    g = _GEOMETRIES.get(key)
    if g is None:
        g = cls(op, *arrays, *params)
        if len(_GEOMETRIES) >= 1024:
            _GEOMETRIES.clear()
        _GEOMETRIES[key] = g
    return g


# ----------------------------------------------------------------- conv2d --

class _ConvArgs:
    """Validated geometry of one conv2d call (shared by forward and backward)."""

    def __init__(self, op, x, w, b, stride, padding, dilation, groups):
        B.check_ndim(x, (3, 4), "input", op, "3-D (C, H, W) or 4-D (N, C, H, W)")
        B.check_ndim(w, (4,), "weight", op, "4-D (out_channels, in_channels/groups, kH, kW)")
        self.unbatched = x.ndim == 3
        shapes = f"input shape {shape_str(x.shape)}, weight shape {shape_str(w.shape)}"
        if self.unbatched:
            x = x[None]
        n, c, h, wd = x.shape
        k, cg, r, s = w.shape
        self.groups = groups = B.as_int(groups, "groups")
        if groups < 1:
            raise ValueError(f"{op}: groups must be >= 1, got {groups}")
        self.stride = B.pair(stride, "stride")
        self.dilation = B.pair(dilation, "dilation")
        B.check_positive(self.stride, "stride", op)
        B.check_positive(self.dilation, "dilation", op)
        if c == 0 or k == 0 or cg == 0 or r == 0 or s == 0:
            raise ValueError(f"{op}: input and weight must have at least one channel and a "
                             f"non-empty kernel; {shapes}")
        if c % groups != 0:
            raise ValueError(f"{op}: input channels ({c}) are not divisible by groups={groups}; "
                             f"{shapes}")
        if k % groups != 0:
            raise ValueError(f"{op}: weight's out_channels ({k}) are not divisible by "
                             f"groups={groups}; {shapes}")
        if cg * groups != c:
            raise ValueError(f"{op}: weight has {cg} input channels per group but input has {c} "
                             f"channels (groups={groups}, so weight.shape[1] must be "
                             f"{c // groups}); {shapes}")
        if b is not None and b.shape != (k,):
            raise ValueError(f"{op}: bias must have shape ({k},) to match weight "
                             f"{shape_str(w.shape)}, got {shape_str(b.shape)}")
        # Extra zero rows / columns at the bottom / right, for padding='same'
        # with an even kernel span (PyTorch puts the odd pixel there too).
        self.extra = (0, 0)
        if isinstance(padding, str):
            if padding == "valid":
                self.padding = (0, 0)
            elif padding == "same":
                if self.stride != (1, 1):
                    raise ValueError(f"{op}: padding='same' requires stride 1, got stride "
                                     f"{self.stride}")
                total = (self.dilation[0] * (r - 1), self.dilation[1] * (s - 1))
                self.padding = (total[0] // 2, total[1] // 2)
                self.extra = (total[0] % 2, total[1] % 2)
            else:
                raise ValueError(f"{op}: padding must be an int, a pair, 'valid' or 'same', "
                                 f"got {padding!r}")
        else:
            self.padding = B.pair(padding, "padding")
            B.check_non_negative(self.padding, "padding", op)
        span = (self.dilation[0] * (r - 1) + 1, self.dilation[1] * (s - 1) + 1)
        padded = (h + 2 * self.padding[0] + self.extra[0], wd + 2 * self.padding[1] + self.extra[1])
        if span[0] > padded[0] or span[1] > padded[1]:
            raise ValueError(f"{op}: kernel (dilated size {span}) is larger than the padded input "
                             f"{padded}; {shapes}, padding {self.padding}, "
                             f"dilation {self.dilation}")
        self.in_shape = x.shape
        self.out_shape = (n, k,
                          (padded[0] - span[0]) // self.stride[0] + 1,
                          (padded[1] - span[1]) // self.stride[1] + 1)

    def batched(self, x):
        x = x[None] if self.unbatched else x
        if self.extra != (0, 0):
            xp = B.array_module(x)
            x = xp.pad(x, ((0, 0), (0, 0), (0, self.extra[0]), (0, self.extra[1])))
        return x

    def kernel_args(self):
        return (*self.stride, *self.padding, *self.dilation, self.groups)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution (cross-correlation), as ``torch.nn.functional.conv2d``.

    input (N, C, H, W) or (C, H, W); weight (K, C/groups, R, S); bias (K,) or
    None. stride, padding, dilation: an int or a pair; padding may also be
    'valid' or 'same'. Returns (N, K, OH, OW) (or (K, OH, OW) when unbatched).
    """
    return _conv2d(input, weight, bias, stride, padding, dilation, groups, False)


def _conv2d(input, weight, bias, stride, padding, dilation, groups, relu):
    """conv2d, followed by a ReLU when ``relu`` (in the GPU GEMM's epilogue)."""
    xp, K = B.dispatch(input, weight, bias)
    x = B.as_float(input, "input", xp)
    w = B.as_float(weight, "weight", xp)
    b = B.as_optional_float(bias, "bias", xp)
    g = _geometry(_ConvArgs, "conv2d", (x, w, b), (stride, padding, dilation, groups))
    y = _empty(xp, g.out_shape)
    if y.size:
        K.conv2d_forward(g.batched(x), w, b, y, *g.kernel_args(), relu)
    return y[0] if g.unbatched else y


def conv2d_backward(grad_output, input, weight, bias=None, stride=1, padding=0, dilation=1,
                    groups=1, output_mask=(True, True, True)):
    """Gradients of :func:`conv2d`: ``(grad_input, grad_weight, grad_bias)``.

    grad_bias is None when bias is None; an entry is None where
    ``output_mask`` is False (skip the first layer's grad_input, say).
    """
    xp, K = B.dispatch(grad_output, input, weight, bias)
    x = B.as_float(input, "input", xp)
    w = B.as_float(weight, "weight", xp)
    b = B.as_optional_float(bias, "bias", xp)
    g = _geometry(_ConvArgs, "conv2d_backward", (x, w, b), (stride, padding, dilation, groups))
    dy = B.as_float(grad_output, "grad_output", xp)
    expected = g.out_shape[1:] if g.unbatched else g.out_shape
    if dy.shape != expected:
        raise ValueError(f"conv2d_backward: grad_output has shape {shape_str(dy.shape)}, expected "
                         f"the output shape {shape_str(expected)}")
    want_dx, want_dw, want_db = _output_mask(output_mask, "conv2d_backward")
    xb = g.batched(x)
    dx = _empty(xp, xb.shape) if want_dx else None
    dw = _empty(xp, w.shape) if want_dw else None
    db = _empty(xp, w.shape[:1]) if (want_db and b is not None) else None
    if dy.size:
        K.conv2d_backward(dy[None] if g.unbatched else dy, xb, w, dx, dw, db,
                                             *g.kernel_args())
    else:
        for grad in (dx, dw, db):
            if grad is not None:
                grad.fill(0)
    if dx is not None:
        if g.extra != (0, 0):
            dx = xp.ascontiguousarray(dx[:, :, :g.in_shape[2], :g.in_shape[3]])
        if g.unbatched:
            dx = dx[0]
    return dx, dw, db


# ----------------------------------------------------------------- linear --

def _output_mask(mask, op):
    """(want grad_input, grad_weight, grad_bias) from a 3-sequence of flags."""
    flags = tuple(mask) if isinstance(mask, (tuple, list)) else ()
    if len(flags) != 3:
        raise ValueError(f"{op}: output_mask must be three flags (grad_input, grad_weight, "
                         f"grad_bias), got {mask!r}")
    return tuple(bool(m) for m in flags)


def _linear_args(op, x, w, b):
    B.check_ndim(w, (2,), "weight", op, "2-D (out_features, in_features)")
    if x.ndim < 1:
        raise ValueError(f"{op}: input must have at least 1 dimension (*, in_features), got a "
                         "0-d array")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"{op}: input has {x.shape[-1]} features (last dimension) but weight "
                         f"expects {w.shape[1]}; input shape {shape_str(x.shape)}, weight shape "
                         f"{shape_str(w.shape)}")
    if b is not None and b.shape != (w.shape[0],):
        raise ValueError(f"{op}: bias must have shape ({w.shape[0]},) to match weight "
                         f"{shape_str(w.shape)}, got {shape_str(b.shape)}")


def _rows(x):
    """The rows of an (*, features) array (not -1: features may be 0)."""
    return math.prod(x.shape[:-1])


def linear(input, weight, bias=None):
    """y = input @ weight.T + bias. input (*, in_features), weight (out, in), bias (out,)."""
    return _linear(input, weight, bias, False)


def _linear(input, weight, bias, relu):
    """linear, followed by a ReLU when ``relu`` (in the GPU GEMM's epilogue)."""
    xp, K = B.dispatch(input, weight, bias)
    x = B.as_float(input, "input", xp)
    w = B.as_float(weight, "weight", xp)
    b = B.as_optional_float(bias, "bias", xp)
    _linear_args("linear", x, w, b)
    x2 = x.reshape(_rows(x), w.shape[1])
    y = _empty(xp, (x2.shape[0], w.shape[0]))
    if y.size:
        K.linear_forward(x2, w, b, y, relu)
    return y.reshape(x.shape[:-1] + (w.shape[0],))


def linear_backward(grad_output, input, weight, bias=None, output_mask=(True, True, True)):
    """Gradients of :func:`linear`: ``(grad_input, grad_weight, grad_bias)``
    (grad_bias None when bias is None; an entry is None where ``output_mask``
    is False)."""
    xp, K = B.dispatch(grad_output, input, weight, bias)
    x = B.as_float(input, "input", xp)
    w = B.as_float(weight, "weight", xp)
    b = B.as_optional_float(bias, "bias", xp)
    _linear_args("linear_backward", x, w, b)
    dy = B.as_float(grad_output, "grad_output", xp)
    expected = x.shape[:-1] + (w.shape[0],)
    if dy.shape != expected:
        raise ValueError(f"linear_backward: grad_output has shape {shape_str(dy.shape)}, expected "
                         f"{shape_str(expected)}")
    want_dx, want_dw, want_db = _output_mask(output_mask, "linear_backward")
    x2 = x.reshape(_rows(x), w.shape[1])
    dx = _empty(xp, x2.shape) if want_dx else None
    dw = _empty(xp, w.shape) if want_dw else None
    db = _empty(xp, w.shape[:1]) if (want_db and b is not None) else None
    K.linear_backward(dy.reshape(x2.shape[0], w.shape[0]), x2, w, dx, dw, db)
    return (None if dx is None else dx.reshape(x.shape)), dw, db


# ------------------------------------------------------------------- relu --

def relu(input):
    """max(input, 0), elementwise (NaN stays NaN)."""
    xp, K = B.dispatch(input)
    x = B.as_float(input, "input", xp)
    y = _empty(xp, x.shape)
    K.relu_forward(x, y)
    return y


def relu_backward(grad_output, input, guided=False):
    """Gradient of :func:`relu`: grad_output where input > 0, else 0.

    guided=True applies guided backpropagation's rule: the gradient also has
    to be positive to pass (Springenberg et al., 2015).
    """
    xp, K = B.dispatch(grad_output, input)
    x = B.as_float(input, "input", xp)
    dy = B.as_float(grad_output, "grad_output", xp)
    B.check_same_shape(dy, x, "grad_output", "input", "relu_backward")
    dx = _empty(xp, x.shape)
    K.relu_backward(dy, x, bool(guided), dx)
    return dx


# ------------------------------------------------------------- max_pool2d --

class _PoolArgs:
    def __init__(self, op, x, kernel_size, stride, padding, dilation, ceil_mode):
        B.check_ndim(x, (3, 4), "input", op, "3-D (C, H, W) or 4-D (N, C, H, W)")
        self.unbatched = x.ndim == 3
        if self.unbatched:
            x = x[None]
        self.kernel = B.pair(kernel_size, "kernel_size")
        self.stride = self.kernel if stride is None or (
            isinstance(stride, (tuple, list)) and len(stride) == 0) else B.pair(stride, "stride")
        self.padding = B.pair(padding, "padding")
        self.dilation = B.pair(dilation, "dilation")
        B.check_positive(self.kernel, "kernel_size", op)
        B.check_positive(self.stride, "stride", op)
        B.check_positive(self.dilation, "dilation", op)
        B.check_non_negative(self.padding, "padding", op)
        if any(2 * p > k for p, k in zip(self.padding, self.kernel)):
            raise ValueError(f"{op}: padding {self.padding} must be at most half the kernel_size "
                             f"{self.kernel}")
        n, c, h, w = x.shape
        if h == 0 or w == 0:
            raise ValueError(f"{op}: input has an empty spatial size; shape {shape_str(x.shape)}")
        out = [self._out_size(size, k, s, p, d, bool(ceil_mode)) for size, k, s, p, d in
               zip((h, w), self.kernel, self.stride, self.padding, self.dilation)]
        if out[0] < 1 or out[1] < 1:
            raise ValueError(f"{op}: kernel_size {self.kernel} (dilation {self.dilation}) is larger "
                             f"than the padded input; input shape {shape_str(x.shape)}, padding "
                             f"{self.padding}")
        self.out_shape = (n, c, out[0], out[1])
        self.in_size = (h, w)

    def has_empty_windows(self):
        """Whether a window lies wholly in the padding (output -inf, index -1).
        Only dilation can cause it: with padding <= kernel / 2 an undilated
        window always holds an input position."""
        if self.dilation == (1, 1):
            return False
        return any(
            not any(0 <= o * s - p + i * d < size for i in range(k))
            for size, k, s, p, d, n_out in zip(self.in_size, self.kernel, self.stride,
                                                self.padding, self.dilation, self.out_shape[2:])
            for o in range(n_out))

    @staticmethod
    def _out_size(size, k, s, p, d, ceil_mode):
        """torch's pooling_output_shape: < 1 when no window fits (in ceil mode the last
        window may run past the input, even a window longer than the input)."""
        room = size + 2 * p - d * (k - 1) - 1
        out = (-(-room // s) if ceil_mode else room // s) + 1
        if ceil_mode and (out - 1) * s >= size + p:
            out -= 1
        return out

    def kernel_args(self):
        return (*self.kernel, *self.stride, *self.padding, *self.dilation)


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """2-D max pooling, as ``torch.nn.functional.max_pool2d``.

    The first maximum of a window wins ties; NaN wins over numbers. With
    ``return_indices`` also returns int64 indices into each input plane
    (h * W + w), as PyTorch; a window lying wholly in the padding (possible
    with dilation) gives -inf and index -1.
    """
    return _max_pool2d("max_pool2d", input, kernel_size, stride, padding, dilation, ceil_mode,
                       return_indices, False)


def _max_pool2d(op, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices,
                relu):
    xp, K = B.dispatch(input)
    x = B.as_float(input, "input", xp)
    g = _geometry(_PoolArgs, op, (x,), (kernel_size, stride, padding, dilation, ceil_mode))
    xb = x[None] if g.unbatched else x
    y = _empty(xp, g.out_shape)
    idx = xp.empty(g.out_shape, dtype=np.int64) if return_indices else None
    if y.size:
        K.max_pool2d_forward(xb, y, idx, *g.kernel_args(), relu)
    if g.unbatched:
        y = y[0]
        idx = idx[0] if idx is not None else None
    return (y, idx) if return_indices else y


def max_pool2d_backward(grad_output, input, kernel_size, stride=None, padding=0, dilation=1,
                        ceil_mode=False, indices=None):
    """Gradient of :func:`max_pool2d`: each output gradient goes to its
    window's argmax (given by ``indices`` or recomputed from ``input``)."""
    return _pool_backward("max_pool2d_backward", grad_output, input, kernel_size, stride,
                          padding, dilation, ceil_mode, indices, False)


def relu_max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                    return_indices=False):
    """``max_pool2d(relu(input), ...)`` as one op (``relu(max_pool2d(input))``, but -inf for
    a window wholly in the padding, as ``max_pool2d(relu(input))`` gives there):
    the ReLU'd input is never written out. ``indices`` are those of
    ``max_pool2d(input)``; pass them, with ``input``, to
    :func:`relu_max_pool2d_backward`. fastcnn.nn.Sequential runs a ReLU
    followed by a MaxPool2d this way in training."""
    return _max_pool2d("relu_max_pool2d", input, kernel_size, stride, padding, dilation,
                       ceil_mode, return_indices, True)


def relu_max_pool2d_backward(grad_output, input, kernel_size, stride=None, padding=0,
                             dilation=1, ceil_mode=False, indices=None):
    """Gradient of :func:`relu_max_pool2d` w.r.t. its input: a window's
    gradient goes to its argmax where the input there is > 0."""
    return _pool_backward("relu_max_pool2d_backward", grad_output, input, kernel_size, stride,
                          padding, dilation, ceil_mode, indices, True)


def _pool_backward_own_indices(grad_output, input, args, indices, relu):
    """(relu_)max_pool2d_backward for fastcnn.nn.MaxPool2d, with the indices its
    own forward returned: they are valid by construction, so on the GPU they are
    not range-checked (a check there waits for the GPU, twice, every step)."""
    op = "relu_max_pool2d_backward" if relu else "max_pool2d_backward"
    return _pool_backward(op, grad_output, input, *args, indices, relu, check_indices=False)


def _max_pool2d_2x2_codes(input, relu):
    """A training step's 2x2 / stride-2 max-pool (after a ReLU when ``relu``)
    on the CPU: ``(y, codes)`` with one uint8 per window (its winning tap and
    whether the gradient passes) in place of int64 indices, for
    :func:`_max_pool2d_2x2_codes_backward`. None where that path does not
    apply (not a 3-D / 4-D float32 NumPy array with 2 x 2 windows inside it):
    the caller then takes :func:`max_pool2d` / :func:`relu_max_pool2d`."""
    if type(input) is not np.ndarray or input.dtype != _F32 or input.ndim not in (3, 4):
        return None
    h, w = input.shape[-2:]
    if h < 2 or w < 2:
        return None
    x = np.ascontiguousarray(input)
    xb = x[None] if x.ndim == 3 else x
    y = np.empty(xb.shape[:2] + (h // 2, w // 2), _F32)
    codes = np.empty(y.shape, np.uint8)
    B._cpu.max_pool2d_2x2_codes_forward(xb, y, codes, bool(relu))
    return (y[0], codes[0]) if x.ndim == 3 else (y, codes)


def _max_pool2d_2x2_codes_backward(grad_output, codes, input_shape):
    """The input gradient of :func:`_max_pool2d_2x2_codes` from its codes."""
    dy = B.as_float(grad_output, "grad_output", np)
    if dy.shape != codes.shape:
        raise ValueError(f"max_pool2d_backward: grad_output has shape {shape_str(dy.shape)}, "
                         f"expected the output shape {shape_str(codes.shape)}")
    dx = np.empty(input_shape, _F32)
    unbatched = len(input_shape) == 3
    B._cpu.max_pool2d_2x2_codes_backward(dy[None] if unbatched else dy,
                                         codes[None] if unbatched else codes,
                                         dx[None] if unbatched else dx)
    return dx


def _conv2d_grads_from_pool(grad_pooled, codes, input, weight, bias, stride, padding,
                            dilation, groups, want_dw, want_db):
    """The weight and bias gradients of a convolution whose output went
    through ReLU and :func:`_max_pool2d_2x2_codes`, from the pooled gradient
    and the codes, the output gradient never written: ``(dw, db)`` (None
    where not wanted), or None when the CPU's direct first-layer path does
    not take the layer. The same bits as :func:`conv2d_backward` on the
    gradient :func:`_max_pool2d_2x2_codes_backward` would give."""
    if type(input) is not np.ndarray or input.ndim != 4 or codes.ndim != 4:
        return None
    x = B.as_float(input, "input", np)
    w = B.as_float(weight, "weight", np)
    b = B.as_optional_float(bias, "bias", np)
    g = _geometry(_ConvArgs, "conv2d_backward", (x, w, b), (stride, padding, dilation, groups))
    if g.extra != (0, 0):
        return None
    dp = B.as_float(grad_pooled, "grad_output", np)
    dw = np.empty(w.shape, _F32) if want_dw else None
    db = np.empty(w.shape[:1], _F32) if (want_db and b is not None) else None
    if not B._cpu.conv2d_grads_from_pool(dp, codes, x, w, dw, db, *g.kernel_args()):
        return None
    return dw, db


def _batch_norm_backward_from_pool(grad_pooled, codes, input, save_mean, save_invstd, weight,
                                   bias, want_dx):
    """The training backward of a batch norm whose output went through ReLU
    and :func:`_max_pool2d_2x2_codes`, from the pooled gradient and the codes,
    the output gradient never written: ``(dx, dw, db)`` (dx None unless
    wanted; dw / db None without weight / bias), or None where this path does
    not apply (not a 4-D NumPy input). The same bits as
    :func:`batch_norm_backward` on the gradient
    :func:`_max_pool2d_2x2_codes_backward` would give."""
    if type(input) is not np.ndarray or input.ndim != 4 or codes.ndim != 4:
        return None
    x = B.as_float(input, "input", np)
    c = x.shape[1]
    w = B.as_optional_float(weight, "weight", np)
    dp = B.as_float(grad_pooled, "grad_output", np)
    dx = np.empty(x.shape, _F32) if want_dx else None
    dw = np.empty((c,), _F32) if w is not None else None
    db = np.empty((c,), _F32) if bias is not None else None
    B._cpu.batch_norm_backward_from_pool(dp, codes, x, B.as_float(save_mean, "save_mean", np),
                                         B.as_float(save_invstd, "save_invstd", np), w, dx,
                                         dw, db)
    return dx, dw, db


def _pool_backward(op, grad_output, input, kernel_size, stride, padding, dilation, ceil_mode,
                   indices, relu, check_indices=True):
    xp, K = B.dispatch(grad_output, input, indices)
    x = B.as_float(input, "input", xp)
    g = _geometry(_PoolArgs, op, (x,), (kernel_size, stride, padding, dilation, ceil_mode))
    dy = B.as_float(grad_output, "grad_output", xp)
    expected = g.out_shape[1:] if g.unbatched else g.out_shape
    if dy.shape != expected:
        raise ValueError(f"{op}: grad_output has shape {shape_str(dy.shape)}, "
                         f"expected the output shape {shape_str(expected)}")
    idx = None
    plane = x.shape[-1] * x.shape[-2]
    low = -1 if g.has_empty_windows() else 0

    def bad_indices():
        return ValueError(f"{op}: indices must lie in [{low}, {plane}) (H * W of "
                          f"input {shape_str(x.shape)})")

    if indices is not None:
        idx = B.as_labels(indices, "indices", xp, what="an integer dtype (pooling indices)")
        if idx.shape != dy.shape:
            raise ValueError(f"{op}: indices have shape {shape_str(idx.shape)}, "
                             f"expected {shape_str(dy.shape)}")
    xb = x[None] if g.unbatched else x
    dx = _empty(xp, xb.shape)
    if dy.size:
        dyb = dy[None] if g.unbatched else dy
        idxb = None if idx is None else (idx[None] if g.unbatched else idx)
        if xp is np:
            # The CPU kernel checks the indices in the pass that uses them.
            if K.max_pool2d_backward(dyb, xb, idxb, dx, *g.kernel_args(), relu, low):
                raise bad_indices()
        else:
            # An index outside the plane would match no pixel (the kernel gathers by
            # comparison), so the check is for the error message, not for memory safety.
            if (check_indices and idx is not None and idx.size and
                    (int(idx.min()) < low or int(idx.max()) >= plane)):
                raise bad_indices()
            K.max_pool2d_backward(dyb, xb, idxb, dx, *g.kernel_args(), relu)
    else:
        dx.fill(0)
    return dx[0] if g.unbatched else dx


# --------------------------------------------------------------- softmax --

def _implicit_dim(op, ndim, warn=True):
    """PyTorch's choice where ``dim`` is None: 0 for 0-, 1- and 3-D input, else 1
    (rows of a (N, C) batch, channels of an image batch), with a warning where
    that is not the last axis."""
    dim = 0 if ndim in (0, 1, 3) else 1
    if warn and ndim >= 3:
        warnings.warn(f"{op}: no dim given, so dim={dim} for a {ndim}-D input (PyTorch's "
                      f"implicit choice: 0 for 0-, 1- and 3-D input, 1 otherwise); pass dim= "
                      f"to choose", UserWarning, stacklevel=5)
    return dim


def _softmax_view(op, shape, dim):
    if dim is None:
        dim = _implicit_dim(op, len(shape))
    d = B.normalize_dim(dim, len(shape), op)
    shape = shape if len(shape) else (1,)
    return (math.prod(shape[:d]), shape[d], math.prod(shape[d + 1:]))


def _softmax(op, input, dim, log):
    xp, K = B.dispatch(input)
    x = B.as_float(input, "input", xp)
    y = _empty(xp, x.shape)
    view = _softmax_view(op, x.shape, dim)
    if x.size:
        K.softmax_forward(x, y, *view, log)
    return y


def _softmax_grad(op, grad_output, output, dim, log):
    xp, K = B.dispatch(grad_output, output)
    y = B.as_float(output, "output", xp)
    dy = B.as_float(grad_output, "grad_output", xp)
    B.check_same_shape(dy, y, "grad_output", "output", op)
    dx = _empty(xp, y.shape)
    view = _softmax_view(op, y.shape, dim)  # checks dim, as the forward does, for empty input too
    if y.size:
        K.softmax_backward(dy, y, dx, *view, log)
    return dx


def softmax(input, dim=None):
    """exp(x) / sum(exp(x)) along ``dim`` (numerically stable). ``dim=None`` is
    PyTorch's implicit choice: the last axis of 1-D and 2-D input, axis 0 of 3-D
    input, axis 1 (channels) of 4-D input, with a warning for 3-D and more."""
    return _softmax("softmax", input, dim, False)


def log_softmax(input, dim=None):
    """x - log(sum(exp(x))) along ``dim`` (numerically stable); ``dim=None`` as
    :func:`softmax`."""
    return _softmax("log_softmax", input, dim, True)


def softmax_backward(grad_output, output, dim=None):
    """Gradient of :func:`softmax`, from the forward's *output*."""
    return _softmax_grad("softmax_backward", grad_output, output, dim, False)


def log_softmax_backward(grad_output, output, dim=None):
    """Gradient of :func:`log_softmax`, from the forward's *output*."""
    return _softmax_grad("log_softmax_backward", grad_output, output, dim, True)


# ----------------------------------------------------------- cross-entropy --

_REDUCTIONS = ("none", "mean", "sum")


def _raise_bad_target(op, t, bad, classes, ignore_index):
    value = int(t[bad].ravel()[0])
    raise ValueError(f"{op}: target contains {value}, outside [0, {classes}) (input has "
                     f"{classes} classes; ignore_index={ignore_index})")


class _CrossEntropyArgs:
    """Logits as (rows, classes) and targets as (rows,), from torch's layouts:
    (N, C) with (N,), (C,) with (), or (N, C, d1, ...) with (N, d1, ...)."""

    def __init__(self, op, x, t, reduction, ignore_index, label_smoothing, on_host=True):
        if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
            raise ValueError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.ignore_index = B.as_int(ignore_index, "ignore_index")
        self.label_smoothing = float(label_smoothing)
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
        if x.ndim < 1:
            raise ValueError(f"{op}: input must be (N, C), (C,) or (N, C, d1, ...), got a 0-d array")
        expected = x.shape[:1] + x.shape[2:] if x.ndim >= 2 else ()
        if t.shape != expected:
            raise ValueError(f"{op}: target has shape {shape_str(t.shape)}, expected "
                             f"{shape_str(expected)} for input of shape {shape_str(x.shape)}")
        classes = x.shape[1] if x.ndim >= 2 else x.shape[0]
        if classes == 0:
            raise ValueError(f"{op}: input has no classes; shape {shape_str(x.shape)}")
        self.op = op
        self.reduction = reduction
        self.classes = classes
        self.input_shape = x.shape
        self.target_shape = t.shape
        self.valid = None  # GPU arrays: counted on the device (cross_entropy_total's status)
        if on_host:
            if (self.bad_targets(t)).any():
                self.raise_bad_target(t)
            self.valid = int((t != self.ignore_index).sum())

    def bad_targets(self, t):
        return (t != self.ignore_index) & ((t < 0) | (t >= self.classes))

    def raise_bad_target(self, t):
        _raise_bad_target(self.op, t, self.bad_targets(t), self.classes, self.ignore_index)

    def rows(self, x):
        if x.ndim == 1:
            return x[None]
        if x.ndim == 2:
            return x
        xp = B.array_module(x)
        return xp.ascontiguousarray(xp.moveaxis(x, 1, -1).reshape(-1, self.classes))

    def unrows(self, dx):
        if len(self.input_shape) == 1:
            return dx[0]
        if len(self.input_shape) == 2:
            return dx
        n, c, *rest = self.input_shape
        xp = B.array_module(dx)
        return xp.ascontiguousarray(xp.moveaxis(dx.reshape(n, *rest, c), -1, 1))


def cross_entropy(input, target, weight=None, reduction="mean", ignore_index=-100,
                  label_smoothing=0.0):
    """Cross-entropy of logits against integer class labels, fused with log-softmax.

    As ``torch.nn.functional.cross_entropy`` with class-index targets:
    ``weight`` (one per class) scales each target's term; reduction 'mean' (over
    non-ignored targets, weighted: divided by the sum of their classes' weights),
    'sum' or 'none'; targets equal to ``ignore_index`` contribute nothing;
    ``label_smoothing`` mixes the target with the uniform distribution.

    Or, as torch, with class probabilities: a float ``target`` shaped like
    ``input`` (soft labels, mixup, distillation): -sum_c w_c y_c log softmax(x)_c
    per row ('mean': over the rows; an ``ignore_index`` other than the default is an
    error, as in torch).
    """
    return _cross_entropy(input, target, reduction, ignore_index, label_smoothing, weight)[0]


def _class_weights(weight, a, xp):
    w = B.as_float(weight, "weight", xp)
    if w.shape != (a.classes,):
        raise ValueError(f"{a.op}: weight must have one value per class, shape ({a.classes},); "
                         f"got shape {shape_str(w.shape)}")
    return w.astype(np.float64)


def _weighted_terms(a, rows, t, w, xp):
    """Class-weighted cross-entropy, as torch computes it, in float64: the rows'
    losses, the sum of their targets' weights (the mean's divisor), and the
    softmax, target rows and weights the gradient needs."""
    logp = _softmax("log_softmax", rows, 1, True).astype(np.float64)
    valid = t != a.ignore_index
    target = xp.where(valid, t, 0)
    weights = w[target] * valid                      # w[t_i], 0 where ignored
    n = rows.shape[0]
    loss = (1.0 - a.label_smoothing) * -logp[xp.arange(n), target] * weights
    if a.label_smoothing:
        loss += (a.label_smoothing / a.classes) * -(logp * w).sum(axis=1) * valid
    return loss, weights.sum(), (logp, valid, target, weights)


def _check_weighted_targets(a, t, xp):
    """The class-weighted path's target check (on the GPU: one wait, as
    _check_gpu_targets; none while captured or for targets checked on the host)."""
    from . import capture

    if xp is np or capture.recording() is not None or _targets_checked_on_host:
        return  # (NumPy targets were checked by _CrossEntropyArgs)
    if bool(a.bad_targets(t).any()):
        a.raise_bad_target(t)


def _probability_targets(x, target, xp, ignore_index):
    """``target`` as float64 class probabilities when it is a float array shaped like
    the logits ``x`` (else None: class indices). As torch, such targets take no
    ``ignore_index``."""
    dtype = getattr(target, "dtype", None)
    if dtype is None or np.dtype(dtype).kind != "f" or tuple(target.shape) != tuple(x.shape):
        return None
    if not (isinstance(ignore_index, (int, np.integer)) and ignore_index == -100):
        raise ValueError(f"cross_entropy: ignore_index is not supported for class-probability "
                         f"(float) targets, got ignore_index={ignore_index!r}")
    return B.as_float(target, "target", xp).astype(np.float64)


class _SoftArgs(_CrossEntropyArgs):
    """_CrossEntropyArgs for probability targets: their shape is the input's."""

    def __init__(self, op, x, reduction, label_smoothing):
        super().__init__(op, x, np.zeros(x.shape[:1] + x.shape[2:] if x.ndim >= 2 else ()),
                         reduction, -100, label_smoothing, on_host=False)


def _soft_terms(a, rows, y, w):
    """The rows' losses -sum_c w_c y_c log p_c (y smoothed), float64, and what the
    gradient needs: p and the weighted targets."""
    logp = _softmax("log_softmax", rows, 1, True).astype(np.float64)
    if a.label_smoothing:
        y = y * (1.0 - a.label_smoothing) + a.label_smoothing / a.classes
    if w is not None:
        y = y * w
    return -(y * logp).sum(axis=1), logp, y


def _soft_cross_entropy(x, y, reduction, label_smoothing, weight, xp):
    a = _SoftArgs("cross_entropy", x, reduction, label_smoothing)
    w = None if weight is None else _class_weights(weight, a, xp)
    loss, _, _ = _soft_terms(a, a.rows(x), a.rows(y), w)
    if reduction == "none":
        return loss.astype(_F32).reshape(a.target_shape)
    total = loss.sum()
    if reduction == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            total = total / loss.shape[0]
    return xp.asarray(total, dtype=_F32)


def _soft_cross_entropy_backward(grad_output, x, y, reduction, label_smoothing, weight, xp):
    a = _SoftArgs("cross_entropy_backward", x, reduction, label_smoothing)
    w = None if weight is None else _class_weights(weight, a, xp)
    _, logp, yw = _soft_terms(a, a.rows(x), a.rows(y), w)
    scale = _grad_scale(grad_output, a, xp, logp.shape[0])
    grad = (xp.exp(logp) * yw.sum(axis=1, keepdims=True) - yw) * scale
    return a.unrows(xp.ascontiguousarray(grad.astype(_F32)))


def _cross_entropy(input, target, reduction, ignore_index, label_smoothing, weight=None):
    """(loss, status): status is the GPU's target counts (for
    :func:`_cross_entropy_backward`), None on the CPU."""
    xp, K = B.dispatch(input, target, weight)
    x = B.as_float(input, "input", xp)
    y = _probability_targets(x, target, xp, ignore_index)
    if y is not None:
        return _soft_cross_entropy(x, y, reduction, label_smoothing, weight, xp), None
    t = B.as_labels(target, "target", xp)
    a = _CrossEntropyArgs("cross_entropy", x, t, reduction, ignore_index, label_smoothing,
                          on_host=xp is np)
    rows = a.rows(x)
    if weight is not None:
        w = _class_weights(weight, a, xp)
        _check_weighted_targets(a, t, xp)
        loss, total_weight, _ = _weighted_terms(a, rows, t.reshape(-1), w, xp)
        if reduction == "none":
            return loss.astype(_F32).reshape(a.target_shape), None
        total = loss.sum()
        if reduction == "mean":
            with np.errstate(invalid="ignore", divide="ignore"):
                total = total / total_weight  # NaN when no target counts, as torch
        return xp.asarray(total, dtype=_F32), None
    if xp is not np:
        # Two launches and one wait for the GPU (the target check): the loss, its
        # sum and the mean's divisor stay on the device.
        status = xp.empty(3, np.int64)
        tflat = t.reshape(-1)
        if reduction == "none":
            K.cross_entropy_total(rows, tflat, a.ignore_index, a.label_smoothing, False, None,
                                  status)
            _check_gpu_targets(a, t, status)
            loss = _empty(xp, rows.shape[:1])
            if rows.shape[0]:
                K.cross_entropy_forward(rows, tflat, a.ignore_index, a.label_smoothing, loss)
            return loss.reshape(a.target_shape), status
        loss = _empty(xp, ())
        K.cross_entropy_total(rows, tflat, a.ignore_index, a.label_smoothing,
                              reduction == "mean", loss, status)
        _check_gpu_targets(a, t, status)
        return loss, status
    loss = _empty(xp, rows.shape[:1])
    if rows.shape[0]:
        K.cross_entropy_forward(rows, t.reshape(-1), a.ignore_index,
                                           a.label_smoothing, loss)
    if reduction == "none":
        return loss.reshape(a.target_shape), None
    total = loss.sum(dtype=np.float64)
    if reduction == "mean":
        total = total / a.valid if a.valid else xp.asarray(np.nan)
    return total.astype(_F32), None


_targets_checked_on_host = False  # see _checked_targets()


@contextmanager
def _checked_targets(target, classes, ignore_index=-100):
    """Check class labels on the host, then, inside the block, let cross-entropy on
    the GPU skip its own check of them (a wait for the GPU): what a training loop
    whose labels come from the host does (fastcnn.train.Trainer). Raises the
    ValueError cross_entropy would raise."""
    global _targets_checked_on_host
    t = np.asarray(target)
    bad = (t != ignore_index) & ((t < 0) | (t >= classes))
    if bad.any():
        _raise_bad_target("cross_entropy", t, bad, classes, ignore_index)
    saved, _targets_checked_on_host = _targets_checked_on_host, True
    try:
        yield
    finally:
        _targets_checked_on_host = saved


def _check_gpu_targets(a, t, status):
    """Raise for targets out of range, from the device's counts (one wait for the GPU).
    Not while a graph is captured (fastcnn.capture checks each replay's targets), nor
    for targets checked on the host (_checked_targets)."""
    from . import capture

    if (capture.recording() is None and not _targets_checked_on_host and
            int(status[1].get())):
        a.raise_bad_target(t)


def cross_entropy_backward(grad_output, input, target, weight=None, reduction="mean",
                           ignore_index=-100, label_smoothing=0.0):
    """Gradient of :func:`cross_entropy` with respect to the logits; the forward's
    arguments in the forward's order, after grad_output.

    grad_output is a scalar for 'mean' / 'sum' and shaped like target for 'none'.
    """
    if isinstance(weight, str):
        raise TypeError(f"cross_entropy_backward: weight must be per-class weights or None, got "
                        f"{weight!r}; the arguments follow cross_entropy's order (input, target, "
                        f"weight, reduction, ...)")
    return _cross_entropy_backward(grad_output, input, target, reduction, ignore_index,
                                   label_smoothing, weight=weight)


def _grad_scale(grad_output, a, xp, divisor):
    """grad_output as each row's factor (float64): (rows, 1) for 'none', a scalar for
    'sum', over ``divisor`` for 'mean' (NaN when it is 0, as torch)."""
    g = B.as_float(grad_output, "grad_output", xp)
    if a.reduction == "none":
        if g.shape != a.target_shape:
            raise ValueError(f"cross_entropy_backward: grad_output has shape "
                             f"{shape_str(g.shape)}, expected {shape_str(a.target_shape)} "
                             f"(reduction='none')")
        return g.reshape(-1, 1).astype(np.float64)
    if g.size != 1:
        raise ValueError(f"cross_entropy_backward: grad_output must be a scalar for "
                         f"reduction={a.reduction!r}, got shape {shape_str(g.shape)}")
    scale = g.reshape(()).astype(np.float64)
    if a.reduction == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = scale / divisor
    return scale


def _weighted_backward(grad_output, a, rows, t, w, xp):
    """d loss / d logits of the class-weighted cross-entropy (float64, as the forward)."""
    _, total_weight, (logp, valid, target, weights) = _weighted_terms(a, rows, t, w, xp)
    scale = _grad_scale(grad_output, a, xp, total_weight)
    p = xp.exp(logp)
    n = rows.shape[0]
    grad = (1.0 - a.label_smoothing) * weights[:, None] * p
    grad[xp.arange(n), target] -= (1.0 - a.label_smoothing) * weights
    if a.label_smoothing:
        grad += (a.label_smoothing / a.classes) * valid[:, None] * (w.sum() * p - w)
    with np.errstate(invalid="ignore"):
        grad *= scale
    grad = xp.where(valid[:, None], grad, 0.0)  # ignored rows: 0 (all ignored too, as torch)
    return a.unrows(xp.ascontiguousarray(grad.astype(_F32)))


def _cross_entropy_backward(grad_output, input, target, reduction, ignore_index,
                            label_smoothing, status=None, weight=None):
    """status: what :func:`_cross_entropy` returned for these targets, if known (the
    GPU then neither recounts nor rechecks them)."""
    xp, K = B.dispatch(grad_output, input, target, weight)
    x = B.as_float(input, "input", xp)
    y = _probability_targets(x, target, xp, ignore_index)
    if y is not None:
        return _soft_cross_entropy_backward(grad_output, x, y, reduction, label_smoothing,
                                            weight, xp)
    t = B.as_labels(target, "target", xp)
    a = _CrossEntropyArgs("cross_entropy_backward", x, t, reduction, ignore_index,
                          label_smoothing, on_host=xp is np)
    rows = a.rows(x)
    if weight is not None:
        w = _class_weights(weight, a, xp)
        if status is None:
            _check_weighted_targets(a, t, xp)
        return _weighted_backward(grad_output, a, rows, t.reshape(-1), w, xp)
    if xp is not np:
        if status is None:
            status = xp.empty(3, np.int64)
            K.cross_entropy_total(rows, t.reshape(-1), a.ignore_index, a.label_smoothing, False,
                                  None, status)
            _check_gpu_targets(a, t, status)
        if reduction != "none":
            # A Python number is passed as it is, a device scalar by pointer: no transfer.
            if isinstance(grad_output, (int, float, np.number, np.bool_)):
                g, value = None, float(grad_output)
            else:
                g, value = B.as_float(grad_output, "grad_output", xp), 0.0
                if g.size != 1:
                    raise ValueError(f"cross_entropy_backward: grad_output must be a scalar for "
                                     f"reduction={reduction!r}, got shape {shape_str(g.shape)}")
            dx = _empty(xp, rows.shape)
            if rows.shape[0]:
                K.cross_entropy_backward_scalar(rows, t.reshape(-1), a.ignore_index,
                                                a.label_smoothing, reduction == "mean", g, value,
                                                status, dx)
            return a.unrows(dx)
    g = B.as_float(grad_output, "grad_output", xp)
    if reduction == "none":
        if g.shape != a.target_shape:
            raise ValueError(f"cross_entropy_backward: grad_output has shape {shape_str(g.shape)}, "
                             f"expected {shape_str(a.target_shape)} (reduction='none')")
        scale = g.reshape(-1)
    else:
        if g.size != 1:
            raise ValueError(f"cross_entropy_backward: grad_output must be a scalar for "
                             f"reduction={reduction!r}, got shape {shape_str(g.shape)}")
        value = float(g.reshape(()))
        if reduction == "mean":
            value = value / a.valid if a.valid else math.nan
        scale = xp.full(rows.shape[0], value, dtype=_F32)
    dx = _empty(xp, rows.shape)
    if rows.shape[0]:
        K.cross_entropy_backward(rows, t.reshape(-1), a.ignore_index,
                                            a.label_smoothing, xp.ascontiguousarray(scale), dx)
    return a.unrows(dx)


# ------------------------------------------------------------- batch norm --

class _BatchNormArgs:
    def __init__(self, op, x, running_mean, running_var, weight, bias):
        if x.ndim < 2:
            raise ValueError(f"{op}: input must be (N, C), (N, C, L) or (N, C, H, W), got shape "
                             f"{shape_str(x.shape)}")
        n, c = x.shape[:2]
        if c == 0:
            raise ValueError(f"{op}: input has no channels; shape {shape_str(x.shape)}")
        self.view = (n, c, math.prod(x.shape[2:]))
        if (running_mean is None) != (running_var is None):
            given = "running_mean" if running_var is None else "running_var"
            raise ValueError(f"{op}: running_mean and running_var go together (both arrays, or "
                             f"both None for no running statistics); got only {given}")
        for name, arr in (("running_mean", running_mean), ("running_var", running_var),
                          ("weight", weight), ("bias", bias)):
            if arr is not None and np.shape(arr) != (c,):
                raise ValueError(f"{op}: {name} must have shape ({c},) for input of shape "
                                 f"{shape_str(x.shape)}, got {shape_str(np.shape(arr))}")

    def check_batch(self, op, shape):
        n, _, l = self.view
        if n * l == 1:  # torch's rule: an empty batch gives an empty output
            raise ValueError(f"{op}: expected more than 1 value per channel when training, got "
                             f"input of shape {shape_str(shape)}")


def _stat_buffer(arr, name, xp):
    """A float32 C-contiguous array the kernel may update in place, and
    whether it must be copied back into ``arr`` afterwards."""
    if arr is None:
        return None, False
    if not isinstance(arr, xp.ndarray) or not getattr(arr.flags, "writeable", True):
        raise TypeError(f"batch_norm: {name} must be a writable array on the input's device: it "
                        "is updated in place in training mode")
    if arr.dtype.kind != "f":
        raise TypeError(f"batch_norm: {name} must be a floating-point array: it is updated in "
                        f"place in training mode; got dtype {arr.dtype}")
    if arr.dtype == _F32 and arr.flags.c_contiguous:
        return arr, False
    return B.as_float(arr, name, xp).copy(), True


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """Batch normalisation, as ``torch.nn.functional.batch_norm``.

    input (N, C), (N, C, L) or (N, C, H, W). In training mode the batch's
    statistics normalise, and running_mean / running_var (if given) are
    updated in place: r = (1 - momentum) r + momentum * stat, with the
    unbiased variance. In eval mode the running statistics normalise.
    """
    out, _, _ = _batch_norm_forward(input, running_mean, running_var, weight, bias, training,
                                    momentum, eps)
    return out


def _batch_norm_forward(input, running_mean, running_var, weight, bias, training, momentum,
                        eps):
    """batch_norm plus the batch statistics it normalised with: (out, mean, invstd),
    the statistics None in eval mode (a backward then derives them from the
    running statistics)."""
    xp, K = B.dispatch(input, running_mean, running_var, weight, bias)
    op = "batch_norm"
    x = B.as_float(input, "input", xp)
    w = B.as_optional_float(weight, "weight", xp)
    b = B.as_optional_float(bias, "bias", xp)
    a = _BatchNormArgs(op, x, running_mean, running_var, w, b)
    eps = _batch_norm_eps(eps, training, op)
    y = _empty(xp, x.shape)
    c = a.view[1]
    if training:
        mean, invstd = _empty(xp, (c,)), _empty(xp, (c,))
        _batch_norm_train_stats(K, a, x, running_mean, running_var, w, b, momentum, eps,
                                xp, y, mean, invstd)
        return y, mean, invstd
    if running_mean is None or running_var is None:
        raise ValueError(f"{op}: running_mean and running_var are required when training=False")
    rm = B.as_float(running_mean, "running_mean", xp)
    rv = B.as_float(running_var, "running_var", xp)
    if x.size:
        K.batch_norm_forward_eval(x, w, b, rm, rv, y, *a.view, eps)
    return y, None, None


def _batch_norm_eps(eps, training, op):
    """eps as a float: > 0 in training (torch's rule: a constant channel would divide
    by zero), >= 0 in eval mode."""
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{op}: eps must be a number, got {eps!r}")
    eps = float(eps)
    if not (eps > 0 if training else eps >= 0) or not math.isfinite(eps):
        raise ValueError(f"{op}: eps must be {'positive during training' if training else '>= 0'}"
                         f" and finite, got {eps}")
    return eps


def _batch_norm_train_stats(K, a, x, running_mean, running_var, w, b, momentum, eps, xp, y,
                            mean, invstd, scale=None, shift=None):
    """The training forward's kernel call: batch statistics into mean /
    invstd, running statistics updated in place, y normalised (or, with y
    None, scale / shift of the normalisation y = x * scale + shift)."""
    a.check_batch("batch_norm", x.shape)
    if isinstance(momentum, (bool, np.bool_)) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"batch_norm: momentum must be a number, got {momentum!r} (a cumulative "
                        "average, momentum=None, needs the batch count: "
                        "nn.BatchNorm2d(momentum=None) keeps it)")
    momentum = float(momentum)
    rm, copy_rm = _stat_buffer(running_mean, "running_mean", xp)
    rv, copy_rv = _stat_buffer(running_var, "running_var", xp)
    if not x.size:  # an empty batch: nothing to normalise, the running statistics stay
        for stat in (mean, invstd) if scale is None else (mean, invstd, scale, shift):
            stat[...] = 0
        return
    extra = () if scale is None else (scale, shift)  # CPU only
    K.batch_norm_forward_train(x, w, b, rm, rv, y, mean, invstd, *a.view, eps, momentum, *extra)
    if copy_rm:
        running_mean[...] = rm
    if copy_rv:
        running_var[...] = rv


def _batch_norm_relu_max_pool2d_2x2(input, running_mean, running_var, weight, bias, momentum,
                                    eps):
    """Training ``max_pool2d(relu(batch_norm(input)), 2)`` on the CPU in one
    pass over the normalised values, which are never written:
    ``(pooled, codes, mean, invstd, scale, shift)`` (codes as
    :func:`_max_pool2d_2x2_codes`; the normalisation is input * scale +
    shift, see :func:`_batch_norm_normalize`), or None where this path does
    not apply (not a 4-D float NumPy input with 2 x 2 windows)."""
    if type(input) is not np.ndarray or input.ndim != 4 or min(input.shape[2:]) < 2:
        return None
    x = B.as_float(input, "input", np)
    w = B.as_optional_float(weight, "weight", np)
    b = B.as_optional_float(bias, "bias", np)
    a = _BatchNormArgs("batch_norm", x, running_mean, running_var, w, b)
    eps = float(eps)
    if eps < 0:
        raise ValueError(f"batch_norm: eps must be >= 0, got {eps}")
    n, c, h, wd = x.shape
    mean, invstd, scale, shift = (np.empty((c,), _F32) for _ in range(4))
    _batch_norm_train_stats(B._cpu, a, x, running_mean, running_var, w, b, momentum, eps, np,
                            None, mean, invstd, scale, shift)
    pooled = np.empty((n, c, h // 2, wd // 2), _F32)
    codes = np.empty(pooled.shape, np.uint8)
    B._cpu.max_pool2d_2x2_codes_forward(x, pooled, codes, True, scale, shift)
    return pooled, codes, mean, invstd, scale, shift


def _batch_norm_normalize(input, scale, shift):
    """input * scale + shift per channel (dim 1) of a float32 CPU array: the
    training batch norm's output, to the bit, from its scale and shift."""
    y = np.empty(input.shape, _F32)
    B._cpu.batch_norm_normalize(input, scale, shift, y, input.shape[0], input.shape[1],
                                math.prod(input.shape[2:]))
    return y


def batch_norm_backward(grad_output, input, running_mean, running_var, weight=None, bias=None,
                        training=False, *, eps=1e-5, save_mean=None, save_invstd=None):
    """Gradients of :func:`batch_norm`: ``(grad_input, grad_weight, grad_bias)``.

    grad_weight / grad_bias are None when weight / bias are None. In training
    mode the batch statistics are recomputed from ``input`` unless the
    forward's ``save_mean`` / ``save_invstd`` are passed; in eval mode the
    running statistics are used. ``eps`` and after are keyword-only: the
    forward's ``momentum`` has no part here, and its place would take ``eps``.
    """
    xp, K = B.dispatch(grad_output, input, running_mean, running_var, weight, bias, save_mean,
                       save_invstd)
    op = "batch_norm_backward"
    x = B.as_float(input, "input", xp)
    w = B.as_optional_float(weight, "weight", xp)
    b = B.as_optional_float(bias, "bias", xp)
    a = _BatchNormArgs(op, x, running_mean, running_var, w, b)
    dy = B.as_float(grad_output, "grad_output", xp)
    B.check_same_shape(dy, x, "grad_output", "input", op)
    eps = _batch_norm_eps(eps, training, op)
    n, c, l = a.view
    if training:
        a.check_batch(op, x.shape)
        if save_mean is None or save_invstd is None:
            # The forward's own statistics, computed the same way.
            _, mean, invstd = _batch_norm_forward(x, None, None, None, None, True, 0.0, eps)
        else:
            mean = B.as_float(save_mean, "save_mean", xp)
            invstd = B.as_float(save_invstd, "save_invstd", xp)
    else:
        if running_mean is None or running_var is None:
            raise ValueError(f"{op}: running_mean and running_var are required when "
                             "training=False")
        mean = B.as_float(running_mean, "running_mean", xp)
        invstd = (1.0 / xp.sqrt(B.as_float(running_var, "running_var", xp).astype(np.float64)
                                + eps)).astype(_F32)
    for name, arr in (("save_mean", mean), ("save_invstd", invstd)):
        if arr.shape != (c,):
            raise ValueError(f"{op}: {name} must have shape ({c},), got {shape_str(arr.shape)}")
    dx = _empty(xp, x.shape)
    dw = _empty(xp, (c,)) if w is not None else None
    db = _empty(xp, (c,)) if b is not None else None
    if not x.size:  # an empty batch: no gradient to pass, none to accumulate
        for grad in (dw, db):
            if grad is not None:
                grad[...] = 0
        return dx, dw, db
    K.batch_norm_backward(dy, x, mean, invstd, w, bool(training), dx, dw, db, *a.view)
    return dx, dw, db


# ---------------------------------------------------------------- dropout --

_seed_source = np.random.default_rng()


def manual_seed(seed):
    """Seed the generator that draws dropout seeds when none is given."""
    global _seed_source
    _seed_source = np.random.default_rng(B.seed_value(seed))


def _check_p(op, p):
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{op}: p must be in [0, 1], got {p}")
    return p


def dropout(input, p=0.5, training=True, seed=None, offset=0):
    """Inverted dropout: each element is zeroed with probability ``p`` and the
    rest scaled by 1 / (1 - p) (``p`` = 1: ``input * 0``, as PyTorch's).

    The mask comes from a counter-based generator (Philox4x32-10) keyed by
    ``seed`` and ``offset``: the same (seed, offset, shape) gives the same mask
    on any number of threads (and on the GPU). :func:`dropout_backward` with
    the same seed and offset applies the same mask. ``seed=None`` draws one
    from the generator set by :func:`manual_seed`. Returns a copy of the
    input when ``training`` is False or ``p`` is 0.
    """
    xp, K = B.dispatch(input)
    x = B.as_float(input, "input", xp)
    p = _check_p("dropout", p)
    if not training or p == 0.0:
        return x.copy() if x is input else x
    seed = int(_seed_source.integers(0, 2**63)) if seed is None else B.seed_value(seed)
    y = _empty(xp, x.shape)
    K.dropout_apply(x, y, p, seed, B.seed_value(offset, "offset"))
    return y


def _dropout_offset_on_device(input, p, seed, offset_on_device):
    """dropout (training) with the offset read from a 1-element int64 GPU array when
    the kernel runs (fastcnn.capture: a graph replayed with a new offset each step);
    applied to a gradient, it is dropout_backward."""
    xp, K = B.dispatch(input, offset_on_device)
    x = B.as_float(input, "input", xp)
    y = _empty(xp, x.shape)
    K.dropout_apply(x, y, _check_p("dropout", p), B.seed_value(seed), 0,
                    offset_on_device=offset_on_device)
    return y


def dropout_mask(shape, p, seed, offset=0, device="cpu"):
    """The multiplier :func:`dropout` applies: 0 or 1 / (1 - p) (all 0 for p = 1), float32, as a
    NumPy array (``device="cpu"``) or a CuPy array (``device="cuda"``)."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"dropout_mask: device must be 'cpu' or 'cuda', got {device!r}")
    xp, K = B._cuda_kernels() if device == "cuda" else (np, B._cpu)
    p = _check_p("dropout_mask", p)
    dims = (shape,) if np.ndim(shape) == 0 else tuple(shape)
    dims = tuple(B.as_int(d, "shape") for d in dims)
    if any(d < 0 for d in dims):
        raise ValueError(f"dropout_mask: shape must be non-negative, got {dims}")
    y = _empty(xp, dims)
    K.dropout_apply(None, y, p, B.seed_value(seed), B.seed_value(offset, "offset"))
    return y


def dropout_backward(grad_output, p=0.5, training=True, seed=None, offset=0):
    """Gradient of :func:`dropout`: grad_output times the same mask (the same
    ``seed`` and ``offset`` as the forward)."""
    xp, K = B.dispatch(grad_output)
    dy = B.as_float(grad_output, "grad_output", xp)
    p = _check_p("dropout_backward", p)
    if not training or p == 0.0:
        return dy.copy() if dy is grad_output else dy
    if seed is None:
        raise ValueError("dropout_backward: seed is required (the seed the forward used)")
    dx = _empty(xp, dy.shape)
    K.dropout_apply(dy, dx, p, B.seed_value(seed), B.seed_value(offset, "offset"))
    return dx


# -------------------------------------------------------------- normalize --

_NORMALIZE_STATS = {}


def _flat(v):
    return tuple(v) if isinstance(v, tuple) else (v,)


def _hashable_numbers(*values):
    """Python ints/floats or tuples of them: the statistics a call passes
    each batch, whose validated float32 arrays are kept (never mutated)."""
    return all(type(e) in (int, float) for v in values for e in _flat(v))


def _normalize_stats(op, mean, std, c, d, shape):
    m = B.as_float(mean, "mean").reshape(-1)
    s = B.as_float(std, "std").reshape(-1)
    for name, arr in (("mean", m), ("std", s)):
        if arr.size not in (1, c):
            raise ValueError(f"{op}: {name} has {arr.size} values but input has {c} channels "
                             f"along dim {d}; input shape {shape_str(shape)}")
    if np.any(s == 0) or not np.all(np.isfinite(s)):
        raise ValueError(f"{op}: std must be finite and non-zero, got {s.tolist()}")
    return (np.ascontiguousarray(np.broadcast_to(m, (c,))),
            np.ascontiguousarray(np.broadcast_to(s, (c,))))


def normalize(input, mean=None, std=None, dim=-3):
    """uint8 images (0-255) to float32 in [0, 1], then, if mean / std are
    given, (x - mean[c]) / std[c] along axis ``dim`` (channels; -3 as in
    torchvision, so (N, C, H, W) and (C, H, W) both work). One pass.

    mean / std: scalars or sequences of length input.shape[dim] (or 1).
    """
    xp, K = B.dispatch(input)
    op = "normalize"
    x = B._as_array(input, "input", xp)
    if x.dtype != np.uint8:
        raise TypeError(f"{op}: input must be uint8 images (0-255), got dtype {x.dtype}")
    x = xp.asarray(x, order="C")
    if (mean is None) != (std is None):
        raise ValueError(f"{op}: give both mean and std, or neither")
    if mean is None:
        outer, c, inner = 1, 1, x.size
        m = s = None
    else:
        if x.ndim == 0:
            d = 0
            outer, c, inner = 1, 1, 1
        else:
            d = B.normalize_dim(dim, x.ndim, op)
            outer, c, inner = math.prod(x.shape[:d]), x.shape[d], math.prod(x.shape[d + 1:])
        key = (mean, std, c, tuple(map(type, _flat(mean) + _flat(std))))
        cached = _NORMALIZE_STATS.get(key) if xp is np and _hashable_numbers(mean, std) else None
        if cached is None:
            cached = _normalize_stats(op, mean, std, c, d, x.shape)
            if xp is np and _hashable_numbers(mean, std):
                if len(_NORMALIZE_STATS) >= 64:
                    _NORMALIZE_STATS.clear()
                _NORMALIZE_STATS[key] = cached
        m, s = (xp.asarray(v) for v in cached)
    y = _empty(xp, x.shape)
    if x.size:
        K.normalize_u8(x, m, s, y, outer, c, inner)
    return y


# -------------------------------------------------------------------- pad --

PAD_MODES = ("constant", "reflect", "replicate", "circular")


def _pad_sources(n, lo, hi, mode):
    """For each border position of a dimension of size ``n`` padded by (lo, hi):
    (position in the padded output, index of the input it copies), by ``mode``."""
    def source(i):                      # i: the position relative to the input's start
        if mode == "reflect":
            i = -i if i < 0 else i
            return 2 * (n - 1) - i if i >= n else i
        if mode == "replicate":
            return min(max(i, 0), n - 1)
        return i % n                    # circular
    return [(lo + i, source(i)) for i in list(range(-lo, 0)) + list(range(n, n + hi))]


class _PadArgs:
    """pad's validated arguments: per padded axis (from the last), (axis, lo, hi)."""

    def __init__(self, op, x, pad, mode):
        if not isinstance(mode, str) or mode not in PAD_MODES:
            raise ValueError(f"{op}: mode must be one of {PAD_MODES}, got {mode!r}")
        if not isinstance(pad, (tuple, list)) or len(pad) % 2 or not all(
                isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in pad):
            raise TypeError(f"{op}: pad must be a tuple of ints (left, right, top, bottom, ...),"
                            f" two per padded dimension from the last, got {pad!r}")
        if len(pad) // 2 > x.ndim:
            raise ValueError(f"{op}: pad {tuple(pad)} pads {len(pad) // 2} dimensions but the "
                             f"input has shape {shape_str(x.shape)}")
        if min(pad, default=0) < 0:
            raise ValueError(f"{op}: pad must be non-negative, got {tuple(pad)}")
        self.axes = []
        for k in range(len(pad) // 2):
            axis, lo, hi = x.ndim - 1 - k, int(pad[2 * k]), int(pad[2 * k + 1])
            n = x.shape[axis]
            if mode == "reflect" and max(lo, hi) >= max(n, 1):
                raise ValueError(f"{op}: reflect padding {(lo, hi)} must be less than the size "
                                 f"{n} of dimension {axis} of input {shape_str(x.shape)}")
            if mode in ("replicate", "circular") and n == 0 and lo + hi:
                raise ValueError(f"{op}: {mode} padding of the empty dimension {axis} of input "
                                 f"{shape_str(x.shape)}")
            if mode == "circular" and max(lo, hi) > n:
                raise ValueError(f"{op}: circular padding {(lo, hi)} must not exceed the size "
                                 f"{n} of dimension {axis} of input {shape_str(x.shape)}")
            self.axes.append((axis, lo, hi))
        self.mode = mode
        self.out_shape = list(x.shape)
        for axis, lo, hi in self.axes:
            self.out_shape[axis] += lo + hi
        self.out_shape = tuple(self.out_shape)
        if math.prod(self.out_shape) * 4 >= 2**63:
            raise ValueError(f"{op}: padding {shape_str(x.shape)} by {tuple(pad)} gives "
                             f"{shape_str(self.out_shape)}, more float32 values than 64 bits "
                             f"can address")


def _along(axis, index):
    """An index tuple selecting ``index`` (an int or a slice) on ``axis``."""
    return (slice(None),) * axis + (index,)


def pad(input, pad, mode="constant", value=0.0):
    """Pad the last ``len(pad) // 2`` dimensions, as ``torch.nn.functional.pad``: ``pad``
    is (left, right) for the last dimension, then (top, bottom) for the one before, ...
    (non-negative). mode: 'constant' (``value``), 'reflect' (the border not repeated:
    a b c -> c b | a b c | b a; each pad less than the dimension), 'replicate' (the
    edge repeated) or 'circular' (wrapped around; each pad at most the dimension).
    Float32 out, on the input's device."""
    xp, _ = B.dispatch(input)
    x = B.as_float(input, "input", xp)
    args = _PadArgs("pad", x, pad, mode)
    out = x
    for axis, lo, hi in args.axes:      # one dimension at a time: corners come out right
        n = out.shape[axis]
        shape = list(out.shape)
        shape[axis] += lo + hi
        padded = (xp.full(shape, value, _F32) if mode == "constant" else _empty(xp, shape))
        padded[_along(axis, slice(lo, lo + n))] = out
        if mode != "constant":
            for position, source in _pad_sources(n, lo, hi, mode):
                padded[_along(axis, position)] = padded[_along(axis, lo + source)]
        out = padded
    return out if args.axes else x.copy()


def pad_backward(grad_output, input_shape, pad, mode="constant"):
    """The gradient of :func:`pad` with respect to its input (shape ``input_shape``):
    each input element gets the sum of the output gradient at every place it was
    copied to (the padding of 'constant' gets nothing)."""
    xp, _ = B.dispatch(grad_output)
    g = B.as_float(grad_output, "grad_output", xp)
    if not isinstance(input_shape, (tuple, list)) and not hasattr(input_shape, "__len__"):
        raise TypeError(f"pad_backward: input_shape must be the input's shape, a tuple of ints, "
                        f"got {input_shape!r}")
    shape = tuple(B.as_int(v, "pad_backward: input_shape") for v in input_shape)
    args = _PadArgs("pad_backward", np.broadcast_to(np.float32(0), shape), pad, mode)
    if g.shape != args.out_shape:
        raise ValueError(f"pad_backward: grad_output has shape {shape_str(g.shape)}; padding "
                         f"{shape_str(shape)} by {tuple(pad)} gives {shape_str(args.out_shape)}")
    if not args.axes:
        return g.copy()
    for axis, lo, hi in reversed(args.axes):
        n = g.shape[axis] - lo - hi
        grad = g[_along(axis, slice(lo, lo + n))].copy()
        if mode != "constant":
            for position, source in _pad_sources(n, lo, hi, mode):
                grad[_along(axis, source)] += g[_along(axis, position)]
        g = grad
    return g


# ----------------------------------------------------------------- matmul --

def matmul(a, b):
    """a @ b for 2-D arrays, on fastcnn's own SGEMM (float32)."""
    xp, K = B.dispatch(a, b)
    a = B.as_float(a, "a", xp)
    b = B.as_float(b, "b", xp)
    B.check_ndim(a, (2,), "a", "matmul", "2-D")
    B.check_ndim(b, (2,), "b", "matmul", "2-D")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul: a {shape_str(a.shape)} and b {shape_str(b.shape)} do not "
                         "agree (a.shape[1] != b.shape[0])")
    c = _empty(xp, (a.shape[0], b.shape[1]))
    K.sgemm(False, False, 1.0, a, b, 0.0, c)
    return c
