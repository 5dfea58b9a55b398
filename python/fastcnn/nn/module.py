"""The layer contract: Parameter, Module and Sequential.

A Module's ``forward(x)`` keeps what its ``backward`` needs; ``backward(grad_out)``
returns the gradient with respect to the input and *accumulates* parameter
gradients into ``param.grad``. ``Sequential`` records every intermediate
activation and the gradient with respect to it, and can run its backward pass
from and to any layer: the visualisation methods (saliency, guided backprop,
Grad-CAM) are built on exactly that.
"""

import importlib
from collections import OrderedDict

import numpy as np

from .. import _backend as B
from .._backend import as_float as _as_float

__all__ = ["Parameter", "Module", "Sequential", "from_spec"]

#: Sequential.backward's and ReLU.backward's ``guided`` value for the deconvnet rule.
DECONVOLUTION = "deconvolution"


# Bumped whenever a module's structure or settings change: an attribute set
# (but the private ones a layer keeps its last forward in), a parameter's
# data replaced, train() / eval(), a buffer, parameter or layer (re)placed.
# Sequential's inference plans are valid while it stands still (the
# arrays' contents are read on every call, so in-place updates need none).
_state_version = 0


def _touch():
    global _state_version
    _state_version += 1


def state_version():
    """The counter above (fastcnn.nn.inference checks it before each plan call)."""
    return _state_version


def _array_module(a):
    """numpy or cupy, whichever ``a`` belongs to."""
    if type(a).__module__.split(".")[0] == "cupy":
        return importlib.import_module("cupy")
    return np


class Parameter:
    """A trainable float32 array (``data``) and its accumulated gradient (``grad``).

    ``grad`` is None until a backward pass produces one; ``zero_grad`` resets it
    to None. Layers skip gradients of parameters with ``requires_grad`` False.
    """

    __slots__ = ("_data", "grad", "requires_grad")

    def __init__(self, data, requires_grad=True):
        xp = _array_module(data)
        self._data = xp.ascontiguousarray(data, dtype=xp.float32)
        self.grad = None
        self.requires_grad = bool(requires_grad)

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        self._data = value
        _touch()

    @property
    def shape(self):
        return self.data.shape

    @property
    def size(self):
        return self.data.size

    def accumulate(self, grad):
        """Add ``grad`` into ``self.grad`` (taking ownership of it when grad is None)."""
        if grad is None or not self.requires_grad:
            return
        if self.grad is None:
            self.grad = grad
        else:
            self.grad += grad

    def __repr__(self):
        return f"Parameter(shape={tuple(self.shape)}, requires_grad={self.requires_grad})"


