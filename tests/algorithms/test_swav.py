"""SwAV: Sinkhorn-Knopp codes (paper Eq. 3), multi-crop passes, normalised and frozen prototypes, the
queue (switched on at an epoch, shift-in, used once full, in the checkpoint), bf16, 2 processes == 1."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup import distributed
from selfsup.algorithms.swav import SwAV, distributed_sinkhorn, resolution_groups
from selfsup.engine.state import TrainState
from selfsup.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def sinkhorn_reference(scores: np.ndarray, epsilon: float, iterations: int) -> np.ndarray:
    """Paper Eq. 3 with loops in float64: Q* = Diag(u) exp(C^T Z / epsilon) Diag(v), the scaling vectors
    u [K] and v [B] from ``iterations`` Sinkhorn-Knopp rounds towards the marginals Q 1_B = 1_K / K
    (prototypes) and Q^T 1_K = 1_B / B (samples); the codes are B * Q*^T (one row per sample)."""
    batch, k = scores.shape
    m = [[math.exp(float(scores[b, j]) / epsilon) for b in range(batch)] for j in range(k)]  # [K][B]
    v = [1.0] * batch
    u = [1.0] * k
    for _ in range(iterations):
        u = [(1.0 / k) / sum(m[j][b] * v[b] for b in range(batch)) for j in range(k)]
        v = [(1.0 / batch) / sum(u[j] * m[j][b] for j in range(k)) for b in range(batch)]
    return np.array([[batch * u[j] * m[j][b] * v[b] for j in range(k)] for b in range(batch)])


def _unit_scores(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, 8, generator=g), dim=1)
    c = F.normalize(torch.randn(k, 8, generator=g), dim=1)
    return z @ c.T  # cosine scores in [-1, 1], as SwAV's


# ------------------------------------------------------------------------------------------- Sinkhorn


@pytest.mark.parametrize(("n", "k", "iterations"), [(6, 4, 3), (5, 7, 3), (8, 3, 1), (4, 4, 10)])
def test_sinkhorn_matches_the_papers_scaling(n, k, iterations):
    scores = _unit_scores(n, k, seed=n + k)
    codes = distributed_sinkhorn(scores, epsilon=0.05, iterations=iterations)
    expected = sinkhorn_reference(scores.double().numpy(), 0.05, iterations)
    assert codes.shape == (n, k) and codes.dtype == torch.float32
    np.testing.assert_allclose(codes.double().numpy(), expected, rtol=1e-4, atol=1e-6)


def test_sinkhorn_marginals():
    """Each sample's code sums to 1 (the last step scales samples); the prototypes share the batch
    equally (B / K each) once the iterations have converged."""
    scores = _unit_scores(12, 4, seed=0)
    for iterations in (3, 200):
        codes = distributed_sinkhorn(scores, epsilon=0.05, iterations=iterations).double()
        torch.testing.assert_close(codes.sum(1), torch.ones(12, dtype=torch.float64), atol=1e-5, rtol=0)
        assert (codes >= 0).all()
    torch.testing.assert_close(codes.sum(0), torch.full((4,), 3.0, dtype=torch.float64), atol=1e-3, rtol=0)
    softmax = torch.softmax(scores / 0.05, dim=1).sum(0)  # without the equipartition constraint: far from it
    assert (softmax - 3.0).abs().max() > 0.5


def _sinkhorn_on_two_ranks(scores: torch.Tensor, monkeypatch) -> torch.Tensor:
    """distributed_sinkhorn with each half of the rows on its own rank: two threads whose ``all_reduce_`` sums
    the two threads' tensors. Returns the codes of both ranks, in rank order."""
    world, local = 2, threading.local()
    barrier, slots = threading.Barrier(world, timeout=30), [torch.empty(0)] * world
    out: list = [None] * world

    def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        slots[local.rank] = t.clone()
        barrier.wait()
        total = sum(slots[1:], slots[0])
        barrier.wait()  # both have read the slots before either writes the next ones
        return t.copy_(total)

    def rank(r: int) -> None:
        local.rank = r
        try:
            out[r] = distributed_sinkhorn(scores.chunk(world)[r], 0.05, 3)
        except BaseException as e:  # surfaced below; the other rank stops at the broken barrier
            out[r] = e
            barrier.abort()

    monkeypatch.setattr(distributed, "get_world_size", lambda: world)
    monkeypatch.setattr(distributed, "all_reduce_", all_reduce_)
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for o in out:
        if isinstance(o, BaseException):
            raise o
    return torch.cat(out)


