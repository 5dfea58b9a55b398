"""Optional cross-check of the NumPy references (and, briefly, of fastcnn) against
PyTorch CPU in float64.  Skipped when torch is not installed; the primary
yardstick is always tests/reference.py."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TF = torch.nn.functional


def t64(a):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=True)


def close(a, b, rtol=1e-10, atol=1e-10):
    np.testing.assert_allclose(np.asarray(a), b.detach().numpy() if hasattr(b, "detach") else b,
                               rtol=rtol, atol=atol)


@settings(max_examples=25)
@given(st.data())
def test_conv2d_vs_torch(data):
    g = data.draw(st.integers(1, 3))
    depthwise = data.draw(st.booleans())
    cg = 1 if depthwise else data.draw(st.integers(1, 3))
    kg = data.draw(st.integers(1, 3))
    r, s = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    dh, dw = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    same = data.draw(st.booleans())
    if same:
        sh = sw = 1
        padding = "same"
        ph = pw = 0
    else:
        sh, sw = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
        ph, pw = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 3))
        padding = (ph, pw)
    h = max(1, dh * (r - 1) + 1 - 2 * ph) + data.draw(st.integers(0, 4))
    w_ = max(1, dw * (s - 1) + 1 - 2 * pw) + data.draw(st.integers(0, 4))
    bias = data.draw(st.booleans())
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    x = rng.standard_normal((2, g * cg, h, w_))
    w = rng.standard_normal((g * kg, cg, r, s))
    b = rng.standard_normal(g * kg) if bias else None
    args = ((sh, sw), padding, (dh, dw), g)
    out = ref.conv2d(x, w, b, *args)
    tx, tw = t64(x), t64(w)
    tb = t64(b) if bias else None
    tout = TF.conv2d(tx, tw, tb, (sh, sw), padding, (dh, dw), g)
    close(out, tout)
    go = rng.standard_normal(out.shape)
    tout.backward(torch.tensor(np.asarray(go, dtype=np.float64)))
    gx, gw, gb = ref.conv2d_backward(go, x, w, b, *args)
    close(gx, tx.grad)
    close(gw, tw.grad)
    if bias:
        close(gb, tb.grad)


@settings(max_examples=40)
@given(st.data())
def test_max_pool2d_vs_torch(data):
    kh, kw = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    stride = data.draw(st.one_of(st.none(), st.tuples(st.integers(1, 4), st.integers(1, 4))))
    ph, pw = data.draw(st.integers(0, kh // 2)), data.draw(st.integers(0, kw // 2))
    dh, dw = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    ceil_mode = data.draw(st.booleans())
    h = max(1, dh * (kh - 1) + 1 - 2 * ph) + data.draw(st.integers(0, 5))
    w = max(1, dw * (kw - 1) + 1 - 2 * pw) + data.draw(st.integers(0, 5))
    args = ((kh, kw), stride, (ph, pw), (dh, dw), ceil_mode)
    if ref.max_pool_has_empty_window(h, w, *args):
        return
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    ties = data.draw(st.booleans())
    x = rng.integers(0, 3, (2, 2, h, w)).astype(np.float64) if ties else \
        rng.standard_normal((2, 2, h, w))
    out, idx = ref.max_pool2d(x, *args)
    tx = t64(x)
    tout, tidx = TF.max_pool2d(tx, (kh, kw), stride if stride is not None else (kh, kw),
                               (ph, pw), (dh, dw), ceil_mode, return_indices=True)
    close(out, tout, 0, 0)
    np.testing.assert_array_equal(idx, tidx.numpy())
    go = rng.standard_normal(out.shape)
    tout.backward(torch.tensor(np.asarray(go, dtype=np.float64)))
    close(ref.max_pool2d_backward(go, x, *args), tx.grad)


def test_max_pool2d_nan_vs_torch():
    x = np.array([[[[1.0, np.nan, 3.0, 0.0], [2.0, 5.0, np.nan, 1.0]]]])
    out, idx = ref.max_pool2d(x, (2, 2))
    tout, tidx = TF.max_pool2d(torch.tensor(x), (2, 2), return_indices=True)
    np.testing.assert_array_equal(out, tout.numpy())
    np.testing.assert_array_equal(idx, tidx.numpy())


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_softmax_vs_torch(dim, rng):
    x = rng.standard_normal((3, 4, 5)) * 3
    go = rng.standard_normal(x.shape)
    for fn, bwd, tfn in ((ref.softmax, ref.softmax_backward, TF.softmax),
                         (ref.log_softmax, ref.log_softmax_backward, TF.log_softmax)):
        tx = t64(x)
        tout = tfn(tx, dim)
        out = fn(x, dim)
        close(out, tout)
        tout.backward(torch.tensor(np.asarray(go, dtype=np.float64)))
        close(bwd(go, out, dim), tx.grad)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("eps", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("ignore_index", [-100, 1])
@pytest.mark.parametrize("xs", [(6, 4), (3, 4, 2, 3)])
def test_cross_entropy_vs_torch(reduction, eps, ignore_index, xs, rng):
    x = rng.standard_normal(xs) * 2
    t = rng.integers(0, xs[1], (xs[0],) + xs[2:])
    t.reshape(-1)[:2] = ignore_index if ignore_index < 0 else t.reshape(-1)[:2]
    tx = t64(x)
    tl = TF.cross_entropy(tx, torch.tensor(t), reduction=reduction, ignore_index=ignore_index,
                          label_smoothing=eps)
    loss = ref.cross_entropy(x, t, reduction, ignore_index, eps)
    close(loss, tl)
    go = rng.standard_normal(t.shape) if reduction == "none" else 0.7
    tl.backward(torch.tensor(np.asarray(go, dtype=np.float64)))
    close(ref.cross_entropy_backward(go, x, t, reduction, ignore_index, eps), tx.grad)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("xs", [(6, 4), (3, 4, 2, 3)])
def test_weighted_cross_entropy_vs_torch(reduction, eps, xs, rng):
    """The reference's class-weighted loss, and fastcnn's loss and gradient, against torch."""
    F = pytest.importorskip("fastcnn.functional")
    x = rng.standard_normal(xs) * 2
    t = rng.integers(0, xs[1], (xs[0],) + xs[2:])
    t.reshape(-1)[:2] = -100
    w = rng.uniform(0.2, 2.0, xs[1])
    tx = t64(x)
    tl = TF.cross_entropy(tx, torch.tensor(t), weight=torch.tensor(w), reduction=reduction,
                          label_smoothing=eps)
    close(ref.weighted_cross_entropy(x, t, w, reduction, -100, eps), tl)
    go = rng.standard_normal(t.shape) if reduction == "none" else 0.7
    tl.backward(torch.tensor(np.asarray(go, dtype=np.float64)))
    x32, w32, go32 = x.astype(np.float32), w.astype(np.float32), np.float32(go)
    np.testing.assert_allclose(F.cross_entropy(x32, t, w32, reduction, label_smoothing=eps),
                               tl.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(F.cross_entropy_backward(go32, x32, t, w32, reduction,
                                                        label_smoothing=eps),
                               tx.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_probability_targets_vs_torch(reduction, weighted, rng):
    F = pytest.importorskip("fastcnn.functional")
    x = rng.standard_normal((3, 4, 2, 3)) * 2
    y = rng.random(x.shape)
    y /= y.sum(axis=1, keepdims=True)
    w = rng.uniform(0.2, 2.0, 4) if weighted else None
    tx = t64(x)
    tl = TF.cross_entropy(tx, torch.tensor(y), weight=None if w is None else torch.tensor(w),
                          reduction=reduction, label_smoothing=0.1)
    close(ref.soft_cross_entropy(x, y, w, reduction, 0.1), tl)
    go = rng.standard_normal(tl.shape) if reduction == "none" else 0.7
    tl.backward(torch.tensor(np.asarray(go, dtype=np.float64)))
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    w32 = None if w is None else w.astype(np.float32)
    np.testing.assert_allclose(F.cross_entropy(x32, y32, w32, reduction, label_smoothing=0.1),
                               tl.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(F.cross_entropy_backward(np.float32(go), x32, y32, w32,
                                                        reduction, label_smoothing=0.1),
                               tx.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_cross_entropy_all_ignored_vs_torch(eps):
    x = np.ones((3, 4))
    t = np.full(3, -100)
    tx = t64(x)
    tl = TF.cross_entropy(tx, torch.tensor(t), label_smoothing=eps)
    assert np.isnan(tl.item()) and np.isnan(ref.cross_entropy(x, t, label_smoothing=eps))
    tl.backward()
    close(ref.cross_entropy_backward(1.0, x, t, label_smoothing=eps), tx.grad)


@pytest.mark.parametrize("xs", [(5, 3), (3, 2, 4), (2, 3, 3, 2)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_vs_torch(xs, training, affine, rng):
    c = xs[1]
    x = rng.standard_normal(xs) * 2 + 1
    rm, rv = rng.standard_normal(c), rng.uniform(0.5, 2, c)
    w = rng.standard_normal(c) if affine else None
    b = rng.standard_normal(c) if affine else None
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    tx = t64(x)
    tw = t64(w) if affine else None
    tb = t64(b) if affine else None
    tout = TF.batch_norm(tx, trm, trv, tw, tb, training, 0.3, 1e-3)
    out, nrm, nrv = ref.batch_norm(x, rm, rv, w, b, training, 0.3, 1e-3)
    close(out, tout)
    close(nrm, trm)
    close(nrv, trv)
    go = rng.standard_normal(xs)
    tout.backward(torch.tensor(np.asarray(go, dtype=np.float64)))
    gx, gw, gb = ref.batch_norm_backward(go, x, rm, rv, w, b, training, 1e-3)
    close(gx, tx.grad, 1e-8, 1e-8)
    if affine:
        close(gw, tw.grad)
        close(gb, tb.grad)


def test_normalize_vs_torch_formula(rng):
    x = rng.integers(0, 256, (2, 3, 4, 5)).astype(np.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    tx = torch.tensor(x).double() / 255
    want = (tx - torch.tensor(mean, dtype=torch.float64).view(3, 1, 1)) / \
        torch.tensor(std, dtype=torch.float64).view(3, 1, 1)
    close(ref.normalize(x, mean, std), want)


def test_fastcnn_spot_checks_vs_torch(rng):
    """A few fastcnn results straight against torch float32 (needs fastcnn)."""
    F = pytest.importorskip("fastcnn.functional")
    x = rng.standard_normal((2, 4, 9, 8)).astype(np.float32)
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    want = TF.conv2d(torch.tensor(x), torch.tensor(w), torch.tensor(b), 2, 1, 1, 2).numpy()
    np.testing.assert_allclose(F.conv2d(x, w, b, 2, 1, 1, 2), want, rtol=1e-4, atol=1e-4)
    out, idx = F.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)
    tout, tidx = TF.max_pool2d(torch.tensor(x), 3, 2, 1, ceil_mode=True, return_indices=True)
    np.testing.assert_array_equal(out, tout.numpy())
    np.testing.assert_array_equal(idx, tidx.numpy())
    logits = rng.standard_normal((7, 5)).astype(np.float32)
    t = np.array([0, 4, -100, 2, 2, 1, 3])
    want = TF.cross_entropy(torch.tensor(logits), torch.tensor(t), label_smoothing=0.1).item()
    np.testing.assert_allclose(float(F.cross_entropy(logits, t, label_smoothing=0.1)), want,
                               rtol=1e-5)


def test_torch_state_dict_loads_as_it_is(rng):
    """A torch model of the same layers: its state_dict() (tensors, torch's names,
    num_batches_tracked included) loads straight into fastcnn's, which then gives
    torch's outputs."""
    models = pytest.importorskip("fastcnn.models")
    tnn = torch.nn
    theirs = tnn.Sequential(tnn.Conv2d(1, 32, 3, padding=1), tnn.BatchNorm2d(32), tnn.ReLU(),
                            tnn.MaxPool2d(2), tnn.Conv2d(32, 64, 3, padding=1),
                            tnn.BatchNorm2d(64), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Flatten(),
                            tnn.Linear(3136, 128), tnn.ReLU(), tnn.Dropout(0.5),
                            tnn.Linear(128, 10))
    x = rng.standard_normal((16, 1, 28, 28)).astype(np.float32)
    theirs.train()(torch.from_numpy(x))             # running statistics that are not 0 / 1
    theirs.eval()
    ours = models.mnist_cnn_bn()
    names = [k for k in ours.state_dict() if not k.startswith("dropout.")]
    state = dict(zip(names, theirs.state_dict().values()))   # ours are named
    missing, unexpected = ours.load_state_dict(state)
    assert missing == ["dropout.seed", "dropout.offset"] and unexpected == []
    with torch.no_grad():
        want = theirs(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours.eval()(x), want, rtol=1e-4, atol=1e-4)
    # the parameters themselves (they require grad), as dict(named_parameters()) gives
    ours.load_state_dict({**state, "conv1.weight": theirs[0].weight * 2})
    np.testing.assert_allclose(ours.conv1.weight.data, 2 * theirs[0].weight.detach().numpy())
    with pytest.raises(TypeError, match="'conv1.weight' cannot be read as a NumPy array"):
        ours.load_state_dict({**state, "conv1.weight": [[1.0, 2.0], [3.0]]})
    with pytest.raises(TypeError, match="'conv1.bias' has non-numeric dtype object"):
        ours.load_state_dict({**state, "conv1.bias": object()})


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_modes_vs_torch(mode, rng):
    """F.pad and Conv2d(padding_mode=) against torch, forward and backward."""
    nn = pytest.importorskip("fastcnn.nn")
    F = pytest.importorskip("fastcnn.functional")
    x = rng.standard_normal((2, 4, 7, 6)).astype(np.float32)
    tx = torch.tensor(x.astype(np.float64), requires_grad=True)
    ty = TF.pad(tx, (2, 1, 0, 3), mode=mode)
    g = rng.standard_normal(tuple(ty.shape)).astype(np.float32)
    ty.backward(torch.tensor(g.astype(np.float64)))
    np.testing.assert_array_equal(F.pad(x, (2, 1, 0, 3), mode), ty.detach().numpy())
    np.testing.assert_allclose(F.pad_backward(g, x.shape, (2, 1, 0, 3), mode), tx.grad.numpy(),
                               rtol=1e-6, atol=1e-6)
    for kwargs in (dict(kernel_size=3, padding=(2, 1), stride=2),
                   dict(kernel_size=4, padding="same", groups=2)):
        ours = nn.Conv2d(4, 6, padding_mode=mode, rng=3, **kwargs)
        theirs = torch.nn.Conv2d(4, 6, padding_mode=mode, **kwargs).double()
        with torch.no_grad():
            theirs.weight.copy_(torch.tensor(ours.weight.data))
            theirs.bias.copy_(torch.tensor(ours.bias.data))
        tx = torch.tensor(x.astype(np.float64), requires_grad=True)
        ty = theirs(tx)
        g = rng.standard_normal(tuple(ty.shape)).astype(np.float32)
        ty.backward(torch.tensor(g.astype(np.float64)))
        np.testing.assert_allclose(ours.forward(x), ty.detach().numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours.backward(g), tx.grad.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours.weight.grad, theirs.weight.grad.numpy(), rtol=1e-4,
                                   atol=1e-4)
