"""The CUDA backend against the CPU kernels.

Every op runs on two devices and the results are compared with the CPU's:

* ``emulator``: ``fastcnn._cuda.emulator`` runs the CUDA kernel bodies on the
  host (shared-memory tiles, barriers, TF32 MMA fragments and all), so these
  tests check the GPU code on any machine where the module was built;
* ``gpu`` (marked ``cuda``): the real thing, on CuPy arrays; skipped with the
  reason when CuPy or a GPU is missing.

Bit-exact where the maths has no reduction or transcendental function to
reorder (relu, max-pool values, indices and gradients, dropout masks,
normalize); to float32 rounding elsewhere. The GPU-only tests at the end go
through ``fastcnn.functional`` with CuPy arrays: device dispatch, errors for
mixed devices, streams, a whole training step.
"""

import math
import sys
import types
from collections import OrderedDict
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastcnn
import fastcnn.cuda
import fastcnn.functional as F
import fake_cupy
import reference as ref
from conftest import randn
from fastcnn import _cpu

try:
    from fastcnn import _cuda
except ImportError:
    _cuda = None


def _gpu_skip_reason():
    if _cuda is None:
        return "fastcnn._cuda was not built (no nvcc when fastcnn was installed)"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed (pip install 'fastcnn[cuda]')"
    if not _cuda.is_available():
        return _cuda.unavailable_reason()
    return None


GPU_SKIP = _gpu_skip_reason()
needs_module = pytest.mark.skipif(_cuda is None, reason="fastcnn._cuda was not built")
gpu_only = [pytest.mark.cuda, pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))]

F32, I64 = np.float32, np.int64


# --------------------------------------------------------------------------- devices

class Device:
    """Runs one binding call with fresh arrays on a device, results back as NumPy.

    call(module, **arrays); inputs: name -> ndarray or None (copied to the
    device); outputs: name -> (shape, dtype, fill). Returns the outputs and the
    inputs (some are updated in place) as NumPy arrays.
    """

    def __init__(self, name):
        self.name = name
        if name == "cpu":
            self.module, self._put, self._get = _cpu, np.array, np.asarray
        elif name == "emulator":
            self.module, self._put, self._get = _cuda.emulator, np.array, np.asarray
        else:
            import cupy

            self.module, self._put, self._get = _cuda, cupy.asarray, cupy.asnumpy

    def __call__(self, call, inputs, outputs):
        ins = {k: None if v is None else self._put(np.ascontiguousarray(v))
               for k, v in inputs.items()}
        outs = {k: None if spec is None else self._put(np.full(spec[0], spec[2], spec[1]))
                for k, spec in outputs.items()}
        call(self.module, **ins, **outs)
        back = {k: None if v is None else self._get(v) for k, v in {**ins, **outs}.items()}
        return back


CPU = Device("cpu")


@pytest.fixture(params=["emulator", pytest.param("gpu", marks=gpu_only)])
def dev(request):
    if _cuda is None:
        pytest.skip("fastcnn._cuda was not built")
    return Device(request.param)


@pytest.fixture
def tf32():
    """Turns TF32 on for the test, off afterwards."""
    _cuda.set_allow_tf32(True)
    yield
    _cuda.set_allow_tf32(False)


@pytest.fixture(params=["fake", pytest.param("gpu", marks=gpu_only)])
def cp(request, monkeypatch):
    """CuPy, or where there is no GPU its stand-in (tests/fake_cupy.py): the GPU code
    paths of fastcnn's Python layer against the emulated kernels."""
    if _cuda is None:
        pytest.skip("fastcnn._cuda was not built")
    if request.param == "fake":
        return fake_cupy.install(monkeypatch)
    import cupy

    return cupy


def both(dev, call, inputs, outputs):
    return CPU(call, inputs, outputs), dev(call, inputs, outputs)


def close(got, want, red=1, rtol=1e-4, atol=1e-5, name=""):
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * math.sqrt(max(red, 1)),
                               equal_nan=True, err_msg=name)


def bitwise(got, want, name=""):
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape)
    if not np.array_equal(got.reshape(-1).view(np.uint8), want.reshape(-1).view(np.uint8)):
        np.testing.assert_array_equal(got, want, err_msg=name)
        raise AssertionError(f"{name}: equal values, different bits (-0.0 / NaN payload)")


# --------------------------------------------------------------------------- without a GPU

@needs_module
def test_module_imports_and_reports_no_gpu_here():
    assert isinstance(_cuda.is_available(), bool)
    assert _cuda.is_available() == (_cuda.device_count() > 0)
    assert fastcnn.cuda.is_available() == _cuda.is_available()
    if not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg")):
        assert _cuda.is_available() is False
        assert fastcnn.cuda.device_count() == 0
        with pytest.raises(ValueError, match="out of range"):
            _cuda.device_name(0)


@needs_module
def test_allow_tf32_switch():
    assert fastcnn.cuda.matmul.allow_tf32 is False  # off by default
    try:
        fastcnn.cuda.matmul.allow_tf32 = True
        assert _cuda.get_allow_tf32() and fastcnn.cuda.get_allow_tf32()
        assert "tf32" in _cuda.gemm_kernel()
    finally:
        fastcnn.cuda.set_allow_tf32(False)
    assert not _cuda.get_allow_tf32() and "simt" in _cuda.gemm_kernel()


def test_gpu_arrays_are_recognised_without_building_their_interface(monkeypatch):
    """CuPy builds __cuda_array_interface__ anew on each access: a CuPy array is
    known by its type; other objects by the interface or a CUDA DLPack device."""
    from fastcnn import _backend as B

    class CupyArray:
        built = 0

        @property
        def __cuda_array_interface__(self):
            CupyArray.built += 1
            return {}

    class Dlpack:
        def __init__(self, device):
            self.device = device

        def __dlpack_device__(self):
            return (self.device, 0)

    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(ndarray=CupyArray))
    assert B.is_gpu_array(CupyArray()) and CupyArray.built == 0
    assert B.is_gpu_array(FakeGpuArray((2,)))
    assert B.is_gpu_array(Dlpack(2)) and not B.is_gpu_array(Dlpack(1))  # kDLCUDA, kDLCPU
    assert not any(B.is_gpu_array(v) for v in (np.zeros(2), np.float32(1), None, [1.0], 3))


class FakeGpuArray:
    """Exposes only __cuda_array_interface__ (the bindings check it before any CUDA call)."""

    def __init__(self, shape, typestr="<f4", strides=None, readonly=False, mask=None):
        self.__cuda_array_interface__ = dict(shape=shape, typestr=typestr, strides=strides,
                                             data=(0, readonly), mask=mask, version=3)


@needs_module
@pytest.mark.parametrize("args,match", [
    ((np.zeros(3, F32), FakeGpuArray((3,))), "__cuda_array_interface__.*numpy.ndarray"),
    ((FakeGpuArray((0, 3), "<f8"), FakeGpuArray((0, 3))), "typestr '<f8', expected float32"),
    ((FakeGpuArray((2, 3), strides=(4, 8)), FakeGpuArray((2, 3))), "C-contiguous"),
    ((FakeGpuArray((0, 3)), FakeGpuArray((0, 3), readonly=True)), "output must be writable"),
    ((FakeGpuArray((0, 3)), FakeGpuArray((0, 4))), r"shape \(0, 3\) but output has shape \(0, 4\)"),
    ((FakeGpuArray((0,), mask=1), FakeGpuArray((0,))), "masked"),
])
def test_bindings_check_arrays_before_any_cuda_call(args, match):
    with pytest.raises(ValueError, match=match):
        _cuda.relu_forward(*args)


@needs_module
def test_cuda_errors_are_runtime_errors_naming_the_call():
    assert issubclass(_cuda.CudaError, RuntimeError)
    if _cuda.is_available():
        pytest.skip("needs a machine without a usable GPU")
    with pytest.raises(_cuda.CudaError, match="cudaGetDevice"):
        _cuda.relu_forward(FakeGpuArray((0,)), FakeGpuArray((0,)))


@needs_module
def test_emulator_checks_arguments():
    emu = _cuda.emulator
    x = np.zeros((2, 3), F32)
    with pytest.raises(ValueError, match="dtype"):
        emu.relu_forward(x.astype(np.float64), x)
    with pytest.raises(ValueError, match="C-contiguous"):
        emu.relu_forward(np.zeros((3, 2), F32).T, x)
    with pytest.raises(ValueError, match="shape"):
        emu.relu_forward(x, np.zeros((3, 2), F32))
    with pytest.raises(ValueError, match="target value 10 out of range"):
        emu.cross_entropy_forward(np.zeros((1, 10), F32), np.array([10]), -100, 0.0,
                                  np.zeros(1, F32))


# --------------------------------------------------------------------------- sgemm

GEMM_SHAPES = [(1, 1, 1), (5, 7, 3), (33, 47, 19), (64, 64, 64), (130, 70, 300), (7, 9, 1000),
               (200, 3, 5), (1, 300, 17), (0, 5, 3), (4, 0, 3), (6, 5, 0)]


def _operands(rng, m, n, k, ta, tb):
    a = randn(rng, *((k, m) if ta else (m, k)))
    b = randn(rng, *((n, k) if tb else (k, n)))
    want = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b)
    return a, b, want


@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_sgemm_vs_numpy(dev, rng, m, n, k, ta, tb):
    a, b, want = _operands(rng, m, n, k, ta, tb)
    # C starts as NaN: beta == 0 must never read it
    out = dev(lambda mod, a, b, c: mod.sgemm(ta, tb, 1.0, a, b, 0.0, c), {"a": a, "b": b},
              {"c": ((m, n), F32, np.nan)})
    close(out["c"], want.astype(F32), red=k)


@pytest.mark.parametrize("alpha,beta", [(0.5, 2.0), (-1.0, 1.0), (2.0, -0.25)])
def test_sgemm_alpha_beta(dev, rng, alpha, beta):
    m, n, k = 37, 45, 29
    a, b, prod = _operands(rng, m, n, k, False, True)
    c0 = randn(rng, m, n)
    out = dev(lambda mod, a, b, c: mod.sgemm(False, True, alpha, a, b, beta, c),
              {"a": a, "b": b, "c": c0}, {})
    close(out["c"], (alpha * prod + beta * c0).astype(F32), red=k)


def test_sgemm_large_tiles_and_unaligned(dev, rng):
    # 1100 x 1030 takes the 128 x 128 kernel; the offset views defeat float4 loads
    m, n, k = 1100, 1030, 12
    a, b, want = _operands(rng, m, n, k, False, False)
    out = dev(lambda mod, a, b, c: mod.sgemm(False, False, 1.0, a, b, 0.0, c), {"a": a, "b": b},
              {"c": ((m, n), F32, np.nan)})
    close(out["c"], want.astype(F32), red=k)
    if dev.name == "emulator":
        base_a, base_b = np.empty(m * k + 1, F32), np.empty(k * n + 1, F32)
        ua, ub = base_a[1:].reshape(m, k), base_b[1:].reshape(k, n)
        ua[...], ub[...] = a, b
        c = np.full((m, n), np.nan, F32)
        _cuda.emulator.sgemm(False, False, 1.0, ua, ub, 0.0, c)
        close(c, want.astype(F32), red=k)


@pytest.mark.parametrize("m,n,k,ta,tb", [(100, 90, 64, False, False), (130, 140, 33, True, False),
                                         (17, 260, 200, False, True)])
def test_sgemm_tf32(dev, rng, tf32, m, n, k, ta, tb):
    a, b, want = _operands(rng, m, n, k, ta, tb)
    out = dev(lambda mod, a, b, c: mod.sgemm(ta, tb, 1.0, a, b, 0.0, c), {"a": a, "b": b},
              {"c": ((m, n), F32, np.nan)})
    err = np.abs(out["c"] - want)
    # TF32 keeps 10 mantissa bits: each product is within ~2^-10 relative
    assert err.max() <= 4e-3 * math.sqrt(k), err.max()
    assert err.max() > 1e-5, "the TF32 path did not run (error at float32 level)"


