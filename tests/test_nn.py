"""fastcnn.nn: whole-model gradients, the module contract, layers, init and modes."""

import math
from collections import OrderedDict

import numpy as np
import pytest

import fastcnn
import fastcnn.functional as F
from fastcnn import models, nn
from conftest import randn
from nn_reference import cross_entropy64, forward64, params64


def _batch(seed, n=3, size=28, channels=1):
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, channels, size, size)).astype(np.float32)
    y = g.integers(0, 10, n)
    return x, y


def _loss_and_grads(model, x, y):
    """One float32 forward/backward; returns (loss, {name: grad}, input grad, dropout masks)."""
    masks = {}
    loss_fn = nn.CrossEntropyLoss()
    offsets = {name: int(layer.offset) for name, layer in model.named_children()
               if isinstance(layer, nn.Dropout)}
    model.zero_grad()
    logits = model(x)
    loss = float(loss_fn(logits, y))
    dx = model.backward(loss_fn.backward())
    for name, offset in offsets.items():
        if model.training:
            shape = model.activations[name].shape
            masks[name] = F.dropout_mask(shape, model[name].p, int(model[name].seed), offset)
    grads = {name: p.grad for name, p in model.named_parameters()}
    return loss, grads, dx, masks


def _check_against_finite_differences(model, x, y, training, coords_per_param=5, seed=0):
    """Analytic float32 gradients vs central differences of the float64 reference.

    The finite differences (step 1e-6) run on ``forward64``, a float64 NumPy
    re-implementation of the model, at the model's own (float32) weights, with
    the dropout mask the model drew. Each parameter is checked at a few random
    coordinates plus its largest-gradient one, against rtol 2e-3 and an atol of
    2e-3 times that parameter's largest gradient (+ 1e-6: gradients that are exactly
    zero, like a conv bias before batch norm, come out as float32 round-off).
    """
    model.train(training)
    loss, grads, dx, masks = _loss_and_grads(model, x, y)
    params = params64(model)
    x64 = x.astype(np.float64)

    def loss64(p, inp):
        return cross_entropy64(forward64(model, p, inp, training, masks), y)

    assert loss == pytest.approx(loss64(params, x64), rel=1e-5, abs=1e-6)
    g = np.random.default_rng(seed)
    h = 1e-6
    targets = [(name, params[name], grads[name]) for name in params] + [("input", x64, dx)]
    for name, array, analytic in targets:
        flat = array.reshape(-1)
        idx = np.unique(np.append(g.choice(flat.size, min(coords_per_param, flat.size),
                                           replace=False),
                                  np.argmax(np.abs(analytic))))
        numeric = []
        for i in idx:
            old = flat[i]
            flat[i] = old + h
            hi = loss64(params, x64)
            flat[i] = old - h
            lo = loss64(params, x64)
            flat[i] = old
            numeric.append((hi - lo) / (2 * h))
        scale = float(np.abs(analytic).max())
        np.testing.assert_allclose(analytic.reshape(-1)[idx], numeric, rtol=2e-3,
                                   atol=2e-3 * scale + 1e-6, err_msg=f"gradient of {name}")


@pytest.mark.parametrize("batchnorm", [False, True], ids=["mnist_cnn", "mnist_cnn_bn"])
def test_whole_model_gradient_matches_finite_differences(batchnorm):
    model = models.mnist_cnn(batchnorm=batchnorm, seed=3)
    x, y = _batch(4)
    _check_against_finite_differences(model, x, y, training=True)


def test_whole_model_gradient_eval_mode_uses_running_stats():
    """Eval mode (running batch-norm statistics, no dropout), as the visualisations use."""
    model = models.mnist_cnn_bn(seed=5)
    for s in range(3):  # make the running statistics non-trivial
        model(_batch(10 + s, n=8)[0] * 2 + 0.5)
    x, y = _batch(6)
    _check_against_finite_differences(model, x, y, training=False, coords_per_param=3)


