"""fastcnn: a lightweight convolutional-network library.

Hand-written C++ kernels (OpenMP, SIMD) behind a NumPy-compatible API:
``fastcnn.functional`` (also ``fastcnn.F``) mirrors ``torch.nn.functional``.
"""
from . import cuda, functional
from . import functional as F
from ._backend import get_num_threads, set_num_threads
from .functional import manual_seed

__version__ = "0.1.0"

__all__ = ["F", "cuda", "functional", "get_num_threads", "set_num_threads", "manual_seed", "__version__"]
