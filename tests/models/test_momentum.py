"""Momentum (EMA) target networks: update_momentum, MomentumEncoder.

References are written from the papers' formulas (BYOL Eq. 1, MoCo Eq. 2, BYOL's cosine tau schedule) in
numpy/float64 or as plain per-tensor torch loops, never from selfsup's code. Momenta are != 0.5 so that
swapping the weights of target and online gives other numbers.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from selfsup.errors import ConfigError
from selfsup.models.momentum import MomentumEncoder, update_momentum


def _net(seed: int) -> nn.Module:
    """Conv + BatchNorm + Linear: float parameters, float buffers and an integer buffer."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
        nn.BatchNorm1d(5),
    )


def _run_train_batch(net: nn.Module, seed: int, times: int = 1) -> None:
    """Train-mode forward passes: BatchNorm running statistics and num_batches_tracked move."""
    gen = torch.Generator().manual_seed(seed)
    net.train()
    with torch.no_grad():
        for _ in range(times):
            net(3 * torch.randn(6, 3, 8, 8, generator=gen) + seed)


def _pair(m_seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """An online network and a target with other weights and other BatchNorm statistics."""
    online, target = _net(m_seed), _net(m_seed + 1)
    gen = torch.Generator().manual_seed(m_seed + 2)
    with torch.no_grad():  # BatchNorm weights/biases start at 1/0 in both: make every parameter differ
        for p in target.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    _run_train_batch(online, 10, times=3)
    _run_train_batch(target, 20, times=1)
    return online, target


# ---------------------------------------------------------------------------------------------- update_momentum
def test_update_momentum_is_the_papers_ema_of_every_parameter():
    """xi <- m xi + (1 - m) theta (BYOL Eq. 1 / MoCo Eq. 2), elementwise in float64 numpy."""
    m = 0.8
    online, target = _pair()
    theta = {k: v.detach().double().numpy().copy() for k, v in online.named_parameters()}
    xi = {k: v.detach().double().numpy().copy() for k, v in target.named_parameters()}
    update_momentum(online, target, m)
    got = dict(target.named_parameters())
    assert len(got) == 8
    for name, old in xi.items():
        want = np.empty_like(old)
        for i, (x_old, t) in enumerate(zip(old.ravel(), theta[name].ravel())):
            want.ravel()[i] = m * x_old + (1 - m) * t
        np.testing.assert_allclose(got[name].detach().double().numpy(), want, rtol=0, atol=1e-6, err_msg=name)
        # not vacuous: the weights differ, so the swapped update ((1 - m) xi + m theta) is far from this one
        swapped = (1 - m) * old + m * theta[name]
        assert np.abs(swapped - want).max() > 1e-2, name
    # the online network is untouched
    for name, value in online.named_parameters():
        np.testing.assert_array_equal(value.detach().double().numpy(), theta[name])


def test_fused_update_equals_a_per_parameter_loop_exactly():
    """The two _foreach calls give bit-identical results to mul_/add_ on each tensor, over several steps."""
    online, target = _pair()
    ref = copy.deepcopy(target)
    gen = torch.Generator().manual_seed(3)
    for m in (0.99, 0.7, 0.123, 0.996):
        with torch.no_grad():  # the online network moves between updates, as with an optimizer
            for p in online.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        update_momentum(online, target, m)
        with torch.no_grad():
            for t, o in zip(ref.parameters(), online.parameters()):
                t.mul_(m).add_(o, alpha=1 - m)
        for (name, a), b in zip(target.named_parameters(), ref.parameters()):
            assert torch.equal(a, b), f"{name} after m={m}"


def test_buffers_are_copied_from_the_online_network():
    """BatchNorm running mean/var (float) and num_batches_tracked (long) are copied, not averaged."""
    online, target = _pair()
    before = {k: v.clone() for k, v in target.named_buffers()}
    update_momentum(online, target, 0.9)
    online_bufs = dict(online.named_buffers())
    assert {k.rsplit(".", 1)[1] for k in online_bufs} == {"running_mean", "running_var", "num_batches_tracked"}
    for name, value in target.named_buffers():
        assert value.dtype == before[name].dtype
        assert torch.equal(value, online_bufs[name]), name
        assert not torch.equal(value, before[name]), f"{name} did not differ before: the check would be vacuous"
    assert int(target[1].num_batches_tracked) == 3  # the online network's count, not the target's 1


def test_momentum_one_keeps_the_parameters_and_zero_copies_them():
    online, target = _pair()
    kept = copy.deepcopy(target)
    update_momentum(online, target, 1.0)
    for a, b in zip(target.parameters(), kept.parameters()):
        assert torch.equal(a, b)
    with torch.no_grad():
        next(iter(target.parameters())).fill_(float("inf"))  # 0 * inf would be NaN in m * xi
    update_momentum(online, target, 0)
    for a, b in zip(target.parameters(), online.parameters()):
        assert torch.equal(a, b)


def test_update_momentum_runs_without_recording_gradients():
    online, target = _pair()
    update_momentum(online, target, 0.9)
    for p in target.parameters():
        assert p.grad_fn is None and p.grad is None
    loss = sum(p.sum() for p in online.parameters())
    loss.backward()  # the online graph is unaffected by the update
    assert all(p.grad is not None for p in online.parameters())


@pytest.mark.parametrize("m", [-0.1, 1.0001, float("nan"), float("inf")])
def test_update_momentum_rejects_a_momentum_outside_0_1(m):
    online, target = _pair()
    with pytest.raises(ConfigError, match=r"outside \[0, 1\].*target <- m \* target"):
        update_momentum(online, target, m)


@pytest.mark.parametrize("m", [True, "0.99", None])
def test_update_momentum_rejects_a_non_number(m):
    online, target = _pair()
    with pytest.raises(ConfigError, match=r"must be a number in \[0, 1\]"):
        update_momentum(online, target, m)


def test_update_momentum_rejects_networks_that_are_not_copies():
    online = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"different parameters: only in online \['1.bias', '1.weight'\]"):
        update_momentum(online, nn.Sequential(nn.Linear(3, 4)), 0.9)
    with pytest.raises(ValueError, match=r"parameter '1.weight' has shape \(2, 4\) in the online network and \(3, 4\)"):
        update_momentum(online, nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 3)), 0.9)
    bn_online = nn.Sequential(nn.BatchNorm1d(3))
    bn_target = nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match=r"different buffers: only in online \['0.num_batches_tracked'"):
        update_momentum(bn_online, bn_target, 0.9)
    with pytest.raises(ValueError, match=r"same module as online and target"):
        update_momentum(online, online, 0.9)


