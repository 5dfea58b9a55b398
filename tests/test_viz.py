"""fastcnn.viz: attribution methods against independent references.

- saliency / gradients against central finite differences of a float64 NumPy
  forward pass written here (independent of the kernels);
- guided backpropagation against a hand-computed answer on a tiny network where
  the guided rule changes the result;
- occlusion (batched, incremental and full) against a one-image-at-a-time loop;
- Grad-CAM against its definition computed in NumPy;
- batch == one by one; the model's state untouched by every method.
"""

import copy
import itertools
from collections import OrderedDict

import numpy as np
import pytest

from fastcnn import models, nn, viz
from nn_reference import NP_PAD_MODES

# ---------------------------------------------------------------- float64 reference


def _conv64(x, w, b, stride, pad_lo, pad_hi, dilation, groups, padding_mode="zeros"):
    x = np.pad(x, ((0, 0), (0, 0), (pad_lo[0], pad_hi[0]), (pad_lo[1], pad_hi[1])),
               mode=NP_PAD_MODES[padding_mode])
    n, c, h, wd = x.shape
    k, cg, r, s = w.shape
    (sh, sw), (dh, dw) = stride, dilation
    oh, ow = (h - dh * (r - 1) - 1) // sh + 1, (wd - dw * (s - 1) - 1) // sw + 1
    out = np.zeros((n, k, oh, ow))
    kg = k // groups
    for g in range(groups):
        xs = x[:, g * cg:(g + 1) * cg]
        for i in range(r):
            for j in range(s):
                win = xs[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh,
                         j * dw:j * dw + sw * (ow - 1) + 1:sw]
                out[:, g * kg:(g + 1) * kg] += np.einsum("nchw,kc->nkhw", win,
                                                         w[g * kg:(g + 1) * kg, :, i, j])
    return out if b is None else out + b[None, :, None, None]


def _pool64(x, layer):
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    assert layer.dilation == (1, 1)
    n, c, h, w = x.shape

    def size(d, k, s, p):
        o = (d + 2 * p - k + (s - 1 if layer.ceil_mode else 0)) // s + 1
        return o - 1 if layer.ceil_mode and (o - 1) * s >= d + p else o

    oh, ow = size(h, kh, sh, ph), size(w, kw, sw, pw)
    xp = np.full((n, c, h + 2 * ph + kh, w + 2 * pw + kw), -np.inf)
    xp[:, :, ph:ph + h, pw:pw + w] = x
    out = np.full((n, c, oh, ow), -np.inf)
    for i in range(kh):
        for j in range(kw):
            out = np.maximum(out, xp[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw])
    return out


def forward64(model, x):
    """Every layer's output (eval mode) in float64, by name."""
    outputs = OrderedDict()
    x = np.asarray(x, np.float64)
    for name, layer in model.named_children():
        if isinstance(layer, nn.Conv2d):
            r, s = layer.kernel_size
            if layer.padding == "same":
                lo = [d * (k - 1) // 2 for k, d in zip((r, s), layer.dilation)]
                hi = [d * (k - 1) - p for k, d, p in zip((r, s), layer.dilation, lo)]
            else:
                lo = hi = (0, 0) if layer.padding == "valid" else layer.padding
            b = None if layer.bias is None else layer.bias.data.astype(np.float64)
            x = _conv64(x, layer.weight.data.astype(np.float64), b, layer.stride, lo, hi,
                        layer.dilation, layer.groups, layer.padding_mode)
        elif isinstance(layer, nn.BatchNorm2d):
            shape = (1, -1, 1, 1)
            x = ((x - layer.running_mean.reshape(shape)) / np.sqrt(
                layer.running_var.reshape(shape).astype(np.float64) + layer.eps)
                * layer.weight.data.reshape(shape) + layer.bias.data.reshape(shape))
        elif isinstance(layer, nn.ReLU):
            x = np.maximum(x, 0.0)
        elif isinstance(layer, nn.MaxPool2d):
            x = _pool64(x, layer)
        elif isinstance(layer, nn.Flatten):
            x = x.reshape(len(x), -1)
        elif isinstance(layer, nn.Linear):
            x = x @ layer.weight.data.T.astype(np.float64) + layer.bias.data
        elif isinstance(layer, nn.Dropout):
            pass
        else:
            raise NotImplementedError(type(layer).__name__)
        outputs[name] = x
    return outputs


def softmax64(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def numerical_input_grad(f, x, eps=1e-5):
    """d f / d x by central differences; f maps an array like x to a scalar."""
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += eps
        down[i] -= eps
        grad[i] = (f(up) - f(down)) / (2 * eps)
    return grad


# ---------------------------------------------------------------- models and data

def quadrature(method, n_steps):
    """(alphas, widths) on [0, 1]: numpy's Gauss-Legendre nodes, or the trapezoid rule
    over n_steps points from end to end."""
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n_steps)
        return (nodes + 1) / 2, weights / 2
    assert method == "riemann_trapezoid"
    widths = np.full(n_steps, 1 / n_steps)
    widths[[0, -1]] /= 2
    return np.linspace(0, 1, n_steps), widths


def small_cnn(seed=0, in_channels=2, input_size=8, classes=5):
    """mnist_cnn with batch norm, scaled down, with non-trivial running statistics."""
    model = models.mnist_cnn_bn(num_classes=classes, in_channels=in_channels,
                                input_size=input_size, channels=(3, 4), hidden=6, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for bn in (model.bn1, model.bn2):
        bn.running_mean[...] = rng.normal(0, 0.2, bn.num_features)
        bn.running_var[...] = rng.uniform(0.5, 2.0, bn.num_features)
        bn.weight.data[...] = rng.uniform(0.5, 1.5, bn.num_features)
        bn.bias.data[...] = rng.normal(0, 0.2, bn.num_features)
    return model.eval()


def odd_cnn(seed=0):
    """Every geometry the incremental occlusion handles: 'same' padding, a 3x3 pool with
    padding and ceil_mode, a strided, dilated, grouped conv, odd sizes."""
    rng = np.random.default_rng(seed)
    model = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(2, 4, 3, padding="same", rng=rng),
        relu1=nn.ReLU(),
        pool1=nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
        conv2=nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, rng=rng),
        bn2=nn.BatchNorm2d(6),
        relu2=nn.ReLU(),
        flatten=nn.Flatten(),
        fc=nn.Linear(6 * 3 * 3, 4, rng=rng)))
    model.bn2.running_mean[...] = rng.normal(0, 0.2, 6)
    return model.eval()


def padded_cnn(seed=0, first="zeros", second="circular"):
    """Convolutions whose padding is not zeros (the occlusion plan stops before them)."""
    rng = np.random.default_rng(seed)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(2, 3, 3, padding=1, padding_mode=first, rng=rng), relu1=nn.ReLU(),
        pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(3, 4, 3, padding="same", padding_mode=second, rng=rng),
        relu2=nn.ReLU(), flatten=nn.Flatten(), fc=nn.Linear(4 * 4 * 4, 3, rng=rng))).eval()


def images(n, c=2, size=8, seed=1):
    return np.random.default_rng(seed).standard_normal((n, c, size, size)).astype(np.float32)


# ---------------------------------------------------------------- saliency / gradients

@pytest.mark.parametrize("score", ["logit", "probability"])
def test_gradient_matches_finite_differences(score):
    model = small_cnn()
    x = images(2)
    target = np.array([1, 3])
    got = viz.gradient(model, x, target, score=score)
    assert got.shape == x.shape and got.dtype == np.float32
    for i in range(2):
        def f(xi, i=i):
            z = forward64(model, xi[None])["fc2"][0]
            return z[target[i]] if score == "logit" else softmax64(z)[target[i]]
        want = numerical_input_grad(f, x[i])
        np.testing.assert_allclose(got[i], want, rtol=1e-3, atol=1e-5 * np.abs(want).max())


def test_saliency_is_max_abs_gradient_over_channels():
    model = small_cnn()
    x = images(1)[0]
    want = numerical_input_grad(lambda xi: forward64(model, xi[None])["fc2"][0].max(), x)
    got = viz.saliency(model, x)          # default target: the predicted class
    assert got.shape == (8, 8)
    np.testing.assert_allclose(got, np.abs(want).max(axis=0), rtol=1e-3, atol=1e-6)


def test_neuron_gradient_matches_finite_differences():
    model = small_cnn()
    x = images(1)[0]
    act = forward64(model, x[None])["relu2"][0]
    channel = 2
    y, xx = np.unravel_index(np.argmax(act[channel]), act[channel].shape)
    cases = [((int(y), int(xx)), lambda a: a[channel, y, xx]),
             ("max", lambda a: a[channel, y, xx]),
             (None, lambda a: a[channel].sum())]
    for position, unit in cases:
        want = numerical_input_grad(lambda xi: unit(forward64(model, xi[None])["relu2"][0]), x)
        got = viz.gradient(model, x, layer="relu2", channel=channel, position=position)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6, err_msg=str(position))
    fc_unit = viz.gradient(model, x, layer="fc1", channel=4)
    want = numerical_input_grad(lambda xi: forward64(model, xi[None])["fc1"][0, 4], x)
    np.testing.assert_allclose(fc_unit, want, rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------- guided backprop

def tiny_guided_net(guided_flag=False):
    """x = [1, 2] -> h = W1 x + b1 = [1, 2, -7] -> ReLU -> W2 . = [2 -1 5] row for class 0.

    Plain gradient of class 0: the ReLU passes where h > 0: g_h = [2, -1, 0], dx = W1^T g_h
    = [2, -1]. Guided: only where the gradient is positive too: g_h = [2, 0, 0], dx = [2, 0].
    """
    fc1, fc2 = nn.Linear(2, 3), nn.Linear(3, 2)
    fc1.weight.data[...] = [[1, 0], [0, 1], [1, 1]]
    fc1.bias.data[...] = [0, 0, -10]
    fc2.weight.data[...] = [[2, -1, 5], [0, 0, 0]]
    fc2.bias.data[...] = 0
    return nn.Sequential(OrderedDict(flatten=nn.Flatten(), fc1=fc1, relu1=nn.ReLU(guided=guided_flag),
                                     fc2=fc2))


def test_guided_backprop_hand_computed():
    model = tiny_guided_net()
    x = np.array([[[1.0, 2.0]]], np.float32)                # (C, H, W) = (1, 1, 2)
    np.testing.assert_array_equal(viz.gradient(model, x, 0), [[[2.0, -1.0]]])
    np.testing.assert_array_equal(viz.guided_backprop(model, x, 0), [[[2.0, 0.0]]])
    # a unit of a layer: relu1's unit 1 (h = 2 > 0) -> W1[1] = [0, 1]; the dead unit 2 -> 0
    np.testing.assert_array_equal(viz.guided_backprop(model, x, layer="relu1", channel=1),
                                  [[[0.0, 1.0]]])
    np.testing.assert_array_equal(viz.guided_backprop(model, x, layer="relu1", channel=2),
                                  [[[0.0, 0.0]]])


def test_plain_gradient_ignores_and_keeps_relu_guided_flag():
    model = tiny_guided_net(guided_flag=True)
    x = np.array([[[1.0, 2.0]]], np.float32)
    np.testing.assert_array_equal(viz.gradient(model, x, 0), [[[2.0, -1.0]]])
    assert model.relu1.guided is True


def test_guided_backprop_on_cnn_zeroes_negative_paths():
    model = small_cnn()
    x = images(2)
    guided = viz.guided_backprop(model, x)
    plain = viz.gradient(model, x)
    assert guided.shape == x.shape
    assert not np.allclose(guided, plain)
    # the last layer before the input is conv1 (linear): guided = conv1^T of a map that is
    # zero wherever the plain backward's gradient at relu1's input is, and non-negative
    model.forward(x)
    seed = np.zeros((2, 5), np.float32)
    seed[np.arange(2), model.activations["fc2"].argmax(1)] = 1
    at_relu1 = model.backward(seed, guided=True, stop="bn1", param_grads=False)
    assert (at_relu1 >= 0).all() and (at_relu1 > 0).any()


def test_deconvolution_hand_computed():
    """tiny_guided_net, class 0: the deconvnet rule passes max(g_h, 0) = [2, 0, 5] whatever
    h's sign (the third unit is dead, h = -7), so dx = W1^T [2, 0, 5] = [7, 5]."""
    model = tiny_guided_net(guided_flag=True)      # the ReLU's own flag does not matter
    x = np.array([[[1.0, 2.0]]], np.float32)
    np.testing.assert_array_equal(viz.deconvolution(model, x, 0), [[[7.0, 5.0]]])
    # a unit of a layer: relu1's dead unit 2 still passes its seed of 1: dx = W1[2] = [1, 1]
    np.testing.assert_array_equal(viz.deconvolution(model, x, layer="relu1", channel=2),
                                  [[[1.0, 1.0]]])
    assert model.relu1.guided is True
    model.forward(x[None])
    with pytest.raises(ValueError, match="guided must be"):
        model.backward(np.ones((1, 2), np.float32), guided="deconv")


def deconvolution64(model, x, target):
    """The deconvnet's backward in float64, layer by layer: max(g, 0) at every ReLU, each
    max pool's gradient to the first maximum of its window (the forward's switch; after
    a ReLU, windows of zeros tie), every other layer's true backward (central
    differences: they are affine)."""
    outputs = forward64(model, x)
    names = list(outputs)
    g = np.zeros_like(outputs[names[-1]])
    g[np.arange(len(x)), target] = 1.0
    for k in range(len(names) - 1, -1, -1):
        layer = model[names[k]]
        before = outputs[names[k - 1]] if k else np.asarray(x, np.float64)
        if isinstance(layer, nn.ReLU):
            g = np.maximum(g, 0.0)
        elif isinstance(layer, nn.MaxPool2d):
            g = _pool_switches64(layer, before, g)
        else:
            g = _vjp64(lambda a, layer=layer: _layer64(layer, a), before, g)
    return g


def _window_max64(layer, plane, oy, ox):
    """The (y, x) of the first maximum of pool window (oy, ox) over ``plane`` (H, W)."""
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    assert layer.dilation == (1, 1)
    window = [(y, x) for y in range(oy * sh - ph, oy * sh - ph + kh)
              for x in range(ox * sw - pw, ox * sw - pw + kw)
              if 0 <= y < plane.shape[0] and 0 <= x < plane.shape[1]]
    return max(window, key=lambda p: (plane[p], -window.index(p)))


def _pool_switches64(layer, a, g):
    out = np.zeros_like(a)
    for n, c, oy, ox in np.ndindex(g.shape):
        y, x = _window_max64(layer, a[n, c], oy, ox)
        out[n, c, y, x] += g[n, c, oy, ox]
    return out


def _layer64(layer, a):
    model = nn.Sequential(OrderedDict(only=layer))
    return forward64(model, a)["only"]


def _vjp64(f, a, g, eps=1e-6):
    """g^T J_f(a) by central differences, a batch at a time."""
    out = np.zeros_like(a)
    for i in np.ndindex(a.shape[1:]):
        up, down = a.copy(), a.copy()
        up[(slice(None),) + i] += eps
        down[(slice(None),) + i] -= eps
        diff = (f(up) - f(down)) / (2 * eps)
        out[(slice(None),) + i] = (diff * g).reshape(len(a), -1).sum(axis=1)
    return out


def test_deconvolution_matches_layer_by_layer_reference():
    model = small_cnn()
    x = images(2)
    target = np.array([2, 4])
    got = viz.deconvolution(model, x, target)
    want = deconvolution64(model, x, target)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * np.abs(want).max())
    assert not np.allclose(got, viz.guided_backprop(model, x, target))


def test_input_x_gradient_is_input_times_finite_differences():
    model = small_cnn()
    x = images(1)[0]
    want = x * numerical_input_grad(lambda xi: forward64(model, xi[None])["fc2"][0, 3], x)
    got = viz.input_x_gradient(model, x, 3)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6 * np.abs(want).max())


# ---------------------------------------------------------------- integrated gradients

def linear_net(seed=0):
    """Flatten + Linear: the gradient is W[t] everywhere, so integrated gradients are
    exactly (x - baseline) * W[t] times the quadrature's total width."""
    rng = np.random.default_rng(seed)
    return nn.Sequential(OrderedDict(flatten=nn.Flatten(), fc=nn.Linear(2 * 4 * 3, 3, rng=rng)))


@pytest.mark.parametrize("method,width", [
    ("gausslegendre", 1.0), ("riemann_left", 1.0), ("riemann_middle", 1.0),
    ("riemann_right", 1.0),
    ("riemann_trapezoid", 6 / 7),    # Captum's widths: 1/n each, the two ends halved
])
def test_integrated_gradients_of_a_linear_model(method, width):
    model = linear_net()
    x = np.random.default_rng(1).standard_normal((2, 2, 4, 3)).astype(np.float32)
    base = np.random.default_rng(2).standard_normal((2, 4, 3)).astype(np.float32)
    w = model.fc.weight.data.astype(np.float64)
    got, delta = viz.integrated_gradients(model, x, [0, 2], baseline=base, n_steps=7,
                                          method=method, return_convergence_delta=True)
    want = (x - base.astype(np.float64)) * w[[0, 2]].reshape(2, 2, 4, 3) * width
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    change = ((x - base).reshape(2, -1).astype(np.float64) * w[[0, 2]]).sum(axis=1)
    np.testing.assert_allclose(delta, change * (width - 1.0), atol=1e-5)


def integrated_gradients64(model, x, target, baseline, alphas, widths, unit=None):
    """sum_k width_k * d score / d x at baseline + alpha_k (x - baseline), by central
    differences of the float64 forward, times (x - baseline); ``unit`` (the forward's
    outputs -> a number) instead of the class score when given."""
    x, baseline = np.asarray(x, np.float64), np.asarray(baseline, np.float64)
    if unit is None:
        def unit(outputs):
            return outputs["fc2"][0, target]
    total = np.zeros_like(x)
    for alpha, width in zip(alphas, widths):
        point = baseline + alpha * (x - baseline)
        total += width * numerical_input_grad(lambda xi: unit(forward64(model, xi[None])),
                                              point)
    return total * (x - baseline)


def test_integrated_gradients_of_a_unit():
    """A unit of a layer instead of a class score: a channel's sum, the unit at a
    position, and 'max' (the channel's strongest unit at x, fixed along the path)."""
    model = small_cnn()
    x = images(1)[0]
    base = images(1, seed=5)[0] * 0.3
    act = forward64(model, x[None])["relu2"][0, 1]
    y, xx = (int(v) for v in np.unravel_index(np.argmax(act), act.shape))
    r = np.sqrt(3 / 5)
    legendre = ([(1 - r) / 2, 0.5, (1 + r) / 2], [5 / 18, 8 / 18, 5 / 18])
    for position, unit in [(None, lambda o: o["relu2"][0, 1].sum()),
                           ((2, 1), lambda o: o["relu2"][0, 1, 2, 1]),
                           ("max", lambda o: o["relu2"][0, 1, y, xx])]:
        got, delta = viz.integrated_gradients(model, x, layer="relu2", channel=1,
                                              position=position, baseline=base, n_steps=3,
                                              return_convergence_delta=True)
        want = integrated_gradients64(model, x, None, base, *legendre, unit=unit)
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-5 * np.abs(want).max(),
                                   err_msg=str(position))
        change = unit(forward64(model, x[None])) - unit(forward64(model, base[None]))
        np.testing.assert_allclose(delta, want.sum() - change, atol=1e-4)
    # the true gradient whatever the model's own ReLU flags
    model.relu1.guided = True
    np.testing.assert_array_equal(
        viz.integrated_gradients(model, x, layer="relu2", channel=1, position="max",
                                 baseline=base, n_steps=3), got)
    model.relu1.guided = False
    with pytest.raises(ValueError, match="not both"):
        viz.integrated_gradients(model, x, 1, layer="relu2", channel=0)
    with pytest.raises(ValueError, match="pass layer= too"):
        viz.integrated_gradients(model, x, channel=0)


def test_integrated_gradients_match_path_of_finite_differences():
    """On the CNN, with the Gauss-Legendre nodes written out here for 3 steps, and the
    left Riemann sum; and the convergence delta against the float64 forward."""
    model = small_cnn()
    x = images(1)[0]
    base = images(1, seed=7)[0] * 0.2
    r = np.sqrt(3 / 5)
    legendre = ([(1 - r) / 2, 0.5, (1 + r) / 2], [5 / 18, 8 / 18, 5 / 18])
    for method, (alphas, widths) in [("gausslegendre", legendre),
                                     ("riemann_left", ([0, 1 / 3, 2 / 3], [1 / 3] * 3))]:
        got, delta = viz.integrated_gradients(model, x, 1, baseline=base, n_steps=3,
                                              method=method, return_convergence_delta=True)
        want = integrated_gradients64(model, x, 1, base, alphas, widths)
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-5 * np.abs(want).max(),
                                   err_msg=method)
        ends = forward64(model, np.stack([x, base]))["fc2"][:, 1]
        assert delta.shape == ()
        np.testing.assert_allclose(delta, want.sum() - (ends[0] - ends[1]), atol=1e-4)


def test_integrated_gradients_complete_with_many_steps():
    """Completeness: the attributions add up to score(x) - score(baseline), for the
    probability too, closer with more steps (a ReLU network's kinks keep Gauss-Legendre
    from being exact); the delta is that shortfall."""
    model = small_cnn()
    x = images(3)
    for score in ("logit", "probability"):
        scores = forward64(model, np.concatenate([x, np.zeros_like(x)]))["fc2"]
        if score == "probability":
            scores = softmax64(scores)
        t = scores[:3].argmax(axis=1)
        change = scores[np.arange(3), t] - scores[np.arange(3) + 3, t]
        errors = []
        for n_steps in (8, 128):
            attributions, delta = viz.integrated_gradients(
                model, x, n_steps=n_steps, score=score, return_convergence_delta=True)
            total = attributions.reshape(3, -1).astype(np.float64).sum(axis=1)
            np.testing.assert_allclose(delta, total - change, atol=1e-5)
            errors.append(np.abs(delta).max())
        assert errors[1] < errors[0] / 4 and errors[1] < 1e-2 * np.abs(change).max(), errors