# --------------------------------------------------------------------------- conv2d

# (n, c, h, w, k, (r, s), stride, padding, dilation, groups)
CONV_CASES = [
    (2, 3, 9, 9, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (10, 3, 8, 8, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1),      # several image chunks
    (3, 4, 7, 9, 6, (3, 2), (2, 1), (1, 0), (1, 2), 2),       # groups, asymmetric
    (2, 6, 10, 10, 6, (3, 3), (1, 1), (1, 1), (1, 1), 6),     # depthwise
    (3, 8, 8, 8, 12, (1, 1), (1, 1), (0, 0), (1, 1), 1),      # pointwise, float4 path
    (2, 5, 5, 7, 3, (1, 1), (1, 1), (0, 0), (1, 1), 1),       # pointwise, 35 pixels
    (2, 4, 6, 6, 4, (1, 1), (2, 2), (0, 0), (1, 1), 2),       # 1x1 with stride
    (1, 2, 12, 11, 3, (5, 4), (3, 2), (2, 1), (2, 1), 1),     # dilation, big kernel
    (6, 1, 16, 16, 2, (3, 3), (1, 1), (1, 1), (1, 1), 1),     # split-k weight gradient
    (2, 1, 64, 64, 130, (2, 2), (1, 1), (0, 0), (1, 1), 1),   # 128 x 128 tiles, implicit im2col
    (2, 3, 9, 10, 4, (3, 2), (1, 1), (2, 2), (2, 1), 1),      # dx as a convolution: padding
]                                                              # above dil (s - 1) (negative)


def _conv_problem(rng, case):
    n, c, h, w, k, (r, s), stride, pad, dil, groups = case
    x = randn(rng, n, c, h, w)
    wt = randn(rng, k, c // groups, r, s, scale=0.5)
    b = randn(rng, k)
    oh = ref.conv2d_out_size(h, r, stride[0], pad[0], pad[0], dil[0])
    ow = ref.conv2d_out_size(w, s, stride[1], pad[1], pad[1], dil[1])
    args = (*stride, *pad, *dil, groups)
    return x, wt, b, (n, k, oh, ow), args


def _conv_check(dev, rng, case, rtol=1e-4, atol=1e-5):
    x, wt, b, yshape, args = _conv_problem(rng, case)
    red = wt[0].size
    cpu, got = both(dev, lambda mod, x, w, b, y: mod.conv2d_forward(x, w, b, y, *args),
                    {"x": x, "w": wt, "b": b}, {"y": (yshape, F32, np.nan)})
    close(got["y"], cpu["y"], red, rtol, atol, "conv2d forward")
    gy = randn(rng, *yshape)
    cpu, got = both(dev, lambda mod, gy, x, w, dx, dw, db: mod.conv2d_backward(
        gy, x, w, dx, dw, db, *args), {"gy": gy, "x": x, "w": wt},
        {"dx": (x.shape, F32, np.nan), "dw": (wt.shape, F32, np.nan), "db": ((wt.shape[0],), F32,
                                                                            np.nan)})
    close(got["dx"], cpu["dx"], wt.shape[0] * red, rtol, atol, "grad_input")
    close(got["dw"], cpu["dw"], x.shape[0] * yshape[2] * yshape[3], rtol, atol, "grad_weight")
    close(got["db"], cpu["db"], x.shape[0] * yshape[2] * yshape[3], rtol, atol, "grad_bias")


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:5])))
def test_conv2d(dev, rng, case):
    _conv_check(dev, rng, case)


@st.composite
def _conv_geometry(draw):
    g, cg, kg = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    r, s = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    h = max(1, dh * (r - 1) + 1 - 2 * ph) + draw(st.integers(0, 7))
    w = max(1, dw * (s - 1) + 1 - 2 * pw) + draw(st.integers(0, 7))
    return (draw(st.integers(1, 4)), g * cg, h, w, g * kg, (r, s), (sh, sw), (ph, pw), (dh, dw),
            g)


@needs_module
@settings(max_examples=60)
@given(case=_conv_geometry(), seed=st.integers(0, 2**32 - 1))
def test_conv2d_random_geometry(case, seed):
    """Random convolutions (groups, strides, paddings up to 3, dilations, kernels up
    to 4x4, odd sizes) on the emulated CUDA kernels against the CPU's: the forward's
    implicit im2col, the weight gradient's implicit im2col^T over k-segmented dy,
    the input gradient as a convolution of dy (stride 1) or GEMM + col2im."""
    _conv_check(Device("emulator"), np.random.default_rng(seed), case)


@pytest.mark.parametrize("want", [(True, False, False), (False, True, False), (False, False, True),
                                  (True, True, False)])
def test_conv2d_backward_output_mask(dev, rng, want):
    x, wt, b, yshape, args = _conv_problem(rng, CONV_CASES[2])
    gy = randn(rng, *yshape)
    specs = {"dx": (x.shape, F32, np.nan), "dw": (wt.shape, F32, np.nan),
             "db": ((wt.shape[0],), F32, np.nan)}
    specs = {k: (v if on else None) for (k, v), on in zip(specs.items(), want)}
    cpu, got = both(dev, lambda mod, gy, x, w, dx, dw, db: mod.conv2d_backward(
        gy, x, w, dx, dw, db, *args), {"gy": gy, "x": x, "w": wt}, specs)
    for name, on in zip(("dx", "dw", "db"), want):
        if on:
            close(got[name], cpu[name], 64, name=name)


def _relu_bits(y):
    return np.where(y < 0, F32(0), y)  # relu_value: -0.0 and NaN stay


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:5])))
def test_conv2d_relu_in_the_epilogue(dev, rng, case):
    """relu=True gives relu of the relu=False result, bit for bit (the same GEMM,
    the ReLU applied in its epilogue, or in split-k's reduction), on both modules."""
    x, wt, b, yshape, args = _conv_problem(rng, case)
    for module in (dev, CPU):
        plain, fused = (module(lambda mod, x, w, b, y: mod.conv2d_forward(x, w, b, y, *args,
                                                                          relu=relu),
                               {"x": x, "w": wt, "b": b}, {"y": (yshape, F32, np.nan)})["y"]
                        for relu in (False, True))
        bitwise(fused, _relu_bits(plain), f"conv2d relu ({module.name})")


@pytest.mark.parametrize("n,fin,fout", [(5, 7, 3), (64, 3136, 128), (3, 300, 10)])
def test_linear_relu_in_the_epilogue(dev, rng, n, fin, fout):
    x, w, b = randn(rng, n, fin), randn(rng, fout, fin, scale=0.2), randn(rng, fout)
    for module in (dev, CPU):
        plain, fused = (module(lambda mod, x, w, b, y: mod.linear_forward(x, w, b, y, relu=relu),
                               {"x": x, "w": w, "b": b}, {"y": ((n, fout), F32, np.nan)})["y"]
                        for relu in (False, True))
        bitwise(fused, _relu_bits(plain), f"linear relu ({module.name})")


@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[2], CONV_CASES[4]])
def test_conv2d_tf32(dev, rng, tf32, case):
    _conv_check(dev, rng, case, rtol=1e-2, atol=3e-3)


# --------------------------------------------------------------------------- linear

@pytest.mark.parametrize("n,fin,fout", [(1, 1, 1), (5, 7, 3), (64, 392, 64), (3, 300, 10),
                                        (0, 5, 3), (4, 0, 3), (3, 5, 0),
                                        (40000, 2, 3)])  # db over 3 ranges
@pytest.mark.parametrize("bias", [True, False])
def test_linear(dev, rng, n, fin, fout, bias):
    x, w = randn(rng, n, fin), randn(rng, fout, fin, scale=0.2)
    b = randn(rng, fout) if bias else None
    cpu, got = both(dev, lambda mod, x, w, b, y: mod.linear_forward(x, w, b, y),
                    {"x": x, "w": w, "b": b}, {"y": ((n, fout), F32, np.nan)})
    close(got["y"], cpu["y"], fin)
    gy = randn(rng, n, fout)
    cpu, got = both(dev, lambda mod, gy, x, w, dx, dw, db: mod.linear_backward(gy, x, w, dx, dw, db),
                    {"gy": gy, "x": x, "w": w},
                    {"dx": ((n, fin), F32, np.nan), "dw": ((fout, fin), F32, np.nan),
                     "db": ((fout,), F32, np.nan) if bias else None})
    close(got["dx"], cpu["dx"], fout)
    close(got["dw"], cpu["dw"], n)
    if bias:  # double sums in another order than the CPU's: equal to float32 rounding
        close(got["db"], cpu["db"], n, rtol=1e-6, atol=1e-7, name="grad_bias")


# --------------------------------------------------------------------------- relu

SPECIAL = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, -1e-40, 3.5, -2.0],
                   dtype=F32)


@pytest.mark.parametrize("guided", [False, True])
def test_relu_bitwise(dev, rng, guided):
    x = np.concatenate([SPECIAL, randn(rng, 1000)])
    dy = np.concatenate([SPECIAL[::-1], randn(rng, 1000)])
    x, dy = np.add.outer(np.zeros(3, F32), x).astype(F32), np.add.outer(np.zeros(3, F32), dy).astype(F32)
    cpu, got = both(dev, lambda mod, x, y: mod.relu_forward(x, y), {"x": x},
                    {"y": (x.shape, F32, np.nan)})
    bitwise(got["y"], cpu["y"], "relu")
    cpu, got = both(dev, lambda mod, dy, x, dx: mod.relu_backward(dy, x, guided, dx),
                    {"dy": dy, "x": x}, {"dx": (x.shape, F32, np.nan)})
    bitwise(got["dx"], cpu["dx"], "relu_backward")


# --------------------------------------------------------------------------- max_pool2d

# (n, c, h, w, kernel, stride, padding, dilation, ceil_mode)
POOL_CASES = [
    (2, 3, 8, 8, (2, 2), (2, 2), (0, 0), (1, 1), False),
    (2, 2, 7, 9, (3, 3), (2, 2), (1, 1), (1, 1), True),
    (1, 2, 10, 11, (3, 2), (1, 2), (1, 0), (2, 1), False),
    (2, 1, 5, 5, (2, 2), (1, 1), (0, 0), (1, 1), False),   # overlapping windows
    (1, 2, 9, 9, (3, 3), (1, 1), (1, 1), (2, 2), True),
    (1, 1, 1, 6, (1, 3), (1, 2), (0, 1), (1, 1), True),
    (1, 2, 1, 5, (2, 2), (1, 1), (1, 1), (2, 2), False),   # windows wholly in the padding
]


