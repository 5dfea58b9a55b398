"""A float64 NumPy re-implementation of a fastcnn Sequential's forward pass.

Used for whole-model gradient checks: the reference reads the model's
architecture and takes its parameters as a separate dict of float64 arrays,
so central finite differences can perturb any of them. Written with plain
NumPy (a loop over kernel taps for convolution, reshapes for 2x2 pooling,
textbook batch norm and log-sum-exp), independently of the kernels.
"""

import numpy as np

from fastcnn import nn


#: Conv2d's padding modes as numpy.pad's.
NP_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge",
                "circular": "wrap"}


def _conv2d(x, w, b, stride, padding, dilation, padding_mode="zeros"):
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), mode=NP_PAD_MODES[padding_mode])
    n, c, h, wd = x.shape
    k, _, r, s = w.shape
    oh = (h - dh * (r - 1) - 1) // sh + 1
    ow = (wd - dw * (s - 1) - 1) // sw + 1
    out = np.zeros((n, k, oh, ow))
    for i in range(r):
        for j in range(s):
            window = x[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh,
                       j * dw:j * dw + sw * (ow - 1) + 1:sw]
            out += np.einsum("nchw,kc->nkhw", window, w[:, :, i, j])
    return out if b is None else out + b[None, :, None, None]


def _max_pool_2x2(x):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def _batch_norm(x, mean, var, weight, bias, eps):
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if mean is None:
        mean, var = x.mean(axis=axes), x.var(axis=axes)
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    return y * weight.reshape(shape) + bias.reshape(shape)


def params64(model):
    """The model's parameters as float64 copies, by state-dict name."""
    return {name: p.data.astype(np.float64) for name, p in model.named_parameters()}


def forward64(model, params, x, training, dropout_masks=None):
    """Logits of ``model`` on ``x`` in float64 with ``params`` (name -> array).

    training: batch statistics for batch norm (else its running statistics) and
    dropout with ``dropout_masks`` (layer name -> multiplier array).
    """
    x = np.asarray(x, dtype=np.float64)
    for name, layer in model.named_children():
        if isinstance(layer, nn.Conv2d):
            assert layer.groups == 1 and not isinstance(layer.padding, str)
            x = _conv2d(x, params[f"{name}.weight"], params.get(f"{name}.bias"), layer.stride,
                        layer.padding, layer.dilation, layer.padding_mode)
        elif isinstance(layer, nn.Linear):
            x = x @ params[f"{name}.weight"].T + params.get(f"{name}.bias", 0.0)
        elif isinstance(layer, nn.ReLU):
            x = np.maximum(x, 0.0)
        elif isinstance(layer, nn.MaxPool2d):
            assert layer.kernel_size == (2, 2) and layer.stride == (2, 2)
            x = _max_pool_2x2(x)
        elif isinstance(layer, nn.Flatten):
            x = x.reshape(len(x), -1)
        elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            stats = (None, None) if training else (
                layer.running_mean.astype(np.float64), layer.running_var.astype(np.float64))
            x = _batch_norm(x, *stats, params[f"{name}.weight"], params[f"{name}.bias"],
                            layer.eps)
        elif isinstance(layer, nn.Dropout):
            if training:
                x = x * dropout_masks[name]
        else:
            raise NotImplementedError(type(layer).__name__)
    return x


def cross_entropy64(logits, target):
    """Mean softmax cross-entropy in float64."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(target)), target].mean()
