"""Optimizers (SGD, Adam, AdamW) and learning-rate schedules.

The update rules are PyTorch's, computed in place on the parameters' float32
arrays: in one pass per parameter on the CPU (fastcnn._cpu), in one launch for
all of a group's parameters on the GPU (fastcnn._cuda's multi-tensor
updates), with the same bits as the NumPy (or CuPy) expressions written out
below, which remain the fallback for other arrays. ``state_dict()`` holds
everything needed to resume; parameters are referred to by their position in
the optimizer's parameter list.

The schedulers are torch.optim.lr_scheduler's, with torch's names, arguments,
values and state_dict keys: each ``step()`` derives the new lr from the group's
current ``group["lr"]`` (torch's chainable form), so a manual change of the lr
persists and two schedulers on one optimizer combine.
"""

import math
import numbers
import types
from bisect import bisect_right
from collections import Counter

import numpy as np

from . import _backend as B
from . import _cpu
from . import capture
from .nn.module import Parameter, _array_module, _touch

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "build_optimizer", "LRScheduler", "LambdaLR",
           "MultiplicativeLR", "StepLR", "MultiStepLR", "ConstantLR", "LinearLR",
           "ExponentialLR", "CosineAnnealingLR", "OneCycleLR", "SequentialLR",
           "ChainedScheduler", "ReduceLROnPlateau"]

# Every option a fastcnn optimizer has: a saved group holding one that this
# optimizer lacks is another optimizer's state (other keys, "name", "initial_lr",
# are the user's or a scheduler's and travel with the group).
_OPTIONS = frozenset({"lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize",
                      "betas", "eps", "amsgrad"})


def _number(owner, name, value):
    """``value`` when it is a real number (not a bool); else a TypeError naming it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a number, got {value!r}")
    return value


def _at_least(owner, name, value, low=0.0):
    """``value`` as a float when it is a number >= low; else TypeError / ValueError."""
    if not _number(owner, name, value) >= low:
        raise ValueError(f"{owner}: {name} must be >= {low}, got {value!r}")
    return float(value)


def _integer(owner, name, value, low=None):
    """``value`` as an int when it is an integer (not a bool) >= low."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{owner}: {name} must be >= {low}, got {value!r}")
    return int(value)


def _ascent(grad, group):
    """The gradient an update descends: negated for ``maximize`` (a new array; the
    parameter's own gradient is left as it is, as in torch)."""
    return -grad if group.get("maximize") else grad


def _fused_cpu(*arrays):
    """Whether the one-pass CPU update applies: NumPy float32 arrays, C-contiguous."""
    return all(type(a) is np.ndarray and a.dtype == np.float32 and a.flags.c_contiguous
               and a.shape == arrays[0].shape for a in arrays)


def _fused_cuda(params):
    """fastcnn._cuda when the multi-tensor GPU update applies to every (parameter,
    gradient) pair: CuPy float32 arrays, C-contiguous, matching shapes; else None."""
    for p in params:
        for a in (p.data, p.grad):
            if not (type(a).__module__.startswith("cupy") and a.dtype == np.float32
                    and a.flags.c_contiguous and a.shape == p.data.shape):
                return None
    try:
        return B._cuda_kernels()[1]
    except TypeError:  # CuPy arrays but no CUDA module: the CuPy expressions below
        return None