@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "x".join(map(str, c[:4])))
@pytest.mark.parametrize("data", ["ties", "nan", "normal"])
@pytest.mark.parametrize("relu", [False, True])
def test_max_pool2d_bitwise(dev, rng, case, data, relu):
    """relu: max_pool2d(relu(x)) and its gradient in one launch each, as the CPU's
    relu flag (with ties at 0, NaN, and -0.0 inputs)."""
    n, c, h, w, (kh, kw), (sh, sw), (ph, pw), (dh, dw), ceil_mode = case
    oh = ref.pool_out_size(h, kh, sh, ph, dh, ceil_mode)
    ow = ref.pool_out_size(w, kw, sw, pw, dw, ceil_mode)
    if data == "ties":
        x = rng.integers(-2, 3, (n, c, h, w)).astype(F32)
    else:
        x = randn(rng, n, c, h, w)
        if data == "nan":
            x.reshape(-1)[rng.integers(0, x.size, 3)] = np.nan
            x.reshape(-1)[rng.integers(0, x.size, 3)] = -0.0
    args = (kh, kw, sh, sw, ph, pw, dh, dw)
    cpu, got = both(dev, lambda mod, x, y, idx: mod.max_pool2d_forward(x, y, idx, *args,
                                                                       relu=relu),
                    {"x": x}, {"y": ((n, c, oh, ow), F32, np.nan), "idx": ((n, c, oh, ow), I64, -7)})
    bitwise(got["y"], cpu["y"], "max_pool2d")
    bitwise(got["idx"], cpu["idx"], "indices")
    if relu:  # the maximum of relu(x): relu of the maximum, -inf for a window with no tap
        plain = CPU(lambda mod, x, y: mod.max_pool2d_forward(x, y, None, *args), {"x": x},
                    {"y": ((n, c, oh, ow), F32, np.nan)})
        want = np.where((plain["y"] < 0) & (got["idx"] >= 0), F32(0), plain["y"])
        bitwise(got["y"], want, "relu of the maximum")
    if ref.max_pool_has_empty_window(h, w, (kh, kw), (sh, sw), (ph, pw), (dh, dw), ceil_mode):
        assert (got["idx"] == -1).any()
        assert np.isneginf(got["y"][got["idx"] == -1]).all()  # max_pool2d(relu(x)) there too
    gy = randn(rng, n, c, oh, ow)
    for indices in (cpu["idx"], None):
        cpu_dx, got_dx = both(dev, lambda mod, gy, x, idx, dx: mod.max_pool2d_backward(
            gy, x, idx, dx, *args, relu=relu), {"gy": gy, "x": x, "idx": indices},
            {"dx": (x.shape, F32, np.nan)})
        bitwise(got_dx["dx"], cpu_dx["dx"], "max_pool2d_backward")
        if relu:  # the gradient passes only where relu_grad's rule lets it (x > 0 or NaN)
            assert not got_dx["dx"][x <= 0].any()


# --------------------------------------------------------------------------- softmax

@pytest.mark.parametrize("outer,dim,inner", [(4, 10, 1), (2, 5, 7), (1, 1, 3), (3, 33, 2),
                                             (0, 4, 4), (5, 300, 1)])
