"""Parameter groups, optimizer construction, LARS (vs a numpy reference) and LR factors."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from selfsup.engine.lars import LARS
from selfsup.engine.optim import build_optimizer, param_groups
from selfsup.engine.schedules import LRFactor
from selfsup.errors import ConfigError


def opt_cfg(**kw):
    cfg = dict(
        name="sgd",
        lr=0.1,
        base_batch_size=256,
        weight_decay=1e-4,
        momentum=0.9,
        nesterov=False,
        betas=[0.9, 0.999],
        eps=1e-8,
        lars_eta=0.001,
        no_decay_norm_bias=True,
        lars_exclude_norm_bias=True,
        paramwise={},
    )
    cfg.update(kw)
    return cfg


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        self.token = nn.Parameter(torch.zeros(1, 1, 8))
        self.head = nn.Linear(8, 3)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)

    def no_weight_decay(self):
        return {"token"}


def group_of(groups, model, name):
    p = dict(model.named_parameters())[name]
    found = [g for g in groups if any(q is p for q in g["params"])]
    assert len(found) == 1
    return found[0]


# ---------------------------------------------------------------------------------------------- groups


def test_param_groups_no_decay_norm_bias_sgd():
    model = Toy()
    groups = param_groups(model, opt_cfg(weight_decay=5e-4), lr=0.3)
    decayed = ["backbone.0.weight", "head.weight"]
    not_decayed = ["backbone.0.bias", "backbone.1.weight", "backbone.1.bias", "token", "head.bias"]
    for name in decayed:
        g = group_of(groups, model, name)
        assert g["weight_decay"] == 5e-4 and g["lr"] == 0.3 and g["momentum"] == 0.9
        assert "lars_exclude" not in g
    for name in not_decayed:
        assert group_of(groups, model, name)["weight_decay"] == 0.0
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == 7  # frozen parameters are left out
    assert not any(p is model.frozen.weight for p in all_params)
    assert len(groups) == 2


def test_param_groups_decay_everything_when_disabled():
    model = Toy()
    groups = param_groups(model, opt_cfg(weight_decay=5e-4, no_decay_norm_bias=False), lr=0.3)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 5e-4


@pytest.mark.parametrize("exclude", [True, False])
def test_param_groups_lars_exclude(exclude):
    model = Toy()
    groups = param_groups(model, opt_cfg(name="lars", lars_exclude_norm_bias=exclude), lr=1.0)
    assert group_of(groups, model, "head.weight")["lars_exclude"] is False
    for name in ("head.bias", "backbone.1.weight", "token"):
        g = group_of(groups, model, name)
        assert g["lars_exclude"] is exclude and g["weight_decay"] == 0.0


def test_param_groups_adamw_has_no_momentum():
    model = Toy()
    groups = param_groups(
        model,
        opt_cfg(
            name="adamw", paramwise={"head": {"lr_mult": 2, "decay_mult": 1, "momentum": 0.5, "lars_exclude": None}}
        ),
        lr=1e-3,
    )
    assert all("momentum" not in g and "lars_exclude" not in g for g in groups)
    assert group_of(groups, model, "head.weight")["lr"] == pytest.approx(2e-3)


def test_paramwise_overrides_by_substring():
    model = Toy()
    over = {"head": {"lr_mult": 10, "decay_mult": 0, "momentum": 0.0, "lars_exclude": None}}
    groups = param_groups(model, opt_cfg(weight_decay=1e-4, paramwise=over), lr=0.1)
    for name in ("head.weight", "head.bias"):
        g = group_of(groups, model, name)
        assert g["lr"] == pytest.approx(1.0) and g["weight_decay"] == 0.0 and g["momentum"] == 0.0
    g = group_of(groups, model, "backbone.0.weight")
    assert g["lr"] == pytest.approx(0.1) and g["weight_decay"] == 1e-4 and g["momentum"] == 0.9


def test_paramwise_multiple_keys_compose_and_lars_exclude():
    model = Toy()
    over = {
        "backbone": {"lr_mult": 0.5, "decay_mult": 2.0, "momentum": None, "lars_exclude": None},
        "0.weight": {"lr_mult": 3.0, "decay_mult": 1.0, "momentum": None, "lars_exclude": True},
    }
    groups = param_groups(model, opt_cfg(name="lars", weight_decay=1e-4, paramwise=over), lr=0.2)
    g = group_of(groups, model, "backbone.0.weight")  # matches both keys
    assert g["lr"] == pytest.approx(0.2 * 0.5 * 3.0)
    assert g["weight_decay"] == pytest.approx(2e-4)
    assert g["lars_exclude"] is True and g["momentum"] == 0.9
    g = group_of(groups, model, "backbone.1.weight")  # 1-D: wd 0 stays 0 whatever the multiplier
    assert g["lr"] == pytest.approx(0.1) and g["weight_decay"] == 0.0 and g["lars_exclude"] is True
    g = group_of(groups, model, "head.weight")
    assert g["lr"] == pytest.approx(0.2) and g["lars_exclude"] is False


def test_param_groups_no_trainable_params():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        param_groups(model, opt_cfg(), lr=0.1)


# ---------------------------------------------------------------------------------------------- build


def test_build_sgd():
    opt = build_optimizer(Toy(), opt_cfg(name="sgd", momentum=0.8, nesterov=True, weight_decay=1e-3), lr=0.05)
    assert type(opt) is torch.optim.SGD
    assert opt.defaults["lr"] == 0.05 and opt.defaults["momentum"] == 0.8 and opt.defaults["nesterov"] is True
    assert opt.defaults["weight_decay"] == 1e-3
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 1e-3]
    assert all(g["momentum"] == 0.8 and g["lr"] == 0.05 for g in opt.param_groups)


def test_build_adamw():
    opt = build_optimizer(Toy(), opt_cfg(name="adamw", betas=[0.9, 0.95], eps=1e-6, weight_decay=0.05), lr=1.5e-4)
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-6 and opt.defaults["lr"] == 1.5e-4
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.05]
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)


def test_build_lars():
    opt = build_optimizer(Toy(), opt_cfg(name="lars", lars_eta=0.02, momentum=0.85, weight_decay=1e-6), lr=4.8)
    assert type(opt) is LARS
    assert opt.defaults["eta"] == 0.02 and opt.defaults["momentum"] == 0.85 and opt.defaults["lr"] == 4.8
    assert opt.defaults["weight_decay"] == 1e-6 and opt.defaults["nesterov"] is False
    excl = {g["lars_exclude"]: g["weight_decay"] for g in opt.param_groups}
    assert excl == {False: 1e-6, True: 0.0}
    assert all(g["eta"] == 0.02 for g in opt.param_groups)


def test_build_unknown_optimizer():
    with pytest.raises(ConfigError, match="algo.optimizer.name='rmsprop' must be sgd, adamw or lars"):
        build_optimizer(Toy(), opt_cfg(name="rmsprop"), lr=0.1)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"momentum": 1.5}, r"algo.optimizer.momentum must be in \[0, 1\], got 1.5"),
        ({"betas": [0.9, 1.2]}, r"algo.optimizer.betas must be two numbers in \[0, 1\)"),
        ({"paramwise": {"head": {"lr_mult": -1}}}, r"paramwise.<name>.lr_mult must be >= 0 .*, got -1"),
    ],
)
def test_a_plain_dict_config_is_validated_too(kw, match):
    """``build_optimizer`` / ``param_groups`` also take ``algo.optimizer`` as a dict: same checks."""
    with pytest.raises(ConfigError, match=match):
        build_optimizer(Toy(), opt_cfg(**kw), lr=0.1)


def test_built_sgd_takes_a_step():
    torch.manual_seed(0)
    model = Toy()
    opt = build_optimizer(model, opt_cfg(weight_decay=0.1, momentum=0.0), lr=0.5)
    w0, b0 = model.head.weight.detach().clone(), model.head.bias.detach().clone()
    model.head(torch.randn(4, 8)).sum().backward()
    gw, gb = model.head.weight.grad.clone(), model.head.bias.grad.clone()
    opt.step()
    torch.testing.assert_close(model.head.weight.detach(), w0 - 0.5 * (gw + 0.1 * w0))
    torch.testing.assert_close(model.head.bias.detach(), b0 - 0.5 * gb)  # no decay on the bias


# ---------------------------------------------------------------------------------------------- LARS


def lars_reference(w, grads, lr, mom, wd, eta, eps, nesterov, exclude):
    """Run the docstring formula for len(grads) steps in numpy float64; return the weights after each."""
    w = w.astype(np.float64).copy()
    buf = None
    out = []
    for g in grads:
        wn, gn = math.sqrt(float((w * w).sum())), math.sqrt(float((g * g).sum()))
        if exclude or wn == 0 or gn == 0:
            local_lr = 1.0
        else:
            local_lr = eta * wn / (gn + wd * wn + eps)
        u = (g + wd * w) * lr * local_lr
        if mom != 0:
            buf = u.copy() if buf is None else mom * buf + u
            step = u + mom * buf if nesterov else buf
        else:
            step = u
        w = w - step
        out.append(w.copy())
    return out


@pytest.mark.parametrize(
    ("mom", "wd", "eta", "nesterov", "exclude"),
    [
        (0.9, 1e-4, 0.001, False, False),
        (0.9, 1e-2, 0.02, True, False),
        (0.0, 1e-3, 0.01, False, False),
        (0.9, 1e-3, 0.01, False, True),
        (0.5, 0.0, 0.1, True, True),
    ],
)
@pytest.mark.parametrize("foreach", [True, False])
def test_lars_matches_numpy_reference(mom, wd, eta, nesterov, exclude, foreach):
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(3, 4))
    grads = [rng.normal(scale=s, size=(3, 4)) for s in (0.1, 1.0, 5.0)]
    p = nn.Parameter(torch.tensor(w0))
    lr = 0.7
    opt = LARS(
        [{"params": [p], "lars_exclude": exclude}],
        lr=lr,
        momentum=mom,
        weight_decay=wd,
        eta=eta,
        nesterov=nesterov,
        foreach=foreach,
    )
    expected = lars_reference(w0, grads, lr, mom, wd, eta, 1e-8, nesterov, exclude)
    for g, ref in zip(grads, expected):
        p.grad = torch.tensor(g)
        opt.step()
        # rtol 1e-6, not 1e-12: with lars_exclude the step multiplies by a float32 ones() tensor, which
        # rounds lr to float32 even for float64 parameters
        np.testing.assert_allclose(p.detach().numpy(), ref, rtol=1e-6, atol=1e-9)
    assert not np.allclose(p.detach().numpy(), w0)


@pytest.mark.parametrize("nesterov", [False, True])
def test_foreach_lars_equals_the_loop_bit_for_bit(nesterov):
    """The multi-tensor step on a real model (several parameter shapes, an excluded group, a parameter without a
    gradient) gives exactly the loop's parameters and momentum buffers over several steps."""
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)) for _ in "ab"]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = []
    for net, foreach in zip(nets, (True, False), strict=True):
        decay = [p for n, p in net.named_parameters() if p.dim() > 1]
        rest = [p for n, p in net.named_parameters() if p.dim() <= 1]
        groups = [{"params": decay}, {"params": rest, "lars_exclude": True, "weight_decay": 0.0}]
        opts.append(LARS(groups, lr=0.3, momentum=0.9, weight_decay=1e-4, nesterov=nesterov, foreach=foreach))
    x = torch.randn(8, 3, 8, 8)
    for step in range(4):
        for net, opt in zip(nets, opts, strict=True):
            opt.zero_grad()
            net(x).square().mean().backward()
            if step == 2:
                net[3].bias.grad = None  # skipped this step
            opt.step()
    for (name, a), b in zip(nets[0].named_parameters(), nets[1].parameters(), strict=True):
        assert torch.equal(a, b), name
        assert torch.equal(opts[0].state[a]["momentum_buffer"], opts[1].state[b]["momentum_buffer"]), name


