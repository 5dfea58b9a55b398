"""Losses: a forward that returns the loss and a backward that returns d loss / d input."""

import numpy as np

from .. import functional as F
from .layers import _cached
from .module import Module

__all__ = ["CrossEntropyLoss"]


class CrossEntropyLoss(Module):
    """Softmax cross-entropy between logits (N, C) and integer targets (N,).

    ``forward(logits, target)`` returns the loss (a float32 scalar array for
    'mean' / 'sum', per-sample losses for 'none'); ``backward(grad_out=1.0)``
    returns the gradient w.r.t. the logits. Arguments as torch.nn.CrossEntropyLoss's:
    ``weight`` (one per class, a buffer, so ``.to("cuda")`` moves it) positional or
    keyword, the others (reduction, ignore_index, label_smoothing) keywords only:
    torch's positions after weight belong to its deprecated size_average and
    reduce, which fastcnn does not take, so a positional value there is a
    TypeError rather than a different loss.
    """

    def __init__(self, weight=None, *, reduction="mean", ignore_index=-100,
                 label_smoothing=0.0):
        super().__init__()
        if isinstance(weight, str):
            raise TypeError(f"weight must be one value per class (an array), got {weight!r}; "
                            f"reduction= is a keyword argument, as in torch")
        if weight is not None:
            weight = np.asarray(weight, dtype=np.float32)
            if weight.ndim != 1:
                raise ValueError(f"weight must be one value per class, 1-D; got shape "
                                 f"{weight.shape}")
        self.register_buffer("weight", weight)  # a buffer: .to("cuda") moves it
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        label_smoothing = float(label_smoothing)
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        self.reduction = reduction
        self.ignore_index = int(ignore_index)
        self.label_smoothing = label_smoothing

    def _args(self):
        return self.reduction, self.ignore_index, self.label_smoothing

    def forward(self, logits, target):
        self._input, self._target = logits, target
        # On the GPU the targets' counts stay on the device for the backward,
        # which then neither recounts nor rechecks them.
        loss, self._status = F._cross_entropy(logits, target, *self._args(), self.weight)
        return loss

    def backward(self, grad_out=1.0, *, input_grad=True):
        logits = _cached(self, "_input")
        return F._cross_entropy_backward(grad_out, logits, self._target, *self._args(),
                                         status=self._status, weight=self.weight)

    def get_config(self):
        return {"weight": None if self.weight is None else [float(v) for v in
                                                            np.asarray(_host(self.weight))],
                "reduction": self.reduction, "ignore_index": self.ignore_index,
                "label_smoothing": self.label_smoothing}


def _host(a):
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else a