def test_small_model_full_gradient():
    """Every coordinate of every parameter of a scaled-down model (12x12 input)."""
    model = models.mnist_cnn_bn(input_size=12, channels=(2, 3), hidden=5, seed=1)
    x, y = _batch(2, n=4, size=12)
    model.train()
    loss, grads, dx, masks = _loss_and_grads(model, x, y)
    params = params64(model)
    for name in params:
        flat = params[name].reshape(-1)
        numeric = np.empty(flat.size)
        for i in range(flat.size):
            old = flat[i]
            flat[i] = old + 1e-6
            hi = cross_entropy64(forward64(model, params, x, True, masks), y)
            flat[i] = old - 1e-6
            lo = cross_entropy64(forward64(model, params, x, True, masks), y)
            flat[i] = old
            numeric[i] = (hi - lo) / 2e-6
        np.testing.assert_allclose(grads[name].reshape(-1), numeric, rtol=2e-3,
                                   atol=1e-3 * np.abs(numeric).max() + 1e-6, err_msg=name)


# ---------------------------------------------------------------- the module contract

def test_parameter_names_counts_and_state_dict():
    model = models.mnist_cnn()
    assert [n for n, _ in model.named_parameters()] == [
        "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert model.num_parameters() == 421_642
    bn = models.mnist_cnn_bn()
    assert bn.num_parameters() == 421_834
    keys = list(bn.state_dict())
    assert keys[:2] == ["conv1.weight", "conv1.bias"]
    assert {"bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
            "dropout.seed", "dropout.offset"} <= set(keys)
    assert all(p.data.dtype == np.float32 for p in bn.parameters())
    assert bn["fc1"].weight.shape == (128, 3136)


def test_summary_and_repr():
    model = models.mnist_cnn_bn()
    text = model.summary()
    assert "(N, 32, 28, 28)" in text and "(N, 64, 7, 7)" in text and "(N, 3136)" in text
    assert "421,834" in text
    r = repr(model)
    assert "(conv1): Conv2d(1, 32, kernel_size=(3, 3)" in r and "(dropout): Dropout(p=0.5)" in r


def test_output_shape_matches_forward():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.MaxPool2d(3, 2, 1,
                                                                                ceil_mode=True),
                          nn.Conv2d(4, 2, (3, 1), padding="same"), nn.Flatten())
    x = np.zeros((2, 3, 17, 13), np.float32)
    assert model.output_shape(x.shape) == model(x).shape


def test_init_matches_pytorch_defaults():
    conv = nn.Conv2d(16, 8, 3, rng=0)
    bound = 1 / math.sqrt(16 * 9)
    for a in (conv.weight.data, conv.bias.data):
        assert a.dtype == np.float32 and np.abs(a).max() <= bound
    assert conv.weight.data.std() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    lin = nn.Linear(400, 300, rng=0)
    bound = 1 / math.sqrt(400)
    assert np.abs(lin.weight.data).max() <= bound and np.abs(lin.bias.data).max() <= bound
    assert lin.weight.data.std() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    bn = nn.BatchNorm2d(5)
    assert (bn.weight.data == 1).all() and (bn.bias.data == 0).all()
    assert (bn.running_mean == 0).all() and (bn.running_var == 1).all()
    assert int(bn.num_batches_tracked) == 0


def test_init_is_seeded():
    a, b, c = models.mnist_cnn(seed=7), models.mnist_cnn(seed=7), models.mnist_cnn(seed=8)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        np.testing.assert_array_equal(pa.data, pb.data, err_msg=name)
        assert not np.array_equal(pa.data, pc.data), name
    assert int(a["dropout"].seed) == int(b["dropout"].seed) != int(c["dropout"].seed)
    nn.manual_seed(11)
    first = nn.Linear(4, 3).weight.data
    nn.manual_seed(11)
    np.testing.assert_array_equal(first, nn.Linear(4, 3).weight.data)


