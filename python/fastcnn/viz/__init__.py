"""fastcnn.viz: see what a network learned. Arrays first, pictures second.

Arrays (NumPy, or CuPy for a model on the GPU; one image (C, H, W) or a batch):

>>> from fastcnn import viz
>>> viz.saliency(model, x)                       # max_c |d logit / d x|, (H, W)
>>> viz.guided_backprop(model, x, layer="relu2", channel=5, position="max")
>>> viz.integrated_gradients(model, x, baseline=0.0, n_steps=50)   # shaped like x
>>> viz.deep_lift(model, x, baseline=0.0)       # shaped like x, sums to the logit change
>>> viz.lrp(model, x)                            # relevance, shaped like x, sums to the logit
>>> viz.lrp(model, x, rules=viz.lrp_composite(model), fold_batchnorm=True)   # z-box, gamma, eps
>>> viz.layer_lrp(model, x, "relu2")           # the relevance at a layer, shaped like it
>>> viz.grad_cam(model, x, layer="relu2")        # (H, W), upsampled
>>> viz.layer_conductance(model, x, "relu2")      # each unit's share, shaped like the layer
>>> viz.internal_influence(model, x, "relu2")     # its gradient integrated along the path
>>> viz.neuron_conductance(model, x, "relu2", 5, position=(3, 4))   # IG through one unit
>>> viz.layer_gradient_shap(model, x, "relu2", refs)   # expected gradients, to the layer
>>> viz.layer_deep_lift(model, x, "relu2")        # DeepLIFT to the layer, sums to the change
>>> viz.layer_deep_lift_shap(model, x, "relu2", refs)   # averaged over reference images
>>> r = viz.occlusion(model, x, window=4, stride=1, batch_size=625)
>>> r.heatmap, r.probability, r.predicted        # (H, W), (PH, PW), (PH, PW)
>>> viz.feature_ablation(model, x, feature_mask=segments)   # any regions, shaped like x
>>> viz.feature_permutation(model, x, feature_mask=segments)   # regions shuffled in the batch
>>> viz.layer_feature_ablation(model, x, "relu2", layer_mask=np.arange(64)[:, None, None])
>>> viz.shapley_values(model, x, feature_mask=segments)     # exact, sums to the score change
>>> viz.shapley_value_sampling(model, x, feature_mask=segments, n_samples=25)
>>> viz.kernel_shap(model, x, feature_mask=segments, n_samples=200)   # regression estimate
>>> viz.lime(model, x, feature_mask=segments, n_samples=200)          # weighted lasso
>>> viz.feature_maps(model, x, "relu1")          # (32, 28, 28)
>>> viz.channel_importance(model, x, "relu2")    # (64,): the logit's drop per channel off
>>> viz.maximize_activation(model, "relu2", [0, 5]).images   # what units respond to most
>>> viz.infidelity(model, x, viz.gradient(model, x))        # (N,): does I.a predict the change?
>>> viz.sensitivity_max("integrated_gradients", model, x)   # (N,): how much e(x) moves nearby
>>> viz.tcav(model, trousers, "relu2", stripes, random_images).score   # concept sensitivity

Pictures (matplotlib on the Agg canvas) and the HTML report:

>>> viz.plot_heatmap(image, r.heatmap, path="occlusion.png")
>>> e = viz.explain(model, x, classes=classes)   # every method, as arrays
>>> viz.plot_explanation(e, path="panel.png")
>>> viz.write_report([e], "out")                 # out/report.html, images inlined
"""

from .attribution import (OcclusionResult, deconvolution, gradient, grad_cam, gradient_shap,
                          guided_backprop, guided_grad_cam, input_x_gradient,
                          integrated_gradients, layer_integrated_gradients, occlusion,
                          saliency, smooth_grad, upsample_bilinear)
from .ablation import (feature_ablation, feature_permutation, layer_feature_ablation,
                       layer_feature_permutation, shapley_value_sampling, shapley_values)
from .surrogate import kernel_shap, lime
from .deeplift import deep_lift, deep_lift_shap, layer_deep_lift, layer_deep_lift_shap
from .layer import (internal_influence, layer_conductance, layer_gradient_shap,
                    layer_gradient_x_activation, neuron_conductance)
from .lrp import (Alpha1Beta0Rule, EpsilonRule, GammaRule, IdentityRule, ZBoxRule, layer_lrp,
                  lrp, lrp_composite)
from .features import conv_layers, feature_maps, filter_images, filters
from .channels import (CHANNEL_METHODS, channel_importance, class_channel_importance,
                       plot_channels, plot_class_channels)
from .maximize import MaximizedActivation, maximize_activation
from .concepts import CLASSIFIERS, ConceptVector, TCAVResult, concept_vector, tcav
from .metrics import (PERTURBATIONS, SENSITIVITY_METHODS, infidelity, sensitivity_max,
                      unexplained_share)
from .plot import (plot_explanation, plot_feature_maps, plot_filters, plot_heatmap,
                   plot_maximized)
from .report import METHODS, Explanation, demo_report, explain, write_report

__all__ = ["gradient", "saliency", "guided_backprop", "deconvolution", "input_x_gradient",
           "integrated_gradients", "layer_integrated_gradients", "layer_conductance",
           "layer_gradient_x_activation", "internal_influence", "layer_gradient_shap",
           "neuron_conductance",
           "layer_deep_lift", "layer_deep_lift_shap", "deep_lift", "deep_lift_shap", "lrp",
           "layer_lrp", "lrp_composite",
           "EpsilonRule", "GammaRule", "Alpha1Beta0Rule", "ZBoxRule", "IdentityRule",
           "gradient_shap", "grad_cam",
           "guided_grad_cam", "smooth_grad", "occlusion", "feature_ablation",
           "layer_feature_ablation", "layer_feature_permutation",
           "feature_permutation", "shapley_values",
           "shapley_value_sampling", "kernel_shap", "lime", "OcclusionResult",
           "upsample_bilinear", "feature_maps", "channel_importance", "plot_channels",
           "class_channel_importance", "plot_class_channels",
           "CHANNEL_METHODS", "conv_layers", "filters", "filter_images",
           "maximize_activation", "MaximizedActivation", "plot_heatmap", "plot_feature_maps",
           "plot_filters", "plot_explanation", "plot_maximized", "METHODS", "Explanation",
           "explain", "write_report", "demo_report", "infidelity", "sensitivity_max",
           "unexplained_share", "tcav", "concept_vector", "ConceptVector", "TCAVResult",
           "CLASSIFIERS",
           "PERTURBATIONS", "SENSITIVITY_METHODS"]