@pytest.mark.parametrize("log", [False, True])
def test_softmax(dev, rng, outer, dim, inner, log):
    x = randn(rng, outer, dim, inner, scale=3.0)
    if x.size:
        x[0, 0, :] = 1e4  # huge logits stay finite
    cpu, got = both(dev, lambda mod, x, y: mod.softmax_forward(x, y, outer, dim, inner, log),
                    {"x": x}, {"y": (x.shape, F32, np.nan)})
    close(got["y"], cpu["y"], dim, rtol=1e-5, atol=1e-6)
    gy = randn(rng, *x.shape)
    cpu_b, got_b = both(dev, lambda mod, gy, y, dx: mod.softmax_backward(
        gy, y, dx, outer, dim, inner, log), {"gy": gy, "y": cpu["y"]},
        {"dx": (x.shape, F32, np.nan)})
    close(got_b["dx"], cpu_b["dx"], dim, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy(dev, rng, smoothing):
    n, classes = 37, 10
    x = randn(rng, n, classes, scale=2.0)
    t = rng.integers(0, classes, n).astype(I64)
    t[::5] = -100
    cpu, got = both(dev, lambda mod, x, t, loss: mod.cross_entropy_forward(x, t, -100, smoothing,
                                                                           loss),
                    {"x": x, "t": t}, {"loss": ((n,), F32, np.nan)})
    close(got["loss"], cpu["loss"], classes, rtol=1e-5, atol=1e-6)
    g = randn(rng, n)
    cpu, got = both(dev, lambda mod, x, t, g, dx: mod.cross_entropy_backward(x, t, -100, smoothing,
                                                                             g, dx),
                    {"x": x, "t": t, "g": g}, {"dx": ((n, classes), F32, np.nan)})
    close(got["dx"], cpu["dx"], classes, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [0, 1, 37, 600, 40000])  # 40000 rows: 3 ranges of 16384
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_total_and_scalar_backward(dev, rng, n, smoothing, reduction):
    """The GPU's reduced loss and its gradient with the counts kept on the device:
    fastcnn.functional's CPU results to rounding, and the target counts exactly."""
    classes = 10
    x = randn(rng, n, classes, scale=2.0)
    t = rng.integers(0, classes, n).astype(I64)
    t[::5] = -100
    mean = reduction == "mean"
    cpu_loss = F.cross_entropy(x, t, reduction=reduction, label_smoothing=smoothing)
    got = dev(lambda mod, x, t, total, status: mod.cross_entropy_total(
        x, t, -100, smoothing, mean, total, status), {"x": x, "t": t},
        {"total": ((), F32, np.nan), "status": ((3,), I64, -7)})
    close(got["total"], np.asarray(cpu_loss), n * classes, rtol=1e-6, atol=1e-7, name="loss")
    hits = int((x.argmax(axis=1) == t).sum()) if n else 0
    assert got["status"].tolist() == [int((t != -100).sum()), 0, hits]
    if n == 0:
        assert np.isnan(got["total"]) == mean and (mean or got["total"] == 0)
    for grad in (None, np.asarray(0.75, F32)):
        want = F.cross_entropy_backward(0.5 if grad is None else grad, x, t, None, reduction,
                                        -100, smoothing)
        back = dev(lambda mod, x, t, g, status, dx: mod.cross_entropy_backward_scalar(
            x, t, -100, smoothing, mean, g, 0.5, status, dx),
            {"x": x, "t": t, "g": grad, "status": got["status"]},
            {"dx": ((n, classes), F32, np.nan)})
        close(back["dx"], want, classes, rtol=1e-5, atol=1e-7, name="grad")
    t_bad = t.copy()
    if n:
        t_bad[-1] = classes
        t_bad[0] = -3
        got = dev(lambda mod, x, t, status: mod.cross_entropy_total(
            x, t, -100, smoothing, mean, None, status), {"x": x, "t": t_bad},
            {"status": ((3,), I64, -7)})
        assert got["status"][1] == len({0, n - 1})


# --------------------------------------------------------------------------- batch norm

@pytest.mark.parametrize("n,c,l", [(4, 3, 25), (8, 5, 1), (2, 2, 300), (3, 4, 7),
                                   (3, 2, 12001), (40000, 3, 1)])  # 3 ranges of 16384
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm(dev, rng, n, c, l, affine):
    x = randn(rng, n, c, l, scale=2.0) + 5.0
    w, b = (randn(rng, c), randn(rng, c)) if affine else (None, None)
    rm, rv = randn(rng, c), np.abs(randn(rng, c)) + 0.5
    ins = {"x": x, "w": w, "b": b, "rm": rm, "rv": rv}
    specs = {"y": (x.shape, F32, np.nan), "mean": ((c,), F32, np.nan),
             "invstd": ((c,), F32, np.nan)}
    cpu, got = both(dev, lambda mod, x, w, b, rm, rv, y, mean, invstd: mod.batch_norm_forward_train(
        x, w, b, rm, rv, y, mean, invstd, n, c, l, 1e-5, 0.1), ins, specs)
    for name in ("y", "mean", "invstd", "rm", "rv"):
        close(got[name], cpu[name], n * l, rtol=1e-5, atol=1e-6, name=name)
    cpu, got = both(dev, lambda mod, x, w, b, rm, rv, y: mod.batch_norm_forward_eval(
        x, w, b, rm, rv, y, n, c, l, 1e-5), ins, {"y": (x.shape, F32, np.nan)})
    close(got["y"], cpu["y"], rtol=1e-6, atol=1e-6, name="eval")
    gy = randn(rng, n, c, l)
    mean, invstd = x.mean(axis=(0, 2)).astype(F32), (1 / x.std(axis=(0, 2))).astype(F32)
    for training in (True, False):
        cpu, got = both(dev, lambda mod, gy, x, mean, invstd, w, dx, dw, db: mod.batch_norm_backward(
            gy, x, mean, invstd, w, training, dx, dw, db, n, c, l),
            {"gy": gy, "x": x, "mean": mean, "invstd": invstd, "w": w},
            {"dx": (x.shape, F32, np.nan), "dw": ((c,), F32, np.nan) if affine else None,
             "db": ((c,), F32, np.nan) if affine else None})
        close(got["dx"], cpu["dx"], n * l, rtol=1e-4, atol=1e-5, name="grad_input")
        if affine:
            close(got["dw"], cpu["dw"], n * l, rtol=1e-4, atol=1e-5, name="grad_weight")
            close(got["db"], cpu["db"], n * l, rtol=1e-4, atol=1e-5, name="grad_bias")


# --------------------------------------------------------------------------- dropout, normalize

@pytest.mark.parametrize("count", [0, 1, 3, 4, 5, 1000, 4099])
@pytest.mark.parametrize("p,seed,offset", [(0.5, 0, 0), (0.3, 2**64 - 1, 7), (0.999, 12345, 2**40),
                                           (0.0, 1, 0), (1.0, 3, 1)])
def test_dropout_masks_identical(dev, rng, count, p, seed, offset):
    x = randn(rng, count)
    cpu, got = both(dev, lambda mod, y: mod.dropout_apply(None, y, p, seed, offset), {},
                    {"y": ((count,), F32, np.nan)})
    bitwise(got["y"], cpu["y"], "mask")
    bitwise(cpu["y"], ref.dropout_mask((count,), p, seed, offset).astype(F32), "mask vs reference")
    cpu, got = both(dev, lambda mod, x, y: mod.dropout_apply(x, y, p, seed, offset), {"x": x},
                    {"y": ((count,), F32, np.nan)})
    bitwise(got["y"], cpu["y"], "dropout")


@pytest.mark.parametrize("outer,c,inner,stats", [(2, 3, 50, True), (1, 1, 784, False),
                                                 (4, 1, 9, True), (3, 5, 1, True)])
def test_normalize_bitwise(dev, rng, outer, c, inner, stats):
    x = rng.integers(0, 256, (outer, c, inner)).astype(np.uint8)
    mean = rng.uniform(0, 1, c).astype(F32) if stats else None
    std = rng.uniform(0.1, 1, c).astype(F32) if stats else None
    cpu, got = both(dev, lambda mod, x, m, s, y: mod.normalize_u8(x, m, s, y, outer, c, inner),
                    {"x": x, "m": mean, "s": std}, {"y": (x.shape, F32, np.nan)})
    bitwise(got["y"], cpu["y"], "normalize")


# --------------------------------------------------------------------------- optimizers

# Sizes around the kernel's 2048-element chunks; 35 tensors take two launches
# (at most 32 tensors per launch); an empty one is skipped.
OPTIM_SIZES = [1, 5, 2047, 2048, 2049, 4100, 0] + [3 + i for i in range(28)]
SGD_OPTIONS = [  # lr, momentum, weight_decay, dampening, nesterov
    (0.1, 0.0, 0.0, 0.0, False), (0.1, 0.9, 0.0, 0.0, False), (0.05, 0.9, 0.0, 0.3, False),
    (0.05, 0.9, 0.01, 0.0, True), (0.1, 0.0, 0.1, 0.0, False)]
ADAM_OPTIONS = [  # lr, b1, b2, eps, weight_decay, decoupled
    (1e-2, 0.9, 0.999, 1e-8, 0.0, False), (1e-2, 0.8, 0.99, 1e-6, 0.05, False),
    (1e-2, 0.9, 0.999, 1e-8, 0.1, True)]


def _tensors(rng, sizes, scale=1.0):
    return [randn(rng, n, scale=scale) for n in sizes]


@pytest.mark.parametrize("via_scalars", [False, True])
@pytest.mark.parametrize("lr,momentum,wd,dampening,nesterov", SGD_OPTIONS)
def test_sgd_step_multi_bitwise(dev, rng, lr, momentum, wd, dampening, nesterov, via_scalars):
    """One launch per 32 tensors gives _cpu.sgd_step's bits, tensor by tensor, over
    a first step (buffer = gradient) and a later one; tensors may differ in it.
    via_scalars: lr and momentum read from device memory (a captured step's
    replays), the arguments' values ignored."""
    params, grads = _tensors(rng, OPTIM_SIZES), _tensors(rng, OPTIM_SIZES)
    bufs = _tensors(rng, OPTIM_SIZES) if momentum else None
    first = [bool(i % 3 == 0) for i in range(len(params))]
    share = float(F32(1.0 - dampening))
    want_p = [p.copy() for p in params]
    want_b = None if bufs is None else [b.copy() for b in bufs]
    for i in range(len(params)):
        _cpu.sgd_step(want_p[i], grads[i], None if bufs is None else want_b[i], lr, momentum, wd,
                      share, dampening != 0, nesterov, first[i])
    got_p = [dev._put(p) for p in params]
    got_b = None if bufs is None else [dev._put(b) for b in bufs]
    scalars = dev._put(np.array([lr, momentum], F32)) if via_scalars else None
    dev.module.sgd_step_multi(got_p, [dev._put(g) for g in grads], got_b, first,
                              99.0 if via_scalars else lr, 0.3 if via_scalars and momentum
                              else momentum, wd, share, dampening != 0, nesterov, scalars=scalars)
    for i in range(len(params)):
        bitwise(dev._get(got_p[i]), want_p[i], f"param {i}")
        if bufs is not None:
            bitwise(dev._get(got_b[i]), want_b[i], f"momentum buffer {i}")


@pytest.mark.parametrize("via_scalars", [False, True])
@pytest.mark.parametrize("lr,b1,b2,eps,wd,decoupled", ADAM_OPTIONS)
def test_adam_step_multi_bitwise(dev, rng, lr, b1, b2, eps, wd, decoupled, via_scalars):
    """Each tensor has its own step count (bias corrections): _cpu.adam_step's bits.
    via_scalars: the decay scale, betas and bias corrections read from device
    memory (a captured step's replays), the arguments' values ignored."""
    params, grads = _tensors(rng, OPTIM_SIZES), _tensors(rng, OPTIM_SIZES)
    m = _tensors(rng, OPTIM_SIZES, 0.1)
    v = [np.abs(a) for a in _tensors(rng, OPTIM_SIZES, 0.01)]
    steps = [1 + i % 4 for i in range(len(params))]
    bias2 = [math.sqrt(1 - b2 ** t) for t in steps]
    sizes = [lr / (1 - b1 ** t) for t in steps]
    l2 = wd if wd and not decoupled else 0.0
    scale = 1 - lr * wd if wd and decoupled else 1.0
    want = [[a.copy() for a in arrays] for arrays in (params, m, v)]
    for i in range(len(params)):
        _cpu.adam_step(want[0][i], grads[i], want[1][i], want[2][i], b1, b2, 1 - b1, 1 - b2, eps,
                       l2, scale, bias2[i], sizes[i])
    got = [[dev._put(a) for a in arrays] for arrays in (params, m, v)]
    if via_scalars:
        n = len(params)
        scalars = dev._put(np.array([scale, b1, 1 - b1, b2, 1 - b2] +
                                    [x for pair in zip(bias2, sizes) for x in pair], F32))
        dev.module.adam_step_multi(got[0], [dev._put(g) for g in grads], got[1], got[2], 0.5,
                                   0.5, 0.5, 0.5, eps, l2, 0.25, [1.0] * n, [0.0] * n,
                                   scalars=scalars)
    else:
        dev.module.adam_step_multi(got[0], [dev._put(g) for g in grads], got[1], got[2], b1, b2,
                                   1 - b1, 1 - b2, eps, l2, scale, bias2, sizes)
    for name, g_list, w_list in zip(("param", "exp_avg", "exp_avg_sq"), got, want):
        for i in range(len(params)):
            bitwise(dev._get(g_list[i]), w_list[i], f"{name} {i}")


@needs_module
@settings(max_examples=30)
@given(sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=40),
       nesterov=st.booleans(), decay=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_multi_tensor_updates_random_lists(sizes, nesterov, decay, seed):
    """Random lists of tensor sizes (empty ones, chunk boundaries, more than one
    launch): the emulated SGD and AdamW updates give the CPU's bits, tensor by tensor."""
    rng = np.random.default_rng(seed)
    emu = _cuda.emulator
    wd = 0.01 if decay else 0.0
    params, grads, bufs = (_tensors(rng, sizes) for _ in range(3))
    first = [bool(b) for b in rng.integers(0, 2, len(sizes))]
    want_p, want_b = [p.copy() for p in params], [b.copy() for b in bufs]
    for i in range(len(sizes)):
        _cpu.sgd_step(want_p[i], grads[i], want_b[i], 0.05, 0.9, wd, 1.0, False, nesterov,
                      first[i])
    emu.sgd_step_multi(params, grads, bufs, first, 0.05, 0.9, wd, 1.0, False, nesterov)
    for i in range(len(sizes)):
        bitwise(params[i], want_p[i], f"sgd param {i}")
        bitwise(bufs[i], want_b[i], f"momentum buffer {i}")
    m, v = _tensors(rng, sizes, 0.1), [np.abs(a) for a in _tensors(rng, sizes, 0.1)]
    steps = rng.integers(1, 100, len(sizes))
    bias2 = [math.sqrt(1 - 0.999 ** int(t)) for t in steps]
    step_sizes = [1e-3 / (1 - 0.9 ** int(t)) for t in steps]
    scale = 1 - 1e-3 * wd if decay else 1.0
    want = [[a.copy() for a in arrays] for arrays in (params, m, v)]
    for i in range(len(sizes)):
        _cpu.adam_step(want[0][i], grads[i], want[1][i], want[2][i], 0.9, 0.999, 0.1, 0.001,
                       1e-8, 0.0, scale, bias2[i], step_sizes[i])
    emu.adam_step_multi(params, grads, m, v, 0.9, 0.999, 0.1, 0.001, 1e-8, 0.0, scale, bias2,
                        step_sizes)
    for name, got, exp in zip(("param", "exp_avg", "exp_avg_sq"), (params, m, v), want):
        for i in range(len(sizes)):
            bitwise(got[i], exp[i], f"adam {name} {i}")


@needs_module
@settings(max_examples=40)
@given(n=st.integers(0, 700), classes=st.integers(1, 12), ignore=st.sampled_from([-100, 0, 3]),
       smoothing=st.sampled_from([0.0, 0.15]), mean=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_cross_entropy_total_random(n, classes, ignore, smoothing, mean, seed):
    """Random row counts (one block strides over them), class counts and ignore
    indices: the emulated total and counts (targets, bad ones, argmax hits with ties
    and NaNs) against NumPy and functional's CPU cross-entropy."""
    rng = np.random.default_rng(seed)
    x = randn(rng, n, classes, scale=3.0)
    t = rng.integers(-1, classes + 1, n).astype(I64)
    if n:  # ties and NaNs for the argmax (NumPy's rule: the first maximum, a NaN first)
        x[rng.integers(0, n, 3), 0] = x[0, -1]
        x[rng.integers(0, n, 2), rng.integers(0, classes, 2)] = np.nan
        x[rng.integers(0, n), :] = 1.0
    valid = t != ignore
    bad = valid & ((t < 0) | (t >= classes))
    total, status = np.full((), np.nan, F32), np.full(3, -7, I64)
    _cuda.emulator.cross_entropy_total(x, t, ignore, smoothing, mean, total, status)
    hits = int((x.argmax(axis=1) == t).sum()) if n else 0
    assert status.tolist() == [int(valid.sum()), int(bad.sum()), hits]
    if bad.any() or np.isnan(x).any():
        return
    want = F.cross_entropy(x, t, reduction="mean" if mean else "sum", ignore_index=ignore,
                           label_smoothing=smoothing)
    close(total, np.asarray(want), max(n, 1) * classes, rtol=1e-6, atol=1e-7)


@needs_module
def test_optim_multi_checks_arguments():
    emu = _cuda.emulator
    p, g = np.zeros(4, F32), np.zeros(4, F32)
    with pytest.raises(ValueError, match="same length"):
        emu.sgd_step_multi([p], [g, g], None, [False], 0.1, 0.0, 0.0, 1.0, False, False)
    with pytest.raises(ValueError, match="grad has shape"):
        emu.sgd_step_multi([p], [np.zeros(5, F32)], None, [False], 0.1, 0.0, 0.0, 1.0, False,
                           False)
    with pytest.raises(ValueError, match="momentum_buffer has shape"):
        emu.sgd_step_multi([p], [g], [np.zeros(3, F32)], [True], 0.1, 0.9, 0.0, 1.0, False, False)
    with pytest.raises(ValueError, match="None"):
        emu.sgd_step_multi([p], [g], [None], [True], 0.1, 0.9, 0.0, 1.0, False, False)
    with pytest.raises(ValueError, match="float32"):
        emu.adam_step_multi([p.astype(np.float64)], [g], [p], [p], 0.9, 0.99, 0.1, 0.01, 1e-8,
                            0.0, 1.0, [1.0], [0.1])
    with pytest.raises(ValueError, match="same length"):
        emu.adam_step_multi([p], [g], [p.copy()], [p.copy()], 0.9, 0.99, 0.1, 0.01, 1e-8, 0.0,
                            1.0, [1.0, 1.0], [0.1])


def _optimizer_cases():
    from fastcnn import optim

    return [(optim.SGD, dict(lr=0.1)), (optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True,
                                                        weight_decay=0.01)),
            (optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.2)),
            (optim.Adam, dict(lr=1e-2, weight_decay=0.05)), (optim.AdamW, dict(lr=1e-2)),
            (optim.SGD, dict(lr=0.05, momentum=0.9, maximize=True)),
            (optim.Adam, dict(lr=1e-2, maximize=True)),
            (optim.AdamW, dict(lr=1e-2, amsgrad=True))]


@needs_module
@pytest.mark.parametrize("case", range(8))
def test_optimizers_gpu_path_gives_cpu_bits(case, monkeypatch):
    """fastcnn.optim's GPU path (one multi-tensor call per group, buffers and step
    counts kept per parameter), run through the emulator on NumPy arrays: the same
    bits as the CPU path, with two groups and a parameter that misses a step."""
    from fastcnn import nn, optim

    cls, kwargs = _optimizer_cases()[case]
    rng = np.random.default_rng(case)
    shapes = [(3, 4), (5,), (40, 60), (7,)]
    start = [rng.standard_normal(s).astype(F32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(F32) for s in shapes] for _ in range(4)]

    def run(gpu_path):
        params = [nn.Parameter(a.copy()) for a in start]
        groups = [{"params": params[:2]}, {"params": params[2:], "lr": kwargs["lr"] / 2}]
        opt = cls(groups, **kwargs)
        with monkeypatch.context() as patch:
            patch.setattr(optim, "_fused_cuda", lambda ps: _cuda.emulator if gpu_path else None)
            for step, step_grads in enumerate(grads):
                opt.zero_grad()
                for i, (p, g) in enumerate(zip(params, step_grads)):
                    if not (i == 1 and step == 1):  # parameter 1 has no gradient at step 1
                        p.accumulate(g.copy())
                opt.step()
        return params, opt

    cpu_params, cpu_opt = run(False)
    gpu_params, gpu_opt = run(True)
    for i, (a, b) in enumerate(zip(gpu_params, cpu_params)):
        bitwise(a.data, b.data, f"param {i}")
    for i, state in cpu_opt.state.items():
        for name, value in state.items():
            other = gpu_opt.state[i][name]
            if isinstance(value, np.ndarray):
                bitwise(other, value, f"state {name} of {i}")
            else:
                assert other == value, (name, i)