class Optimizer:
    """Base class: parameter groups, per-parameter state, zero_grad and state_dict.

    params: an iterable of Parameters, or of dicts ``{"params": [...], **options}``
    (parameter groups, each overriding the defaults, e.g. no weight decay for
    biases). As in torch, a group keeps keys that are not options (a ``"name"``,
    a scheduler's ``"initial_lr"``), so an optimizer can be rebuilt from another's
    ``param_groups``.
    """

    def __init__(self, params, defaults):
        name = type(self).__name__
        if isinstance(params, Parameter):
            raise TypeError(f"{name}: params must be an iterable of Parameters or of dicts "
                            f"(parameter groups), got a single Parameter; pass [param]")
        if isinstance(params, (dict, set, frozenset)):
            raise TypeError(f"{name}: params must be a list of Parameters or of dicts "
                            f"(parameter groups), got a {type(params).__name__}")
        try:
            params = list(params)
        except TypeError:
            raise TypeError(f"{name}: params must be an iterable of Parameters or of dicts, "
                            f"got {type(params).__name__}") from None
        if not params:
            raise ValueError(f"{name}: got an empty parameter list")
        self.defaults = self._check_options(dict(defaults))
        self.param_groups = []
        self.state = {}  # position in the flat parameter list -> {name: array or number}
        for group in params if isinstance(params[0], dict) else [{"params": params}]:
            self.add_param_group(group)

    def add_param_group(self, param_group):
        """Append a parameter group, as torch's: ``{"params": Parameters, **options}``,
        the options it lacks taken from the defaults, other keys kept. The new
        parameters' state positions follow the existing ones'; a parameter may be in
        one group only."""
        name = type(self).__name__
        if not isinstance(param_group, dict) or "params" not in param_group:
            raise TypeError(f"{name}: a parameter group must be a dict with a 'params' entry, "
                            f"got {param_group!r:.80}")
        params = param_group["params"]
        if isinstance(params, Parameter):
            params = [params]
        elif isinstance(params, (set, frozenset)):
            raise TypeError(f"{name}: a group's params must be an ordered collection (the "
                            f"state refers to parameters by position), got a set")
        else:
            try:
                params = list(params)
            except TypeError:
                raise TypeError(f"{name}: a group's params must be an iterable of Parameters, "
                                f"got {type(params).__name__}") from None
        for p in params:
            if not isinstance(p, Parameter):
                raise TypeError(f"{name}: expected Parameters, got {type(p).__name__}")
        seen = {id(p) for group in self.param_groups for p in group["params"]}
        for p in params:
            if id(p) in seen:
                raise ValueError(f"{name}: a parameter appears more than once (in one group or "
                                 f"in more than one group)")
            seen.add(id(p))
        group = {**self.defaults, **param_group, "params": params}
        self.param_groups.append(self._check_options(group))

    def _check_options(self, group):
        """``group`` with its options checked (TypeError / ValueError naming the option)
        and made plain floats and bools."""
        name = type(self).__name__
        group["lr"] = _at_least(name, "lr", group["lr"])
        group["weight_decay"] = _at_least(name, "weight_decay", group["weight_decay"])
        group["maximize"] = bool(group["maximize"])
        return group

    def zero_grad(self, set_to_none=True):
        """Reset every parameter's gradient: to None (set_to_none, the default, as torch;
        the next backward pass makes new arrays) or to zeros in place (the arrays kept)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or set_to_none:
                    p.grad = None
                elif getattr(p.grad.flags, "writeable", True):
                    p.grad.fill(0)
                else:  # a read-only array (a broadcast view): zeros of its own
                    p.grad = _array_module(p.grad).zeros_like(p.grad)

    def _indexed_params(self):
        i = 0
        for group in self.param_groups:
            for p in group["params"]:
                yield i, p, group
                i += 1

    def step(self):
        """Update every parameter that has a gradient."""
        start = 0
        for group in self.param_groups:
            items = [(start + j, p) for j, p in enumerate(group["params"]) if p.grad is not None]
            start += len(group["params"])
            if items:
                self._step_group(group, items)

    def _step_group(self, group, items):
        """Update one group's parameters that have gradients: (position, Parameter) pairs."""
        kernels = _fused_cuda([p for _, p in items])
        if kernels is not None:
            self._update_cuda(kernels, group, [(p, self.state.setdefault(i, {}))
                                               for i, p in items])
            return
        for i, p in items:
            self._update(p, self.state.setdefault(i, {}), group)

    def _update(self, param, state, group):
        raise NotImplementedError

    def _update_cuda(self, kernels, group, items):
        """The GPU update of (Parameter, state) pairs in one call (default: one by one)."""
        for p, state in items:
            self._update(p, state, group)

    def state_dict(self):
        """{"state": {position: {name: value}}, "param_groups": [options + "params": positions]}."""
        groups, start = [], 0
        for group in self.param_groups:
            options = {k: v for k, v in group.items() if k != "params"}
            options["params"] = list(range(start, start + len(group["params"])))
            start += len(group["params"])
            groups.append(options)
        return {"state": {i: dict(s) for i, s in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore options and per-parameter state (shapes are checked)."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(groups)} parameter groups, "
                             f"this optimizer {len(self.param_groups)}")
        for saved, group in zip(groups, self.param_groups):
            foreign = sorted((set(saved) & _OPTIONS) - set(self.defaults))
            if foreign:  # another optimizer's state (SGD's momentum in an Adam, ...)
                raise ValueError(f"the saved state has options {foreign} that "
                                 f"{type(self).__name__} does not: it is another optimizer's")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"optimizer state has a group of {len(saved['params'])} "
                                 f"parameters where this optimizer has {len(group['params'])}")
        params = [p for group in self.param_groups for p in group["params"]]
        state = {}
        for key, entries in state_dict["state"].items():
            i = int(key)
            if not 0 <= i < len(params):
                raise ValueError(f"optimizer state refers to parameter {i}, "
                                 f"there are {len(params)}")
            xp = _array_module(params[i].data)
            state[i] = {}
            for name, value in entries.items():
                if hasattr(value, "shape") and value.ndim > 0:
                    if tuple(value.shape) != tuple(params[i].shape):
                        raise ValueError(f"optimizer state {name!r} of parameter {i} has shape "
                                         f"{tuple(value.shape)}, the parameter "
                                         f"{tuple(params[i].shape)}")
                    value = xp.array(value, dtype=xp.float32)
                elif hasattr(value, "shape"):
                    value = value.item()
                state[i][name] = value
        for saved, group in zip(groups, self.param_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.state = state
        _touch()  # new state arrays: a captured step (fastcnn.capture) captures again


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, dampening, Nesterov and L2 weight decay.

    As torch.optim.SGD: g = grad + wd * p; buf = momentum * buf + (1 - dampening) * g
    (buf = g on the first step); g = g + momentum * buf (nesterov) or buf; p -= lr * g.
    maximize: ascend (grad negated first). The default lr is torch's (1e-3).
    """

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, maximize=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      maximize=maximize))

    def _check_options(self, group):
        group = super()._check_options(group)
        group["momentum"] = _at_least("SGD", "momentum", group["momentum"])
        group["dampening"] = float(_number("SGD", "dampening", group["dampening"]))
        group["nesterov"] = bool(group["nesterov"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"SGD: Nesterov momentum (nesterov=True) needs momentum > 0 and "
                             f"dampening 0, got momentum={group['momentum']}, "
                             f"dampening={group['dampening']}")
        return group

    def _update(self, param, state, group):
        p, g = param.data, _ascent(param.grad, group)
        xp = _array_module(p)
        wd, momentum = group["weight_decay"], group["momentum"]
        if _fused_cpu(p, g):
            # The same expression in one pass (fastcnn._cpu.sgd_step, same bits).
            buf = state.get("momentum_buffer") if momentum else None
            first = momentum and buf is None
            if first:
                buf = state["momentum_buffer"] = np.empty_like(p)
            _cpu.sgd_step(p, g, buf, group["lr"], momentum, wd, 1.0 - group["dampening"],
                          group["dampening"] != 0, bool(group["nesterov"]), bool(first))
            return
        if wd:
            g = g + xp.float32(wd) * p
        if momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.copy()
            else:
                buf *= xp.float32(momentum)
                buf += g if group["dampening"] == 0 else xp.float32(1 - group["dampening"]) * g
            g = g + xp.float32(momentum) * buf if group["nesterov"] else buf
        p -= xp.float32(group["lr"]) * g

    def _update_cuda(self, kernels, group, items):
        momentum = group["momentum"]
        bufs = firsts = None
        if momentum:
            bufs, firsts = [], []
            for p, state in items:
                buf = state.get("momentum_buffer")
                firsts.append(buf is None)
                if buf is None:
                    buf = state["momentum_buffer"] = _array_module(p.data).empty_like(p.data)
                bufs.append(buf)
        if firsts and any(firsts) and capture.recording() is not None:
            raise capture.CaptureError("SGD: a momentum buffer would be made inside the graph; "
                                       "run an eager step first (warmup)")
        kernels.sgd_step_multi([p.data for p, _ in items],
                               [_ascent(p.grad, group) for p, _ in items], bufs,
                               firsts or [False] * len(items), group["lr"], momentum,
                               group["weight_decay"], 1.0 - group["dampening"],
                               group["dampening"] != 0, bool(group["nesterov"]),
                               scalars=capture.sgd_scalars(group))


class Adam(Optimizer):
    """Adam (Kingma & Ba) as torch.optim.Adam; weight_decay is L2 added to the gradient.

    m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
    amsgrad: v in the denominator replaced by its running maximum (``max_exp_avg_sq``);
    maximize: ascend (grad negated first). With amsgrad the update runs as array
    expressions (not the one-pass kernels), and a training step is not captured as a
    CUDA graph.
    """

    decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, maximize=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize))

    def _check_options(self, group):
        group = super()._check_options(group)
        name, betas = type(self).__name__, group["betas"]
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__"):
            raise TypeError(f"{name}: betas must be a pair of numbers, got {betas!r}")
        if len(betas) != 2:
            raise ValueError(f"{name}: betas must be a pair of numbers, got {betas!r}")
        for i, b in enumerate(betas):
            if not 0 <= _number(name, f"betas[{i}]", b) < 1:
                raise ValueError(f"{name}: betas must be in [0, 1), got betas[{i}]={b!r}")
        group["betas"] = [float(b) for b in betas]
        group["eps"] = _at_least(name, "eps", group["eps"])
        group["amsgrad"] = bool(group["amsgrad"])
        return group

    @staticmethod
    def _init_state(state, p, group):
        xp = _array_module(p)
        state["step"] = 0
        state["exp_avg"], state["exp_avg_sq"] = xp.zeros_like(p), xp.zeros_like(p)
        if group.get("amsgrad"):
            state["max_exp_avg_sq"] = xp.zeros_like(p)

    def _update(self, param, state, group):
        p, g = param.data, _ascent(param.grad, group)
        xp = _array_module(p)
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        amsgrad = group.get("amsgrad", False)
        if not state:
            self._init_state(state, p, group)
        elif amsgrad and "max_exp_avg_sq" not in state:  # switched on after steps without it
            state["max_exp_avg_sq"] = state["exp_avg_sq"].copy()
        state["step"] += 1
        t = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if not amsgrad and _fused_cpu(p, g, m, v):
            # The same expression in one pass (fastcnn._cpu.adam_step, same bits).
            _cpu.adam_step(p, g, m, v, b1, b2, 1 - b1, 1 - b2, eps,
                           wd if wd and not self.decoupled else 0.0,
                           1 - lr * wd if wd and self.decoupled else 1.0,
                           math.sqrt(1 - b2 ** t), lr / (1 - b1 ** t))
            return
        if wd and self.decoupled:
            p *= xp.float32(1 - lr * wd)
        elif wd:
            g = g + xp.float32(wd) * p
        m *= xp.float32(b1)
        m += xp.float32(1 - b1) * g
        v *= xp.float32(b2)
        v += xp.float32(1 - b2) * (g * g)
        if amsgrad:
            v = state["max_exp_avg_sq"]
            xp.maximum(v, state["exp_avg_sq"], out=v)
        denom = xp.sqrt(v)
        denom /= xp.float32(math.sqrt(1 - b2 ** t))
        denom += xp.float32(eps)
        step = m / denom
        step *= xp.float32(lr / (1 - b1 ** t))
        p -= step

    def _update_cuda(self, kernels, group, items):
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if group.get("amsgrad"):
            if capture.recording() is not None:
                raise capture.CaptureError(f"{type(self).__name__}(amsgrad=True) updates "
                                           "through array expressions, not captured")
            for p, state in items:
                self._update(p, state, group)
            return
        grads = [_ascent(p.grad, group) for p, _ in items]
        if capture.recording() is not None:
            # A graph being captured: the step counts advance, and the bias
            # corrections are computed, at every replay (device scalars).
            if not all(state for _, state in items):
                raise capture.CaptureError("Adam: state would be made inside the graph; run an "
                                           "eager step first (warmup)")
            scalars = capture.adam_scalars(group, [s for _, s in items], self.decoupled)
            n = len(items)
            kernels.adam_step_multi([p.data for p, _ in items], grads,
                                    [s["exp_avg"] for _, s in items],
                                    [s["exp_avg_sq"] for _, s in items], b1, b2, 1 - b1, 1 - b2,
                                    eps, wd if wd and not self.decoupled else 0.0,
                                    1 - lr * wd if wd and self.decoupled else 1.0, [1.0] * n,
                                    [0.0] * n, scalars=scalars)
            return
        bias2, steps = [], []
        for p, state in items:
            if not state:
                self._init_state(state, p.data, group)
            state["step"] += 1
            t = state["step"]
            bias2.append(math.sqrt(1 - b2 ** t))
            steps.append(lr / (1 - b1 ** t))
        kernels.adam_step_multi([p.data for p, _ in items], grads,
                                [s["exp_avg"] for _, s in items],
                                [s["exp_avg_sq"] for _, s in items], b1, b2, 1 - b1, 1 - b2,
                                eps, wd if wd and not self.decoupled else 0.0,
                                1 - lr * wd if wd and self.decoupled else 1.0, bias2, steps)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): p *= 1 - lr * wd before
    the Adam step. Default weight_decay 0.01, as torch.optim.AdamW."""

    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 amsgrad=False, maximize=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize)


