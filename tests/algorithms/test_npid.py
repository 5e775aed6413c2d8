"""NPID: the loss against the memory bank's positive and uniformly sampled negatives (NCE and softmax), the
bank's momentum update, negatives drawn for the global batch, ensure_neg, Z in the checkpoint, bf16,
2 processes == 1."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup import distributed
from selfsup.algorithms.npid import NPID
from selfsup.errors import ConfigError
from selfsup.models.resnet import ResNet

N, M, D = 20, 16, 8  # images in the bank, negatives per image, feature size


def _npid(n: int = N, **kw) -> NPID:
    torch.manual_seed(0)
    algo = NPID(ResNet("resnet18"), feat_dim=D, num_negatives=kw.pop("num_negatives", M), **kw)
    algo.setup(n)
    return algo


def _batch(index: list[int], seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"views": [torch.randn(len(index), 3, 32, 32, generator=g)], "index": torch.tensor(index)}


def _reference(v, pos, neg, t: float, loss: str, n: int) -> float:
    """The paper's formulas in float64 loops: softmax (Eq. 2 over the positive and the sampled negatives) or NCE
    (Eq. 4-6 with Z from this batch)."""
    v, pos, neg = v.double(), pos.double(), neg.double()
    b, m = neg.shape[:2]
    s_pos = [float(v[i] @ pos[i]) / t for i in range(b)]
    s_neg = [[float(v[i] @ neg[i, j]) / t for j in range(m)] for i in range(b)]
    total = 0.0
    if loss == "softmax":
        for i in range(b):
            total += -s_pos[i] + math.log(math.exp(s_pos[i]) + sum(math.exp(s) for s in s_neg[i]))
        return total / b
    z = n * sum(math.exp(s) for row in s_neg for s in row) / (b * m)
    for i in range(b):
        p = math.exp(s_pos[i]) / z
        total -= math.log(p / (p + m / n))
        for s in s_neg[i]:
            p = math.exp(s) / z
            total -= math.log(1 - p / (p + m / n))
    return total / b


@pytest.mark.parametrize("loss", ["nce", "softmax"])
def test_loss_against_the_bank_positive_and_uniform_negatives_then_momentum_update(loss):
    algo = _npid(loss=loss, memory_momentum=0.3, temperature=0.2)
    bank = algo.memory.features.clone()
    index = [2, 5, 11, 19]
    batch = _batch(index)
    torch.manual_seed(3)
    out = algo(batch)
    torch.manual_seed(3)
    neg_index = torch.randint(N, (4, M))  # uniform over the bank, with replacement (P_n = 1/n)
    with torch.no_grad():
        v = F.normalize(algo.neck(algo.backbone(batch["views"][0])), dim=1)
    want = _reference(v, bank[index], bank[neg_index], 0.2, loss, N)
    assert out["loss"].item() == pytest.approx(want, rel=1e-5)
    # bank_i <- L2norm((1 - m) bank_i + m v_i) with m = 0.3 weighing the new feature; the other rows untouched
    after = algo.memory.features
    torch.testing.assert_close(after[index], F.normalize(0.7 * bank[index] + 0.3 * v, dim=1), atol=1e-6, rtol=0)
    rest = [i for i in range(N) if i not in index]
    assert torch.equal(after[rest], bank[rest])


def test_gradients_reach_backbone_and_neck_not_the_bank():
    algo = _npid()
    algo(_batch([0, 1, 2]))["loss"].backward()
    assert algo.neck.weight.grad is not None and algo.backbone.conv1.weight.grad is not None
    assert not algo.memory.features.requires_grad


def test_negatives_are_this_ranks_rows_of_one_draw_for_the_global_batch(monkeypatch):
    """Rank 1 of 2 with a local batch of 4: rows 4..7 of the [8, m] draw of the global batch (what 1 process
    draws for the same 8 images), not a draw of its own [4, m]."""
    algo = _npid()
    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed, "get_rank", lambda: 1)
    torch.manual_seed(5)
    got = algo.negatives(torch.tensor([4, 5, 6, 7]))
    torch.manual_seed(5)
    assert torch.equal(got, torch.randint(N, (8, M))[4:])


def test_ensure_neg_never_draws_the_image_itself():
    index = torch.arange(6)
    torch.manual_seed(0)
    plain = _npid(n=6, num_negatives=200).negatives(index)
    assert (plain == index[:, None]).any()  # without it: 1 draw in 6 hits the image
    torch.manual_seed(0)
    ensured = _npid(n=6, num_negatives=200, ensure_neg=True).negatives(index)
    assert ensured.shape == (6, 200) and not (ensured == index[:, None]).any()
    counts = torch.bincount(ensured.flatten(), minlength=6)
    assert int(counts.min()) > 150  # still uniform over the other images (1,200 draws over 6 x 5 pairs)


def test_nce_z_is_estimated_once_and_resumed_from_the_checkpoint():
    algo = _npid(loss="nce")
    assert math.isnan(algo.loss_fn.log_z.item())
    algo(_batch([0, 1, 2, 3]))
    log_z = algo.loss_fn.log_z.clone()
    assert torch.isfinite(log_z)
    algo(_batch([4, 5, 6, 7], seed=2))
    assert torch.equal(algo.loss_fn.log_z, log_z)  # a constant after the first batch
    state = algo.state_dict()
    assert {"loss_fn.log_z", "memory.features"} <= state.keys()
    resumed = _npid(loss="nce")
    resumed.load_state_dict(state)
    assert torch.equal(resumed.loss_fn.log_z, log_z) and torch.equal(resumed.memory.features, algo.memory.features)


class _FixedNeck(nn.Module):
    """A neck whose output does not depend on autocast (a parameter returned as it is)."""

    def __init__(self, z: torch.Tensor) -> None:
        super().__init__()
        self.z = nn.Parameter(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.z


@pytest.mark.parametrize("loss", ["nce", "softmax"])
def test_bank_and_loss_under_bf16_autocast_equal_fp32(loss):
    """The same features give the same loss and the same bank under bf16 autocast: logits, Z and the update
    are computed in float32 (in bf16, 1/T = 14 would amplify 3-digit logits)."""
    z = torch.randn(4, D, generator=torch.Generator().manual_seed(0))
    results = []
    for amp in (False, True):
        algo = _npid(loss=loss)
        algo.neck = _FixedNeck(z.clone())
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = algo(_batch([1, 3, 5, 7]))
        results.append((out["loss"].detach(), algo.memory.features.clone()))
    (loss32, bank32), (loss16, bank16) = results
    assert loss16.dtype == torch.float32 and torch.equal(loss16, loss32)
    assert torch.equal(bank16, bank32)


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="loss='infonce' must be 'nce'"):
        NPID(ResNet("resnet18"), loss="infonce")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="ensure_neg=true needs at least 2 training images"):
        NPID(ResNet("resnet18"), ensure_neg=True).setup(1)
    with pytest.raises(RuntimeError, match=r"setup\(num_samples\) must be called"):
        NPID(ResNet("resnet18"))(_batch([0]))


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "overrides", [["algo.model.ensure_neg=true"], ["algo.model.loss=softmax"]], ids=["nce-ensure-neg", "softmax"]
)
def test_two_processes_equal_one(overrides):
    """The bank (updated from gathered features), Z and the sampled negatives of 2 processes are those of 1."""
    from ranks import check_algorithm_ranks

    one = check_algorithm_ranks("npid", overrides=overrides, global_batch=8, steps=3)
    assert "memory.features" in one["state"]
