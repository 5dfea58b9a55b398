"""The API rules shared by every op: dtype conversion, array-likes, contiguity,
labels, outputs, threads (set/get and bitwise determinism across thread counts)."""

import numpy as np
import pytest

import fastcnn
import fastcnn.functional as F
from conftest import assert_bitwise, randn

REAL_DTYPES = [np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32,
               np.int64, np.uint64, np.float16, np.float32, np.float64]
INT_DTYPES = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64,
              np.uint64]


def test_functional_alias():
    assert fastcnn.F is fastcnn.functional


# --------------------------------------------------------------------------- dtypes

def _small_ints(rng, shape, dtype):
    hi = 2 if dtype == np.bool_ else 4
    return rng.integers(0, hi, shape).astype(dtype)


# each entry: (name, function of one float argument under test, the argument's shape)
def _float_arg_cases(rng):
    x4 = randn(rng, 2, 3, 6, 6)
    w4 = randn(rng, 4, 3, 3, 3)
    go4 = randn(rng, 2, 4, 4, 4)
    rm, rv = randn(rng, 3), np.abs(randn(rng, 3)) + np.float32(0.5)
    return [
        ("relu input", lambda a: F.relu(a), (3, 5)),
        ("relu_backward grad_output",
         lambda a: F.relu_backward(a, np.ones((3, 5), np.float32)), (3, 5)),
        ("relu_backward input", lambda a: F.relu_backward(np.ones((3, 5), np.float32), a),
         (3, 5)),
        ("conv2d input", lambda a: F.conv2d(a, w4), (2, 3, 6, 6)),
        ("conv2d weight", lambda a: F.conv2d(x4, a), (4, 3, 3, 3)),
        ("conv2d bias", lambda a: F.conv2d(x4, w4, a), (4,)),
        ("conv2d_backward grad_output", lambda a: F.conv2d_backward(a, x4, w4), (2, 4, 4, 4)),
        ("conv2d_backward input", lambda a: F.conv2d_backward(go4, a, w4), (2, 3, 6, 6)),
        ("linear input", lambda a: F.linear(a, w4.reshape(4, -1)[:, :5]), (7, 5)),
        ("linear weight", lambda a: F.linear(x4.reshape(-1, 6)[:7, :5], a), (3, 5)),
        ("max_pool2d input", lambda a: F.max_pool2d(a, 2), (2, 3, 6, 6)),
        ("softmax input", lambda a: F.softmax(a, dim=1), (4, 5)),
        ("log_softmax input", lambda a: F.log_softmax(a, dim=0), (4, 5)),
        ("cross_entropy input", lambda a: F.cross_entropy(a, np.array([0, 1, 2, 1])),
         (4, 3)),
        ("batch_norm input", lambda a: F.batch_norm(a, rm, rv), (2, 3, 6, 6)),
        ("batch_norm weight", lambda a: F.batch_norm(x4, rm, rv, a), (3,)),
        ("dropout input", lambda a: F.dropout(a, 0.5, seed=3), (5, 7)),
    ]


@pytest.mark.parametrize("dtype", REAL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_real_dtypes_are_converted_to_float32(dtype, rng):
    for name, fn, shape in _float_arg_cases(rng):
        a = _small_ints(rng, shape, dtype)
        got = fn(a)
        want = fn(a.astype(np.float32))
        for g, w in zip(got if isinstance(got, tuple) else (got,),
                        want if isinstance(want, tuple) else (want,)):
            if w is None:
                assert g is None, name
                continue
            assert np.asarray(g).dtype == np.float32, (name, np.asarray(g).dtype)
            assert_bitwise(np.asarray(g), np.asarray(w), err_msg=name)


def test_float64_input_is_computed_as_float32(rng):
    """float64 data is rounded to float32 first: the result equals the float32 one."""
    x = rng.standard_normal((2, 3, 6, 6))
    w = rng.standard_normal((4, 3, 3, 3))
    assert_bitwise(F.conv2d(x, w), F.conv2d(x.astype(np.float32), w.astype(np.float32)))
    assert_bitwise(F.softmax(x, dim=1), F.softmax(x.astype(np.float32), dim=1))


def test_array_likes(rng):
    np.testing.assert_array_equal(F.relu([[1, -2], [3, -4]]), [[1, 0], [3, 0]])
    assert F.relu([[1, -2]]).dtype == np.float32
    s = F.relu(-2.0)
    assert np.asarray(s).shape == () and np.asarray(s).dtype == np.float32 and s == 0
    assert F.relu(3) == 3
    np.testing.assert_allclose(F.softmax([1.0, 1.0]), [0.5, 0.5])
    x = randn(rng, 1, 2, 4, 4)
    w = randn(rng, 3, 2, 2, 2)
    assert_bitwise(F.conv2d(x.tolist(), w.tolist(), [0.0, 0.0, 0.0]),
                   F.conv2d(x, w, np.zeros(3, np.float32)))
    w2 = randn(rng, 3, 4)
    assert_bitwise(F.linear(x[0, 0].tolist(), w2.tolist()), F.linear(x[0, 0], w2))
    logits = randn(rng, 3, 4)
    assert_bitwise(np.asarray(F.cross_entropy(logits.tolist(), [0, 3, 1])),
                   np.asarray(F.cross_entropy(logits, np.array([0, 3, 1]))))
    assert_bitwise(F.max_pool2d(x.tolist(), 2), F.max_pool2d(x, 2))


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=lambda d: np.dtype(d).name)
def test_label_integer_dtypes(dtype, rng):
    x = randn(rng, 6, 5)
    t = np.array([0, 4, 3, 2, 1, 0])
    for reduction in ("mean", "sum", "none"):
        want = F.cross_entropy(x, t.astype(np.int64), reduction=reduction)
        assert_bitwise(np.asarray(F.cross_entropy(x, t.astype(dtype), reduction=reduction)),
                       np.asarray(want))
    go = np.float32(1.5)
    assert_bitwise(F.cross_entropy_backward(go, x, t.astype(dtype)),
                   F.cross_entropy_backward(go, x, t))