def build_optimizer(name, params, lr, momentum=0.9, weight_decay=0.0, nesterov=True):
    """An optimizer by name: 'sgd' (momentum, nesterov), 'adam' or 'adamw'."""
    name = name.lower()
    if name == "sgd":
        return SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                   nesterov=nesterov and momentum > 0)
    if name == "adam":
        return Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose sgd, adam or adamw")


# ---------------------------------------------------------------- schedules

# torch's bookkeeping entries in its state_dicts, not part of a schedule's state.
_TORCH_INTERNALS = frozenset({"_is_initial", "_get_lr_called_within_step", "verbose"})


def _check_interval(owner, interval):
    if interval not in ("epoch", "step"):
        raise ValueError(f"{owner}: interval must be 'epoch' or 'step', got {interval!r}")
    return interval


def _per_group(owner, name, optimizer, value):
    """One value per parameter group: a list or tuple of that length, or one value for all."""
    if isinstance(value, (list, tuple)):
        if len(value) != len(optimizer.param_groups):
            raise ValueError(f"{owner}: {name} must have one value per parameter group "
                             f"({len(optimizer.param_groups)}), got {len(value)}")
        return list(value)
    return [value] * len(optimizer.param_groups)


class LRScheduler:
    """Base class of the schedulers: torch.optim.lr_scheduler.LRScheduler's protocol.

    ``step()`` advances ``last_epoch`` by one and sets each group's lr to
    ``get_lr()``, which (as torch's chainable form) derives it from the group's
    current lr: a manual change of ``group["lr"]`` persists, and two schedulers
    stepped on one optimizer combine. ``step(epoch)`` jumps to ``epoch`` through
    the closed form ``_get_closed_form_lr()`` where the scheduler has one. The
    constructor makes the first step (epoch 0): with last_epoch=-1 it records each
    group's lr as ``initial_lr`` (the ``base_lrs``); another last_epoch resumes,
    and needs ``initial_lr`` in every group, as torch.

    interval (keyword only, fastcnn's): 'epoch' or 'step', whether
    ``fastcnn.train.Trainer`` steps the scheduler once per epoch or once per batch.

    ``state_dict()`` holds the progress under torch's keys (last_epoch, base_lrs,
    _step_count, _last_lr, ...) and the scheduler's type, not its arguments, so a
    run may resume with a longer schedule (``fastcnn train --resume`` with more
    epochs); ``load_state_dict`` also takes torch's state_dict, whose arguments
    (T_max, gamma, ...) it restores as torch does, and fastcnn's older
    ``{"type", "last_step", "base_lrs"}``.
    """

    _is_initial = False
    _state = ("base_lrs", "last_epoch", "_step_count", "_last_lr")  # what state_dict saves
    _arguments = ()  # the arguments torch's state_dict also holds

    def __init__(self, optimizer, last_epoch=-1, *, interval="epoch"):
        name = type(self).__name__
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{name}: optimizer must be a fastcnn.optim Optimizer, got "
                            f"{type(optimizer).__name__}")
        self.optimizer = optimizer
        self.interval = _check_interval(name, interval)
        last_epoch = _integer(name, "last_epoch", last_epoch, low=-1)
        for i, group in enumerate(optimizer.param_groups):
            if last_epoch == -1:
                group.setdefault("initial_lr", group["lr"])
            elif "initial_lr" not in group:
                raise KeyError(f"{name}: param 'initial_lr' is not specified in "
                               f"param_groups[{i}] when resuming a scheduler with last_epoch "
                               f"{last_epoch} >= 0; load the optimizer's state first, or "
                               f"start with last_epoch=-1")
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = last_epoch
        self._initial_step()

    def _initial_step(self):
        """The step the constructor makes (torch's "initial mode": most schedulers keep
        the lr then)."""
        self._step_count = 0
        self._is_initial = True
        try:
            self.step()
        finally:
            self._is_initial = False

    def _group_lrs(self):
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_lr(self):
        """The lrs of the step being made (last_epoch already advanced)."""
        raise NotImplementedError

    def step(self, epoch=None):
        """Advance one step (call it after the optimizer's step), or, with ``epoch``,
        jump there (the closed form where the scheduler has one, torch's deprecated
        form)."""
        self._step_count += 1
        self._update_lr(epoch)

    def _update_lr(self, epoch=None):
        if epoch is None:
            self.last_epoch += 1
            values = self.get_lr()
        else:
            self.last_epoch = _integer(type(self).__name__, "epoch", epoch)
            closed = getattr(self, "_get_closed_form_lr", None)
            values = closed() if closed is not None else self.get_lr()
        self._set_lrs(values)

    def _set_lrs(self, values):
        for group, lr in zip(self.optimizer.param_groups, values, strict=True):
            group["lr"] = lr
        self._last_lr = self._group_lrs()

    def get_last_lr(self):
        """The lrs the last step set, one per group."""
        return list(self._last_lr)

    @property
    def last_step(self):
        """``last_epoch`` under its older fastcnn name."""
        return self.last_epoch

    def state_dict(self):
        state = {"type": type(self).__name__}
        for key in self._state:
            value = getattr(self, key)
            state[key] = list(value) if isinstance(value, list) else value
        return state

    def load_state_dict(self, state_dict):
        name = type(self).__name__
        if not isinstance(state_dict, dict):
            raise TypeError(f"{name}.load_state_dict: expected a dict, got "
                            f"{type(state_dict).__name__}")
        state = dict(state_dict)
        saved = state.pop("type", name)  # torch's states do not say
        if saved != name:
            raise ValueError(f"the saved state is a {saved}'s, not a {name}'s")
        if "last_step" in state and "last_epoch" not in state:
            self._load_older(state)
            return
        for key, value in state.items():
            if key in _TORCH_INTERNALS:
                continue
            if key not in self._state and key not in self._arguments:
                raise ValueError(f"{name}.load_state_dict: unknown entry {key!r}")
            self._restore(key, value)

    def _restore(self, key, value):
        setattr(self, key, list(value) if isinstance(value, (list, tuple)) else value)

    def _load_older(self, state):
        """fastcnn's format before torch's keys: the step count and base lrs of a
        closed-form schedule (StepLR, CosineAnnealingLR), whose lrs it sets."""
        closed = getattr(self, "_get_closed_form_lr", None)
        if closed is None:
            raise ValueError(f"{type(self).__name__}.load_state_dict: an older fastcnn state "
                             f"({sorted(state)}) is StepLR's or CosineAnnealingLR's")
        self.last_epoch = int(state["last_step"])
        self._step_count = self.last_epoch + 1
        self.base_lrs = [float(b) for b in state["base_lrs"]]
        self._set_lrs(closed())


