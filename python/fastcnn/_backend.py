"""Input checking and conversion shared by every public function.

Data flows one way: Python validates and allocates, C++ computes. Every
check here names the argument and the shapes involved, so that a bad call
fails with a readable ``ValueError`` / ``TypeError`` before any kernel runs.

Dtype rule (documented in the README):

* float arguments accept any real numeric dtype (bool, signed and unsigned
  integers, float16/32/64) or an array-like, and are converted to float32;
  results are always float32. complex, object, string and datetime arrays
  raise ``TypeError``.
* class labels accept any integer dtype and are converted to int64; float or
  bool labels raise ``TypeError``.
* non-contiguous arrays are copied once into C order.
"""
from __future__ import annotations

import operator
import sys

import numpy as np

from . import _cpu

_FLOAT_KINDS = "biuf"
_INT_KINDS = "iu"
_F32 = np.dtype(np.float32)


def shape_str(shape) -> str:
    """A shape as Python prints a tuple: (2, 3) or (5,)."""
    return str(tuple(int(d) for d in shape))


def _dtype_error(name, got, expected):
    return TypeError(f"{name} has dtype {got}, expected {expected}")


# ------------------------------------------------------------------ devices --

def is_gpu_array(x) -> bool:
    """True for CuPy arrays and anything else exposing CUDA memory
    (``__cuda_array_interface__``, or DLPack on a CUDA device)."""
    if isinstance(x, (np.ndarray, np.generic)) or x is None:
        return False
    cupy = sys.modules.get("cupy")  # a CuPy array means CuPy is imported
    if cupy is not None and isinstance(x, getattr(cupy, "ndarray", ())):
        return True  # without building its interface dict (CuPy does, per access)
    if hasattr(x, "__cuda_array_interface__"):
        return True
    dev = getattr(x, "__dlpack_device__", None)
    if dev is not None:
        try:
            return dev()[0] in (2, 3, 13)  # kDLCUDA, kDLCUDAHost, kDLCUDAManaged
        except Exception:  # noqa: BLE001 - a foreign object's protocol failing means "not ours"
            return False
    return False


def _cuda_kernels():
    """(cupy, fastcnn._cuda), or a clear error saying which is missing."""
    try:
        import cupy
    except ImportError:
        raise TypeError("got a GPU array but CuPy is not installed; pip install "
                        "'fastcnn[cuda]'") from None
    try:
        from . import _cuda
    except ImportError:
        raise TypeError("got a GPU array but this build of fastcnn has no CUDA backend "
                        "(fastcnn._cuda was not built: nvcc was not found at install time)"
                        ) from None
    return cupy, _cuda


def dispatch(*arrays):
    """(array module, kernel module) for a call's array arguments: NumPy and
    fastcnn._cpu, or CuPy and fastcnn._cuda. None and Python scalars / lists
    go with whichever device the arrays are on; mixing devices is an error."""
    on_gpu = on_cpu = False
    for a in arrays:
        if type(a) is np.ndarray:
            on_cpu = True
        elif a is not None and is_gpu_array(a):
            on_gpu = True
        elif isinstance(a, np.ndarray):
            on_cpu = True
    if not on_gpu:
        return np, _cpu
    if on_cpu:
        raise ValueError("arguments are on different devices: some are NumPy (CPU) arrays and "
                         "some are GPU arrays; move them to one device first")
    return _cuda_kernels()


def array_module(x):
    """numpy or cupy, whichever holds ``x``."""
    return _cuda_kernels()[0] if is_gpu_array(x) else np


def _as_array(x, name, xp):
    if isinstance(x, xp.ndarray):
        return x
    if xp is np:
        if is_gpu_array(x):
            raise ValueError(f"{name} is a GPU array but the other arguments are on the CPU")
        try:
            return np.asarray(x)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be an array of numbers: {exc}") from None
    if isinstance(x, np.ndarray):
        raise ValueError(f"{name} is a NumPy (CPU) array but the other arguments are on the GPU")
    if hasattr(x, "__cuda_array_interface__"):
        return xp.asarray(x)
    if hasattr(x, "__dlpack__"):
        return xp.from_dlpack(x)
    return xp.asarray(x)


def as_float(x, name: str, xp=np):
    """``x`` as a C-contiguous float32 array of module ``xp`` (copied only when needed)."""
    x = _as_array(x, name, xp)
    if type(x) is xp.ndarray and x.dtype == _F32 and x.flags.c_contiguous:  # no library call
        return x
    if x.dtype.kind not in _FLOAT_KINDS:
        raise _dtype_error(name, x.dtype, "a real numeric dtype (converted to float32)")
    return xp.asarray(x, dtype=np.float32, order="C")


