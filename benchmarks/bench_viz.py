"""Benchmark fastcnn.viz against Captum (PyTorch) on the same weights.

  python benchmarks/bench_viz.py [--model fastcnn-demo/model.npz] [--repeats 15]

1. Occlusion of one 28x28 image, 4x4 window, stride 1 (625 evaluations) on the
   reference MNIST CNN with batch norm: fastcnn incremental (only the region each
   window changes goes through conv/pool) and full re-evaluation, at several batch
   sizes; Captum's ``Occlusion`` at every ``perturbations_per_eval`` tried (its best
   is the number to beat); and a plain PyTorch loop that runs all 625 occluded
   copies as one batch under ``inference_mode`` (no Captum bookkeeping).
2. Saliency of a batch of 256 images: fastcnn vs Captum's ``Saliency`` and plain
   PyTorch autograd.
3. Integrated gradients of 16 images, 50 steps: fastcnn vs Captum's
   ``IntegratedGradients`` at several batch sizes.
4. DeepLIFT of 64 images against a zero baseline: fastcnn vs Captum's ``DeepLift``,
   with each one's largest convergence delta (Captum's ReLU-before-max-pool
   handling breaks summation-to-delta on this network; see the README).
5. Feature ablation of 16 images over 49 4x4 cells: fastcnn vs Captum's
   ``FeatureAblation`` (all 49 cells per evaluation); then LRP, Shapley value
   sampling, KernelSHAP and LIME.
6. Layer attributions at conv2 of 16 images: layer conductance, internal influence,
   one unit's neuron conductance (50 steps), layer GradientSHAP (20 samples from 8 references) and layer
   DeepLIFT-SHAP (8 references) vs Captum's LayerConductance, InternalInfluence,
   NeuronConductance, LayerGradientShap and LayerDeepLiftShap; feature permutation of 64 images over 49
   cells vs Captum's FeaturePermutation.
7. Metrics of 64 images: infidelity of the gradient (Gaussian noise, 20 draws) and
   max-sensitivity of the gradient (10 draws) vs ``captum.metrics.infidelity`` and
   ``sensitivity_max`` around Captum's ``Saliency``.

``--sections`` picks some of: occlusion, saliency, ig, deeplift, lrp, ablation,
shapley, kernelshap, layer, permutation, metrics (default: all).

Times are medians after warm-up, on the same number of threads for both
libraries. The script also checks that the two agree: Captum's occlusion
attribution is the logit drop averaged over the windows covering each pixel,
which is our ``logit_heatmap``; its saliency is |gradient|, our map for one channel.
Without torch/captum only fastcnn's numbers are printed.
"""

import argparse
import importlib.util
import platform
import warnings
import statistics
import time

import numpy as np

import fastcnn
from fastcnn import io, models, viz

try:
    import torch
except ImportError:  # fastcnn's figures only
    torch = None


def median_ms(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def load_inputs(model, n):
    """n standardised test images (Fashion-MNIST when installed, else noise)."""
    from fastcnn import data

    try:
        _, test = data.load_fashion_mnist()
        return fastcnn.F.normalize(test.images[:n], test.mean, test.std, dim=-3), "Fashion-MNIST"
    except data.DataNotFoundError:
        rng = np.random.default_rng(0)
        return rng.standard_normal((n, 1, 28, 28)).astype(np.float32), "random"


def torch_twin(model):
    """The same network in PyTorch, with our weights."""
    import torch

    layers = []
    for layer in model:
        kind = type(layer).__name__
        if kind == "Conv2d":
            t = torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                                layer.stride, layer.padding, layer.dilation, layer.groups,
                                layer.bias is not None)
        elif kind == "BatchNorm2d":
            t = torch.nn.BatchNorm2d(layer.num_features, layer.eps)
            t.running_mean.copy_(torch.from_numpy(layer.running_mean))
            t.running_var.copy_(torch.from_numpy(layer.running_var))
        elif kind == "ReLU":
            t = torch.nn.ReLU()
        elif kind == "MaxPool2d":
            t = torch.nn.MaxPool2d(layer.kernel_size, layer.stride)
        elif kind == "Flatten":
            t = torch.nn.Flatten()
        elif kind == "Linear":
            t = torch.nn.Linear(layer.in_features, layer.out_features)
        elif kind == "Dropout":
            t = torch.nn.Dropout(layer.p)
        else:
            raise NotImplementedError(kind)
        for name, p in layer._parameters.items():
            if p is not None:
                getattr(t, name).data.copy_(torch.from_numpy(p.data))
        layers.append(t)
    return torch.nn.Sequential(*layers).eval()