# --------------------------------------------------------------------------- layouts

def _layouts(a):
    """Non-contiguous views holding the same values as a (a C-contiguous array)."""
    yield "fortran", np.asfortranarray(a)
    big = np.zeros(tuple(2 * s for s in a.shape), a.dtype)
    big[tuple(slice(None, None, 2) for _ in a.shape)] = a
    yield "strided", big[tuple(slice(None, None, 2) for _ in a.shape)]
    rev = a[tuple(slice(None, None, -1) for _ in a.shape)].copy()
    yield "negative strides", rev[tuple(slice(None, None, -1) for _ in a.shape)]
    if a.ndim >= 2:
        t = np.ascontiguousarray(np.swapaxes(a, 0, 1))
        yield "swapped axes", np.swapaxes(t, 0, 1)


def _layout_cases(rng):
    x4 = randn(rng, 2, 3, 6, 6)
    w4 = randn(rng, 4, 3, 3, 3)
    b = randn(rng, 4)
    go4 = randn(rng, 2, 4, 6, 6)
    rm, rv = randn(rng, 3), np.abs(randn(rng, 3)) + np.float32(0.5)
    x2 = randn(rng, 5, 7)
    w2 = randn(rng, 3, 7)
    t = np.array([0, 2, 1, 1, 0])
    return [
        ("conv2d", lambda x, w, b: F.conv2d(x, w, b, padding=1), (x4, w4, b)),
        ("conv2d_backward", lambda g, x, w: F.conv2d_backward(g, x, w, padding=1),
         (go4, x4, w4)),
        ("linear", F.linear, (x2, w2, b[:3])),
        ("linear_backward", F.linear_backward, (randn(rng, 5, 3), x2, w2)),
        ("relu_backward", F.relu_backward, (x4, x4[::-1].copy())),
        ("max_pool2d", lambda x: F.max_pool2d(x, 3, 2, 1), (x4,)),
        ("max_pool2d_backward", lambda g, x: F.max_pool2d_backward(g, x, 2),
         (randn(rng, 2, 3, 3, 3), x4)),
        ("softmax", lambda x: F.softmax(x, dim=1), (x4,)),
        ("log_softmax_backward", lambda g, y: F.log_softmax_backward(g, y, dim=-1),
         (x2, F.log_softmax(x2))),
        ("cross_entropy", lambda x, t: F.cross_entropy(x, t, reduction="none"), (x2[:, :3], t)),
        ("cross_entropy_backward", lambda x, t: F.cross_entropy_backward(1.0, x, t),
         (x2[:, :3], t)),
        ("batch_norm", lambda x: F.batch_norm(x, rm, rv, training=False), (x4,)),
        ("batch_norm_backward", lambda g, x: F.batch_norm_backward(g, x, None, None,
                                                                   training=True),
         (x4 * 2, x4)),
        ("dropout", lambda x: F.dropout(x, 0.5, seed=9), (x4,)),
        ("normalize", lambda x: F.normalize(x, (0.1, 0.2, 0.3), (1, 2, 3)),
         (rng.integers(0, 256, (3, 4, 5)).astype(np.uint8),)),
    ]