def test_gradients_accumulate_and_zero_grad():
    model = models.mnist_cnn(input_size=8, channels=(2, 2), hidden=4).eval()
    x, y = _batch(0, n=2, size=8)
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(model(x), y)
    model.backward(loss_fn.backward())
    once = {n: p.grad.copy() for n, p in model.named_parameters()}
    loss_fn(model(x), y)
    model.backward(loss_fn.backward())
    for n, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, 2 * once[n], rtol=1e-6, atol=1e-7, err_msg=n)
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_train_eval_switch_dropout_and_batchnorm():
    model = models.mnist_cnn_bn(seed=2)
    assert model.training and all(m.training for m in model.modules())
    x, _ = _batch(1, n=16)
    bn = model["bn1"]
    model.train()
    model(x)
    assert int(bn.num_batches_tracked) == 1
    assert not np.allclose(bn.running_mean, 0)
    drop = model.activations["dropout"]
    assert (drop == 0).mean() > 0.3  # half the units dropped (plus ReLU zeros)
    kept = drop != 0
    np.testing.assert_allclose(drop[kept], 2 * model.activations["relu3"][kept], rtol=1e-6)
    stats = bn.running_mean.copy(), bn.running_var.copy()
    model.eval()
    assert not any(m.training for m in model.modules())
    out1 = model(x)
    assert model.activations["dropout"] is model.activations["relu3"]  # identity in eval
    np.testing.assert_array_equal(bn.running_mean, stats[0])  # eval leaves stats alone
    assert int(bn.num_batches_tracked) == 1
    conv = model.activations["conv1"].astype(np.float64)
    expect = ((conv - stats[0][None, :, None, None]) / np.sqrt(stats[1][None, :, None, None]
                                                             + bn.eps))
    np.testing.assert_allclose(model.activations["bn1"], expect, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out1, model(x))  # eval is deterministic


def test_batchnorm_momentum_none_is_cumulative_average():
    bn = nn.BatchNorm1d(3, momentum=None)
    g = np.random.default_rng(0)
    batches = [g.standard_normal((5, 3)).astype(np.float32) for _ in range(3)]
    for b in batches:
        bn(b)
    np.testing.assert_allclose(bn.running_mean, np.mean([b.mean(0) for b in batches], 0),
                               rtol=1e-5, atol=1e-6)


def test_dropout_same_seed_same_masks_and_backward_uses_the_mask():
    x = np.ones((4, 64), np.float32)
    a, b = nn.Dropout(0.5, seed=42), nn.Dropout(0.5, seed=42)
    first, again = a(x), b(x)
    np.testing.assert_array_equal(first, again)
    second = a(x)
    assert not np.array_equal(first, second)  # the offset advanced
    assert int(a.offset) == 2
    np.testing.assert_array_equal(first, F.dropout_mask(x.shape, 0.5, 42, 0))
    g = np.arange(256, dtype=np.float32).reshape(4, 64)
    np.testing.assert_array_equal(a.backward(g), g * second)
    a.eval()
    assert a(x) is x and a.backward(g) is g


def test_sequential_records_activations_and_gradients():
    model = models.mnist_cnn_bn(input_size=8, channels=(3, 4), hidden=6, seed=4).eval()
    x, y = _batch(3, n=2, size=8)
    out = model(x)
    assert list(model.activations) == model.names
    manual = x
    for name, layer in model.named_children():
        manual = layer(manual)
        np.testing.assert_array_equal(model.activations[name], manual, err_msg=name)
    g = np.random.default_rng(0).standard_normal(out.shape).astype(np.float32)
    model(x)
    dx = model.backward(g)
    assert list(model.gradients) == model.names[::-1]
    assert model.gradients["fc2"] is g and model.input_gradient is dx
    for name in model.names:
        assert model.gradients[name].shape == model.activations[name].shape, name
    # the gradient w.r.t. conv2's output, then backward from there, reproduce dx
    model.zero_grad()
    at_conv2 = model.backward(g, stop="conv2")
    np.testing.assert_array_equal(at_conv2, model.gradients["conv2"])
    assert "conv1" not in model.gradients
    dx_again = model.backward(at_conv2, start="conv2")
    np.testing.assert_array_equal(dx_again, dx)