def test_integrated_gradients_arguments():
    model = small_cnn()
    x = images(2)
    with pytest.raises(ValueError, match="method must be one of"):
        viz.integrated_gradients(model, x, method="simpson")
    with pytest.raises(ValueError, match="n_steps >= 2"):
        viz.integrated_gradients(model, x, n_steps=1, method="riemann_left")
    with pytest.raises(ValueError, match="n_steps"):
        viz.integrated_gradients(model, x, n_steps=0)
    with pytest.raises(ValueError, match="baseline must be"):
        viz.integrated_gradients(model, x, baseline=np.zeros((1, 8, 8)))
    with pytest.raises(TypeError, match="baseline"):
        viz.integrated_gradients(model, x, baseline="black")
    # one step of Gauss-Legendre: the gradient at the midpoint times (x - baseline)
    mid = viz.gradient(model, x * 0.5, [0, 1])
    np.testing.assert_allclose(viz.integrated_gradients(model, x, [0, 1], n_steps=1),
                               mid * x, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- DeepLIFT

def test_deep_lift_hand_computed():
    """tiny_guided_net at x = [4, 8], baseline 0: h = [4, 8, 2] against [0, 0, -10], so the
    ReLU's multipliers are delta_out / delta_in = [1, 1, 2/12] where the gradient has
    [1, 1, 1]: g_h = [2, -1, 5/6], dx = W1^T g_h = [17/6, -1/6], and x * dx = [34/3, -4/3],
    which sums to logit(x) - logit(0) = 10. A baseline of 1 leaves unit 0 unchanged
    (delta_in = 0): it passes the plain gradient."""
    model = tiny_guided_net()
    x = np.array([[[4.0, 8.0]]], np.float32)
    got, delta = viz.deep_lift(model, x, 0, return_convergence_delta=True)
    np.testing.assert_allclose(got, [[[34 / 3, -4 / 3]]], rtol=1e-6)
    assert abs(delta) < 1e-5
    np.testing.assert_allclose(viz.deep_lift(model, x, 0, multiply_by_inputs=False),
                               [[[17 / 6, -1 / 6]]], rtol=1e-6)
    # baseline [1, 1]: h0 = [1, 1, -8], delta_h = [3, 7, 10]: m = [1, 1, 2/10]
    np.testing.assert_allclose(viz.deep_lift(model, x, 0, baseline=1.0),
                               [[[3 * (2 + 1.0), 7 * (-1 + 1.0)]]], rtol=1e-6)
    x = np.array([[[1.0, 2.0]]], np.float32)      # h = [1, 2, -7]; baseline [1, 1]: h0 = [1, 1, -8]
    np.testing.assert_allclose(viz.deep_lift(model, x, 0, baseline=1.0, multiply_by_inputs=False),
                               [[[2.0, -1.0]]], rtol=1e-6)    # m = [plain 1, 1, 0]


def _pool_rule64(layer, a, b, g, h, eps):
    """DeepLIFT's max-pool rule in float64 for inputs a (image) and b (reference) with output
    gradients g and h: each window's change from the reference, split at top = max(out_a,
    out_b) into top - out_b at a's first maximum and out_a - top at b's, summed per input
    over the windows, over the input's change; each half's plain gradient where it is 0."""
    share = np.zeros_like(a)
    for n, c, oy, ox in np.ndindex(g.shape):
        ya, xa = _window_max64(layer, a[n, c], oy, ox)
        yb, xb = _window_max64(layer, b[n, c], oy, ox)
        top = max(a[n, c, ya, xa], b[n, c, yb, xb])
        share[n, c, ya, xa] += g[n, c, oy, ox] * (top - b[n, c, yb, xb])
        share[n, c, yb, xb] += h[n, c, oy, ox] * (a[n, c, ya, xa] - top)
    d = a - b
    small = np.abs(d) < eps
    ratio = share / np.where(small, 1.0, d)
    return (np.where(small, _pool_switches64(layer, a, g), ratio),
            np.where(small, _pool_switches64(layer, b, h), ratio))


def deep_lift64(model, x, base, target, eps=1e-10, keep=0):
    """DeepLIFT's multipliers in float64, layer by layer, for the image and the reference
    side by side: the rescale rule at every ReLU, the max-pool rule above, every other
    layer's true backward (central differences: they are affine). keep: back through
    all but the first ``keep`` layers (the multipliers of layer keep - 1's output)."""
    xs, bs = forward64(model, x), forward64(model, base)
    names = list(xs)
    g = np.zeros_like(xs[names[-1]])
    g[np.arange(len(x)), target] = 1.0
    h = g.copy()
    for k in range(len(names) - 1, keep - 1, -1):
        layer = model[names[k]]
        a = xs[names[k - 1]] if k else np.asarray(x, np.float64)
        b = bs[names[k - 1]] if k else np.asarray(base, np.float64)
        if isinstance(layer, nn.ReLU):
            d = a - b
            small = np.abs(d) < eps
            ratio = (np.maximum(a, 0) - np.maximum(b, 0)) / np.where(small, 1.0, d)
            g, h = g * np.where(small, a > 0, ratio), h * np.where(small, b > 0, ratio)
        elif isinstance(layer, nn.MaxPool2d):
            g, h = _pool_rule64(layer, a, b, g, h, eps)
        else:
            g = _vjp64(lambda v, layer=layer: _layer64(layer, v), a, g)
            h = _vjp64(lambda v, layer=layer: _layer64(layer, v), b, h)
    return g


@pytest.mark.parametrize("net", ["small", "odd"])
def test_deep_lift_matches_layer_by_layer_reference(net):
    """small_cnn (conv-bn-relu-pool twice, fc-relu-fc) and odd_cnn (an overlapping 3x3
    pool with padding and ceil_mode, a grouped dilated conv): against deep_lift64, with
    baselines a value, an image, one per sample and an image equal to x in places (the
    fallback to each image's own gradient)."""
    model = small_cnn() if net == "small" else odd_cnn()
    size = 8 if net == "small" else 9
    x = images(2, size=size)
    target = np.array([2, 1])
    twin = images(1, size=size, seed=5)[0]
    twin[:, :4] = x[0, :, :4]
    for baseline in (0.0, -0.3, images(1, size=size, seed=3)[0], images(2, size=size, seed=4),
                     twin):
        base = np.broadcast_to(np.asarray(baseline, np.float32), x.shape)
        want = deep_lift64(model, x, base, target)
        got = viz.deep_lift(model, x, target, baseline=baseline, multiply_by_inputs=False)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * np.abs(want).max())
        attributions = viz.deep_lift(model, x, target, baseline=baseline)
        np.testing.assert_allclose(attributions, want * (x - base), rtol=1e-3,
                                   atol=1e-5 * np.abs(want * (x - base)).max())


@pytest.mark.parametrize("net", ["small", "odd", "padded"])
def test_deep_lift_sums_to_the_logit_change(net):
    """Summation-to-delta: the attributions add up to logit(x) - logit(baseline) (up to
    float32 rounding), whatever the layers, and the delta reports what is left."""
    model = {"small": small_cnn, "odd": odd_cnn, "padded": padded_cnn}[net]()
    size = {"small": 8, "odd": 9, "padded": 8}[net]
    x = images(4, size=size)
    base = images(4, size=size, seed=7) * 0.5
    logits = forward64(model, np.concatenate([x, base]))[model.names[-1]]
    t = logits[:4].argmax(axis=1)
    change = logits[np.arange(4), t] - logits[np.arange(4) + 4, t]
    attributions, delta = viz.deep_lift(model, x, baseline=base, return_convergence_delta=True)
    total = attributions.reshape(4, -1).astype(np.float64).sum(axis=1)
    scale = np.abs(attributions).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(total, change, atol=1e-5 * scale.max())
    np.testing.assert_allclose(delta, total - change, atol=1e-5 * scale.max())
    assert delta.dtype == np.float32 and delta.shape == (4,)


def test_deep_lift_of_a_linear_model_is_weight_times_difference():
    model = linear_net()
    x = np.random.default_rng(2).standard_normal((3, 2, 4, 3)).astype(np.float32)
    got = viz.deep_lift(model, x, [0, 1, 2], baseline=0.25)
    w = model.fc.weight.data.reshape(3, 2, 4, 3)
    np.testing.assert_allclose(got, w * (x - 0.25), rtol=1e-5, atol=1e-7)


def test_deep_lift_shap_is_the_mean_over_references():
    model = small_cnn()
    x = images(3)
    refs = images(4, seed=9)
    target = np.array([0, 3, 1])
    got, delta = viz.deep_lift_shap(model, x, refs, target, batch_size=5,
                                    return_convergence_delta=True)
    want = np.mean([viz.deep_lift(model, x, target, baseline=np.broadcast_to(r, x.shape))
                    for r in refs], axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    pairs = [viz.deep_lift(model, x[i], int(target[i]), baseline=r,
                           return_convergence_delta=True)[1] for i in range(3) for r in refs]
    np.testing.assert_allclose(delta, pairs, atol=1e-6)       # image i, reference j at 4i + j
    for batch_size in (1, 64):
        np.testing.assert_allclose(viz.deep_lift_shap(model, x, refs, target,
                                                      batch_size=batch_size), got,
                                   rtol=1e-6, atol=1e-8)
    single, one_delta = viz.deep_lift_shap(model, x[1], refs, 3, return_convergence_delta=True)
    np.testing.assert_allclose(single, got[1], rtol=1e-6, atol=1e-8)
    assert one_delta.shape == (4,)
    # the default target is each image's prediction
    predicted = model(x).argmax(axis=1)
    np.testing.assert_array_equal(viz.deep_lift_shap(model, x, refs),
                                  viz.deep_lift_shap(model, x, refs, predicted))


@pytest.mark.parametrize("layer, to_input", [("relu1", False), ("pool1", True), ("fc1", False),
                                             ("conv1", True)])
def test_layer_deep_lift_shap_is_the_mean_over_references(layer, to_input):
    """The mean of layer_deep_lift against each reference (itself checked against a
    float64 reference below); the units add up to logit(x) minus the references' mean
    logit; deltas per (image, reference) at i * B + j; at the image, deep_lift_shap."""
    model = small_cnn()
    x, refs = images(3), images(4, seed=9)
    target = np.array([0, 3, 1])
    kw = dict(attribute_to_layer_input=to_input)
    got, delta = viz.layer_deep_lift_shap(model, x, layer, refs, target, batch_size=5,
                                          return_convergence_delta=True, **kw)
    runs = [viz.layer_deep_lift(model, x, layer, target, baseline=np.broadcast_to(r, x.shape),
                                return_convergence_delta=True, **kw) for r in refs]
    np.testing.assert_allclose(got, np.mean([a for a, _ in runs], axis=0), rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(delta, np.stack([d for _, d in runs], axis=1).ravel(),
                               atol=1e-6)
    logits = model(np.concatenate([x, refs])).astype(np.float64)
    change = logits[np.arange(3), target] - logits[3:][:, target].mean(axis=0)
    np.testing.assert_allclose(got.reshape(3, -1).sum(axis=1), change, rtol=1e-4, atol=1e-5)
    multipliers = viz.layer_deep_lift_shap(model, x, layer, refs, target,
                                           multiply_by_inputs=False, **kw)
    np.testing.assert_allclose(multipliers, np.mean([viz.layer_deep_lift(
        model, x, layer, target, baseline=np.broadcast_to(r, x.shape), multiply_by_inputs=False,
        **kw) for r in refs], axis=0), rtol=1e-5, atol=1e-7)
    single = viz.layer_deep_lift_shap(model, x[1], layer, refs, 3, **kw)
    np.testing.assert_allclose(single, got[1], rtol=1e-6, atol=1e-8)
    assert viz.layer_deep_lift_shap(model, x[:0], layer, refs, **kw).shape == (0,) + got.shape[1:]
    np.testing.assert_array_equal(
        viz.layer_deep_lift_shap(model, x, "conv1", refs, target, attribute_to_layer_input=True),
        viz.deep_lift_shap(model, x, refs, target))
    with pytest.raises(ValueError, match="baselines must be"):
        viz.layer_deep_lift_shap(model, x, layer, refs[0])
    with pytest.raises(TypeError, match="attribute_to_layer_input"):
        viz.layer_deep_lift_shap(model, x, layer, refs, attribute_to_layer_input=1)


def test_layer_deep_lift_matches_layer_by_layer_reference():
    """At each layer's output (and input), the multipliers carried back to it times the
    activation's change: against deep_lift64 stopped there; every layer's attributions
    add up to the logit change; the first layer's input is deep_lift itself."""
    model = small_cnn()
    x = images(3)
    base = images(3, seed=7) * 0.5
    target = np.array([2, 1, 4])
    xs, bs = forward64(model, x), forward64(model, base)
    names = model.names
    logits_change = (xs[names[-1]] - bs[names[-1]])[np.arange(3), target]
    for layer in ("conv1", "relu1", "pool1", "conv2", "pool2", "fc1", "relu3", names[-1]):
        for to_input in (False, True):
            k = names.index(layer) + (not to_input)
            mult = deep_lift64(model, x, base, target, keep=k)
            a = xs[names[k - 1]] if k else x.astype(np.float64)
            b = bs[names[k - 1]] if k else base.astype(np.float64)
            got = viz.layer_deep_lift(model, x, layer, target, baseline=base,
                                      attribute_to_layer_input=to_input,
                                      multiply_by_inputs=False)
            assert got.shape == a.shape and got.dtype == np.float32, (layer, to_input)
            np.testing.assert_allclose(got, mult, rtol=1e-3, atol=1e-5 * np.abs(mult).max(),
                                       err_msg=f"{layer} {to_input}")
            attributions, delta = viz.layer_deep_lift(model, x, model[layer], target,
                                                      baseline=base,
                                                      attribute_to_layer_input=to_input,
                                                      return_convergence_delta=True)
            want = mult * (a - b)
            np.testing.assert_allclose(attributions, want, rtol=1e-3,
                                       atol=1e-5 * np.abs(want).max())
            total = attributions.reshape(3, -1).astype(np.float64).sum(axis=1)
            scale = np.abs(attributions).reshape(3, -1).sum(axis=1).max()
            np.testing.assert_allclose(total, logits_change, atol=1e-5 * scale)
            np.testing.assert_allclose(delta, total - logits_change, atol=1e-5 * scale)
    np.testing.assert_allclose(viz.layer_deep_lift(model, x, 0, target, baseline=base,
                                                   attribute_to_layer_input=True),
                               viz.deep_lift(model, x, target, baseline=base), rtol=1e-6,
                               atol=1e-8)


def test_layer_deep_lift_of_a_nested_block_and_arguments():
    """A nested Sequential block's output; one image; bad arguments."""
    inner = small_cnn()
    children = list(inner.named_children())
    model = nn.Sequential(OrderedDict([("features", nn.Sequential(OrderedDict(children[:8])))] +
                                      children[8:]))
    x = images(2)
    got = viz.layer_deep_lift(model, x, "features", [1, 3], baseline=0.2)
    want = viz.layer_deep_lift(inner, x, children[7][0], [1, 3], baseline=0.2)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    single = viz.layer_deep_lift(model, x[1], "features", 3, baseline=0.2)
    np.testing.assert_allclose(single, got[1], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="layer_deep_lift"):
        viz.layer_deep_lift(model, x, "nope")
    with pytest.raises(TypeError, match="attribute_to_layer_input must be True or False"):
        viz.layer_deep_lift(model, x, "fc1", attribute_to_layer_input="yes")
    with pytest.raises(ValueError, match="eps must be"):
        viz.layer_deep_lift(model, x, "fc1", eps=float("nan"))
    empty = np.zeros((0, 2, 8, 8), np.float32)
    got, delta = viz.layer_deep_lift(model, empty, "fc1", return_convergence_delta=True)
    assert got.shape == (0, model.fc1.out_features) and delta.shape == (0,)


def test_deep_lift_arguments():
    model = small_cnn()
    x = images(2)
    with pytest.raises(ValueError, match="eps must be"):
        viz.deep_lift(model, x, eps=-1)
    with pytest.raises(ValueError, match="baseline must be"):
        viz.deep_lift(model, x, baseline=np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="baselines must be reference images"):
        viz.deep_lift_shap(model, x, np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="baselines must be reference images"):
        viz.deep_lift_shap(model, x, np.zeros((0, 2, 8, 8)))
    with pytest.raises(ValueError, match="target classes"):
        viz.deep_lift(model, x, 7)
    with_softmax = nn.Sequential(OrderedDict(list(model.named_children()) +
                                             [("softmax", nn.Softmax(dim=1))]))
    with pytest.raises(ValueError, match="'softmax' is a Softmax"):
        viz.deep_lift(with_softmax, x)
    empty = np.zeros((0, 2, 8, 8), np.float32)
    assert viz.deep_lift(model, empty).shape == empty.shape
    got, delta = viz.deep_lift_shap(model, empty, images(2), return_convergence_delta=True)
    assert got.shape == empty.shape and delta.shape == (0,)


# ---------------------------------------------------------------- LRP

def _rule_layer64(layer, rule):
    """A copy of ``layer`` with the weights ``rule`` splits by (written out here)."""
    layer = copy.deepcopy(layer)
    w = layer.weight.data if getattr(layer, "weight", None) is not None else None
    if isinstance(rule, viz.GammaRule):
        w[...] = w + rule.gamma * np.maximum(w, 0)
    elif isinstance(rule, viz.Alpha1Beta0Rule):
        w[...] = np.maximum(w, 0)
    if getattr(rule, "set_bias_to_zero", False) and layer.bias is not None:
        layer.bias.data[...] = 0
    return layer


def _fold64(conv, bn):
    """``conv`` then ``bn`` (eval mode) as one layer, its weights written out here."""
    conv = copy.deepcopy(conv)
    scale = bn.weight.data.astype(np.float64) / np.sqrt(bn.running_var.astype(np.float64) +
                                                        bn.eps)
    w = conv.weight.data.astype(np.float64)
    conv.weight.data[...] = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    conv.bias.data[...] = (conv.bias.data - bn.running_mean) * scale + bn.bias.data
    return conv


def _stable64(z, epsilon):
    return z + np.where(z >= 0, epsilon, -epsilon)


def lrp64(model, x, target, rules=None, fold=False, keep=0):
    """LRP in float64, layer by layer: relevance 1 at the target; every ReLU, dropout
    and flatten passes it; every other layer gives a * J^T (R / (z + eps sign z)) with
    its rule's weights (J^T by central differences, exact for these affine layers; a
    max-pool's by its first maximum); the z-box rule a J^T s - low J+^T s - high J-^T s
    with s = R / (z(a) - z+(low) - z-(high)); times the target logit at the end.
    fold: each conv and the batch norm after it split as the composed map (the
    epsilon rule) or as one conv with the merged weights (the others).
    keep: stop at the output of the first ``keep`` layers (the relevance there)."""
    rules = rules or {}
    outputs = forward64(model, x)
    names = list(outputs)
    logits = outputs[names[-1]]
    rows = np.arange(len(x))
    relevance = np.zeros_like(logits)
    relevance[rows, target] = 1.0
    for k in range(len(names) - 1, keep - 1, -1):
        layer, rule = model[names[k]], rules.get(names[k], viz.EpsilonRule())
        a = outputs[names[k - 1]] if k else np.asarray(x, np.float64)
        after = model[names[k + 1]] if k + 1 < len(names) else None
        if isinstance(layer, (nn.ReLU, nn.Dropout, nn.Flatten)) or \
                isinstance(rule, viz.IdentityRule) or \
                (fold and isinstance(layer, nn.BatchNorm2d)):
            relevance = relevance.reshape(a.shape)
            continue
        bn = after if fold and isinstance(after, nn.BatchNorm2d) else None
        if isinstance(layer, nn.MaxPool2d):
            z = _pool64(a, layer)
            relevance = a * _pool_switches64(layer, a, relevance / _stable64(z, rule.epsilon))
        elif isinstance(rule, viz.ZBoxRule):
            merged = layer if bn is None else _fold64(layer, bn)
            low, high = (np.broadcast_to(np.asarray(v, np.float64), a.shape).copy()
                         for v in (rule.low, rule.high))
            parts = []
            for keep, v in ((None, a), (np.maximum, low), (np.minimum, high)):
                part = copy.deepcopy(merged)
                if keep is not None:
                    part.weight.data[...] = keep(part.weight.data, 0)
                    part.bias.data[...] = 0
                parts.append((part, v))
            z = sum(sign * _layer64(part, v) for sign, (part, v) in zip((1, -1, -1), parts))
            s = relevance / _stable64(z, rule.epsilon)
            relevance = sum(sign * v * _vjp64(lambda u, part=part: _layer64(part, u), v, s)
                            for sign, (part, v) in zip((1, -1, -1), parts))
        else:
            if bn is not None and isinstance(rule, viz.EpsilonRule):
                def f(v, layer=layer, bn=bn):
                    return _layer64(bn, _layer64(layer, v))
            else:
                changed = _rule_layer64(layer if bn is None else _fold64(layer, bn), rule)

                def f(v, changed=changed):
                    return _layer64(changed, v)
            s = relevance / _stable64(f(a), rule.epsilon)
            relevance = a * _vjp64(f, a, s)
    return relevance * logits[rows, target].reshape((-1,) + (1,) * (relevance.ndim - 1))


@pytest.mark.parametrize("net", ["small", "odd", "padded"])
def test_lrp_matches_layer_by_layer_reference(net):
    """The default epsilon rule and a composite of every rule, on small_cnn (batch
    norm), odd_cnn (padded overlapping pool, grouped dilated conv) and padded_cnn
    (reflect / circular padding), against lrp64."""
    model = {"small": small_cnn, "odd": odd_cnn, "padded": padded_cnn}[net]()
    size = {"small": 8, "odd": 9, "padded": 8}[net]
    x = images(2, size=size)
    target = np.array([2, 1])
    names = model.names
    convs = [n for n in names if n.startswith("conv")]
    last = [n for n in names if n.startswith("fc")][-1]
    composite = {convs[0]: viz.GammaRule(0.25), convs[1]: viz.EpsilonRule(0.25),
                 last: viz.Alpha1Beta0Rule(set_bias_to_zero=True)}
    if "bn2" in names:
        composite["bn2"] = viz.IdentityRule()
    if "pool1" in names:
        composite["pool1"] = viz.EpsilonRule(0.1)
    for rules in (None, composite):
        want = lrp64(model, x, target, rules)
        got = viz.lrp(model, x, target, rules=rules)
        assert got.shape == x.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * np.abs(want).max())
    # Montavon et al.'s composite: z-box (per-channel bounds) on the input layer, gamma
    # on the next conv; with each batch norm folded into the conv before it
    box = viz.ZBoxRule(np.array([-1.5, -2.0])[:, None, None], np.array([1.0, 2.5])[:, None, None])
    composite = {convs[0]: box, convs[1]: viz.GammaRule(0.25), last: viz.EpsilonRule(0.1)}
    for rules, fold in ((composite, True), ({convs[1]: viz.EpsilonRule(0.3)}, True),
                        (composite, False)):
        want = lrp64(model, x, target, rules, fold=fold)
        got = viz.lrp(model, x, target, rules=rules, fold_batchnorm=fold)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("fold", [False, True])
def test_layer_lrp_matches_layer_by_layer_reference(fold):
    """The relevance at every layer's output (and input) against lrp64 stopped there, with
    a composite; at the input it is lrp's; inside a folded conv + batch norm, refused."""
    model = small_cnn()
    x, target = images(2), np.array([2, 1])
    rules = {"conv2": viz.GammaRule(0.25), "fc2": viz.EpsilonRule(0.1)}
    names = model.names
    for k, name in enumerate(names):
        if fold and name == "conv1" or fold and name == "conv2":
            with pytest.raises(ValueError, match="folded into one layer"):
                viz.layer_lrp(model, x, name, target, rules=rules, fold_batchnorm=True)
            continue
        want = lrp64(model, x, target, rules, fold=fold, keep=k + 1)
        got, delta = viz.layer_lrp(model, x, name, target, rules=rules, fold_batchnorm=fold,
                                   return_convergence_delta=True)
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * np.abs(want).max(),
                                   err_msg=name)
        logit = forward64(model, x)["fc2"][np.arange(2), target]
        np.testing.assert_allclose(delta, logit - want.reshape(2, -1).sum(axis=1),
                                   atol=1e-4 * np.abs(want).max())
    np.testing.assert_allclose(
        viz.layer_lrp(model, x, "conv1", target, attribute_to_layer_input=True),
        viz.lrp(model, x, target), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="no layer"):
        viz.layer_lrp(model, x, "conv9")


