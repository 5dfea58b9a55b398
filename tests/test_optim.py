"""fastcnn.optim: update rules against float64 NumPy references, state and schedules."""

import json
import math
import warnings

import numpy as np
import pytest

from fastcnn import nn, optim

# torch's schedulers here step optimizers that never step
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")


def _params(seed, shapes=((3, 4), (5,))):
    g = np.random.default_rng(seed)
    return [nn.Parameter(g.standard_normal(s).astype(np.float32)) for s in shapes]


def _grads(seed, params, steps):
    g = np.random.default_rng(seed + 100)
    return [[g.standard_normal(p.shape).astype(np.float32) for p in params]
            for _ in range(steps)]


def sgd_reference(p, grads, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                  maximize=False):
    """torch.optim.SGD's rule in float64."""
    p = p.astype(np.float64)
    buf = None
    for g in grads:
        g = (-1 if maximize else 1) * g.astype(np.float64) + weight_decay * p
        if momentum:
            buf = g.copy() if buf is None else momentum * buf + (1 - dampening) * g
            g = g + momentum * buf if nesterov else buf
        p = p - lr * g
    return p


def adam_reference(p, grads, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                   decoupled=False, amsgrad=False, maximize=False):
    """torch.optim.Adam / AdamW's rule in float64."""
    p = p.astype(np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    v_max = np.zeros_like(p)
    b1, b2 = betas
    for t, g in enumerate(grads, 1):
        g = (-1 if maximize else 1) * g.astype(np.float64)
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        v_max = np.maximum(v_max, v)
        m_hat, v_hat = m / (1 - b1 ** t), (v_max if amsgrad else v) / (1 - b2 ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def _run(opt_cls, kwargs, steps=3, seed=0):
    params = _params(seed)
    start = [p.data.copy() for p in params]
    grads = _grads(seed, params, steps)
    opt = opt_cls(params, **kwargs)
    for step_grads in grads:
        opt.zero_grad()
        for p, g in zip(params, step_grads):
            p.accumulate(g.copy())
        opt.step()
    return params, start, grads


SGD_CASES = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    dict(lr=0.1, weight_decay=0.1),
    dict(lr=0.05, momentum=0.9, weight_decay=0.01, maximize=True),
]


@pytest.mark.parametrize("kwargs", SGD_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
@pytest.mark.parametrize("steps", [1, 3])
def test_sgd_matches_reference(kwargs, steps):
    params, start, grads = _run(optim.SGD, kwargs, steps)
    for i, p in enumerate(params):
        want = sgd_reference(start[i], [g[i] for g in grads], **kwargs)
        assert p.data.dtype == np.float32
        np.testing.assert_allclose(p.data, want, rtol=1e-5, atol=1e-6)


ADAM_CASES = [
    (optim.Adam, dict(lr=1e-2), False),
    (optim.Adam, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05), False),
    (optim.AdamW, dict(lr=1e-2), True),
    (optim.AdamW, dict(lr=1e-2, weight_decay=0.1), True),
    (optim.Adam, dict(lr=1e-2, weight_decay=0.05, amsgrad=True), False),
    (optim.AdamW, dict(lr=1e-2, amsgrad=True, maximize=True), True),
    (optim.Adam, dict(lr=1e-2, maximize=True), False),
]


@pytest.mark.parametrize("cls,kwargs,decoupled", ADAM_CASES,
                         ids=["adam", "adam-wd", "adamw", "adamw-wd", "adam-amsgrad",
                              "adamw-amsgrad-maximize", "adam-maximize"])
@pytest.mark.parametrize("steps", [1, 4])
def test_adam_and_adamw_match_reference(cls, kwargs, decoupled, steps):
    params, start, grads = _run(cls, kwargs, steps)
    ref_kwargs = dict(kwargs)
    if cls is optim.AdamW:
        ref_kwargs.setdefault("weight_decay", 0.01)
    for i, p in enumerate(params):
        want = adam_reference(start[i], [g[i] for g in grads], decoupled=decoupled, **ref_kwargs)
        np.testing.assert_allclose(p.data, want, rtol=1e-5, atol=1e-6)


def _step_beside_torch(torch, seed, steps, ours, make_theirs):
    """Run fastcnn's optimizer (over _params(seed)) and torch's (over copies) on the
    same gradients; check the gradients are left alone and the weights agree."""
    params = [p for group in ours.param_groups for p in group["params"]]
    tparams = [torch.tensor(p.data.copy(), requires_grad=True) for p in params]
    theirs = make_theirs(tparams)
    for step_grads in _grads(seed, params, steps):
        ours.zero_grad()
        for p, tp, g in zip(params, tparams, step_grads):
            p.accumulate(g.copy())
            tp.grad = torch.tensor(g)
        ours.step()
        theirs.step()
        for p, g in zip(params, step_grads):
            np.testing.assert_array_equal(p.grad, g)
    for p, tp in zip(params, tparams):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_matches_pytorch_when_installed(name):
    torch = pytest.importorskip("torch")
    ours = optim.build_optimizer(name, _params(1), lr=0.05, momentum=0.9, weight_decay=0.01)
    theirs = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True,
                                                weight_decay=0.01),
              "adam": lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.01),
              "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.01)}[name]
    _step_beside_torch(torch, 1, 3, ours, theirs)


@pytest.mark.parametrize("name,kwargs", [
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, maximize=True)),
    ("Adam", dict(lr=0.05, weight_decay=0.01, amsgrad=True)),
    ("AdamW", dict(lr=0.05, betas=(0.8, 0.95), amsgrad=True, maximize=True)),
])
def test_options_match_pytorch_when_installed(name, kwargs):
    """amsgrad and maximize, as torch's, over five steps."""
    torch = pytest.importorskip("torch")
    ours = getattr(optim, name)(_params(2), **kwargs)
    _step_beside_torch(torch, 2, 5, ours, lambda ps: getattr(torch.optim, name)(ps, **kwargs))
    if kwargs.get("amsgrad"):
        assert "max_exp_avg_sq" in ours.state_dict()["state"][0]