def test_sequential_forward_start_stop_and_indexing():
    model = models.mnist_cnn(input_size=8, channels=(3, 4), hidden=6).eval()
    x, _ = _batch(1, n=2, size=8)
    full = model(x)
    mid = model(x, stop="pool1")
    np.testing.assert_array_equal(mid, model.activations["pool1"])
    assert list(model.activations)[-1] == "pool1"
    np.testing.assert_array_equal(model(mid, start="pool1"), full)
    assert model[0] is model["conv1"] and model[-1] is model["fc2"]
    head = model[:4]
    assert isinstance(head, nn.Sequential) and head.names == ["conv1", "relu1", "pool1", "conv2"]
    assert head[0] is model["conv1"]
    with pytest.raises(KeyError, match="no layer 'nope'"):
        model["nope"]
    with pytest.raises(ValueError, match="comes after"):
        model.backward(full, start="conv1", stop="fc1")


def test_guided_backward_and_param_grads_off():
    model = models.mnist_cnn(input_size=8, channels=(3, 4), hidden=6, seed=9).eval()
    x, _ = _batch(5, n=2, size=8)
    out = model(x)
    g = np.random.default_rng(1).standard_normal(out.shape).astype(np.float32)
    guided = model.backward(g, guided=True, param_grads=False)
    assert all(p.grad is None for p in model.parameters())
    # the same pass by hand, with the guided rule at every ReLU
    manual = g
    for name in reversed(model.names):
        layer = model[name]
        if isinstance(layer, nn.ReLU):
            manual = F.relu_backward(manual, layer._input, guided=True)
        else:
            manual = layer.backward(manual)
    model.zero_grad()
    np.testing.assert_array_equal(guided, manual)
    plain = model.backward(g)
    assert not np.array_equal(plain, guided)
    assert all(p.requires_grad for p in model.parameters())
    model["relu1"].guided = True  # a switchable rule on the module itself
    assert not np.array_equal(model.backward(g), plain)
    assert model.backward(g, input_grad=False) is None


def test_load_state_dict_checks_shapes_names_and_copies_in_place():
    a, b = models.mnist_cnn(seed=1), models.mnist_cnn(seed=2)
    weight = b["fc1"].weight.data
    b.load_state_dict(a.state_dict())
    assert b["fc1"].weight.data is weight
    np.testing.assert_array_equal(weight, a["fc1"].weight.data)
    state = dict(a.state_dict())
    state["fc2.weight"] = np.zeros((3, 128), np.float32)
    before = b["conv1"].weight.data.copy()
    b["conv1"].weight.data += 1
    with pytest.raises(ValueError, match=r"'fc2.weight' has shape \(3, 128\).*\(10, 128\)"):
        b.load_state_dict(state)
    np.testing.assert_array_equal(b["conv1"].weight.data, before + 1)  # nothing copied
    del state["fc2.weight"]
    with pytest.raises(ValueError, match="missing.*fc2.weight"):
        b.load_state_dict(state)
    missing, unexpected = b.load_state_dict({**state, "extra": np.zeros(1)}, strict=False)
    assert missing == ["fc2.weight"] and unexpected == ["extra"]


def test_spec_round_trip_and_unknown_type():
    model = models.mnist_cnn_bn()
    rebuilt = nn.from_spec(model.spec())
    assert rebuilt.spec() == model.spec() and repr(rebuilt) == repr(model)
    with pytest.raises(ValueError, match="unknown layer type 'Bogus'"):
        nn.from_spec({"type": "Bogus", "args": {}})


