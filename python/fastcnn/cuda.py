"""fastcnn on NVIDIA GPUs: availability, the TF32 switch, synchronisation.

The CUDA kernels live in the optional extension ``fastcnn._cuda`` (built when
CMake finds nvcc). Pass CuPy arrays to ``fastcnn.functional`` and they run on
the GPU, on CuPy's current stream, with results in CuPy arrays on the same
device. This module imports nothing from CUDA until asked, so ``import
fastcnn`` works on machines without a GPU or driver::

    import fastcnn.cuda
    fastcnn.cuda.is_available()          # a GPU and the CUDA module are usable
    fastcnn.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for every GEMM

``matmul.allow_tf32`` mirrors ``torch.backends.cuda.matmul.allow_tf32``: off
by default; when on, matmul, linear and conv2d multiply in TF32 (10-bit
mantissa, float32 range and accumulation), several times faster on Ampere
and Hopper, with relative errors around 1e-3 instead of 1e-6.
"""
from __future__ import annotations

import importlib

from .capture import CaptureError, CapturedStep

__all__ = ["is_available", "unavailable_reason", "device_count", "device_name", "synchronize",
           "matmul",
           "set_allow_tf32", "get_allow_tf32", "CapturedStep", "CaptureError"]

_module = None
_import_error = None
_allow_tf32 = False  # remembered when the CUDA module is absent


def _cuda():
    """fastcnn._cuda, or None when it was not built (ImportError)."""
    global _module, _import_error
    if _module is None and _import_error is None:
        try:
            _module = importlib.import_module("fastcnn._cuda")
        except ImportError as exc:
            _import_error = exc
    return _module


def is_available() -> bool:
    """True when fastcnn was built with CUDA and a GPU with a driver is present
    whose architecture the build has code for."""
    mod = _cuda()
    return mod is not None and bool(mod.is_available())


def unavailable_reason() -> str:
    """Why :func:`is_available` is False, in a sentence ('' when it is True)."""
    mod = _cuda()
    if mod is None:
        return (f"fastcnn._cuda was not built ({_import_error}); reinstall where nvcc is found "
                f"(FASTCNN_CUDA=ON)")
    return str(mod.unavailable_reason())


def device_count() -> int:
    """Number of CUDA devices (0 without the CUDA module, a driver or a GPU)."""
    mod = _cuda()
    return 0 if mod is None else int(mod.device_count())


def device_name(device: int = 0) -> str:
    """The GPU's name, e.g. 'NVIDIA H100 80GB HBM3'."""
    return _require().device_name(int(device))


def synchronize() -> None:
    """Wait for every kernel launched on the current device."""
    _require().synchronize()


def set_allow_tf32(allow: bool) -> None:
    """Let every GEMM (matmul, linear, conv2d) use TF32 tensor cores."""
    global _allow_tf32
    _allow_tf32 = bool(allow)
    mod = _cuda()
    if mod is not None:
        mod.set_allow_tf32(_allow_tf32)


def get_allow_tf32() -> bool:
    mod = _cuda()
    return _allow_tf32 if mod is None else bool(mod.get_allow_tf32())


class _MatmulFlags:
    """``fastcnn.cuda.matmul.allow_tf32``, as ``torch.backends.cuda.matmul``."""

    @property
    def allow_tf32(self) -> bool:
        return get_allow_tf32()

    @allow_tf32.setter
    def allow_tf32(self, value: bool) -> None:
        set_allow_tf32(value)

    def __repr__(self):
        return f"fastcnn.cuda.matmul(allow_tf32={self.allow_tf32})"


matmul = _MatmulFlags()


def _require():
    mod = _cuda()
    if mod is None:
        raise RuntimeError(f"fastcnn was built without CUDA support ({_import_error}); "
                           "reinstall where nvcc is available (FASTCNN_CUDA=ON)")
    return mod