# --------------------------------------------------------------------------- GPU only

def _cupy():
    import cupy

    return cupy


@pytest.mark.cuda
@pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))
@pytest.mark.parametrize("fn", ["relu_forward", "sgemm"])
def test_bindings_reject_host_and_bad_arrays(fn):
    cp = _cupy()
    x = cp.zeros((4, 4), cp.float32)
    call = {"relu_forward": lambda a, b: _cuda.relu_forward(a, b),
            "sgemm": lambda a, b: _cuda.sgemm(False, False, 1.0, a, a, 0.0, b)}[fn]
    with pytest.raises(ValueError, match="__cuda_array_interface__"):
        call(np.zeros((4, 4), F32), x)
    with pytest.raises(ValueError, match="float32"):
        call(x.astype(cp.float64), x)
    with pytest.raises(ValueError, match="C-contiguous"):
        call(cp.zeros((4, 8), cp.float32)[:, ::2], x)


@pytest.mark.cuda
@pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))
def test_bindings_read_cupy_arrays_as_their_interface_describes_them():
    """CuPy arrays are read through their attributes (data.ptr, shape, dtype,
    _c_contiguous), not the interface dict: views at an offset, size-0 and
    size-1-strided arrays land where __cuda_array_interface__ says they are."""
    cp = _cupy()
    base = cp.arange(-12, 12, dtype=cp.float32).reshape(6, 4)
    out = cp.full((6, 4), 7.0, cp.float32)
    view, dst = base[2:5], out[1:4]  # contiguous, offset data pointers
    assert view.__cuda_array_interface__["data"][0] == view.data.ptr != base.data.ptr
    _cuda.relu_forward(view, dst)
    want = np.full((6, 4), 7.0, F32)
    want[1:4] = np.maximum(cp.asnumpy(view), 0)
    np.testing.assert_array_equal(cp.asnumpy(out), want)
    _cuda.relu_forward(base[:0], out[:0])  # size 0: nothing to do
    column = cp.asarray(np.array([[-1.0], [2.0], [-3.0]], F32))[:, :1]  # size-1 axis
    dst = cp.zeros((3, 1), cp.float32)
    _cuda.relu_forward(column, dst)
    np.testing.assert_array_equal(cp.asnumpy(dst), [[0.0], [2.0], [0.0]])
    with pytest.raises(ValueError, match="shape"):
        _cuda.relu_forward(view, out)


class TestFunctionalOnGpu:
    """fastcnn.functional with CuPy arrays: CuPy out, same device, CPU's results
    (on the GPU, and through fake_cupy on the emulator)."""

    def test_ops_agree_with_cpu(self, rng, cp):
        x, w, b = randn(rng, 4, 3, 12, 12), randn(rng, 8, 3, 3, 3, scale=0.3), randn(rng, 8)
        gx, gw, gb = (cp.asarray(a) for a in (x, w, b))
        y = F.conv2d(x, w, b, stride=1, padding=1)
        gy = F.conv2d(gx, gw, gb, stride=1, padding=1)
        assert isinstance(gy, cp.ndarray) and gy.dtype == cp.float32
        close(cp.asnumpy(gy), y, 27)
        checks = [
            (lambda m: F.relu(m), x),
            (lambda m: F.max_pool2d(m, 2), x),
            (lambda m: F.softmax(m, dim=1), x),
            (lambda m: F.log_softmax(m, dim=-1), x),
            (lambda m: F.dropout(m, 0.3, seed=7, offset=3), x),
            (lambda m: F.pad(m, (1, 2, 2, 0), "reflect"), x),
            (lambda m: F.pad_backward(m, (4, 3, 11, 9), (1, 2, 0, 1), "circular"), x),
        ]
        for fn, a in checks:
            close(cp.asnumpy(fn(cp.asarray(a))), fn(a), 12, rtol=1e-5, atol=1e-6)
        dy = randn(rng, *y.shape)
        want = F.conv2d_backward(dy, x, w, b, padding=1)
        got = F.conv2d_backward(cp.asarray(dy), gx, gw, gb, padding=1)
        for g, c in zip(got, want):
            close(cp.asnumpy(g), c, 300)

    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    def test_cross_entropy_counts_on_the_device(self, rng, cp, reduction):
        """The GPU path (loss, its sum and the mean's divisor on the device; one wait
        for the target check) against the CPU: every reduction, (N, C, d) layout,
        ignore_index, smoothing, grad_output as a number and as a device array,
        errors, all targets ignored, and the CrossEntropyLoss module."""
        from fastcnn import nn

        x = randn(rng, 9, 5, 3)
        t = rng.integers(0, 5, (9, 3))
        t[0, 0] = -100
        gx, gt = cp.asarray(x), cp.asarray(t)
        for smoothing in (0.0, 0.1):
            want = F.cross_entropy(x, t, reduction=reduction, label_smoothing=smoothing)
            got = F.cross_entropy(gx, gt, reduction=reduction, label_smoothing=smoothing)
            assert isinstance(got, cp.ndarray) and got.shape == np.shape(want)
            close(cp.asnumpy(got), np.asarray(want), 30, rtol=1e-6, atol=1e-7)
            g = 1.5 if reduction != "none" else randn(rng, 9, 3)
            gwant = F.cross_entropy_backward(g, x, t, reduction=reduction,
                                             label_smoothing=smoothing)
            for gg in ((g, cp.asarray(g)) if reduction != "none" else (cp.asarray(g),)):
                ggot = F.cross_entropy_backward(gg, gx, gt, reduction=reduction,
                                                label_smoothing=smoothing)
                close(cp.asnumpy(ggot), gwant, 5, rtol=1e-5, atol=1e-7)
        bad = t.copy()
        bad[1, 1] = 5
        with pytest.raises(ValueError, match="target contains 5"):
            F.cross_entropy(gx, cp.asarray(bad), reduction=reduction)
        with pytest.raises(ValueError, match="target contains 5"):
            F.cross_entropy_backward(1.0 if reduction != "none" else cp.ones((9, 3), cp.float32),
                                     gx, cp.asarray(bad), reduction=reduction)
        ignored = cp.full((9, 3), -100)
        assert (np.isnan(float(F.cross_entropy(gx, ignored, reduction=reduction).sum()))
                == (reduction == "mean"))
        loss_fn, cpu_fn = nn.CrossEntropyLoss(reduction=reduction, label_smoothing=0.1), \
            nn.CrossEntropyLoss(reduction=reduction, label_smoothing=0.1)
        close(cp.asnumpy(loss_fn(gx, gt)), np.asarray(cpu_fn(x, t)), 30, rtol=1e-6, atol=1e-7)
        g = 1.0 if reduction != "none" else randn(rng, 9, 3)
        close(cp.asnumpy(loss_fn.backward(g if reduction != "none" else cp.asarray(g))),
              cpu_fn.backward(g), 5, rtol=1e-5, atol=1e-7)

    def test_relu_max_pool2d_in_one_launch_each_way(self, rng, cp):
        x = randn(rng, 2, 3, 9, 9)
        x[0, 0, :3, :3] = -1.0  # a window with no positive value
        y, idx = F.relu_max_pool2d(x, 3, 2, 1, return_indices=True)
        gy, gidx = F.relu_max_pool2d(cp.asarray(x), 3, 2, 1, return_indices=True)
        bitwise(cp.asnumpy(gy), y, "relu_max_pool2d")
        bitwise(cp.asnumpy(gidx), idx, "indices")
        g = randn(rng, *y.shape)
        want = F.relu_max_pool2d_backward(g, x, 3, 2, 1, indices=idx)
        for indices in (gidx, None):
            got = F.relu_max_pool2d_backward(cp.asarray(g), cp.asarray(x), 3, 2, 1,
                                             indices=indices)
            bitwise(cp.asnumpy(got), want, "relu_max_pool2d_backward")
        with pytest.raises(ValueError, match="indices must lie"):
            F.relu_max_pool2d_backward(cp.asarray(g), cp.asarray(x), 3, 2, 1, indices=gidx + 81)

    def test_dropout_masks_identical(self, cp):
        for shape in ((7,), (3, 5, 11), (64, 128)):
            cpu = F.dropout_mask(shape, 0.4, seed=2024, offset=5)
            x = np.ones(shape, F32)
            got = F.dropout(cp.asarray(x), 0.4, seed=2024, offset=5)
            bitwise(cp.asnumpy(got), x * cpu, "dropout on GPU vs CPU mask")

    def test_mixed_devices_raise(self, rng, cp):
        x = randn(rng, 2, 3, 8, 8)
        w = randn(rng, 4, 3, 3, 3)
        with pytest.raises(ValueError):
            F.conv2d(cp.asarray(x), w)
        with pytest.raises(ValueError):
            F.relu_backward(cp.asarray(x), x)

    @pytest.mark.parametrize("cp", [pytest.param("gpu", marks=gpu_only)], indirect=True)
    def test_runs_on_current_stream(self, rng, cp):
        a, b = randn(rng, 256, 128), randn(rng, 128, 64)
        with cp.cuda.Stream(non_blocking=True) as stream:
            c = F.matmul(cp.asarray(a), cp.asarray(b))
            stream.synchronize()
        close(cp.asnumpy(c), (a.astype(np.float64) @ b).astype(F32), 128)

    def test_training_step_agrees_with_cpu(self, rng, cp):
        """conv - relu - pool - linear - cross-entropy, forward and backward."""
        x, t = randn(rng, 8, 1, 12, 12), rng.integers(0, 10, 8)
        w1, b1 = randn(rng, 6, 1, 3, 3, scale=0.3), randn(rng, 6, scale=0.1)
        w2, b2 = randn(rng, 10, 6 * 36, scale=0.05), randn(rng, 10, scale=0.1)

        def step(x, t, w1, b1, w2, b2):
            h = F.conv2d(x, w1, b1, padding=1)
            a = F.relu(h)
            p = F.max_pool2d(a, 2)
            flat = p.reshape(p.shape[0], -1)
            logits = F.linear(flat, w2, b2)
            loss = F.cross_entropy(logits, t)
            g = F.cross_entropy_backward(1.0, logits, t)
            gflat, gw2, gb2 = F.linear_backward(g, flat, w2, b2)
            gp = gflat.reshape(p.shape)
            ga = F.max_pool2d_backward(gp, a, 2)
            gh = F.relu_backward(ga, h)
            _, gw1, gb1 = F.conv2d_backward(gh, x, w1, b1, padding=1)
            return loss, gw1, gb1, gw2, gb2

        want = step(x, t, w1, b1, w2, b2)
        got = step(*(cp.asarray(v) for v in (x, t, w1, b1, w2, b2)))
        for g, c in zip(got, want):
            close(np.asarray(cp.asnumpy(g)), np.asarray(c), 300, rtol=1e-4, atol=1e-5)


