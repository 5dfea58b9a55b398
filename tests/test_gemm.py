"""matmul (fastcnn's SGEMM) against float64, and the whole GEMM-based test
modules again under every micro-kernel this CPU can run."""

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastcnn
import fastcnn.functional as F
from conftest import assert_close, randn


@given(m=st.integers(1, 80), n=st.integers(1, 80), k=st.integers(1, 80),
       seed=st.integers(0, 2 ** 32 - 1))
def test_matmul_random_shapes(m, n, k, seed):
    rng = np.random.default_rng(seed)
    a, b = randn(rng, m, k), randn(rng, k, n)
    assert_close(F.matmul(a, b), np.einsum("ik,kj->ij", a.astype(np.float64), b), red=k)


@pytest.mark.parametrize("m, n, k", [
    (64, 300, 288),    # 5 x 12 + 4 rows: the 4-row kernel
    (32, 97, 1100),    # 2 x 12 + 8 rows: the 8-row kernel; three k-blocks
    (300, 1700, 70),   # past one A block (264 rows) and two B slabs (768 columns)
    (7, 5000, 9),      # the first convolution layer's shape
])
def test_matmul_block_edges(m, n, k, rng):
    a, b = randn(rng, m, k), randn(rng, k, n)
    assert_close(F.matmul(a, b), a.astype(np.float64) @ b, red=k)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_matmul_same_bits_for_any_thread_count(threads, rng):
    a, b = randn(rng, 130, 300), randn(rng, 300, 700)
    before = fastcnn.get_num_threads()
    try:
        fastcnn.set_num_threads(1)
        one = F.matmul(a, b)
        fastcnn.set_num_threads(threads)
        np.testing.assert_array_equal(F.matmul(a, b), one)
    finally:
        fastcnn.set_num_threads(before)


# Shapes whose A (M x K >= 2^18 floats) the threads pack together, each
# thread owning a range of C's columns: several row blocks, k-blocks and
# slabs, a last A~ panel of 4 rows, partial B~ panels, and a thread count (3)
# that deals the panels out unevenly.
SHARED_A_SHAPES = [
    (600, 700, 450),    # 50 A~ panels in 3 row blocks, one k-block
    (280, 1700, 1100),  # 2 row blocks, 23 panels + 4 rows (MR 12; 16 rows of MR 24);
                        # 3 k-blocks; 2 slabs a thread on 2 threads
    (280, 300, 1000),   # 10 B~ panels only, 2 k-blocks
]