def as_optional_float(x, name: str, xp=np):
    return None if x is None else as_float(x, name, xp)


def as_labels(x, name: str, xp=np, what="an integer dtype (class labels)"):
    """Class labels (or other integer indices) as a C-contiguous int64 array of module ``xp``."""
    x = _as_array(x, name, xp)
    if x.dtype.kind not in _INT_KINDS:
        raise _dtype_error(name, x.dtype, what)
    return xp.asarray(x, dtype=np.int64, order="C")


def as_int(value, name: str, *, int64: bool = True) -> int:
    """A Python int from an int-like (int, numpy integer); bool and float are rejected,
    and so (a ValueError) is one past int64 unless ``int64`` is False: the kernels
    take 64-bit sizes."""
    if not isinstance(value, (bool, np.bool_)):
        try:
            n = operator.index(value)
        except TypeError:
            pass
        else:
            if int64 and not -2**63 <= n < 2**63:
                raise ValueError(f"{name} must fit in 64 bits (|{name}| < 2**63), got {n}")
            return n
    raise TypeError(f"{name} must be an int, got {value!r}")


def as_count(value, name: str, least: int = 1) -> int:
    """as_int, at least ``least`` (a ValueError naming ``name`` otherwise)."""
    n = as_int(value, name)
    if n < least:
        raise ValueError(f"{name} must be >= {least}, got {n}")
    return n


def pair(value, name: str) -> tuple[int, int]:
    """An int or a pair of ints, as torch accepts for stride, padding, ..."""
    if isinstance(value, (tuple, list, np.ndarray)):
        items = list(value)
        if len(items) == 1:
            items = items * 2
        if len(items) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        return as_int(items[0], name), as_int(items[1], name)
    v = as_int(value, name)
    return v, v


def check_ndim(x: np.ndarray, allowed, name: str, op: str, layout: str) -> None:
    if x.ndim not in allowed:
        raise ValueError(f"{op}: {name} must be {layout}, got shape {shape_str(x.shape)}")


def check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str, op: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{op}: {name_a} has shape {shape_str(a.shape)} but {name_b} has shape "
            f"{shape_str(b.shape)}; they must match"
        )


def check_positive(values, name: str, op: str) -> None:
    if any(v < 1 for v in values):
        raise ValueError(f"{op}: {name} must be >= 1, got {values}")


def check_non_negative(values, name: str, op: str) -> None:
    if any(v < 0 for v in values):
        raise ValueError(f"{op}: {name} must be >= 0, got {values}")


def normalize_dim(dim, ndim: int, op: str, name: str = "dim") -> int:
    d = as_int(dim, name)
    span = max(ndim, 1)
    if not -span <= d < span:
        raise ValueError(f"{op}: {name}={d} is out of range for an array with {ndim} dimensions")
    return d % span


def seed_value(seed, name: str = "seed") -> int:
    s = as_int(seed, name, int64=False)
    if not 0 <= s < 2**64:
        raise ValueError(f"{name} must be in [0, 2**64), got {s}")
    return s


#: More threads than this is a mistake (OpenMP would start them all).
MAX_THREADS = 4096


def set_num_threads(n: int) -> None:
    """Threads used by the CPU kernels (OpenMP). Results do not depend on it."""
    n = as_int(n, "n")
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"set_num_threads: n must be in [1, {MAX_THREADS}], got {n}")
    _cpu.set_num_threads(n)


def get_num_threads() -> int:
    """Threads used by the CPU kernels."""
    return _cpu.get_num_threads()


def set_conv_winograd(enabled: bool) -> None:
    """Let CPU conv2d take Winograd F(2x2, 3x3) for 3x3, stride-1, dilation-1,
    one-group layers with at least 16 channels (on by default; the
    environment variable FASTCNN_CONV_WINOGRAD=0 starts with it off).

    Winograd needs 2.25x fewer multiplies than im2col + GEMM; results differ
    from it by rounding only (relative errors ~1e-7 to 1e-6). Infinite inputs
    can give NaN where a direct sum would give +-inf (the transforms subtract
    input values). Off: every convolution is im2col + GEMM."""
    if not isinstance(enabled, (bool, np.bool_)):
        raise TypeError(f"set_conv_winograd: enabled must be a bool, got {type(enabled).__name__}")
    _cpu.set_conv_winograd(bool(enabled))


def get_conv_winograd() -> bool:
    """Whether CPU conv2d may take the Winograd path (see set_conv_winograd)."""
    return bool(_cpu.get_conv_winograd())
