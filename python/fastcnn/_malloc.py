"""Keep large NumPy buffers in the process heap instead of fresh mmaps.

glibc serves allocations above a (dynamic) threshold with mmap and gives them
back to the OS on free, so a training step that allocates its activations
anew each time first-touches every page again: on the reference CNN that is
about a sixth of a CPU training step. Raising the mmap and trim thresholds
lets freed activation buffers be reused from the heap, as PyTorch's caching
allocator reuses its blocks. The cost is that the process keeps its peak heap
size instead of returning it.

Applied once, at ``import fastcnn``, on glibc only; set
``FASTCNN_MALLOC_TUNING=0`` to leave the allocator alone.
"""
import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30  # 1 GiB: activations and their gradients stay below it


def tune():
    """Apply the thresholds; returns True when they were set."""
    if os.environ.get("FASTCNN_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                        _THRESHOLD))
