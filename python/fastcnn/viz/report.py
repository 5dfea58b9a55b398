"""Every method for one image at once (:func:`explain`), and the self-contained HTML
report of it (:func:`write_report`, ``fastcnn explain``, the end of ``fastcnn demo``)."""

import base64
import datetime
import html
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import _backend as B
from .. import functional as F
from .attribution import (OcclusionResult, grad_cam, guided_backprop, guided_grad_cam,
                          integrated_gradients, occlusion, saliency, smooth_grad)
from .deeplift import deep_lift
from .lrp import lrp, lrp_composite
from .metrics import sensitivity_max, unexplained_share
from .surrogate import kernel_shap
from ._common import as_input, default_cam_layer, layer_name, resolve_targets, to_host
from .features import feature_maps
from .plot import (METHOD_TITLES, OVERLAID, class_name, display_image, figure_png,
                   method_title, plot_explanation, plot_heatmap, plot_input)

__all__ = ["METHODS", "Explanation", "explain", "write_report", "demo_report",
           "add_cli_arguments", "run_cli", "LOCAL_METHODS"]

#: The report shows occlusion's logit drop instead of its probability drop when no
#: window moves the probability by this much.
OCCLUSION_MIN_DROP = 1e-3
#: Every method :func:`explain` knows, in the order a report shows them.
METHODS = ("occlusion", "kernel_shap", "saliency", "smoothgrad", "integrated", "deeplift", "lrp",
           "guided", "gradcam", "guided_gradcam")
#: The gamma of the LRP rule :func:`explain` uses on the conv layers but the first.
LRP_GAMMA = 0.25

#: How ``explain(metrics=True)`` measures each map. "unexplained": the share of the
#: score's changes under perturbations of the input that the map, best scaled, fails
#: to predict (:func:`~fastcnn.viz.unexplained_share`, normalized infidelity over the
#: changes' mean square; 0 to 1). The perturbations suit what the map claims: the
#: local maps (what a small change of each pixel does) get Gaussian noise of
#: INFIDELITY_NOISE (in the model's input units: about one grey level of 255 for
#: Fashion-MNIST's standardisation); the others, which share out the
#: score's change from the baseline, get half of the occlusion window's cells set to
#: the baseline; INFIDELITY_SAMPLES draws. "sensitivity": the largest relative change
#: of the map over SENSITIVITY_SAMPLES inputs within SENSITIVITY_RADIUS of the image,
#: element by element (:func:`~fastcnn.viz.sensitivity_max`).
LOCAL_METHODS = ("saliency", "smoothgrad", "guided", "gradcam", "guided_gradcam")
INFIDELITY_NOISE = 0.01
INFIDELITY_SAMPLES = 50
SENSITIVITY_SAMPLES = 5
SENSITIVITY_RADIUS = 0.02


@dataclass
class Explanation:
    """One image's prediction and attribution maps.

    image: the model input (C, H, W); display: the picture shown, (H, W) or (H, W, 3)
    in [0, 1]; probabilities (classes,); predicted and target class indices;
    maps: method name -> map ((H, W), or (C, H, W) for the signed guided, integrated
    gradients, DeepLIFT and LRP maps);
    occlusion: the full :class:`~fastcnn.viz.OcclusionResult` when computed;
    classes: class names (or None); label: the true class when known; layer: the
    Grad-CAM layer; name: what the report calls the image; settings: the methods'
    parameters; metrics: when asked for, method name -> {"unexplained": ...,
    "sensitivity": ...} (see :data:`LOCAL_METHODS`'s notes and :func:`explain`).
    """

    image: object
    display: np.ndarray
    probabilities: object
    predicted: int
    target: int
    maps: OrderedDict
    occlusion: object = None
    classes: list = None
    label: int = None
    layer: str = None
    name: str = ""
    settings: dict = field(default_factory=dict)
    metrics: OrderedDict = None