def test_non_contiguous_arguments_give_the_same_result(rng):
    for name, fn, args in _layout_cases(rng):
        want = fn(*args)
        for i, a in enumerate(args):
            for layout, view in _layouts(a):
                call = list(args)
                call[i] = view
                assert_bitwise(fn(*call), want, err_msg=f"{name} argument {i} {layout}")


def test_outputs_are_fresh_c_contiguous_arrays(rng):
    x = randn(rng, 2, 3, 6, 6)
    for out in (F.relu(x), F.softmax(x, dim=1), F.dropout(x, 0.5, training=False),
                F.max_pool2d(x, 1), F.batch_norm(x, np.zeros(3, np.float32),
                                                 np.ones(3, np.float32)),
                F.relu_backward(x, np.abs(x) + 1)):
        assert isinstance(out, np.ndarray)
        assert out.flags.c_contiguous and out.dtype == np.float32
        assert not np.shares_memory(out, x)


# --------------------------------------------------------------------------- threads

def test_set_get_num_threads(restore_threads):
    for n in (1, 2, 3, 1):
        fastcnn.set_num_threads(n)
        assert fastcnn.get_num_threads() == n
    assert isinstance(fastcnn.get_num_threads(), int)


def _determinism_cases():
    """name -> function(rng-seeded inputs) returning every output of the op."""
    def make(seed):
        rng = np.random.default_rng(seed)
        x = randn(rng, 8, 16, 20, 20)
        return rng, x

    def conv(groups, stride, padding):
        def run(seed):
            rng, x = make(seed)
            w = randn(rng, 16, 16 // groups, 3, 3)
            b = randn(rng, 16)
            out = F.conv2d(x, w, b, stride=stride, padding=padding, groups=groups)
            go = randn(rng, *out.shape)
            return (out,) + tuple(F.conv2d_backward(go, x, w, b, stride=stride,
                                                    padding=padding, groups=groups))
        return run

    def linear(m, k, n):
        def run(seed):
            rng = np.random.default_rng(seed)
            x, w, b = randn(rng, m, k), randn(rng, n, k), randn(rng, n)
            return (F.linear(x, w, b),) + tuple(F.linear_backward(randn(rng, m, n), x, w, b))
        return run

    def conv_big(seed):
        rng = np.random.default_rng(seed)
        x, w = randn(rng, 1, 32, 60, 60), randn(rng, 150, 32, 3, 3)
        out = F.conv2d(x, w, padding=1)
        return (out,) + tuple(F.conv2d_backward(randn(rng, *out.shape), x, w, padding=1))

    def relu(seed):
        rng, x = make(seed)
        go = randn(rng, *x.shape)
        return F.relu(x), F.relu_backward(go, x), F.relu_backward(go, x, guided=True)

    def pool(seed):
        rng, x = make(seed)
        out, idx = F.max_pool2d(x, 3, stride=2, padding=1, return_indices=True)
        go = randn(rng, *out.shape)
        return (out, idx, F.max_pool2d_backward(go, x, 3, stride=2, padding=1),
                F.max_pool2d_backward(go, x, 3, stride=2, padding=1, indices=idx))

    def softmax(dim):
        def run(seed):
            rng, x = make(seed)
            go = randn(rng, *x.shape)
            y, ly = F.softmax(x, dim=dim), F.log_softmax(x, dim=dim)
            return (y, ly, F.softmax_backward(go, y, dim=dim),
                    F.log_softmax_backward(go, ly, dim=dim))
        return run

    def cross_entropy(seed):
        rng, x = make(seed)
        t = rng.integers(0, 16, (8, 20, 20))
        t[0, 0] = -100
        outs = []
        for reduction in ("mean", "sum", "none"):
            outs.append(np.asarray(F.cross_entropy(x, t, reduction=reduction,
                                                   label_smoothing=0.1)))
            go = randn(rng, *t.shape) if reduction == "none" else np.float32(1.3)
            outs.append(F.cross_entropy_backward(go, x, t, reduction=reduction,
                                                 label_smoothing=0.1))
        return tuple(outs)

    def batch_norm(training):
        def run(seed):
            rng, x = make(seed)
            rm, rv = randn(rng, 16), np.abs(randn(rng, 16)) + np.float32(0.5)
            w, b = randn(rng, 16), randn(rng, 16)
            out = F.batch_norm(x, rm, rv, w, b, training=training)
            go = randn(rng, *x.shape)
            return (out, rm, rv) + tuple(F.batch_norm_backward(go, x, rm, rv, w, b,
                                                               training=training))
        return run

    def dropout(seed):
        rng, x = make(seed)
        return (F.dropout(x, 0.3, seed=77, offset=5),
                F.dropout_backward(x, 0.3, seed=77, offset=5),
                F.dropout_mask((8, 16, 20, 20), 0.3, 77, 5))

    def normalize(seed):
        rng = np.random.default_rng(seed)
        x = rng.integers(0, 256, (8, 3, 64, 64)).astype(np.uint8)
        return F.normalize(x), F.normalize(x, (0.1, 0.2, 0.3), (0.5, 0.6, 0.7))

    def few_work_items(seed):
        """Shapes with fewer outer work items than threads: the split must move inward
        (or not happen) without changing any result."""
        rng = np.random.default_rng(seed)
        x, w = randn(rng, 1, 16, 40, 40), randn(rng, 16, 16, 3, 3)
        out = F.conv2d(x, w, padding=1)
        outs = [out, *F.conv2d_backward(randn(rng, *out.shape), x, w, padding=1)]
        xb = randn(rng, 8, 1, 64, 64)
        outs.append(F.batch_norm(xb, None, None, training=True))
        outs.extend(F.batch_norm_backward(randn(rng, *xb.shape), xb, None, None,
                                          training=True)[:1])
        row = randn(rng, 1, 100_000, scale=5.0)
        outs += [F.softmax(row), F.log_softmax(row), F.softmax(row.T, dim=0)]
        logits = randn(rng, 1, 10, 64, 64)
        t = rng.integers(0, 10, (1, 64, 64))
        outs += [np.asarray(F.cross_entropy(logits, t)),
                 F.cross_entropy_backward(np.float32(1), logits, t)]
        xl, wl = randn(rng, 1, 4096), randn(rng, 10, 4096)
        outs += [F.linear(xl, wl), *F.linear_backward(randn(rng, 1, 10), xl, wl)]
        return tuple(outs)

    return {
        "few_work_items": few_work_items,
        "conv2d": conv(1, 1, 1), "conv2d_groups_stride": conv(4, 2, 0),
        "conv2d_depthwise": conv(16, 1, 1), "conv2d_big": conv_big,
        "linear": linear(64, 300, 129), "linear_big": linear(300, 600, 3100), "relu": relu,
        "max_pool2d": pool, "softmax_dim1": softmax(1), "softmax_last": softmax(-1),
        "cross_entropy": cross_entropy, "batch_norm_train": batch_norm(True),
        "batch_norm_eval": batch_norm(False), "dropout": dropout, "normalize": normalize,
    }


DETERMINISM = _determinism_cases()


@pytest.mark.parametrize("name", list(DETERMINISM))
def test_results_bitwise_identical_across_thread_counts(name, restore_threads):
    run = DETERMINISM[name]
    fastcnn.set_num_threads(1)
    want = run(1234)
    for n in (2, 3, 7):
        fastcnn.set_num_threads(n)
        assert_bitwise(run(1234), want, err_msg=f"{name}: {n} threads vs 1")


@pytest.mark.parametrize("batch", [1, 3, 5, 13])
def test_results_do_not_depend_on_the_batch(batch, rng):
    """A sample's result is bitwise the same alone or inside any batch: the
    visualisations compare batched and one-by-one results, and predict()
    must not depend on its batch size. (A small-batch GEMM path that summed
    in another order once broke this.)"""
    x = randn(rng, 16, 3, 9, 9)
    w = randn(rng, 4, 3, 3, 3)
    fc = randn(rng, 7, 36)
    full_conv = F.conv2d(x, w, padding=1)
    full_fc = F.linear(x[:, :, :6, :6].reshape(16, -1)[:, :36], fc)
    # With a bias and a product deeper than one of the GEMM's blocks (64 x 3 x 3
    # = 576 inputs an output; stride 2: im2col + GEMM, not Winograd), which once
    # added the bias first for a single image and last for several.
    deep_x, deep_w, deep_b = randn(rng, 16, 64, 7, 7), randn(rng, 8, 64, 3, 3), randn(rng, 8)
    full_deep = F.conv2d(deep_x, deep_w, deep_b, stride=2, padding=1)
    for start in range(0, 16, batch):
        part = slice(start, start + batch)
        assert_bitwise(F.conv2d(x[part], w, padding=1), full_conv[part])
        assert_bitwise(F.linear(x[part, :, :6, :6].reshape(-1, 108)[:, :36], fc), full_fc[part])
        assert_bitwise(F.conv2d(deep_x[part], deep_w, deep_b, stride=2, padding=1),
                       full_deep[part])