def test_sinkhorn_on_two_ranks_gives_the_codes_of_the_global_batch(monkeypatch):
    """The prototype sums are over the samples of every rank (official ``dist.all_reduce(sum_of_rows)``): two
    ranks holding half the batch each get the codes of the whole batch, not those of their own half."""
    scores = _unit_scores(12, 4, seed=3)
    scores[6:] = scores[6:] * 0.5 + 0.3 * torch.arange(4.0)  # the halves prefer other prototypes
    codes = _sinkhorn_on_two_ranks(scores, monkeypatch)
    expected = sinkhorn_reference(scores.double().numpy(), 0.05, 3)
    np.testing.assert_allclose(codes.double().numpy(), expected, rtol=1e-4, atol=1e-6)
    per_half = np.concatenate([sinkhorn_reference(h.double().numpy(), 0.05, 3) for h in scores.chunk(2)])
    assert np.abs(per_half - expected).max() > 0.05  # what per-rank sums would give


def test_sinkhorn_under_bf16_autocast_equals_fp32():
    scores = _unit_scores(8, 5, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_bf16 = distributed_sinkhorn(scores, 0.05, 3)
    assert torch.equal(in_bf16, distributed_sinkhorn(scores, 0.05, 3))


# ------------------------------------------------------------------------------------------ the model


class TinyNet(nn.Module):
    """A conv + BN + pool backbone (num_features = 8): BN makes the per-resolution passes observable."""

    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(1)


def _swav(**kwargs) -> SwAV:
    torch.manual_seed(0)
    args = dict(num_crops=(2, 2), hidden_dim=16, out_dim=8, num_prototypes=5, freeze_prototypes_iters=0)
    return SwAV(TinyNet(), **{**args, **kwargs})


def _views(n: int = 6, seed: int = 1, sizes=(16, 16, 8, 8)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, s, s, generator=g) for s in sizes]


class _Ctx:
    def __init__(self, epoch: int) -> None:
        self.seed, self.state = 0, TrainState(epoch=epoch, steps_per_epoch=4, epochs=10)


def test_resolution_groups_are_consecutive_views_of_one_size():
    views = _views(2, sizes=(16, 16, 8, 8, 8, 16))
    assert [len(g) for g in resolution_groups(views)] == [2, 3, 1]


def test_loss_is_the_swapped_prediction_of_sinkhorn_codes():
    """The whole step from the paper's formulas in float64: one backbone pass per resolution (BN
    statistics per pass), one neck pass, L2-normalised embeddings and prototypes, codes of crops 0, 1
    (Eq. 3), cross-entropy of every other crop's softmax(p / T) with them."""
    swav = _swav()
    with torch.no_grad():
        swav.prototypes.weight.mul_(3.0)  # un-normalised: the step must normalise them first
    prototypes = F.normalize(swav.prototypes.weight.detach().clone(), dim=1)
    views = _views()
    loss = swav({"views": views})["loss"]
    with torch.no_grad():
        h = torch.cat([swav.backbone(torch.cat(views[:2])), swav.backbone(torch.cat(views[2:]))])
        z = F.normalize(swav.neck(h), dim=1).double()
    p = (z @ prototypes.double().T).view(4, 6, 5).numpy()
    expected = 0.0
    for i in (0, 1):
        q = sinkhorn_reference(p[i], 0.05, 3)
        for v in range(4):
            if v != i:
                logits = p[v] / 0.1
                log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
                expected += -(q * log_softmax).sum(1).mean() / 3 / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(swav.prototypes.weight.norm(dim=1), torch.ones(5), atol=1e-6, rtol=0)


