"""A training step captured once as a CUDA graph and replayed: no Python, no
per-kernel launch cost after the first steps.

    step = fastcnn.cuda.CapturedStep(model, loss_fn, optimizer)
    for x, y in batches:            # NumPy or CuPy; the same shapes every time
        loss = step(x, y)           # one training step; loss is a CuPy scalar
    # or: Trainer(cuda_graph=True).fit(model, ...)

A small CNN's training step is some 30 kernel launches, each costing the host
more than the GPU needs to run it; a graph replays all of them in one launch.
What changes from step to step without a Python call is read from device
memory at every replay: the batch (copied into the graph's input buffers),
each Dropout's offset, the learning rate, SGD's momentum and Adam's betas
(schedules keep working) and Adam's bias corrections. The Python-side counters
(Dropout offsets, Adam step counts, BatchNorm's num_batches_tracked) advance as
in eager steps, so the results are the eager steps' bits and a checkpoint taken
in between resumes exactly.

The first ``warmup`` calls (default 1) run eagerly (they create the optimizer's
state); the next one runs eagerly too and captures the step, and the calls after
it replay. A change the graph cannot follow
(another input shape, a layer or parameter replaced, train()/eval(), an
optimizer option other than lr, momentum and betas: the replays read those
from device memory, so OneCycleLR's cycling needs no recapture) captures again. Not capturable (a clear
``CaptureError`` at capture): BatchNorm with ``momentum=None`` (its factor
changes every step), parameters missing a gradient. With ``fallback=True``
(what the Trainer uses) a step that cannot be captured runs eagerly instead,
and ``disabled`` says why.

The loss returned is a copy; ``step.logits`` and ``step.targets`` are the
graph's buffers (the logits and the batch's labels on the GPU), overwritten by
the next replay; ``step.hits`` is the step's count of rows whose argmax is
their target (a 0-d GPU array, from the cross-entropy's own kernel; None for
another loss).
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np

from . import _backend as B

__all__ = ["CapturedStep", "CaptureError", "CapturedForward"]


class CaptureError(RuntimeError):
    """The training step cannot be captured as a graph (and why)."""


def _state_version():
    """nn's state version (imported here: fastcnn.nn's layers import this module)."""
    from .nn.module import state_version

    return state_version()


# ------------------------------------------------------------ uploads

class _Upload:
    """Host-to-device copies that do not wait for the GPU. ``ndarray.set(host)``
    from pageable memory is a synchronous cudaMemcpy, which first waits for all
    the work queued before it: each replay's inputs would wait for the previous
    replay to finish, and the host could not prepare step n + 1 while the GPU
    runs step n. Here each destination has two pinned host buffers used in turn;
    the copy is asynchronous on the current stream, and a buffer is written again
    only after the copy that read it has run (an event): the host waits only
    when it is two steps ahead."""

    def __init__(self, cp):
        self._cp = cp
        self._staging = {}  # key: its two [pinned host array, event of its last copy]

    def __call__(self, key, buffer, host):
        """Copy the NumPy array ``host`` into the device array ``buffer``
        (same shape; cast to its dtype), in stream order."""
        cp = self._cp
        pair = self._staging.get(key)
        if pair is None or pair[0][0].shape != buffer.shape or pair[0][0].dtype != buffer.dtype:
            pair = self._staging[key] = [[self._pinned(buffer.shape, buffer.dtype), None]
                                         for _ in range(2)]
        pair.reverse()  # the other one than last time
        pinned, event = pair[0]
        if event is not None:
            event.synchronize()  # the copy that last read it has run
        pinned[...] = host
        stream = cp.cuda.get_current_stream()
        buffer.set(pinned, stream=stream)
        if event is None:
            event = pair[0][1] = cp.cuda.Event(disable_timing=True)
        event.record(stream)

    def _pinned(self, shape, dtype):
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        memory = self._cp.cuda.alloc_pinned_memory(max(count, 1) * dtype.itemsize)
        return np.frombuffer(memory, dtype, count).reshape(shape)  # keeps memory alive


# ------------------------------------------------------------ device scalars

class _Scalars:
    """The device scalars a captured step reads at every replay, and the Python
    that computes them. Each registered function runs once per replay, in
    registration (= execution) order, and may advance its own counters (a
    Dropout's offset, Adam's step count), as the eager step would."""

    _FLOATS, _INTS = 4096, 512

    def __init__(self, xp, allocate=True):
        # allocate=False: an inference graph's, which reads none (made before the
        # capture otherwise: made inside, their zero-fill would be captured too)
        self.floats = xp.zeros(self._FLOATS, np.float32) if allocate else None
        self.ints = xp.zeros(self._INTS, np.int64) if allocate else None
        self._host_floats = np.zeros(self._FLOATS, np.float32)
        self._host_ints = np.zeros(self._INTS, np.int64)
        self._entries = []  # (kind, start, count, fn)
        self._used = {"f": 0, "i": 0}
        self.upload = _Upload(xp)  # the replays' host-to-device copies

    def _take(self, kind, count, fn):
        if self.floats is None:
            raise CaptureError("this graph cannot read per-call values (an inference graph)")
        start = self._used[kind]
        limit = self._FLOATS if kind == "f" else self._INTS
        if start + count > limit:
            raise CaptureError(f"the step needs more than {limit} device scalars")
        self._used[kind] = start + count
        self._entries.append((kind, start, count, fn))
        return (self.floats if kind == "f" else self.ints)[start:start + count]

    def floats_for(self, count, fn):
        """A float32 view of ``count`` device scalars, ``fn()`` (a list) at every replay."""
        return self._take("f", count, fn)

    def int_for(self, fn):
        """A 1-element int64 view, ``fn()`` at every replay."""
        return self._take("i", 1, lambda: [fn()])

    def each_replay(self, fn):
        """Run ``fn()`` at every replay (bookkeeping with no device value)."""
        self._entries.append(("", 0, 0, fn))

    def refresh(self):
        """Compute every value for the coming replay and copy them to the device."""
        for kind, start, count, fn in self._entries:
            if kind == "f":
                self._host_floats[start:start + count] = fn()
            elif kind == "i":
                self._host_ints[start:start + count] = fn()
            else:
                fn()
        for kind, device, host in (("f", self.floats, self._host_floats),
                                   ("i", self.ints, self._host_ints)):
            n = self._used[kind]
            if n:
                self.upload(kind, device[:n], host[:n])


_recording = None  # the _Scalars of the capture in progress, if any


def recording():
    """The capture in progress (its _Scalars), or None: layers and optimizers ask,
    to read what changes per step from device memory instead of their arguments."""
    return _recording


@contextmanager
def _capturing(scalars):
    global _recording
    _recording = scalars
    try:
        yield
    finally:
        _recording = None


# ------------------------------------------------------------ the captured step

def _cupy():
    import cupy

    return cupy


def _run_and_capture(run, scalars):
    """``run()`` once for real, then captured: on a stream and a CuPy memory pool
    of their own, so that nothing allocated later can be handed the graph's
    memory (and the real run fills the pool with the blocks the capture then
    takes, so that capturing allocates no device memory). Returns (pool, the real
    run's result, the captured run's result, the graph). If the capture fails,
    its exception is raised with ``done`` set to the real run's result and
    ``pool`` to the pool holding it. Whoever keeps a result keeps its pool: with
    CuPy 13 an array does not keep its pool alive, and a pool that goes frees
    its memory under the arrays still using it."""
    cp = _cupy()
    _, K = B._cuda_kernels()
    pool = cp.cuda.MemoryPool()
    stream = cp.cuda.Stream(non_blocking=True)
    cp.cuda.get_current_stream().synchronize()  # the inputs, for the other stream
    with cp.cuda.using_allocator(pool.malloc), stream:
        done = run()
        K.graph_begin()
        try:
            with _capturing(scalars):
                captured = run()
        except BaseException as exc:
            try:
                K.graph_end()  # end the capture; the partial graph is dropped
            except RuntimeError:
                pass  # an invalidated capture: ending it is all that was needed
            stream.synchronize()
            exc.done, exc.pool = done, pool
            raise
        graph = K.graph_end()
    stream.synchronize()
    return pool, done, captured, graph


class CapturedStep:
    """One training step (zero_grad, forward, loss, backward, optimizer step) of a
    model on the GPU, captured as a CUDA graph on first use and replayed after."""

    def __init__(self, model, loss_fn=None, optimizer=None, warmup=1, fallback=False):
        from .nn import CrossEntropyLoss
        from .optim import Adam

        if model.device != "cuda":
            raise ValueError("CapturedStep: the model must be on the GPU (model.to('cuda'))")
        self.model = model
        self.loss_fn = loss_fn if loss_fn is not None else CrossEntropyLoss()
        self.optimizer = optimizer if optimizer is not None else Adam(model.parameters())
        if int(warmup) < 1:
            raise ValueError(f"CapturedStep: warmup must be >= 1 (the optimizer's state is "
                             f"made by an eager step), got {warmup}")
        self.warmup = int(warmup)
        # fallback: when capturing fails, say why (``disabled``) and go on eagerly.
        # Nothing has run then (a capture executes no kernel, and the counters
        # only advance at replays), so the eager step is the step.
        self.fallback = bool(fallback)
        self.disabled = None
        self.logits = self.targets = self.hits = None
        self.captures = 0  # graphs captured so far (a changed model or shape recaptures)
        self._eager_left = self.warmup
        self._graph = None
        # Every pool a capture made, kept for the step's lifetime: the results and
        # any optimizer state made in them (see _run_and_capture) may outlive the
        # graph (a recapture, a fallback).
        self._pools = []

    # -- what a graph depends on: shapes, the layers and their settings, the
    # arrays it reads and writes (by identity), the optimizer's options but
    # those its replays read from device scalars (lr, SGD's momentum while it
    # stays non-zero, Adam's betas: what the schedules change). Any change to a
    # layer bumps nn's state version, so while it stands still (replays count in
    # place, without bumping it) the shapes and options suffice.
    _DEVICE_OPTIONS = ("params", "lr", "initial_lr", "momentum", "betas")

    def _options(self):
        return tuple(tuple(v for k, v in g.items() if k not in self._DEVICE_OPTIONS) +
                     (bool(g.get("momentum")),) for g in self.optimizer.param_groups)

    def _same_graph(self, x, y):
        if self._graph is None:
            return False
        if (_state_version() == self._version and x.shape == self._x.shape and
                y.shape == self._y.shape and self._options() == self._options_now):
            return True
        if self._key(x, y) != self._key_now:
            return False
        self._version, self._options_now = _state_version(), self._options()
        return True

    def _key(self, x, y):
        plain = (int, float, bool, str, tuple, type(None))
        layers = tuple((id(m), m.training, tuple(sorted(
            (k, v) for k, v in vars(m).items() if not k.startswith("_") and isinstance(v, plain))))
            for m in self.model.modules())
        arrays = tuple(id(a) for a in self.model.buffers()) + tuple(
            id(p.data) for g in self.optimizer.param_groups for p in g["params"]) + tuple(
            id(v) for s in self.optimizer.state.values() for v in s.values()
            if hasattr(v, "shape"))  # the state the graph updates (load_state_dict replaces it)
        groups = tuple(tuple(sorted((k, repr(v)) for k, v in g.items()
                                    if k not in ("params", "lr", "initial_lr")))
                       for g in self.optimizer.param_groups)
        return x.shape, y.shape, layers, arrays, groups

    def _eager(self, x, y, y_host=None):
        """One step, run now (or captured). y_host: the labels as the host had them,
        checked there rather than on the GPU (no wait)."""
        from . import functional as F

        opt, loss_fn = self.optimizer, self.loss_fn
        opt.zero_grad()
        logits = self.model(x)
        if isinstance(y_host, np.ndarray) and logits.ndim == 2:
            with F._checked_targets(y_host, logits.shape[1],
                                    getattr(loss_fn, "ignore_index", -100)):
                loss = loss_fn(logits, y)
        else:
            loss = loss_fn(logits, y)
        self.model.backward(loss_fn.backward(), input_grad=False)
        opt.step()
        self.hits = device_hits(loss_fn)
        return loss, logits

    def _check_targets(self, y):
        """The eager step's target check, before a replay: on the host for host
        labels; for GPU labels one kernel (the loss's own target count) and one wait."""
        classes = self._logits.shape[1]
        ignore = getattr(self.loss_fn, "ignore_index", -100)
        if not isinstance(y, np.ndarray) and y.ndim == 1 and self._logits.ndim == 2:
            _, K = B._cuda_kernels()
            K.cross_entropy_total(self._logits, y, ignore, 0.0, False, None, self._status)
            if not int(self._status[1].get()):
                return
        from . import functional as F

        bad = (y != ignore) & ((y < 0) | (y >= classes))
        if bool(bad.any()):
            F._raise_bad_target("cross_entropy", y, bad, classes, ignore)

    def _capture(self, x, y, y_host=None):
        """This call's step, run eagerly, then the capture of the next ones (which
        runs nothing): returns the eager step's loss (see _run_and_capture)."""
        cp = _cupy()
        self._graph = None
        self._x, self._y = cp.empty_like(x), cp.empty_like(y)
        self._x[...] = x
        self._y[...] = y
        scalars = _Scalars(cp)
        self.targets = self._y

        def step():
            return (*self._eager(self._x, self._y, y_host), self.hits)

        pool, (eager_loss, self.logits, eager_hits), (loss, logits, _), graph = \
            _run_and_capture(step, scalars)
        # this call's hits are the eager step's: the captured run's count is the graph's
        # buffer, written by its replays only
        self.hits = eager_hits
        self._pools.append(pool)
        # The graph's output buffers (this call's results are the eager step's).
        self._loss, self._logits, self._scalars, self._graph = loss, logits, scalars, graph
        self._status = cp.empty(3, np.int64)
        self._ce_status = getattr(self.loss_fn, "_status", None)  # the graph's CE counts
        self._key_now = self._key(x, y)
        self._version, self._options_now = _state_version(), self._options()
        self.captures += 1
        return eager_loss

    def __call__(self, x, y):
        cp = _cupy()
        if self._eager_left > 0 or self.disabled is not None:
            self._eager_left = max(self._eager_left - 1, 0)
            self.targets = cp.asarray(y, dtype=np.int64, order="C")
            loss, self.logits = self._eager(cp.asarray(x, dtype=np.float32, order="C"),
                                            self.targets, y)
            return loss
        if not self._same_graph(x, y):
            try:
                return self._capture(cp.asarray(x, dtype=np.float32, order="C"),
                                     cp.asarray(y, dtype=np.int64, order="C"), y)
            except (CaptureError, RuntimeError) as exc:
                if hasattr(exc, "pool"):
                    self._pools.append(exc.pool)  # it holds the eager step's results
                if not self.fallback or not hasattr(exc, "done"):
                    raise
                self.disabled = f"{type(exc).__name__}: {exc}"
                self.logits, self.hits = exc.done[1], exc.done[2]
                return exc.done[0]  # the step was done, eagerly
        _fill(self._scalars.upload, "x", self._x, x)
        _fill(self._scalars.upload, "y", self._y, y)
        self._check_targets(y if isinstance(y, np.ndarray) else self._y)
        self._scalars.refresh()
        self._graph.launch()
        self.logits, self.targets = self._logits, self._y
        self.hits = None if self._ce_status is None else self._ce_status[2].copy()
        return self._loss.copy()


class CapturedForward:
    """Inference of a Sequential in eval mode on GPU arrays, as replayed CUDA
    graphs: what ``Sequential.forward(x, record=False)`` runs on the GPU from the
    third call of a shape on (the first runs the layers, the second runs them on
    the graph's stream and captures them). A graph is kept for each of the last
    ``max_shapes`` input shapes used (an evaluation loop's full batches and its
    last, smaller one replay both, epoch after epoch), each with its own memory
    pool. Valid while nn's state version stands still (any change to the model
    bumps it: every graph is dropped, the next calls capture again); the output
    is a copy, as the layers' path returns a fresh array. A capture that fails
    leaves ``disabled`` set and the layers' path."""

    max_shapes = 4

    def __init__(self, layers, run):
        self._layers, self._run = layers, run  # run(x): the layers' path
        self._version = None
        self._graphs = {}  # shape: (input buffer, output buffer, pool, graph), last used last
        self._seen = {}  # shape: calls so far without a graph
        self.disabled = None

    def __call__(self, x):
        if self.disabled is not None:
            return self._run(x)
        if _state_version() != self._version:
            self._version, self._graphs, self._seen = _state_version(), {}, {}
        shape = x.shape
        entry = self._graphs.pop(shape, None)
        if entry is not None:
            self._graphs[shape] = entry  # now the most recently used
            buffer, out, _, graph = entry
            buffer[...] = x
            graph.launch()
            return out.copy()
        seen = self._seen.pop(shape, 0) + 1
        if seen < 2:
            self._seen[shape] = seen
            while len(self._seen) > self.max_shapes:
                del self._seen[next(iter(self._seen))]
            return self._run(x)
        cp = _cupy()
        buffer = cp.empty_like(x)
        buffer[...] = x
        try:
            pool, out, captured, graph = _run_and_capture(
                lambda: self._run(buffer), _Scalars(cp, allocate=False))
        except (CaptureError, RuntimeError) as exc:
            self.disabled = f"{type(exc).__name__}: {exc}"
            # a copy out of the pool, which goes with the exception
            return exc.done.copy() if hasattr(exc, "done") else self._run(x)
        self._graphs[shape] = (buffer, captured, pool, graph)
        while len(self._graphs) > self.max_shapes:
            del self._graphs[next(iter(self._graphs))]  # the least recently used
        return out.copy()  # the caller's, not the pool's

    @property
    def shapes(self):
        """The input shapes with a graph, least recently used first."""
        return list(self._graphs)


def device_hits(loss_fn):
    """The last GPU cross-entropy forward's count of rows predicted right (a 0-d
    device array its kernel wrote), or None."""
    status = getattr(loss_fn, "_status", None)
    return None if status is None else status[2]


def _fill(upload, key, buffer, value):
    """Copy a batch into a graph's input buffer: from the host (one asynchronous
    transfer) or the GPU."""
    if isinstance(value, np.ndarray):
        upload(key, buffer, value)
    else:
        buffer[...] = value


# ------------------------------------------------ hooks for layers and optimizers

def dropout_offset(layer):
    """In a capture: the device slot of a Dropout layer's offset for this step
    (the layer's counter advances at every replay); else None."""
    scalars = recording()
    if scalars is None:
        return None

    def next_offset():
        value = int(layer.offset)
        layer.offset[...] += 1  # in place: not a change of the model (state_version)
        return value

    return scalars.int_for(next_offset)


def batch_norm_count(layer):
    """In a capture: count the batch at every replay instead of now; True if so."""
    scalars = recording()
    if scalars is None:
        return False
    if layer.momentum is None:
        raise CaptureError(f"{type(layer).__name__} with momentum=None (a cumulative average) "
                           "changes its factor every step; give it a momentum to capture")

    def count():
        layer.num_batches_tracked[...] += 1  # in place, as next_offset

    scalars.each_replay(count)
    return True


def sgd_scalars(group):
    """In a capture: the device slots holding a group's lr and momentum at every
    replay (a schedule may change either, OneCycleLR both)."""
    scalars = recording()
    if scalars is None:
        return None
    return scalars.floats_for(2, lambda: [group["lr"], group["momentum"]])


def adam_scalars(group, states, decoupled):
    """In a capture: decay_scale, the betas (b1, 1 - b1, b2, 1 - b2: OneCycleLR
    cycles b1) and each parameter's bias2_sqrt and step_size, its step count
    advancing at every replay (fastcnn.optim.Adam's arithmetic)."""
    scalars = recording()
    if scalars is None:
        return None

    def values():
        lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
        out = [1 - lr * wd if wd and decoupled else 1.0, b1, 1 - b1, b2, 1 - b2]
        for state in states:
            state["step"] += 1
            t = state["step"]
            out += [math.sqrt(1 - b2 ** t), lr / (1 - b1 ** t)]
        return out

    return scalars.floats_for(5 + 2 * len(states), values)