# ---------------------------------------------------------------------------------------------- MomentumEncoder
class _Algo(nn.Module):
    """What an algorithm holds: an online network and its momentum copy."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.online = _net(seed)
        self.target = MomentumEncoder(self.online)


def test_momentum_encoder_is_a_frozen_independent_copy():
    online = _net(0)
    online(torch.randn(4, 3, 8, 8)).sum().backward()  # online gradients exist and must not be copied
    enc = MomentumEncoder(online)
    assert all(p.requires_grad for p in online.parameters())
    assert all(not p.requires_grad and p.grad is None for p in enc.parameters())
    for (name, a), b in zip(enc.module.named_parameters(), online.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    with torch.no_grad():
        next(iter(online.parameters())).add_(1.0)
    assert not torch.equal(next(iter(online.parameters())), next(iter(enc.parameters())))
    # an optimizer over the algorithm's trainable parameters leaves the target alone
    algo = _Algo(0)
    trainable = {id(p) for p in algo.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in algo.online.parameters()}


def test_momentum_encoder_forward_has_no_graph():
    enc = MomentumEncoder(_net(0)).eval()
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    y = enc(x)
    assert not y.requires_grad and y.grad_fn is None
    with torch.no_grad():
        torch.testing.assert_close(y, enc.module(x), rtol=0, atol=0)


def test_momentum_encoder_update_applies_update_momentum():
    online, other = _pair()
    enc = MomentumEncoder(other)
    ref = copy.deepcopy(other)
    enc.update(online, 0.75)
    update_momentum(online, ref, 0.75)
    for (name, a), b in zip(enc.module.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(not p.requires_grad for p in enc.parameters())
    with pytest.raises(ConfigError, match=r"outside \[0, 1\]"):
        enc.update(online, 1.5)


def test_momentum_encoder_train_and_eval_behave_normally():
    enc = MomentumEncoder(_net(0))
    x = 2 * torch.randn(6, 3, 8, 8) + 1
    assert enc.eval() is enc and not any(m.training for m in enc.modules())
    y_eval = enc(x)
    assert enc.train() is enc and all(m.training for m in enc.modules())
    tracked = int(enc.module[1].num_batches_tracked)
    y_train = enc(x)  # batch statistics, and the running statistics move
    assert int(enc.module[1].num_batches_tracked) == tracked + 1
    assert not torch.allclose(y_train, y_eval, atol=1e-3)
    enc.train(False)
    assert not enc.module[1].training


def test_momentum_encoder_state_dict_round_trip_restores_the_ema_weights():
    """The EMA weights are in the owner's state_dict (so in checkpoints) and a resume restores them."""
    algo = _Algo(0)
    online_before = copy.deepcopy(algo.online)
    _run_train_batch(algo.online, 5)
    with torch.no_grad():
        for p in algo.online.parameters():
            p.mul_(1.5)
    algo.target.update(algo.online, 0.9)
    state = copy.deepcopy(algo.state_dict())
    target_keys = [k for k in state if k.startswith("target.module.")]
    assert len(target_keys) == len(algo.online.state_dict())
    w = "target.module.0.weight"
    # EMA weights: neither the online weights nor the initial copy
    assert not torch.equal(state[w], state["online.0.weight"])
    assert not torch.equal(state[w], online_before[0].weight)

    resumed = _Algo(7)  # other initial weights
    resumed.load_state_dict(state)
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(not p.requires_grad for p in resumed.target.parameters())
    # and training continues identically
    algo.target.update(algo.online, 0.5)
    resumed.target.update(resumed.online, 0.5)
    for (key, a), b in zip(algo.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key


def test_momentum_encoder_needs_a_module():
    with pytest.raises(ConfigError, match=r"needs an nn.Module to copy, got function"):
        MomentumEncoder(lambda x: x)  # type: ignore[arg-type]
