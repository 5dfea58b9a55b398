"""fastcnn: a lightweight convolutional-network library.

Hand-written C++ kernels (OpenMP, SIMD) behind a NumPy-compatible API:
``fastcnn.functional`` (also ``fastcnn.F``) mirrors ``torch.nn.functional``;
``nn``, ``optim``, ``data``, ``train``, ``io`` and ``models`` build and train
networks; ``fastcnn.viz`` (imported on demand: it loads matplotlib) shows
what they learned.
"""
__version__ = "0.1.0"

from . import _malloc

_malloc.tune()

from . import cuda, data, functional, io, models, nn, optim, train
from . import functional as F
from ._backend import get_conv_winograd, get_num_threads, set_conv_winograd, set_num_threads
from .functional import manual_seed

__all__ = ["F", "cuda", "data", "functional", "io", "models", "nn", "optim", "train",
           "get_num_threads", "set_num_threads", "get_conv_winograd", "set_conv_winograd",
           "manual_seed", "__version__"]