def test_to_device():
    model = models.mnist_cnn()
    assert model.to("cpu") is model and model.device == "cpu"
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        model.to("tpu")
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="CuPy"):
            model.to("cuda")


def test_flatten_dims_as_torch(rng):
    """start_dim / end_dim: negative from the end, out of range a ValueError naming
    them (torch: IndexError), a 0-d input flattened to (1,); the backward restores
    the shape."""
    x = randn(rng, 2, 3, 4, 5)
    for dims, shape in [((), (2, 60)), ((0,), (120,)), ((1, 2), (2, 12, 5)),
                        ((-3, -2), (2, 12, 5)), ((3,), (2, 3, 4, 5)), ((-1, -1), (2, 3, 4, 5))]:
        layer = nn.Flatten(*dims)
        out = layer(x)
        assert out.shape == shape, dims
        assert layer.backward(out).shape == x.shape
    for dims, name in [((4,), "start_dim"), ((-5,), "start_dim"), ((1, 4), "end_dim"),
                       ((1, -7), "end_dim")]:
        with pytest.raises(ValueError, match=f"{name}=-?\\d+ is out of range"):
            nn.Flatten(*dims)(x)
    with pytest.raises(ValueError, match="start_dim=1 is out of range"):
        nn.Flatten()(randn(rng, 5))  # a 1-D input has no dimension 1
    with pytest.raises(ValueError, match="after end_dim"):
        nn.Flatten(2, 1)(x)
    assert nn.Flatten(0)(np.float32(3.0)).shape == (1,)


def test_layers_take_torch_s_device_and_dtype_arguments():
    """device= / dtype= as torch's factory arguments: float32 only, 'cpu' (or 'cuda',
    tested with the GPU paths); not part of the saved configuration."""
    for make in (lambda **kw: nn.Conv2d(2, 3, 3, **kw), lambda **kw: nn.Linear(4, 5, **kw),
                 lambda **kw: nn.BatchNorm2d(3, **kw), lambda **kw: nn.BatchNorm1d(3, **kw)):
        layer = make(device="cpu", dtype=np.float32)
        assert layer.device == "cpu" and "device" not in layer.get_config()
        assert make(dtype="float32").weight.data.dtype == np.float32
        for bad in (np.float64, "float16", object()):
            with pytest.raises(TypeError, match="dtype must be float32"):
                make(dtype=bad)


def test_layer_argument_errors():
    with pytest.raises(ValueError, match="divisible by groups"):
        nn.Conv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="in_channels"):
        nn.Conv2d(0, 4, 3)
    with pytest.raises(ValueError, match="p must be in"):
        nn.Dropout(1.5)
    with pytest.raises(ValueError, match="padding must be between"):
        nn.MaxPool2d(2, padding=2)
    with pytest.raises(ValueError, match="4-D with 3 channels"):
        nn.BatchNorm2d(3)(np.zeros((2, 3), np.float32))
    with pytest.raises(RuntimeError, match="before forward"):
        nn.ReLU().backward(np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="Parameter"):
        layer = nn.Linear(2, 2)
        layer.weight = np.zeros((2, 2))


def test_softmax_logsoftmax_and_loss_modules_match_functional():
    g = np.random.default_rng(0)
    x = g.standard_normal((4, 5)).astype(np.float32)
    y = g.integers(0, 5, 4)
    go = g.standard_normal((4, 5)).astype(np.float32)
    sm, lsm = nn.Softmax(dim=1), nn.LogSoftmax(dim=1)
    np.testing.assert_array_equal(sm(x), F.softmax(x, dim=1))
    np.testing.assert_array_equal(sm.backward(go), F.softmax_backward(go, F.softmax(x, 1), 1))
    np.testing.assert_array_equal(lsm(x), F.log_softmax(x, dim=1))
    np.testing.assert_array_equal(lsm.backward(go),
                                  F.log_softmax_backward(go, F.log_softmax(x, 1), 1))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    assert float(loss_fn(x, y)) == float(F.cross_entropy(x, y, label_smoothing=0.1))
    np.testing.assert_array_equal(loss_fn.backward(),
                                  F.cross_entropy_backward(1.0, x, y, label_smoothing=0.1))