def test_lars_zero_norms_use_unit_ratio():
    lr = 0.1
    # |w| = 0: plain SGD step
    p = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = LARS([p], lr=lr, momentum=0.0, weight_decay=0.5, eta=0.001)
    p.grad = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), -lr * torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64))
    # |g| = 0: the decay term moves w with local_lr = 1
    q = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    opt = LARS([q], lr=lr, momentum=0.0, weight_decay=0.5, eta=0.001)
    q.grad = torch.zeros(2, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(q.detach(), torch.tensor([1.0, 2.0], dtype=torch.float64) * (1 - lr * 0.5))


def test_lars_skips_params_without_grad():
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = LARS([a, b], lr=1.0)
    a.grad = torch.ones(3)
    opt.step()
    assert (b.detach() == 1).all() and not (a.detach() == 1).all()


def test_lars_closure_returns_loss():
    p = nn.Parameter(torch.ones(2))
    opt = LARS([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(2.0)


@pytest.mark.parametrize("kw", [{"lr": -1.0}, {"momentum": -0.1}, {"weight_decay": -1e-4}, {"eta": 0.0}])
def test_lars_invalid_args(kw):
    args = {"lr": 0.1, **kw}
    with pytest.raises(ValueError, match="invalid LARS arguments"):
        LARS([nn.Parameter(torch.ones(2))], **args)


# ---------------------------------------------------------------------------------------------- LRFactor


def test_warmup_is_linear():
    f = LRFactor("cosine", total_steps=100, warmup_steps=10, warmup_start=0.01)
    vals = [f(s) for s in range(11)]
    expected = [0.01 + 0.99 * s / 10 for s in range(10)] + [1.0]
    assert vals == pytest.approx(expected, abs=1e-12)
    diffs = np.diff(vals[:10])
    assert np.allclose(diffs, diffs[0])


@pytest.mark.parametrize(("warmup", "min_ratio"), [(0, 0.0), (10, 0.0), (20, 0.1)])
def test_cosine_end_and_midpoint(warmup, min_ratio):
    total = 120
    f = LRFactor("cosine", total_steps=total, warmup_steps=warmup, min_ratio=min_ratio)
    assert f(warmup) == pytest.approx(1.0)
    assert f(warmup + (total - warmup) // 2) == pytest.approx(0.5 * (1 + min_ratio))
    assert f(total) == pytest.approx(min_ratio, abs=1e-12)
    assert f(total + 50) == pytest.approx(min_ratio, abs=1e-12)  # clamped after the end
    s = warmup + 17
    t = (s - warmup) / (total - warmup)
    assert f(s) == pytest.approx(min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * t)) / 2)
    vals = [f(s) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # monotone decay


def test_step_policy():
    f = LRFactor("step", total_steps=100, milestones=[30, 60, 90], gamma=0.1)
    assert f(0) == 1.0 and f(29) == 1.0
    assert f(30) == pytest.approx(0.1) and f(59) == pytest.approx(0.1)
    assert f(60) == pytest.approx(0.01) and f(89) == pytest.approx(0.01)
    assert f(90) == pytest.approx(0.001) and f(99) == pytest.approx(0.001)


def test_step_policy_with_warmup():
    f = LRFactor("step", total_steps=100, warmup_steps=5, warmup_start=0.2, milestones=[50], gamma=0.5)
    assert f(0) == pytest.approx(0.2) and f(4) == pytest.approx(0.2 + 0.8 * 4 / 5)
    assert f(5) == 1.0 and f(50) == pytest.approx(0.5)


def test_constant_policy():
    f = LRFactor("constant", total_steps=10, warmup_steps=2, warmup_start=0.5)
    assert [f(s) for s in range(5)] == pytest.approx([0.5, 0.75, 1.0, 1.0, 1.0])


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"policy": "exponential", "total_steps": 10}, "schedule.policy='exponential' must be one of cosine, linear"),
        ({"policy": "cosine", "total_steps": 0}, "the schedule has no steps"),
        ({"policy": "cosine", "total_steps": 10, "warmup_steps": 11}, r"warm-up \(11 steps\) is longer"),
        ({"policy": "cosine", "total_steps": 10, "warmup_steps": -1}, r"warm-up \(-1 steps\)"),
    ],
)
def test_invalid_lr_factor(kw, match):
    with pytest.raises(ConfigError, match=match):
        LRFactor(**kw)


def test_lr_factor_state_survives_weights_only_load():
    def make(factor):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.4)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)

    opt, sched = make(
        LRFactor("step", total_steps=50, warmup_steps=3, warmup_start=0.1, milestones=[10, 20], gamma=0.3)
    )
    for _ in range(12):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    other = LRFactor("cosine", total_steps=7)
    opt2, sched2 = make(other)
    sched2.load_state_dict(state)
    assert other.policy == "step" and other.milestones == [10, 20] and other.gamma == pytest.approx(0.3)
    assert sched2.last_epoch == 12
    for _ in range(15):
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()
        assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.4 * 0.3**2)
