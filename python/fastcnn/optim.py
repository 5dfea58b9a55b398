"""Optimizers (SGD, Adam, AdamW) and learning-rate schedules.

The update rules are PyTorch's, computed in place on the parameters' float32
arrays: in one pass per parameter on the CPU (fastcnn._cpu), in one launch for
all of a group's parameters on the GPU (fastcnn._cuda's multi-tensor
updates), with the same bits as the NumPy (or CuPy) expressions written out
below, which remain the fallback for other arrays. ``state_dict()`` holds
everything needed to resume; parameters are referred to by their position in
the optimizer's parameter list.
"""

import math
import numbers

import numpy as np

from . import _backend as B
from . import _cpu
from . import capture
from .nn.module import Parameter, _array_module, _touch

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "LRScheduler", "StepLR",
           "CosineAnnealingLR", "build_optimizer"]

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

class LRScheduler:
    """Sets each group's lr to a function of the step count: lr = schedule(base_lr, t).

    ``step()`` advances t by one; call it once per epoch or, with
    ``interval="step"``, once per batch (``fastcnn.train.Trainer`` reads
    ``interval`` to know which). The lr is a closed-form function of t, so the
    state to resume is t alone.
    """

    def __init__(self, optimizer, interval="epoch"):
        if interval not in ("epoch", "step"):
            raise ValueError(f"interval must be 'epoch' or 'step', got {interval!r}")
        self.optimizer = optimizer
        self.interval = interval
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def lr_at(self, base_lr, t):
        raise NotImplementedError

    def _apply(self):
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = float(self.lr_at(base, self.last_step))

    def step(self):
        self.last_step += 1
        self._apply()

    def get_last_lr(self):
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self):
        return {"type": type(self).__name__, "last_step": self.last_step,
                "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state):
        saved = state.get("type", type(self).__name__)  # older states did not say
        if saved != type(self).__name__:
            raise ValueError(f"the saved state is a {saved}'s, not a {type(self).__name__}'s")
        self.last_step = int(state["last_step"])
        self.base_lrs = [float(b) for b in state["base_lrs"]]
        self._apply()


class StepLR(LRScheduler):
    """lr = base_lr * gamma ** (t // step_size)."""

    def __init__(self, optimizer, step_size, gamma=0.1, interval="epoch"):
        if step_size < 1:
            raise ValueError(f"step_size must be >= 1, got {step_size}")
        self.step_size, self.gamma = int(step_size), float(gamma)
        super().__init__(optimizer, interval)

    def lr_at(self, base_lr, t):
        return base_lr * self.gamma ** (t // self.step_size)


class CosineAnnealingLR(LRScheduler):
    """Linear warm-up over ``warmup`` steps from base_lr / warmup to base_lr, then a
    half cosine from base_lr down to ``eta_min`` at t = T_max (held there after)."""

    def __init__(self, optimizer, T_max, eta_min=0.0, warmup=0, interval="epoch"):
        if T_max < 1 or not 0 <= warmup < T_max:
            raise ValueError(f"need T_max >= 1 and 0 <= warmup < T_max, got T_max={T_max}, "
                             f"warmup={warmup}")
        self.T_max, self.eta_min, self.warmup = int(T_max), float(eta_min), int(warmup)
        super().__init__(optimizer, interval)

    def lr_at(self, base_lr, t):
        if t < self.warmup:
            return base_lr * (t + 1) / self.warmup
        progress = min(t - self.warmup, self.T_max - self.warmup) / (self.T_max - self.warmup)
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * progress)) / 2