def test_lrp_of_a_linear_model_and_conservation():
    """Flatten + Linear: R = x * W[t], the bias absorbing its share (the delta). With
    no bias anywhere (and batch norm without a shift) relevance is conserved: the
    attributions add up to the logit."""
    model = linear_net()
    x = np.random.default_rng(2).standard_normal((3, 2, 4, 3)).astype(np.float32)
    got, delta = viz.lrp(model, x, [0, 1, 2], return_convergence_delta=True)
    w = model.fc.weight.data.reshape(3, 2, 4, 3)
    np.testing.assert_allclose(got, w * x, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(delta, model.fc.bias.data, rtol=1e-4, atol=1e-5)
    model = small_cnn()
    for layer in model.modules():
        if getattr(layer, "bias", None) is not None:
            layer.bias.data[...] = 0
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean[...] = 0
    x = images(3)
    logits = forward64(model, x)["fc2"]
    t = logits.argmax(axis=1)
    box = {"conv1": viz.ZBoxRule(-3.0, 3.0), "conv2": viz.GammaRule(0.5)}
    for rules, fold in ((None, False), (box, True)):   # folded: batch norm's shift is 0 too
        got, delta = viz.lrp(model, x, rules=rules, fold_batchnorm=fold,
                             return_convergence_delta=True)
        total = got.reshape(3, -1).astype(np.float64).sum(axis=1)
        scale = np.abs(got).reshape(3, -1).sum(axis=1)
        np.testing.assert_allclose(total, logits[np.arange(3), t], atol=1e-5 * scale.max())
        np.testing.assert_allclose(delta, logits[np.arange(3), t] - total,
                                   atol=1e-5 * scale.max())


def test_lrp_folded_batch_norm_is_gradient_x_input_under_lrp0():
    """Under LRP-0 (the default tiny epsilon) a ReLU network's relevance is gradient x
    input, folded or not; in training mode a folded batch norm splits with the batch's
    statistics held fixed: as in eval mode with those statistics as the running ones."""
    model, x, t = odd_cnn(), images(3, size=9), [2, 1, 0]
    want = viz.input_x_gradient(model, x, t)
    for fold in (False, True):
        np.testing.assert_allclose(viz.lrp(model, x, t, fold_batchnorm=fold), want,
                                   rtol=1e-4, atol=1e-5 * np.abs(want).max())
    rng = np.random.default_rng(5)   # a conv without bias, and a Linear + BatchNorm1d pair
    bare = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(2, 3, 3, padding=1, bias=False, rng=rng), bn=nn.BatchNorm2d(3),
        relu=nn.ReLU(), flatten=nn.Flatten(), fc1=nn.Linear(3 * 9 * 9, 6, rng=rng),
        bn1d=nn.BatchNorm1d(6), relu1=nn.ReLU(), fc2=nn.Linear(6, 3, rng=rng)))
    for bn in (bare.bn, bare.bn1d):
        bn.running_mean[...] = rng.normal(0, 0.3, bn.num_features)
        bn.running_var[...] = rng.uniform(0.5, 2.0, bn.num_features)
        bn.bias.data[...] = rng.normal(0, 0.3, bn.num_features)
    bare.eval()
    want = viz.input_x_gradient(bare, x, t)
    got = viz.lrp(bare, x, t, fold_batchnorm=True)   # (float32: divided by small z)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    rules = {"conv1": viz.ZBoxRule(-4.0, 4.0), "conv2": viz.GammaRule(0.3)}
    got = viz.lrp(model, x, t, rules=rules, fold_batchnorm=True, train=True)
    fixed = copy.deepcopy(model)
    before = forward64(model, x)["conv2"]
    fixed.bn2.running_mean[...] = before.mean(axis=(0, 2, 3))
    fixed.bn2.running_var[...] = before.var(axis=(0, 2, 3))
    want = viz.lrp(fixed, x, t, rules=rules, fold_batchnorm=True)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * np.abs(want).max())
    assert not np.allclose(got, viz.lrp(model, x, t, rules=rules, fold_batchnorm=True),
                           rtol=1e-2)


def test_lrp_composite():
    """z-box on the first layer (the metadata's pixel range), gamma on the other
    convs, epsilon on the hidden fc layers, the default on the last."""
    model = small_cnn()
    model.metadata = {"mean": [0.2, 0.5], "std": [0.4, 0.25]}
    rules = viz.lrp_composite(model, gamma=0.5, epsilon=0.1)
    assert set(rules) == {"conv1", "conv2", "fc1"}
    box = viz.ZBoxRule(np.array([-0.5, -2.0])[:, None, None], np.array([2.0, 2.0])[:, None, None])
    assert rules["conv1"] == box
    assert rules["conv2"] == viz.GammaRule(0.5) and rules["fc1"] == viz.EpsilonRule(0.1)
    assert viz.lrp_composite(model, -1, 1)["conv1"] == viz.ZBoxRule(-1.0, 1.0)
    model.metadata = None
    with pytest.raises(ValueError, match="no mean and std"):
        viz.lrp_composite(model)
    with pytest.raises(ValueError, match="give both low and high"):
        viz.lrp_composite(model, low=0.0)
    mlp = linear_net()
    mlp.metadata = {"mean": [0.2, 0.5], "std": [0.4, 0.25]}
    assert viz.lrp_composite(mlp) == {"fc": viz.ZBoxRule(-2.0, 2.0)}   # all channels' box
    x = images(2)
    got = viz.lrp(small_cnn(), x, rules=viz.lrp_composite(small_cnn(), -3, 3),
                  fold_batchnorm=True)
    assert got.shape == x.shape and np.isfinite(got).all()


def test_lrp_rules_by_name_index_layer_and_block():
    """A rule keyed by name, top-level index or the layer gives the same result; a
    nested block's name sets all its layers; the model's weights are put back."""
    model = small_cnn()
    x = images(2)
    by_name = viz.lrp(model, x, 1, rules={"conv1": viz.GammaRule(0.5)})
    for key in (0, model.conv1):
        np.testing.assert_array_equal(viz.lrp(model, x, 1, rules={key: viz.GammaRule(0.5)}),
                                      by_name)
    assert not np.allclose(by_name, viz.lrp(model, x, 1))
    nested = nn.Sequential(OrderedDict(
        block=nn.Sequential(OrderedDict((n, model[n]) for n in model.names[:4])),
        rest=nn.Sequential(OrderedDict((n, model[n]) for n in model.names[4:]))))
    np.testing.assert_allclose(viz.lrp(nested, x, 1), viz.lrp(model, x, 1), rtol=1e-6)
    np.testing.assert_allclose(viz.lrp(nested, x, 1, rules={"block.conv1": viz.GammaRule(0.5)}),
                               by_name, rtol=1e-6)
    alpha_beta = {n: viz.Alpha1Beta0Rule() for n in ("conv1", "bn1")}
    np.testing.assert_allclose(viz.lrp(nested, x, 1, rules={"block": viz.Alpha1Beta0Rule()}),
                               viz.lrp(model, x, 1, rules=alpha_beta), rtol=1e-6)
    weights = [p.data for p in model.parameters()]
    copies = [w.copy() for w in weights]
    viz.lrp(model, x, rules={"conv1": viz.GammaRule(), "fc2": viz.Alpha1Beta0Rule(True)})
    for p, w, c in zip(model.parameters(), weights, copies):
        assert p.data is w and np.array_equal(w, c)
    assert viz.GammaRule(0.5) == viz.GammaRule(0.5) != viz.GammaRule(0.25)
    assert repr(viz.EpsilonRule(0.1)) == "EpsilonRule(epsilon=0.1)"


def test_lrp_arguments():
    model = small_cnn()
    x = images(2)
    with pytest.raises(TypeError, match="rules must be a dict"):
        viz.lrp(model, x, rules=[viz.EpsilonRule()])
    with pytest.raises(TypeError, match=r"rules\['conv1'\] must be"):
        viz.lrp(model, x, rules={"conv1": "gamma"})
    with pytest.raises(ValueError, match="no layer 'conv9'"):
        viz.lrp(model, x, rules={"conv9": viz.EpsilonRule()})
    with pytest.raises(ValueError, match="passes relevance unchanged"):
        viz.lrp(model, x, rules={"relu1": viz.EpsilonRule()})
    with pytest.raises(ValueError, match="IdentityRule needs"):
        viz.lrp(model, x, rules={"conv1": viz.IdentityRule()})
    with pytest.raises(ValueError, match="epsilon must be"):
        viz.EpsilonRule(-1.0)
    with pytest.raises(ValueError, match="gamma must be"):
        viz.GammaRule(float("nan"))
    with pytest.raises(ValueError, match="target classes"):
        viz.lrp(model, x, 9)
    with_softmax = nn.Sequential(OrderedDict(list(model.named_children()) +
                                             [("softmax", nn.Softmax(dim=1))]))
    with pytest.raises(ValueError, match="'softmax' is a Softmax"):
        viz.lrp(with_softmax, x)
    with pytest.raises(ValueError, match="'bn1' is folded into 'conv1'"):
        viz.lrp(model, x, rules={"bn1": viz.IdentityRule()}, fold_batchnorm=True)
    with pytest.raises(TypeError, match="fold_batchnorm must be True or False"):
        viz.lrp(model, x, fold_batchnorm="yes")
    with pytest.raises(ValueError, match="ZBoxRule applies to Conv2d and Linear"):
        viz.lrp(model, x, rules={"pool1": viz.ZBoxRule(0, 1)})
    with pytest.raises(ValueError, match=r"bounds of shape \(3, 1, 1\) do not broadcast to "
                                         r"its input \(2, 2, 8, 8\)"):
        viz.lrp(model, x, rules={"conv1": viz.ZBoxRule(np.zeros((3, 1, 1)), 1.0)})
    with pytest.raises(ValueError, match="low must not exceed high"):
        viz.ZBoxRule(1.0, 0.0)
    with pytest.raises(ValueError, match="low must be finite"):
        viz.ZBoxRule(float("-inf"), 0.0)
    assert viz.ZBoxRule(np.zeros(2), 1) == viz.ZBoxRule([0.0, 0.0], 1.0) != viz.ZBoxRule(0, 1)
    assert len({viz.ZBoxRule(np.zeros(2), 1), viz.ZBoxRule([0.0, 0.0], 1.0)}) == 1
    # a block's rule skips a folded batch norm (its conv splits for both)
    block = nn.Sequential(OrderedDict(
        block=nn.Sequential(OrderedDict((n, model[n]) for n in model.names[:4])),
        rest=nn.Sequential(OrderedDict((n, model[n]) for n in model.names[4:]))))
    np.testing.assert_allclose(
        viz.lrp(block, x, rules={"block": viz.GammaRule()}, fold_batchnorm=True),
        viz.lrp(model, x, rules={"conv1": viz.GammaRule()}, fold_batchnorm=True), rtol=1e-6)
    empty = np.zeros((0, 2, 8, 8), np.float32)
    got, delta = viz.lrp(model, empty, return_convergence_delta=True)
    assert got.shape == empty.shape and delta.shape == (0,)


@pytest.mark.parametrize("method", ["input_x_gradient", "integrated", "deeplift"])
def test_smooth_grad_around_attribution_methods(method):
    """NoiseTunnel around input x gradient, integrated gradients and DeepLIFT: each draw's
    noisy copy (seeded as for the gradient methods) through the method, aggregated; with
    no noise, the method itself; the same per image alone or in a batch."""
    model = small_cnn()
    x = images(3)
    target = np.array([2, 0, 4])
    fn = {"input_x_gradient": viz.input_x_gradient, "deeplift": viz.deep_lift,
          "integrated": viz.integrated_gradients}[method]
    args = {"input_x_gradient": {}, "deeplift": {"baseline": 0.2},
            "integrated": {"n_steps": 6, "baseline": 0.2}}[method]
    got = viz.smooth_grad(model, x, target, method=method, n_samples=4, stdev=0.3, seed=2,
                          nt_type="smoothgrad_sq", method_args=args)
    noise = np.random.default_rng(2).standard_normal((4,) + x.shape[1:], dtype=np.float32)
    samples = np.stack([fn(model, x + np.float32(0.3) * noise[s_], target, **args)
                        for s_ in range(4)]).astype(np.float64)
    np.testing.assert_allclose(got, (samples ** 2).mean(axis=0), rtol=1e-4,
                               atol=1e-6 * (samples ** 2).max())
    plain = viz.smooth_grad(model, x, target, method=method, n_samples=3, stdev=0.0,
                            method_args=args)
    np.testing.assert_allclose(plain, fn(model, x, target, **args), rtol=1e-6, atol=1e-8)
    one = viz.smooth_grad(model, x[1], 0, method=method, n_samples=4, stdev=0.3, seed=2,
                          nt_type="smoothgrad_sq", method_args=args)
    np.testing.assert_allclose(one, viz.smooth_grad(
        model, x, 0, method=method, n_samples=4, stdev=0.3, seed=2, nt_type="smoothgrad_sq",
        method_args=args)[1], rtol=1e-5, atol=1e-8)


def test_smooth_grad_method_args_checks():
    model = small_cnn()
    x = images(2)
    with pytest.raises(ValueError, match="method_args is for"):
        viz.smooth_grad(model, x, method="saliency", method_args={"baseline": 0.0})
    with pytest.raises(ValueError, match="may not set"):
        viz.smooth_grad(model, x, method="integrated", method_args={"target": 1})
    with pytest.raises(ValueError, match="score must be 'logit'"):
        viz.smooth_grad(model, x, method="deeplift", score="probability")
    with pytest.raises(TypeError):
        viz.smooth_grad(model, x, method="integrated", method_args={"n_step": 3})


@pytest.mark.parametrize("layer", ["conv1", "relu1", "pool2", "fc1", "fc2"])
def test_layer_integrated_gradients(layer):
    """Against Gauss-Legendre written out with central differences of the float64 forward
    from the layer on; they add up to the score change; batch_size does not matter."""
    model = small_cnn()
    x = images(2)
    target, n_steps = np.array([1, 3]), 4
    got, delta = viz.layer_integrated_gradients(model, x, layer, target, baseline=0.2,
                                                n_steps=n_steps, batch_size=3,
                                                return_convergence_delta=True)
    acts = forward64(model, np.concatenate([x, np.full_like(x, 0.2)]))
    names = model.names
    a_x, a_b = acts[layer][:2], acts[layer][2:]
    rest = nn.Sequential(OrderedDict((k, model[k]) for k in names[names.index(layer) + 1:]))
    nodes, weights = np.polynomial.legendre.leggauss(n_steps)
    for i in range(2):
        def score(a, i=i):
            return (forward64(rest, a[None])[names[-1]][0] if len(rest) else a[None][0])[
                target[i]]
        want = sum(0.5 * w_ * numerical_input_grad(score, a_b[i] + 0.5 * (1 + a) *
                                                   (a_x[i] - a_b[i]))
                   for a, w_ in zip(nodes, weights)) * (a_x[i] - a_b[i])
        np.testing.assert_allclose(got[i], want, rtol=2e-3, atol=1e-4 * np.abs(want).max())
    change = acts["fc2"][[0, 1], target] - acts["fc2"][[2, 3], target]
    np.testing.assert_allclose(delta, got.reshape(2, -1).sum(axis=1) - change, atol=1e-4)
    assert got.shape == acts[layer][:2].shape
    np.testing.assert_allclose(viz.layer_integrated_gradients(
        model, x, layer, target, baseline=0.2, n_steps=n_steps, batch_size=100), got,
        rtol=1e-5, atol=1e-7)


def test_layer_integrated_gradients_complete_and_checked():
    model = small_cnn()
    x = images(3)
    got, delta = viz.layer_integrated_gradients(model, x, "relu2", n_steps=64,
                                                return_convergence_delta=True)
    assert np.abs(delta).max() < 2e-2 * np.abs(got).sum(axis=(1, 2, 3)).max()
    one = viz.layer_integrated_gradients(model, x[0], model["relu2"], n_steps=8)
    np.testing.assert_allclose(one, viz.layer_integrated_gradients(model, x, "relu2",
                                                                   n_steps=8)[0], rtol=1e-5,
                               atol=1e-8)
    with pytest.raises(ValueError, match="no layer"):
        viz.layer_integrated_gradients(model, x, "relu9")
    got, delta = viz.layer_integrated_gradients(model, x[:0], "relu2",
                                                return_convergence_delta=True)
    assert got.shape == (0, 4, 4, 4) and delta.shape == (0,)


def _rest_score(model, layer, target, score="logit"):
    """score(activation of ``layer``) in float64: the network from the layer on."""
    names = model.names
    rest = nn.Sequential(OrderedDict((k, model[k]) for k in names[names.index(layer) + 1:]))

    def f(a):
        z = forward64(rest, a[None])[names[-1]][0] if len(rest) else a
        return z[target] if score == "logit" else softmax64(z)[target]
    return f


@pytest.mark.parametrize("layer,score", [("conv1", "logit"), ("bn1", "probability"),
                                         ("pool2", "logit"), ("fc1", "logit"),
                                         ("fc2", "probability")])
def test_layer_gradient_x_activation(layer, score):
    """The layer's float64 activation times central differences of the score from the
    layer on; without multiply_by_inputs the gradient alone."""
    model = small_cnn()
    x = images(2)
    target = np.array([1, 3])
    got = viz.layer_gradient_x_activation(model, x, layer, target, score=score)
    grad = viz.layer_gradient_x_activation(model, x, layer, target, score=score,
                                           multiply_by_inputs=False)
    acts = forward64(model, x)[layer]
    assert got.shape == acts.shape
    for i in range(2):
        want = numerical_input_grad(_rest_score(model, layer, target[i], score), acts[i])
        np.testing.assert_allclose(grad[i], want, rtol=1e-3, atol=1e-5 * np.abs(want).max())
        np.testing.assert_allclose(got[i], want * acts[i], rtol=1e-3,
                                   atol=1e-5 * np.abs(want * acts[i]).max())


def _conductance_alphas(method, points):
    if method == "gausslegendre":
        return 0.5 * (1 + np.polynomial.legendre.leggauss(points)[0])
    return np.linspace(0.0, 1.0, points)       # riemann_trapezoid


@pytest.mark.parametrize("layer,method", [("conv1", "gausslegendre"),
                                          ("bn1", "riemann_trapezoid"),
                                          ("pool2", "gausslegendre"), ("fc1", "gausslegendre")])
def test_layer_conductance(layer, method):
    """Written out: at the n_steps + 1 points of the path in the input, the gradient at
    the layer (central differences from the layer on) times the layer's change to the
    next point, summed; the delta; batch_size does not matter."""
    model = small_cnn()
    x = images(2)
    base = images(1, seed=4)[0] * 0.3
    target, n_steps = np.array([1, 3]), 4
    got, delta = viz.layer_conductance(model, x, layer, target, baseline=base, n_steps=n_steps,
                                       method=method, batch_size=3,
                                       return_convergence_delta=True)
    alphas = _conductance_alphas(method, n_steps + 1)
    for i in range(2):
        path = np.stack([base + a * (x[i] - base) for a in alphas]).astype(np.float64)
        ys = forward64(model, path)[layer]
        f = _rest_score(model, layer, target[i])
        want = sum(numerical_input_grad(f, ys[k]) * (ys[k + 1] - ys[k]) for k in range(n_steps))
        np.testing.assert_allclose(got[i], want, rtol=2e-3, atol=1e-4 * np.abs(want).max())
    logits = forward64(model, np.concatenate([x, base[None]]))["fc2"]
    change = logits[[0, 1], target] - logits[2, target]
    np.testing.assert_allclose(delta, got.reshape(2, -1).sum(axis=1) - change, atol=1e-4)
    np.testing.assert_allclose(viz.layer_conductance(model, x, layer, target, baseline=base,
                                                     n_steps=n_steps, method=method,
                                                     batch_size=100), got, rtol=1e-5,
                               atol=1e-7)


def test_layer_conductance_completeness_and_layer_inputs():
    """From end to end (riemann_trapezoid) and with many steps the units add up to the
    score change; a layer's input is the previous layer's output (the image for the
    first), for every layer method."""
    model = small_cnn()
    x = images(3)
    got, delta = viz.layer_conductance(model, x, "relu2", n_steps=200,
                                       method="riemann_trapezoid", batch_size=256,
                                       return_convergence_delta=True)
    assert np.abs(delta).max() < 2e-2 * np.abs(got).sum(axis=(1, 2, 3)).max()
    for method, kwargs in ((viz.layer_conductance, {"n_steps": 3}),
                           (viz.layer_integrated_gradients, {"n_steps": 3}),
                           (viz.layer_gradient_x_activation, {})):
        np.testing.assert_array_equal(
            method(model, x, "pool1", 2, attribute_to_layer_input=True, **kwargs),
            method(model, x, "relu1", 2, **kwargs))
        first = method(model, x, "conv1", 2, attribute_to_layer_input=True, **kwargs)
        assert first.shape == x.shape
        with pytest.raises(TypeError, match="attribute_to_layer_input"):
            method(model, x, "conv1", attribute_to_layer_input="yes", **kwargs)
        one = method(model, x[1], "relu2", **kwargs)
        np.testing.assert_allclose(one, method(model, x, "relu2", **kwargs)[1], rtol=1e-5,
                                   atol=1e-7)
    np.testing.assert_allclose(viz.layer_gradient_x_activation(model, x, "conv1", 2,
                                                               attribute_to_layer_input=True),
                               viz.input_x_gradient(model, x, 2), rtol=1e-6)
    with pytest.raises(ValueError, match="n_steps must be >= 1"):
        viz.layer_conductance(model, x, "relu2", n_steps=0)
    with pytest.raises(ValueError, match="no layer"):
        viz.layer_conductance(model, x, "relu9")
    got, delta = viz.layer_conductance(model, x[:0], "relu2", return_convergence_delta=True)
    assert got.shape == (0, 4, 4, 4) and delta.shape == (0,)
    assert viz.layer_gradient_x_activation(model, x[:0], "fc1").shape == (0, 6)


@pytest.mark.parametrize("layer, to_input", [("relu1", False), ("pool1", True), ("fc1", False),
                                             ("conv1", True)])