def test_training_step_is_identical_for_any_thread_count():
    x, y = _batch(0, n=8)
    results = []
    before = fastcnn.get_num_threads()
    try:
        for threads in (1, 2):
            fastcnn.set_num_threads(threads)
            model = models.mnist_cnn_bn(seed=0)
            loss_fn = nn.CrossEntropyLoss()
            loss_fn(model(x), y)
            model.backward(loss_fn.backward())
            results.append([p.grad for p in model.parameters()])
    finally:
        fastcnn.set_num_threads(before)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_sequential_construction_forms():
    conv, relu = nn.Conv2d(1, 2, 3), nn.ReLU()
    assert nn.Sequential(conv, relu).names == ["0", "1"]
    assert nn.Sequential(OrderedDict(c=conv, r=relu)).names == ["c", "r"]
    assert nn.Sequential([("c", conv), ("r", relu)]).names == ["c", "r"]
    with pytest.raises(ValueError, match="duplicate"):
        nn.Sequential([("c", conv), ("c", relu)])
    with pytest.raises(TypeError, match="must be a Module"):
        nn.Sequential(conv, np.zeros(3))


def _train_pass(model, x, y, fuse, **backward_kwargs):
    model.fuse = fuse
    model.train()
    model.dropout.eval()  # the same (no) dropout mask in both runs
    for p in model.parameters():
        p.grad = None
    loss_fn = nn.CrossEntropyLoss()
    out = model.forward(x)
    loss_fn.forward(out, y)
    gx = model.backward(loss_fn.backward(), **backward_kwargs)
    return out, gx, [p.grad.copy() for p in model.parameters()]


