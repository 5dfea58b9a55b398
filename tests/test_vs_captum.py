"""fastcnn.viz against Captum on the same model and weights (torch in float64).
Skipped when torch or Captum is not installed; tests/test_viz.py checks every
method against its definition without them."""

from collections import OrderedDict

import numpy as np
import pytest

from fastcnn import nn, viz

torch = pytest.importorskip("torch")
captum_attr = pytest.importorskip("captum.attr")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
tnn = torch.nn


def _copy(param, array):
    with torch.no_grad():
        param.copy_(torch.from_numpy(np.asarray(array, dtype=np.float64)))


def to_torch(model):
    """The same layers and weights as a float64 torch Sequential, in eval mode."""
    layers = []
    for name, layer in model.named_children():
        if isinstance(layer, nn.Conv2d):
            t = tnn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                           layer.stride, layer.padding, layer.dilation, layer.groups,
                           bias=layer.bias is not None,
                           padding_mode=layer.padding_mode).double()
            _copy(t.weight, layer.weight.data)
            if layer.bias is not None:
                _copy(t.bias, layer.bias.data)
        elif isinstance(layer, nn.Linear):
            t = tnn.Linear(layer.in_features, layer.out_features).double()
            _copy(t.weight, layer.weight.data)
            _copy(t.bias, layer.bias.data)
        elif isinstance(layer, nn.BatchNorm2d):
            t = tnn.BatchNorm2d(layer.num_features, eps=layer.eps).double()
            for attr in ("running_mean", "running_var"):
                _copy(getattr(t, attr), getattr(layer, attr))
            _copy(t.weight, layer.weight.data)
            _copy(t.bias, layer.bias.data)
        elif isinstance(layer, nn.ReLU):
            t = tnn.ReLU()
        elif isinstance(layer, nn.MaxPool2d):
            t = tnn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                              ceil_mode=layer.ceil_mode)
        elif isinstance(layer, nn.Flatten):
            t = tnn.Flatten()
        else:
            raise TypeError(type(layer))
        layers.append((name, t))
    return tnn.Sequential(OrderedDict(layers)).eval()


def cnn(seed, channels=3, size=(11, 9)):
    """conv (padded) - BN - ReLU - pool - conv - ReLU - fc, with batch-norm
    statistics that are not the identity."""
    rng = np.random.default_rng(seed)
    h, w = size
    h1, w1 = (h + 2 - 3) // 1 + 1, (w + 2 - 3) // 1 + 1
    h2, w2 = (h1 - 2) // 2 + 1, (w1 - 2) // 2 + 1
    model = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(channels, 6, 3, padding=1, rng=rng)),
        ("bn1", nn.BatchNorm2d(6)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(6, 8, 3, padding=1, rng=rng)), ("relu2", nn.ReLU()),
        ("flatten", nn.Flatten()), ("fc", nn.Linear(8 * h2 * w2, 5, rng=rng))]))
    bn = model["bn1"]
    bn.running_mean[...] = rng.normal(0, 0.2, 6)
    bn.running_var[...] = rng.uniform(0.5, 1.5, 6)
    bn.weight.data[...] = rng.uniform(0.5, 1.5, 6)
    bn.bias.data[...] = rng.normal(0, 0.1, 6)
    return model.eval()


def inputs(seed, n=3, channels=3, size=(11, 9)):
    return np.random.default_rng(seed).standard_normal((n, channels) + size).astype(np.float32)


def attr(method, x, **kwargs):
    return method.attribute(torch.from_numpy(x.astype(np.float64)), **kwargs).detach().numpy()


def close(got, want, rtol=1e-4, atol=1e-6):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol,
                               atol=atol * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("seed", [0, 1])
def test_gradients_vs_captum(seed):
    model, x = cnn(seed), inputs(seed)
    tm, target = to_torch(model), [0, 3, 1]
    np.testing.assert_allclose(model(x), tm(torch.from_numpy(x.astype(np.float64)))
                               .detach().numpy(), rtol=1e-4, atol=1e-5)
    close(viz.gradient(model, x, target),
          attr(captum_attr.Saliency(tm), x, target=target, abs=False))
    close(viz.saliency(model, x, target),
          attr(captum_attr.Saliency(tm), x, target=target).max(axis=1))
    close(viz.guided_backprop(model, x, target),
          attr(captum_attr.GuidedBackprop(tm), x, target=target))


def test_deconvolution_and_input_x_gradient_vs_captum():
    model, x = cnn(5), inputs(5)
    tm, target = to_torch(model), [2, 2, 0]
    close(viz.deconvolution(model, x, target),
          attr(captum_attr.Deconvolution(tm), x, target=target))
    close(viz.input_x_gradient(model, x, target),
          attr(captum_attr.InputXGradient(tm), x, target=target))
    probs = tnn.Sequential(tm, tnn.Softmax(dim=1))
    close(viz.input_x_gradient(model, x, target, score="probability"),
          attr(captum_attr.InputXGradient(probs), x, target=target))


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid", "riemann_left",
                                    "riemann_middle", "riemann_right"])
@pytest.mark.parametrize("baseline", ["zero", "image", "per_sample"])
def test_integrated_gradients_vs_captum(method, baseline):
    model, x = cnn(6), inputs(6)
    tm, target = to_torch(model), [1, 4, 3]
    base = {"zero": 0.0, "image": inputs(7, n=1)[0] * 0.5, "per_sample": inputs(8) * 0.5}
    base = base[baseline]
    captum_base = (torch.from_numpy(np.asarray(base, np.float64))
                   if np.ndim(base) else base)
    if np.ndim(base) == 3:
        captum_base = captum_base[None]
    for score, net in (("logit", tm), ("probability", tnn.Sequential(tm, tnn.Softmax(dim=1)))):
        got, delta = viz.integrated_gradients(model, x, target, baseline=base, n_steps=9,
                                              method=method, batch_size=10, score=score,
                                              return_convergence_delta=True)
        want, want_delta = captum_attr.IntegratedGradients(net).attribute(
            torch.from_numpy(x.astype(np.float64)), baselines=captum_base, target=target,
            n_steps=9, method=method, internal_batch_size=4, return_convergence_delta=True)
        close(got, want.detach().numpy())
        np.testing.assert_allclose(delta, want_delta.detach().numpy(), atol=2e-5, err_msg=score)