def explain(model, x, target=None, *, methods="all", classes=None, labels=None, display=None,
            names=None, layer=None, window=4, stride=1, fill=None, n_samples=25, sigma=0.15,
            seed=0, n_steps=50, shap_samples=400, batch_size=256, metrics=False):
    """Run ``methods`` ('all' or a list from :data:`METHODS`) on one image (C, H, W)
    -> an :class:`Explanation`, or on a batch (N, C, H, W) -> a list of them (each
    method runs once over the batch).

    target: the class to explain (int or one per image; default: the predicted one).
    classes: class names (default: ``model.metadata['classes']``); labels: true
    classes, when known (None for an unknown one); display: the pictures to show
    (default: the input stretched to its range); names: what to call each image.
    layer: the Grad-CAM layer. window / stride / fill: occlusion's (fill None: each
    image's background, the median of its border pixels per channel, so that a window
    hides what it covers rather than painting a grey square on a black background).
    n_samples / sigma / seed: SmoothGrad's. n_steps: integrated gradients' (whose
    baseline, as DeepLIFT's and Kernel SHAP's, is ``fill``, the background by default).
    Kernel SHAP estimates the Shapley values of the cells of occlusion's window size
    from ``shap_samples`` scored copies (and ``seed``). batch_size: copies per forward
    pass. LRP uses :func:`~fastcnn.viz.lrp_composite` (z-box on the first layer,
    with the pixel range from the model's metadata or else the batch's; gamma =
    :data:`LRP_GAMMA` on the other conv layers; epsilon on the hidden fc layers),
    batch norm folded into the conv layers: sharper than plain LRP-epsilon, which
    is gradient x input's noise.
    metrics: also measure how far to trust each map (``Explanation.metrics``): the
    share of the score's changes it leaves unexplained (normalized infidelity) and its
    max-sensitivity, as described at :data:`LOCAL_METHODS`; the sensitivity runs each
    method again on :data:`SENSITIVITY_SAMPLES` nearby copies of the batch.
    """
    if isinstance(methods, str):
        methods = list(METHODS) if methods == "all" else [methods]
    else:
        methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"explain: unknown methods {unknown}; choose from {METHODS}")
    batch, single, _ = as_input(model, x, "explain")
    n = len(batch)
    logits = feature_maps(model, batch, layer=-1)
    probabilities = F.softmax(logits, dim=1)
    predicted = to_host(probabilities.argmax(axis=1))
    targets = predicted if target is None else to_host(resolve_targets(target, logits,
                                                                       "explain"))
    uses_cam = any(m in methods for m in ("gradcam", "guided_gradcam"))
    if uses_cam:
        layer = default_cam_layer(model, "explain") if layer is None else \
            layer_name(model, layer, "explain")
    if labels is not None:
        labels = [labels] if single else list(labels)
        if len(labels) != n:
            raise ValueError(f"explain: {len(labels)} labels for {n} images")
    if fill is None and (metrics or any(m in methods for m in (
            "occlusion", "kernel_shap", "integrated", "deeplift"))):
        fill = _background(batch)
    cells = _cells(batch.shape[2:], window) if metrics or "kernel_shap" in methods else None

    def run(method, images, t, fill=fill):
        """``method``'s map of ``images`` for targets ``t`` (and, for occlusion, the
        whole result)."""
        if method == "occlusion":
            result = occlusion(model, images, t, window=window, stride=stride, fill=fill,
                               batch_size=batch_size)
            return result.heatmap, result
        if method == "kernel_shap":
            values = kernel_shap(model, images, t, feature_mask=cells, baseline=fill,
                                 n_samples=shap_samples, seed=seed, batch_size=batch_size)
            return values[:, 0], None
        if method == "saliency":
            return saliency(model, images, t), None
        if method == "smoothgrad":
            return smooth_grad(model, images, t, n_samples=n_samples, sigma=sigma, seed=seed,
                               batch_size=batch_size), None
        if method == "integrated":
            return integrated_gradients(model, images, t, baseline=fill, n_steps=n_steps,
                                        batch_size=batch_size), None
        if method == "deeplift":
            return deep_lift(model, images, t, baseline=fill), None
        if method == "lrp":
            return lrp(model, images, t, rules=_lrp_rules(model, images),
                       fold_batchnorm=True), None
        if method == "guided":
            return guided_backprop(model, images, t), None
        if method == "gradcam":
            return grad_cam(model, images, t, layer), None
        return guided_grad_cam(model, images, t, layer), None

    maps, occluded = OrderedDict(), None
    for method in methods:
        maps[method], result = run(method, batch, targets)
        if method == "occlusion":
            occluded = result
    trust = _trust(model, batch, targets, maps, occluded, run, cells, fill, seed) \
        if metrics else None
    if classes is None:
        classes = (getattr(model, "metadata", None) or {}).get("classes")
    settings = {"window": window, "stride": stride,
                "fill": "background" if np.ndim(fill) else fill, "n_samples": n_samples,
                "sigma": sigma, "seed": seed, "n_steps": n_steps, "lrp_gamma": LRP_GAMMA,
                "shap_samples": shap_samples}
    explanations = []
    for i in range(n):
        image_maps = OrderedDict((m, v[i]) for m, v in maps.items())
        image_settings = dict(settings)
        if occluded is not None:
            # a saturated probability (a confident model) hardly moves (drops of 1e-9):
            # show how the logit falls instead
            if float(to_host(abs(occluded.drop[i]).max())) < OCCLUSION_MIN_DROP:
                image_maps["occlusion"] = occluded.logit_heatmap[i]
                image_settings["occlusion_score"] = "logit"
            else:
                image_settings["occlusion_score"] = "probability"
        if display is None:
            shown = display_image(batch[i])
        else:
            shown = display_image(display if single else display[i])
        explanations.append(Explanation(
            image=batch[i], display=shown, probabilities=probabilities[i],
            predicted=int(predicted[i]), target=int(targets[i]), maps=image_maps,
            occlusion=None if occluded is None else _occlusion_row(occluded, i),
            classes=None if classes is None else list(classes),
            label=None if labels is None or labels[i] is None else int(labels[i]),
            layer=layer if uses_cam else None,
            name="" if names is None else str(names if single else names[i]),
            settings=image_settings,
            metrics=None if trust is None else OrderedDict(
                (m, {k: float(v[i]) for k, v in values.items()})
                for m, values in trust.items())))
    return explanations[0] if single else explanations