@pytest.mark.parametrize("batchnorm", [False, True])
def test_relu_pool_fusion_changes_no_bit(batchnorm):
    """Training mode runs ReLU + MaxPool2d as one op (a batch norm before them
    taking its gradients from the pool's window codes): output, input gradient
    and every parameter gradient equal the unfused run bit for bit
    (negative-only windows and ties included); only the fused ReLUs (and the
    batch norms' output gradients) go unrecorded."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 1, 28, 28)).astype(np.float32)
    x[:, :, :, :7] = -1.0  # all-negative windows after the first convolution's bias
    y = rng.integers(0, 10, 6)
    model = models.mnist_cnn(batchnorm=batchnorm, seed=1)
    plain = _train_pass(model, x, y, fuse=False)
    plain_names = set(model.activations)
    fused = _train_pass(model, x, y, fuse=True)
    for a, b in zip(plain[:2], fused[:2]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(plain[2], fused[2]):
        np.testing.assert_array_equal(a, b)
    assert plain_names - set(model.activations) == (
        {"relu1", "relu2", "bn1", "bn2"} if batchnorm else {"relu1", "relu2"})
    assert "relu1" not in model.gradients and "conv1" in model.gradients
    if batchnorm:  # the batch norms took their gradients from the pools' window codes
        assert "bn1" not in model.gradients and "bn2" not in model.gradients


@pytest.mark.parametrize("batchnorm", [False, True])
def test_relu_pool_fusion_backward_stops_and_guided_rules_fall_back(batchnorm):
    """After a fused forward, a backward that stops at the ReLU's (or the
    batch norm's) output, or that applies the guided rule, runs the layers
    apart (the batch norm's output computed again, to the bit): same results
    as an unfused forward."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 1, 28, 28)).astype(np.float32)
    g = rng.standard_normal((3, 10)).astype(np.float32)
    results = {}
    for fuse in (False, True):
        model = models.mnist_cnn(batchnorm=batchnorm, seed=2)  # fresh running statistics
        model.train()
        model.dropout.eval()
        model.fuse = fuse
        out = model.forward(x)
        stops = ["relu2", "bn2"] if batchnorm else ["relu2"]
        results[fuse] = [out] + [model.backward(g, stop=s, param_grads=False) for s in stops] + [
            model.backward(g, guided=True, param_grads=False)]
    for a, b in zip(results[False], results[True]):
        np.testing.assert_array_equal(a, b)



def test_first_conv_grads_from_pool_codes_change_no_bit():
    """With no input gradient asked for (training), the first convolution of
    Conv-ReLU-MaxPool(2) takes its weight and bias gradients straight from the
    pool's window codes: the same bits as the unfused run, and no entry for
    the convolution's output gradient."""
    rng = np.random.default_rng(3)
    for n, size in ((5, 28), (2, 27)):  # 27: an odd conv output, a row and column no window has
        x = rng.standard_normal((n, 1, size, size)).astype(np.float32)
        x[:, :, :, :6] = -2.0
        y = rng.integers(0, 10, n)
        model = models.mnist_cnn(seed=4) if size == 28 else nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(8 * 13 * 13, 10))
        if not hasattr(model, "dropout"):
            model.dropout = nn.Dropout(0.0)
        plain = _train_pass(model, x, y, fuse=False, input_grad=False)
        fused = _train_pass(model, x, y, fuse=True, input_grad=False)
        np.testing.assert_array_equal(plain[0], fused[0])
        assert plain[1] is None and fused[1] is None
        for a, b in zip(plain[2], fused[2]):
            np.testing.assert_array_equal(a, b)
        first = model.names[0]
        if fastcnn._backend._cpu.gemm_kernel() == "avx512":  # the direct path took it
            assert first not in model.gradients


def test_batchnorm_grads_from_pool_codes_change_no_bit():
    """BatchNorm2d -> ReLU -> MaxPool2d(2) in training: the batch norm's
    gradients from the pool's window codes equal the unfused run's bit for
    bit, at odd sizes (a row and column no window covers) and with a frozen
    affine weight."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 2, 13, 15)).astype(np.float32)
    y = rng.integers(0, 10, 3)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 10))
    model.dropout = nn.Dropout(0.0)
    results = []
    for fuse in (False, True):
        for m in model:  # the same running statistics before each run
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean[...] = 0.0
                m.running_var[...] = 1.0
        results.append(_train_pass(model, x, y, fuse=fuse))
    (out_a, gx_a, grads_a), (out_b, gx_b, grads_b) = results
    np.testing.assert_array_equal(out_a, out_b)
    np.testing.assert_array_equal(gx_a, gx_b)
    for a, b in zip(grads_a, grads_b):
        np.testing.assert_array_equal(a, b)
    assert "1" not in model.gradients and "5" not in model.gradients  # the batch norms' outputs


def test_fused_batchnorm_output_is_never_computed_in_a_plain_step():
    """A training step through BatchNorm2d -> ReLU -> MaxPool2d(2) neither
    writes nor recomputes the batch norm's output: the ReLU and the pool keep
    it deferred unless a backward pass stops there or is guided."""
    from fastcnn.nn.layers import _Deferred

    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 1, 28, 28)).astype(np.float32)
    model = models.mnist_cnn(batchnorm=True, seed=3)
    model.train()
    model.dropout.eval()
    out = model.forward(x)
    model.backward(np.ones_like(out), input_grad=False)
    assert isinstance(model["relu1"].__dict__["_input"], _Deferred)
    assert isinstance(model["pool1"].__dict__["_input"], _Deferred)
    model.backward(np.ones_like(out), guided=True, param_grads=False)
    assert isinstance(model["relu1"].__dict__["_input"], np.ndarray)  # computed on demand


# ---------------------------------------------------------------- torch's constructor order

def test_relu_and_dropout_take_inplace_first():
    """ReLU(True) / Dropout(p, True) are torch's in-place flags, not guided / a seed."""
    x = np.array([[-1.0, 0.5, 2.0]], np.float32)
    g = np.array([[-1.0, -1.0, 3.0]], np.float32)
    relu = nn.ReLU(True)
    assert relu.inplace and not relu.guided
    relu(x)
    np.testing.assert_array_equal(relu.backward(g), [[0.0, -1.0, 3.0]])
    assert nn.ReLU(guided=True).guided
    restored = nn.Sequential(nn.ReLU(guided=True)).get_config()
    assert nn.Sequential.from_config(restored)[0].guided
    drop = nn.Dropout(0.5, True, seed=7)
    assert drop.inplace and int(drop.seed) == 7
    with pytest.raises(TypeError):
        nn.Dropout(0.5, True, 7)                # the seed is keyword-only