class Module:
    """Base class of every layer and container.

    Subclasses set Parameters and sub-Modules as attributes (they are registered
    automatically), arrays that are state but not trained through
    :meth:`register_buffer`, and implement ``forward``, ``backward``,
    ``get_config`` (the constructor arguments, JSON-serialisable, so that
    :func:`fastcnn.io.load` can rebuild the layer) and, where the shape changes,
    ``output_shape``.
    """

    _registry = {}
    #: True for modules whose backward takes ``guided=`` (ReLU and containers).
    accepts_guided = False
    # Public attributes that hold results of a pass, not settings (setting
    # them leaves the state version alone).
    _results = frozenset()
    #: Buffers a state dict from elsewhere may lack (a PyTorch model's has no dropout
    #: generator position): ``load_state_dict(strict=True)`` keeps their values and
    #: lists them as missing instead of refusing the state.
    optional_state = frozenset()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Module._registry[cls.__name__] = cls

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # ------------------------------------------------------------ registration

    def __setattr__(self, name, value):
        d = self.__dict__
        if "_parameters" not in d:
            raise AttributeError("Module.__init__() must be called before assigning attributes")
        if (name[0] == "_" and not isinstance(value, (Parameter, Module)) and
                name not in d["_buffers"] and name not in d["_parameters"] and
                name not in d["_modules"]):
            object.__setattr__(self, name, value)  # what a pass keeps for its backward
            return
        if ((name[0] != "_" and name not in self._results) or
                isinstance(value, (Parameter, Module)) or name in self._buffers):
            _touch()
        # A replaced parameter or layer keeps its place (a Sequential's order).
        if isinstance(value, Parameter):
            if name not in self._parameters:
                self._discard(name)
            self._parameters[name] = value
        elif isinstance(value, Module):
            if name not in self._modules:
                self._discard(name)
            self._modules[name] = value
        elif name in self._buffers:
            self._buffers[name] = value
        elif name in self._parameters or name in self._modules:
            raise TypeError(f"cannot assign {type(value).__name__} to {name!r}: it holds a "
                            f"{'Parameter' if name in self._parameters else 'Module'}")
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        # only reached when normal lookup fails
        for registry in ("_parameters", "_buffers", "_modules"):
            entries = self.__dict__.get(registry)
            if entries is not None and name in entries:
                return entries[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _discard(self, name):
        for registry in (self._parameters, self._buffers, self._modules):
            registry.pop(name, None)
        self.__dict__.pop(name, None)

    def register_buffer(self, name, array):
        """Register ``array`` as state saved in ``state_dict`` but not trained."""
        self._discard(name)
        self._buffers[name] = array
        _touch()

    def add_module(self, name, module):
        if not isinstance(module, Module):
            raise TypeError(f"add_module: {name!r} must be a Module, got {type(module).__name__}")
        setattr(self, name, module)

    # ------------------------------------------------------------ traversal

    def named_children(self):
        return iter(self._modules.items())

    def children(self):
        return iter(self._modules.values())

    def named_modules(self, prefix="", remove_duplicate=True):
        """(name, module) for this module and every one below it, depth first. A
        module reached twice (a custom module holding one layer under two names)
        comes once, under its first name, unless ``remove_duplicate`` is False (as
        torch)."""
        seen = set() if remove_duplicate else None
        yield from self._named_modules(prefix, seen)

    def _named_modules(self, prefix, seen):
        if seen is not None:
            if id(self) in seen:
                return
            seen.add(id(self))
        yield prefix, self
        for name, child in self._modules.items():
            yield from child._named_modules(f"{prefix}.{name}" if prefix else name, seen)

    def modules(self):
        return (m for _, m in self.named_modules())

    def _named_members(self, registry, prefix, remove_duplicate):
        # A parameter shared by two layers (b.weight = a.weight, tied weights)
        # comes once, so that an optimizer steps it once, as torch.
        seen = set()
        for module_name, module in self.named_modules(prefix, remove_duplicate):
            for name, member in getattr(module, registry).items():
                if member is None or (remove_duplicate and id(member) in seen):
                    continue
                seen.add(id(member))
                yield (f"{module_name}.{name}" if module_name else name), member

    def named_parameters(self, prefix="", remove_duplicate=True):
        """(name, Parameter) for every parameter, each once (under its first name)
        unless ``remove_duplicate`` is False."""
        return self._named_members("_parameters", prefix, remove_duplicate)

    def parameters(self):
        return (p for _, p in self.named_parameters())

    def named_buffers(self, prefix="", remove_duplicate=True):
        return self._named_members("_buffers", prefix, remove_duplicate)

    def buffers(self):
        return (b for _, b in self.named_buffers())

    def num_parameters(self, trainable_only=False):
        return sum(p.size for p in self.parameters() if p.requires_grad or not trainable_only)

    # ------------------------------------------------------------ modes and grads

    def train(self, mode=True):
        """Training mode (dropout active, batch norm on batch statistics). Returns self."""
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        _touch()
        return self

    def eval(self):
        """Evaluation mode (dropout off, batch norm on running statistics). Returns self."""
        return self.train(False)

    def zero_grad(self, set_to_none=True):
        """Reset every parameter's gradient: to None (the default, as torch), or with
        ``set_to_none=False`` to zeros in place."""
        for p in self.parameters():
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad[...] = 0

    def requires_grad_(self, requires_grad=True):
        for p in self.parameters():
            p.requires_grad = bool(requires_grad)
        return self

    # ------------------------------------------------------------ state

    def state_dict(self):
        """Ordered ``{name: array}`` of parameters and buffers (references, not copies);
        a buffer that is None (CrossEntropyLoss without class weights) has no entry,
        as in torch."""
        return OrderedDict((name, getattr(module, attr)) if not is_param else
                           (name, getattr(module, attr).data)
                           for name, (module, attr, is_param) in self._state_slots().items())

    def _state_slots(self):
        """name -> (module, attribute name, is_parameter), in state_dict order."""
        slots = OrderedDict()
        # Every name, a shared parameter or layer under each of its names (as torch).
        for module_name, module in self.named_modules(remove_duplicate=False):
            dot = f"{module_name}." if module_name else ""
            for name, param in module._parameters.items():
                if param is not None:
                    slots[dot + name] = (module, name, True)
            for name, buf in module._buffers.items():
                if buf is not None:
                    slots[dot + name] = (module, name, False)
        return slots

    def load_state_dict(self, state, strict=True):
        """Copy ``state`` ({name: array}) into this module's parameters and buffers, in place.

        The values may be NumPy or CuPy arrays, or anything NumPy / CuPy can read as
        one: a PyTorch ``state_dict()`` of the same layers loads as it is (the names
        are torch's). Every shape is checked before anything is copied, so a mismatch
        leaves the module untouched. With ``strict``, missing and unexpected names
        are errors too, bar the buffers a module lists in ``optional_state``
        (Dropout's generator position, batch norm's ``num_batches_tracked``), which
        keep their values. Returns ``(missing, unexpected)`` name lists.
        """
        slots = self._state_slots()
        missing = [k for k in slots if k not in state]
        unexpected = [k for k in state if k not in slots]
        required = [k for k in missing if slots[k][1] not in type(slots[k][0]).optional_state]
        if strict and (required or unexpected):
            parts = []
            if required:
                parts.append(f"missing {required}")
            if unexpected:
                parts.append(f"unexpected {unexpected}")
            raise ValueError(f"load_state_dict: state does not match the model: {'; '.join(parts)}")
        current = self.state_dict()
        values = {}
        for name, value in state.items():
            if name not in slots:
                continue
            xp = _array_module(current[name])
            if type(value).__module__.startswith("torch"):
                value = value.detach()  # a parameter itself, or state_dict(keep_vars=True)
                if xp is np:
                    value = value.cpu()
            try:
                value = xp.asarray(value)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise TypeError(f"load_state_dict: {name!r} cannot be read as a "
                                f"{'NumPy' if xp is np else 'CuPy'} array "
                                f"({type(value).__name__}: {exc})") from exc
            if value.dtype.kind not in "biuf":
                raise TypeError(f"load_state_dict: {name!r} has non-numeric dtype {value.dtype}")
            if value.shape != current[name].shape:
                raise ValueError(f"load_state_dict: {name!r} has shape {value.shape} in the "
                                 f"state but {current[name].shape} in the model")
            values[name] = value
        for name, value in values.items():
            current[name][...] = value
        return missing, unexpected

    # ------------------------------------------------------------ devices

    @property
    def device(self):
        """'cuda' when the parameters are CuPy arrays, else 'cpu'."""
        for p in self.parameters():
            return "cuda" if _array_module(p.data) is not np else "cpu"
        return "cpu"

    def to(self, device):
        """Move parameters, gradients and float buffers to ``device`` ('cpu' or 'cuda').

        'cuda' needs CuPy and fastcnn's CUDA module (``pip install 'fastcnn[cuda]'`` on
        a machine with an NVIDIA GPU). Integer counters stay on the host. Create the
        optimizer after moving the model. Returns self.
        """
        device = str(device)
        if device == "cpu":
            def move(a):
                return a.get() if _array_module(a) is not np else a
        elif device.split(":")[0] == "cuda":
            try:
                cupy = importlib.import_module("cupy")
            except ImportError as exc:
                raise RuntimeError("to('cuda') needs CuPy, which is not installed: "
                                   "pip install 'fastcnn[cuda]' on a machine with an NVIDIA "
                                   "GPU") from exc
            try:
                importlib.import_module("fastcnn._cuda")
            except ImportError as exc:
                raise RuntimeError("to('cuda'): this fastcnn build has no CUDA module "
                                   "(fastcnn._cuda); rebuild with the CUDA toolkit installed "
                                   "(FASTCNN_CUDA=ON pip install .)") from exc

            def move(a):
                return cupy.asarray(a)
        else:
            raise ValueError(f"to: device must be 'cpu' or 'cuda', got {device!r}")
        for module in self.modules():
            for param in module._parameters.values():
                param.data = move(param.data)
                if param.grad is not None:
                    param.grad = move(param.grad)
            for name, buf in module._buffers.items():
                if buf is not None and buf.dtype.kind == "f":
                    module._buffers[name] = move(buf)
        _touch()
        return self

    # ------------------------------------------------------------ computation

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, x):
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def backward(self, grad_out, *, input_grad=True):
        """Gradient w.r.t. the input of the last forward; accumulates parameter grads.

        With ``input_grad=False`` a layer may skip the input gradient and return None.
        """
        raise NotImplementedError(f"{type(self).__name__}.backward")

    def output_shape(self, input_shape):
        """The output shape for an input of ``input_shape`` (the batch axis included)."""
        return tuple(input_shape)

    # ------------------------------------------------------------ description

    def get_config(self):
        """Constructor arguments as a JSON-serialisable dict."""
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def spec(self):
        """``{"type": class name, "args": get_config()}``: enough to rebuild the module."""
        return {"type": type(self).__name__, "args": self.get_config()}

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())

    def __repr__(self):
        if not self._modules:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"{type(self).__name__}("]
        for name, child in self._modules.items():
            child_repr = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child_repr}")
        lines.append(")")
        return "\n".join(lines)


