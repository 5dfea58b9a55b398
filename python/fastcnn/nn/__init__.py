"""fastcnn.nn: layers with explicit forward and backward passes.

>>> from fastcnn import nn
>>> model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
...                       nn.Linear(8 * 28 * 28, 10))
>>> logits = model(x)                   # x: (N, 1, 28, 28) float32
>>> loss = loss_fn(logits, labels)      # loss_fn = nn.CrossEntropyLoss()
>>> model.backward(loss_fn.backward())  # fills every parameter's .grad
>>> probs = model.eval()(x, record=False)  # inference: nothing kept, layers fused
"""

from . import init, utils
from .init import manual_seed
from .layers import (BatchNorm1d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear, LogSoftmax,
                     MaxPool2d, ReLU, Softmax)
from .loss import CrossEntropyLoss
from .module import Module, Parameter, Sequential, from_spec

__all__ = ["init", "utils", "manual_seed", "Parameter", "Module", "Sequential", "from_spec",
           "Conv2d", "Linear", "ReLU", "MaxPool2d", "Flatten", "Dropout", "BatchNorm1d",
           "BatchNorm2d", "Softmax", "LogSoftmax", "CrossEntropyLoss"]