def test_max_pool_return_indices():
    """MaxPool2d(..., return_indices=True) returns (output, indices) as F.max_pool2d,
    in training and eval, and still runs backward; its config round-trips."""
    x = randn(np.random.default_rng(0), 2, 3, 6, 6)
    for training in (True, False):
        pool = nn.MaxPool2d(2, return_indices=True).train(training)
        out, idx = pool(x)
        want, want_idx = F.max_pool2d(x, 2, return_indices=True)
        np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(idx, want_idx)
        np.testing.assert_array_equal(pool.backward(np.ones_like(out)),
                                      F.max_pool2d_backward(np.ones_like(out), x, 2))
    again = nn.Sequential.from_config(nn.Sequential(pool).get_config())[0]
    assert again.return_indices and not nn.MaxPool2d(2).get_config().get("return_indices")
    assert nn.MaxPool2d(3, 2, 1, 1, False, True).ceil_mode      # torch's order


def test_zero_grad_set_to_none():
    layer = nn.Linear(3, 2, rng=0)
    layer.weight.grad = np.ones((2, 3), np.float32)
    kept = layer.weight.grad
    layer.zero_grad(set_to_none=False)
    assert layer.weight.grad is kept and not kept.any() and layer.bias.grad is None
    layer.zero_grad()
    assert layer.weight.grad is None


def test_state_dict_leaves_out_none_buffers():
    loss = nn.CrossEntropyLoss()
    assert list(loss.state_dict()) == []
    loss.load_state_dict({})
    weighted = nn.CrossEntropyLoss([1.0, 2.0])
    weighted.load_state_dict({"weight": np.array([3.0, 4.0])})
    np.testing.assert_array_equal(weighted.weight, [3.0, 4.0])
    with pytest.raises(ValueError, match="unexpected"):
        loss.load_state_dict({"weight": np.ones(2)})


def test_init_helpers():
    from fastcnn.nn import init
    w = np.empty((400, 300), np.float32)
    assert init.calculate_fan_in_and_fan_out(w) == (300, 400)
    init.xavier_uniform_(w, gain=2.0, rng=0)
    bound = 2.0 * math.sqrt(6 / 700)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    init.xavier_normal_(w, rng=1)
    assert abs(w.std() - math.sqrt(2 / 700)) < 0.01 * math.sqrt(2 / 700) * 5
    init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu", rng=2)
    assert abs(w.std() - math.sqrt(2 / 400)) < 0.05 * math.sqrt(2 / 400)
    init.constant_(w, 0.25)
    assert (w == 0.25).all()
    assert init.calculate_gain("selu") == 0.75 and init.calculate_gain("conv_transpose2d") == 1
    with pytest.raises(ValueError, match="negative_slope"):
        init.calculate_gain("leaky_relu", True)
    with pytest.raises(ValueError, match="unsupported nonlinearity"):
        init.calculate_gain("gelu")