def test_params_without_grad_are_skipped_and_groups_have_their_options():
    a, b, c = _params(2, ((2, 2), (3,), (4,)))
    before = [p.data.copy() for p in (a, b, c)]
    opt = optim.SGD([{"params": [a, b]}, {"params": [c], "lr": 1.0}], lr=0.1)
    a.accumulate(np.ones((2, 2), np.float32))
    c.accumulate(np.ones(4, np.float32))
    opt.step()
    np.testing.assert_allclose(a.data, before[0] - 0.1, rtol=1e-6)
    np.testing.assert_array_equal(b.data, before[1])
    np.testing.assert_allclose(c.data, before[2] - 1.0, rtol=1e-6)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_state_dict_resumes_exactly(name):
    steps = _grads(3, _params(3), 4)

    def run(resume_after=None):
        params = _params(3)
        opt = optim.build_optimizer(name, params, lr=0.01, momentum=0.9)
        for i, gs in enumerate(steps):
            if i == resume_after:
                state = opt.state_dict()
                copies = [p.data.copy() for p in params]
                params = [nn.Parameter(c) for c in copies]
                opt = optim.build_optimizer(name, params, lr=999.0, momentum=0.9)
                opt.load_state_dict(state)
            opt.zero_grad()
            for p, g in zip(params, gs):
                p.accumulate(g.copy())
            opt.step()
        return params

    for a, b in zip(run(), run(resume_after=2)):
        np.testing.assert_array_equal(a.data, b.data)


def test_load_state_dict_checks_shapes_and_groups():
    opt = optim.SGD(_params(0), lr=0.1, momentum=0.9)
    for p in opt.param_groups[0]["params"]:
        p.accumulate(np.ones(p.shape, np.float32))
    opt.step()
    state = opt.state_dict()
    other = optim.SGD(_params(0, ((3, 4), (6,))), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="groups"):
        optim.SGD([{"params": [p]} for p in _params(0)], lr=0.1).load_state_dict(state)


def test_argument_errors():
    with pytest.raises(ValueError, match="empty"):
        optim.SGD([], lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        optim.SGD(_params(0), lr=-1)
    with pytest.raises(ValueError, match="Nesterov"):
        optim.SGD(_params(0), lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        optim.Adam(_params(0), betas=(1.0, 0.9))
    with pytest.raises(TypeError, match="Parameters"):
        optim.Adam([np.zeros(3)])
    with pytest.raises(ValueError, match="unknown optimizer"):
        optim.build_optimizer("rmsprop", _params(0), lr=0.1)


def test_step_and_cosine_schedules():
    opt = optim.SGD(_params(0), lr=1.0)
    sched = optim.StepLR(opt, step_size=2, gamma=0.5)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs == [1.0, 1.0, 0.5, 0.5, 0.25]

    opt = optim.SGD(_params(0), lr=0.4)
    sched = optim.CosineAnnealingLR(opt, T_max=10, warmup=2, eta_min=0.0, interval="step")
    lrs = []
    for _ in range(12):
        lrs.append(sched.get_last_lr()[0])
        sched.step()
    assert lrs[:3] == pytest.approx([0.2, 0.4, 0.4])
    assert lrs[6] == pytest.approx(0.4 * (1 + math.cos(math.pi * 4 / 8)) / 2)
    assert lrs[10] == lrs[11] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))

    fresh = optim.SGD(_params(0), lr=0.4)
    resumed = optim.CosineAnnealingLR(fresh, T_max=10, warmup=2, interval="step")
    resumed.load_state_dict({"last_step": 6, "base_lrs": [0.4]})
    assert resumed.get_last_lr()[0] == pytest.approx(lrs[6])
    with pytest.raises(ValueError, match="warmup"):
        optim.CosineAnnealingLR(fresh, T_max=3, warmup=3)


@pytest.mark.parametrize("cls,kwargs", [(optim.SGD, k) for k in SGD_CASES] +
                         [(c, k) for c, k, _ in ADAM_CASES])
def test_one_pass_cpu_update_equals_numpy_expression(cls, kwargs, monkeypatch):
    """fastcnn._cpu's sgd_step / adam_step give the NumPy expression's bits."""
    fused, _, _ = _run(cls, kwargs, 3)
    monkeypatch.setattr(optim, "_fused_cpu", lambda *arrays: False)
    plain, _, _ = _run(cls, kwargs, 3)
    for a, b in zip(fused, plain):
        np.testing.assert_array_equal(a.data, b.data)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, float("inf")])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_norm_matches_its_definition(norm_type, max_norm):
    """The total norm of the per-parameter norms (float64 reference), and every gradient
    scaled by min(1, max_norm / (total + 1e-6)); parameters without a gradient skipped."""
    from fastcnn import nn

    params = _params(3)
    grads = _grads(3, params, 1)[0]
    for p, g in zip(params[1:], grads[1:]):
        p.accumulate(g.copy())
    flat = np.concatenate([g.astype(np.float64).ravel() for g in grads[1:]])
    want = np.abs(flat).max() if np.isinf(norm_type) else \
        (np.abs(flat) ** norm_type).sum() ** (1 / norm_type)
    total = nn.utils.clip_grad_norm_(params, max_norm, norm_type)
    assert total.dtype == np.float32 and total.shape == ()
    np.testing.assert_allclose(float(total), want, rtol=1e-6)
    scale = min(1.0, max_norm / (want + 1e-6))
    assert params[0].grad is None
    for p, g in zip(params[1:], grads[1:]):
        np.testing.assert_allclose(p.grad, g * scale, rtol=1e-6, atol=1e-8)