class TestModelsOnGpu:
    """model.to("cuda"): training steps, the optimizers' multi-tensor path, the
    trainer, inference and the visualisations, against the same model on the CPU."""

    @staticmethod
    def _models(batchnorm, seed=0):
        from fastcnn import models

        cpu = models.mnist_cnn(batchnorm=batchnorm, channels=(4, 8), hidden=16, input_size=12,
                               seed=seed)
        gpu = models.mnist_cnn(batchnorm=batchnorm, channels=(4, 8), hidden=16, input_size=12,
                               seed=seed).to("cuda")
        return cpu, gpu

    @pytest.mark.parametrize("batchnorm", [False, True])
    @pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
    def test_training_steps_agree_with_cpu(self, rng, cp, batchnorm, opt_name, monkeypatch):
        from fastcnn import nn, optim

        calls = []
        fused = optim._fused_cuda
        monkeypatch.setattr(optim, "_fused_cuda",
                            lambda ps: calls.append(len(ps)) or fused(ps))
        cpu, gpu = self._models(batchnorm)
        assert gpu.device == "cuda"
        opts = [optim.build_optimizer(opt_name, m.parameters(), 0.05 if opt_name == "sgd"
                                      else 1e-2, weight_decay=1e-3) for m in (cpu, gpu)]
        loss_fns = [nn.CrossEntropyLoss(), nn.CrossEntropyLoss()]
        for step in range(3):
            x, t = randn(rng, 6, 1, 12, 12), rng.integers(0, 10, 6)
            losses = []
            for model, opt, loss_fn, put in zip((cpu, gpu), opts, loss_fns,
                                                (np.asarray, cp.asarray)):
                opt.zero_grad()
                losses.append(loss_fn(model(put(x)), put(t)))
                model.backward(loss_fn.backward(), input_grad=False)
                opt.step()
            assert isinstance(losses[1], cp.ndarray)
            close(np.asarray(cp.asnumpy(losses[1])), np.asarray(losses[0]), 1, rtol=1e-4,
                  atol=1e-5, name=f"loss at step {step}")
        assert calls and all(n > 0 for n in calls)  # the GPU took the multi-tensor path
        for (name, a), (_, b) in zip(cpu.state_dict().items(), gpu.state_dict().items()):
            if batchnorm and opt_name != "sgd" and (
                    (name.startswith("conv") and "bias" in name) or "running_mean" in name):
                # A conv bias before a batch norm has a ~0 gradient, so Adam's steps
                # there follow its rounding, and the running mean follows the bias.
                continue
            close(cp.asnumpy(b), a, 100, rtol=1e-3, atol=1e-4, name=name)

    def test_layers_made_on_the_gpu(self, rng, cp):
        """device='cuda' as torch's factory argument: the parameters and float buffers
        are CuPy arrays from the start, the same values as made on the CPU then moved."""
        from fastcnn import nn

        for make in (lambda **kw: nn.Conv2d(1, 4, 3, rng=3, **kw),
                     lambda **kw: nn.Linear(6, 2, rng=3, **kw),
                     lambda **kw: nn.BatchNorm2d(4, **kw)):
            gpu, cpu = make(device="cuda"), make()
            assert gpu.device == "cuda" and isinstance(gpu.weight.data, cp.ndarray)
            for (name, a), b in zip(cpu.state_dict().items(), gpu.state_dict().values()):
                bitwise(cp.asnumpy(b) if isinstance(b, cp.ndarray) else b, a, name)

    def test_padding_modes_on_the_gpu(self, rng, cp):
        """Conv2d(padding_mode=) pads CuPy input on the device, forward and backward."""
        from fastcnn import nn

        for mode in ("reflect", "replicate", "circular"):
            cpu = nn.Conv2d(3, 4, 3, padding=(1, 2), padding_mode=mode, rng=2)
            gpu = nn.Conv2d(3, 4, 3, padding=(1, 2), padding_mode=mode, rng=2).to("cuda")
            x, g = randn(rng, 2, 3, 6, 5), randn(rng, 2, 4, 6, 7)
            y = gpu.forward(cp.asarray(x))
            assert isinstance(y, cp.ndarray)
            close(cp.asnumpy(y), cpu.forward(x), 27, name=mode)
            close(cp.asnumpy(gpu.backward(cp.asarray(g))), cpu.backward(g), 36, name=mode)
            close(cp.asnumpy(gpu.weight.grad), cpu.weight.grad, 100, name=mode)

    def test_gradient_clipping_on_the_gpu(self, rng, cp):
        """nn.utils.clip_grad_norm_ / clip_grad_value_ on CuPy gradients, as on the CPU."""
        from fastcnn import nn

        cpu, gpu = self._models(False)
        x, t = randn(rng, 4, 1, 12, 12), rng.integers(0, 10, 4)
        for model, put in ((cpu, np.asarray), (gpu, cp.asarray)):
            loss_fn = nn.CrossEntropyLoss()
            loss_fn(model(put(x)), put(t))
            model.backward(loss_fn.backward(), input_grad=False)
        totals = [nn.utils.clip_grad_norm_(m.parameters(), 0.05) for m in (cpu, gpu)]
        assert isinstance(totals[1], cp.ndarray)
        close(cp.asnumpy(totals[1]), np.asarray(totals[0]), 10, rtol=1e-4, atol=1e-6)
        for m in (cpu, gpu):
            nn.utils.clip_grad_value_(m.parameters(), 1e-3)
        for (name, a), b in zip(cpu.named_parameters(), gpu.parameters()):
            close(cp.asnumpy(b.grad), a.grad, 10, rtol=1e-4, atol=1e-7, name=name)

    def test_class_weighted_loss_on_the_gpu(self, rng, cp):
        """CrossEntropyLoss(weight=) on CuPy arrays gives the CPU's loss and gradient;
        the Trainer moves such a loss's weights beside the model."""
        from fastcnn import data, models, nn, optim, train

        x, t = randn(rng, 6, 10), rng.integers(0, 10, 6)
        t[1] = -100
        w = rng.uniform(0.2, 2.0, 10).astype(F32)
        for kw in (dict(), dict(label_smoothing=0.2), dict(reduction="none")):
            on_cpu = nn.CrossEntropyLoss(weight=w, **kw)
            on_gpu = nn.CrossEntropyLoss(weight=w, **kw).to("cuda")
            close(cp.asnumpy(on_gpu(cp.asarray(x), cp.asarray(t))), np.asarray(on_cpu(x, t)),
                  10, rtol=1e-5, atol=1e-6, name=f"weighted loss {kw}")
            g = randn(rng, 6) if kw.get("reduction") == "none" else 1.0
            close(cp.asnumpy(on_gpu.backward(cp.asarray(g) if kw else g)), on_cpu.backward(g),
                  10, rtol=1e-5, atol=1e-6, name=f"weighted gradient {kw}")
        probs = rng.random((6, 10)).astype(F32)
        probs /= probs.sum(axis=1, keepdims=True)
        for weight in (None, w):  # class probabilities as targets, on the GPU too
            close(cp.asnumpy(F.cross_entropy(cp.asarray(x), cp.asarray(probs),
                                             None if weight is None else cp.asarray(weight))),
                  np.asarray(F.cross_entropy(x, probs, weight)), 10, rtol=1e-5, atol=1e-6)
            close(cp.asnumpy(F.cross_entropy_backward(
                1.0, cp.asarray(x), cp.asarray(probs),
                weight=None if weight is None else cp.asarray(weight))),
                F.cross_entropy_backward(1.0, x, probs, weight=weight), 10, rtol=1e-5,
                atol=1e-6, name="soft gradient")
        dataset = data.Dataset(rng.integers(0, 256, (16, 12, 12)).astype(np.uint8),
                               rng.integers(0, 10, 16), name="random")
        model = models.mnist_cnn(channels=(4, 8), hidden=16, input_size=12).to("cuda")
        history = train.Trainer(nn.CrossEntropyLoss(weight=w), progress=False, log=None).fit(
            model, dataset, epochs=1, optimizer=optim.SGD(model.parameters(), lr=0.01),
            batch_size=8)
        assert math.isfinite(history[0]["loss"])

    @pytest.mark.parametrize("cp", ["fake"], indirect=True)
    @pytest.mark.parametrize("batchnorm,most", [(False, 31), (True, 41)])
    def test_training_step_launches_and_host_reads(self, rng, cp, batchnorm, most, monkeypatch):
        """A training step of the reference CNN on the GPU path: how many kernels it
        launches (small CNNs are launch-bound) and how often it waits for the GPU,
        counted on the emulator with the GPU's workspace budget. Once for the
        target check; the optimizer is one launch, cross-entropy three, fc1's ReLU
        none (in the GEMM's epilogue)."""
        from fastcnn import models, nn, optim

        emu = _cuda.emulator
        emu.use_gpu_workspace_budget(True)
        try:
            model = models.mnist_cnn(batchnorm=batchnorm, seed=0).to("cuda")
            loss_fn, opt = nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.01,
                                                            momentum=0.9)
            x = cp.asarray(randn(rng, 16, 1, 28, 28))
            y = cp.asarray(rng.integers(0, 10, 16))
            for step in range(2):  # the first creates the momentum buffers
                before, reads = dict(emu.launches()), fake_cupy.ndarray.host_reads
                opt.zero_grad()
                loss_fn(model(x), y)
                model.backward(loss_fn.backward(), input_grad=False)
                opt.step()
                after = emu.launches()
                launched = {k: v - before.get(k, 0) for k, v in after.items()
                            if v != before.get(k, 0)}
                assert sum(launched.values()) <= most, launched
                assert launched["sgd_step"] == 1 and "relu_forward" not in launched, launched
                assert fake_cupy.ndarray.host_reads - reads == 1
        finally:
            emu.use_gpu_workspace_budget(False)

    def test_conv_and_linear_take_the_relu_into_their_gemm(self, rng, cp):
        """Conv2d -> ReLU and Linear -> ReLU run as one GEMM each on the GPU (not
        before a MaxPool2d, nor for a guided ReLU), in training and record=False:
        the same bits as unfused, forward and backward; the ReLU's activation is
        recorded, the layer's own output is not."""
        from fastcnn import nn

        def build():
            return nn.Sequential(OrderedDict(
                conv1=nn.Conv2d(2, 4, 3, padding=1, rng=1), relu1=nn.ReLU(),
                conv2=nn.Conv2d(4, 4, 3, padding=1, rng=2), relu2=nn.ReLU(),
                pool=nn.MaxPool2d(2), flatten=nn.Flatten(),
                fc1=nn.Linear(4 * 16, 8, rng=3), relu3=nn.ReLU(guided=True),
                fc2=nn.Linear(8, 6, rng=4), relu4=nn.ReLU(), fc3=nn.Linear(6, 3, rng=5))).to("cuda")

        x, g = cp.asarray(randn(rng, 3, 2, 8, 8)), cp.asarray(randn(rng, 3, 3))
        fused, plain = build(), build()
        plain.fuse = False
        outs = [m(x) for m in (fused, plain)]
        bitwise(cp.asnumpy(outs[0]), cp.asnumpy(outs[1]), "forward")
        assert "conv1" not in fused.activations and "fc2" not in fused.activations
        for name in ("relu1", "conv2", "fc1", "relu3", "relu4"):  # unfused: conv2 (a pool
            assert name in fused.activations, name                 # follows), fc1 (guided)
        grads = [m.backward(g) for m in (fused, plain)]
        bitwise(cp.asnumpy(grads[0]), cp.asnumpy(grads[1]), "input gradient")
        for (name, a), (_, b) in zip(fused.named_parameters(), plain.named_parameters()):
            bitwise(cp.asnumpy(a.grad), cp.asnumpy(b.grad), name)
        for m in (fused, plain):
            m.eval()
        bitwise(cp.asnumpy(fused.forward(x, record=False)), cp.asnumpy(plain(x)), "record=False")

    @staticmethod
    def _train(cp, graph, opt_name, batchnorm, steps=5, check=None, schedule="cosine"):
        """`steps` training steps of a small CNN (dropout, optional batch norm, a
        per-step cosine schedule, or OneCycleLR's, which cycles the momentum or
        Adam's beta1 too), eager or through a CapturedStep."""
        import fastcnn.cuda
        from fastcnn import models, nn, optim

        model = models.mnist_cnn(batchnorm=batchnorm, channels=(4, 8), hidden=16, input_size=12,
                                 seed=0).to("cuda")
        opt = optim.build_optimizer(opt_name, model.parameters(),
                                    0.05 if opt_name == "sgd" else 1e-2, weight_decay=1e-3)
        if schedule == "cosine":
            sched = optim.CosineAnnealingLR(opt, T_max=10, warmup=2, interval="step")
        else:
            sched = optim.OneCycleLR(opt, max_lr=0.1, total_steps=steps + 1, pct_start=0.4)
        loss_fn = nn.CrossEntropyLoss()
        step = fastcnn.cuda.CapturedStep(model, loss_fn, opt) if graph else None
        data = np.random.default_rng(1)
        losses = []
        for i in range(steps):
            x, y = randn(data, 6, 1, 12, 12), data.integers(0, 10, 6)
            if i % 2:  # device batches as well as host ones
                x, y = cp.asarray(x), cp.asarray(y)
            if step is not None:
                loss = step(x, y)
            else:
                opt.zero_grad()
                loss = loss_fn(model(cp.asarray(x)), cp.asarray(y))
                model.backward(loss_fn.backward(), input_grad=False)
                opt.step()
            losses.append(float(loss))
            sched.step()
            if check is not None:
                check(i, step)
        return model, opt, losses, step

    @pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
    @pytest.mark.parametrize("batchnorm", [False, True])
    def test_captured_step_gives_the_eager_steps_bits(self, rng, cp, opt_name, batchnorm):
        """Replays of one captured graph train as eager steps do, to the bit: losses,
        weights, BN statistics and counters, Dropout offsets (a new mask each step),
        optimizer state, with the lr changed by the schedule at every step."""
        emu = _cuda.emulator
        replays, waits = [], []

        def count(i, step):
            replays.append(dict(emu.launches()).get("sgd_step" if opt_name == "sgd"
                                                    else "adam_step", 0))
            waits.append(getattr(cp.ndarray, "host_waits", 0))

        eager, eager_opt, eager_losses, _ = self._train(cp, False, opt_name, batchnorm)
        model, opt, losses, step = self._train(cp, True, opt_name, batchnorm, check=count)
        assert step.captures == 1
        self._same_training(cp, eager, eager_opt, eager_losses, model, opt, losses)
        if isinstance(cp.ndarray, type) and cp.ndarray.__module__ == "cupy" and hasattr(
                cp.ndarray, "host_reads"):  # the stand-in: every step updated once
            assert np.diff(replays).tolist() == [1] * (len(replays) - 1)
            # ... and no replay's inputs waited for the GPU (asynchronous uploads)
            assert waits == [waits[0]] * len(waits), waits

    @staticmethod
    def _same_training(cp, eager, eager_opt, eager_losses, model, opt, losses):
        assert losses == eager_losses
        for (name, a), (_, b) in zip(eager.state_dict().items(), model.state_dict().items()):
            bitwise(cp.asnumpy(b), cp.asnumpy(a), name)
        for i, state in eager_opt.state.items():
            for key, value in state.items():
                if isinstance(value, (int, float)):
                    assert opt.state[i][key] == value, (i, key)
                else:
                    bitwise(cp.asnumpy(opt.state[i][key]), cp.asnumpy(value), f"{key} of {i}")

    @pytest.mark.parametrize("opt_name", ["sgd", "adam"])
    def test_one_cycle_momentum_replays_one_graph(self, rng, cp, opt_name):
        """OneCycleLR changes the lr and SGD's momentum (Adam's beta1) at every
        step: the replays read both from device scalars, so one graph serves
        every step and trains as the eager steps, to the bit."""
        momenta = []

        def seen(i, step):
            group = step.optimizer.param_groups[0]
            momenta.append(group["momentum"] if opt_name == "sgd" else group["betas"][0])

        eager, eager_opt, eager_losses, _ = self._train(cp, False, opt_name, False, steps=6,
                                                        schedule="one_cycle")
        model, opt, losses, step = self._train(cp, True, opt_name, False, steps=6,
                                               schedule="one_cycle", check=seen)
        assert len(set(momenta)) == len(momenta)  # a new momentum at every step
        assert step.captures == 1
        self._same_training(cp, eager, eager_opt, eager_losses, model, opt, losses)

    def test_captured_step_recaptures_checks_and_refuses(self, rng, cp):
        import fastcnn.cuda
        from fastcnn import models, nn, optim

        model = models.mnist_cnn(channels=(4, 8), hidden=16, input_size=12, seed=0).to("cuda")
        step = fastcnn.cuda.CapturedStep(model, nn.CrossEntropyLoss(),
                                         optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
        batch = lambda n: (randn(rng, n, 1, 12, 12), rng.integers(0, 10, n))  # noqa: E731
        for n in (4, 4, 4, 5, 5):
            assert math.isfinite(float(step(*batch(n))))
        assert step.captures == 2  # the first call is eager; a new batch size recaptures
        model.eval()
        model.train()
        step(*batch(5))
        assert step.captures == 2  # back to the same state: the same graph
        model.dropout.p = 0.25
        step(*batch(5))
        assert step.captures == 3  # a layer's setting changed
        step.optimizer.load_state_dict(step.optimizer.state_dict())
        step(*batch(5))
        assert step.captures == 4  # new momentum buffers: the old graph would update the old ones
        step.optimizer.param_groups[0]["momentum"] = 0.5
        step(*batch(5))
        assert step.captures == 4  # read from a device scalar at every replay
        step.optimizer.param_groups[0]["weight_decay"] = 1e-4
        step(*batch(5))
        assert step.captures == 5  # another option: another graph
        assert len(step._pools) == 5  # each capture's pool kept (results may outlive a graph)
        x, y = batch(5)
        y[2] = 10
        with pytest.raises(ValueError, match="target contains 10"):
            step(x, y)
        with pytest.raises(ValueError, match="target contains 10"):
            step(cp.asarray(x), cp.asarray(y))
        bn = models.mnist_cnn(batchnorm=True, channels=(4, 8), hidden=16, input_size=12).to("cuda")
        bn.bn1.momentum = None
        cumulative = fastcnn.cuda.CapturedStep(bn, optimizer=optim.Adam(bn.parameters()))
        cumulative(*batch(4))  # eager
        with pytest.raises(fastcnn.cuda.CaptureError, match="momentum=None"):
            cumulative(*batch(4))
        with pytest.raises(ValueError, match="on the GPU"):
            fastcnn.cuda.CapturedStep(models.mnist_cnn())
        ams = fastcnn.cuda.CapturedStep(model, optimizer=optim.Adam(model.parameters(),
                                                                    amsgrad=True))
        ams(*batch(4))  # eager
        with pytest.raises(fastcnn.cuda.CaptureError, match="amsgrad"):
            ams(*batch(4))
        # fallback: the step that cannot be captured runs eagerly, as do the next ones
        eager = fastcnn.cuda.CapturedStep(bn, optimizer=optim.Adam(bn.parameters()),
                                          fallback=True)
        counts = int(bn.bn2.num_batches_tracked)
        for _ in range(3):
            assert math.isfinite(float(eager(*batch(4))))
        assert "momentum=None" in eager.disabled and eager.captures == 0
        assert int(bn.bn2.num_batches_tracked) == counts + 3

    @pytest.mark.parametrize("batchnorm", [False, True])
    def test_inference_on_the_gpu_is_replayed_as_a_graph(self, rng, cp, batchnorm):
        """forward(x, record=False) in eval mode on GPU arrays: the layers' bits at
        every call, replayed as a graph from the third call of a shape; outputs are
        copies; weights changed in place are read (no new capture), a replaced
        parameter or another shape captures again."""
        from fastcnn import models

        model = models.mnist_cnn(batchnorm=batchnorm, channels=(4, 8), hidden=16,
                                 input_size=12, seed=0).to("cuda")
        model.eval()
        xs = [cp.asarray(randn(rng, 3, 1, 12, 12)) for _ in range(5)]
        outs = [model.forward(x, record=False) for x in xs]
        for x, out in zip(xs, outs):  # earlier outputs are not overwritten by replays
            bitwise(cp.asnumpy(out), cp.asnumpy(model(x)), "inference")
        plan = model._gpu_plan
        assert plan.disabled is None and plan.shapes == [(3, 1, 12, 12)]
        fake = hasattr(cp.ndarray, "host_reads")
        if fake:
            before = dict(_cuda.emulator.launches())
        model.fc2.weight.data[...] = model.fc2.weight.data * 2  # in place: the graph reads it
        again = model.forward(xs[0], record=False)
        bitwise(cp.asnumpy(again), cp.asnumpy(model(xs[0])), "after an in-place change")
        if fake:  # replayed, not captured again
            after = _cuda.emulator.launches()
            assert not any(after[k] != before.get(k) for k in after if k.startswith("captured"))
        graph = plan._graphs[(3, 1, 12, 12)]
        model.fc2.weight.data = model.fc2.weight.data * 0.5  # replaced: state version bumped
        for _ in range(2):
            bitwise(cp.asnumpy(model.forward(xs[1], record=False)), cp.asnumpy(model(xs[1])),
                    "after a replaced parameter")
        assert plan._graphs[(3, 1, 12, 12)] is not graph
        # An evaluation loop's full batches and its last one, epoch after epoch:
        # a graph for each shape, each captured once.
        small = cp.asarray(randn(rng, 2, 1, 12, 12))
        for epoch in range(4):
            for x in (xs[2], xs[3], small):
                bitwise(cp.asnumpy(model.forward(x, record=False)), cp.asnumpy(model(x)),
                        "two shapes in turn")
            if epoch == 1:  # small's second call captured it
                graphs = dict(plan._graphs)
        assert plan.shapes == [(3, 1, 12, 12), (2, 1, 12, 12)]
        assert all(plan._graphs[k] is v for k, v in graphs.items()) and len(graphs) == 2
        # At most max_shapes graphs, the least recently used dropped first.
        for n in range(4, 4 + plan.max_shapes):
            x = cp.asarray(randn(rng, n, 1, 12, 12))
            for _ in range(3):
                bitwise(cp.asnumpy(model.forward(x, record=False)), cp.asnumpy(model(x)),
                        "more shapes")
        assert plan.shapes == [(n, 1, 12, 12) for n in range(4, 4 + plan.max_shapes)]

    @pytest.mark.parametrize("cp", ["fake"], indirect=True)
    @pytest.mark.parametrize("graph", [False, True])
    def test_trainer_waits_for_the_gpu_only_at_the_end_of_an_epoch(self, rng, cp, graph):
        """Labels from the host are checked there, losses and hits stay on the device:
        an epoch of eager or replayed steps reads back twice (losses, hits) at its end."""
        from fastcnn import data, models, optim, train

        dataset = data.Dataset(rng.integers(0, 256, (40, 12, 12)).astype(np.uint8),
                               rng.integers(0, 10, 40), name="random")
        model = models.mnist_cnn(channels=(4, 8), hidden=16, input_size=12).to("cuda")
        trainer = train.Trainer(progress=False, log=None, cuda_graph=graph)
        reads = fake_cupy.ndarray.host_reads
        trainer.fit(model, dataset, epochs=1, optimizer=optim.SGD(model.parameters(), lr=0.01),
                    batch_size=8)
        assert fake_cupy.ndarray.host_reads - reads == 2
        bad = data.Dataset(dataset.images, np.full(40, 10), name="bad labels")
        with pytest.raises(ValueError, match="target contains 10"):
            trainer.fit(model, bad, epochs=1, batch_size=8)

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_trainer_with_cuda_graph_trains_as_eager(self, cp, seed):
        """The same history and weights (the capture step's hits are its eager run's:
        they were read from the graph's buffer, a replay's count or garbage)."""
        from fastcnn import data, models, optim, train

        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (44, 12, 12)).astype(np.uint8)
        dataset = data.Dataset(images, rng.integers(0, 10, 44), name="random")
        runs = []
        for graph in (False, True):
            model = models.mnist_cnn(batchnorm=True, channels=(4, 8), hidden=16, input_size=12,
                                     seed=0).to("cuda")
            opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            history = train.Trainer(progress=False, log=None, cuda_graph=graph).fit(
                model, dataset, epochs=2, optimizer=opt, batch_size=8)  # 5 full + 1 of 4
            runs.append((history, {k: cp.asnumpy(v) for k, v in model.state_dict().items()}))
        for key in ("loss", "accuracy"):
            assert [h[key] for h in runs[0][0]] == [h[key] for h in runs[1][0]], key
        for name in runs[0][1]:
            bitwise(runs[1][1][name], runs[0][1][name], name)

    def test_trainer_evaluate_predict_and_inference(self, rng, cp):
        from fastcnn import data, train

        images = rng.integers(0, 256, (40, 12, 12)).astype(np.uint8)
        labels = rng.integers(0, 10, 40)
        dataset = data.Dataset(images, labels, name="random")
        cpu, gpu = self._models(True)
        trainer = train.Trainer(progress=True, log=None)
        history = trainer.fit(gpu, dataset, epochs=2, batch_size=8)
        assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)
        assert 0 <= history[-1]["accuracy"] <= 1
        result = train.evaluate(gpu, dataset)
        assert math.isfinite(result.loss) and result.confusion.sum() == 40
        probs = train.predict(gpu, dataset)
        assert isinstance(probs, cp.ndarray) and probs.shape == (40, 10)
        cpu.load_state_dict({k: cp.asnumpy(v) for k, v in gpu.state_dict().items()})
        close(cp.asnumpy(probs), train.predict(cpu, dataset), 10, rtol=1e-4, atol=1e-5)
        gpu.eval()
        x = cp.asarray(randn(rng, 3, 1, 12, 12))
        close(cp.asnumpy(gpu.forward(x, record=False)), cp.asnumpy(gpu.forward(x)), 10)

    def test_visualisations_agree_with_cpu(self, rng, cp):
        from fastcnn import viz

        cpu, gpu = self._models(True, seed=1)
        for m in (cpu, gpu):
            m.eval()
        x = randn(rng, 2, 1, 12, 12)
        gx = cp.asarray(x)
        cases = {
            "saliency": lambda m, a: viz.saliency(m, a),
            "guided_backprop": lambda m, a: viz.guided_backprop(m, a),
            "grad_cam": lambda m, a: viz.grad_cam(m, a),
            "guided_grad_cam": lambda m, a: viz.guided_grad_cam(m, a),
            "grad_cam_nearest": lambda m, a: viz.grad_cam(m, a, relu=False,
                                                          interpolate="nearest"),
            "smooth_grad": lambda m, a: viz.smooth_grad(m, a, n_samples=4, seed=3),
            "vargrad": lambda m, a: viz.smooth_grad(m, a, method="gradient", n_samples=3,
                                                    stdev=0.2, nt_type="vargrad"),
            "feature_maps": lambda m, a: viz.feature_maps(m, a, "relu2"),
            "occlusion": lambda m, a: viz.occlusion(m, a, window=3, stride=2).heatmap,
            "deconvolution": lambda m, a: viz.deconvolution(m, a),
            "input_x_gradient": lambda m, a: viz.input_x_gradient(m, a, score="probability"),
            "integrated_gradients": lambda m, a: viz.integrated_gradients(
                m, a, n_steps=5, batch_size=3, baseline=a[:1]),
            "deep_lift": lambda m, a: viz.deep_lift(m, a, baseline=a[:1] * 0.5),
            "gradient_shap": lambda m, a: viz.gradient_shap(m, a, a[::-1] * 0.5, n_samples=3,
                                                            stdev=0.1, batch_size=4),
            "layer_ig": lambda m, a: viz.layer_integrated_gradients(m, a, "relu1", n_steps=4,
                                                                    batch_size=3),
            "internal_influence": lambda m, a: viz.internal_influence(m, a, "relu2", n_steps=3,
                                                                      batch_size=4),
            "neuron_conductance": lambda m, a: viz.neuron_conductance(
                m, a, "relu2", 1, position="max", n_steps=3, batch_size=4, baseline=0.1),
            "layer_feature_ablation": lambda m, a: viz.layer_feature_ablation(
                m, a, "relu2", layer_mask=np.arange(8)[:, None, None] // 3, layer_baseline=0.1,
                batch_size=4),
            "layer_feature_permutation": lambda m, a: viz.layer_feature_permutation(
                m, a, "relu1", layer_mask=np.arange(4)[:, None, None] // 2, seed=3,
                batch_size=3),
            "channel_importance": lambda m, a: viz.channel_importance(m, a, "relu2"),
            "channel_conductance": lambda m, a: viz.channel_importance(
                m, a, "relu1", method="conductance", n_steps=3, batch_size=4),
            "layer_lrp": lambda m, a: viz.layer_lrp(m, a, "pool1",
                                                    rules={"conv2": viz.GammaRule(0.25)}),
            "neuron_deep_lift": lambda m, a: viz.deep_lift(m, a, baseline=0.1, layer="relu2",
                                                           channel=1, position="max"),
            "neuron_deep_lift_shap": lambda m, a: viz.deep_lift_shap(
                m, a, a[::-1] * 0.5, layer="fc1", channel=2, batch_size=3),
            "neuron_gradient_shap": lambda m, a: viz.gradient_shap(
                m, a, a[::-1] * 0.5, layer="relu2", channel=0, position=(1, 1), n_samples=3,
                batch_size=4),
            "neuron_feature_ablation": lambda m, a: viz.feature_ablation(
                m, a, feature_mask=np.arange(144).reshape(12, 12) // 7, layer="relu2",
                channel=1, position="max", batch_size=9),
            "layer_deep_lift_shap": lambda m, a: viz.layer_deep_lift_shap(
                m, a, "relu1", a[::-1] * 0.5, batch_size=3),
            "layer_gradient_shap": lambda m, a: viz.layer_gradient_shap(
                m, a, "relu1", a[::-1] * 0.5, n_samples=3, stdev=0.1, batch_size=4),
            "gradient_shap_delta": lambda m, a: viz.gradient_shap(
                m, a, a[::-1] * 0.5, n_samples=3, batch_size=4, return_convergence_delta=True)[1],
            "smooth_deeplift": lambda m, a: viz.smooth_grad(m, a, method="deeplift", n_samples=2,
                                                            stdev=0.1),
            "feature_permutation": lambda m, a: viz.feature_permutation(
                m, a, feature_mask=np.arange(144).reshape(12, 12) // 16, seed=2, batch_size=5),
            "feature_ablation": lambda m, a: viz.feature_ablation(
                m, a, feature_mask=np.arange(144).reshape(12, 12) // 7, baseline=0.2,
                score="probability", batch_size=9),
            "deep_lift_delta": lambda m, a: viz.deep_lift(m, a, return_convergence_delta=True)[1],
            "layer_deep_lift": lambda m, a: viz.layer_deep_lift(m, a, "relu1",
                                                                baseline=a[:1] * 0.5),
            "layer_deep_lift_input": lambda m, a: viz.layer_deep_lift(
                m, a, "relu2", attribute_to_layer_input=True, return_convergence_delta=True)[0],
            "shapley": lambda m, a: viz.shapley_values(
                m, a, feature_mask=np.arange(144).reshape(12, 12) // 29, baseline=0.1,
                batch_size=7),
            "shapley_sampling": lambda m, a: viz.shapley_value_sampling(
                m, a, feature_mask=np.arange(144).reshape(12, 12) // 13, n_samples=3,
                score="probability", batch_size=8),
            "kernel_shap": lambda m, a: viz.kernel_shap(
                m, a, feature_mask=np.arange(144).reshape(12, 12) // 13, n_samples=16,
                baseline=0.1, batch_size=7),
            "lime": lambda m, a: viz.lime(
                m, a, feature_mask=np.arange(144).reshape(12, 12) // 13, n_samples=16,
                alpha=0.0005, distance="euclidean", kernel_width=5.0, batch_size=7),
            "deep_lift_shap": lambda m, a: viz.deep_lift_shap(m, a, a[::-1] * 0.3, batch_size=3),
            "maximize": lambda m, a: viz.maximize_activation(
                m, "relu2", [0, 2], shape=(1, 12, 12), steps=4, lr=0.1).images,
            "integrated_delta": lambda m, a: viz.integrated_gradients(
                m, a, n_steps=4, method="riemann_trapezoid", return_convergence_delta=True)[1],
            "lrp": lambda m, a: viz.lrp(m, a, rules={"conv1": viz.GammaRule(0.5),
                                                     "fc1": viz.Alpha1Beta0Rule()}),
            "lrp_delta": lambda m, a: viz.lrp(m, a, return_convergence_delta=True)[1],
            "lrp_composite": lambda m, a: viz.lrp(
                m, a, rules=viz.lrp_composite(m, np.array([-1.0])[:, None, None], 2.0),
                fold_batchnorm=True),
            "layer_conductance": lambda m, a: viz.layer_conductance(
                m, a, "conv2", n_steps=4, batch_size=3, baseline=a[:1] * 0.5),
            "layer_gxa": lambda m, a: viz.layer_gradient_x_activation(
                m, a, "pool1", attribute_to_layer_input=True),
            "layer_ig_input": lambda m, a: viz.layer_integrated_gradients(
                m, a, "fc1", n_steps=3, attribute_to_layer_input=True),
            "infidelity": lambda m, a: viz.infidelity(m, a, viz.gradient(m, a), n_samples=3,
                                                      stdev=0.2, batch_size=4) * 1e4,
            "infidelity_subset": lambda m, a: viz.infidelity(
                m, a, viz.input_x_gradient(m, a), perturb="subset", normalize=True,
                feature_mask=np.arange(144).reshape(12, 12) // 13, n_samples=3, batch_size=4),
            "sensitivity_max": lambda m, a: viz.sensitivity_max("saliency", m, a, n_samples=2,
                                                                radius=0.1),
            "concept_vector": lambda m, a: viz.concept_vector(
                m, "relu1", a, a[::-1] * 0.5 + 0.1, test_fraction=0.0).vector,
        }
        for name, fn in cases.items():
            got = fn(gpu, gx)
            assert isinstance(got, cp.ndarray), name
            close(cp.asnumpy(got), np.asarray(fn(cpu, x)), 50, rtol=1e-3, atol=1e-4, name=name)
        bitwise(cp.asnumpy(viz.filters(gpu)), np.asarray(viz.filters(cpu)), "filters")
        report = viz.explain(gpu, gx[0], methods="all", n_samples=4)
        assert report is not None
        pool = randn(rng, 6, 1, 12, 12)
        tcav = [viz.tcav(m, a, "pool1", c, p, runs=2) for m, a, c, p in (
            (gpu, gx, gx * 0.5, cp.asarray(pool)), (cpu, x, x * 0.5, pool))]
        np.testing.assert_array_equal(tcav[0].scores, tcav[1].scores)
        close(tcav[0].derivatives, tcav[1].derivatives, 50, rtol=1e-3, atol=1e-4, name="tcav")
        per_class = [viz.class_channel_importance(m, a, np.array([1, 3]), "relu2")
                     for m, a in ((gpu, gx), (cpu, x))]
        close(per_class[0][0], per_class[1][0], 50, rtol=1e-3, atol=1e-4, name="per class")
        trust = [viz.explain(m, a, methods=["saliency", "integrated"], n_steps=2,
                             metrics=True) for m, a in ((gpu, gx), (cpu, x))]
        for on_gpu, on_cpu in zip(*trust):
            for method, values in on_cpu.metrics.items():
                for key, value in values.items():
                    assert on_gpu.metrics[method][key] == pytest.approx(value, rel=1e-3,
                                                                        abs=1e-6), (method, key)