def _trust(model, batch, targets, maps, occluded, run, cells, fill, seed):
    """explain's metrics: method -> {"unexplained": (N,), "sensitivity": (N,)} (host)."""
    xp = B.array_module(batch)
    out = OrderedDict()

    def map_of(method):
        def fn(model_, images, t):
            heat, result = run(method, images, t)
            return heat if result is None else result.logit_heatmap  # the logit's, as scored
        return fn

    for method, heat in maps.items():
        if method in LOCAL_METHODS:
            infid = unexplained_share(model, batch, heat, targets, stdev=INFIDELITY_NOISE,
                                      n_samples=INFIDELITY_SAMPLES, seed=seed)
        else:
            a = heat
            if method == "occlusion":
                a = occluded.logit_heatmap
            elif method == "kernel_shap":  # a cell's value on each of its elements: share it
                sizes = np.bincount(cells.ravel())[cells] * batch.shape[1]
                a = heat / xp.asarray(sizes, np.float32)
            infid = unexplained_share(model, batch, a, targets, perturb="subset",
                                      feature_mask=cells, baseline=fill,
                                      n_samples=INFIDELITY_SAMPLES, seed=seed)
        sens = sensitivity_max(map_of(method), model, batch, targets, radius=SENSITIVITY_RADIUS,
                               n_samples=SENSITIVITY_SAMPLES, seed=seed)
        out[method] = {"unexplained": to_host(infid), "sensitivity": to_host(sens)}
    return out


