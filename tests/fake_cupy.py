"""A stand-in for CuPy, so that fastcnn's GPU code paths run on machines with no GPU.

``install(monkeypatch)`` puts a module named ``cupy`` in ``sys.modules`` whose
arrays are NumPy arrays of a subclass that fastcnn takes for CuPy arrays (its
``__module__`` is ``cupy`` and it has a ``__cuda_array_interface__``), and
points fastcnn's GPU dispatch at ``fastcnn._cuda.emulator``, which runs the
CUDA kernels' code on the host. Every Python branch that a CuPy array takes
(functional's GPU paths, model.to("cuda"), the optimizers' multi-tensor update,
the trainer's deferred reads, visualisation, the CLI's --device cuda) then runs
for real, against the emulated kernels.

As in CuPy, ``asarray`` of a host array copies (so a "GPU" array never shares
memory with a NumPy one), reductions and scalar indexing give 0-d arrays, and
``.get()`` / ``asnumpy`` give NumPy arrays. As in a CUDA graph capture, a
transfer between host and device while fastcnn.capture records is an error,
and memory allocated under ``using_allocator(pool.malloc)`` stays the pool's. What it cannot show: anything of
the real device (streams, memory, speed, the GPU's own arithmetic).
"""
import contextlib
import sys
import types

import numpy as np


class ndarray(np.ndarray):
    """A host array that fastcnn treats as a CuPy array. ``host_reads`` counts what
    would be a device-to-host copy on a GPU (and a wait for it): .get(), float(),
    int(), bool(), .item(), .tolist()."""

    host_reads = 0
    host_waits = 0  # synchronous host-to-device copies (.set without a stream)

    def __array_finalize__(self, obj):
        if _kept is not None and self.base is None:  # new memory (copy, astype, ...)
            _kept.append(self)

    def _read(self):
        _no_transfer_while_capturing("a device-to-host read")
        ndarray.host_reads += 1
        return self.view(np.ndarray)

    def __float__(self):
        return float(self._read())

    def __int__(self):
        return int(self._read())

    def __bool__(self):
        return bool(self._read())

    def item(self, *args):
        return self._read().item(*args)

    def tolist(self):
        return self._read().tolist()

    def __array_wrap__(self, arr, context=None, return_scalar=False):
        return _wrap(arr)  # reductions give 0-d arrays, as CuPy's

    def __getitem__(self, key):
        out = super().__getitem__(key)
        return out if isinstance(out, np.ndarray) else np.asarray(out).view(ndarray)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "version": 3,
                "data": (self.__array_interface__["data"][0], not self.flags.writeable),
                "strides": None if self.flags.c_contiguous else self.strides}

    def get(self, stream=None):
        return np.array(self._read())

    def set(self, arr, stream=None):
        """As CuPy's: without a stream, a synchronous cudaMemcpy, which from
        pageable memory first waits for all queued work (counted in host_waits)."""
        _no_transfer_while_capturing("a host-to-device copy")
        if not isinstance(arr, np.ndarray) or arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError("set: a NumPy array of the same shape and dtype is needed")
        if stream is None:
            ndarray.host_waits += 1
        self.view(np.ndarray)[...] = arr

    def __repr__(self):
        return "fake_cupy." + repr(self.view(np.ndarray))


ndarray.__module__ = "cupy"


def _device(a):
    return a.view(ndarray) if isinstance(a, np.ndarray) else a


_kept = None  # the list of the memory pool in use (using_allocator), if any


def _wrap(value):
    if isinstance(value, (np.ndarray, np.generic)):
        out = np.asarray(value).view(ndarray)
        if _kept is not None:
            _kept.append(out)
        return out
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def _host(value):
    if isinstance(value, ndarray):
        return value.view(np.ndarray)
    if isinstance(value, (list, tuple)):
        return type(value)(_host(v) for v in value)
    return value


def _no_transfer_while_capturing(what):
    """A CUDA graph capture is invalidated by a transfer from or to pageable host
    memory on the capturing stream: so is the stand-in's."""
    from fastcnn import capture

    if capture.recording() is not None:
        raise RuntimeError(f"{what} while a CUDA graph is being captured")


def empty(shape, dtype=float, order="C"):
    return _wrap(np.empty(shape, dtype, order))  # the allocation of every op: kept cheap