@pytest.mark.parametrize("position", [None, (1, 2)])
def test_neuron_integrated_gradients_vs_captum(position):
    model, x = cnn(9), inputs(9)
    tm = to_torch(model)
    selector = ((lambda out: out[:, 3].sum(dim=(1, 2))) if position is None
                else (3,) + position)
    for quadrature in ("gausslegendre", "riemann_right"):
        ig = captum_attr.NeuronIntegratedGradients(tm, tm[model.index("relu2")])
        want = ig.attribute(torch.from_numpy(x.astype(np.float64)), selector, n_steps=7,
                            method=quadrature, baselines=torch.full(
                                (1,) + x.shape[1:], 0.2, dtype=torch.float64)).detach().numpy()
        close(viz.integrated_gradients(model, x, layer="relu2", channel=3, position=position,
                                       n_steps=7, method=quadrature, baseline=0.2), want)


@pytest.mark.parametrize("layer, unit", [("relu2", (1, 1, 2)), ("conv1", (2, 3, 4)),
                                         ("fc", (3,))])
def test_neuron_deep_lift_ablation_and_gradient_shap_vs_captum(layer, unit):
    """Captum's NeuronDeepLift, NeuronDeepLiftShap, NeuronFeatureAblation and (where its
    draws do not matter: a unit of the linear conv1, one reference, no noise)
    NeuronGradientShap: the same methods with a unit of a layer in the logit's place."""
    model, x = separated_cnn(10), inputs(10)
    tm = to_torch(model)
    net_layer = tm[model.index(layer)]
    tx = torch.from_numpy(x.astype(np.float64))
    picked = dict(layer=layer, channel=unit[0], position=unit[1:] or None)
    base, refs = inputs(11, n=1)[0] * 0.5, inputs(12, n=3)
    want = captum_attr.NeuronDeepLift(tm, net_layer).attribute(
        tx, unit, torch.from_numpy(base[None].astype(np.float64))).detach().numpy()
    got, delta = viz.deep_lift(model, x, baseline=base, return_convergence_delta=True, **picked)
    close(got, want)
    np.testing.assert_allclose(delta, 0, atol=1e-5 * np.abs(want).sum())  # sums to the change
    want = captum_attr.NeuronDeepLiftShap(tm, net_layer).attribute(
        tx, unit, torch.from_numpy(refs.astype(np.float64))).detach().numpy()
    close(viz.deep_lift_shap(model, x, refs, batch_size=4, **picked), want)
    mask = (np.arange(x.shape[2])[:, None] // 3) * 10 + np.arange(x.shape[3])[None, :] // 3
    want = captum_attr.NeuronFeatureAblation(tm, net_layer).attribute(
        tx, unit, baselines=0.3, feature_mask=torch.from_numpy(mask[None, None])).detach().numpy()
    close(viz.feature_ablation(model, x, feature_mask=mask, baseline=0.3, batch_size=7,
                               **picked), want)
    if layer == "conv1":
        want = captum_attr.NeuronGradientShap(tm, net_layer).attribute(
            tx, unit, torch.from_numpy(refs[:1].astype(np.float64)), n_samples=3)
        got, delta = viz.gradient_shap(model, x, refs[:1], n_samples=3,
                                       return_convergence_delta=True, **picked)
        close(got, want.detach().numpy())
        np.testing.assert_allclose(delta, 0, atol=1e-5 * np.abs(got).sum())


@pytest.mark.parametrize("layer, unit", [("relu2", (3, 1, 2)), ("conv1", (2, 3, 4)),
                                         ("flatten", (17,))])
def test_neuron_conductance_vs_captum(layer, unit):
    model, x = cnn(9), inputs(9)
    tm, target = to_torch(model), [1, 4, 3]
    position = unit[1:] or None
    for score, net in (("logit", tm), ("probability", tnn.Sequential(tm, tnn.Softmax(dim=1)))):
        for method in ("riemann_trapezoid", "gausslegendre"):
            nc = captum_attr.NeuronConductance(net, tm[model.index(layer)])
            want = nc.attribute(torch.from_numpy(x.astype(np.float64)), unit, baselines=0.2,
                                target=target, n_steps=7, method=method).detach().numpy()
            close(viz.neuron_conductance(model, x, layer, unit[0], target, position=position,
                                         baseline=0.2, n_steps=7, method=method, score=score,
                                         batch_size=5), want)


@pytest.mark.parametrize("layer", ["relu1", "conv2", "relu2"])
def test_grad_cam_vs_captum(layer):
    model, x = cnn(2), inputs(2)
    tm, target = to_torch(model), [4, 0, 2]
    cam = captum_attr.LayerGradCam(tm, tm[model.index(layer)])
    signed = attr(cam, x, target=target)                          # (N, 1, h, w)
    rectified = attr(cam, x, target=target, relu_attributions=True)
    close(viz.grad_cam(model, x, target, layer, upsample=False, relu=False), signed[:, 0])
    close(viz.grad_cam(model, x, target, layer, upsample=False), rectified[:, 0])
    for mode in ("bilinear", "nearest"):
        up = captum_attr.LayerAttribution.interpolate(torch.from_numpy(rectified), x.shape[2:],
                                                      interpolate_mode=mode).numpy()
        close(viz.grad_cam(model, x, target, model[layer], interpolate=mode), up[:, 0])


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_guided_grad_cam_vs_captum(mode):
    model, x = cnn(3), inputs(3)
    tm, target = to_torch(model), [1, 1, 4]
    want = attr(captum_attr.GuidedGradCam(tm, tm[model.index("relu1")]), x, target=target,
                interpolate_mode=mode)
    close(viz.guided_grad_cam(model, x, target, "relu1", interpolate=mode), want)


@pytest.mark.parametrize("size,window,stride", [
    ((11, 9), (3, 3), (1, 1)),
    ((11, 9), (3, 3), (3, 3)),      # 8 and 6 rows / columns left: clipped last windows
    ((11, 9), (4, 2), (3, 2)),
    ((11, 9), (11, 4), (1, 3)),     # a window the image's height
])
@pytest.mark.parametrize("fill", ["zero", "image"])
def test_occlusion_vs_captum(size, window, stride, fill):
    """logit_heatmap is Captum's Occlusion attribution of the logit (the window over
    every channel); heatmap is the same for the softmax probability."""
    model, x = cnn(4, size=size), inputs(4, size=size)
    tm, target = to_torch(model), [2, 0, 3]
    base = (np.zeros(x.shape[1:], np.float32) if fill == "zero"
            else inputs(9, n=1, size=size)[0])
    r = viz.occlusion(model, x, target, window=window, stride=stride, fill=base, batch_size=17)
    kwargs = dict(target=target, sliding_window_shapes=(x.shape[1],) + window,
                  strides=(x.shape[1],) + stride,
                  baselines=torch.from_numpy(base.astype(np.float64)))
    want = attr(captum_attr.Occlusion(tm), x, **kwargs)
    close(r.logit_heatmap, want[:, 0], rtol=1e-4, atol=1e-5)
    probs = tnn.Sequential(tm, tnn.Softmax(dim=1))
    close(r.heatmap, attr(captum_attr.Occlusion(probs), x, **kwargs)[:, 0], rtol=1e-4,
          atol=1e-5)


@pytest.mark.parametrize("window, stride", [
    ((1, 3, 3), (1, 2, 2)),
    ((2, 3, 2), (2, 2, 1)),     # the last channel window clipped to one channel
    ((2, 4, 4), 2),             # an int stride on every axis
    ((3, 4, 4), (1, 3, 3)),     # every channel: the plain (H, W) maps
])
def test_occlusion_over_some_channels_vs_captum(window, stride):
    """A window over fewer channels than the input's slides along the channels as
    well (Captum's sliding_window_shapes=(c, h, w)): heatmaps (C, H, W)."""
    size = (11, 9)
    model, x = cnn(5, size=size), inputs(5, size=size)
    tm, target = to_torch(model), [1, 4, 0]
    base = inputs(6, n=1, size=size)[0]
    kwargs = dict(target=target, sliding_window_shapes=window,
                  strides=stride if isinstance(stride, tuple) else (stride,) * 3,
                  baselines=torch.from_numpy(base.astype(np.float64)))
    want = attr(captum_attr.Occlusion(tm), x, **kwargs)
    probs = attr(captum_attr.Occlusion(tnn.Sequential(tm, tnn.Softmax(dim=1))), x, **kwargs)
    for incremental in (True, False):
        r = viz.occlusion(model, x, target, window=window, stride=stride, fill=base,
                          batch_size=7, incremental=incremental)
        if window[0] < x.shape[1]:
            assert r.logit_heatmap.shape == x.shape and r.logit.ndim == 4
            close(r.logit_heatmap, want, rtol=1e-4, atol=1e-5)
            close(r.heatmap, probs, rtol=1e-4, atol=1e-5)
        else:
            assert r.logit_heatmap.shape == (3,) + size
            close(r.logit_heatmap, want[:, 0], rtol=1e-4, atol=1e-5)
            close(r.heatmap, probs[:, 0], rtol=1e-4, atol=1e-5)


def separated_cnn(seed, size=(11, 9)):
    """conv - pool - BN - ReLU - conv - ReLU - fc: no two of Captum's DeepLift
    nonlinearities in a row. (Captum 0.9 gives a ReLU or max-pool directly before another
    the later one's plain gradient, so on conv-ReLU-pool stacks its attributions stop
    adding up to the logit change; fastcnn's follow the rules and do.)"""
    rng = np.random.default_rng(seed)
    h, w = size
    model = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 6, 3, padding=1, rng=rng)), ("pool1", nn.MaxPool2d(2)),
        ("bn1", nn.BatchNorm2d(6)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(6, 8, 3, padding=1, rng=rng)), ("relu2", nn.ReLU()),
        ("flatten", nn.Flatten()), ("fc", nn.Linear(8 * (h // 2) * (w // 2), 5, rng=rng))]))
    model.bn1.running_mean[...] = rng.normal(0, 0.2, 6)
    model.bn1.running_var[...] = rng.uniform(0.5, 1.5, 6)
    return model.eval()


@pytest.mark.parametrize("baseline", ["zero", "value", "image", "per_sample"])
def test_deep_lift_vs_captum(baseline):
    model, x = separated_cnn(10), inputs(10)
    tm, target = to_torch(model), [3, 0, 4]
    base = {"zero": 0.0, "value": 0.4, "image": inputs(11, n=1)[0],
            "per_sample": inputs(12)}[baseline]
    captum_base = torch.from_numpy(np.asarray(base, np.float64)) if np.ndim(base) else base
    if np.ndim(base) == 3:
        captum_base = captum_base[None]
    tx = torch.from_numpy(x.astype(np.float64))
    for local in (False, True):
        got, delta = viz.deep_lift(model, x, target, baseline=base, multiply_by_inputs=not local,
                                   return_convergence_delta=True)
        want, want_delta = captum_attr.DeepLift(tm, multiply_by_inputs=not local).attribute(
            tx, baselines=captum_base, target=target, return_convergence_delta=True)
        close(got, want.detach().numpy())
        if not local:
            np.testing.assert_allclose(delta, want_delta.detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("layer,to_input", [("pool1", False), ("relu1", False),
                                            ("bn1", True), ("conv2", True),
                                            ("relu2", False), ("conv1", True)])
def test_layer_deep_lift_vs_captum(layer, to_input):
    model, x = separated_cnn(25), inputs(25)
    tm, target = to_torch(model), [1, 4, 0]
    base = inputs(26, n=1)[0] * 0.5
    tx = torch.from_numpy(x.astype(np.float64))
    tb = torch.from_numpy(base[None].astype(np.float64))
    for local in (False, True):
        got, delta = viz.layer_deep_lift(model, x, layer, target, baseline=base,
                                         multiply_by_inputs=not local,
                                         attribute_to_layer_input=to_input,
                                         return_convergence_delta=True)
        want, want_delta = captum_attr.LayerDeepLift(
            tm, getattr(tm, layer), multiply_by_inputs=not local).attribute(
            tx, baselines=tb, target=target, attribute_to_layer_input=to_input,
            return_convergence_delta=True)
        close(got, want.detach().numpy())
        if not local:
            np.testing.assert_allclose(delta, want_delta.detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("layer, to_input", [("bn1", False), ("relu2", False),
                                             ("conv1", True)])
def test_layer_deep_lift_shap_vs_captum(layer, to_input):
    """Captum's LayerDeepLiftShap: LayerDeepLift against every reference, averaged; the
    deltas of every (image, reference) pair at i * B + j."""
    model, x = separated_cnn(27), inputs(27)
    tm, target = to_torch(model), [2, 0, 3]
    refs = inputs(28, n=4) * 0.5
    for local in (False, True):
        got, delta = viz.layer_deep_lift_shap(model, x, layer, refs, target, batch_size=5,
                                              multiply_by_inputs=not local,
                                              attribute_to_layer_input=to_input,
                                              return_convergence_delta=True)
        want, want_delta = captum_attr.LayerDeepLiftShap(
            tm, getattr(tm, layer), multiply_by_inputs=not local).attribute(
            torch.from_numpy(x.astype(np.float64)), torch.from_numpy(refs.astype(np.float64)),
            target=target, attribute_to_layer_input=to_input, return_convergence_delta=True)
        close(got, want.detach().numpy())
        if not local:
            np.testing.assert_allclose(delta, want_delta.detach().numpy(), atol=1e-5)


def test_layer_deep_lift_at_a_relus_input_vs_captum():
    """At a ReLU's input Captum 0.9 takes the ReLU's plain gradient at x in place of its
    rescale multiplier (the gradient it reads at the layer's input has not been through
    the rule), so its attributions there do not add up to the logit change; fastcnn's apply the rule
    and do. Captum's equal the multipliers at the ReLU's output times that gradient times
    the input's change, written out here."""
    model, x = separated_cnn(25), inputs(25)
    tm, target = to_torch(model), [1, 4, 0]
    base = inputs(26, n=1)[0] * 0.5
    tx = torch.from_numpy(x.astype(np.float64))
    tb = torch.from_numpy(base[None].astype(np.float64))
    bases = np.broadcast_to(base, x.shape).copy()
    for layer, before in (("relu1", "bn1"), ("relu2", "conv2")):
        want, want_delta = captum_attr.LayerDeepLift(tm, getattr(tm, layer)).attribute(
            tx, baselines=tb, target=target, attribute_to_layer_input=True,
            return_convergence_delta=True)
        mult = viz.layer_deep_lift(model, x, layer, target, baseline=base,
                                   multiply_by_inputs=False)
        a, b = viz.feature_maps(model, x, before), viz.feature_maps(model, bases, before)
        close(mult * (a > 0) * (a - b), want.detach().numpy())
        assert np.abs(want_delta.detach().numpy()).max() > 1e-3
        _, delta = viz.layer_deep_lift(model, x, layer, target, baseline=base,
                                       attribute_to_layer_input=True,
                                       return_convergence_delta=True)
        assert np.abs(delta).max() < 1e-5


def test_deep_lift_shap_vs_captum():
    model, x = separated_cnn(13), inputs(13)
    tm, target = to_torch(model), [1, 2, 2]
    refs = inputs(14, n=4)
    got, delta = viz.deep_lift_shap(model, x, refs, target, batch_size=5,
                                    return_convergence_delta=True)
    want, want_delta = captum_attr.DeepLiftShap(tm).attribute(
        torch.from_numpy(x.astype(np.float64)), baselines=torch.from_numpy(
            refs.astype(np.float64)), target=target, return_convergence_delta=True)
    close(got, want.detach().numpy())
    np.testing.assert_allclose(delta, want_delta.detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["elements", "superpixels", "per_sample"])
def test_feature_ablation_vs_captum(mask_kind):
    model, x = cnn(15), inputs(15)
    tm, target = to_torch(model), [0, 3, 1]
    rng = np.random.default_rng(15)
    cells = np.repeat(np.repeat(np.arange(12).reshape(4, 3), 3, 0), 3, 1)[:11, :9]
    mask = {"elements": None, "superpixels": cells,
            "per_sample": rng.integers(0, 6, size=(3, 1, 11, 9))}[mask_kind]
    base = inputs(16, n=1)[0] * 0.5
    captum_mask = None if mask is None else torch.from_numpy(
        mask.reshape((1,) * (4 - mask.ndim) + mask.shape))
    for score, net in (("logit", tm), ("probability", tnn.Sequential(tm, tnn.Softmax(dim=1)))):
        got = viz.feature_ablation(model, x, target, feature_mask=mask, baseline=base,
                                   score=score, batch_size=40)
        want = attr(captum_attr.FeatureAblation(net), x, target=target,
                    baselines=torch.from_numpy(base[None].astype(np.float64)),
                    feature_mask=captum_mask, perturbations_per_eval=8)
        close(got, want, rtol=1e-4, atol=1e-5)


def _permutations(seed, n, count):
    """feature_permutation's draws: per feature, a permutation of the batch other than
    the identity, from numpy's default_rng(seed)."""
    rng, perms = np.random.default_rng(seed), []
    for _ in range(count):
        perm = rng.permutation(n)
        while (perm == np.arange(n)).all():
            perm = rng.permutation(n)
        perms.append(torch.from_numpy(perm))
    return perms


@pytest.mark.parametrize("mask_kind", ["elements", "superpixels", "channels"])
def test_feature_permutation_vs_captum(mask_kind, monkeypatch):
    """Fed the same permutations (Captum draws torch.randperm once per feature, in id
    order), Captum's FeaturePermutation gives fastcnn's numbers."""
    size = (5, 4) if mask_kind == "elements" else (11, 9)
    h, w = size
    model, x = cnn(17, size=size), inputs(17, n=4, size=size)
    tm, target = to_torch(model), [0, 3, 1, 4]
    cells = np.repeat(np.repeat(np.arange(12).reshape(4, 3), 3, 0), 3, 1)[:h, :w]
    mask = {"elements": None, "superpixels": cells,
            "channels": np.arange(3)[:, None, None] * 12 + cells}[mask_kind]
    count = x[0].size if mask is None else len(np.unique(mask))
    captum_mask = None if mask is None else torch.from_numpy(
        mask.reshape((1,) * (4 - mask.ndim) + mask.shape))
    for score, net in (("logit", tm), ("probability", tnn.Sequential(tm, tnn.Softmax(dim=1)))):
        got = viz.feature_permutation(model, x, target, feature_mask=mask, seed=8, score=score,
                                      batch_size=30)
        draws = iter(_permutations(8, len(x), count))
        monkeypatch.setattr(torch, "randperm", lambda n, *args, **kwargs: next(draws))
        want = attr(captum_attr.FeaturePermutation(net), x, target=target,
                    feature_mask=captum_mask)
        monkeypatch.undo()
        assert next(draws, None) is None   # Captum drew one per feature
        close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer", ["relu1", "fc"])
def test_layer_feature_permutation_vs_captum(layer, monkeypatch):
    """Fed the same permutations, Captum's LayerFeaturePermutation gives fastcnn's numbers,
    per unit and per pair of channels. Captum 0.9's fails given a target (its layer
    forward selects the target, then its permutation selects again from the 1-D
    result), so its model here returns each image's target logit itself."""
    model, x = cnn(17), inputs(17, n=4)
    tm, target = to_torch(model), [0, 3, 1, 4]
    rows = torch.arange(len(x))

    class TargetLogit(tnn.Module):
        def __init__(self):
            super().__init__()
            self.net = tm

        def forward(self, v):
            return self.net(v)[rows, torch.tensor(target)]

    acts_shape = viz.layer_feature_ablation(model, x[:1], layer, 0).shape
    c = acts_shape[1]
    pairs = np.arange(c).reshape((1, c) + (1,) * (len(acts_shape) - 2)) // 2
    for mask in (None, pairs):
        count = int(np.prod(acts_shape[1:])) if mask is None else len(np.unique(mask))
        got = viz.layer_feature_permutation(model, x, layer, target, layer_mask=mask, seed=8,
                                            batch_size=30)
        draws = iter(_permutations(8, len(x), count))
        monkeypatch.setattr(torch, "randperm", lambda n, *args, **kwargs: next(draws))
        want = captum_attr.LayerFeaturePermutation(TargetLogit(), tm[model.index(layer)]) \
            .attribute(torch.from_numpy(x.astype(np.float64)),
                       layer_mask=None if mask is None else torch.from_numpy(mask))
        monkeypatch.undo()
        assert next(draws, None) is None   # Captum drew one per group
        close(got, want.detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["superpixels", "per_sample"])
def test_shapley_values_vs_captum(mask_kind):
    """Exact Shapley values: Captum averages over all F! orders, fastcnn weighs the 2**F
    coalitions; the same numbers."""
    model, x = cnn(21), inputs(21)
    tm, target = to_torch(model), [2, 0, 4]
    rng = np.random.default_rng(21)
    cells = np.repeat(np.repeat(np.arange(6).reshape(2, 3), 6, 0), 3, 1)[:11, :9]
    mask = {"superpixels": cells, "per_sample": rng.integers(0, 5, size=(3, 1, 11, 9))}[mask_kind]
    base = inputs(22, n=1)[0] * 0.5
    captum_mask = torch.from_numpy(mask.reshape((1,) * (4 - mask.ndim) + mask.shape))
    for score, net in (("logit", tm), ("probability", tnn.Sequential(tm, tnn.Softmax(dim=1)))):
        got = viz.shapley_values(model, x, target, feature_mask=mask, baseline=base,
                                 score=score, batch_size=50)
        want = attr(captum_attr.ShapleyValues(net), x, target=target,
                    baselines=torch.from_numpy(base[None].astype(np.float64)),
                    feature_mask=captum_mask, perturbations_per_eval=16)
        close(got, want, rtol=1e-4, atol=1e-5)


def test_shapley_value_sampling_vs_captum_where_the_orders_do_not_matter():
    """Captum's orders are torch's draws, so compare where every order gives the same
    answer: a model linear in its input."""
    rng = np.random.default_rng(23)
    model = nn.Sequential(OrderedDict(flatten=nn.Flatten(), fc=nn.Linear(3 * 11 * 9, 5, rng=rng)))
    x, base = inputs(23), inputs(24, n=1)[0]
    tm, target = to_torch(model), [4, 1, 0]
    cells = np.repeat(np.repeat(np.arange(12).reshape(4, 3), 3, 0), 3, 1)[:11, :9]
    got = viz.shapley_value_sampling(model, x, target, feature_mask=cells, baseline=base,
                                     n_samples=4)
    want = attr(captum_attr.ShapleyValueSampling(tm), x, target=target,
                baselines=torch.from_numpy(base[None].astype(np.float64)),
                feature_mask=torch.from_numpy(cells[None, None]), n_samples=4)
    close(got, want, rtol=1e-4, atol=1e-5)


def test_gradient_shap_vs_captum_where_the_draws_do_not_matter():
    """Captum's draws are torch's, so the two agree where the result does not depend on
    them: a linear model against one reference (every sample gives W[t] * (x - b))."""
    rng = np.random.default_rng(17)
    model = nn.Sequential(OrderedDict(flatten=nn.Flatten(), fc=nn.Linear(3 * 11 * 9, 5, rng=rng)))
    x, base = inputs(17), inputs(18, n=1)
    tm, target = to_torch(model), [4, 1, 0]
    for local in (False, True):
        got = viz.gradient_shap(model, x, base, target, n_samples=3,
                                multiply_by_inputs=not local)
        want = attr(captum_attr.GradientShap(tm, multiply_by_inputs=not local), x,
                    baselines=torch.from_numpy(base.astype(np.float64)), target=target,
                    n_samples=3)
        close(got, want)


@pytest.mark.parametrize("layer, to_input", [("relu2", False), ("fc", True)])
def test_layer_gradient_shap_vs_captum_where_the_draws_do_not_matter(layer, to_input):
    """After relu2 the network is linear (flatten, fc): against one reference without
    noise every sample gives W[t] * (layer(x) - layer(b)), whatever Captum's draws."""
    model, x = cnn(18), inputs(18)
    tm, target = to_torch(model), [4, 1, 0]
    base = inputs(19, n=1)
    for multiply in (True, False):
        got, delta = viz.layer_gradient_shap(model, x, layer, base, target, n_samples=3,
                                             multiply_by_inputs=multiply,
                                             attribute_to_layer_input=to_input,
                                             return_convergence_delta=True)
        want, want_delta = captum_attr.LayerGradientShap(
            tm, tm[model.index(layer)], multiply_by_inputs=multiply).attribute(
            torch.from_numpy(x.astype(np.float64)), torch.from_numpy(base.astype(np.float64)),
            target=target, n_samples=3, attribute_to_layer_input=to_input,
            return_convergence_delta=True)
        close(got, want.detach().numpy())
        if multiply:
            np.testing.assert_allclose(delta, want_delta.detach().numpy(), atol=2e-5)


@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq"])
def test_noise_tunnel_around_integrated_gradients_vs_captum(nt_type):
    """Captum's noise is torch's, so compare without it: NoiseTunnel(IntegratedGradients)
    at stdev 0 is the method itself (squared for smoothgrad_sq)."""
    model, x = cnn(19), inputs(19)
    tm, target = to_torch(model), [2, 3, 1]
    got = viz.smooth_grad(model, x, target, method="integrated", n_samples=2, stdev=0.0,
                          nt_type=nt_type, method_args={"n_steps": 8, "baseline": 0.1})
    want = attr(captum_attr.NoiseTunnel(captum_attr.IntegratedGradients(tm)), x,
                target=target, nt_type=nt_type, nt_samples=2, stdevs=0.0, n_steps=8,
                baselines=0.1)
    close(got, want)


@pytest.mark.parametrize("layer", ["bn1", "pool1", "relu2"])
def test_layer_integrated_gradients_vs_captum(layer):
    model, x = cnn(20), inputs(20)
    tm, target = to_torch(model), [0, 4, 2]
    base = inputs(21, n=1)[0] * 0.3
    got, delta = viz.layer_integrated_gradients(model, x, layer, target, baseline=base,
                                                n_steps=7, return_convergence_delta=True)
    want, want_delta = captum_attr.LayerIntegratedGradients(tm, tm[model.index(layer)]).attribute(
        torch.from_numpy(x.astype(np.float64)), target=target, n_steps=7,
        baselines=torch.from_numpy(base[None].astype(np.float64)), return_convergence_delta=True)
    close(got, want.detach().numpy())
    np.testing.assert_allclose(delta, want_delta.detach().numpy(), atol=2e-5)


@pytest.mark.parametrize("to_input", [False, True])
@pytest.mark.parametrize("layer,method", [("conv1", "gausslegendre"), ("bn1", "riemann_left"),
                                          ("pool1", "riemann_trapezoid"),
                                          ("relu2", "gausslegendre"), ("fc", "riemann_right")])
def test_layer_conductance_and_gradient_x_activation_vs_captum(layer, method, to_input):
    model, x = cnn(22), inputs(22)
    tm, target = to_torch(model), [1, 3, 0]
    tx = torch.from_numpy(x.astype(np.float64))
    base = inputs(23, n=1)[0] * 0.3
    got, delta = viz.layer_conductance(model, x, layer, target, baseline=base, n_steps=6,
                                       method=method, batch_size=5,
                                       attribute_to_layer_input=to_input,
                                       return_convergence_delta=True)
    want, want_delta = captum_attr.LayerConductance(tm, tm[model.index(layer)]).attribute(
        tx, target=target, n_steps=6, method=method, attribute_to_layer_input=to_input,
        baselines=torch.from_numpy(base[None].astype(np.float64)), return_convergence_delta=True)
    close(got, want.detach().numpy())
    np.testing.assert_allclose(delta, want_delta.detach().numpy(), atol=2e-5)
    got = viz.layer_gradient_x_activation(model, x, layer, target,
                                          attribute_to_layer_input=to_input)
    want = captum_attr.LayerGradientXActivation(tm, tm[model.index(layer)]).attribute(
        tx, target=target, attribute_to_layer_input=to_input)
    close(got, want.detach().numpy())
    got = viz.layer_integrated_gradients(model, x, layer, target, baseline=base, n_steps=6,
                                         attribute_to_layer_input=to_input)
    want = captum_attr.LayerIntegratedGradients(tm, tm[model.index(layer)]).attribute(
        tx, target=target, n_steps=6, attribute_to_layer_input=to_input,
        baselines=torch.from_numpy(base[None].astype(np.float64)))
    close(got, want.detach().numpy())
    got = viz.internal_influence(model, x, layer, target, baseline=base, n_steps=6,
                                 method=method, batch_size=4, attribute_to_layer_input=to_input)
    want = captum_attr.InternalInfluence(tm, tm[model.index(layer)]).attribute(
        tx, target=target, n_steps=6, method=method, attribute_to_layer_input=to_input,
        baselines=torch.from_numpy(base[None].astype(np.float64)))
    close(got, want.detach().numpy())


class _Flattening(tnn.Module):
    """to_torch's layers with torch.flatten in place of nn.Flatten, which Captum's LRP
    has no rule for."""

    def __init__(self, sequential):
        super().__init__()
        self.layers = tnn.ModuleList(m for m in sequential if not isinstance(m, tnn.Flatten))
        self.flat = [isinstance(m, tnn.Flatten) for m in sequential]

    def forward(self, x):
        layers = iter(self.layers)
        for flat in self.flat:
            x = torch.flatten(x, 1) if flat else next(layers)(x)
        return x


@pytest.mark.parametrize("seed", [30, 31])
def test_lrp_vs_captum(seed):
    """The default epsilon rule, and a composite of gamma, identity, epsilon and
    alpha1-beta0 (Captum's rules set as each module's ``rule``)."""
    from captum.attr._utils import lrp_rules

    model, x = cnn(seed), inputs(seed)
    tm = _Flattening(to_torch(model)).eval()
    tx = torch.from_numpy(x.astype(np.float64))
    target = [2, 0, 4]
    composite = ({"conv1": viz.GammaRule(0.25), "bn1": viz.IdentityRule(),
                  "conv2": viz.Alpha1Beta0Rule(set_bias_to_zero=True),
                  "fc": viz.EpsilonRule(0.1)},
                 {0: lrp_rules.GammaRule(0.25), 1: lrp_rules.IdentityRule(),
                  4: lrp_rules.Alpha1_Beta0_Rule(set_bias_to_zero=True),
                  6: lrp_rules.EpsilonRule(0.1)})
    for rules, torch_rules in ((None, {}), composite):
        for i, rule in torch_rules.items():
            tm.layers[i].rule = rule
        want, want_delta = captum_attr.LRP(tm).attribute(tx, target=target,
                                                         return_convergence_delta=True)
        # (Captum deletes every module's rule when it is done)
        got, delta = viz.lrp(model, x, target, rules=rules, return_convergence_delta=True)
        close(got, want.detach().numpy())
        np.testing.assert_allclose(delta, want_delta.detach().numpy(), atol=2e-5)


@pytest.mark.parametrize("layer", ["relu1", "conv2", "fc"])
@pytest.mark.parametrize("to_input", [False, True])
def test_layer_feature_ablation_vs_captum(layer, to_input):
    """Captum's LayerFeatureAblation, unit by unit and by pairs of channels against a
    value."""
    model, x = cnn(4), inputs(4)
    tm, target = to_torch(model), [1, 2, 0]
    tx = torch.from_numpy(x.astype(np.float64))
    explainer = captum_attr.LayerFeatureAblation(tm, tm[model.index(layer)])
    c = viz.layer_feature_ablation(model, x[:1], layer, 0,
                                   attribute_to_layer_input=to_input).shape[1]
    ndim = 2 if layer == "fc" else 4
    pairs = np.arange(c).reshape((1, c) + (1,) * (ndim - 2)) // 2
    for mask, base in ((None, 0.0), (pairs, 0.3)):
        want = explainer.attribute(tx, target=target, layer_baselines=base,
                                   layer_mask=None if mask is None else torch.from_numpy(mask),
                                   attribute_to_layer_input=to_input)
        close(viz.layer_feature_ablation(model, x, layer, target, layer_mask=mask,
                                         layer_baseline=base, attribute_to_layer_input=to_input,
                                         batch_size=7), want.detach().numpy())


@pytest.mark.parametrize("layer, index", [("conv1", 0), ("bn1", 1), ("pool1", 3),
                                          ("conv2", 4), ("fc", 6)])
def test_layer_lrp_vs_captum(layer, index):
    """Captum's LayerLRP at the output and the input of each layer it has a rule for
    (it has none for a ReLU), with the default rules and with a composite."""
    from captum.attr._utils import lrp_rules

    model, x = cnn(3), inputs(3)
    tm = _Flattening(to_torch(model)).eval()
    tx = torch.from_numpy(x.astype(np.float64))
    target = [2, 0, 4]
    for rules, torch_rules in ((None, {}), ({"conv2": viz.GammaRule(0.25)},
                                            {4: lrp_rules.GammaRule(0.25)})):
        for to_input in (False, True):
            for i, rule in torch_rules.items():
                tm.layers[i].rule = rule
            want, want_delta = captum_attr.LayerLRP(tm, tm.layers[index]).attribute(
                tx, target=target, attribute_to_layer_input=to_input,
                return_convergence_delta=True)
            got, delta = viz.layer_lrp(model, x, layer, target, rules=rules,
                                       attribute_to_layer_input=to_input,
                                       return_convergence_delta=True)
            close(got, want.detach().numpy())
            np.testing.assert_allclose(delta, want_delta.detach().numpy(), atol=2e-5)


def _captum_draws(rows):
    """A Captum perturbation generator yielding ``rows`` (bool, one coalition each)."""
    def generate(original_inp, **kwargs):
        for row in rows:
            yield torch.from_numpy(row[None].astype(np.int64))
    return generate


@pytest.mark.parametrize("mask_kind", ["superpixels", "per_sample"])
def test_kernel_shap_vs_captum_on_the_same_draws(mask_kind):
    """Captum's KernelShap fed fastcnn's draws (the input first, then the baseline and
    the drawn coalitions) gives the same coefficients: its regression weighs the two
    ends a million times, fastcnn holds them exactly. Captum fits in float32; with
    fewer draws than features its least-norm answer is a percent or two off the
    float64 one, so the draws here outnumber the features."""
    pytest.importorskip("sklearn")
    from fastcnn.viz.surrogate import _kernel_shap_coalitions
    model, x = cnn(25), inputs(25)
    tm, target = to_torch(model), [2, 0, 4]
    cells = np.repeat(np.repeat(np.arange(12).reshape(4, 3), 3, 0), 3, 1)[:11, :9]
    mask = {"superpixels": np.broadcast_to(cells, (3, 1, 11, 9)),
            "per_sample": np.random.default_rng(25).integers(0, 7, size=(3, 1, 11, 9))}[mask_kind]
    base = inputs(26, n=1)[0] * 0.5
    for score, net in (("logit", tm), ("probability", tnn.Sequential(tm, tnn.Softmax(dim=1)))):
        got = viz.kernel_shap(model, x, target, feature_mask=mask, baseline=base, n_samples=40,
                              score=score)
        for i in range(3):
            k = len(np.unique(mask[i]))
            explainer = captum_attr.KernelShap(net)
            explainer.perturb_func = _captum_draws(
                [np.ones(k, bool)] + list(_kernel_shap_coalitions(k, 40, 0)))
            want = attr(explainer, x[i:i + 1], target=target[i],
                        baselines=torch.from_numpy(base[None].astype(np.float64)),
                        feature_mask=torch.from_numpy(np.unique(mask[i], return_inverse=True)[1]
                                                      .reshape(1, 1, 11, 9)), n_samples=40)
            close(got[i:i + 1], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("distance,kernel_width,alpha", [("cosine", 1.0, 0.01),
                                                         ("cosine", 1.0, 0.001),
                                                         ("euclidean", 4.0, 0.002)])
def test_lime_vs_captum_on_the_same_draws(distance, kernel_width, alpha):
    """Captum's Lime (its exponential kernel, scikit-learn's Lasso) fed fastcnn's draws:
    the same coefficients, to scikit-learn's tolerance (fastcnn solves the lasso
    exactly)."""
    pytest.importorskip("sklearn")
    from captum._utils.models.linear_model import SkLearnLasso
    from fastcnn.viz.surrogate import _lime_coalitions
    model, x = cnn(27), inputs(27)
    tm, target = to_torch(model), [1, 3, 0]
    cells = np.repeat(np.repeat(np.arange(12).reshape(4, 3), 3, 0), 3, 1)[:11, :9]
    base = inputs(28, n=1)[0] * 0.5
    got = viz.lime(model, x, target, feature_mask=cells, baseline=base, n_samples=50,
                   alpha=alpha, distance=distance, kernel_width=kernel_width)
    for i in range(3):
        explainer = captum_attr.Lime(
            tm, interpretable_model=SkLearnLasso(alpha=alpha),
            similarity_func=captum_attr._core.lime.get_exp_kernel_similarity_function(
                distance, kernel_width),
            perturb_func=_captum_draws(_lime_coalitions(12, 50, 0)))
        want = attr(explainer, x[i:i + 1], target=target[i],
                    baselines=torch.from_numpy(base[None].astype(np.float64)),
                    feature_mask=torch.from_numpy(cells[None, None]), n_samples=50)
        close(got[i:i + 1], want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("normalize", [False, True])
def test_infidelity_vs_captum(normalize):
    """captum.metrics.infidelity fed fastcnn's noise draws (draw j for every image,
    Captum's copies image-major) and its subset draws: the same values."""
    from captum.metrics import infidelity
    from test_viz import coin64, noise_draw
    model, x = cnn(41), inputs(41)
    tm, target = to_torch(model), [2, 0, 4]
    tx = torch.from_numpy(x.astype(np.float64))
    a = viz.gradient(model, x, target)
    noise = np.stack([noise_draw(7, j, x.shape[1:], 0.4) for j in range(6)])

    def captum_noise(inputs):
        change = torch.from_numpy(np.tile(noise, (3, 1, 1, 1)).astype(np.float64))
        return change, inputs - change

    want = infidelity(tm, captum_noise, tx, torch.from_numpy(a.astype(np.float64)),
                      target=target, n_perturb_samples=6, normalize=normalize).numpy()
    got = viz.infidelity(model, x, a, target, stdev=0.4, n_samples=6, seed=7,
                         normalize=normalize)
    close(got, want, rtol=1e-3, atol=1e-9)

    # subsets of 3x3 cells, each at the baseline or not (I its 0/1 mask), for a
    # global attribution (integrated gradients, Captum's multiply_by_inputs)
    cells = np.repeat(np.repeat(np.arange(12).reshape(4, 3), 3, 0), 3, 1)[:11, :9]
    base = inputs(42, n=1)[0] * 0.5
    ig = viz.integrated_gradients(model, x, target, baseline=base, n_steps=20)
    coins = np.array([[coin64(3, j, f) for f in range(12)] for j in range(6)])
    removed = np.broadcast_to(coins[:, cells][:, None], (6,) + x.shape[1:])

    def captum_subsets(inputs):
        mask = torch.from_numpy(np.tile(removed, (3, 1, 1, 1)).astype(np.float64))
        b = torch.from_numpy(base.astype(np.float64))
        return mask, torch.where(mask > 0, b, inputs)

    want = infidelity(tm, captum_subsets, tx, torch.from_numpy(ig.astype(np.float64)),
                      target=target, n_perturb_samples=6, normalize=normalize).numpy()
    got = viz.infidelity(model, x, ig, target, perturb="subset", feature_mask=cells,
                         baseline=base, n_samples=6, seed=3, normalize=normalize)
    close(got, want, rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("norm", ["fro", float("inf")])
def test_sensitivity_max_vs_captum(norm):
    """captum.metrics.sensitivity_max of Saliency and IntegratedGradients fed
    fastcnn's uniform draws: the same values."""
    from captum.metrics import sensitivity_max
    from test_viz import uniform_draw
    model, x = cnn(43), inputs(43)
    tm, target = to_torch(model), [1, 3, 0]
    draws = np.stack([uniform_draw(5, j, x.shape[1:], 0.05) for j in range(4)])

    def captum_draws(inputs, radius):
        return inputs + torch.from_numpy(np.tile(draws, (3, 1, 1, 1)).astype(np.float64))

    tx = torch.from_numpy(x.astype(np.float64))
    for ours, explainer, kwargs in [
            ("gradient", captum_attr.Saliency(tm), {"abs": False}),
            ("integrated_gradients", captum_attr.IntegratedGradients(tm), {"n_steps": 16})]:
        want = sensitivity_max(explainer.attribute, tx, perturb_func=captum_draws,
                               perturb_radius=0.05, n_perturb_samples=4, norm_ord=norm,
                               target=target, **kwargs).numpy()
        extra = {} if ours == "gradient" else {"n_steps": 16}
        got = viz.sensitivity_max(ours, model, x, target, radius=0.05, n_samples=4,
                                  norm=norm, seed=5, **extra)
        close(got, want, rtol=1e-3)


def test_probability_scores_of_a_confident_model_vs_captum():
    """A confident model (the target's probability 1 - 1e-8 or closer): its softmax
    Jacobian's 1 - p and the probability's changes are below float32's resolution at
    1, so fastcnn takes the softmax in float64, as Captum on a float64 model does:
    the gradient, occlusion's probability drops and feature ablation agree with it."""
    model, x = cnn(44), inputs(44)
    top2 = np.sort(model(x), axis=1)[:, -2:]
    scale = np.float32(20 / (top2[:, 1] - top2[:, 0]).min())   # the logits 20 or more apart
    model["fc"].weight.data *= scale
    model["fc"].bias.data *= scale
    logits = model(x)
    target = logits.argmax(axis=1)
    assert np.all(np.sort(logits, axis=1)[:, -1] - np.sort(logits, axis=1)[:, -2] > 19)
    assert np.all(np.sort(logits, axis=1)[:, -1] - np.sort(logits, axis=1)[:, -2] < 36)
    probs = tnn.Sequential(to_torch(model), tnn.Softmax(dim=1))
    tt = target.tolist()

    def close(got, want):  # relative to the largest value: they are all tiny here
        assert np.abs(want).max() > 0
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-3,
                                   atol=2e-3 * np.abs(want).max())

    close(viz.gradient(model, x, target, score="probability"),
          attr(captum_attr.Saliency(probs), x, target=tt, abs=False))
    r = viz.occlusion(model, x, target, window=(3, 3), stride=(2, 2), fill=0.0)
    want = attr(captum_attr.Occlusion(probs), x, target=tt, sliding_window_shapes=(3, 3, 3),
                strides=(3, 2, 2), baselines=0.0)[:, 0]
    close(r.heatmap, want)
    cells = np.repeat(np.repeat(np.arange(12).reshape(4, 3), 3, 0), 3, 1)[:11, :9]
    close(viz.feature_ablation(model, x, target, feature_mask=cells, score="probability"),
          attr(captum_attr.FeatureAblation(probs), x, target=tt,
               feature_mask=torch.from_numpy(cells[None, None])))


def test_tcav_vs_captum_on_the_same_cav(tmp_path):
    """Captum's TCAV (its default layer gradient) given fastcnn's concept activation
    vector through a classifier that returns it: the same sign-count and magnitude
    scores as fastcnn's tcav with one run over the same pool."""
    from captum.concept import TCAV, Concept
    from captum.concept._utils.classifier import Classifier

    model = cnn(45)
    x, concept, pool = inputs(45, n=12), inputs(48, n=8), inputs(47, n=8)
    ours = viz.tcav(model, x, "pool1", concept, pool, 2, runs=1, seed=2)
    cav = viz.concept_vector(model, "pool1", concept, pool, seed=2).vector

    class Given(Classifier):
        def __init__(self):
            pass

        def train_and_eval(self, dataloader, **kwargs):
            return {"accs": torch.tensor(1.0)}

        def weights(self):
            v = torch.from_numpy(cav)
            return torch.stack([v, -v])

        def classes(self):
            return [0, 1]

    def loader(images):
        return torch.utils.data.DataLoader(torch.from_numpy(images.astype(np.float64)),
                                           batch_size=4)

    tm = to_torch(model)
    tcav = TCAV(tm, ["pool1"], classifier=Given(), save_path=str(tmp_path))
    sets = [[Concept(0, "concept", loader(concept)), Concept(1, "pool", loader(pool))]]
    got = tcav.interpret(torch.from_numpy(x.astype(np.float64)), sets, target=2)
    scores = next(iter(got.values()))["pool1"]
    assert float(scores["sign_count"][0]) == pytest.approx(ours.score)
    assert float(scores["magnitude"][0]) == pytest.approx(ours.magnitude, rel=1e-4)
    assert 0 < ours.score < 1


def test_metrics_vs_captum_with_the_same_perturb_function():
    """A perturb function drawing its own noise (seeded per call): called once on the
    same repeated inputs by both, it draws the same, and infidelity and
    sensitivity_max agree with Captum's, a two-argument one given the radius."""
    from captum.metrics import infidelity, sensitivity_max
    model, x = cnn(48), inputs(48)
    tm, target = to_torch(model), [4, 1, 0]
    tx = torch.from_numpy(x.astype(np.float64))
    a = viz.gradient(model, x, target)

    def noise(inputs):   # NumPy or torch
        drawn = np.random.default_rng(0).normal(0, 0.3, tuple(inputs.shape)).astype(np.float32)
        if isinstance(inputs, torch.Tensor):
            drawn = torch.from_numpy(drawn.astype(np.float64))
        return drawn, inputs - drawn

    want = infidelity(tm, noise, tx, torch.from_numpy(a.astype(np.float64)), target=target,
                      n_perturb_samples=7).numpy()
    close(viz.infidelity(model, x, a, target, perturb=noise, n_samples=7, batch_size=5), want,
          rtol=1e-3, atol=1e-9)

    def nearby(inputs, radius):
        drawn = np.random.default_rng(1).uniform(-radius, radius, tuple(inputs.shape))
        drawn = drawn.astype(np.float32)
        if isinstance(inputs, torch.Tensor):
            return inputs + torch.from_numpy(drawn.astype(np.float64))
        return inputs + drawn

    want = sensitivity_max(captum_attr.Saliency(tm).attribute, tx, perturb_func=nearby,
                           perturb_radius=0.1, n_perturb_samples=4, target=target,
                           abs=False).numpy()
    close(viz.sensitivity_max("gradient", model, x, target, perturb=nearby, radius=0.1,
                              n_samples=4), want, rtol=1e-3)