def _cells(size, window):
    """Feature ids of the window-sized cells tiling an image of ``size`` (H, W), the
    last row and column of cells clipped at the edges."""
    wh, ww = B.pair(window, "explain: window")
    if wh < 1 or ww < 1:
        raise ValueError(f"explain: window must be >= 1, got {window}")
    h, w = size
    return (np.arange(h)[:, None] // wh) * (-(-w // ww)) + np.arange(w)[None, :] // ww


def _lrp_rules(model, batch):
    """The composite explain's LRP uses: the pixel range from the model's metadata,
    or the batch's range when the metadata has none."""
    try:
        return lrp_composite(model, gamma=LRP_GAMMA)
    except ValueError:
        if getattr(model, "metadata", None) and "mean" in model.metadata:
            raise
        low, high = float(to_host(batch.min())), float(to_host(batch.max()))
        return lrp_composite(model, low, high, gamma=LRP_GAMMA)


def _background(batch):
    """Each image filled with the median of its border pixels, per channel (N, C, H, W)."""
    xp = B.array_module(batch)
    border = xp.concatenate([batch[:, :, 0], batch[:, :, -1], batch[:, :, :, 0],
                             batch[:, :, :, -1]], axis=2)
    return xp.broadcast_to(xp.median(border, axis=2)[:, :, None, None], batch.shape)


def _occlusion_row(result, i):
    values = {}
    for name in OcclusionResult.__dataclass_fields__:
        value = getattr(result, name)
        values[name] = value if name in ("window", "stride", "positions") else value[i]
    return OcclusionResult(**values)


# ---------------------------------------------------------------- the HTML report

_CAPTIONS = {
    "occlusion": "How much the {score} of <b>{target}</b> falls when a {window} patch "
                 "(filled with: {fill}) hides each place, averaged over the windows covering "
                 "a pixel. Red: hiding it lowers the score (evidence for the class); blue: "
                 "raises it.",
    "kernel_shap": "Kernel SHAP (Lundberg and Lee): the Shapley value of each {window} cell, "
                   "estimated by a linear fit of the <b>{target}</b> logit over "
                   "{shap_samples} copies with some cells the image's and the others the "
                   "baseline's (filled with: {fill}): each cell's share of how much higher "
                   "the logit is on the image than on the baseline (the shares add up to "
                   "it). Red: the cell raises the score.",
    "saliency": "Largest |d score / d pixel| over channels (Simonyan et al.): where a small "
                "change of the pixel moves the <b>{target}</b> logit most.",
    "smoothgrad": "Saliency averaged over {n_samples} copies with Gaussian noise of "
                  "{sigma_pct}% of the image range (Smilkov et al.): less speckle.",
    "integrated": "Integrated gradients (Sundararajan et al.): the gradient averaged along "
                  "the straight path from the baseline (filled with: {fill}) to the image "
                  "({n_steps} steps), times their difference: each pixel's share of how much "
                  "higher the <b>{target}</b> logit is on the image than on the baseline (the "
                  "shares add up to it). Red: the pixel raises the score.",
    "deeplift": "DeepLIFT (Shrikumar et al.), rescale rule: each pixel's share of how much "
                "higher the <b>{target}</b> logit is on the image than on the baseline "
                "(filled with: {fill}), passed back through each ReLU and max-pool by the "
                "ratio of its output's to its input's change instead of its slope. The shares "
                "add up to the difference exactly. Red: the pixel raises the score.",
    "lrp": "Layer-wise relevance propagation (Bach et al.): the <b>{target}</b> logit "
           "handed back layer by layer, each layer sharing its relevance among its inputs "
           "in proportion to their contributions (Montavon et al.'s rules: z-box for the "
           "pixels, gamma = {lrp_gamma} for the other conv layers, which favours positive "
           "contributions, epsilon for the hidden fc layers; batch norm merged into the conv "
           "before it). Red: relevant for the class.",
    "guided": "Guided backpropagation (Springenberg et al.): the gradient passed back only "
              "through ReLUs whose input and gradient are both positive. Red: brightening the "
              "pixel raises the score.",
    "gradcam": "Grad-CAM (Selvaraju et al.) on {layer}: its feature maps weighted by the mean "
               "gradient of the score, rectified and upsampled: where the class's evidence "
               "lies.",
    "guided_gradcam": "Guided backpropagation times Grad-CAM: fine detail, only inside the "
                      "regions Grad-CAM selects.",
}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 76em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-top: 1px solid #ccc;
  padding-top: 1em; }