def test_clip_grad_value_and_errors():
    from fastcnn import nn

    params = _params(4)
    grads = _grads(4, params, 1)[0]
    grads[0].reshape(-1)[0] = np.nan  # stays NaN, as torch's clamp leaves it
    for p, g in zip(params, grads):
        p.accumulate(g.copy())
    nn.utils.clip_grad_value_(params, 0.3)
    for p, g in zip(params, grads):
        np.testing.assert_array_equal(p.grad, np.clip(g, -0.3, 0.3))
    with pytest.raises(RuntimeError, match="nan"):
        nn.utils.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    with pytest.raises(ValueError, match="norm_type"):
        nn.utils.clip_grad_norm_(params, 1.0, norm_type="two")
    with pytest.raises(ValueError, match="norm_type"):
        nn.utils.clip_grad_norm_(params, 1.0, norm_type=float("nan"))
    with pytest.raises(TypeError, match="norm_type"):
        nn.utils.clip_grad_norm_(params, 1.0, norm_type=None)
    with pytest.raises(TypeError, match="max_norm"):
        nn.utils.clip_grad_norm_(params, "1")
    with pytest.raises(ValueError, match="clip_value"):
        nn.utils.clip_grad_value_(params, -1)
    with pytest.raises(TypeError, match="Parameters"):
        nn.utils.clip_grad_norm_([np.zeros(3)], 1.0)
    assert float(nn.utils.clip_grad_norm_([], 1.0)) == 0.0


@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_clip_grad_norm_matches_pytorch_when_installed(norm_type):
    torch = pytest.importorskip("torch")
    from fastcnn import nn

    params = _params(5)
    grads = _grads(5, params, 1)[0]
    tparams = [torch.tensor(p.data.copy(), requires_grad=True) for p in params]
    for p, tp, g in zip(params, tparams, grads):
        p.accumulate(g.copy())
        tp.grad = torch.tensor(g)
    ours = nn.utils.clip_grad_norm_(params, 0.7, norm_type)
    theirs = torch.nn.utils.clip_grad_norm_(tparams, 0.7, norm_type)
    np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-6)
    for p, tp in zip(params, tparams):
        np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("norm_type,want", [
    # G = [1, 0, 2], [0, 0, 0], [3, -4]: hand-computed, as torch defines them
    (0, 2.0),  # the number of gradients with a non-zero entry (torch's 0-norm of the counts)
    ("inf", 4.0), (float("inf"), 4.0), ("-inf", 0.0), (-1, 0.0),  # a zero entry: p < 0 gives 0
    (1, 10.0), (0.5, (1 + 2 ** 0.5 + 3 ** 0.5 + 2) ** 2), (3, (1 + 8 + 27 + 64) ** (1 / 3)),
])
def test_clip_grad_norm_norm_types_by_hand_and_as_pytorch(norm_type, want):
    params = [nn.Parameter(np.zeros(n, np.float32)) for n in (3, 3, 2)]
    grads = [np.array(g, np.float32) for g in ([1, 0, 2], [0, 0, 0], [3, -4])]
    for p, g in zip(params, grads):
        p.accumulate(g.copy())
    total = nn.utils.clip_grad_norm_(params, 1.0, norm_type, foreach=True)
    assert float(total) == pytest.approx(want, rel=1e-6)
    scale = min(1.0, 1.0 / (want + 1e-6))
    for p, g in zip(params, grads):
        np.testing.assert_allclose(p.grad, g * scale, rtol=1e-6)
    torch = pytest.importorskip("torch")
    tparams = [torch.zeros(len(g), requires_grad=True) for g in grads]
    for tp, g in zip(tparams, grads):
        tp.grad = torch.tensor(g)
    theirs = torch.nn.utils.clip_grad_norm_(tparams, 1.0, norm_type)
    np.testing.assert_allclose(float(total), float(theirs), rtol=1e-6)
    for p, tp in zip(params, tparams):
        np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=1e-6)


def test_clip_grad_norm_negative_norm_without_zeros_as_pytorch():
    params = _params(6)
    grads = _grads(6, params, 1)[0]
    for p, g in zip(params, grads):
        p.accumulate(g.copy())
    flat = np.concatenate([g.astype(np.float64).ravel() for g in grads])
    for norm_type, want in ((-2.0, (np.abs(flat) ** -2.0).sum() ** -0.5),
                            (float("-inf"), np.abs(flat).min())):
        total = nn.utils.clip_grad_norm_(params, 1e3, norm_type)  # no clipping: the norms
        np.testing.assert_allclose(float(total), want, rtol=1e-6)


# ---------------------------------------------------------------- optimizer groups and errors

def test_groups_keep_keys_that_are_not_options_and_rebuild():
    a, b = _params(7)
    opt = optim.SGD([{"params": [a], "name": "w"}, {"params": [b], "name": "b", "lr": 0.5}],
                    lr=0.1, momentum=0.9)
    assert [g["name"] for g in opt.param_groups] == ["w", "b"]
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5]
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.state_dict()["param_groups"][1]["name"] == "b"
    optim.StepLR(opt, 2)  # writes "initial_lr" into the groups
    rebuilt = optim.SGD(opt.param_groups, lr=0.1)  # torch's idiom
    for old, new in zip(opt.param_groups, rebuilt.param_groups):
        assert new == old and new is not old  # the keys kept; the dicts the optimizer's own
    other = optim.SGD([nn.Parameter(a.data.copy()), nn.Parameter(b.data.copy())], lr=0.1)
    with pytest.raises(ValueError, match="groups"):
        other.load_state_dict(opt.state_dict())
    fresh = optim.SGD([{"params": [nn.Parameter(a.data.copy())]},
                       {"params": [nn.Parameter(b.data.copy())]}], lr=0.1)
    fresh.load_state_dict(opt.state_dict())
    assert [g["name"] for g in fresh.param_groups] == ["w", "b"]
    assert fresh.param_groups[1]["initial_lr"] == 0.5
    with pytest.raises(ValueError, match="another optimizer"):
        optim.Adam([{"params": [a]}, {"params": [b]}]).load_state_dict(opt.state_dict())