@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
def test_internal_influence_is_the_layer_gradient_integrated_along_the_path(layer, to_input,
                                                                           method):
    """Against its definition: the layer gradients at the path points (from
    layer_gradient_x_activation, a separate code path), weighted by the quadrature
    built here from numpy's Gauss-Legendre nodes or the trapezoid rule, in float64."""
    model = small_cnn()
    x, base = images(3), images(1, seed=5)[0] * 0.5
    target = np.array([1, 4, 0])
    n_steps = 5
    alphas, widths = quadrature(method, n_steps)
    want = sum(w * viz.layer_gradient_x_activation(
        model, (base + a * (x - base)).astype(np.float32), layer, target,
        multiply_by_inputs=False, attribute_to_layer_input=to_input).astype(np.float64)
        for a, w in zip(alphas, widths))
    for batch_size in (1, 4, 64):
        got = viz.internal_influence(model, x, layer, target, baseline=base, n_steps=n_steps,
                                     method=method, batch_size=batch_size,
                                     attribute_to_layer_input=to_input)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_internal_influence_of_the_logits_and_arguments():
    """At the logits the gradient is the one-hot target everywhere: the quadrature's
    total weight (1 for Gauss-Legendre); one image as in a batch; arguments."""
    model = small_cnn()
    x = images(3)
    got = viz.internal_influence(model, x, "fc2", [2, 0, 4], n_steps=7)
    np.testing.assert_allclose(got, np.eye(5)[[2, 0, 4]], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(viz.internal_influence(model, x[1], "relu2", n_steps=4),
                               viz.internal_influence(model, x, "relu2", n_steps=4)[1],
                               rtol=1e-5, atol=1e-7)
    assert viz.internal_influence(model, x[:0], "relu2").shape == (0, 4, 4, 4)
    with pytest.raises(ValueError, match="n_steps must be >= 1"):
        viz.internal_influence(model, x, "relu2", n_steps=0)
    with pytest.raises(ValueError, match="method must be"):
        viz.internal_influence(model, x, "relu2", method="simpson")
    with pytest.raises(ValueError, match="baseline must be finite"):
        viz.internal_influence(model, x, "relu2", baseline=np.nan)
    with pytest.raises(ValueError, match="no layer"):
        viz.internal_influence(model, x, "relu9")


@pytest.mark.parametrize("method", ["riemann_trapezoid", "gausslegendre"])
def test_neuron_conductance_is_the_gradient_through_one_unit(method):
    """Against its definition, from two other code paths: the unit's input gradient
    (gradient with layer/channel/position) times the target score's gradient at the
    unit (layer_gradient_x_activation), weighted by the quadrature built here, times
    x - baseline; and summed over every unit of a layer all paths cross, the
    conductances are the integrated gradients."""
    model = small_cnn()
    x, base = images(3), images(1, seed=5)[0] * 0.5
    target, n_steps = np.array([1, 4, 0]), 4
    alphas, widths = quadrature(method, n_steps)
    channel, position = 2, (1, 3)
    want = 0
    for a, w in zip(alphas, widths):
        p = (base + a * (x - base)).astype(np.float32)
        through = viz.layer_gradient_x_activation(model, p, "relu2", target,
                                                  multiply_by_inputs=False)[:, channel, 1, 3]
        unit = viz.gradient(model, p, layer="relu2", channel=channel, position=position)
        want = want + w * through.astype(np.float64)[:, None, None, None] * unit
    want = want * (x - base)
    for batch_size in (1, 5, 64):
        got = viz.neuron_conductance(model, x, "relu2", channel, target, position=position,
                                     baseline=base, n_steps=n_steps, method=method,
                                     batch_size=batch_size)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    units = np.zeros(x.shape, np.float64)   # relu2 is 4 channels of 4x4: every unit
    for c in range(4):
        for y in range(4):
            for xx in range(4):
                units += viz.neuron_conductance(model, x, "relu2", c, target, position=(y, xx),
                                                baseline=base, n_steps=n_steps, method=method)
    ig = viz.integrated_gradients(model, x, target, baseline=base, n_steps=n_steps,
                                  method=method)
    np.testing.assert_allclose(units, ig, rtol=1e-4, atol=1e-5 * np.abs(ig).max())


def test_neuron_conductance_units_and_arguments():
    """A unit of a layer without spatial axes is its index; 'max' picks the strongest
    unit at x and keeps it along the path; one image as in a batch; bad units named."""
    model = small_cnn()
    x = images(3)
    got = viz.neuron_conductance(model, x, "fc1", 4, 2, n_steps=5, batch_size=4)
    want = viz.neuron_conductance(model, x, "fc1", 4, 2, n_steps=5, multiply_by_inputs=False)
    np.testing.assert_allclose(got, want * x, rtol=1e-5, atol=1e-8)
    acts = viz.feature_maps(model, x, "relu2")[:, 1].reshape(3, -1)
    strongest = acts.argmax(axis=1)
    for i in range(3):
        y, xx = divmod(int(strongest[i]), 4)
        np.testing.assert_allclose(
            viz.neuron_conductance(model, x, "relu2", 1, 3, position="max", n_steps=3)[i],
            viz.neuron_conductance(model, x[i], "relu2", 1, 3, position=(y, xx), n_steps=3),
            rtol=1e-5, atol=1e-8)
    assert viz.neuron_conductance(model, x[:0], "relu2", 0, position=(0, 0)).shape == \
        (0, 2, 8, 8)
    with pytest.raises(ValueError, match="one unit: give position"):
        viz.neuron_conductance(model, x, "relu2", 1)
    with pytest.raises(ValueError, match="no spatial axes"):
        viz.neuron_conductance(model, x, "fc1", 1, position=(0, 0))
    with pytest.raises(ValueError, match="channel must be an int in"):
        viz.neuron_conductance(model, x, "relu2", 4, position=(0, 0))
    with pytest.raises(ValueError, match="outside"):
        viz.neuron_conductance(model, x, "relu2", 0, position=(4, 0))
    with pytest.raises(ValueError, match="riemann_trapezoid needs n_steps >= 2"):
        viz.neuron_conductance(model, x, "relu2", 0, position=(0, 0), n_steps=1)


# ---------------------------------------------------------------- GradientSHAP

def test_gradient_shap_matches_its_draws():
    """Against the definition with the documented draws (noise, path positions, reference
    indices from the seed, in that order), each gradient by central differences of the
    float64 forward; the deltas are each sample's sum minus its score change."""
    model = small_cnn()
    x = images(2)
    refs = images(3, seed=4) * 0.5
    target, n_samples, stdev = np.array([1, 3]), 3, 0.2
    got, delta = viz.gradient_shap(model, x, refs, target, n_samples=n_samples, stdev=stdev,
                                   seed=5, batch_size=4, return_convergence_delta=True)
    rng = np.random.default_rng(5)
    noise = rng.standard_normal((n_samples,) + x.shape[1:], dtype=np.float32)
    alpha = rng.random(n_samples).astype(np.float32)
    which = rng.integers(0, 3, n_samples)
    logit = lambda a, i: forward64(model, a[None])["fc2"][0, target[i]]   # noqa: E731
    for i in range(2):
        want, want_delta = np.zeros(x.shape[1:]), []
        for s_ in range(n_samples):
            noisy = x[i] + np.float32(stdev) * noise[s_]
            b = refs[which[s_]]
            point = b + alpha[s_] * (noisy - b)
            term = numerical_input_grad(lambda a: logit(a, i), point) * (noisy - b)
            want += term / n_samples
            want_delta.append(term.sum() - (logit(noisy, i) - logit(b, i)))
        np.testing.assert_allclose(got[i], want, rtol=1e-3, atol=1e-5 * np.abs(want).max())
        np.testing.assert_allclose(delta[i * n_samples:(i + 1) * n_samples], want_delta,
                                   atol=2e-4 * np.abs(want).sum())


@pytest.mark.parametrize("position", [(1, 2), "max", None])
def test_gradient_shap_of_a_unit_matches_its_draws(position):
    """gradient_shap of a unit of relu2 against the definition with the documented
    draws, each gradient by central differences of the float64 forward at the unit
    (chosen at x for 'max', the channel's sum for None); deltas against its change."""
    model = small_cnn()
    x, refs = images(2), images(3, seed=4) * 0.5
    n_samples, stdev, channel = 3, 0.2, 2
    got, delta = viz.gradient_shap(model, x, refs, layer="relu2", channel=channel,
                                   position=position, n_samples=n_samples, stdev=stdev,
                                   seed=5, batch_size=4, return_convergence_delta=True)
    rng = np.random.default_rng(5)
    noise = rng.standard_normal((n_samples,) + x.shape[1:], dtype=np.float32)
    alpha = rng.random(n_samples).astype(np.float32)
    which = rng.integers(0, 3, n_samples)
    for i in range(2):
        if position == "max":
            maps = forward64(model, x[i][None])["relu2"][0, channel]
            at = np.unravel_index(np.argmax(maps), maps.shape)
        else:
            at = position

        def unit(a):
            maps = forward64(model, a[None])["relu2"][0, channel]
            return maps.sum() if at is None else maps[at]

        want, want_delta = np.zeros(x.shape[1:]), []
        for s_ in range(n_samples):
            noisy = x[i] + np.float32(stdev) * noise[s_]
            b = refs[which[s_]]
            term = numerical_input_grad(unit, b + alpha[s_] * (noisy - b)) * (noisy - b)
            want += term / n_samples
            want_delta.append(term.sum() - (unit(noisy) - unit(b)))
        np.testing.assert_allclose(got[i], want, rtol=1e-3, atol=1e-5 * np.abs(want).max())
        np.testing.assert_allclose(delta[i * n_samples:(i + 1) * n_samples], want_delta,
                                   atol=2e-4 * np.abs(want).sum())
    with pytest.raises(ValueError, match="either target"):
        viz.gradient_shap(model, x, refs, 1, layer="relu2", channel=0)
    with pytest.raises(ValueError, match="pass layer= too"):
        viz.gradient_shap(model, x, refs, channel=0)
    with pytest.raises(ValueError, match="a class score's"):   # a unit has no softmax
        viz.gradient_shap(model, x, refs, layer="relu2", channel=0, score="probability")
    with pytest.raises(TypeError, match="must be a fastcnn.nn.Sequential"):
        viz.gradient_shap(model.conv1, x, refs, layer="relu2", channel=0)


@pytest.mark.parametrize("layer, to_input", [("relu2", False), ("pool1", True), ("fc1", False)])
def test_layer_feature_ablation_against_the_float64_rest_of_the_network(layer, to_input):
    """Each group of units set to the baseline and the network after the layer run in
    float64 (forward64 of the model's tail): the drop of the target logit, given to the
    group's units; per channel, per unit (no mask), and against a baseline array."""
    model = small_cnn()
    x, target = images(3), np.array([1, 4, 0])
    k = model.names.index(layer) + (0 if to_input else 1)
    outputs = forward64(model, x)
    acts = outputs[model.names[k - 1]] if k else x.astype(np.float64)
    tail = model[k:]

    def logit(a):
        return forward64(tail, a)[tail.names[-1]][np.arange(3), target]

    c = acts.shape[1]
    channel_mask = np.arange(c).reshape((c,) + (1,) * (acts.ndim - 2)) // 2
    rng = np.random.default_rng(3)
    for mask, base in ((channel_mask, 0.0), (None, 0.25),
                       (channel_mask, rng.standard_normal(acts.shape[1:]).astype(np.float32))):
        got = viz.layer_feature_ablation(model, x, layer, target, layer_mask=mask,
                                         layer_baseline=base, attribute_to_layer_input=to_input,
                                         batch_size=5)
        full = np.broadcast_to(np.arange(acts[0].size).reshape(acts.shape[1:]) if mask is None
                               else mask, acts.shape[1:])
        want = np.zeros(acts.shape)
        for f in np.unique(full):
            ablated = np.where(full == f, np.asarray(base, np.float64), acts)
            want[:, full == f] = (logit(acts) - logit(ablated))[:, None]
        # float32 logits differ by float32 rounding (~1e-7 of logits of order 1)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="layer_mask must broadcast"):
        viz.layer_feature_ablation(model, x, layer, layer_mask=np.zeros((7,), np.int64))
    with pytest.raises(TypeError, match="integer feature ids"):
        viz.layer_feature_ablation(model, x, layer, layer_mask=np.zeros(c, np.float32))
    with pytest.raises(ValueError, match="does not broadcast"):
        viz.layer_feature_ablation(model, x, layer, layer_baseline=np.zeros(7, np.float32))
    with pytest.raises(ValueError, match="layer_baseline must be finite"):
        viz.layer_feature_ablation(model, x, layer, layer_baseline=np.nan)


def test_channel_importance_by_each_method():
    """One score per channel: the ablation drop is layer_feature_ablation's per-channel
    value; conductance, LRP and gradient x activation are their layer maps summed per
    channel (so conductance adds up to the logit change, up to the quadrature); a flat
    layer scores its units; one image as in a batch."""
    model = small_cnn()
    x, target = images(3), np.array([1, 4, 0])
    ablated = viz.layer_feature_ablation(model, x, "relu2", target,
                                         layer_mask=np.arange(4)[:, None, None])
    got = viz.channel_importance(model, x, "relu2", target)
    assert got.shape == (3, 4)
    np.testing.assert_array_equal(got, ablated[:, :, 0, 0])
    for method, maps in (
            ("conductance", viz.layer_conductance(model, x, "relu2", target, n_steps=8)),
            ("lrp", viz.layer_lrp(model, x, "relu2", target)),
            ("gradient_x_activation", viz.layer_gradient_x_activation(model, x, "relu2",
                                                                     target))):
        got = viz.channel_importance(model, x, "relu2", target, method=method, n_steps=8)
        np.testing.assert_allclose(got, maps.sum(axis=(2, 3)), rtol=1e-5, atol=1e-7)
    conductance = viz.channel_importance(model, x, "relu2", target, method="conductance",
                                         n_steps=64, baseline=0.0)
    logits = forward64(model, x)["fc2"][np.arange(3), target]
    at_zero = forward64(model, np.zeros_like(x))["fc2"][np.arange(3), target]
    np.testing.assert_allclose(conductance.sum(axis=1), logits - at_zero, rtol=0.02, atol=1e-3)
    assert viz.channel_importance(model, x, "fc1", target).shape == (3, 6)
    assert viz.channel_importance(model, x[0]).shape == (4,)   # relu2, the default layer
    np.testing.assert_allclose(viz.channel_importance(model, x[1], "relu2", 4),
                               viz.channel_importance(model, x, "relu2", target)[1],
                               rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="method must be one of"):
        viz.channel_importance(model, x, "relu2", method="shapley")
    with pytest.raises(ValueError, match="channel_importance: n_steps must be >= 1"):
        viz.channel_importance(model, x, "relu2", method="conductance", n_steps=0)
    for method in viz.CHANNEL_METHODS:   # no images: no scores, of the layer's width
        assert viz.channel_importance(model, x[:0], "relu2", method=method,
                                      n_steps=2).shape == (0, 4)


def test_deep_lift_and_feature_ablation_of_a_unit():
    """DeepLIFT of a unit shares out the unit's change (the delta is the rounding) and is,
    for the linear part before the first ReLU, the unit's gradient times x - baseline;
    feature ablation of a unit is the drop in the unit's value (float64 forward) as each
    feature is removed; both refuse a target beside a unit."""
    model = small_cnn()
    x, base = images(3), images(1, seed=6)[0] * 0.5
    for layer, position in (("relu2", (1, 2)), ("relu2", "max"), ("fc1", None),
                            ("bn1", (3, 3))):
        got, delta = viz.deep_lift(model, x, baseline=base, layer=layer, channel=1,
                                   position=position, return_convergence_delta=True)
        assert got.shape == x.shape
        np.testing.assert_allclose(delta, 0, atol=1e-5 * np.abs(got).sum(axis=(1, 2, 3)).max())
        if layer == "bn1":   # conv1 and bn1 are linear: DeepLIFT is gradient x change
            grad = viz.gradient(model, x, layer=layer, channel=1, position=position)
            np.testing.assert_allclose(got, grad * (x - base), rtol=1e-4, atol=1e-6)
    cells = (np.arange(8)[:, None] // 4) * 2 + np.arange(8)[None, :] // 4
    got = viz.feature_ablation(model, x, feature_mask=cells, baseline=0.2, layer="relu2",
                               channel=1, position=(1, 2), batch_size=3)
    unit = lambda a: forward64(model, a)["relu2"][:, 1, 1, 2]   # noqa: E731
    for f in range(4):
        removed = np.where(cells == f, np.float32(0.2), x)
        want = unit(x) - unit(removed)
        np.testing.assert_allclose(got[:, 0][:, cells == f], np.repeat(want[:, None],
                                   (cells == f).sum(), axis=1), rtol=1e-4, atol=1e-6)
    for method in (viz.deep_lift, viz.feature_ablation):
        with pytest.raises(ValueError, match="either target"):
            method(model, x, 1, layer="relu2", channel=0, position=(0, 0))
        with pytest.raises(ValueError, match="channel must be an int"):
            method(model, x, layer="relu2", channel=9, position=(0, 0))


@pytest.mark.parametrize("layer, to_input", [("relu1", False), ("pool1", True), ("fc1", False)])
def test_layer_gradient_shap_matches_its_draws(layer, to_input):
    """Against the definition with gradient_shap's draws: per sample, the layer gradient
    at the point (from layer_gradient_x_activation, a separate code path) times the
    layer's change from the reference to the noisy image (feature_maps), averaged in
    float64; the deltas are each sample's sum minus its logit change."""
    model = small_cnn()
    x, refs = images(2), images(3, seed=4) * 0.5
    target, n_samples, stdev = np.array([1, 3]), 3, 0.2
    got, delta = viz.layer_gradient_shap(model, x, layer, refs, target, n_samples=n_samples,
                                         stdev=stdev, seed=5, batch_size=4,
                                         attribute_to_layer_input=to_input,
                                         return_convergence_delta=True)
    rng = np.random.default_rng(5)
    noise = rng.standard_normal((n_samples,) + x.shape[1:], dtype=np.float32)
    alpha = rng.random(n_samples).astype(np.float32)
    which = rng.integers(0, 3, n_samples)
    where = model.names[model.names.index(layer) - 1] if to_input else layer
    for i in range(2):
        want, want_delta = 0.0, []
        for s_ in range(n_samples):
            noisy = x[i] + np.float32(stdev) * noise[s_]
            b = refs[which[s_]]
            point = (b + alpha[s_] * (noisy - b))[None]
            grad = viz.layer_gradient_x_activation(model, point, layer, int(target[i]),
                                                   multiply_by_inputs=False,
                                                   attribute_to_layer_input=to_input)[0]
            change = (viz.feature_maps(model, noisy[None], where)[0].astype(np.float64) -
                      viz.feature_maps(model, b[None], where)[0])
            term = grad.astype(np.float64) * change
            want = want + term / n_samples
            logits = model(np.stack([noisy, b])).astype(np.float64)
            want_delta.append(term.sum() - (logits[0, target[i]] - logits[1, target[i]]))
        np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
        np.testing.assert_allclose(delta[i * n_samples:(i + 1) * n_samples], want_delta,
                                   rtol=1e-4, atol=1e-5)
    # at the image (the first layer's input) it is gradient_shap, draw for draw
    np.testing.assert_array_equal(
        viz.layer_gradient_shap(model, x, "conv1", refs, target, n_samples=2, seed=1,
                                attribute_to_layer_input=True),
        viz.gradient_shap(model, x, refs, target, n_samples=2, seed=1))
    local = viz.layer_gradient_shap(model, x[1], layer, refs, 3, n_samples=2, seed=2,
                                    multiply_by_inputs=False, attribute_to_layer_input=to_input)
    np.testing.assert_allclose(local, viz.layer_gradient_shap(
        model, x, layer, refs, [0, 3], n_samples=2, seed=2, multiply_by_inputs=False,
        attribute_to_layer_input=to_input)[1], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="no layer"):
        viz.layer_gradient_shap(model, x, "relu9", refs)
    with pytest.raises(ValueError, match="baselines must be"):
        viz.layer_gradient_shap(model, x, layer, refs[:, :1])


def test_gradient_shap_of_a_linear_model():
    """A linear model's gradient is W[t] everywhere: without noise each sample gives
    W[t] * (x - b) exactly, so one reference gives exactly that, with zero deltas; the
    multipliers alone are W[t]."""
    model = linear_net()
    x = np.random.default_rng(2).standard_normal((3, 2, 4, 3)).astype(np.float32)
    b = np.random.default_rng(3).standard_normal((2, 4, 3)).astype(np.float32)
    w = model.fc.weight.data.reshape(3, 2, 4, 3)
    got, delta = viz.gradient_shap(model, x, b, [0, 1, 2], n_samples=4,
                                   return_convergence_delta=True)
    np.testing.assert_allclose(got, w * (x - b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(delta, 0, atol=1e-5)
    np.testing.assert_allclose(viz.gradient_shap(model, x, b, [0, 1, 2], multiply_by_inputs=False),
                               np.broadcast_to(w, x.shape), rtol=1e-6)


def test_gradient_shap_batch_and_arguments():
    model = small_cnn()
    x = images(3)
    refs = images(4, seed=9)
    both = viz.gradient_shap(model, x, refs, n_samples=6, stdev=0.1, batch_size=5)
    for i in range(3):
        np.testing.assert_allclose(viz.gradient_shap(model, x[i], refs, n_samples=6, stdev=0.1),
                                   both[i], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="baselines must be reference images"):
        viz.gradient_shap(model, x, np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="n_samples"):
        viz.gradient_shap(model, x, refs, n_samples=0)
    with pytest.raises(ValueError, match="stdev"):
        viz.gradient_shap(model, x, refs, stdev=float("nan"))
    empty, delta = viz.gradient_shap(model, np.zeros((0, 2, 8, 8), np.float32), refs,
                                     return_convergence_delta=True)
    assert empty.shape == (0, 2, 8, 8) and delta.shape == (0,)


# ---------------------------------------------------------------- feature ablation

def feature_ablation64(model, x, base, mask, target, score="logit"):
    """Each image, each of its features in turn replaced by the baseline, in float64."""
    def value(a, i):
        z = forward64(model, a[None])[model.names[-1]][0]
        return (z if score == "logit" else softmax64(z))[target[i]]

    mask = np.broadcast_to(mask, x.shape)
    out = np.zeros(x.shape)
    for i in range(len(x)):
        for f in np.unique(mask[i]):
            hit = mask[i] == f
            out[i][hit] = value(x[i], i) - value(np.where(hit, base[i], x[i]), i)
    return out


@pytest.mark.parametrize("score", ["logit", "probability"])
def test_feature_ablation_matches_reference(score):
    """Superpixels shared by the channels, per-image masks with ids that are not
    consecutive (and features one image lacks), channel-wise masks, baselines a value
    and one image each; the result does not depend on batch_size."""
    model = small_cnn()
    x = images(3)
    rng = np.random.default_rng(4)
    target = np.array([1, 4, 0])
    cases = [
        (np.repeat(np.repeat(np.arange(16).reshape(4, 4), 2, 0), 2, 1), 0.0),
        (rng.choice([3, 17, 40, 1000], size=(3, 1, 8, 8)), images(3, seed=6)),
        (rng.integers(0, 5, size=(2, 8, 8)), -0.5),
    ]
    for mask, baseline in cases:
        base = np.broadcast_to(np.asarray(baseline, np.float32), x.shape)
        want = feature_ablation64(model, x, base, mask.reshape((1,) * (4 - mask.ndim) +
                                                               mask.shape), target, score)
        for batch_size in (1, 7, 256):
            got = viz.feature_ablation(model, x, target, feature_mask=mask, baseline=baseline,
                                       score=score, batch_size=batch_size)
            assert got.shape == x.shape and got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_feature_ablation_of_elements_and_windows():
    """With no mask each element is a feature; a grid of 4x4 cells is occlusion with a
    4x4 window at stride 4."""
    model = small_cnn()
    x = images(1)[0]
    got = viz.feature_ablation(model, x, 2, baseline=0.3)
    want = feature_ablation64(model, x[None], np.full((1,) + x.shape, 0.3),
                              np.arange(x.size).reshape((1,) + x.shape), [2])[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    cells = np.repeat(np.repeat(np.arange(4).reshape(2, 2), 4, 0), 4, 1)
    r = viz.occlusion(model, x, 2, window=4, stride=4, fill=0.3)
    got = viz.feature_ablation(model, x, 2, feature_mask=cells, baseline=0.3)
    np.testing.assert_allclose(got[0], r.logit_heatmap, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[0], got[1])


def test_feature_ablation_arguments():
    model = small_cnn()
    x = images(2)
    with pytest.raises(TypeError, match="integer feature ids"):
        viz.feature_ablation(model, x, feature_mask=np.zeros((8, 8)))
    with pytest.raises(ValueError, match="feature_mask must be"):
        viz.feature_ablation(model, x, feature_mask=np.zeros((8, 7), int))
    with pytest.raises(ValueError, match="feature_mask must be"):
        viz.feature_ablation(model, x, feature_mask=np.zeros((3, 1, 8, 8), int))
    with pytest.raises(ValueError, match=">= 0"):
        viz.feature_ablation(model, x, feature_mask=-np.ones((8, 8), int))
    with pytest.raises(ValueError, match="score must be"):
        viz.feature_ablation(model, x, score="loss")
    assert viz.feature_ablation(model, np.zeros((0, 2, 8, 8), np.float32)).shape == (0, 2, 8, 8)


# ---------------------------------------------------------------- feature permutation

def permutation_reference(model, x, mask, target, seed, score="logit"):
    """Each feature's importance by its definition, one forward pass of the whole batch
    per feature: the batch with that feature's values taken from image perm[i] (the
    draws feature_permutation documents), float64 scores."""
    rng = np.random.default_rng(seed)
    mask = np.broadcast_to(mask, x.shape[1:])
    out = np.zeros(x.shape)
    n = len(x)
    rows = np.arange(n)

    def scores(batch):
        z = model(batch).astype(np.float64)
        return (softmax64(z) if score == "probability" else z)[rows, target]

    initial = scores(x)
    for f in np.unique(mask):
        perm = rng.permutation(n)
        while (perm == rows).all():
            perm = rng.permutation(n)
        shuffled = np.where(mask == f, x[perm], x)
        out[:, mask == f] = (initial - scores(shuffled))[:, None]
    return out


@pytest.mark.parametrize("score", ["logit", "probability"])
@pytest.mark.parametrize("mask_kind", ["cells", "channels", "elements"])
def test_feature_permutation_matches_reference(score, mask_kind):
    model = small_cnn().eval()
    x = images(3)
    cells = (np.arange(8)[:, None] // 3) * 3 + np.arange(8) // 3
    mask = {"cells": cells * 5 + 2,                        # ids not consecutive
            "channels": np.stack([cells, cells + 9]),
            "elements": np.arange(x[0].size).reshape(x.shape[1:])}[mask_kind]
    target = np.array([1, 0, 2])
    want = permutation_reference(model, x, mask, target, 4, score)
    for batch_size in (1, 7, 1000):   # copies per forward pass: the same numbers
        got = viz.feature_permutation(model, x, target, feature_mask=mask, seed=4, score=score,
                                      batch_size=batch_size)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if mask_kind == "elements":   # None: every element its own feature, the same draws
        np.testing.assert_array_equal(
            viz.feature_permutation(model, x, target, seed=4, score=score), got)


@pytest.mark.parametrize("layer, to_input", [("relu2", False), ("pool1", True), ("fc1", False)])
def test_layer_feature_permutation_is_feature_permutation_of_the_rest(layer, to_input):
    """The documented draws applied to the layer's activations, the network after the layer
    run on them (permutation_reference of the model's tail); per channel and per unit."""
    model = small_cnn()
    x, target = images(4), np.array([1, 0, 2, 4])
    k = model.names.index(layer) + (0 if to_input else 1)
    acts = model[:k](x) if k else x
    c = acts.shape[1]
    for mask in (np.arange(c).reshape((c,) + (1,) * (acts.ndim - 2)) // 2, None):
        full = np.arange(acts[0].size).reshape(acts.shape[1:]) if mask is None else mask
        want = permutation_reference(model[k:], acts, full, target, 6)
        got = viz.layer_feature_permutation(model, x, layer, target, layer_mask=mask, seed=6,
                                            attribute_to_layer_input=to_input, batch_size=5)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="same for every image"):
        viz.layer_feature_permutation(model, x, layer,
                                      layer_mask=np.zeros((4,) + acts.shape[1:], np.int64))
    with pytest.raises(ValueError, match="at least 2 images"):
        viz.layer_feature_permutation(model, x[:1], layer)


def test_feature_permutation_of_a_feature_the_batch_shares_is_zero():
    """Shuffling values every image has alike changes nothing: importance 0."""
    model = small_cnn()
    x = images(4)
    x[:, :, :3] = 0.25
    mask = np.where(np.arange(8)[:, None] < 3, 0, 1 + np.arange(8)[None, :] // 4)
    got = viz.feature_permutation(model, x, feature_mask=np.broadcast_to(mask, (8, 8)))
    assert (got[:, :, :3] == 0).all() and np.abs(got[:, :, 3:]).max() > 0


def test_feature_permutation_arguments():
    model = small_cnn()
    x = images(3)
    for bad in (x[0], x[:1]):
        with pytest.raises(ValueError, match="at least 2 images"):
            viz.feature_permutation(model, bad)
    with pytest.raises(ValueError, match="same for every image"):
        viz.feature_permutation(model, x, feature_mask=np.zeros((3, 1, 8, 8), int))
    with pytest.raises(ValueError, match="seed"):
        viz.feature_permutation(model, x, seed=-2)
    with pytest.raises(ValueError, match="score must be"):
        viz.feature_permutation(model, x, score="loss")
    with pytest.raises(ValueError, match="one class per sample"):
        viz.feature_permutation(model, x, [0, 1])


# ---------------------------------------------------------------- Shapley values

def shapley64(model, x, base, mask, target, score="logit"):
    """Each image's Shapley values by their definition: every order of its features,
    each feature's score change when it joins the ones before it, averaged over the
    orders; float64, each coalition's score computed once."""
    mask = np.broadcast_to(mask, x.shape)
    out = np.zeros(x.shape)
    for i in range(len(x)):
        ids = list(np.unique(mask[i]))
        memo = {}

        def value(coalition):
            if coalition not in memo:
                keep = np.isin(mask[i], list(coalition))
                z = forward64(model, np.where(keep, x[i], base[i])[None])[model.names[-1]][0]
                memo[coalition] = (z if score == "logit" else softmax64(z))[target[i]]
            return memo[coalition]

        phi = dict.fromkeys(ids, 0.0)
        orders = list(itertools.permutations(ids))
        for order in orders:
            for k, f in enumerate(order):
                phi[f] += (value(frozenset(order[:k + 1])) - value(frozenset(order[:k])))
        for f in ids:
            out[i][mask[i] == f] = phi[f] / len(orders)
    return out


def _score64(model, a, target, score="logit"):
    z = forward64(model, a)[model.names[-1]]
    return (z if score == "logit" else softmax64(z))[np.arange(len(a)), target]


def _per_feature(a, mask):
    """Each image's value per feature (the value its elements carry), by id order."""
    mask = np.broadcast_to(mask, a.shape)
    return [np.array([a[i][mask[i] == f][0] for f in np.unique(mask[i])]) for i in range(len(a))]


@pytest.mark.parametrize("score,group", [("logit", None), ("probability", None),
                                         ("logit", 16)])
def test_shapley_values_match_the_definition(score, group, monkeypatch):
    """Against the average over every order, for superpixels shared by the channels,
    per-image masks with ids that are not consecutive, channel-wise masks; baselines a
    value and one image each; any batch_size; images evaluated in groups or all
    together; the features add up to the score change."""
    from fastcnn.viz import ablation
    if group:
        monkeypatch.setattr(ablation, "_GROUP", group)
    model = small_cnn()
    x = images(3)
    rng = np.random.default_rng(5)
    target = np.array([1, 4, 0])
    cases = [
        (np.repeat(np.repeat(np.arange(4).reshape(2, 2), 4, 0), 4, 1), 0.0),
        (rng.choice([3, 17, 40], size=(3, 1, 8, 8)), images(3, seed=6)),
        (rng.integers(0, 5, size=(2, 8, 8)), -0.5),
    ]
    for mask, baseline in cases:
        full_mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        base = np.broadcast_to(np.asarray(baseline, np.float32), x.shape)
        want = shapley64(model, x, base, full_mask, target, score)
        change = _score64(model, x, target, score) - _score64(model, base, target, score)
        for batch_size in (1, 7, 256):
            got = viz.shapley_values(model, x, target, feature_mask=mask, baseline=baseline,
                                     score=score, batch_size=batch_size)
            assert got.shape == x.shape and got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
        sums = [v.sum() for v in _per_feature(got, full_mask)]
        np.testing.assert_allclose(sums, change, rtol=1e-4, atol=1e-5)


def test_shapley_value_sampling():
    """Efficiency holds for every sample; on a model linear in its input every order
    gives the exact values (W . (x - b) summed per feature); many orders approach the
    exact values; an image gets the same estimate alone or in a batch, at any batch_size;
    the seed picks the orders."""
    model = small_cnn()
    x = images(3)
    target = np.array([2, 0, 3])
    mask = np.random.default_rng(7).integers(0, 6, size=(8, 8))
    change = _score64(model, x, target) - _score64(model, np.full_like(x, 0.3), target)
    got = viz.shapley_value_sampling(model, x, target, feature_mask=mask, baseline=0.3,
                                     n_samples=5, batch_size=16)
    assert got.shape == x.shape and got.dtype == np.float32
    np.testing.assert_allclose([v.sum() for v in _per_feature(got, mask[None, None])], change,
                               rtol=1e-4, atol=1e-5)
    for i in range(3):
        alone = viz.shapley_value_sampling(model, x[i], int(target[i]), feature_mask=mask,
                                           baseline=0.3, n_samples=5, batch_size=3)
        np.testing.assert_allclose(alone, got[i], rtol=1e-5, atol=1e-6)
    other = viz.shapley_value_sampling(model, x, target, feature_mask=mask, baseline=0.3,
                                       n_samples=5, seed=1)
    assert not np.allclose(other, got)

    exact = viz.shapley_values(model, x, target, feature_mask=mask, baseline=0.3)
    many = viz.shapley_value_sampling(model, x, target, feature_mask=mask, baseline=0.3,
                                      n_samples=2000, batch_size=2048)
    for i in range(3):                                  # about 1 / sqrt(n_samples) off
        assert np.abs(many[i] - exact[i]).max() < 0.1 * np.abs(exact[i]).max()

    rng = np.random.default_rng(8)
    linear = nn.Sequential(OrderedDict(flatten=nn.Flatten(), fc=nn.Linear(128, 5, rng=rng)))
    w = linear.fc.weight.data.astype(np.float64)
    cells = np.repeat(np.repeat(np.arange(16).reshape(4, 4), 2, 0), 2, 1)
    base = images(1, seed=9)[0]
    want = np.zeros(x.shape)
    for i in range(3):
        contrib = (w[target[i]] * (x[i] - base).ravel().astype(np.float64)).reshape(x.shape[1:])
        for f in range(16):
            want[i][:, cells == f] = contrib[:, cells == f].sum()
    for n_samples in (1, 3):
        got = viz.shapley_value_sampling(linear, x, target, feature_mask=cells, baseline=base,
                                         n_samples=n_samples, batch_size=10)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    got = viz.shapley_values(linear, x, target, feature_mask=cells, baseline=base)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def _one_feature_gets_the_whole_change(method, model, x):
    one = method(model, x, 1, feature_mask=np.zeros((8, 8), int))
    change = _score64(model, x, [1, 1]) - _score64(model, np.zeros_like(x), [1, 1])
    np.testing.assert_allclose(one[:, 0, 0, 0], change, rtol=1e-4, atol=1e-5)
    assert (one == one[:, :1, :1, :1]).all()


def test_shapley_arguments():
    model = small_cnn()
    x = images(2)
    with pytest.raises(ValueError, match="128 features, more than the 20"):
        viz.shapley_values(model, x)                     # every element its own feature
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        viz.shapley_value_sampling(model, x, n_samples=0)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        viz.shapley_value_sampling(model, x, seed=-1)
    with pytest.raises(TypeError, match="integer feature ids"):
        viz.shapley_values(model, x, feature_mask=np.zeros((8, 8)))
    with pytest.raises(ValueError, match="feature_mask must be"):
        viz.shapley_value_sampling(model, x, feature_mask=np.zeros((3, 1, 8, 8), int))
    with pytest.raises(ValueError, match="baseline must be"):
        viz.shapley_values(model, x, feature_mask=np.zeros((8, 8), int), baseline=np.zeros(3))
    with pytest.raises(ValueError, match="score must be"):
        viz.shapley_values(model, x, feature_mask=np.zeros((8, 8), int), score="loss")
    empty = np.zeros((0, 2, 8, 8), np.float32)
    assert viz.shapley_values(model, empty).shape == (0, 2, 8, 8)
    assert viz.shapley_value_sampling(model, empty).shape == (0, 2, 8, 8)
    _one_feature_gets_the_whole_change(viz.shapley_value_sampling, model, x)


# ---------------------------------------------------------------- KernelSHAP and LIME

def _copies64(model, x, base, mask, coalitions, target, score="logit"):
    """Scores (float64) of image i's copies: feature f (by id order) the input's where
    coalitions[i][copy, f]."""
    mask = np.broadcast_to(mask, x.shape)
    out = []
    for i, z in enumerate(coalitions):
        ids = np.unique(mask[i])
        copies = np.stack([np.where(np.isin(mask[i], ids[row]), x[i], base[i]) for row in z])
        out.append(_score64(model, copies, np.full(len(z), target[i]), score))
    return out


def test_kernel_shap_coalitions_follow_the_shapley_kernel():
    """Row 0 the baseline; a drawn coalition's size s in 1 .. k-1 with probability
    proportional to 1 / (s (k - s)) and, given s, every feature in it with probability
    s / k; the seed decides the draws."""
    from fastcnn.viz.surrogate import _kernel_shap_coalitions
    k, n = 6, 30002
    z = _kernel_shap_coalitions(k, n, 3)
    assert z.shape == (n - 1, k) and z.dtype == bool and not z[0].any()
    size = z[1:].sum(axis=1)
    p = np.array([1 / (s * (k - s)) for s in range(1, k)])
    freq = np.bincount(size, minlength=k)[1:k] / len(size)
    np.testing.assert_allclose(freq, p / p.sum(), atol=0.01)
    for s in range(1, k):
        np.testing.assert_allclose(z[1:][size == s].mean(axis=0), s / k, atol=0.03)
    assert not np.array_equal(_kernel_shap_coalitions(k, 50, 4), _kernel_shap_coalitions(k, 50, 3))
    assert _kernel_shap_coalitions(1, 50, 0).shape == (1, 1)   # nothing to draw


def test_kernel_shap_fit_is_the_constrained_least_squares():
    """More draws than features: the KKT system of min |z phi - (v - v0)|^2 subject to
    sum(phi) = v1 - v0. Fewer (and independent): every equation holds and phi is the least-norm solution
    (it lies in the span of the equations' rows)."""
    from fastcnn.viz.surrogate import _kernel_shap_coalitions, _kernel_shap_fit
    rng = np.random.default_rng(11)
    v0, v1 = 0.4, -1.3
    z = _kernel_shap_coalitions(5, 40, 0)[1:].astype(np.float64)
    v = rng.standard_normal(len(z))
    kkt = np.block([[2 * z.T @ z, np.ones((5, 1))], [np.ones((1, 5)), np.zeros((1, 1))]])
    want = np.linalg.solve(kkt, np.concatenate([2 * z.T @ (v - v0), [v1 - v0]]))[:5]
    np.testing.assert_allclose(_kernel_shap_fit(z > 0, v, v0, v1), want, rtol=1e-10, atol=1e-12)

    z = (rng.random((20, 40)) < 0.5).astype(np.float64)   # rows independent with ones
    v = rng.standard_normal(len(z))
    phi = _kernel_shap_fit(z > 0, v, v0, v1)
    rows = np.vstack([z, np.ones(40)])
    np.testing.assert_allclose(rows @ phi, np.concatenate([v - v0, [v1 - v0]]), atol=1e-10)
    span = np.linalg.lstsq(rows.T, phi, rcond=None)[0]
    np.testing.assert_allclose(rows.T @ span, phi, atol=1e-10)
    np.testing.assert_allclose(_kernel_shap_fit(np.zeros((0, 3), bool), v[:0], v0, v1),
                               np.full(3, (v1 - v0) / 3))


def test_kernel_shap():
    """Against the regression on the same draws in float64 (per-image masks with ids
    that are not consecutive, a baseline image each); the features add up to the score
    change; a linear model's values exactly; many draws approach the exact Shapley
    values; an image gets the same result alone or in any batch; features equal to the
    baseline get 0, the draws being over the others."""
    from fastcnn.viz.surrogate import _kernel_shap_coalitions, _kernel_shap_fit
    model = small_cnn()
    x = images(3)
    target = np.array([2, 0, 3])
    rng = np.random.default_rng(12)
    for mask, baseline, score in [(rng.choice([2, 9, 30, 31, 50, 77], size=(3, 1, 8, 8)),
                                   images(3, seed=13), "logit"),
                                  (rng.integers(0, 7, size=(2, 8, 8)), 0.25, "probability")]:
        full_mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        base = np.broadcast_to(np.asarray(baseline, np.float32), x.shape)
        got = viz.kernel_shap(model, x, target, feature_mask=mask, baseline=baseline,
                              n_samples=60, score=score, batch_size=17)
        assert got.shape == x.shape and got.dtype == np.float32
        ks = [len(np.unique(np.broadcast_to(full_mask, x.shape)[i])) for i in range(3)]
        coalitions = [_kernel_shap_coalitions(k, 60, 0) for k in ks]
        values = _copies64(model, x, base, full_mask, coalitions, target, score)
        full = _score64(model, x, target, score)
        for i in range(3):
            want = _kernel_shap_fit(coalitions[i][1:], values[i][1:], values[i][0], full[i])
            np.testing.assert_allclose(_per_feature(got, full_mask)[i], want, rtol=1e-4,
                                       atol=1e-5 * np.abs(want).max())
            np.testing.assert_allclose(want.sum(), full[i] - values[i][0], rtol=1e-9)
            alone = viz.kernel_shap(model, x[i], int(target[i]), feature_mask=full_mask[
                i if len(full_mask) > 1 else 0], baseline=base[i], n_samples=60, score=score)
            np.testing.assert_allclose(alone, got[i], rtol=1e-5, atol=1e-6)
    mask = np.random.default_rng(7).integers(0, 6, size=(8, 8))
    exact = viz.shapley_values(model, x, target, feature_mask=mask, baseline=0.3)
    many = viz.kernel_shap(model, x, target, feature_mask=mask, baseline=0.3, n_samples=4000,
                           batch_size=4096)
    for i in range(3):                                  # about 1 / sqrt(n_samples) off
        assert np.abs(many[i] - exact[i]).max() < 0.05 * np.abs(exact[i]).max()
    # features equal to the baseline are null players: 0, the draws over the others
    cells = np.repeat(np.repeat(np.arange(16).reshape(4, 4), 2, 0), 2, 1)
    held = x.copy()
    null = np.isin(cells, [0, 5, 6, 15])
    held[:, :, null] = 0.25
    got = viz.kernel_shap(model, held, target, feature_mask=cells, baseline=0.25, n_samples=50)
    assert not got[:, :, null].any()
    live = np.setdiff1d(np.arange(16), [0, 5, 6, 15])
    drawn = _kernel_shap_coalitions(12, 50, 0)
    wide = np.zeros((len(drawn), 16), bool)
    wide[:, live] = drawn
    values = _copies64(model, held, np.full_like(held, 0.25), cells[None, None], [wide] * 3,
                       target)
    full = _score64(model, held, target)
    for i in range(3):
        want = _kernel_shap_fit(drawn[1:], values[i][1:], values[i][0], full[i])
        np.testing.assert_allclose(_per_feature(got, cells[None, None])[i][live], want,
                                   rtol=1e-4, atol=1e-5 * np.abs(want).max())
    every = viz.kernel_shap(model, x, target, n_samples=30)   # 128 features, 28 draws
    change = _score64(model, x, target) - _score64(model, np.zeros_like(x), target)
    np.testing.assert_allclose(every.reshape(3, -1).sum(axis=1), change, rtol=1e-4, atol=1e-5)


def _linear_model_values(seed=8):
    rng = np.random.default_rng(seed)
    linear = nn.Sequential(OrderedDict(flatten=nn.Flatten(), fc=nn.Linear(128, 5, rng=rng)))
    w = linear.fc.weight.data.astype(np.float64)
    cells = np.repeat(np.repeat(np.arange(16).reshape(4, 4), 2, 0), 2, 1)
    x, base, target = images(3), images(1, seed=9)[0], np.array([2, 0, 3])
    want = np.zeros(x.shape)
    for i in range(3):
        contrib = (w[target[i]] * (x[i] - base).ravel().astype(np.float64)).reshape(x.shape[1:])
        for f in range(16):
            want[i][:, cells == f] = contrib[:, cells == f].sum()
    return linear, x, base, target, cells, want


def test_kernel_shap_and_lime_on_a_linear_model():
    """Score linear in the features: any draws that determine the fit give each
    feature's W . (x - b) exactly, for KernelSHAP and for LIME without the lasso."""
    linear, x, base, target, cells, want = _linear_model_values()
    for got in (viz.kernel_shap(linear, x, target, feature_mask=cells, baseline=base,
                                n_samples=80),
                viz.lime(linear, x, target, feature_mask=cells, baseline=base, n_samples=80,
                         alpha=0.0),
                viz.lime(linear, x, target, feature_mask=cells, baseline=base, n_samples=80,
                         alpha=0.0, distance="euclidean", kernel_width=20.0)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def _lasso_by_enumeration(a, t, alpha):
    """argmin 1/2 |t - a b|^2 + alpha |b|_1 over every support and sign pattern: on each,
    the stationary point of the smooth problem, kept if its signs agree."""
    k = a.shape[1]
    best, best_b = 0.5 * t @ t, np.zeros(k)
    for signs in itertools.product((-1, 0, 1), repeat=k):
        s = np.flatnonzero(signs)
        if not len(s):
            continue
        sign = np.array(signs, np.float64)[s]
        a_s = a[:, s]
        try:
            b_s = np.linalg.solve(a_s.T @ a_s, a_s.T @ t - alpha * sign)
        except np.linalg.LinAlgError:
            continue
        if np.any(np.sign(b_s) != sign):
            continue
        b = np.zeros(k)
        b[s] = b_s
        objective = 0.5 * np.sum((t - a @ b) ** 2) + alpha * np.abs(b).sum()
        if objective < best:
            best, best_b = objective, b
    return best_b


@pytest.mark.parametrize("n,k", [(30, 5), (12, 4), (3, 5)])
def test_lasso_is_exact(n, k):
    from fastcnn.viz.surrogate import _lasso
    rng = np.random.default_rng(n * k)
    a = rng.standard_normal((n, k))
    t = a @ rng.standard_normal(k) + 0.3 * rng.standard_normal(n)
    top = np.abs(a.T @ t).max()
    for alpha in (1e-3 * top, 0.1 * top, 0.5 * top, 0.99 * top, 1.5 * top):
        np.testing.assert_allclose(_lasso(a, t, alpha), _lasso_by_enumeration(a, t, alpha),
                                   rtol=1e-8, atol=1e-10 * top)


@pytest.mark.parametrize("distance,kernel_width", [("cosine", 1.0), ("euclidean", 3.0)])
def test_lime_matches_its_definition(distance, kernel_width):
    """The copies built and scored in float64, weighed by the kernel of their distance
    to the input, the weighted lasso with an intercept solved by enumeration; the same
    alone as in a batch; the seed decides the draws."""
    from fastcnn.viz.surrogate import _lime_coalitions
    model = small_cnn()
    x = images(3)
    target = np.array([1, 4, 0])
    rng = np.random.default_rng(14)
    mask = rng.choice([3, 8, 21, 22], size=(3, 1, 8, 8))
    base = images(3, seed=15)
    n = 40
    coalitions = [_lime_coalitions(4, n, 0) for _ in range(3)]
    values = _copies64(model, x, base, mask, coalitions, target)
    nonzero = {}                                        # features kept by the lasso
    for alpha in (0.003, 0.0005, 0.0):
        got = viz.lime(model, x, target, feature_mask=mask, baseline=base, n_samples=n,
                       alpha=alpha, distance=distance, kernel_width=kernel_width, batch_size=9)
        assert got.shape == x.shape and got.dtype == np.float32
        for i in range(3):
            ids = np.unique(mask[i])
            copies = np.stack([np.where(np.isin(mask[i], ids[row]), x[i], base[i])
                               for row in coalitions[i]]).reshape(n, -1).astype(np.float64)
            orig = x[i].ravel().astype(np.float64)
            if distance == "cosine":
                d = 1 - copies @ orig / (np.linalg.norm(copies, axis=1) * np.linalg.norm(orig))
            else:
                d = np.linalg.norm(copies - orig, axis=1)
            w = np.exp(-d ** 2 / (2 * kernel_width ** 2))
            w = w / w.sum()
            z = coalitions[i].astype(np.float64)
            a = (z - w @ z) * np.sqrt(w)[:, None]
            t = (values[i] - w @ values[i]) * np.sqrt(w)
            want = (np.linalg.lstsq(a, t, rcond=None)[0] if alpha == 0
                    else _lasso_by_enumeration(a, t, alpha))
            np.testing.assert_allclose(_per_feature(got, mask)[i], want, rtol=1e-4,
                                       atol=1e-5 * max(np.abs(want).max(), 1e-3))
            alone = viz.lime(model, x[i], int(target[i]), feature_mask=mask[i],
                             baseline=base[i], n_samples=n, alpha=alpha, distance=distance,
                             kernel_width=kernel_width)
            np.testing.assert_allclose(alone, got[i], rtol=1e-5, atol=1e-7)
        nonzero[alpha] = np.count_nonzero(_per_feature(got, mask))
    assert nonzero[0.0] == 12 and 0 < nonzero[0.0005] and nonzero[0.003] <= nonzero[0.0005]
    other = viz.lime(model, x, target, feature_mask=mask, baseline=base, n_samples=n, seed=1,
                     alpha=0.0, distance=distance, kernel_width=kernel_width)
    assert not np.allclose(other, viz.lime(model, x, target, feature_mask=mask, baseline=base,
                                           n_samples=n, alpha=0.0, distance=distance,
                                           kernel_width=kernel_width))


def test_kernel_shap_and_lime_arguments():
    model = small_cnn()
    x = images(2)
    cells = np.repeat(np.repeat(np.arange(16).reshape(4, 4), 2, 0), 2, 1)
    with pytest.raises(ValueError, match="n_samples .*must be >= 2"):
        viz.kernel_shap(model, x, n_samples=1)
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        viz.lime(model, x, n_samples=0)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        viz.kernel_shap(model, x, seed=-1)
    with pytest.raises(ValueError, match="alpha must be finite and >= 0"):
        viz.lime(model, x, alpha=-0.1)
    with pytest.raises(TypeError, match="alpha must be a number"):
        viz.lime(model, x, alpha="big")
    with pytest.raises(ValueError, match="kernel_width must be > 0"):
        viz.lime(model, x, kernel_width=0)
    with pytest.raises(ValueError, match="distance must be one of"):
        viz.lime(model, x, distance="manhattan")
    with pytest.raises(ValueError, match="all their weights are 0"):
        viz.lime(model, x, feature_mask=cells, kernel_width=1e-4, distance="euclidean",
                 n_samples=5)
    with pytest.raises(TypeError, match="integer feature ids"):
        viz.kernel_shap(model, x, feature_mask=np.zeros((8, 8)))
    with pytest.raises(ValueError, match="baseline must be"):
        viz.lime(model, x, baseline=np.zeros(3))
    with pytest.raises(ValueError, match="score must be"):
        viz.kernel_shap(model, x, score="loss")
    empty = np.zeros((0, 2, 8, 8), np.float32)
    assert viz.kernel_shap(model, empty).shape == (0, 2, 8, 8)
    assert viz.lime(model, empty).shape == (0, 2, 8, 8)
    _one_feature_gets_the_whole_change(viz.kernel_shap, model, x)
    zero = np.zeros_like(x)                             # the input is the baseline
    assert not viz.lime(model, zero, feature_mask=cells, baseline=0.0).any()


# ---------------------------------------------------------------- activation maximisation

def test_maximize_activation_reaches_the_analytic_optimum():
    """A linear unit a = w . x + b with L2 decay lam: the ascent's fixed point is
    x = w / lam (no shift, blur or bounds), for each unit at once; the history rises."""
    model = linear_net()
    r = viz.maximize_activation(model, "fc", [0, 2], shape=(2, 4, 3), steps=400, lr=0.05,
                                weight_decay=0.1, jitter=0, blur_every=0, bounds=None)
    w = model.fc.weight.data.astype(np.float64)
    np.testing.assert_allclose(r.images.reshape(2, -1), w[[0, 2]] / 0.1, rtol=1e-4, atol=1e-4)
    assert r.images.shape == (2, 2, 4, 3) and r.history.shape == (401, 2)
    np.testing.assert_allclose(r.activation, [forward64(model, r.images)["fc"][i, c]
                                              for i, c in enumerate((0, 2))], rtol=1e-5)
    assert (r.history[-1] > r.history[0]).all() and r.channels == [0, 2] and r.layer == "fc"


def test_maximize_activation_on_a_cnn():
    """A conv channel's mean, a unit at a position and the class scores: each rises well
    above its start, stays in the bounds, and the same seed gives the same bits."""
    model = small_cnn()
    model.metadata = {"input_shape": [2, 8, 8], "mean": [0.5, 0.2], "std": [0.25, 0.5]}
    lo, hi = np.array([-2.0, -0.4]), np.array([2.0, 1.6])
    for kwargs in (dict(layer="bn2", channels=[0, 3]),
                   dict(layer="relu1", channels=1, position=(3, 4)),
                   dict()):
        r = viz.maximize_activation(model, steps=60, lr=0.1, **kwargs)
        again = viz.maximize_activation(model, steps=60, lr=0.1, **kwargs)
        np.testing.assert_array_equal(r.images, again.images)
        # (a unit whose ReLUs are all off gets no gradient: only decay and blur move it)
        assert (r.activation > r.history[0] - 0.01).all(), (kwargs, r.history[[0, -1]])
        assert r.activation.mean() > r.history[0].mean() + 0.1, (kwargs, r.history[[0, -1]])
        assert (r.images >= lo[:, None, None] - 1e-6).all()
        assert (r.images <= hi[:, None, None] + 1e-6).all()
        acts = forward64(model, r.images)
        name = kwargs.get("layer", "fc2")
        if "position" in kwargs:
            want = acts[name][0, 1, 3, 4]
        elif name == "fc2":
            want = acts[name][np.arange(5), np.arange(5)]
        else:
            want = acts[name][np.arange(2), [0, 3]].mean(axis=(1, 2))
        np.testing.assert_allclose(r.activation, want, rtol=1e-4, atol=1e-5)


def test_maximize_activation_arguments():
    model = small_cnn()
    model.metadata = {}
    with pytest.raises(ValueError, match="no input_shape"):
        viz.maximize_activation(model, "relu2")
    kw = dict(shape=(2, 8, 8), steps=1)
    with pytest.raises(ValueError, match=r"channels must be in \[0, 4\)"):
        viz.maximize_activation(model, "relu2", [4], **kw)
    with pytest.raises(ValueError, match="position must be None or"):
        viz.maximize_activation(model, "relu2", 0, position=(1.5, 2), **kw)
    with pytest.raises(ValueError, match="spatial output"):
        viz.maximize_activation(model, "fc1", 0, position=(0, 0), **kw)
    with pytest.raises(ValueError, match="bounds must have finite lo < hi"):
        viz.maximize_activation(model, "relu2", 0, bounds=(1.0, 0.0), **kw)
    with pytest.raises(ValueError, match="lr must be"):
        viz.maximize_activation(model, "relu2", 0, lr=-1, **kw)
    with pytest.raises(ValueError, match="start must be"):
        viz.maximize_activation(model, "relu2", [0, 1], start=np.zeros((3, 2, 8, 8)), **kw)
    r = viz.maximize_activation(model, "relu2", **kw, start=np.zeros((2, 8, 8)), jitter=0,
                                blur_every=0)
    assert r.images.shape == (4, 2, 8, 8) and r.channels == [0, 1, 2, 3]


# ---------------------------------------------------------------- Grad-CAM

def cam_net(seed=0):
    rng = np.random.default_rng(seed)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(2, 3, 3, padding=1, rng=rng), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(3, 4, 3, padding=1, rng=rng), relu2=nn.ReLU(), flatten=nn.Flatten(),
        fc=nn.Linear(4 * 4 * 4, 5, rng=rng))).eval()


def bilinear64(m, size):
    """Half-pixel-centre bilinear resize, pixel by pixel."""
    h, w = m.shape[-2:]
    out = np.zeros(m.shape[:-2] + tuple(size))
    for i in range(size[0]):
        for j in range(size[1]):
            sy = max((i + 0.5) * h / size[0] - 0.5, 0.0)
            sx = max((j + 0.5) * w / size[1] - 0.5, 0.0)
            y0, x0 = min(int(sy), h - 1), min(int(sx), w - 1)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            fy, fx = sy - y0, sx - x0
            out[..., i, j] = ((1 - fy) * ((1 - fx) * m[..., y0, x0] + fx * m[..., y0, x1])
                              + fy * ((1 - fx) * m[..., y1, x0] + fx * m[..., y1, x1]))
    return out


def test_default_cam_layer_looks_into_nested_blocks():
    rng = np.random.default_rng(0)
    model = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(2, 3, 3, padding=1, rng=rng), relu1=nn.ReLU(),
        block=nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, rng=rng), nn.ReLU()),
        relu2=nn.ReLU(), flatten=nn.Flatten(), fc=nn.Linear(4 * 8 * 8, 3, rng=rng))).eval()
    x = images(2)
    np.testing.assert_array_equal(viz.grad_cam(model, x), viz.grad_cam(model, x, layer="relu2"))


def test_grad_cam_matches_definition():
    model = cam_net()
    x = images(3)
    target = np.array([0, 2, 4])
    a = forward64(model, x)["relu2"]                         # (N, 4, 4, 4)
    # d logit_t / d relu2 = the fc row of the target, reshaped as relu2's output
    grads = model.fc.weight.data[target].reshape(a.shape).astype(np.float64)
    weights = grads.mean(axis=(2, 3))
    want = np.maximum(np.einsum("nk,nkhw->nhw", weights, a), 0.0)
    assert (want > 0).any() and (want == 0).any()
    got = viz.grad_cam(model, x, target, "relu2", upsample=False)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    up = viz.grad_cam(model, x, target, "relu2")
    assert up.shape == (3, 8, 8)
    np.testing.assert_allclose(up, bilinear64(want, (8, 8)), rtol=1e-4, atol=1e-6)
    # the default layer is the last conv block's output
    np.testing.assert_array_equal(viz.grad_cam(model, x, target), up)
    guided = viz.guided_backprop(model, x, target)
    np.testing.assert_allclose(viz.guided_grad_cam(model, x, target), guided * up[:, None],
                               rtol=1e-5, atol=1e-7)
    # relu=False: the signed map (Captum's LayerGradCam default); nearest resizing
    signed = np.einsum("nk,nkhw->nhw", weights, a)
    np.testing.assert_allclose(viz.grad_cam(model, x, target, "relu2", upsample=False,
                                            relu=False), signed, rtol=1e-4, atol=1e-6)
    near = viz.grad_cam(model, x, target, "relu2", interpolate="nearest")
    np.testing.assert_allclose(near, want.repeat(2, axis=1).repeat(2, axis=2), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(viz.guided_grad_cam(model, x, target, interpolate="nearest"),
                               guided * near[:, None], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="interpolate must be one of"):
        viz.grad_cam(model, x, interpolate="bicubic")


def test_nearest_resize_picks_floor_of_the_scaled_index():
    """interpolate='nearest' as torch's interpolate(mode='nearest'): output pixel i
    takes the map's pixel floor(i * in / out), also when shrinking."""
    from fastcnn.viz.attribution import _upsample

    m = np.arange(5 * 7, dtype=np.float32).reshape(1, 5, 7)
    for size in [(13, 9), (5, 7), (3, 4), (10, 14)]:
        rows = [min(int(np.floor(np.float32(i) * np.float32(5 / size[0]))), 4)
                for i in range(size[0])]
        cols = [min(int(np.floor(np.float32(j) * np.float32(7 / size[1]))), 6)
                for j in range(size[1])]
        np.testing.assert_array_equal(_upsample(m, size, "nearest"), m[:, rows][:, :, cols])


def test_upsample_bilinear_matches_pixel_formula():
    m = np.random.default_rng(0).random((2, 3, 5)).astype(np.float32)
    for size in [(7, 11), (3, 5), (2, 2), (12, 4)]:
        np.testing.assert_allclose(viz.upsample_bilinear(m, size), bilinear64(m, size),
                                   rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- SmoothGrad

def smooth_grad_reference(model, x, target, method, nt_type, n_samples, scale, seed):
    """Every noisy copy one at a time through viz.gradient (checked against finite
    differences above), aggregated in float64 as Captum's NoiseTunnel does."""
    noise = np.random.default_rng(seed).standard_normal((n_samples,) + x.shape[1:],
                                                        dtype=np.float32)
    out = []
    for i in range(len(x)):
        a = np.stack([viz.gradient(model, x[i] + np.float32(scale[i]) * noise[s],
                                   int(target[i]), guided=method == "guided")
                      for s in range(n_samples)]).astype(np.float64)
        if method == "saliency":
            a = np.abs(a)
        mean, sq = a.mean(axis=0), (a * a).mean(axis=0)
        agg = {"smoothgrad": mean, "smoothgrad_sq": sq, "vargrad": sq - mean * mean}[nt_type]
        out.append(agg.max(axis=0) if method == "saliency" else agg)
    return np.stack(out)


@pytest.mark.parametrize("method", ["saliency", "gradient", "guided"])
@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
@pytest.mark.parametrize("noise", ["sigma", "stdev"])
def test_smooth_grad_matches_noisy_copies(method, nt_type, noise):
    """The aggregate of the per-copy attributions (saliency: |gradient| per channel,
    aggregated, then the channel max), the noise relative to each image's range
    (sigma) or absolute (stdev), whatever the batch size."""
    model = small_cnn()
    x = images(3)
    x[1] *= 3.0  # another range: another noise scale under sigma
    target = np.array([1, 4, 0])
    kwargs = dict(sigma=0.2) if noise == "sigma" else dict(stdev=0.3)
    span = x.reshape(3, -1).max(axis=1) - x.reshape(3, -1).min(axis=1)
    scale = 0.2 * span if noise == "sigma" else np.full(3, 0.3)
    want = smooth_grad_reference(model, x, target, method, nt_type, 4, scale, seed=5)
    for batch_size in (1, 5, 64):
        got = viz.smooth_grad(model, x, target, method=method, nt_type=nt_type, n_samples=4,
                              batch_size=batch_size, seed=5, **kwargs)
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7, err_msg=str(batch_size))


def test_smooth_grad_arguments():
    model = small_cnn()
    x = images(2)
    with pytest.raises(ValueError, match="not both"):
        viz.smooth_grad(model, x, sigma=0.1, stdev=0.1)
    with pytest.raises(ValueError, match="nt_type"):
        viz.smooth_grad(model, x, nt_type="mean")
    for bad, name in [(2.5, "n_samples"), ("3", "n_samples"), (True, "n_samples"),
                      (0, "n_samples"), (1.5, "batch_size")]:
        with pytest.raises((TypeError, ValueError), match=name):
            viz.smooth_grad(model, x, **{name: bad})
    for bad, name in [("a", "sigma"), (-0.1, "sigma"), (float("nan"), "stdev")]:
        with pytest.raises((TypeError, ValueError), match=name):
            viz.smooth_grad(model, x, **{name: bad})
    # an empty batch: an empty result
    assert viz.smooth_grad(model, x[:0]).shape == (0, 8, 8)
    assert viz.smooth_grad(model, x[:0], method="gradient").shape == (0, 2, 8, 8)


# ---------------------------------------------------------------- occlusion

def occlusion_brute_force(model, image, target, window, stride, fill):
    """One occluded image per forward pass; Captum's windows: corners 0, s, 2s, ...
    while the one before has not reached the edge (the last one clipped there),
    none starting past it. A (channels, height, width) window slides along the
    channels too; a (height, width) one covers them all (maps without that axis)."""
    c, h, w = image.shape
    by_channel = len(window) == 3
    window, stride = (tuple(window), tuple(stride)) if by_channel else \
        ((c,) + tuple(window), (c,) + tuple(stride))
    base = model(image[None])[0].astype(np.float64)
    starts = [[s for s in range(0, n, st) if s == 0 or s - st + k < n]
              for n, k, st in zip(image.shape, window, stride)]
    shape = tuple(len(a) for a in starts)
    logit, prob = np.zeros(shape), np.zeros(shape)
    pred = np.zeros(shape, np.int64)
    heat_sum, heat_count = np.zeros(image.shape), np.zeros(image.shape)
    p0 = softmax64(base)[target]
    for index in itertools.product(*(range(k) for k in shape)):
        box = tuple(slice(a[i], a[i] + k) for a, i, k in zip(starts, index, window))
        occluded = image.copy()
        occluded[box] = fill[box]
        z = model(occluded[None])[0].astype(np.float64)
        logit[index], prob[index], pred[index] = z[target], softmax64(z)[target], z.argmax()
        heat_sum[box] += p0 - prob[index]
        heat_count[box] += 1
    heat = np.where(heat_count > 0, heat_sum / np.maximum(heat_count, 1), 0.0)
    if not by_channel:
        logit, prob, pred, heat = logit[0], prob[0], pred[0], heat[0]
    return logit, prob, pred, heat, p0


@pytest.mark.parametrize("incremental", [True, False])
@pytest.mark.parametrize("build, size, window, stride, fill", [
    (small_cnn, 8, (3, 3), (2, 2), 0.0),
    (small_cnn, 8, (2, 3), (1, 2), "image"),
    (odd_cnn, 11, (3, 2), (1, 1), -1.0),
    (odd_cnn, 11, (4, 4), (3, 2), "image"),
    (odd_cnn, 11, (3, 3), (3, 3), 0.5),     # 11 - 3 = 8 rows: a clipped window at 9
    (small_cnn, 8, (3, 2), (2, 4), "image"),   # a stride above the window: gaps
    (padded_cnn, 8, (3, 3), (1, 1), "image"),
    (lambda: padded_cnn(1, "reflect", "replicate"), 8, (2, 2), (2, 1), 0.0),
    (small_cnn, 8, (1, 3, 3), (1, 2, 2), "image"),     # one channel at a time
    (odd_cnn, 11, (1, 4, 3), (1, 3, 2), -1.0),
    (odd_cnn, 11, (1, 3, 3), (2, 3, 3), "image"),      # a channel stride leaving gaps
])
def test_occlusion_matches_brute_force(build, size, window, stride, fill, incremental):
    model = build()
    x = images(2, size=size)
    fills = (np.full(x.shape[1:], fill, np.float32) if fill != "image"
             else images(1, size=size, seed=7)[0])
    got = viz.occlusion(model, x, window=window, stride=stride, batch_size=5,
                        fill=fill if fill != "image" else fills, incremental=incremental)
    for i in range(2):
        target = int(model(x[i:i + 1]).argmax())
        logit, prob, pred, heat, p0 = occlusion_brute_force(model.eval(), x[i], target, window,
                                                            stride, fills)
        assert got.target[i] == target
        np.testing.assert_allclose(got.logit[i], logit, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.probability[i], prob, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.drop[i], p0 - prob, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(got.predicted[i], pred)
        np.testing.assert_allclose(got.heatmap[i], heat, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got.base_probability[i], p0, rtol=1e-5)


def test_occlusion_incremental_equals_full_on_real_sized_model():
    model = models.mnist_cnn_bn(seed=3, channels=(8, 16), hidden=32).eval()
    x = images(1, c=1, size=28)[0]
    inc = viz.occlusion(model, x, window=4, stride=3, batch_size=30)
    full = viz.occlusion(model, x, window=4, stride=3, batch_size=81, incremental=False)
    assert inc.logit.shape == (9, 9) and inc.heatmap.shape == (28, 28)
    np.testing.assert_allclose(inc.logit, full.logit, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(inc.predicted, full.predicted)


def test_occlusion_heatmap_uncovered_pixels_are_zero():
    model = small_cnn()
    r = viz.occlusion(model, images(1)[0], window=2, stride=3)    # rows/cols 2, 5 uncovered
    assert r.probability.shape == (3, 3)
    assert (r.heatmap[2] == 0).all() and (r.heatmap[:, 5] == 0).all()
    np.testing.assert_array_equal(r.positions[0], [0, 3, 6])


# ---------------------------------------------------------------- batch == one by one

def _all_methods(model, x, target):
    r = viz.occlusion(model, x, target, window=3, stride=2, batch_size=7)
    return {
        "gradient": viz.gradient(model, x, target, score="probability"),
        "saliency": viz.saliency(model, x, target),
        "guided": viz.guided_backprop(model, x, target),
        "guided_unit": viz.guided_backprop(model, x, layer="relu2", channel=1, position="max"),
        "gradcam": viz.grad_cam(model, x, target),
        "guided_gradcam": viz.guided_grad_cam(model, x, target, layer="relu1"),
        "smoothgrad": viz.smooth_grad(model, x, target, n_samples=5, batch_size=4),
        "smooth_guided": viz.smooth_grad(model, x, target, method="guided", n_samples=3),
        "deconvolution": viz.deconvolution(model, x, target),
        "input_x_gradient": viz.input_x_gradient(model, x, target),
        "integrated": viz.integrated_gradients(model, x, target, n_steps=6, batch_size=5,
                                               baseline=0.1),
        "integrated_delta": viz.integrated_gradients(model, x, target, n_steps=4,
                                                     return_convergence_delta=True)[1],
        "deep_lift": viz.deep_lift(model, x, target, baseline=0.2),
        "gradient_shap": viz.gradient_shap(model, x, images(3, seed=8), target, n_samples=4,
                                           stdev=0.1, batch_size=3),
        "ablation": viz.feature_ablation(model, x, target, batch_size=50,
                                         feature_mask=np.arange(64).reshape(8, 8) // 5),
        "shapley": viz.shapley_values(model, x, target, batch_size=20,
                                      feature_mask=np.arange(64).reshape(8, 8) // 11),
        "shapley_sampling": viz.shapley_value_sampling(
            model, x, target, n_samples=3, batch_size=9,
            feature_mask=np.arange(64).reshape(8, 8) // 5),
        "kernel_shap": viz.kernel_shap(model, x, target, n_samples=20, batch_size=9,
                                       feature_mask=np.arange(64).reshape(8, 8) // 5),
        "lime": viz.lime(model, x, target, n_samples=20, batch_size=9, alpha=0.0005,
                         feature_mask=np.arange(64).reshape(8, 8) // 5),
        "deep_lift_delta": viz.deep_lift(model, x, target, return_convergence_delta=True)[1],
        "lrp": viz.lrp(model, x, target, rules={"conv1": viz.GammaRule()}),
        "conductance": viz.layer_conductance(model, x, "relu1", target, n_steps=3,
                                             batch_size=5),
        "layer_gxa": viz.layer_gradient_x_activation(model, x, "pool2", target),
        "lrp_delta": viz.lrp(model, x, target, return_convergence_delta=True)[1],
        "deep_lift_shap": viz.deep_lift_shap(model, x, target=target,
                                             baselines=images(2, seed=8), batch_size=3),
        "occlusion": r.heatmap, "occlusion_logit": r.logit, "occlusion_pred": r.predicted,
        "features": viz.feature_maps(model, x, "relu2"),
    }


def test_batch_equals_one_by_one():
    model = small_cnn()
    x = images(3)
    target = np.array([4, 0, 2])
    batch = _all_methods(model, x, target)
    for i in range(3):
        single = _all_methods(model, x[i], int(target[i]))
        for name, value in single.items():
            assert value.shape == batch[name].shape[1:], name
            np.testing.assert_allclose(value, batch[name][i], rtol=1e-5, atol=1e-6,
                                       err_msg=name)


def test_default_target_is_the_prediction():
    model = small_cnn()
    x = images(4)
    predicted = model(x).argmax(axis=1)
    np.testing.assert_array_equal(viz.saliency(model, x), viz.saliency(model, x, predicted))
    np.testing.assert_array_equal(viz.occlusion(model, x, window=4, stride=4).target, predicted)


# ---------------------------------------------------------------- model state

def _snapshot(model):
    return {
        "modes": [m.training for m in model.modules()],
        "guided": [m.guided for m in model.modules() if isinstance(m, nn.ReLU)],
        "grads": [None if p.grad is None else p.grad.copy() for p in model.parameters()],
        "grad_ids": [id(p.grad) for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "params": [p.data.copy() for p in model.parameters()],
        "buffers": [np.array(b, copy=True) for b in model.buffers()],
        "activations": id(model.activations),
        "input": id(model.input),
    }


@pytest.mark.parametrize("train", [False, True])
def test_model_state_unchanged(train):
    model = small_cnn()
    model.train()
    model.dropout.eval()                       # a mixed state must come back as it was
    model.relu1.guided = True
    x = images(3)
    model.forward(x)                           # recorded activations, cached inputs
    for p in list(model.parameters())[:3]:
        p.grad = np.ones_like(p.data)
    model.fc2.weight.requires_grad = False
    before = _snapshot(model)
    runs = [
        lambda: viz.gradient(model, x, train=train),
        lambda: viz.saliency(model, x, score="probability", train=train),
        lambda: viz.guided_backprop(model, x, layer="relu1", channel=0, train=train),
        lambda: viz.grad_cam(model, x, train=train),
        lambda: viz.guided_grad_cam(model, x, train=train),
        lambda: viz.smooth_grad(model, x, n_samples=2, train=train),
        lambda: viz.deconvolution(model, x, train=train),
        lambda: viz.input_x_gradient(model, x, train=train),
        lambda: viz.integrated_gradients(model, x, n_steps=3, train=train),
        lambda: viz.deep_lift(model, x, train=train),
        lambda: viz.layer_deep_lift(model, x, "pool1", train=train),
        lambda: viz.layer_integrated_gradients(model, x, "relu1", n_steps=3, train=train),
        lambda: viz.gradient_shap(model, x, images(2, seed=8), n_samples=2, train=train,
                                  return_convergence_delta=True),
        lambda: viz.feature_ablation(model, x, feature_mask=np.eye(8, dtype=int), train=train),
        lambda: viz.feature_permutation(model, x, feature_mask=np.eye(8, dtype=int),
                                        train=train),
        lambda: viz.shapley_values(model, x, feature_mask=np.eye(8, dtype=int), train=train),
        lambda: viz.shapley_value_sampling(model, x, feature_mask=np.eye(8, dtype=int),
                                           n_samples=2, train=train),
        lambda: viz.kernel_shap(model, x, feature_mask=np.eye(8, dtype=int), train=train),
        lambda: viz.lime(model, x, feature_mask=np.eye(8, dtype=int), train=train),
        lambda: viz.deep_lift_shap(model, x, images(2, seed=8), train=train),
        lambda: viz.lrp(model, x, rules={"conv2": viz.GammaRule()}, train=train),
        lambda: viz.layer_conductance(model, x, "relu1", n_steps=2, train=train),
        lambda: viz.layer_gradient_x_activation(model, x, "fc1", train=train),
        lambda: viz.internal_influence(model, x, "relu1", n_steps=2, train=train),
        lambda: viz.layer_deep_lift_shap(model, x, "relu1", images(2, seed=8), train=train),
        lambda: viz.layer_gradient_shap(model, x, "relu1", images(2, seed=8), n_samples=2,
                                        train=train, return_convergence_delta=True),
        lambda: viz.maximize_activation(model, "relu2", [1], shape=(2, 8, 8), steps=3,
                                        train=train),
        lambda: viz.occlusion(model, x, window=4, stride=4, train=train),
        lambda: viz.feature_maps(model, x, train=train),
        lambda: viz.filters(model),
    ]
    for run in runs:
        run()
        after = _snapshot(model)
        for key, value in before.items():
            if key in ("grads", "params", "buffers"):
                for a, b in zip(value, after[key]):
                    assert (a is None and b is None) or np.array_equal(a, b), key
            else:
                assert value == after[key], key
    # the cached forward is intact: backward still works on the earlier batch
    model.backward(np.ones((3, 5), np.float32))


def test_eval_mode_by_default():
    model = small_cnn()
    x = images(2)
    model.train()
    in_eval = viz.saliency(model, x, 1)
    model.eval()
    np.testing.assert_array_equal(viz.saliency(model, x, 1), in_eval)
    assert not model.training


# ---------------------------------------------------------------- features

def test_feature_maps_and_filters():
    model = small_cnn()
    x = images(2)
    maps = viz.feature_maps(model, x)
    assert list(maps) == model.names
    want = forward64(model, x)
    for name in ("conv1", "relu1", "pool2", "fc1"):
        np.testing.assert_allclose(maps[name], want[name], rtol=1e-4, atol=1e-5)
    one = viz.feature_maps(model, x[0], ["relu1", "pool1"])
    assert one["relu1"].shape == (3, 8, 8) and one["pool1"].shape == (3, 4, 4)
    assert viz.conv_layers(model) == ["conv1", "conv2"]
    w = viz.filters(model)
    np.testing.assert_array_equal(w, model.conv1.weight.data)
    w[...] = 0
    assert model.conv1.weight.data.any()       # a copy
    assert viz.filters(model, "conv2").shape == (4, 3, 3, 3)
    images01 = viz.filter_images(model.conv2.weight.data)
    assert images01.shape == (4, 3, 3, 3) and images01.min() >= 0 and images01.max() <= 1
    colour = viz.filter_images(np.random.default_rng(0).standard_normal((5, 3, 3, 3)))
    assert colour.shape == (5, 3, 3, 3)
    np.testing.assert_allclose(np.abs(colour - 0.5).reshape(5, -1).max(axis=1), 0.5)


# ---------------------------------------------------------------- errors

def test_errors_name_the_problem():
    model = small_cnn()
    x = images(2)
    with pytest.raises(ValueError, match="target classes must be in"):
        viz.saliency(model, x, 7)
    with pytest.raises(ValueError, match="one class per sample"):
        viz.saliency(model, x, [1, 2, 3])
    with pytest.raises(TypeError, match="target"):
        viz.saliency(model, x, 1.5)
    with pytest.raises(ValueError, match="no layer 'conv9'"):
        viz.grad_cam(model, x, layer="conv9")
    with pytest.raises(ValueError, match="spatial output"):
        viz.grad_cam(model, x, layer="fc1")
    with pytest.raises(ValueError, match="channel must be"):
        viz.guided_backprop(model, x, layer="relu1", channel=3)
    with pytest.raises(ValueError, match="not both"):
        viz.gradient(model, x, 1, layer="relu1", channel=0)
    with pytest.raises(ValueError, match="outside"):
        viz.gradient(model, x, layer="relu1", channel=0, position=(8, 0))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        viz.saliency(model, x[0, 0])
    with pytest.raises(TypeError, match="Sequential"):
        viz.saliency(model.conv1, x)
    with pytest.raises(ValueError, match="larger than"):
        viz.occlusion(model, x, window=9)
    with pytest.raises(ValueError, match="more channels"):
        viz.occlusion(model, x, window=(3, 2, 2))
    with pytest.raises(ValueError, match=r"stride must be .*\(channels, height, width\)"):
        viz.occlusion(model, x, window=(1, 2, 2), stride=(1, 1))
    with pytest.raises(ValueError, match="window must be"):
        viz.occlusion(model, x, window=(1, 1, 2, 2))
    with pytest.raises(ValueError, match="fill"):
        viz.occlusion(model, x, fill=np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="score"):
        viz.saliency(model, x, score="loss")
    with pytest.raises(ValueError, match="method"):
        viz.smooth_grad(model, x, method="occlusion")
    with pytest.raises(ValueError, match="not a Conv2d"):
        viz.filters(model, "bn1")
    with pytest.raises(ValueError, match="position must be"):
        viz.gradient(model, x, layer="relu1", channel=0, position=(1.7, 2.2))
    for fill in ("zero", None):
        with pytest.raises(TypeError, match="fill"):
            viz.occlusion(model, x, fill=fill)
    with pytest.raises(TypeError, match="batch_size"):
        viz.occlusion(model, x, batch_size=2.5)
    with pytest.raises(ValueError, match="empty list"):
        viz.feature_maps(model, x, [])
    with pytest.raises(ValueError, match="not one of this Sequential"):
        viz.grad_cam(model, x, layer=nn.ReLU())


def test_seeds_and_non_finite_baselines_are_checked():
    """A bad seed names the method; a NaN or infinite baseline / fill (every
    attribution would be NaN) is a ValueError naming it."""
    model = small_cnn()
    x = images(2)
    ref = np.zeros((1,) + x.shape[1:], np.float32)
    seeded = [
        lambda seed: viz.gradient_shap(model, x, ref, n_samples=2, seed=seed),
        lambda seed: viz.smooth_grad(model, x, n_samples=2, seed=seed),
        lambda seed: viz.shapley_value_sampling(model, x, n_samples=1, seed=seed),
        lambda seed: viz.kernel_shap(model, x, n_samples=4, seed=seed),
        lambda seed: viz.lime(model, x, n_samples=4, seed=seed),
        lambda seed: viz.maximize_activation(model, "conv1", 0, steps=1, seed=seed),
    ]
    for run in seeded:
        with pytest.raises(ValueError, match="seed must be a non-negative int"):
            run(-1)
        with pytest.raises(TypeError, match="seed"):
            run(1.5)
    np.testing.assert_array_equal(seeded[0](np.random.default_rng(3)), seeded[0](3))
    for bad in (np.nan, np.inf):
        nan_image = np.zeros(x.shape[1:], np.float32)
        nan_image[0, 1, 2] = bad
        for run in (lambda b: viz.integrated_gradients(model, x, baseline=b, n_steps=2),
                    lambda b: viz.deep_lift(model, x, baseline=b),
                    lambda b: viz.feature_ablation(model, x, baseline=b),
                    lambda b: viz.layer_conductance(model, x, "relu1", baseline=b, n_steps=2)):
            for b in (bad, nan_image):
                with pytest.raises(ValueError, match="baseline must be finite"):
                    run(b)
        with pytest.raises(ValueError, match="fill must be finite"):
            viz.occlusion(model, x, fill=bad)
        with pytest.raises(ValueError, match="baselines must be finite"):
            viz.gradient_shap(model, x, nan_image)
        with pytest.raises(ValueError, match="baselines must be finite"):
            viz.deep_lift_shap(model, x, nan_image[None])


def test_layers_given_as_modules_and_empty_batches():
    """layer= takes the layer itself (Captum's way) as well as a name or index; an
    empty batch gives empty results."""
    model = small_cnn()
    x = images(2)
    np.testing.assert_array_equal(viz.grad_cam(model, x, layer=model["relu1"]),
                                  viz.grad_cam(model, x, layer="relu1"))
    np.testing.assert_array_equal(viz.feature_maps(model, x, model["conv2"]),
                                  viz.feature_maps(model, x, "conv2"))
    np.testing.assert_array_equal(
        viz.guided_backprop(model, x, layer=model["relu2"], channel=1, position="max"),
        viz.guided_backprop(model, x, layer="relu2", channel=1, position="max"))
    empty = x[:0]
    assert viz.saliency(model, empty).shape == (0, 8, 8)
    attributions, delta = viz.integrated_gradients(model, empty, return_convergence_delta=True)
    assert attributions.shape == (0, 2, 8, 8) and delta.shape == (0,)
    attributions, delta = viz.integrated_gradients(model, empty, layer="relu2", channel=0,
                                                   position="max",
                                                   return_convergence_delta=True)
    assert attributions.shape == (0, 2, 8, 8) and delta.shape == (0,)
    assert viz.gradient(model, empty, layer="relu2", channel=1, position="max").shape == \
        (0, 2, 8, 8)
    assert viz.deconvolution(model, empty).shape == (0, 2, 8, 8)
    r = viz.occlusion(model, empty, window=3, stride=2)
    assert r.heatmap.shape == (0, 8, 8) and r.logit.shape == (0, 4, 4)
    assert r.target.shape == (0,) and r.predicted.shape == (0, 4, 4)


# ---------------------------------------------------------------- infidelity / sensitivity

def draw_key(seed):
    """The 63-bit key fastcnn.viz.metrics derives its draws from (seed -> key)."""
    return int(np.random.default_rng(seed).integers(0, 2 ** 63))


def noise_draw(seed, j, shape, stdev):
    """Draw j of the metrics' Gaussian noise: its own generator of (key, j)."""
    return np.random.default_rng([draw_key(seed), j]).standard_normal(
        shape, dtype=np.float32) * np.float32(stdev)


def uniform_draw(seed, j, shape, radius):
    """Draw j of sensitivity_max's uniform perturbations."""
    return np.random.default_rng([draw_key(seed), j]).uniform(-radius, radius, shape).astype(
        np.float32)


def coin64(seed, j, feature):
    """The subset perturbation's coin for (draw j, feature id): splitmix64's finalizer
    of key + j * golden + id * mix, in Python integers, its top bit."""
    mask = (1 << 64) - 1
    z = (draw_key(seed) + j * 0x9E3779B97F4A7C15 + feature * 0xD1B54A32D192ED03) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return bool((z ^ (z >> 31)) >> 63)


def test_the_subset_coins_are_fair_and_independent():
    coins = np.array([[coin64(11, j, f) for f in range(400)] for j in range(50)])
    assert abs(coins.mean() - 0.5) < 0.02
    assert abs(np.corrcoef(coins[:-1].ravel(), coins[1:].ravel())[0, 1]) < 0.05
    assert abs(np.corrcoef(coins[:, :-1].ravel(), coins[:, 1:].ravel())[0, 1]) < 0.05


def infidelity64(model, x, a, target, changes, normalize=False, score="logit", perturbed=None):
    """The definition, one image and one perturbation at a time in float64:
    changes[i][j] is perturbation j of image i; x - I is the perturbed input unless
    ``perturbed[i][j]`` gives it."""
    out = []
    for i in range(len(x)):
        base = _score64(model, x[i:i + 1], [target[i]], score)[0]
        dots, diffs = [], []
        for j, change in enumerate(changes[i]):
            dots.append(float((np.asarray(change, np.float64) * a[i]).sum()))
            near = x[i].astype(np.float64) - change if perturbed is None else perturbed[i][j]
            diffs.append(base - _score64(model, near[None], [target[i]], score)[0])
        dots, diffs = np.array(dots), np.array(diffs)
        beta = (dots * diffs).sum() / (dots * dots).sum() if normalize else 1.0
        out.append(np.mean((beta * dots - diffs) ** 2))
    return np.array(out)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("score", ["logit", "probability"])
def test_infidelity_with_noise_matches_the_definition(normalize, score):
    model, x = small_cnn(), images(3)
    target = np.array([1, 4, 0])
    a = viz.gradient(model, x, target, score=score)
    got = viz.infidelity(model, x, a, target, n_samples=7, stdev=0.3, seed=5,
                         normalize=normalize, score=score, batch_size=4)
    noise = [noise_draw(5, j, x.shape[1:], 0.3) for j in range(7)]
    want = infidelity64(model, x, a, target, [noise] * 3, normalize, score)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-9)
    assert got.dtype == np.float64 and got.shape == (3,)
    # one image: the same value, alone, unbatched, in any batch size
    one = viz.infidelity(model, x[1], a[1], 4, n_samples=7, stdev=0.3, seed=5,
                         normalize=normalize, score=score)
    assert np.ndim(one) == 0 and float(one) == pytest.approx(float(got[1]), rel=1e-12)


def test_infidelity_with_subsets_matches_the_definition():
    """perturb='subset': every feature of the mask either at the baseline or not, by
    coins drawn per feature id (the same for every image), I its 0/1 mask."""
    model, x = small_cnn(1), images(2, seed=4)
    cells = np.repeat(np.repeat(np.arange(16).reshape(4, 4), 2, 0), 2, 1)
    base = images(1, seed=9)[0] * 0.5
    a = viz.integrated_gradients(model, x, 2, baseline=base, n_steps=20)
    got = viz.infidelity(model, x, a, 2, perturb="subset", feature_mask=cells, baseline=base,
                         n_samples=9, seed=3)
    coins = np.array([[coin64(3, j, f) for f in range(16)] for j in range(9)])
    masks = [np.broadcast_to(coins[j][cells], x.shape[1:]).astype(np.float64)
             for j in range(9)]
    perturbed = [[np.where(m > 0, base, x[i]) for m in masks] for i in range(2)]
    np.testing.assert_allclose(got, infidelity64(model, x, a, [2, 2], [masks] * 2,
                                                 perturbed=perturbed), rtol=1e-4)


def test_infidelity_of_a_linear_model_and_its_gradient_is_zero():
    """f linear: f(x) - f(x - I) = I . grad exactly, for any I (a global attribution
    under subsets too: (x - 0) * grad is the ablation's change)."""
    model = linear_net()
    x = np.random.default_rng(0).standard_normal((3, 2, 4, 3)).astype(np.float32)
    g = viz.gradient(model, x, 1)
    for perturb in ("noise", "subset"):
        a = g if perturb == "noise" else x * g
        got = viz.infidelity(model, x, a, 1, perturb=perturb, n_samples=20)
        assert np.all(got < 1e-9), (perturb, got)
    # scaled attributions: normalize undoes the scale, the plain error grows
    assert np.all(viz.infidelity(model, x, 3 * g, 1, normalize=True) < 1e-9)
    assert np.all(viz.infidelity(model, x, 3 * g, 1, stdev=0.1) > 1e-3)
    # subsets against a baseline: (x - baseline) * gradient is exact, x * gradient not
    base = np.float32(0.5)
    exact = viz.infidelity(model, x, (x - base) * g, 1, perturb="subset", baseline=0.5)
    assert np.all(exact < 1e-9)
    assert np.all(viz.infidelity(model, x, x * g, 1, perturb="subset", baseline=0.5) > 1e-3)


def test_infidelity_takes_maps_without_channels_and_a_perturb_function():
    model, x = small_cnn(), images(2)
    sal = viz.saliency(model, x, 3)                       # (N, H, W)
    full = np.broadcast_to(sal[:, None], x.shape)
    calls = []

    def perturb(inputs):
        calls.append(inputs.shape[0])
        change = np.full(inputs.shape, 0.05, np.float32)
        return change, inputs - change

    got = viz.infidelity(model, x, sal, 3, perturb=perturb, n_samples=5, batch_size=4)
    assert calls == [10]            # once, as Captum: 2 images x 5 copies (forward: 4 a pass)
    want = infidelity64(model, x, full, [3, 3], [[np.full(x.shape[1:], 0.05)] * 5] * 2)
    np.testing.assert_allclose(got, want, rtol=1e-3)
    np.testing.assert_allclose(viz.infidelity(model, x, sal[:, None], 3, perturb=perturb,
                                              n_samples=5), got, rtol=1e-12)


def test_infidelity_arguments():
    model, x = small_cnn(), images(2)
    a = viz.gradient(model, x)
    with pytest.raises(ValueError, match=r"attributions must be shaped like x \(2, 2, 8, 8\)"):
        viz.infidelity(model, x, a[:, :, :4])
    with pytest.raises(ValueError, match="attributions must be finite"):
        viz.infidelity(model, x, np.full(x.shape, np.nan, np.float32))
    with pytest.raises(ValueError, match="perturb must be one of"):
        viz.infidelity(model, x, a, perturb="blur")
    with pytest.raises(ValueError, match="stdev must be finite and > 0"):
        viz.infidelity(model, x, a, stdev=0.0)
    with pytest.raises(TypeError, match="stdev must be a number"):
        viz.infidelity(model, x, a, stdev="1")
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        viz.infidelity(model, x, a, n_samples=0)
    with pytest.raises(ValueError, match="feature_mask is not used with perturb='noise'"):
        viz.infidelity(model, x, a, feature_mask=np.zeros((8, 8), np.int64))
    with pytest.raises(ValueError, match="stdev is not used with perturb='subset'"):
        viz.infidelity(model, x, a, perturb="subset", stdev=0.1)
    with pytest.raises(ValueError, match="baseline is not used with perturb='a function'"):
        viz.infidelity(model, x, a, perturb=lambda i: (i, i), baseline=0.0)
    with pytest.raises(ValueError, match="stdev must be finite and > 0 in float32"):
        viz.infidelity(model, x, a, stdev=1e-50)
    with pytest.raises(ValueError, match="stdev must be finite and > 0 in float32"):
        viz.infidelity(model, x, a, stdev=1e39)
    with pytest.raises(ValueError, match="more than 67108864"):
        viz.infidelity(model, x, a, n_samples=2 ** 26)
    with pytest.raises(ValueError, match="perturb's perturbed_inputs must be finite"):
        viz.infidelity(model, x, a, perturb=lambda i: (i, i * np.float32(np.nan)))
    with pytest.raises(ValueError, match=r"attributions must be shaped like x .* got shape "
                                          r"\(1, 2\)"):
        viz.infidelity(model, x, [[1.0, 2.0]])
    with pytest.raises(TypeError, match="normalize must be True or False"):
        viz.infidelity(model, x, a, normalize=1)
    with pytest.raises(ValueError, match="target classes must be in"):
        viz.infidelity(model, x, a, 7)
    with pytest.raises(ValueError, match="perturb must return"):
        viz.infidelity(model, x, a, perturb=lambda inputs: inputs)
    with pytest.raises(ValueError, match="perturbed_inputs must be shaped like its inputs"):
        viz.infidelity(model, x, a, perturb=lambda inputs: (inputs, inputs[:, :1]))
    with pytest.raises(ValueError, match="baseline must be"):
        viz.infidelity(model, x, a, perturb="subset", baseline=np.zeros((3, 8, 8)))


def sensitivity64(explain, x, nears, order=2):
    """max_j ||e(near_j) - e(x)|| / ||e(x)|| per image, in float64, image by image."""
    out = []
    for i in range(len(x)):
        e = explain(x[i:i + 1]).ravel().astype(np.float64)
        scale = np.linalg.norm(e, order) or 1.0
        out.append(max(np.linalg.norm(explain(near[i:i + 1]).ravel() - e, order) / scale
                       for near in nears))
    return np.array(out)


@pytest.mark.parametrize("norm", ["fro", 1, np.inf])
def test_sensitivity_max_matches_the_definition(norm):
    model, x = small_cnn(), images(3)
    target = np.array([1, 4, 0])
    got = viz.sensitivity_max("integrated_gradients", model, x, target, n_samples=4,
                              radius=0.1, norm=norm, seed=2, n_steps=10)
    nears = [x + uniform_draw(2, j, x.shape[1:], 0.1) for j in range(4)]
    order = 2 if norm == "fro" else norm
    want = []
    for row in range(3):
        def one(images_, row=row):
            return viz.integrated_gradients(model, images_, int(target[row]), n_steps=10)
        want.append(sensitivity64(one, x[row:row + 1], [near[row:row + 1] for near in nears],
                                  order)[0])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.shape == (3,) and got.dtype == np.float64


def test_sensitivity_max_holds_the_target_and_takes_functions():
    """The target stays x's prediction for the perturbed inputs; a function method
    gets (model, x, target, **kwargs); a perturb function replaces the draws; an
    explanation that does not move gives 0, one that is 0 at x divides by 1."""
    model, x = small_cnn(), images(2)
    predicted = model(x).argmax(axis=1)
    seen = []

    def method(model_, images_, target, scale=1.0):
        seen.append(target.tolist())
        return viz.gradient(model_, images_, target) * scale

    got = viz.sensitivity_max(method, model, x, n_samples=3, scale=2.0,
                              perturb=lambda images_: images_ + np.float32(0.2))
    assert seen == [predicted.tolist()] * 4
    g = viz.gradient(model, x, predicted)
    want = (np.linalg.norm((viz.gradient(model, x + np.float32(0.2), predicted) - g)
                           .reshape(2, -1), axis=1) / np.linalg.norm(g.reshape(2, -1), axis=1))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    still = viz.sensitivity_max(lambda m, images_, t: np.ones((len(images_), 3)), model, x)
    np.testing.assert_array_equal(still, [0.0, 0.0])
    zero_at_x = viz.sensitivity_max(lambda m, images_, t: images_ - x, model, x, n_samples=2,
                                    radius=0.5)
    assert np.all((zero_at_x > 0) & (zero_at_x <= 0.5 * np.sqrt(x[0].size)))
    one = viz.sensitivity_max("saliency", model, x[1], n_samples=3)
    assert np.ndim(one) == 0
    assert float(one) == float(viz.sensitivity_max("saliency", model, x, n_samples=3)[1])


@pytest.mark.parametrize("method", ["occlusion", "kernel_shap", "grad_cam", "lrp"])
def test_sensitivity_max_by_name(method):
    """Every named method runs (occlusion: its logit heatmap) and a larger radius
    moves the explanation more."""
    model, x = small_cnn(), images(2)
    kwargs = {"window": 2} if method == "occlusion" else {}
    small = viz.sensitivity_max(method, model, x, radius=0.01, n_samples=3, **kwargs)
    large = viz.sensitivity_max(method, model, x, radius=0.5, n_samples=3, **kwargs)
    assert small.shape == (2,) and np.all(np.isfinite(small))
    assert np.all(large > small)


def test_sensitivity_max_arguments():
    model, x = small_cnn(), images(2)
    with pytest.raises(ValueError, match="method must be a function or one of"):
        viz.sensitivity_max("gradcam", model, x)
    with pytest.raises(ValueError, match="radius must be finite and > 0"):
        viz.sensitivity_max("saliency", model, x, radius=-1)
    with pytest.raises(ValueError, match="norm must be 'fro', a number > 0 or inf"):
        viz.sensitivity_max("saliency", model, x, norm=0)
    with pytest.raises(TypeError, match="norm must be"):
        viz.sensitivity_max("saliency", model, x, norm="nuc")
    with pytest.raises(ValueError, match="one explanation per image"):
        viz.sensitivity_max(lambda m, images_, t: np.zeros(3), model, x)
    with pytest.raises(ValueError, match=r"perturb\(inputs\) must be shaped like its inputs"):
        viz.sensitivity_max("saliency", model, x, perturb=lambda images_: images_[:1])
    with pytest.raises(TypeError, match="perturb must be a function or None"):
        viz.sensitivity_max("saliency", model, x, perturb="uniform")
    with pytest.raises(TypeError, match="unexpected keyword"):
        viz.sensitivity_max("saliency", model, x, n_steps=3)
    with pytest.raises(ValueError, match="got a tuple"):
        viz.sensitivity_max("integrated_gradients", model, x, return_convergence_delta=True)


def test_unexplained_share_is_normalized_infidelity_over_the_changes():
    model, x = small_cnn(), images(3)
    a = viz.gradient(model, x, 2)
    share = viz.unexplained_share(model, x, a, 2, n_samples=8, stdev=0.3, seed=4)
    noise = [noise_draw(4, j, x.shape[1:], 0.3) for j in range(8)]
    energy = []
    for i in range(3):
        base = _score64(model, x[i:i + 1], [2])[0]
        d = np.array([base - _score64(model, (x[i] - n)[None], [2])[0] for n in noise])
        energy.append(np.mean(d * d))
    want = infidelity64(model, x, a, [2] * 3, [noise] * 3, normalize=True) / np.array(energy)
    np.testing.assert_allclose(share, want, rtol=2e-3)
    assert np.all((share >= 0) & (share <= 1))
    # a map that predicts nothing leaves everything unexplained; a linear model's
    # gradient, nothing
    np.testing.assert_array_equal(viz.unexplained_share(model, x, np.zeros_like(a), 2), 1.0)
    lin = linear_net()
    xl = np.random.default_rng(0).standard_normal((2, 2, 4, 3)).astype(np.float32)
    assert np.all(viz.unexplained_share(lin, xl, viz.gradient(lin, xl, 0), 0) < 1e-9)


def test_metric_draws_do_not_depend_on_the_batch():
    """Per-image masks with other ids, other images, other batch sizes: an image's
    infidelity (noise or subset) and sensitivity are the same alone."""
    model, x = small_cnn(), images(3)
    cells = np.repeat(np.repeat(np.arange(16).reshape(4, 4), 2, 0), 2, 1)
    masks = np.stack([cells, cells + 100, cells * 7])[:, None]
    a = viz.integrated_gradients(model, x, 1, n_steps=8)
    both = viz.infidelity(model, x, a, 1, perturb="subset", feature_mask=masks, n_samples=6,
                          batch_size=5)
    noisy = viz.infidelity(model, x, a, 1, n_samples=6, batch_size=4)
    steady = viz.sensitivity_max("gradient", model, x, 1, n_samples=3)
    for i in range(3):
        alone = viz.infidelity(model, x[i], a[i], 1, perturb="subset", feature_mask=masks[i],
                               n_samples=6)
        assert float(alone) == float(both[i])
        assert float(viz.infidelity(model, x[i], a[i], 1, n_samples=6)) == float(noisy[i])
        assert float(viz.sensitivity_max("gradient", model, x[i], 1, n_samples=3)) == \
            float(steady[i])


def test_metrics_of_a_confident_probability_and_edge_cases():
    """A confident image's probability moves by 1e-9, below float32's resolution of
    1.0: the softmax is taken in float64, so the changes are seen."""
    model, x = small_cnn(), images(2)
    model.fc2.weight.data *= 60     # logits 20-30 apart: probabilities 1 - 1e-9 or so
    t = model(x).argmax(axis=1)
    gap = model(x)[np.arange(2), t] - np.sort(model(x), axis=1)[:, -2]
    assert np.all((gap > 20) & (gap < 30))
    a = viz.gradient(model, x, t, score="probability")
    share = viz.unexplained_share(model, x, a, t, score="probability", stdev=0.01)
    assert np.all(np.isfinite(share))       # the changes are seen (not 0 / 0)
    noise = [noise_draw(0, j, x.shape[1:], 0.01) for j in range(10)]
    want = infidelity64(model, x, a, t, [noise] * 2, score="probability")
    np.testing.assert_allclose(viz.infidelity(model, x, a, t, score="probability", stdev=0.01),
                               want, rtol=0.05)
    # nothing moves the score: unexplained is undefined (NaN), not "all explained"
    flat = small_cnn()
    flat.fc2.weight.data[...] = 0
    assert np.all(np.isnan(viz.unexplained_share(flat, x, np.ones_like(x), 0)))
    # an empty batch, a large p, method_args, a method returning strings
    assert viz.sensitivity_max("gradient", model, x[:0]).shape == (0,)
    assert viz.infidelity(model, x[:0], a[:0]).shape == (0,)
    big = viz.sensitivity_max("gradient", model, x, norm=1000, n_samples=2)
    inf = viz.sensitivity_max("gradient", model, x, norm=np.inf, n_samples=2)
    assert np.all(big > 0)
    np.testing.assert_allclose(big, inf, rtol=0.1)
    seen = []
    viz.sensitivity_max(lambda m, i, t, n_samples: seen.append(n_samples) or i, model, x,
                        n_samples=2, method_args={"n_samples": 40})
    assert seen == [40, 40, 40]
    with pytest.raises(ValueError, match="given both as keywords and in method_args"):
        viz.sensitivity_max("kernel_shap", model, x, baseline=0.0,
                            method_args={"baseline": 1.0})
    with pytest.raises(ValueError, match="numbers on the model's device"):
        viz.sensitivity_max(lambda m, i, t: np.full(len(i), "a"), model, x)
    radii = []
    viz.sensitivity_max("gradient", model, x, perturb=lambda i, r: radii.append(r) or i,
                        radius=0.1, n_samples=2)
    assert radii == [0.1]                  # as given (Captum's), not rounded to float32
    with pytest.raises(ValueError, match="radius is not used with perturb='a function of the "
                                         "inputs only'"):
        viz.sensitivity_max("gradient", model, x, radius=0.1, perturb=lambda i: i)
    with pytest.raises(ValueError, match=r"perturb\(inputs\) must be finite"):
        viz.sensitivity_max("gradient", model, x, perturb=lambda i: i * np.float32(np.nan))


# ---------------------------------------------------------------- TCAV

def ridge64(acts, labels, alpha):
    """The ridge classifier's weights in the primal, in float64: (Xc^T Xc + lambda I)^-1
    Xc^T (y - mean y), lambda = alpha * the mean squared norm of the centred rows."""
    xc = acts - acts.mean(axis=0)
    lam = alpha * (xc * xc).sum() / len(acts)
    return np.linalg.solve(xc.T @ xc + lam * np.eye(acts.shape[1]), xc.T @ (labels - labels.mean()))


def test_concept_vector_classifiers():
    """ridge: the primal solution (unit length, towards the concept); mean_difference:
    the difference of the means; a function gets the training activations; the
    held-out accuracy is the midpoint rule's on the test share."""
    model = small_cnn()
    concept, others = images(12, seed=3) + 1.0, images(14, seed=4)
    acts = lambda a: forward64(model, a)["fc1"]   # noqa: E731
    r = viz.concept_vector(model, "fc1", concept, others, alpha=0.3, test_fraction=0.0)
    labels = np.r_[np.ones(12), -np.ones(14)]
    want = ridge64(np.r_[acts(concept), acts(others)], labels, 0.3)
    np.testing.assert_allclose(r.vector, want / np.linalg.norm(want), rtol=1e-4, atol=1e-6)
    assert np.isnan(r.accuracy) and r.layer == "fc1"
    m = viz.concept_vector(model, "fc1", concept, others, classifier="mean_difference",
                           test_fraction=0.0)
    diff = acts(concept).mean(axis=0) - acts(others).mean(axis=0)
    np.testing.assert_allclose(m.vector, diff / np.linalg.norm(diff), rtol=1e-4, atol=1e-6)
    seen = []

    def custom(a, y):
        seen.append((a.shape, sorted(set(y.tolist()))))
        return np.where(y[:, None] > 0, a, -a).sum(axis=0)

    held = viz.concept_vector(model, "relu2", concept, others, classifier=custom, seed=1)
    n_train = 26 - int(0.33 * 26)
    assert seen == [((n_train, forward64(model, concept)["relu2"][0].size), [-1.0, 1.0])]
    assert 0 <= held.accuracy <= 1
    # the accuracy: the test share classified by the midpoint of the training means
    order = np.random.default_rng(1).permutation(26)
    test, train = order[:int(0.33 * 26)], order[int(0.33 * 26):]
    a = np.r_[forward64(model, concept)["relu2"].reshape(12, -1),
              forward64(model, others)["relu2"].reshape(14, -1)]
    proj = a @ held.vector
    cut = (proj[train][labels[train] > 0].mean() + proj[train][labels[train] < 0].mean()) / 2
    assert held.accuracy == pytest.approx(np.mean(np.where(proj[test] > cut, 1, -1) ==
                                                  labels[test]))


def test_tcav_derivatives_are_the_directional_derivatives():
    """Each run's derivatives are d score / d activation . CAV (central differences of
    the float64 rest of the network along the CAV); the scores count positive ones;
    the runs draw the others from the pool, the controls random against random."""
    model = small_cnn()
    x, concept, pool = images(5, seed=7), images(6, seed=8) * 2, images(20, seed=9)
    r = viz.tcav(model, x, "pool2", concept, pool, 2, runs=3, seed=4)
    assert r.derivatives.shape == (3, 5) and r.random_scores.shape == (3,)
    a = forward64(model, x)["pool2"]
    f = _rest_score(model, "pool2", 2)
    rng = np.random.default_rng(4)
    for run in range(3):
        other = np.sort(rng.choice(20, 6, replace=False))
        cav = viz.concept_vector(model, "pool2", concept, pool[other], seed=rng).vector
        v = cav.reshape(a.shape[1:])
        want = [(f(a[i] + 1e-4 * v) - f(a[i] - 1e-4 * v)) / 2e-4 for i in range(5)]
        np.testing.assert_allclose(r.derivatives[run], want, rtol=1e-3, atol=1e-5)
        assert r.scores[run] == np.mean(np.array(want) > 0)
        assert r.magnitudes[run] == pytest.approx(np.mean(want), rel=1e-3, abs=1e-6)
        fake = np.sort(rng.choice(20, 6, replace=False))
        rest = np.sort(rng.choice(np.setdiff1d(np.arange(20), fake), 6, replace=False))
        control = viz.concept_vector(model, "pool2", pool[fake], pool[rest], seed=rng).vector
        grads = viz.layer_gradient_x_activation(model, x, "pool2", 2, multiply_by_inputs=False)
        assert r.random_scores[run] == np.mean(grads.reshape(5, -1) @ control > 0)
    assert r.score == pytest.approx(r.scores.mean())


def test_tcav_of_a_concept_the_class_is_made_of():
    """A linear model at its flattened input: the gradient is W[t] for every input, so
    a concept of images shifted along W[t] scores 1 (every input's score grows towards
    it) and the opposite concept 0, far from the random controls."""
    model = linear_net()
    w = model.fc.weight.data[1].reshape(2, 4, 3)
    w = 6 * w / np.linalg.norm(w)
    pool = np.random.default_rng(1).standard_normal((60, 2, 4, 3)).astype(np.float32)
    x = np.random.default_rng(2).standard_normal((10, 2, 4, 3)).astype(np.float32)
    up = viz.tcav(model, x, "flatten", pool[:15] + w, pool[15:], 1, runs=10)
    down = viz.tcav(model, x, "flatten", pool[:15] - w, pool[15:], 1, runs=10)
    assert up.score == 1.0 and down.score == 0.0
    assert np.all(up.accuracies >= 0.8)
    assert up.magnitude > 0 > down.magnitude
    # a linear model's inputs share one gradient: a random CAV scores 0 or 1
    assert set(up.random_scores.tolist()) == {0.0, 1.0} and up.p_value < 0.05


def test_welch_p_value_and_incomplete_beta():
    from fastcnn.viz.concepts import _betainc, _welch_p
    scipy = pytest.importorskip("scipy")
    from scipy import special, stats
    for a, b, x in [(0.5, 0.5, 0.3), (2.0, 0.5, 0.9), (30.0, 0.5, 0.99), (1.5, 4.0, 0.01)]:
        assert _betainc(a, b, x) == pytest.approx(special.betainc(a, b, x), rel=1e-10)
    rng = np.random.default_rng(0)
    for n, m in [(5, 7), (10, 10), (3, 20)]:
        u, v = rng.normal(0, 1, n), rng.normal(0.5, 2, m)
        assert _welch_p(u, v) == pytest.approx(
            stats.ttest_ind(u, v, equal_var=False).pvalue, rel=1e-8)
    assert scipy is not None
    assert np.isnan(_welch_p([0.5], [0.1, 0.2])) and np.isnan(_welch_p([1, 1], [1, 1]))
    assert _welch_p([1, 1], [0, 0]) == 0.0


def test_tcav_arguments():
    model, x = small_cnn(), images(3)
    c, o = images(4, seed=2), images(8, seed=3)
    with pytest.raises(ValueError, match="at least as many other images"):
        viz.tcav(model, x, "relu2", c, o[:3])
    with pytest.raises(ValueError, match="classifier must be one of"):
        viz.tcav(model, x, "relu2", c, o, classifier="svm")
    with pytest.raises(ValueError, match="test_fraction must be in"):
        viz.tcav(model, x, "relu2", c, o, test_fraction=1.0)
    with pytest.raises(ValueError, match="alpha must be > 0 for the ridge"):
        viz.concept_vector(model, "relu2", c, o, alpha=0)
    with pytest.raises(ValueError, match="runs must be >= 1"):
        viz.tcav(model, x, "relu2", c, o, runs=0)
    with pytest.raises(ValueError, match="one kind of example only"):
        viz.concept_vector(model, "relu2", c[:1], o[:1], test_fraction=0.5)
    with pytest.raises(ValueError, match="found no direction"):
        viz.concept_vector(model, "relu2", c, c.copy(), classifier="mean_difference",
                           test_fraction=0.0)
    with pytest.raises(ValueError, match="one weight per activation"):
        viz.concept_vector(model, "relu2", c, o, classifier=lambda a, y: np.ones(3))
    with pytest.raises(ValueError, match="target must be an int or one class per input"):
        viz.tcav(model, x, "relu2", c, o, np.array([1, 2]))
    with pytest.raises(ValueError, match="no layer 'nope'"):
        viz.tcav(model, x, "nope", c, o)
    with pytest.raises(ValueError, match="concept must be one image"):
        viz.tcav(model, x, "relu2", c[0, 0], o)
    # review findings: rounding noise is no direction; shapes, NaN, empty x, models
    with pytest.raises(ValueError, match="found no direction"):
        viz.concept_vector(model, "relu2", c, c.copy(), test_fraction=0)
    with pytest.raises(ValueError, match=r"concept images must be shaped as the others "
                                          r"\(2, 8, 8\), got \(2, 6, 6\)"):
        viz.tcav(model, x, "relu2", c[:, :, :6, :6], o)
    with pytest.raises(ValueError, match="others images must be shaped as the others"):
        viz.concept_vector(model, "relu2", c, o[:, :, :6, :6])
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="x must be finite"):
        viz.tcav(model, bad, "relu2", c, o)
    with pytest.raises(ValueError, match="concept must be finite"):
        viz.tcav(model, x, "relu2", bad, o)
    with pytest.raises(ValueError, match="x holds no images"):
        viz.tcav(model, x[:0], "relu2", c, o)
    with pytest.raises(TypeError, match="model must be a fastcnn.nn.Sequential"):
        viz.tcav(object(), x, "relu2", c, o)
    with pytest.raises(TypeError, match="model must be a fastcnn.nn.Sequential"):
        viz.concept_vector(object(), "relu2", c, o)
    with pytest.raises(ValueError, match="NaN or infinite weights"):
        viz.concept_vector(model, "relu2", c, o, classifier=lambda a, y: a[0] * np.nan)
    with pytest.raises(ValueError, match="one weight per activation"):
        viz.concept_vector(model, "relu2", c, o, classifier=lambda a, y: [[1.0], [1.0, 2.0]])
    with pytest.raises(ValueError, match="alpha must be in"):
        viz.concept_vector(model, "relu2", c, o, alpha=10 ** 400)
    with pytest.raises(ValueError, match="runs must be at most 10000"):
        viz.tcav(model, x, "relu2", c, o, runs=10 ** 7)
    # scikit-learn's coef_ is (1, D); a huge alpha still gives a direction
    d = viz.concept_vector(model, "relu2", c, o, classifier=lambda a, y: (a[y > 0].mean(0) -
                                                                          a[y < 0].mean(0))[None])
    assert d.vector.shape == (64,)
    assert np.isfinite(viz.concept_vector(model, "relu2", c, o, alpha=1e300).vector).all()


def test_class_channel_importance_is_the_mean_over_each_class():
    model, x = small_cnn(), images(7)
    labels = np.array([0, 2, 2, 4, 0, 2, 4])
    means, counts = viz.class_channel_importance(model, x, labels, "relu2")
    assert means.shape == (5, 4) and counts.tolist() == [2, 0, 3, 0, 2]
    for k in (0, 2, 4):
        one = [viz.channel_importance(model, x[i], "relu2", k) for i in np.flatnonzero(labels == k)]
        np.testing.assert_allclose(means[k], np.mean(one, axis=0), rtol=1e-5, atol=1e-7)
    assert np.isnan(means[[1, 3]]).all()
    # by default each image's predicted class
    predicted = model(x).argmax(axis=1)
    got, n = viz.class_channel_importance(model, x, layer="relu2", method="lrp")
    want, _ = viz.class_channel_importance(model, x, predicted, "relu2", method="lrp")
    np.testing.assert_array_equal(got, want)
    assert n.sum() == 7
    wide, _ = viz.class_channel_importance(model, x, labels, "fc1", num_classes=8)
    assert wide.shape == (8, 6)
    with pytest.raises(ValueError, match="labels must hold one class per image"):
        viz.class_channel_importance(model, x, labels[:3])
    with pytest.raises(TypeError, match="labels must be integer classes"):
        viz.class_channel_importance(model, x, labels.astype(float))
    with pytest.raises(ValueError, match=r"labels must be classes in \[0, 5\)"):
        viz.class_channel_importance(model, x, labels + 1)
    with pytest.raises(ValueError, match="x holds no images"):
        viz.class_channel_importance(model, x[:0])
    with pytest.raises(ValueError, match=r"labels must be classes in \[0, 5\) \(the model's"):
        viz.class_channel_importance(model, x, labels + 3, num_classes=9)
