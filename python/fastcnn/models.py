"""Architecture presets.

``mnist_cnn``: the reference MNIST CNN,
Conv(1,32,3,p1)-ReLU-MaxPool2-Conv(32,64,3,p1)-ReLU-MaxPool2-Flatten-
Linear(3136,128)-ReLU-Dropout(0.5)-Linear(128,10);
``mnist_cnn_bn``: the same with BatchNorm2d after each conv (what ``fastcnn demo``
trains); ``cifar_cnn``: a small VGG-style network for 3x32x32 images.

Layers are named (conv1, bn1, relu1, pool1, ..., fc1, dropout, fc2) so that
activations and gradients can be asked for by name, e.g. Grad-CAM on "relu2".
Every builder takes ``seed`` (weights and the dropout seed are drawn from it).
"""

from collections import OrderedDict

import numpy as np

from . import nn

__all__ = ["mnist_cnn", "mnist_cnn_bn", "cifar_cnn", "PRESETS", "build"]


def _conv_block(layers, index, in_channels, out_channels, batchnorm, rng, pool=True):
    layers[f"conv{index}"] = nn.Conv2d(in_channels, out_channels, 3, padding=1, rng=rng)
    if batchnorm:
        layers[f"bn{index}"] = nn.BatchNorm2d(out_channels)
    layers[f"relu{index}"] = nn.ReLU()
    if pool:
        layers[f"pool{index}"] = nn.MaxPool2d(2)


def mnist_cnn(num_classes=10, in_channels=1, input_size=28, batchnorm=False,
              channels=(32, 64), hidden=128, dropout=0.5, seed=0):
    """The reference MNIST CNN (``batchnorm=True``: BatchNorm2d after each conv).

    ``channels``, ``hidden`` and ``input_size`` scale it down for tests;
    ``input_size`` must be divisible by 4.
    """
    if input_size % 4:
        raise ValueError(f"input_size must be divisible by 4 (two 2x2 poolings), got {input_size}")
    rng = np.random.default_rng(seed)
    layers = OrderedDict()
    c1, c2 = channels
    _conv_block(layers, 1, in_channels, c1, batchnorm, rng)
    _conv_block(layers, 2, c1, c2, batchnorm, rng)
    layers["flatten"] = nn.Flatten()
    layers["fc1"] = nn.Linear(c2 * (input_size // 4) ** 2, hidden, rng=rng)
    layers["relu3"] = nn.ReLU()
    layers["dropout"] = nn.Dropout(dropout, seed=int(rng.integers(0, 2 ** 32)))
    layers["fc2"] = nn.Linear(hidden, num_classes, rng=rng)
    model = nn.Sequential(layers)
    model.metadata = {"input_shape": [in_channels, input_size, input_size]}
    return model


def mnist_cnn_bn(num_classes=10, in_channels=1, input_size=28, channels=(32, 64), hidden=128,
                 dropout=0.5, seed=0):
    """The reference MNIST CNN with BatchNorm2d after each conv."""
    return mnist_cnn(num_classes, in_channels, input_size, batchnorm=True, channels=channels,
                     hidden=hidden, dropout=dropout, seed=seed)


def cifar_cnn(num_classes=10, in_channels=3, input_size=32, width=32, hidden=256,
              dropout=0.5, seed=0):
    """conv(w)-conv(w)-pool-conv(2w)-conv(2w)-pool, each conv + BatchNorm2d + ReLU,
    then Linear(2w*(s/4)^2, hidden)-ReLU-Dropout-Linear(hidden, classes)."""
    if input_size % 4:
        raise ValueError(f"input_size must be divisible by 4 (two 2x2 poolings), got {input_size}")
    rng = np.random.default_rng(seed)
    layers = OrderedDict()
    _conv_block(layers, 1, in_channels, width, True, rng, pool=False)
    _conv_block(layers, 2, width, width, True, rng)
    _conv_block(layers, 3, width, 2 * width, True, rng, pool=False)
    _conv_block(layers, 4, 2 * width, 2 * width, True, rng)
    layers["flatten"] = nn.Flatten()
    layers["fc1"] = nn.Linear(2 * width * (input_size // 4) ** 2, hidden, rng=rng)
    layers["relu5"] = nn.ReLU()
    layers["dropout"] = nn.Dropout(dropout, seed=int(rng.integers(0, 2 ** 32)))
    layers["fc2"] = nn.Linear(hidden, num_classes, rng=rng)
    model = nn.Sequential(layers)
    model.metadata = {"input_shape": [in_channels, input_size, input_size]}
    return model


PRESETS = {"mnist_cnn": mnist_cnn, "mnist_cnn_bn": mnist_cnn_bn, "cifar_cnn": cifar_cnn}


def build(name, **kwargs):
    """Build the preset ``name`` (one of PRESETS) with ``kwargs`` for its builder."""
    if name not in PRESETS:
        raise ValueError(f"unknown architecture {name!r}; presets: {sorted(PRESETS)}")
    return PRESETS[name](**kwargs)