def test_add_param_group_as_pytorch():
    a, b, c = _params(8, ((2, 3), (4,), (5,)))
    opt = optim.SGD([a], lr=0.1, momentum=0.9)
    opt.add_param_group({"params": b, "lr": 0.01, "name": "extra"})
    group = opt.param_groups[1]
    assert group["params"] == [b] and group["lr"] == 0.01 and group["name"] == "extra"
    assert group["momentum"] == 0.9 and group["nesterov"] is False  # the defaults filled in
    with pytest.raises(ValueError, match="more than one"):
        opt.add_param_group({"params": [c, a]})
    with pytest.raises(ValueError, match="more than once"):
        opt.add_param_group({"params": [c, c]})
    with pytest.raises(TypeError, match="set"):
        opt.add_param_group({"params": {c}})
    with pytest.raises(TypeError, match="set"):  # (torch takes one, in the set's order)
        optim.SGD({c})
    with pytest.raises(TypeError, match="dict"):
        opt.add_param_group([c])
    with pytest.raises(ValueError, match="momentum"):
        opt.add_param_group({"params": [c], "momentum": -1})
    assert len(opt.param_groups) == 2  # a refused group is not half added
    torch = pytest.importorskip("torch")

    def make_theirs(ps):
        theirs = torch.optim.SGD([ps[0]], lr=0.1, momentum=0.9)
        theirs.add_param_group({"params": ps[1], "lr": 0.01})
        theirs.add_param_group({"params": [ps[2]], "weight_decay": 0.1})
        return theirs

    opt.add_param_group({"params": [c], "weight_decay": 0.1})
    _step_beside_torch(torch, 8, 3, opt, make_theirs)


def test_zero_grad_set_to_none_as_pytorch():
    params = _params(9)
    opt = optim.Adam(params)
    for p in params:
        p.accumulate(np.ones(p.shape, np.float32))
    kept = [p.grad for p in params]
    opt.zero_grad(set_to_none=False)
    for p, g in zip(params, kept):
        assert p.grad is g and not p.grad.any()  # zeros, in the same arrays
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    opt.zero_grad(set_to_none=False)  # no gradient: stays None, as torch's
    assert all(p.grad is None for p in params)
    params[0].grad = np.broadcast_to(np.float32(1), params[0].shape)  # read-only
    opt.zero_grad(set_to_none=False)
    assert params[0].grad.shape == params[0].shape and not params[0].grad.any()
    torch = pytest.importorskip("torch")
    t = torch.zeros(3, requires_grad=True)
    t.grad = torch.ones(3)
    torch.optim.Adam([t]).zero_grad(set_to_none=False)
    assert t.grad.tolist() == [0.0, 0.0, 0.0]


BAD_OPTIONS = [
    ("SGD", lambda ps: dict(params=ps[0]), TypeError, "params"),
    ("SGD", lambda ps: dict(params=3), TypeError, "params"),
    ("SGD", lambda ps: dict(params=ps, lr="a"), TypeError, "lr"),
    ("SGD", lambda ps: dict(params=ps, lr=-0.1), ValueError, "lr"),
    ("SGD", lambda ps: dict(params=ps, momentum=-0.9), ValueError, "momentum"),
    ("SGD", lambda ps: dict(params=ps, weight_decay=-1e-4), ValueError, "weight_decay"),
    ("SGD", lambda ps: dict(params=ps, nesterov=True), ValueError, "nesterov"),
    ("SGD", lambda ps: dict(params=ps, momentum=0.9, dampening=0.1, nesterov=True), ValueError,
     "nesterov"),
    ("Adam", lambda ps: dict(params=ps, betas=(0.9,)), ValueError, "betas"),
    ("Adam", lambda ps: dict(params=ps, betas=(0.9, 1.0)), ValueError, "betas"),
    ("Adam", lambda ps: dict(params=ps, betas=(-0.1, 0.9)), ValueError, "betas"),
    ("AdamW", lambda ps: dict(params=ps, betas=("a", 0.9)), TypeError, "betas"),
    ("Adam", lambda ps: dict(params=ps, eps=-1e-8), ValueError, "eps"),
    ("AdamW", lambda ps: dict(params=ps, weight_decay=-0.01), ValueError, "weight_decay"),
    ("Adam", lambda ps: dict(params=ps, lr=-1e-3), ValueError, "lr"),
]


@pytest.mark.parametrize("name,kwargs,error,match", BAD_OPTIONS,
                         ids=[f"{n}-{i}" for i, (n, *_) in enumerate(BAD_OPTIONS)])
def test_bad_options_name_the_argument_where_pytorch_raises(name, kwargs, error, match):
    with pytest.raises(error, match=match):
        getattr(optim, name)(**kwargs(_params(0)))
    torch = pytest.importorskip("torch")
    tparams = [torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)]
    with pytest.raises(Exception):
        getattr(torch.optim, name)(**kwargs(tparams))


def test_a_group_s_options_are_checked_too():
    a, b = _params(0)
    with pytest.raises(ValueError, match="lr"):
        optim.SGD([{"params": [a]}, {"params": [b], "lr": -1}], lr=0.1)
    with pytest.raises(ValueError, match="betas"):
        optim.Adam([{"params": [a], "betas": (0.9, 1.5)}])


# ---------------------------------------------------------------- schedulers beside torch

def _scheduled_pair(torch, kind="SGD", lrs=(0.1, 0.03), **kwargs):
    """A fastcnn and a torch optimizer, one group per lr."""
    ours = getattr(optim, kind)([{"params": [nn.Parameter(np.zeros(2, np.float32))], "lr": lr}
                                 for lr in lrs], **kwargs)
    theirs = getattr(torch.optim, kind)([{"params": [torch.zeros(2, requires_grad=True)],
                                          "lr": lr} for lr in lrs], **kwargs)
    return ours, theirs


