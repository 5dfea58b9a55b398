"""Shared fixtures and helpers for the fastcnn test suite.

Helpers (import them with ``from conftest import ...``):
  f32, randn            float32 test data
  assert_close          float32 kernel result vs float64 reference, with an
                        absolute tolerance that grows with the reduction length
  numerical_grad        central finite differences in float64
  check_vjp             reference backward vs finite differences

Hypothesis profiles: "fastcnn" (default: 100 derandomized examples per property,
so every run tries the same cases and the suite stays fast), "sanitize" (35 of
them: .ci/sanitize's, where every example runs several times slower and the plain
run has already tried the 100) and "thorough" (HYPOTHESIS_PROFILE=thorough: 300
fresh random examples per property).
"""

import os
import sys
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# reference.py and this file are imported by the test modules by plain name,
# whatever pytest's import mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("fastcnn", max_examples=100, deadline=None, derandomize=True,
                          database=None, suppress_health_check=_HEALTH, print_blob=True)
settings.register_profile("sanitize", max_examples=35, deadline=None, derandomize=True,
                          database=None, suppress_health_check=_HEALTH, print_blob=True)
settings.register_profile("thorough", max_examples=300, deadline=None, database=None,
                          suppress_health_check=_HEALTH, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fastcnn"))


# --------------------------------------------------------------------------- data

def f32(a):
    return np.asarray(a, dtype=np.float32)


def randn(rng, *shape, scale=1.0):
    """Standard-normal float32 data (the reference sees exactly the same values)."""
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# --------------------------------------------------------------------------- comparisons

def assert_close(got, want, *, red=1, rtol=1e-4, atol=1e-5, float32=True, err_msg=""):
    """got: a kernel result; want: the float64 reference.

    Checks type, shape and (if float32) dtype, then values with
    atol * sqrt(red): float32 accumulation error grows with the number of
    terms summed into each output (red), roughly as its square root for
    well-conditioned data.
    """
    assert isinstance(got, (np.ndarray, np.generic)), type(got)
    want = np.asarray(want)
    assert got.shape == want.shape, f"shape {got.shape} != expected {want.shape} {err_msg}"
    if float32:
        assert got.dtype == np.float32, f"dtype {got.dtype} != float32 {err_msg}"
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=rtol,
                               atol=atol * np.sqrt(max(red, 1)), equal_nan=True,
                               err_msg=err_msg)


def assert_bitwise(a, b, err_msg=""):
    """Bitwise equality of two results (None == None; tuples element-wise)."""
    if isinstance(a, tuple) or isinstance(b, tuple):
        assert isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b), (a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise(x, y, err_msg=f"{err_msg} [element {i}]")
        return
    if a is None or b is None:
        assert a is None and b is None, err_msg
        return
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    # compare the bits, so that NaN == NaN and -0 != +0
    bits_a = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    bits_b = np.ascontiguousarray(b).reshape(-1).view(np.uint8)
    if not np.array_equal(bits_a, bits_b):
        np.testing.assert_array_equal(a, b, err_msg=err_msg)   # shows the values
        raise AssertionError(f"results differ in their bits only (-0.0 vs 0.0 or NaN "
                             f"payload) {err_msg}")


# --------------------------------------------------------------------------- finite differences

def numerical_grad(f, x, eps=1e-6):
    """Central-difference gradient of the scalar f(x) with respect to the float64 array x."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        hi = float(np.sum(f(x)))
        flat[i] = old - eps
        lo = float(np.sum(f(x)))
        flat[i] = old
        gflat[i] = (hi - lo) / (2 * eps)
    return grad


def check_vjp(forward, args, wrt, grad_out, analytic, *, eps=1e-6, rtol=1e-5, atol=1e-6):
    """analytic (float64) == d/d args[wrt] of sum(forward(*args) * grad_out), by central
    differences."""
    args = [None if a is None else (np.array(a, dtype=np.float64)
                                    if isinstance(a, np.ndarray) else a) for a in args]
    go = np.asarray(grad_out, dtype=np.float64)

    def scalar(v):
        call = list(args)
        call[wrt] = v
        return np.sum(np.asarray(forward(*call)) * go)

    num = numerical_grad(scalar, args[wrt], eps)
    np.testing.assert_allclose(analytic, num, rtol=rtol, atol=atol,
                               err_msg=f"gradient of argument {wrt}")


# --------------------------------------------------------------------------- fixtures

@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's id: reproducible, different per test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def restore_threads():
    """Restores fastcnn's thread count after the test."""
    import fastcnn

    before = fastcnn.get_num_threads()
    yield fastcnn
    fastcnn.set_num_threads(before)