class _LambdaScheduler(LRScheduler):
    """LambdaLR and MultiplicativeLR: one function of the epoch per group."""

    def __init__(self, optimizer, lr_lambda, last_epoch=-1, *, interval="epoch"):
        name = type(self).__name__
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{name}: optimizer must be a fastcnn.optim Optimizer, got "
                            f"{type(optimizer).__name__}")
        self.lr_lambdas = _per_group(name, "lr_lambda", optimizer, lr_lambda)
        for fn in self.lr_lambdas:
            if not callable(fn):
                raise TypeError(f"{name}: lr_lambda must be a function of the epoch, got "
                                f"{type(fn).__name__}")
        super().__init__(optimizer, last_epoch, interval=interval)

    def state_dict(self):
        """As torch: the lambdas' own state only when they are callable objects (a
        function or lambda is not saved)."""
        state = super().state_dict()
        state["lr_lambdas"] = [None if isinstance(fn, types.FunctionType) else dict(vars(fn))
                               for fn in self.lr_lambdas]
        return state

    def _restore(self, key, value):
        if key != "lr_lambdas":
            return super()._restore(key, value)
        for fn, saved in zip(self.lr_lambdas, value):
            if saved is not None:
                vars(fn).update(saved)

    _arguments = ("lr_lambdas",)  # (the callable objects' own state, as torch saves it)