def zeros(shape, dtype=float, order="C"):
    return _wrap(np.zeros(shape, dtype, order))


def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray) and (dtype is None or a.dtype == np.dtype(dtype)) and (
            order != "C" or a.flags.c_contiguous):
        return a
    if isinstance(a, ndarray):
        return _wrap(np.asarray(a.view(np.ndarray), dtype=dtype, order=order))
    _no_transfer_while_capturing("a host-to-device copy")
    return _wrap(np.array(a, dtype=dtype, order=order or "K", copy=True))


def array(a, dtype=None, copy=True, order="K"):
    if not isinstance(a, ndarray):
        _no_transfer_while_capturing("a host-to-device copy")
    return _wrap(np.array(_host(a), dtype=dtype, copy=True, order=order))


def ascontiguousarray(a, dtype=None):
    return asarray(a, dtype=dtype, order="C")


def asnumpy(a, stream=None):
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


def from_dlpack(a):
    return asarray(np.from_dlpack(a))


def _as_strided(x, shape=None, strides=None, **kwargs):
    return np.lib.stride_tricks.as_strided(x, shape, strides, subok=True, **kwargs)


class _Stream:
    """A stream: a context manager (kernels here run in order anyway)."""

    ptr = 0

    def __init__(self, null=False, non_blocking=False, ptds=False):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        pass


class _Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.recorded = False

    def record(self, stream=None):
        self.recorded = True

    def synchronize(self):
        if not self.recorded:
            raise RuntimeError("Event.synchronize before record")  # CUDA: returns at once


def _alloc_pinned_memory(nbytes):
    return bytearray(nbytes)  # a buffer np.frombuffer can view, as CuPy's PinnedMemoryPointer


class _MemoryPool:
    """A pool of its own: what is allocated while it is in use stays allocated as
    long as the pool lives (as a CuPy pool keeps freed blocks for itself), so a
    captured graph's memory is never handed to anything else."""

    def __init__(self):
        self.kept = []

    def malloc(self, nbytes):
        raise NotImplementedError("the fake device allocates through NumPy")


@contextlib.contextmanager
def _using_allocator(allocator=None):
    global _kept
    pool = getattr(allocator, "__self__", None)
    saved, _kept = _kept, (pool.kept if isinstance(pool, _MemoryPool) else None)
    try:
        yield
    finally:
        _kept = saved


class _Device:
    def __init__(self, device=0):
        self.id = device

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _FakeCupy(types.ModuleType):
    """numpy's functions with their array results as the fake device's arrays."""

    ndarray = ndarray

    def __getattr__(self, name):
        attr = getattr(np, name)
        if callable(attr) and not isinstance(attr, type):
            def call(*args, **kwargs):
                return _wrap(attr(*_host(args), **{k: _host(v) for k, v in kwargs.items()}))

            call.__name__ = name
            return call
        return attr


def module():
    cp = _FakeCupy("cupy")
    cp.__version__ = "fake"
    for f in (empty, zeros, asarray, array, ascontiguousarray, asnumpy, from_dlpack):
        setattr(cp, f.__name__, f)
    cp.lib = types.SimpleNamespace(stride_tricks=types.SimpleNamespace(as_strided=_as_strided))
    runtime = types.SimpleNamespace(getDevice=lambda: 0)
    cp.cuda = types.SimpleNamespace(runtime=runtime, Device=_Device, Stream=_Stream,
                                    MemoryPool=_MemoryPool, using_allocator=_using_allocator,
                                    Event=_Event, alloc_pinned_memory=_alloc_pinned_memory,
                                    get_current_stream=lambda: _Stream())
    return cp


def install(monkeypatch):
    """Fake CuPy + the emulated kernels for the duration of a test; returns the module."""
    from fastcnn import _backend as B
    from fastcnn import _cuda
    import fastcnn.cuda

    cp = module()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setattr(B, "_cuda_kernels", lambda: (cp, _cuda.emulator))
    real_is_gpu = B.is_gpu_array
    monkeypatch.setattr(B, "is_gpu_array", lambda x: isinstance(x, ndarray) or real_is_gpu(x))
    monkeypatch.setattr(fastcnn.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fastcnn.cuda, "device_name", lambda device=0: "fake GPU (emulator)")
    return cp