.meta { color: #555; font-size: 0.9em; }
.top { display: flex; gap: 2em; align-items: flex-start; flex-wrap: wrap; }
.grid { display: flex; flex-wrap: wrap; gap: 1em; margin-top: 1em; }
figure { margin: 0; width: 20em; } figure img { width: 100%; }
figcaption { font-size: 0.85em; color: #444; }
table.probs { border-collapse: collapse; font-size: 0.9em; }
table.probs td { padding: 0.15em 0.5em; }
.bar { background: #4a7fc1; height: 0.8em; display: inline-block; }
tr.target .bar { background: #d0423a; } tr.target td { font-weight: bold; }
.wrong { color: #c0392b; font-weight: bold; }
"""


def _data_uri(png):
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _probability_table(explanation):
    p = to_host(explanation.probabilities)
    rows = []
    for k in np.argsort(-p, kind="stable"):
        k = int(k)
        mark = " (true)" if explanation.label == k else ""
        rows.append(f'<tr class="{"target" if k == explanation.target else ""}">'
                    f"<td>{html.escape(class_name(explanation, k))}{mark}</td>"
                    f'<td style="text-align:right">{100 * p[k]:.2f}%</td>'
                    f'<td><span class="bar" style="width:{max(p[k] * 12, 0.05):.2f}em"></span>'
                    f"</td></tr>")
    return '<table class="probs">' + "".join(rows) + "</table>"


def _metrics_table(explanation):
    """The report's table of how far to trust each map (explain(metrics=True))."""
    rows = "".join(
        f"<tr><td>{html.escape(m)}</td>"
        f'<td style="text-align:right">{_percent(v["unexplained"])}</td>'
        f'<td style="text-align:right">{v["sensitivity"]:.3f}</td>'
        f"<td>{'noise' if m in LOCAL_METHODS else 'cells removed'}</td></tr>"
        for m, v in explanation.metrics.items())
    return (f'<div><p>How far to trust each map (lower is better):</p>'
            f'<table class="probs"><tr><th>method</th><th>unexplained</th><th>sensitivity</th>'
            f"<th>perturbed by</th></tr>{rows}</table>"
            f'<p class="meta">Unexplained: the share of how the {_SCORE} moves when the '
            f"input is perturbed (Gaussian noise of {INFIDELITY_NOISE} for the local maps, "
            f"half of the {_window_text(explanation)} cells set to the baseline for the "
            f"others; {INFIDELITY_SAMPLES} draws) that the map, best scaled, does not "
            f"predict (normalized infidelity). Sensitivity: how much the map changes, "
            f"relative to its size, for inputs within {SENSITIVITY_RADIUS} of the image "
            f"(the largest of {SENSITIVITY_SAMPLES}).</p></div>")


_SCORE = "target's logit"


def _percent(share):
    """A share as a percentage; n/a where it is undefined (no perturbation moved the
    score)."""
    return "n/a" if np.isnan(share) else f"{100 * share:.1f}%"


def _window_text(explanation):
    window = explanation.settings.get("window", 4)
    return f"{window}x{window}" if np.ndim(window) == 0 else "x".join(map(str, window))


def _caption(explanation, method):
    s = explanation.settings
    window = _window_text(explanation)
    return _CAPTIONS.get(method, "").format(
        target=html.escape(class_name(explanation, explanation.target)), window=window,
        fill=s.get("fill", 0.0), score=s.get("occlusion_score", "probability"),
        n_samples=s.get("n_samples"), n_steps=s.get("n_steps"),
        shap_samples=s.get("shap_samples"),
        sigma_pct=round(100 * float(s.get("sigma", 0))), lrp_gamma=s.get("lrp_gamma", LRP_GAMMA),
        layer=html.escape(str(explanation.layer)))


def _stem(explanation, index):
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in explanation.name)
    return f"{index:02d}_{safe}" if safe else f"{index:02d}"


def write_report(explanations, out_dir, *, title="fastcnn: what the network looks at",
                 description="", filename="report.html"):
    """Write each explanation's pictures as PNGs (input, one per method, the side-by-side
    panel) into ``out_dir`` and one self-contained HTML page (every picture inlined)
    showing the input, the predicted probabilities and every method's map. Returns
    the HTML file's path."""
    if isinstance(explanations, Explanation):
        explanations = [explanations]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for index, e in enumerate(explanations):
        stem = _stem(e, index)
        pictures = [("input", plot_input(e))]
        for method, heat in e.maps.items():
            pictures.append((method, plot_heatmap(e.display, heat, overlay=method in OVERLAID,
                                                  title=method_title(e, method))))
        pictures.append(("panel", plot_explanation(e)))
        uris = {}
        for kind, fig in pictures:
            png = figure_png(fig)
            (out / f"{stem}_{kind}.png").write_bytes(png)
            uris[kind] = _data_uri(png)
        pred = html.escape(class_name(e, e.predicted))
        p = to_host(e.probabilities)
        heading = f"{html.escape(e.name) + ': ' if e.name else ''}predicted {pred} " \
                  f"({100 * float(p[e.predicted]):.1f}%)"
        if e.label is not None:
            truth = html.escape(class_name(e, e.label))
            heading += f", true {truth}" + (' <span class="wrong">(wrong)</span>'
                                            if e.label != e.predicted else "")
        explained = html.escape(class_name(e, e.target))
        figures = "".join(
            f'<figure><img src="{uris[m]}" alt="{html.escape(METHOD_TITLES.get(m, m))}">'
            f"<figcaption>{_caption(e, m)}</figcaption></figure>" for m in e.maps)
        sections.append(
            f"<h2>{heading}</h2>"
            f'<div class="top"><figure><img src="{uris["input"]}" alt="input"></figure>'
            f"<div><p>Class probabilities (explaining <b>{explained}</b>):</p>"
            f"{_probability_table(e)}</div>"
            f"{_metrics_table(e) if e.metrics else ''}</div>"
            f'<div class="grid">{figures}</div>'
            f'<details><summary>All maps side by side</summary>'
            f'<img style="max-width:100%" src="{uris["panel"]}" alt="panel"></details>')
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>"
            f'<p class="meta">{html.escape(description)} Written by fastcnn on {stamp}.</p>'
            + "".join(sections) + "</body></html>")
    path = out / filename
    path.write_text(page, encoding="utf-8")
    return path


def demo_report(model, dataset, out_dir, count=4, candidates=1000, **options):
    """Explain ``count`` test images of ``dataset`` (a fastcnn.data.Dataset): the first
    correctly classified ones of different classes and the first misclassified one;
    write the report into ``out_dir``. Returns the HTML file's path."""
    from ..train import predict

    subset = dataset[:min(candidates, len(dataset))]
    predicted = to_host(predict(model, subset)).argmax(axis=1)
    wrong = np.flatnonzero(predicted != subset.labels)
    chosen, seen = [], set()
    for i in np.flatnonzero(predicted == subset.labels):
        if len(chosen) >= count - (1 if len(wrong) else 0):
            break
        if subset.labels[i] not in seen:
            chosen.append(int(i))
            seen.add(subset.labels[i])
    if len(wrong):
        chosen.append(int(wrong[0]))
    images = subset.images[chosen]
    x = standardised(model, images, dataset.mean, dataset.std)
    explanations = explain(model, x, classes=list(dataset.classes), labels=subset.labels[chosen],
                           display=images[:, 0] if images.shape[1] == 1 else
                           images.transpose(0, 2, 3, 1),
                           names=[f"test:{i}" for i in chosen], **options)
    note = " The last one is misclassified." if len(wrong) else ""
    return write_report(explanations, out_dir,
                        description=f"{len(chosen)} images of the {dataset.name or 'test'} "
                                    f"set.{note}")


# ---------------------------------------------------------------- fastcnn explain

def add_cli_arguments(parser):
    """The arguments of ``fastcnn explain``."""
    parser.add_argument("model", help="a model file saved by fastcnn (e.g. fastcnn-demo/model.npz)")
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="a PNG/JPEG file, or test:INDEX for image INDEX of the test set "
                             "(Fashion-MNIST, or the IDX set in --data)")
    parser.add_argument("--method", choices=list(METHODS) + ["all"], default="all",
                        help="the method to run (default: %(default)s)")
    parser.add_argument("--target", metavar="C",
                        help="the class to explain, an index or a class name (default: the "
                             "predicted class)")
    parser.add_argument("--out", metavar="DIR", default="fastcnn-explain",
                        help="output folder for the PNGs and report.html (default: %(default)s)")
    parser.add_argument("--layer", help="Grad-CAM layer, a name or an index (default: the last "
                                        "conv block's output)")
    parser.add_argument("--window", type=int, default=4,
                        help="occlusion window size in pixels (default: %(default)s)")
    parser.add_argument("--stride", type=int, default=1,
                        help="occlusion stride in pixels (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=50, metavar="N",
                        help="integrated gradients' steps along the path (default: "
                             "%(default)s)")
    parser.add_argument("--shap-samples", type=int, default=400, metavar="N",
                        help="Kernel SHAP's scored copies (cells of the occlusion window's "
                             "size; default: %(default)s)")
    parser.add_argument("--metrics", action="store_true",
                        help="also measure how far to trust each map: the share of the "
                             "score's changes under perturbations it leaves unexplained "
                             "(normalized infidelity) and its sensitivity to small changes of "
                             "the input (runs each method again on nearby copies)")
    from ..cli import add_image_options

    add_image_options(parser, "folder with the MNIST-format IDX set for test:INDEX (default: "
                              "Fashion-MNIST from $FASTCNN_DATA or Debian's package)")


def _resolve_class(text, classes, count):
    if text is None:
        return None
    if text.lstrip("-").isdigit():
        k = int(text)
    elif classes and text in classes:
        k = list(classes).index(text)
    else:
        raise ValueError(f"--target {text!r} is neither a class index nor a class name "
                         f"({', '.join(classes or [])})")
    if not 0 <= k < count:
        raise ValueError(f"--target {k} is out of range: the model has {count} classes")
    return k


def standardised(model, images, mean, std):
    """uint8 images (N, C, H, W) standardised per channel, on the model's device."""
    x = F.normalize(images, mean, std, dim=-3)
    if model.device != "cpu":
        import cupy

        x = cupy.asarray(x)
    return x


def cli_test_set(args, meta):
    """The test set ``test:`` images come from (Fashion-MNIST, or the IDX set in
    ``args.data``), and ``meta`` (a model's metadata) completed from it where it lacks
    the standardisation, the class names or the input shape."""
    from .. import data

    test_set = (data.load_idx_dataset(data.find_data_dir(args.data))[1] if args.data
                else data.load_fashion_mnist()[1])
    for key, value in (("mean", test_set.mean), ("std", test_set.std),
                       ("classes", test_set.classes),
                       ("input_shape", list(test_set.image_shape))):
        meta.setdefault(key, list(value))
    return test_set


def load_cli_images(args, model, specs=None):
    """The images a command names (``specs``, default ``args.images``: PNG/JPEG files,
    fitted to the model as ``fastcnn predict`` does with ``args.invert``, or test:INDEX
    from the test set of ``args.data``): (uint8 batch, standardised batch on the model's device, true labels
    (None for pictures), names, the model's metadata completed from the test set)."""
    from ..cli import CommandError, load_image

    meta = dict(getattr(model, "metadata", None) or {})
    specs = args.images if specs is None else specs
    # the test set first: it completes the metadata pictures are fitted with
    test_set = cli_test_set(args, meta) if any(s.startswith("test:") for s in specs) else None
    images, labels, names = [], [], []
    for spec in specs:
        if spec.startswith("test:"):
            try:
                index = int(spec[5:])
            except ValueError:
                raise CommandError(f"{spec}: expected test:INDEX with an integer INDEX") from None
            if not 0 <= index < len(test_set):
                raise CommandError(f"{spec}: the test set has {len(test_set)} images "
                                   f"(0 to {len(test_set) - 1})")
            image, label = test_set[index]
            images.append(image)
            labels.append(label)
        else:
            if "input_shape" not in meta:
                raise CommandError(f"{args.model}: the model's metadata has no input_shape, "
                                   f"so a picture cannot be fitted to it; use test:INDEX")
            images.append(load_image(spec, meta["input_shape"], args.invert))
            labels.append(None)
            spec = Path(spec).name
        names.append(spec)
    missing = [k for k in ("mean", "std") if k not in meta]
    if missing:
        raise CommandError(f"{args.model}: the model's metadata lacks {missing} (the input "
                           f"standardisation); save it with fastcnn.io.save(model, path, "
                           f"metadata={{'mean': [...], 'std': [...], ...}})")
    shapes = {tuple(a.shape) for a in images}
    if shapes != {tuple(meta.get("input_shape", images[0].shape))}:
        raise CommandError(f"image shapes {sorted(shapes)} do not match the model's input "
                           f"{meta.get('input_shape')}")
    batch = np.stack(images)
    return batch, standardised(model, batch, meta["mean"], meta["std"]), labels, names, meta


def run_cli(args):
    """``fastcnn explain``: load the model and images, explain, write the report."""
    import fastcnn

    from ..cli import CommandError, layer_arg, load_cli_model

    for option, value in (("--window", args.window), ("--stride", args.stride),
                          ("--steps", args.steps)):
        if value < 1:
            raise CommandError(f"{option} must be >= 1, got {value}")
    if args.threads is not None:
        if args.threads < 1:
            raise CommandError(f"--threads must be >= 1, got {args.threads}")
        fastcnn.set_num_threads(args.threads)
    model = load_cli_model(args)
    batch, x, labels, names, meta = load_cli_images(args, model)
    classes = meta.get("classes")
    try:
        num_classes = feature_maps(model, x[:1], layer=-1).shape[-1]
        target = _resolve_class(args.target, classes, num_classes)
        methods = "all" if args.method == "all" else [args.method]
        explanations = explain(
            model, x, target, methods=methods, classes=classes, labels=labels,
            display=batch[:, 0] if batch.shape[1] == 1 else batch.transpose(0, 2, 3, 1),
            names=names, window=args.window, stride=args.stride, n_steps=args.steps,
            shap_samples=args.shap_samples, layer=layer_arg(args.layer),
            metrics=args.metrics)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    for e in explanations:
        p = to_host(e.probabilities)
        line = f"{e.name}: predicted {class_name(e, e.predicted)} ({100 * p[e.predicted]:.1f}%)"
        if e.label is not None:
            line += f", true {class_name(e, e.label)}"
        print(line)
        if e.metrics:
            width = max(len("method"), *map(len, e.metrics)) + 2
            print(f"  {'method':<{width}}{'unexplained':>11}{'sensitivity':>13}  perturbed by")
            for m, v in e.metrics.items():
                print(f"  {m:<{width}}{_percent(v['unexplained']):>11}"
                      f"{v['sensitivity']:>13.3f}  "
                      f"{'noise' if m in LOCAL_METHODS else 'cells removed'}")
    path = write_report(explanations, args.out,
                        description=f"Model {args.model}; images {', '.join(args.images)}.")
    print(f"wrote {path} and {sum(len(e.maps) + 2 for e in explanations)} PNGs in {args.out}")
    return 0