def test_gradients_reach_backbone_neck_and_prototypes():
    swav = _swav()
    swav({"views": _views()})["loss"].backward()
    for name, p in swav.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("freeze", [0, 2])
def test_prototypes_are_frozen_for_the_first_steps(freeze):
    """before_optimizer_step drops the prototypes' gradient while step < freeze_prototypes_iters (official
    ``p.grad = None``: no update, no weight decay, no momentum); the rest trains from the first step."""
    swav = _swav(freeze_prototypes_iters=freeze)
    opt = torch.optim.SGD(swav.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    for step in range(4):
        out = swav({"views": _views(seed=step)})
        opt.zero_grad()
        out["loss"].backward()
        swav.before_optimizer_step(TrainState(step=step, steps_per_epoch=4, epochs=1))
        protos, neck = swav.prototypes.weight.detach().clone(), swav.neck.mlp[0].weight.detach().clone()
        opt.step()
        assert not torch.equal(swav.neck.mlp[0].weight, neck)
        assert torch.equal(swav.prototypes.weight, protos) == (step < freeze), step


def test_queue_is_switched_on_at_its_epoch_and_shifts_in_the_assignment_crops():
    swav = _swav(queue_length=24, queue_start_epoch=2)
    captured = []
    swav.neck.register_forward_hook(lambda m, i, out: captured.append(F.normalize(out.detach(), dim=1)))
    for epoch in (0, 1):
        swav.on_epoch_start(_Ctx(epoch))
        swav({"views": _views(seed=epoch)})
        assert not bool(swav.queue.active) and int(swav.queue.rows) == 0
        assert not swav.queue.features.any()
    swav.on_epoch_start(_Ctx(2))
    assert bool(swav.queue.active)
    zs = []
    for step in range(3):
        swav({"views": _views(seed=10 + step)})
        zs.append(captured[-1].view(4, 6, 8))
        assert int(swav.queue.rows) == 6 * (step + 1)
    for a in (0, 1):  # newest first: [step 2 | step 1 | step 0 | zeros]
        expected = torch.cat([zs[2][a], zs[1][a], zs[0][a], torch.zeros(6, 8)])
        assert torch.equal(swav.queue.features[a], expected)


def test_queue_enters_the_codes_once_full():
    """Until the queue is full, the codes are those of the batch alone; once full, Sinkhorn runs on
    [queue; batch] and the batch keeps its rows (paper Sec. 4 / official ``[-bs:]``)."""
    swav = _swav(queue_length=12)
    swav.on_epoch_start(_Ctx(15))
    g = torch.Generator().manual_seed(3)
    w = F.normalize(swav.prototypes.weight.detach(), dim=1)
    with torch.no_grad():
        swav.prototypes.weight.copy_(w)
    for step in range(4):
        z = F.normalize(torch.randn(2, 6, 8, generator=g), dim=2)
        queue = swav.queue.features.clone()
        codes = swav.assign(z)
        for a in (0, 1):
            s = z[a] @ w.T
            if step >= 2:  # 12 rows = two batches of 6 pushed before
                s = torch.cat([queue[a] @ w.T, s])
            expected = sinkhorn_reference(s.double().numpy(), 0.05, 3)[-6:]
            np.testing.assert_allclose(codes[a].double().numpy(), expected, rtol=1e-4, atol=1e-6)


def test_queue_length_is_rounded_down_to_a_multiple_of_the_global_batch():
    swav = _swav(queue_length=15)  # batches of 6: 12 rows used, as official (15 - 15 % 6)
    swav.on_epoch_start(_Ctx(15))
    for _ in range(3):
        swav.assign(F.normalize(torch.randn(2, 6, 8), dim=2))
    assert int(swav.queue.rows) == 12 and swav.queue.is_full(6)
    assert swav.queue.features[:, :12].any(dim=2).all() and not swav.queue.features[:, 12:].any()
    small = _swav(queue_length=5)  # shorter than a batch: no queue (official: length 0)
    small.on_epoch_start(_Ctx(15))
    small.assign(F.normalize(torch.randn(2, 6, 8), dim=2))
    assert int(small.queue.rows) == 0 and not small.queue.is_full(6)


def test_queue_survives_a_checkpoint_round_trip():
    swav = _swav(queue_length=12)
    swav.on_epoch_start(_Ctx(15))
    for step in range(3):
        swav({"views": _views(seed=step)})
    state = swav.state_dict()
    assert {"queue.features", "queue.rows", "queue.active"} <= state.keys()
    fresh = _swav(queue_length=12)  # before on_epoch_start: the queue is off and empty
    fresh.load_state_dict(state)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
    z = F.normalize(torch.randn(2, 6, 8), dim=2)
    assert torch.equal(fresh.assign(z), swav.assign(z))  # the restored queue takes part, as the original


def test_codes_and_queue_under_bf16_autocast_equal_fp32():
    """The codes decide the targets: scores, Sinkhorn and the queue stay float32 under autocast."""
    runs = []
    for autocast in (False, True):
        swav = _swav(queue_length=12)
        swav.on_epoch_start(_Ctx(15))
        g = torch.Generator().manual_seed(5)
        codes = []
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for _ in range(4):
                codes.append(swav.assign(F.normalize(torch.randn(2, 6, 8, generator=g), dim=2)))
        runs.append((codes, swav.queue.features.clone()))
    for fp32, bf16 in zip(runs[0][0], runs[1][0]):
        assert bf16.dtype == torch.float32 and torch.equal(fp32, bf16)
    assert torch.equal(runs[0][1], runs[1][1])


def test_forward_under_bf16_autocast_gives_a_float32_loss():
    swav = _swav(queue_length=12)
    swav.on_epoch_start(_Ctx(15))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = swav({"views": _views()})
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert swav.queue.features.dtype == torch.float32


def test_num_views_follows_num_crops_and_is_checked():
    swav = _swav(num_crops=(2, 3))
    assert swav.num_views == 5 and SwAV.num_views == 8
    with pytest.raises(ValueError, match="SwAV expects 5 crops per image"):
        swav({"views": _views()})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_crops": (1,)}, r"num_crops=\[1\] must count >= 1 crop per resolution and >= 2 in all"),
        ({"num_crops": (2, 0)}, r"num_crops=\[2, 0\]"),
        ({"crops_for_assign": (0, 4)}, r"crops_for_assign=\[0, 4\] must be distinct crop indices in \[0, 4\)"),
        ({"crops_for_assign": ()}, r"crops_for_assign=\[\]"),
        ({"num_prototypes": 0}, "num_prototypes, sinkhorn_iterations >= 1"),
        ({"sinkhorn_iterations": 0}, "num_prototypes, sinkhorn_iterations >= 1"),
        ({"epsilon": 0.0}, r"temperature \(0.1\) and epsilon \(0.0\) must be > 0"),
        ({"queue_length": -1}, r"queue_length \(-1\)"),
    ],
)
def test_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        _swav(**kwargs)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_processes_equal_one():
    """Sinkhorn over the global batch (sums all-reduced) and the queue of the global stream, switched on
    from the start and full from the third step; the prototypes frozen for the first step only."""
    from ranks import check_algorithm_ranks

    check_algorithm_ranks(
        "swav",
        overrides=[
            "algo.model.queue_length=16",
            "algo.model.queue_start_epoch=0",
            "algo.model.freeze_prototypes_iters=1",
        ],
        global_batch=8,
        steps=3,
        sync_bn=True,
    )