class LambdaLR(_LambdaScheduler):
    """lr = base_lr * lr_lambda(epoch): one function for all groups, or a list of one
    per group (torch.optim.lr_scheduler.LambdaLR)."""

    def get_lr(self):
        return [base * fn(self.last_epoch) for fn, base in zip(self.lr_lambdas, self.base_lrs)]


class MultiplicativeLR(_LambdaScheduler):
    """lr *= lr_lambda(epoch) at every step after the first (torch's MultiplicativeLR)."""

    def get_lr(self):
        if self._is_initial:
            return self._group_lrs()
        return [group["lr"] * fn(self.last_epoch)
                for fn, group in zip(self.lr_lambdas, self.optimizer.param_groups)]


class StepLR(LRScheduler):
    """lr *= gamma every ``step_size`` epochs (torch's StepLR; closed form
    base_lr * gamma ** (epoch // step_size)). step_size may be a float, as in torch:
    the lr decays at the epochs that are multiples of it."""

    _arguments = ("step_size", "gamma")

    def __init__(self, optimizer, step_size, gamma=0.1, last_epoch=-1, *, interval="epoch"):
        if not _number("StepLR", "step_size", step_size) > 0:
            raise ValueError(f"StepLR: step_size must be > 0, got {step_size!r}")
        self.step_size = step_size
        self.gamma = _at_least("StepLR", "gamma", gamma)
        super().__init__(optimizer, last_epoch, interval=interval)

    def get_lr(self):
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return self._group_lrs()
        return [group["lr"] * self.gamma for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        return [base * self.gamma ** (self.last_epoch // self.step_size)
                for base in self.base_lrs]


class MultiStepLR(LRScheduler):
    """lr *= gamma at each milestone epoch (a milestone given twice: gamma ** 2), as
    torch's MultiStepLR."""

    _arguments = ("milestones", "gamma")

    def __init__(self, optimizer, milestones, gamma=0.1, last_epoch=-1, *, interval="epoch"):
        try:
            milestones = list(milestones)
        except TypeError:
            raise TypeError(f"MultiStepLR: milestones must be a list of epochs, got "
                            f"{milestones!r}") from None
        self.milestones = Counter(_integer("MultiStepLR", "milestones", m) for m in milestones)
        self.gamma = _at_least("MultiStepLR", "gamma", gamma)
        super().__init__(optimizer, last_epoch, interval=interval)

    def _restore(self, key, value):
        if key == "milestones":  # a Counter, or the dict with text keys JSON makes of it
            value = Counter({int(k): int(n) for k, n in dict(value).items()})
            self.milestones = value
            return
        super()._restore(key, value)

    def get_lr(self):
        if self.last_epoch not in self.milestones:
            return self._group_lrs()
        return [group["lr"] * self.gamma ** self.milestones[self.last_epoch]
                for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        milestones = sorted(self.milestones.elements())
        return [base * self.gamma ** bisect_right(milestones, self.last_epoch)
                for base in self.base_lrs]


class ConstantLR(LRScheduler):
    """lr * factor for the first ``total_iters`` epochs, then the lr again (torch's
    ConstantLR). factor in (0, 1] (torch takes 0, then divides by it)."""

    _arguments = ("factor", "total_iters")

    def __init__(self, optimizer, factor=1.0 / 3, total_iters=5, last_epoch=-1, *,
                 interval="epoch"):
        if not 0 < _number("ConstantLR", "factor", factor) <= 1:
            raise ValueError(f"ConstantLR: factor must be in (0, 1], got {factor!r}")
        self.factor = factor
        self.total_iters = _integer("ConstantLR", "total_iters", total_iters, low=0)
        super().__init__(optimizer, last_epoch, interval=interval)

    def get_lr(self):
        if self.last_epoch == 0:
            return [group["lr"] * self.factor for group in self.optimizer.param_groups]
        if self.last_epoch != self.total_iters:
            return self._group_lrs()
        return [group["lr"] * (1.0 / self.factor) for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        return [base * (self.factor + (self.last_epoch >= self.total_iters) * (1 - self.factor))
                for base in self.base_lrs]


class LinearLR(LRScheduler):
    """The lr's factor goes linearly from start_factor to end_factor over
    ``total_iters`` epochs, then stays (torch's LinearLR)."""

    _arguments = ("start_factor", "end_factor", "total_iters")

    def __init__(self, optimizer, start_factor=1.0 / 3, end_factor=1.0, total_iters=5,
                 last_epoch=-1, *, interval="epoch"):
        if not 0 < _number("LinearLR", "start_factor", start_factor) <= 1:
            raise ValueError(f"LinearLR: start_factor must be in (0, 1], got {start_factor!r}")
        if not 0 <= _number("LinearLR", "end_factor", end_factor) <= 1:
            raise ValueError(f"LinearLR: end_factor must be in [0, 1], got {end_factor!r}")
        self.start_factor, self.end_factor = start_factor, end_factor
        self.total_iters = _integer("LinearLR", "total_iters", total_iters, low=0)
        super().__init__(optimizer, last_epoch, interval=interval)

    def get_lr(self):
        if self.last_epoch == 0:
            return [group["lr"] * self.start_factor for group in self.optimizer.param_groups]
        if self._is_initial or self.last_epoch > self.total_iters:
            return self._group_lrs()
        change = self.end_factor - self.start_factor
        return [group["lr"] * (1.0 + change / (self.total_iters * self.start_factor +
                                               (self.last_epoch - 1) * change))
                for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        return [base * (self.start_factor + (self.end_factor - self.start_factor) *
                        min(self.total_iters, self.last_epoch) / self.total_iters)
                for base in self.base_lrs]


class ExponentialLR(LRScheduler):
    """lr *= gamma at every step after the first (torch's ExponentialLR)."""

    _arguments = ("gamma",)

    def __init__(self, optimizer, gamma, last_epoch=-1, *, interval="epoch"):
        self.gamma = _at_least("ExponentialLR", "gamma", gamma)
        super().__init__(optimizer, last_epoch, interval=interval)

    def get_lr(self):
        if self._is_initial:
            return self._group_lrs()
        return [group["lr"] * self.gamma for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        return [base * self.gamma ** self.last_epoch for base in self.base_lrs]


class CosineAnnealingLR(LRScheduler):
    """Cosine annealing from the lr to ``eta_min`` over ``T_max`` epochs, as torch's
    CosineAnnealingLR: the recursive (chainable) form, which after T_max carries on
    periodically (back up to base_lr at 2 T_max, and so on); closed form
    eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2. T_max may be
    a float.

    warmup (keyword only, fastcnn's; steps, < T_max): with warmup > 0 the schedule
    is instead the closed form of the step count t that fastcnn has always had: a
    linear warm-up from base_lr / warmup to base_lr over the first ``warmup``
    steps, then the half cosine from base_lr down to eta_min at t = T_max, held
    there after; it sets the lr from base_lr at every step, so it does not chain
    with another scheduler and a manual change of the lr does not persist.
    """

    _arguments = ("T_max", "eta_min")

    def __init__(self, optimizer, T_max, eta_min=0.0, last_epoch=-1, *, warmup=0,
                 interval="epoch"):
        if not _number("CosineAnnealingLR", "T_max", T_max) > 0:
            raise ValueError(f"CosineAnnealingLR: T_max must be > 0, got {T_max!r}")
        self.T_max = T_max
        self.eta_min = _at_least("CosineAnnealingLR", "eta_min", eta_min)
        self.warmup = _integer("CosineAnnealingLR", "warmup", warmup, low=0)
        if warmup and not warmup < T_max:
            raise ValueError(f"CosineAnnealingLR: warmup must be < T_max, got warmup={warmup}, "
                             f"T_max={T_max}")
        super().__init__(optimizer, last_epoch, interval=interval)

    def get_lr(self):
        if self.warmup:
            return self._get_closed_form_lr()
        T, eta_min, t = self.T_max, self.eta_min, self.last_epoch
        if self._is_initial:
            return self._group_lrs()
        if self._step_count == 1 and t > 0:
            return [eta_min + (base - eta_min) * (1 + math.cos(t * math.pi / T)) / 2
                    for base in self.base_lrs]
        if (t - 1 - T) % (2 * T) == 0:  # at the cosine's minimum: the step back up
            return [group["lr"] + (base - eta_min) * (1 - math.cos(math.pi / T)) / 2
                    for base, group in zip(self.base_lrs, self.optimizer.param_groups)]
        return [(1 + math.cos(math.pi * t / T)) / (1 + math.cos(math.pi * (t - 1) / T)) *
                (group["lr"] - eta_min) + eta_min for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        t = self.last_epoch
        if not self.warmup:
            return [self.eta_min + (base - self.eta_min) *
                    (1 + math.cos(math.pi * t / self.T_max)) / 2 for base in self.base_lrs]
        if t < self.warmup:
            return [base * (t + 1) / self.warmup for base in self.base_lrs]
        span = self.T_max - self.warmup
        progress = min(t - self.warmup, span) / span
        return [float(self.eta_min + (base - self.eta_min) * (1 + math.cos(math.pi * progress)) / 2)
                for base in self.base_lrs]

    def load_state_dict(self, state_dict):
        """As the base class; with warmup the lrs are then set from the step count."""
        super().load_state_dict(state_dict)
        if self.warmup:
            self._set_lrs(self._get_closed_form_lr())


class OneCycleLR(LRScheduler):
    """The 1cycle policy (Smith & Topin), as torch's OneCycleLR: the lr goes from
    max_lr / div_factor up to max_lr over the first pct_start of ``total_steps``
    (or ``epochs * steps_per_epoch``), then down to initial_lr / final_div_factor
    ('cos' or 'linear' annealing); three_phase: back to initial_lr first, then
    down. cycle_momentum: SGD's momentum (Adam's beta1) goes the other way,
    between max_momentum and base_momentum. It is meant to be stepped once per
    batch: pass interval='step' for fastcnn.train.Trainer. Stepping past
    total_steps is a ValueError, as in torch.
    """

    _arguments = ("total_steps", "_schedule_phases", "_anneal_func_type", "cycle_momentum",
                  "use_beta1")

    def __init__(self, optimizer, max_lr, total_steps=None, epochs=None, steps_per_epoch=None,
                 pct_start=0.3, anneal_strategy="cos", cycle_momentum=True, base_momentum=0.85,
                 max_momentum=0.95, div_factor=25.0, final_div_factor=1e4, three_phase=False,
                 last_epoch=-1, *, interval="epoch"):
        name = "OneCycleLR"
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{name}: optimizer must be a fastcnn.optim Optimizer, got "
                            f"{type(optimizer).__name__}")
        if total_steps is not None:
            self.total_steps = _integer(name, "total_steps", total_steps, low=1)
        elif epochs is not None and steps_per_epoch is not None:
            self.total_steps = (_integer(name, "epochs", epochs, low=1) *
                                _integer(name, "steps_per_epoch", steps_per_epoch, low=1))
        else:
            raise ValueError(f"{name}: give total_steps, or epochs and steps_per_epoch")
        if not 0 <= _number(name, "pct_start", pct_start) <= 1:
            raise ValueError(f"{name}: pct_start must be in [0, 1], got {pct_start!r}")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"{name}: anneal_strategy must be 'cos' or 'linear', got "
                             f"{anneal_strategy!r}")
        for arg, value in (("div_factor", div_factor), ("final_div_factor", final_div_factor)):
            if not _number(name, arg, value) > 0:
                raise ValueError(f"{name}: {arg} must be > 0, got {value!r}")
        self._anneal_func_type = anneal_strategy
        up = float(pct_start * self.total_steps) - 1
        if three_phase:
            self._schedule_phases = [
                {"end_step": up, "start_lr": "initial_lr", "end_lr": "max_lr",
                 "start_momentum": "max_momentum", "end_momentum": "base_momentum"},
                {"end_step": float(2 * pct_start * self.total_steps) - 2, "start_lr": "max_lr",
                 "end_lr": "initial_lr", "start_momentum": "base_momentum",
                 "end_momentum": "max_momentum"},
                {"end_step": self.total_steps - 1, "start_lr": "initial_lr", "end_lr": "min_lr",
                 "start_momentum": "max_momentum", "end_momentum": "max_momentum"}]
        else:
            self._schedule_phases = [
                {"end_step": up, "start_lr": "initial_lr", "end_lr": "max_lr",
                 "start_momentum": "max_momentum", "end_momentum": "base_momentum"},
                {"end_step": self.total_steps - 1, "start_lr": "max_lr", "end_lr": "min_lr",
                 "start_momentum": "base_momentum", "end_momentum": "max_momentum"}]
        max_lrs = [_at_least(name, "max_lr", v)
                   for v in _per_group(name, "max_lr", optimizer, max_lr)]
        if last_epoch == -1:
            for group, top in zip(optimizer.param_groups, max_lrs):
                group["initial_lr"] = top / div_factor
                group["max_lr"] = top
                group["min_lr"] = group["initial_lr"] / final_div_factor
        self.cycle_momentum = bool(cycle_momentum)
        if self.cycle_momentum:
            if "momentum" not in optimizer.defaults and "betas" not in optimizer.defaults:
                raise ValueError(f"{name}: cycle_momentum needs an optimizer with momentum or "
                                 f"betas, {type(optimizer).__name__} has neither")
            self.use_beta1 = "betas" in optimizer.defaults
            tops = _per_group(name, "max_momentum", optimizer, max_momentum)
            bases = _per_group(name, "base_momentum", optimizer, base_momentum)
            for arg, values in (("max_momentum", tops), ("base_momentum", bases)):
                for v in values:
                    _at_least(name, arg, v)
            if last_epoch == -1:
                for top, base, group in zip(tops, bases, optimizer.param_groups):
                    self._set_momentum(group, top)
                    group["max_momentum"], group["base_momentum"] = top, base
        super().__init__(optimizer, last_epoch, interval=interval)

    def _set_momentum(self, group, value):
        if self.use_beta1:
            group["betas"] = [value, *group["betas"][1:]]
        else:
            group["momentum"] = value

    def _anneal(self, start, end, pct):
        if self._anneal_func_type == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def get_lr(self):
        step = self.last_epoch
        if step > self.total_steps:
            raise ValueError(f"OneCycleLR: tried to step {step} times; the specified number of "
                             f"total steps is {self.total_steps}")
        lrs = []
        for group in self.optimizer.param_groups:
            start = 0.0
            for i, phase in enumerate(self._schedule_phases):
                end = phase["end_step"]
                if step <= end or i == len(self._schedule_phases) - 1:
                    pct = (step - start) / (end - start)
                    lrs.append(self._anneal(group[phase["start_lr"]], group[phase["end_lr"]], pct))
                    if self.cycle_momentum:
                        self._set_momentum(group, self._anneal(group[phase["start_momentum"]],
                                                               group[phase["end_momentum"]], pct))
                    break
                start = end
        return lrs


def _check_schedulers(owner, optimizer, schedulers):
    """The list of ``schedulers``, all of ``optimizer`` and none a ReduceLROnPlateau
    (whose step needs a metric)."""
    schedulers = list(schedulers)
    if not schedulers:
        raise ValueError(f"{owner}: schedulers is empty")
    for i, scheduler in enumerate(schedulers):
        if not isinstance(scheduler, LRScheduler):
            raise TypeError(f"{owner}: schedulers[{i}] must be a fastcnn.optim scheduler, got "
                            f"{type(scheduler).__name__}")
        if isinstance(scheduler, ReduceLROnPlateau):
            raise ValueError(f"{owner}: schedulers[{i}] is a ReduceLROnPlateau, whose step "
                             f"needs the metric; step it on its own")
        if scheduler.optimizer is not optimizer:
            raise ValueError(f"{owner}: schedulers[{i}] ({type(scheduler).__name__}) belongs to "
                             f"another optimizer")
    return schedulers


def _shared_interval(owner, schedulers, interval):
    if interval is not None:
        return _check_interval(owner, interval)
    intervals = {s.interval for s in schedulers}
    if len(intervals) > 1:
        raise ValueError(f"{owner}: the schedulers step per {' and per '.join(sorted(intervals))}; "
                         f"give interval='epoch' or 'step'")
    return intervals.pop()


def _undo_step(scheduler):
    """Take back the step a scheduler's constructor made (nested ones too), as torch's
    SequentialLR does."""
    if isinstance(scheduler, _Composite):
        for inner in scheduler._schedulers:
            _undo_step(inner)
    else:
        scheduler.last_epoch -= 1


class _Composite(LRScheduler):
    """SequentialLR and ChainedScheduler: their state holds their schedulers'."""

    def state_dict(self):
        state = super().state_dict()
        state["_schedulers"] = [s.state_dict() for s in self._schedulers]
        return state

    def _restore(self, key, value):
        if key != "_schedulers":
            return super()._restore(key, value)
        if len(value) != len(self._schedulers):
            raise ValueError(f"{type(self).__name__}.load_state_dict: the state has "
                             f"{len(value)} schedulers, this one {len(self._schedulers)}")
        for scheduler, state in zip(self._schedulers, value):
            scheduler.load_state_dict(state)


class SequentialLR(_Composite):
    """The schedulers one after the other, switching at the milestone epochs (each
    then starts at its epoch 0), as torch's SequentialLR. interval: the
    schedulers' own when they agree (default), else give it."""

    _state = ("last_epoch", "_last_lr", "_schedulers")
    _arguments = ("_milestones",)

    def __init__(self, optimizer, schedulers, milestones, last_epoch=-1, *, interval=None):
        schedulers = _check_schedulers("SequentialLR", optimizer, schedulers)
        milestones = [_integer("SequentialLR", "milestones", m) for m in milestones]
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(f"SequentialLR: milestones must be one fewer than the schedulers "
                             f"({len(schedulers)}), got {len(milestones)}")
        self._schedulers, self._milestones = schedulers, milestones
        self.last_epoch = _integer("SequentialLR", "last_epoch", last_epoch, low=-1) + 1
        self.optimizer = optimizer
        self.interval = _shared_interval("SequentialLR", schedulers, interval)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"]
        for scheduler in schedulers:  # undo the steps their constructors made
            _undo_step(scheduler)
        first = schedulers[bisect_right(milestones, 0)]
        first._initial_step()
        self._last_lr = first.get_last_lr()

    def step(self):
        self.last_epoch += 1
        idx = bisect_right(self._milestones, self.last_epoch)
        scheduler = self._schedulers[idx]
        if idx > 0 and self._milestones[idx - 1] == self.last_epoch:
            scheduler._update_lr(0)
        else:
            scheduler.step()
        self._last_lr = scheduler.get_last_lr()



class ChainedScheduler(_Composite):
    """Steps every scheduler at each step, so that their changes combine (torch's
    ChainedScheduler). interval: the schedulers' own when they agree (default)."""

    _state = ("_last_lr", "_schedulers")

    def __init__(self, schedulers, optimizer=None, *, interval=None):
        schedulers = list(schedulers)
        if optimizer is None and schedulers:
            optimizer = getattr(schedulers[0], "optimizer", None)
        self._schedulers = _check_schedulers("ChainedScheduler", optimizer, schedulers)
        self.optimizer = optimizer
        self.interval = _shared_interval("ChainedScheduler", schedulers, interval)
        self._last_lr = self._group_lrs()

    def step(self):
        for scheduler in self._schedulers:
            scheduler.step()
        self._last_lr = self._group_lrs()



class ReduceLROnPlateau(LRScheduler):
    """lr *= factor (not below min_lr, a value or one per group) when the metric
    given to ``step(metric)`` has not improved for more than ``patience`` epochs,
    then waits ``cooldown`` epochs, as torch's ReduceLROnPlateau. mode 'min'
    (a loss) or 'max' (an accuracy); improved: better than the best by
    ``threshold``, relative ('rel') or absolute ('abs'); a reduction smaller than
    eps is skipped. fastcnn.train.Trainer steps it once per epoch with the
    validation loss.
    """

    _state = ("last_epoch", "_last_lr", "best", "num_bad_epochs", "cooldown_counter")
    _arguments = ("factor", "default_min_lr", "min_lrs", "patience", "cooldown", "eps", "mode",
                  "mode_worse", "threshold", "threshold_mode")

    def __init__(self, optimizer, mode="min", factor=0.1, patience=10, threshold=1e-4,
                 threshold_mode="rel", cooldown=0, min_lr=0, eps=1e-8, *, interval="epoch"):
        name = "ReduceLROnPlateau"
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{name}: optimizer must be a fastcnn.optim Optimizer, got "
                            f"{type(optimizer).__name__}")
        if not 0 <= _number(name, "factor", factor) < 1:
            raise ValueError(f"{name}: factor must be in [0, 1), got {factor!r}")
        self.factor = factor
        self.optimizer = optimizer
        self.interval = _check_interval(name, interval)
        if isinstance(min_lr, (list, tuple)):
            self.default_min_lr = None
            self.min_lrs = [_at_least(name, "min_lr", v)
                            for v in _per_group(name, "min_lr", optimizer, min_lr)]
        else:
            self.default_min_lr = _at_least(name, "min_lr", min_lr)
            self.min_lrs = [self.default_min_lr] * len(optimizer.param_groups)
        self.patience = _integer(name, "patience", patience, low=0)
        self.cooldown = _integer(name, "cooldown", cooldown, low=0)
        self.eps = _at_least(name, "eps", eps)
        self.last_epoch = 0
        self._last_lr = self._group_lrs()
        self._init_is_better(mode, _at_least(name, "threshold", threshold), threshold_mode)
        self.best = self.mode_worse
        self.cooldown_counter = 0
        self.num_bad_epochs = 0

    def _init_is_better(self, mode, threshold, threshold_mode):
        if mode not in ("min", "max"):
            raise ValueError(f"ReduceLROnPlateau: mode must be 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"ReduceLROnPlateau: threshold_mode must be 'rel' or 'abs', got "
                             f"{threshold_mode!r}")
        self.mode, self.threshold, self.threshold_mode = mode, threshold, threshold_mode
        self.mode_worse = math.inf if mode == "min" else -math.inf

    def _is_better(self, a, best):
        if self.mode == "min" and self.threshold_mode == "rel":
            return a < best * (1.0 - self.threshold)
        if self.mode == "min":
            return a < best - self.threshold
        if self.threshold_mode == "rel":
            return a > best * (self.threshold + 1.0)
        return a > best + self.threshold

    @property
    def in_cooldown(self):
        return self.cooldown_counter > 0

    def step(self, metrics, epoch=None):
        """One epoch's ``metrics`` (a number, or a 0-d array: the validation loss)."""
        try:
            current = float(metrics)
        except (TypeError, ValueError):
            raise TypeError(f"ReduceLROnPlateau.step: metrics must be a number (the value to "
                            f"watch), got {metrics!r:.80}") from None
        self.last_epoch = (self.last_epoch + 1 if epoch is None else
                           _integer("ReduceLROnPlateau", "epoch", epoch))
        if self._is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.in_cooldown:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            self._reduce_lr()
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = self._group_lrs()

    def _reduce_lr(self):
        groups = self.optimizer.param_groups
        if len(groups) != len(self.min_lrs):
            if self.default_min_lr is None:
                raise RuntimeError(f"ReduceLROnPlateau: the optimizer has {len(groups)} "
                                   f"parameter groups, min_lr {len(self.min_lrs)} values (a "
                                   f"group was added); set min_lrs to one per group")
            self.min_lrs = [self.default_min_lr] * len(groups)
        for group, min_lr in zip(groups, self.min_lrs):
            old = float(group["lr"])
            new = max(old * self.factor, min_lr)
            if old - new > self.eps:
                group["lr"] = new

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._init_is_better(self.mode, self.threshold, self.threshold_mode)