SECTIONS = ("occlusion", "saliency", "ig", "deeplift", "lrp", "ablation", "shapley",
            "kernelshap", "layer", "permutation", "metrics")


def table(rows):
    print("| method | median ms |\n|---|---|")
    print("\n".join(rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a saved model (default: mnist_cnn_bn, seed 0)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, help="threads for both libraries")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        metavar="NAME", help=f"what to time: {', '.join(SECTIONS)} (default: all)")
    args = parser.parse_args()
    want = set(args.sections).__contains__
    if args.threads:
        fastcnn.set_num_threads(args.threads)
    threads = fastcnn.get_num_threads()
    model = io.load(args.model) if args.model else models.mnist_cnn_bn(seed=0)
    model.eval()
    x, source = load_inputs(model, 256)
    image = x[0]
    target = int(model(image[None]).argmax())
    cpu = platform.processor() or platform.machine()
    print(f"fastcnn {fastcnn.__version__}, numpy {np.__version__}, {cpu}, {threads} threads; "
          f"model {args.model or 'mnist_cnn_bn(seed=0)'}; {source} images")
    captum = None
    if torch is not None:
        torch.set_num_threads(threads)
        try:
            import captum.attr as captum
        except ImportError:
            print("captum is not installed: PyTorch baselines only (pip install captum)")
    net = torch_twin(model) if torch is not None else None
    targets = model(x).argmax(axis=1)
    few, few_targets = x[:16], targets[:16]
    some, some_targets = x[:64], targets[:64]
    cells = (np.arange(28)[:, None] // 4) * 7 + np.arange(28)[None, :] // 4
    if want("occlusion"):
        occlusion_section(model, x, image, target, net, captum, args.repeats)
    if want("saliency"):
        saliency_section(model, x, targets, net, captum, args.repeats)
    if want("ig"):
        ig_section(model, few, few_targets, net, captum, args.repeats)
    if want("deeplift"):
        deeplift_section(model, some, some_targets, net, captum, args.repeats)
    if want("lrp"):
        lrp_section(model, some, some_targets, net, captum, args.repeats)
    if want("ablation"):
        ablation_section(model, few, few_targets, cells, net, captum, args.repeats)
    if want("shapley"):
        shapley_section(model, few[:4], few_targets[:4], cells, net, captum, args.repeats)
    if want("kernelshap"):
        kernelshap_section(model, few[:4], few_targets[:4], cells, net, captum, args.repeats)
    if want("layer"):
        layer_section(model, few, few_targets, x[64:72], net, captum, args.repeats)
    if want("permutation"):
        permutation_section(model, some, some_targets, cells, net, captum, args.repeats)
    if want("metrics"):
        metrics_section(model, some, some_targets, net, captum, args.repeats)


def occlusion_section(model, x, image, target, net, captum, repeats):
    rows = []
    print("\n## Occlusion: 28x28 image, 4x4 window, stride 1 (625 evaluations)\n")
    ours = {}
    for incremental in (True, False):
        for batch in (64, 128, 256, 625):
            ms = median_ms(lambda: viz.occlusion(model, image, target, window=4, stride=1,
                                                 batch_size=batch, incremental=incremental),
                           repeats)
            ours[(incremental, batch)] = ms
            label = "incremental" if incremental else "full re-evaluation"
            rows.append(f"| fastcnn occlusion, {label}, batch {batch} | {ms:.1f} |")
    best_ours = min(ours.values())

    best_captum = None
    if torch is not None:
        timage = torch.from_numpy(image[None].copy())
        with torch.inference_mode():
            diff = float((net(torch.from_numpy(x[:8])) - torch.from_numpy(model(x[:8])))
                         .abs().max())
        print(f"PyTorch twin: max |logit difference| on 8 images = {diff:.2e}")

        mask = torch.zeros(625, 1, 28, 28, dtype=torch.bool)
        for k in range(625):
            mask[k, :, k // 25:k // 25 + 4, k % 25:k % 25 + 4] = True

        def torch_batched():
            with torch.inference_mode():
                return net(torch.where(mask, 0.0, timage))

        ms = median_ms(torch_batched, repeats)
        rows.append(f"| PyTorch: 625 occluded copies as one batch (inference_mode) | {ms:.1f} |")
        if captum is not None:
            occ = captum.Occlusion(net)
            for ppe in (1, 16, 64, 128, 256, 625):
                ms = median_ms(lambda: occ.attribute(timage, sliding_window_shapes=(1, 4, 4),
                                                     strides=(1, 1, 1), baselines=0.0,
                                                     target=target, perturbations_per_eval=ppe),
                               max(3, repeats // (4 if ppe == 1 else 1)), warmup=1)
                rows.append(f"| Captum Occlusion, perturbations_per_eval={ppe} | {ms:.1f} |")
                best_captum = ms if best_captum is None else min(best_captum, ms)
            theirs = occ.attribute(timage, sliding_window_shapes=(1, 4, 4), strides=(1, 1, 1),
                                   baselines=0.0, target=target, perturbations_per_eval=625)
            mine = viz.occlusion(model, image, target, window=4, stride=1, batch_size=625)
            agree = float(np.abs(theirs[0].numpy() - mine.logit_heatmap).max())
            print(f"Captum's occlusion attribution vs our logit_heatmap: max |difference| = "
                  f"{agree:.2e} (maps span {float(np.abs(mine.logit_heatmap).max()):.2f})")
    table(rows)
    print(f"\nfastcnn best: {best_ours:.1f} ms", end="")
    if best_captum is not None:
        print(f"; Captum best: {best_captum:.1f} ms; speed-up {best_captum / best_ours:.1f}x")
    else:
        print()



def saliency_section(model, x, targets, net, captum, repeats):
    print("\n## Saliency: batch of 256 28x28 images\n")
    rows = []
    ours = median_ms(lambda: viz.saliency(model, x, targets), repeats)
    rows.append(f"| fastcnn saliency | {ours:.1f} |")
    if torch is not None:
        tx = torch.from_numpy(x.copy())
        tt = torch.from_numpy(targets)

        def torch_saliency():
            inp = tx.clone().requires_grad_(True)
            out = net(inp)
            out.gather(1, tt[:, None]).sum().backward()
            return inp.grad.abs().amax(dim=1)

        ms = median_ms(torch_saliency, repeats)
        rows.append(f"| PyTorch autograd (same computation) | {ms:.1f} |")
        if captum is not None:
            sal = captum.Saliency(net)
            warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require")
            ms_captum = median_ms(lambda: sal.attribute(tx, target=tt, abs=True), repeats)
            rows.append(f"| Captum Saliency | {ms_captum:.1f} |")
            theirs = sal.attribute(tx, target=tt, abs=True)[:, 0].numpy()
            mine = viz.saliency(model, x, targets)
            diff = np.abs(theirs - mine)
            print(f"Captum's saliency vs ours: max |difference| = {float(diff.max()):.2e} "
                  f"(maps span {float(mine.max()):.2f}); {100 * float((diff > 1e-4).mean()):.3f}% "
                  f"of pixels differ by > 1e-4 (max-pool ties broken differently)")
            rows.append(f"\nspeed-up over Captum: {ms_captum / ours:.1f}x")
    table(rows)



def ig_section(model, few, few_targets, net, captum, repeats):
    print("\n## Integrated gradients: 16 images, 50 Gauss-Legendre steps, baseline 0\n")
    rows = []
    ours = {}
    for batch in (100, 200, 800):
        ours[batch] = median_ms(lambda: viz.integrated_gradients(
            model, few, few_targets, n_steps=50, batch_size=batch), max(3, repeats // 3))
        rows.append(f"| fastcnn integrated_gradients, batch_size={batch} | {ours[batch]:.1f} |")
    if captum is not None:
        ig = captum.IntegratedGradients(net)
        tx, tt = torch.from_numpy(few.copy()), torch.from_numpy(few_targets)
        best_captum = None
        for internal in (100, 200, 800):
            ms = median_ms(lambda: ig.attribute(tx, target=tt, n_steps=50,
                                                internal_batch_size=internal),
                           max(3, repeats // 3))
            rows.append(f"| Captum IntegratedGradients, internal_batch_size={internal} | "
                        f"{ms:.1f} |")
            best_captum = ms if best_captum is None else min(best_captum, ms)
        theirs = ig.attribute(tx, target=tt, n_steps=50).numpy()
        mine = viz.integrated_gradients(model, few, few_targets, n_steps=50)
        print(f"Captum's integrated gradients vs ours: max |difference| = "
              f"{float(np.abs(theirs - mine).max()):.2e} (maps span "
              f"{float(np.abs(mine).max()):.2f})")
        rows.append(f"\nspeed-up over Captum's best: {best_captum / min(ours.values()):.1f}x")
    table(rows)



def deeplift_section(model, some, some_targets, net, captum, repeats):
    print("\n## DeepLIFT: 64 images, baseline 0\n")
    rows = []
    ours = median_ms(lambda: viz.deep_lift(model, some, some_targets), repeats)
    rows.append(f"| fastcnn deep_lift | {ours:.1f} |")
    _, delta = viz.deep_lift(model, some, some_targets, return_convergence_delta=True)
    print(f"fastcnn's largest |convergence delta|: {float(np.abs(delta).max()):.1e}")
    if captum is not None:
        dl = captum.DeepLift(net)
        tx, tt = torch.from_numpy(some.copy()), torch.from_numpy(some_targets)
        warnings.filterwarnings("ignore", message=".*DeepLift.*|.*hooks.*|.*inplace.*")
        ms = median_ms(lambda: dl.attribute(tx, target=tt), repeats)
        rows.append(f"| Captum DeepLift | {ms:.1f} |")
        _, theirs = dl.attribute(tx, target=tt, return_convergence_delta=True)
        print(f"Captum's largest |convergence delta|: {float(theirs.abs().max()):.1e}")
        rows.append(f"\nspeed-up over Captum: {ms / ours:.1f}x")
    table(rows)



def lrp_section(model, some, some_targets, net, captum, repeats):
    print("\n## LRP: 64 images, the epsilon rule (Captum's default)\n")
    rows = []
    ours = median_ms(lambda: viz.lrp(model, some, some_targets), repeats)
    rows.append(f"| fastcnn lrp | {ours:.1f} |")
    composite = viz.lrp_composite(model, float(some.min()), float(some.max()))
    ms = median_ms(lambda: viz.lrp(model, some, some_targets, rules=composite,
                                   fold_batchnorm=True), repeats)
    rows.append(f"| fastcnn lrp, lrp_composite + fold_batchnorm | {ms:.1f} |")
    if captum is not None:
        class Flattening(torch.nn.Module):   # Captum's LRP has no rule for nn.Flatten
            def __init__(self, seq):
                super().__init__()
                self.layers = torch.nn.ModuleList(m for m in seq
                                                  if not isinstance(m, torch.nn.Flatten))
                self.flat = [isinstance(m, torch.nn.Flatten) for m in seq]

            def forward(self, v):
                layers = iter(self.layers)
                for flat in self.flat:
                    v = torch.flatten(v, 1) if flat else next(layers)(v)
                return v

        lrp = captum.LRP(Flattening(net).eval())
        tx, tt = torch.from_numpy(some.copy()), torch.from_numpy(some_targets)
        ms = median_ms(lambda: lrp.attribute(tx, target=tt), repeats)
        rows.append(f"| Captum LRP | {ms:.1f} |")
        theirs = lrp.attribute(tx, target=tt).detach().numpy()
        mine = viz.lrp(model, some, some_targets)
        print(f"Captum's LRP vs ours: max |difference| = {float(np.abs(theirs - mine).max()):.2e} "
              f"(maps span {float(np.abs(mine).max()):.2f})")
        rows.append(f"\nspeed-up over Captum: {ms / ours:.1f}x")
    table(rows)



def ablation_section(model, few, few_targets, cells, net, captum, repeats):
    print("\n## Feature ablation: 16 images, 49 cells of 4x4, baseline 0\n")
    rows = []
    ours = median_ms(lambda: viz.feature_ablation(model, few, few_targets, feature_mask=cells,
                                                  batch_size=784), repeats)
    rows.append(f"| fastcnn feature_ablation, batch_size=784 | {ours:.1f} |")
    if captum is not None:
        fa = captum.FeatureAblation(net)
        tx, tt = torch.from_numpy(few.copy()), torch.from_numpy(few_targets)
        tmask = torch.from_numpy(cells[None, None])
        ms = median_ms(lambda: fa.attribute(tx, target=tt, feature_mask=tmask,
                                            perturbations_per_eval=49), repeats)
        rows.append(f"| Captum FeatureAblation, perturbations_per_eval=49 | {ms:.1f} |")
        theirs = fa.attribute(tx, target=tt, feature_mask=tmask).numpy()
        mine = viz.feature_ablation(model, few, few_targets, feature_mask=cells)
        print(f"Captum's feature ablation vs ours: max |difference| = "
              f"{float(np.abs(theirs - mine).max()):.2e} (maps span "
              f"{float(np.abs(mine).max()):.2f})")
        rows.append(f"\nspeed-up over Captum: {ms / ours:.1f}x")
    table(rows)



def shapley_section(model, four, four_targets, cells, net, captum, repeats):
    print("\n## Shapley value sampling: 4 images, 49 cells of 4x4, 25 orders, baseline 0\n")
    rows = []
    ours = median_ms(lambda: viz.shapley_value_sampling(model, four, four_targets,
                                                        feature_mask=cells, batch_size=512),
                     repeats)
    rows.append(f"| fastcnn shapley_value_sampling, batch_size=512 | {ours:.1f} |")
    quarters = (np.arange(28)[:, None] // 7) * 4 + np.arange(28)[None, :] // 7
    exact = median_ms(lambda: viz.shapley_values(model, four[:1], four_targets[:1],
                                                 feature_mask=quarters, batch_size=1024),
                      max(1, repeats // 5), warmup=0)
    rows.append(f"| fastcnn shapley_values (exact), 1 image, 16 cells of 7x7 (65536 "
                f"coalitions) | {exact:.1f} |")
    if captum is not None:
        svs = captum.ShapleyValueSampling(net)
        tx, tt = torch.from_numpy(four.copy()), torch.from_numpy(four_targets)
        tmask = torch.from_numpy(cells[None, None])
        ms = median_ms(lambda: svs.attribute(tx, target=tt, feature_mask=tmask, n_samples=25,
                                             perturbations_per_eval=128), repeats)
        rows.append(f"| Captum ShapleyValueSampling, perturbations_per_eval=128 | {ms:.1f} |")
        rows.append(f"\nspeed-up over Captum: {ms / ours:.1f}x (exact Shapley values of 16 "
                    f"features take Captum's ShapleyValues 16! orders)")
    table(rows)



def kernelshap_section(model, four, four_targets, cells, net, captum, repeats):
    print("\n## KernelSHAP and LIME: 4 images, 49 cells of 4x4, 200 samples, baseline 0\n")
    rows = []
    warnings.filterwarnings("ignore", message="You are providing multiple inputs for Lime")
    for name, method, kwargs in (("kernel_shap", viz.kernel_shap, {}),
                                 ("lime", viz.lime, {"alpha": 0.01})):
        ours = median_ms(lambda: method(model, four, four_targets, feature_mask=cells,
                                        n_samples=200, batch_size=800, **kwargs), repeats)
        rows.append(f"| fastcnn {name}, batch_size=800 | {ours:.1f} |")
        if (torch is not None and captum is not None   # Captum fits with scikit-learn
                and importlib.util.find_spec("sklearn") is not None):
            explainer = (captum.KernelShap if name == "kernel_shap" else captum.Lime)(net)
            tx, tt = torch.from_numpy(four.copy()), torch.from_numpy(four_targets)
            tmask = torch.from_numpy(cells[None, None])
            ms = median_ms(lambda: explainer.attribute(tx, target=tt, feature_mask=tmask,
                                                       n_samples=200,
                                                       perturbations_per_eval=200),
                           repeats)
            rows.append(f"| Captum {type(explainer).__name__}, perturbations_per_eval=200 "
                        f"| {ms:.1f} |")
            rows.append(f"| speed-up over Captum | {ms / ours:.1f}x |")
    table(rows)



def layer_section(model, few, few_targets, refs, net, captum, repeats):
    print("\n## Layer attributions at conv2: 16 images; 50 steps, or 8 references\n")
    rows = []
    runs = [("layer_conductance", "LayerConductance",
             lambda: viz.layer_conductance(model, few, "conv2", few_targets, n_steps=50,
                                           batch_size=400),
             lambda a, tx, tt: a.attribute(tx, target=tt, n_steps=50, internal_batch_size=400)),
            ("internal_influence", "InternalInfluence",
             lambda: viz.internal_influence(model, few, "conv2", few_targets, n_steps=50,
                                            batch_size=400),
             lambda a, tx, tt: a.attribute(tx, target=tt, n_steps=50, internal_batch_size=400)),
            ("neuron_conductance (one unit)", "NeuronConductance",
             lambda: viz.neuron_conductance(model, few, "conv2", 3, few_targets,
                                            position=(7, 7), n_steps=50, batch_size=400),
             lambda a, tx, tt: a.attribute(tx, (3, 7, 7), target=tt, n_steps=50,
                                           internal_batch_size=400)),
            ("layer_gradient_shap", "LayerGradientShap",
             lambda: viz.layer_gradient_shap(model, few, "conv2", refs, few_targets,
                                             n_samples=20, batch_size=320),
             lambda a, tx, tt: a.attribute(tx, torch.from_numpy(refs.copy()), target=tt,
                                           n_samples=20)),
            ("layer_deep_lift_shap", "LayerDeepLiftShap",
             lambda: viz.layer_deep_lift_shap(model, few, "conv2", refs, few_targets,
                                              batch_size=128),
             lambda a, tx, tt: a.attribute(tx, torch.from_numpy(refs.copy()), target=tt))]
    warnings.filterwarnings("ignore", message=".*DeepLift.*|.*hooks.*|.*inplace.*")
    for name, theirs, ours_fn, captum_fn in runs:
        ours = median_ms(ours_fn, repeats)
        rows.append(f"| fastcnn {name} | {ours:.1f} |")
        if captum is not None:
            explainer = getattr(captum, theirs)(net, net[model.names.index("conv2")])
            tx, tt = torch.from_numpy(few.copy()), torch.from_numpy(few_targets)
            ms = median_ms(lambda: captum_fn(explainer, tx, tt), repeats)
            rows.append(f"| Captum {theirs} | {ms:.1f} |")
            rows.append(f"| speed-up over Captum | {ms / ours:.1f}x |")
    table(rows)


def permutation_section(model, some, some_targets, cells, net, captum, repeats):
    print("\n## Feature permutation: 64 images, 49 cells of 4x4\n")
    rows = []
    ours = median_ms(lambda: viz.feature_permutation(model, some, some_targets,
                                                     feature_mask=cells, batch_size=256),
                     repeats)
    rows.append(f"| fastcnn feature_permutation, batch_size=256 | {ours:.1f} |")
    if captum is not None:
        fp = captum.FeaturePermutation(net)
        tx, tt = torch.from_numpy(some.copy()), torch.from_numpy(some_targets)
        tmask = torch.from_numpy(cells[None, None])
        ms = median_ms(lambda: fp.attribute(tx, target=tt, feature_mask=tmask,
                                            perturbations_per_eval=49), repeats)
        rows.append(f"| Captum FeaturePermutation, perturbations_per_eval=49 | {ms:.1f} |")
        rows.append(f"| speed-up over Captum | {ms / ours:.1f}x |")
    table(rows)


def metrics_section(model, some, some_targets, net, captum, repeats):
    print("\n## Metrics: 64 images; infidelity (20 draws), max-sensitivity (10 draws)\n")
    rows = []
    grads = viz.gradient(model, some, some_targets)
    ours = median_ms(lambda: viz.infidelity(model, some, grads, some_targets, n_samples=20,
                                            stdev=0.1, batch_size=1280), repeats)
    rows.append(f"| fastcnn infidelity of the gradient | {ours:.1f} |")
    sens = median_ms(lambda: viz.sensitivity_max("gradient", model, some, some_targets,
                                                 n_samples=10), repeats)
    rows.append(f"| fastcnn sensitivity_max of the gradient | {sens:.1f} |")
    if captum is not None:
        from captum.metrics import infidelity, sensitivity_max

        tx, tt = torch.from_numpy(some.copy()), torch.from_numpy(some_targets)
        tg = torch.from_numpy(grads)

        def noise(inputs):
            change = torch.randn_like(inputs) * 0.1
            return change, inputs - change

        ms = median_ms(lambda: infidelity(net, noise, tx, tg, target=tt, n_perturb_samples=20),
                       repeats)
        rows.append(f"| Captum infidelity | {ms:.1f} |")
        rows.append(f"| speed-up over Captum | {ms / ours:.1f}x |")
        saliency = captum.Saliency(net)
        ms = median_ms(lambda: sensitivity_max(saliency.attribute, tx, n_perturb_samples=10,
                                               target=tt, abs=False), repeats)
        rows.append(f"| Captum sensitivity_max (Saliency, abs=False) | {ms:.1f} |")
        rows.append(f"| speed-up over Captum | {ms / sens:.1f}x |")
    table(rows)


if __name__ == "__main__":
    main()
