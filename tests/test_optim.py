"""fastcnn.optim: update rules against float64 NumPy references, state and schedules."""

import math

import numpy as np
import pytest

from fastcnn import nn, optim


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