@pytest.mark.parametrize("ta, tb", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("m, n, k", SHARED_A_SHAPES)
def test_sgemm_with_a_packed_by_all_threads(m, n, k, ta, tb, rng):
    """alpha, beta and both transpositions against float64, on 1, 2 and 3
    threads: the same bits whichever threads packed which panels."""
    a = randn(rng, *((k, m) if ta else (m, k)))
    b = randn(rng, *((n, k) if tb else (k, n)))
    c0 = randn(rng, m, n)
    a64 = a.astype(np.float64).T if ta else a.astype(np.float64)
    b64 = b.astype(np.float64).T if tb else b.astype(np.float64)
    want = 0.5 * (a64 @ b64) - 2.0 * c0
    before = fastcnn.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            fastcnn.set_num_threads(threads)
            c = c0.copy()
            fastcnn._backend._cpu.sgemm(ta, tb, 0.5, a, b, -2.0, c)
            results.append(c)
    finally:
        fastcnn.set_num_threads(before)
    assert_close(results[0], want, red=k)
    for c in results[1:]:
        np.testing.assert_array_equal(c, results[0])


def test_linear_backward_with_a_packed_by_all_threads(rng):
    """linear's weight gradient dY^T X has a transposed A (dY, 600 x 500)
    large enough to be packed by all threads together."""
    x, w, dy = randn(rng, 600, 700), randn(rng, 500, 700), randn(rng, 600, 500)
    dx, dw, db = F.linear_backward(dy, x, w, None)
    assert_close(dw, dy.astype(np.float64).T @ x, red=600)
    assert_close(dx, dy.astype(np.float64) @ w, red=500)


@pytest.mark.skipif(os.environ.get("FASTCNN_GEMM_KERNEL") is not None,
                    reason="already running under a forced kernel")
def test_gemm_users_under_each_kernel():
    """The GEMM, convolution (whose packed im2col follows the kernel's panel
    width; Winograd needs the AVX-512 kernel), linear and pooling (whose
    AVX-512 loops give way to the plain ones under "generic") tests, with
    FASTCNN_GEMM_KERNEL forcing each micro-kernel other than the one this CPU
    would pick (and can run): one pytest per kernel, side by side (the runs are
    mostly single-threaded Python, and minutes under the sanitizers)."""
    here = os.path.dirname(os.path.abspath(__file__))
    own = fastcnn._backend._cpu.gemm_kernel()
    files = [os.path.join(here, f) for f in (
        "test_gemm.py", "test_conv2d.py", "test_linear.py", "test_winograd.py",
        "test_conv_direct.py", "test_pool.py")]
    runs = {}
    for kernel in ("generic", "avx2"):
        env = dict(os.environ, FASTCNN_GEMM_KERNEL=kernel)
        probe = subprocess.run([sys.executable, "-c", "import fastcnn._cpu as c; "
                                "print(c.gemm_kernel())"], env=env, capture_output=True,
                               text=True)
        if own.startswith(kernel) or (probe.returncode == 0 and
                                      not probe.stdout.startswith(kernel)):
            continue   # the suite runs this CPU's own kernel; one it cannot run is left
        runs[kernel] = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=here)
    if not runs:
        pytest.skip(f"no kernel other than this CPU's own ({own}) runs here")
    failed = {}
    for kernel, run in runs.items():
        output, _ = run.communicate()
        if run.returncode != 0:
            failed[kernel] = output[-4000:]
    assert not failed, "\n".join(f"under {k}:\n{out}" for k, out in failed.items())


@pytest.mark.parametrize("n, k, m", [(1, 3136, 128), (3, 300, 70), (64, 37, 45), (13, 16, 16)])
def test_linear_shapes_through_transposed_packing(n, k, m, rng):
    """linear's products take W transposed: 16 x 16 register transposes and
    their tails (depth and runs not multiples of 16), one-row batches."""
    x, w, b = randn(rng, n, k), randn(rng, m, k), randn(rng, m)
    want = x.astype(np.float64) @ w.T + b
    assert_close(F.linear(x, w, b), want, red=k)
    dy = randn(rng, n, m)
    dx, dw, db = F.linear_backward(dy, x, w, b)
    assert_close(dx, dy.astype(np.float64) @ w, red=m)
    assert_close(dw, dy.astype(np.float64).T @ x, red=n)
    assert_close(db, dy.astype(np.float64).sum(0), red=n)


@pytest.mark.parametrize("k", [5, 300, 3136])
@pytest.mark.parametrize("n", [1, 21, 128])
def test_a_row_gives_the_same_bits_in_any_batch(k, n, rng):
    """Batches of 1-4 rows take an unpacked path; every row must still equal,
    bit for bit, the same row computed inside a large batch (the packed path)."""
    x, w, b = randn(rng, 40, k), randn(rng, n, k), randn(rng, n)
    big_mm, big_lin, big_nob = F.matmul(x, w.T.copy()), F.linear(x, w, b), F.linear(x, w)
    for rows in (1, 2, 3, 4):
        np.testing.assert_array_equal(F.matmul(x[:rows], w.T.copy()), big_mm[:rows])
        np.testing.assert_array_equal(F.linear(x[5:5 + rows], w, b), big_lin[5:5 + rows])
        np.testing.assert_array_equal(F.linear(x[7:7 + rows], w), big_nob[7:7 + rows])