def from_spec(spec):
    """Rebuild a module from ``module.spec()`` (layer types must be Module subclasses)."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"a module spec is a dict with 'type' and 'args', got {spec!r}")
    cls = Module._registry.get(spec["type"])
    if cls is None:
        raise ValueError(f"unknown layer type {spec['type']!r}; known: "
                         f"{sorted(Module._registry)}")
    args = spec.get("args", {})
    if not isinstance(args, dict):
        raise ValueError(f"spec of {spec['type']}: 'args' must be a dict, got {args!r}")
    return cls.from_config(args)


def _has(layer, hook):
    """Whether ``layer``'s class has the fusion hook (a method, or a true flag)
    ``hook``: looked up on the class, as a miss on the instance would go through
    Module.__getattr__ and an AttributeError, a few of them per layer per step."""
    return bool(getattr(type(layer), hook, False))


def _fuses_relu_on_gpu(layer, after, x):
    """Whether ``layer`` (a Conv2d or Linear) and the ReLU ``after`` it run as one
    GEMM with the ReLU in its epilogue: on GPU arrays, for a plain ReLU (the
    guided rule is for visualisation, which records every layer)."""
    return (_has(layer, "forward_relu") and _has(after, "fuses_into_pool") and
            not after.guided and type(x) is not np.ndarray and B.is_gpu_array(x))


class Sequential(Module):
    """Layers applied in order, each under a name.

    ``Sequential(conv, relu)`` names its layers "0", "1", ...;
    ``Sequential(OrderedDict(conv1=..., relu1=...))`` or a list of (name, module)
    pairs gives them names. Index with an int, a name, or a slice (a Sequential
    sharing the same layers).

    After ``forward(x)``, ``activations[name]`` is the output of layer ``name``;
    after ``backward(g)``, ``gradients[name]`` is the gradient w.r.t. that output
    and ``input_gradient`` the gradient w.r.t. the model's input (these are the
    arrays themselves, not copies).

    In training mode (``train()``) with ``fuse`` set (the default), a ReLU
    directly followed by a MaxPool2d runs as one op, forward and backward:
    the ReLU's output is never written, so that ReLU has no entry in
    ``activations`` or ``gradients``. On the CPU, before such a ReLU and a
    MaxPool2d(2), a BatchNorm2d (training) runs with them as one pass, and it
    and a model's first convolution (when no input gradient is asked for)
    take their gradients straight from the pool's window codes: their
    outputs (and output gradients) are then not recorded either. On the GPU,
    a Conv2d or Linear directly followed by a ReLU (and no MaxPool2d after
    it) runs as one GEMM with the ReLU in its epilogue, in training and in
    ``forward(x, record=False)``: the layer's own output is then not
    recorded. Results are otherwise the same bits. Evaluation mode, and
    ``fuse = False``, record every layer.
    """

    accepts_guided = True
    _results = frozenset({"activations", "gradients", "input", "input_gradient"})

    def __init__(self, *layers):
        super().__init__()
        if len(layers) == 1 and isinstance(layers[0], dict):
            items = list(layers[0].items())
        elif len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            items = [tuple(item) for item in layers[0]]
        else:
            items = [(str(i), layer) for i, layer in enumerate(layers)]
        for name, layer in items:
            self.append(layer, name)
        self.activations = OrderedDict()
        self.gradients = OrderedDict()
        self.input = None
        self.input_gradient = None
        # In training, a ReLU directly followed by a MaxPool2d runs as one op
        # (the ReLU's output is then neither written nor recorded).
        self.fuse = True
        self._unrecorded = False  # the last forward kept nothing for a backward
        self._plan = None  # forward(record=False)'s steps, for one input shape

    def append(self, module, name=None):
        name = str(len(self._modules)) if name is None else str(name)
        if not isinstance(module, Module):
            raise TypeError(f"Sequential: layer {name!r} must be a Module, "
                            f"got {type(module).__name__}")
        if not name or "." in name or name in self._modules:
            raise ValueError(f"Sequential: invalid or duplicate layer name {name!r}")
        # A layer keeps what its backward needs from its last forward, so one
        # object run twice in a pass would give its first use the second use's
        # gradient. Weights are shared by sharing the Parameter instead.
        inside = {id(m): n for n, m in self.named_modules()}
        for _, m in module.named_modules():
            if id(m) in inside:
                where = f"layer {inside[id(m)]!r}" if inside[id(m)] else "the Sequential itself"
                raise ValueError(
                    f"Sequential: layer {name!r} ({type(module).__name__}) is, or holds, "
                    f"{where} already in this Sequential: a layer keeps its last forward "
                    f"for its backward, so one layer cannot run twice in a model. Use two "
                    f"layers; to tie their weights, share the Parameter "
                    f"(second.weight = first.weight)")
        self._modules[name] = module
        _touch()
        return self

    @property
    def names(self):
        return list(self._modules)

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, key):
        if isinstance(key, slice):
            names = self.names[key]
            return Sequential(OrderedDict((n, self._modules[n]) for n in names))
        return self._modules[self.names[self.index(key)]]

    def index(self, key):
        """Position of the layer ``key``: an int (negative allowed), a name, or the
        layer itself (one of this Sequential's modules, as Captum takes layers)."""
        names = self.names
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            if not -len(names) <= key < len(names):
                raise IndexError(f"layer index {key} out of range for {len(names)} layers")
            return int(key) % len(names)
        if isinstance(key, str) and key in self._modules:
            return names.index(key)
        if isinstance(key, Module):
            for i, layer in enumerate(self._modules.values()):
                if layer is key:
                    return i
            raise KeyError(f"the layer {key!r} is not one of this Sequential's; layers are "
                           f"{names}")
        raise KeyError(f"no layer {key!r}; layers are {names}")

    # ------------------------------------------------------------ computation

    def forward(self, x, *, start=None, stop=None, record=True):
        """Run the layers on ``x``; record every layer's output in ``activations``.

        start: ``x`` is the output of layer ``start`` and the layers after it run.
        stop:  run up to and including layer ``stop`` and return its output.
        record: False for inference (``torch.no_grad()``'s use): nothing is
                recorded or kept for a backward pass (``activations`` is left
                empty, and ``backward`` refuses to run until a recorded
                forward), which lets a model in evaluation mode run its layers
                as a few fused kernel calls (see ``fastcnn.nn.inference``).
                The output is the same, bit for bit.
        """
        if not record and start is None and stop is None:
            # Inference again on the shape of the last call, nothing changed
            # since (the plan checks the state version): straight to the
            # plan, without the bookkeeping below (~10 us of a 0.1 ms call).
            plan = self._plan
            if (plan is not None and type(x) is np.ndarray and x.dtype == np.float32 and
                    x.flags.c_contiguous and plan.shape == x.shape and
                    plan.version == state_version() and x.size):
                if self.activations or self.input is not None or not self._unrecorded:
                    self.activations = OrderedDict()
                    self.input = None
                    self._unrecorded = True
                return plan(x)
        first = 0 if start is None else self.index(start) + 1
        last = len(self) - 1 if stop is None else self.index(stop)
        if last < first - 1:
            raise ValueError(f"forward: stop layer {stop!r} comes before start layer {start!r}")
        names, layers = self.names, list(self._modules.values())
        self.activations = OrderedDict()
        self._unrecorded = not record
        if not record:
            self.input = None
            return self._forward_unrecorded(x, layers, first, last)
        if start is None:
            self.input = x
        else:
            self.activations[names[first - 1]] = x
        fuse = self.fuse and self.training
        i = first
        while i <= last:
            layer = layers[i]
            if (fuse and i + 2 <= last and _has(layer, "forward_relu_pool") and
                    _has(layers[i + 1], "fuses_into_pool") and
                    not layers[i + 1].guided and _has(layers[i + 2], "keeps_codes")):
                # BatchNorm2d -> ReLU -> MaxPool2d(2): one pass, the batch
                # norm's and the ReLU's outputs neither written nor recorded.
                out = layer.forward_relu_pool(x, layers[i + 1], layers[i + 2])
                if out is not NotImplemented:
                    x = out
                    self.activations[names[i + 2]] = x
                    i += 3
                    continue
            if (fuse and i < last and _fuses_relu_on_gpu(layer, layers[i + 1], x) and
                    not (i + 2 <= last and _has(layers[i + 2], "forward_after_relu"))):
                # On the GPU, a Conv2d or Linear and the ReLU after it: one GEMM with
                # the ReLU in its epilogue (unless a MaxPool2d follows, which takes the
                # ReLU instead); the layer's own output is neither written nor recorded.
                x = layer.forward_relu(x)
                layers[i + 1].set_fused_forward(x)
                self.activations[names[i + 1]] = x
                i += 2
                continue
            if (fuse and i < last and _has(layer, "fuses_into_pool") and
                    not layer.guided and _has(layers[i + 1], "forward_after_relu")):
                layer._input = x  # for an unfused ReLU backward (guided, or a stop there)
                x = layers[i + 1].forward_after_relu(x)
                self.activations[names[i + 1]] = x
                i += 2
                continue
            x = layer.forward(x)
            self.activations[names[i]] = x
            i += 1
        return x

    def _forward_unrecorded(self, x, layers, first, last):
        whole = first == 0 and last == len(layers) - 1
        if (whole and not self.training and type(x) is not np.ndarray and B.is_gpu_array(x) and
                x.size and getattr(x, "dtype", None) == np.float32 and x.flags.c_contiguous):
            # On the GPU: the layers' path, replayed as a CUDA graph from the
            # third call of a shape on (fastcnn.capture.CapturedForward).
            graph = self.__dict__.get("_gpu_plan")
            if graph is None:
                from ..capture import CapturedForward

                graph = CapturedForward(layers, lambda a: self._run_layers(a, layers, 0, last))
                object.__setattr__(self, "_gpu_plan", graph)
            return graph(x)
        if not (whole and not self.training and type(x) is np.ndarray and x.size):
            return self._run_layers(x, layers, first, last)
        x = _as_float(x, "input", np)
        plan = self._plan
        if plan is not None and plan.matches(layers, x):
            return plan(x)
        # A new shape or a changed layer: the layers' own forwards (which
        # validate their arguments) give the output and the plan's inputs.
        from .inference import InferencePlan  # layers (and so it) import this module
        inputs = []
        for layer in layers:
            inputs.append(x)
            x = layer.forward(x)
        object.__setattr__(self, "_plan", InferencePlan(layers, inputs))
        return x

    @staticmethod
    def _run_layers(x, layers, first, last):
        """Layers first..last, unrecorded (a Conv2d / Linear and its ReLU as one
        GEMM on the GPU)."""
        i = first
        while i <= last:
            if i < last and _fuses_relu_on_gpu(layers[i], layers[i + 1], x):
                x = layers[i].forward_relu(x)  # nothing is kept: the ReLU has no record
                i += 2
            else:
                x = layers[i].forward(x)
                i += 1
        return x

    def backward(self, grad_out, *, input_grad=True, start=None, stop=None, guided=None,
                 param_grads=True):
        """Backpropagate ``grad_out``; record the gradient at every layer in ``gradients``.

        start:  ``grad_out`` is the gradient w.r.t. the output of layer ``start``
                (default: the last layer); layers ``start`` and before run backward.
        stop:   stop once the gradient w.r.t. the output of layer ``stop`` is known
                and return it (layer ``stop`` itself is not run backward).
        input_grad: compute the gradient w.r.t. the model input (the first layer may
                skip it when False, as in training; None is returned then).
        guided: True/False overrides every ReLU's ``guided`` rule for this pass;
                'deconvolution' makes every ReLU pass max(gradient, 0) whatever
                its input (the deconvnet rule of Zeiler & Fergus).
        param_grads: when False no parameter gradient is computed or changed.
        Returns the gradient w.r.t. the model input (or w.r.t. ``stop``'s output).
        """
        if self._unrecorded:
            raise RuntimeError("Sequential.backward: the last forward ran with record=False, "
                               "which keeps nothing for a backward pass; run forward(x) first")
        if not (guided is None or isinstance(guided, (bool, np.bool_)) or
                isinstance(guided, str) and guided == DECONVOLUTION):
            raise ValueError(f"Sequential.backward: guided must be None, True, False or "
                             f"{DECONVOLUTION!r}, got {guided!r}")
        names, layers = self.names, list(self._modules.values())
        first = len(self) - 1 if start is None else self.index(start)
        last = -1 if stop is None else self.index(stop)
        if last > first:
            raise ValueError(f"backward: stop layer {stop!r} comes after start layer {start!r}")
        frozen = []
        if not param_grads:
            frozen = [p for layer in layers[last + 1:first + 1] for p in layer.parameters()
                      if p.requires_grad]
            for p in frozen:
                p.requires_grad = False
        try:
            self.gradients = OrderedDict()
            self.input_gradient = None
            g = grad_out
            self.gradients[names[first]] = g
            i = first
            while i > last:
                layer, step = layers[i], 1
                if (i - 1 > last and layer.__dict__.get("_relu_first", False) and
                        not (layers[i - 1].guided if guided is None else guided)):
                    # A MaxPool2d that ran fused with the ReLU before it: both
                    # backward in one op, the ReLU's output gradient unrecorded.
                    # The layer before the ReLU may take its gradients straight
                    # from the pool's window codes (a batch norm; a first
                    # convolution when no input gradient is wanted): its output
                    # gradient is then neither written nor recorded.
                    g_in = NotImplemented
                    if (i - 2 > last and layer.__dict__.get("_codes") is not None and
                            _has(layers[i - 2], "backward_from_pool")):
                        g_in = layers[i - 2].backward_from_pool(
                            g, layer._codes, input_grad=input_grad or i > 2)
                    if g_in is not NotImplemented:
                        g, step = g_in, 3
                    else:
                        g, step = layer.backward_through_relu(g), 2
                else:
                    kwargs = {"input_grad": input_grad or i > 0}
                    if guided is not None and layer.accepts_guided:
                        kwargs["guided"] = guided
                    g = layer.backward(g, **kwargs)
                i -= step
                if i >= 0:
                    self.gradients[names[i]] = g
                else:
                    self.input_gradient = g
        finally:
            for p in frozen:
                p.requires_grad = True
        return g

    def output_shape(self, input_shape):
        shape = tuple(input_shape)
        for layer in self:
            shape = layer.output_shape(shape)
        return shape

    # ------------------------------------------------------------ description

    def get_config(self):
        return {"layers": [{"name": name, **layer.spec()} for name, layer in self._modules.items()]}

    @classmethod
    def from_config(cls, config):
        layers = config.get("layers")
        if not isinstance(layers, list):
            raise ValueError(f"Sequential spec needs a 'layers' list, got {layers!r}")
        return cls([(entry.get("name", str(i)), from_spec(entry))
                    for i, entry in enumerate(layers)])

    def summary(self, input_shape=None):
        """A table of every layer with its output shape and parameter count.

        input_shape: one sample's shape, e.g. (1, 28, 28) (default: the model's
        ``metadata['input_shape']`` when it has one).
        """
        if input_shape is None:
            input_shape = getattr(self, "metadata", {}).get("input_shape")
        rows = [("Layer", "Type", "Output shape", "Params")]
        shape = None if input_shape is None else (None,) + tuple(input_shape)
        for name, layer in self._modules.items():
            if shape is not None:
                shape = layer.output_shape(shape)
            shape_text = "?" if shape is None else "(" + ", ".join(
                "N" if d is None else str(d) for d in shape) + ")"
            rows.append((name, type(layer).__name__, shape_text, f"{layer.num_parameters():,}"))
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        rule = "-" * (sum(widths) + 6)

        def fmt(r):
            return "  ".join(f"{cell:>{width}}" if c == 3 else f"{cell:<{width}}"
                             for c, (cell, width) in enumerate(zip(r, widths)))

        lines = [fmt(rows[0]), rule] + [fmt(r) for r in rows[1:]] + [rule]
        lines.append(f"Total parameters: {self.num_parameters():,} "
                     f"(trainable: {self.num_parameters(trainable_only=True):,})")
        return "\n".join(lines)