def _same_groups(ours, theirs, momentum):
    for a, b in zip(ours.param_groups, theirs.param_groups):
        assert a["lr"] == pytest.approx(b["lr"], abs=1e-12, rel=1e-12)
        if momentum:
            key = "betas" if "betas" in a else "momentum"
            np.testing.assert_allclose(np.ravel(a[key]), np.ravel(b[key]), rtol=1e-12, atol=1e-12)


def _metric(i):
    """A validation loss that falls, stalls, rises and falls again (ReduceLROnPlateau)."""
    return [1.0, 0.8, 0.79995, 0.81, 0.8, 0.7, 0.71, 0.72, 0.7, 0.69][i % 10] + 0.3 * (i // 30)


SCHEDULES = {
    "step": lambda M, o: M.StepLR(o, 7, 0.5),
    "step-float-size": lambda M, o: M.StepLR(o, 2.5, 0.7),
    "step-positional": lambda M, o: M.StepLR(o, 3, 0.9, -1),
    "cosine": lambda M, o: M.CosineAnnealingLR(o, 10),
    "cosine-eta-min": lambda M, o: M.CosineAnnealingLR(o, 7, 0.004, -1),
    "cosine-float-T": lambda M, o: M.CosineAnnealingLR(o, 7.5, 0.001),
    "cosine-T1": lambda M, o: M.CosineAnnealingLR(o, 1),
    "multistep": lambda M, o: M.MultiStepLR(o, [3, 9, 9, 20], 0.3),
    "exponential": lambda M, o: M.ExponentialLR(o, 0.93),
    "lambda": lambda M, o: M.LambdaLR(o, lambda e: 1 / (e + 1)),
    "lambda-per-group": lambda M, o: M.LambdaLR(o, [lambda e: 0.9 ** e, lambda e: e % 4 + 1]),
    "multiplicative": lambda M, o: M.MultiplicativeLR(o, [lambda e: 0.9, lambda e: 1.01]),
    "linear": lambda M, o: M.LinearLR(o, 0.2, 0.9, 8),
    "linear-down": lambda M, o: M.LinearLR(o, 1.0, 0.1, 30),
    "constant": lambda M, o: M.ConstantLR(o, 0.4, 6),
    "constant-0-iters": lambda M, o: M.ConstantLR(o, 0.4, 0),
    "linear-0-iters": lambda M, o: M.LinearLR(o, 0.5, 1.0, 0),
    "onecycle": lambda M, o: M.OneCycleLR(o, [1.0, 0.5], total_steps=60),
    "onecycle-linear-3phase": lambda M, o: M.OneCycleLR(
        o, 1.0, epochs=6, steps_per_epoch=10, pct_start=0.25, anneal_strategy="linear",
        three_phase=True, div_factor=10.0, final_div_factor=100.0),
    "onecycle-no-momentum": lambda M, o: M.OneCycleLR(o, 0.5, total_steps=70, pct_start=0.5,
                                                      cycle_momentum=False),
    "sequential": lambda M, o: M.SequentialLR(o, [M.LinearLR(o, 0.1, total_iters=5),
                                                  M.CosineAnnealingLR(o, 20),
                                                  M.ExponentialLR(o, 0.9)], [5, 30]),
    "chained": lambda M, o: M.ChainedScheduler([M.StepLR(o, 5, 0.5), M.ExponentialLR(o, 0.97),
                                                M.CosineAnnealingLR(o, 12)]),
    "plateau": lambda M, o: M.ReduceLROnPlateau(o, patience=2, factor=0.5, cooldown=1,
                                                min_lr=[0.01, 0.001]),
    "plateau-max-abs": lambda M, o: M.ReduceLROnPlateau(o, "max", 0.3, 0, 0.05, "abs", eps=1e-3),
}


def _step(scheduler, i):
    if type(scheduler).__name__ == "ReduceLROnPlateau":
        scheduler.step(_metric(i))
    else:
        scheduler.step()


def _run_beside_torch(torch, make, steps=60, kind="SGD", edits=None, **opt_kwargs):
    """Step both schedulers ``steps`` times (multiplying every group's lr by edits[i]
    before step i), checking lrs, last lrs and cycled momenta after each."""
    ours, theirs = _scheduled_pair(torch, kind, **opt_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: the scheduler stepped before the optimizer
        a, b = make(optim, ours), make(torch.optim.lr_scheduler, theirs)
        _same_groups(ours, theirs, True)
        for i in range(steps):
            for opt in (ours, theirs):
                for group in opt.param_groups:
                    group["lr"] *= (edits or {}).get(i, 1.0)
            _step(a, i)
            _step(b, i)
            np.testing.assert_allclose(a.get_last_lr(), b.get_last_lr(), rtol=1e-12, atol=1e-12)
            _same_groups(ours, theirs, True)
    return ours, theirs, a, b


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedules_match_pytorch(name):
    """60 steps (past T_max, milestones and the cycle's end), lrs to 1e-12."""
    torch = pytest.importorskip("torch")
    _run_beside_torch(torch, SCHEDULES[name])


@pytest.mark.parametrize("name", ["step", "cosine", "cosine-eta-min", "multistep",
                                  "exponential", "multiplicative", "linear", "constant",
                                  "chained", "plateau"])
def test_a_manual_lr_change_persists_as_in_pytorch(name):
    torch = pytest.importorskip("torch")
    _run_beside_torch(torch, SCHEDULES[name], edits={4: 0.5, 13: 3.0, 31: 0.1})


def test_schedules_with_adam_cycle_beta1_as_pytorch():
    torch = pytest.importorskip("torch")
    ours, _, _, _ = _run_beside_torch(torch, SCHEDULES["onecycle"], kind="Adam",
                                      betas=(0.9, 0.99))
    assert ours.param_groups[0]["betas"][1] == 0.99


def test_two_schedulers_on_one_optimizer_combine_as_in_pytorch():
    torch = pytest.importorskip("torch")
    ours, theirs = _scheduled_pair(torch)
    L = torch.optim.lr_scheduler
    a = [optim.StepLR(ours, 3, 0.5), optim.CosineAnnealingLR(ours, 10), optim.LinearLR(ours)]
    b = [L.StepLR(theirs, 3, 0.5), L.CosineAnnealingLR(theirs, 10), L.LinearLR(theirs)]
    for _ in range(60):
        for s in a + b:
            s.step()
        _same_groups(ours, theirs, False)
        assert a[0].get_last_lr() == pytest.approx(b[0].get_last_lr(), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("name", ["step", "cosine-eta-min", "multistep", "linear", "constant",
                                  "onecycle", "sequential", "chained", "plateau", "lambda"])
@pytest.mark.parametrize("source", ["fastcnn", "torch"])
def test_resume_from_a_state_dict_as_pytorch(name, source):
    """Save after 23 steps (fastcnn's or torch's state_dict, through JSON as in a
    checkpoint), load into a new optimizer and scheduler, go on: torch's values."""
    torch = pytest.importorskip("torch")
    make = SCHEDULES[name]
    ours, theirs, a, b = _run_beside_torch(torch, make, steps=23)
    saved = a.state_dict() if source == "fastcnn" else b.state_dict()
    state = json.loads(json.dumps({"opt": ours.state_dict(), "sched": saved}))
    fresh, _ = _scheduled_pair(torch, lrs=(7.0, 9.0))
    again = make(optim, fresh)
    fresh.load_state_dict(state["opt"])
    again.load_state_dict(state["sched"])
    assert again.get_last_lr() == pytest.approx(b.get_last_lr(), rel=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(23, 60):
            _step(again, i)
            _step(b, i)
            _same_groups(fresh, theirs, True)


def test_last_epoch_resumes_as_pytorch_and_needs_initial_lr():
    torch = pytest.importorskip("torch")
    L = torch.optim.lr_scheduler
    for name in ("StepLR", "CosineAnnealingLR", "ExponentialLR"):
        args = {"StepLR": (3, 0.5), "CosineAnnealingLR": (10, 0.01), "ExponentialLR": (0.9,)}[name]
        ours, theirs = _scheduled_pair(torch)
        with pytest.raises(KeyError, match="initial_lr"):
            getattr(optim, name)(ours, *args, last_epoch=4)
        with pytest.raises(KeyError):
            getattr(L, name)(theirs, *args, last_epoch=4)
        for opt in (ours, theirs):
            for group, lr in zip(opt.param_groups, (0.2, 0.05)):
                group["initial_lr"] = lr
        a, b = getattr(optim, name)(ours, *args, 4), getattr(L, name)(theirs, *args, 4)
        assert a.last_epoch == b.last_epoch == 5
        for _ in range(30):
            a.step()
            b.step()
            _same_groups(ours, theirs, False)


def test_step_with_an_epoch_uses_the_closed_form_as_pytorch():
    torch = pytest.importorskip("torch")
    for name in ("step", "cosine-eta-min", "multistep", "linear", "constant", "exponential",
                 "lambda"):
        ours, theirs = _scheduled_pair(torch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a, b = SCHEDULES[name](optim, ours), SCHEDULES[name](torch.optim.lr_scheduler, theirs)
            for epoch in (5, 2, 17, 40, 3):
                a.step(epoch)
                b.step(epoch)
                _same_groups(ours, theirs, False)


# ---------------------------------------------------------------- schedulers by hand

def _lrs(scheduler, steps, metrics=None):
    """The first group's lr at epochs 0 .. steps - 1."""
    out = []
    for i in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        if metrics is None:
            scheduler.step()
        else:
            scheduler.step(metrics[i])
    return out


def _sgd(lr=1.0, **kwargs):
    return optim.SGD(_params(0), lr=lr, **kwargs)


def test_schedules_by_hand():
    assert _lrs(optim.StepLR(_sgd(), 2, 0.5), 5) == [1.0, 1.0, 0.5, 0.5, 0.25]
    assert _lrs(optim.StepLR(_sgd(), 1.5, 0.5), 7) == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]  # 3, 6
    assert _lrs(optim.MultiStepLR(_sgd(), [4, 2, 4], 0.1), 5) == pytest.approx(
        [1, 1, 0.1, 0.1, 0.001])
    assert _lrs(optim.ExponentialLR(_sgd(), 0.5), 4) == [1, 0.5, 0.25, 0.125]
    assert _lrs(optim.LinearLR(_sgd(), 0.5, 1.0, 4), 6) == pytest.approx(
        [0.5, 0.625, 0.75, 0.875, 1, 1])
    assert _lrs(optim.ConstantLR(_sgd(), 0.5, 3), 5) == [0.5, 0.5, 0.5, 1, 1]
    assert _lrs(optim.LambdaLR(_sgd(2.0), lambda e: e + 1), 3) == [2, 4, 6]
    assert _lrs(optim.MultiplicativeLR(_sgd(), lambda e: 0.5), 3) == [1, 0.5, 0.25]
    # the cosine past T_max, as torch: back up to base_lr at 2 T_max, and again down
    assert _lrs(optim.CosineAnnealingLR(_sgd(), 2), 9) == pytest.approx(
        [1, 0.5, 0, 0.5, 1, 0.5, 0, 0.5, 1], abs=1e-15)
    sched = optim.CosineAnnealingLR(_sgd(), 4, eta_min=0.2)
    got = _lrs(sched, 13)
    want = [0.2 + 0.8 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(13)]
    assert got == pytest.approx(want, abs=1e-14)
    # a manual change persists: StepLR halves whatever the lr is
    opt = _sgd()
    sched = optim.StepLR(opt, 2, 0.5)
    sched.step()
    opt.param_groups[0]["lr"] = 0.3
    sched.step()
    assert sched.get_last_lr()[0] == 0.15
    # two schedulers combine: StepLR(2, 0.5) and ExponentialLR(0.9)
    opt = _sgd()
    both = [optim.StepLR(opt, 2, 0.5), optim.ExponentialLR(opt, 0.9)]
    for t in range(1, 8):
        for s in both:
            s.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.9 ** t * 0.5 ** (t // 2))
    # SequentialLR: ConstantLR(0.1) for 2 epochs, then ExponentialLR(0.5) from its epoch 0
    opt = _sgd()
    sequence = optim.SequentialLR(opt, [optim.ConstantLR(opt, 0.1, 2),
                                        optim.ExponentialLR(opt, 0.5)], [2])
    assert _lrs(sequence, 5) == pytest.approx([0.1, 0.1, 1, 0.5, 0.25])


def test_one_cycle_by_hand():
    opt = _sgd(momentum=0.9)
    sched = optim.OneCycleLR(opt, max_lr=1.0, total_steps=10, interval="step")
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(0.04) and group["momentum"] == 0.95
    assert (group["initial_lr"], group["max_lr"]) == (0.04, 1.0)
    lrs, momenta = [], []
    for _ in range(10):
        lrs.append(group["lr"])
        momenta.append(group["momentum"])
        sched.step()
    assert lrs[2] == 1.0 and momenta[2] == 0.85  # the peak at pct_start * 10 - 1
    assert lrs[1] == pytest.approx(0.04 + 0.96 * (1 - math.cos(math.pi / 2)) / 2)
    assert lrs[9] == pytest.approx(0.04 / 1e4) and momenta[9] == pytest.approx(0.95)
    with pytest.raises(ValueError, match="total steps is 10"):
        sched.step()
        sched.step()
    opt = _sgd()
    lin = optim.OneCycleLR(opt, max_lr=1.0, total_steps=11, pct_start=0.5,
                           anneal_strategy="linear", div_factor=10, final_div_factor=1)
    # up over steps 0 .. 4.5 (pct_start * 11 - 1), then down to 0.1 at step 10
    want = [0.1 + 0.9 * s / 4.5 for s in range(5)] + [1 - 0.9 * (s - 4.5) / 5.5
                                                      for s in range(5, 11)]
    assert _lrs(lin, 11) == pytest.approx(want, abs=1e-12)


def test_reduce_lr_on_plateau_by_hand():
    metrics = [1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.5]
    sched = optim.ReduceLROnPlateau(_sgd(), patience=1)
    assert _lrs(sched, 8, metrics) == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01])
    cooled = optim.ReduceLROnPlateau(_sgd(), patience=0, cooldown=2, min_lr=0.05)
    assert _lrs(cooled, 8, [1] * 8) == pytest.approx([1, 1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05])
    up = optim.ReduceLROnPlateau(_sgd(), "max", patience=0, threshold=0.1, threshold_mode="abs")
    assert _lrs(up, 4, [0.5, 0.55, 0.7, 0.75]) == pytest.approx([1, 1, 0.1, 0.1])
    state = json.loads(json.dumps(up.state_dict()))
    again = optim.ReduceLROnPlateau(_sgd(0.1), "max", patience=0, threshold=0.1,
                                    threshold_mode="abs")
    again.load_state_dict(state)
    assert up.get_last_lr() == pytest.approx([0.01])  # 0.75 is not 0.1 above 0.7
    assert (again.best, again.num_bad_epochs, again.last_epoch) == (0.7, 0, 4)
    with pytest.raises(TypeError, match="metrics"):
        again.step(None)


def test_the_warmup_cosine_keeps_fastcnn_s_schedule():
    """warmup > 0 (the demo recipe's): linear warm-up, then the half cosine reaching
    eta_min at T_max and held, from the step count; the same bits as the closed form
    fastcnn has always computed."""
    for T, warmup, eta_min in ((100, 10, 0.0), (37, 5, 0.01), (1000, 1, 0.0)):
        sched = optim.CosineAnnealingLR(_sgd(0.05), T_max=T, warmup=warmup, eta_min=eta_min,
                                        interval="step")
        got = _lrs(sched, T + 5)
        want = []
        for t in range(T + 5):
            if t < warmup:
                want.append(0.05 * (t + 1) / warmup)
            else:
                progress = min(t - warmup, T - warmup) / (T - warmup)
                want.append(eta_min + (0.05 - eta_min) * (1 + math.cos(math.pi * progress)) / 2)
        assert got == want
    # the older state format, {"type", "last_step", "base_lrs"}, still loads
    sched = optim.CosineAnnealingLR(_sgd(0.4), T_max=10, warmup=2, interval="step")
    sched.load_state_dict({"type": "CosineAnnealingLR", "last_step": 6, "base_lrs": [0.4]})
    assert sched.last_epoch == 6 and sched.get_last_lr()[0] == pytest.approx(
        0.4 * (1 + math.cos(math.pi * 4 / 8)) / 2)
    step = optim.StepLR(_sgd(), 2, 0.5)
    step.load_state_dict({"last_step": 5, "base_lrs": [1.0]})
    assert step.get_last_lr() == [0.25]
    step.step()
    assert step.get_last_lr() == [0.125]


def test_fastcnn_extensions_are_keyword_only():
    opt = _sgd()
    with pytest.raises(TypeError):
        optim.CosineAnnealingLR(opt, 10, 0.0, -1, 2)  # warmup only by keyword
    with pytest.raises(TypeError):
        optim.StepLR(opt, 2, 0.5, -1, "step")
    assert optim.StepLR(opt, 2, interval="step").interval == "step"
    with pytest.raises(ValueError, match="interval"):
        optim.ExponentialLR(opt, 0.9, interval="batch")
    inner = [optim.StepLR(opt, 2, interval="step"), optim.ExponentialLR(opt, 0.9, interval="step")]
    assert optim.ChainedScheduler(inner).interval == "step"
    with pytest.raises(ValueError, match="interval"):
        optim.ChainedScheduler([optim.StepLR(opt, 2), inner[1]])


BAD_SCHEDULES = [
    (lambda M, o: M.StepLR(o, 0), ValueError, "step_size"),
    (lambda M, o: M.StepLR(o, "2"), TypeError, "step_size"),
    (lambda M, o: M.CosineAnnealingLR(o, 0), ValueError, "T_max"),
    (lambda M, o: M.ConstantLR(o, 1.5), ValueError, "factor"),
    (lambda M, o: M.ConstantLR(o, 0.0), ValueError, "factor"),
    (lambda M, o: M.LinearLR(o, 0.0), ValueError, "start_factor"),
    (lambda M, o: M.LinearLR(o, 0.5, 1.5), ValueError, "end_factor"),
    (lambda M, o: M.LambdaLR(o, [lambda e: 1] * 2), ValueError, "lr_lambda"),
    (lambda M, o: M.MultiplicativeLR(o, 0.9), TypeError, "lr_lambda"),
    (lambda M, o: M.OneCycleLR(o, 1.0), ValueError, "total_steps"),
    (lambda M, o: M.OneCycleLR(o, 1.0, total_steps=0), ValueError, "total_steps"),
    (lambda M, o: M.OneCycleLR(o, 1.0, epochs=0, steps_per_epoch=3), ValueError, "epochs"),
    (lambda M, o: M.OneCycleLR(o, 1.0, total_steps=10, pct_start=1.5), ValueError, "pct_start"),
    (lambda M, o: M.OneCycleLR(o, 1.0, total_steps=10, anneal_strategy="exp"), ValueError,
     "anneal_strategy"),
    (lambda M, o: M.OneCycleLR(o, [1.0, 2.0], total_steps=10), ValueError, "max_lr"),
    (lambda M, o: M.OneCycleLR(o, 1.0, total_steps=10, div_factor=0), Exception, "div_factor"),
    (lambda M, o: M.ReduceLROnPlateau(o, factor=1.0), ValueError, "factor"),
    (lambda M, o: M.ReduceLROnPlateau(o, mode="lowest"), ValueError, "mode"),
    (lambda M, o: M.ReduceLROnPlateau(o, threshold_mode="relative"), ValueError, "threshold_mode"),
    (lambda M, o: M.ReduceLROnPlateau(o, min_lr=[0.1, 0.2]), ValueError, "min_lr"),
    (lambda M, o: M.SequentialLR(o, [M.StepLR(o, 2), M.StepLR(o, 3)], [2, 4]), ValueError,
     "milestones"),
    (lambda M, o: M.SequentialLR(o, [M.ReduceLROnPlateau(o)], []), ValueError,
     "ReduceLROnPlateau"),
    (lambda M, o: M.SequentialLR(o, [], []), ValueError, "schedulers"),
    (lambda M, o: M.ChainedScheduler([M.ReduceLROnPlateau(o)]), ValueError, "ReduceLROnPlateau"),
    (lambda M, o: M.StepLR(o, 2, last_epoch=3), KeyError, "initial_lr"),
]


@pytest.mark.parametrize("make,error,match", BAD_SCHEDULES,
                         ids=[str(i) for i in range(len(BAD_SCHEDULES))])
def test_bad_schedule_arguments_name_the_argument_where_pytorch_raises(make, error, match):
    """torch raises (at construction, or at its first steps: a division by zero) ->
    fastcnn raises at construction, naming the argument."""
    with pytest.raises(error, match=match):
        make(optim, _sgd(momentum=0.9))
    torch = pytest.importorskip("torch")
    _, theirs = _scheduled_pair(torch, lrs=(1.0,), momentum=0.9)
    with pytest.raises(Exception), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = make(torch.optim.lr_scheduler, theirs)
        for _ in range(12):
            scheduler.step()


def test_a_scheduler_needs_an_optimizer_of_its_own():
    opt, other = _sgd(), _sgd()
    with pytest.raises(TypeError, match="optimizer"):
        optim.StepLR("sgd", 2)
    with pytest.raises(ValueError, match="another optimizer"):
        optim.SequentialLR(opt, [optim.StepLR(other, 2)], [])
    with pytest.raises(ValueError, match="StepLR"):
        optim.ExponentialLR(opt, 0.9).load_state_dict(optim.StepLR(opt, 2).state_dict())
    with pytest.raises(ValueError, match="total_iters"):  # torch: start_factor forever
        optim.LinearLR(opt, 0.5, 1.0, -1)
    with pytest.raises(ValueError, match="unknown entry"):
        optim.ExponentialLR(opt, 0.9).load_state_dict({"last_epoch": 3, "T_max": 4})


def test_trainer_steps_reduce_lr_on_plateau_with_the_validation_loss(monkeypatch):
    from fastcnn import data
    from fastcnn.train import Trainer

    g = np.random.default_rng(0)
    images = g.integers(0, 255, (16, 1, 4, 4)).astype(np.uint8)
    train = data.Dataset(images, np.arange(16) % 2, ["a", "b"], name="tiny")
    val = data.Dataset(images[:8], np.arange(8) % 2, ["a", "b"], name="tiny val")
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    opt = optim.SGD(model.parameters(), lr=0.1)
    sched = optim.ReduceLROnPlateau(opt, patience=0)
    seen = []
    step = sched.step
    monkeypatch.setattr(sched, "step", lambda metric: (seen.append(metric), step(metric)))
    history = Trainer(progress=False, log=None).fit(model, train, val, epochs=3, optimizer=opt,
                                                    scheduler=sched, batch_size=8)
    assert seen == [h["val_loss"] for h in history]
    with pytest.raises(ValueError, match="validation loss"):
        Trainer(progress=False, log=None).fit(model, train, None, epochs=1, optimizer=opt,
                                              scheduler=sched)
    with pytest.raises(ValueError, match="interval"):
        Trainer(progress=False, log=None).fit(
            model, train, val, epochs=1, optimizer=opt,
            scheduler=optim.ReduceLROnPlateau(opt, interval="step"))
