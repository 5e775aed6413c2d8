"""2 gloo processes against 1 process for whole training steps of an algorithm.

Every algorithm that gathers, reduces or shuffles across ranks (MoCo's shuffle-BN and queue, SwAV's
Sinkhorn, Barlow Twins' and VICReg's batch statistics, DINO's center, NPID's bank, DeepCluster's
clustering) must train identically on 2 processes x n images and on 1 process x 2n images — lightly
shipped three separate bugs of exactly this kind (its issues #1528, #1920, #1977).

:func:`check_algorithm_ranks` runs the same few steps both ways and compares:

* the algorithm is built from ``tests/conftest.py``'s ``tiny(name)`` plus ``overrides`` on fake data
  (``dataset.num_samples = global_batch * steps``), with torch's RNG seeded identically first (as the
  trainer seeds every rank alike), then ``setup``, ``on_train_start``, ``on_epoch_start``,
  ``epoch_indices`` (when it gives an order, step s takes positions s*B..(s+1)*B-1 of it; otherwise images
  s*B..(s+1)*B-1);
* the views are the algorithm's real view pipelines, seeded per image; rank r takes rows r*n..(r+1)*n-1
  of every step's global batch (so a rank-order all_gather gives the 1-process order);
* each step: RNG re-seeded identically (an algorithm that draws random numbers in ``forward`` must draw
  them for the global batch on every rank and take its slice, as ``distributed.batch_shuffle`` does),
  ``forward``, ``backward``, gradients averaged over ranks (what DDP does), ``before_optimizer_step``,
  a plain SGD step, ``after_step``;
* ``sync_bn=True`` converts the BatchNorms of the 2-process model with selfsup's CPU SyncBatchNorm (as
  the trainer's ``sync_bn=true``); ``one_process_overrides`` are added to the 1-process model only (MoCo:
  ``algo.model.bn_splits=2`` emulates 2 ranks' per-device BatchNorm in one process).

Asserted: the mean over ranks of each step's local loss equals the 1-process loss (DDP's loss), every
rank's averaged gradients of the first and the last step equal the 1-process gradients, and the final
``state_dict`` (weights, buffers: queues, banks, centers, labels) of both ranks equals the 1-process one
(integer tensors exactly; float tensors within ``rtol_first`` = 1e-4 of their norm for the first step's
loss and gradients, within ``rtol`` = 1e-2 after several steps, which amplify float rounding — a real
difference is of order 1). ResNet backbones get ``zero_init_residual`` (without it a random ResNet-18 at
32 px amplifies float rounding ~1000x on the way back to conv1).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from torch.utils.data import default_collate

WORLD = 2


@dataclass
class Spec:
    name: str
    overrides: list[str] = field(default_factory=list)
    global_batch: int = 8
    steps: int = 3
    sync_bn: bool = True
    lr: float = 0.05


class _Ctx:
    """TrainContext: features of every training image (eval transform, eval mode), on every rank."""

    seed = 0

    def __init__(self, algo, images: torch.Tensor, normalize, state) -> None:
        self.algo, self.images, self.normalize, self.state = algo, images, normalize, state

    def extract_features(self, fn):
        was_training = self.algo.training
        self.algo.eval()
        try:
            with torch.no_grad():
                return torch.cat([fn(self.normalize(x)) for x in self.images.split(16)]).float()
        finally:
            self.algo.train(was_training)


def _config(spec: Spec, extra: list[str]):
    from conftest import compose_cfg, tiny
    from selfsup.config import typed

    overrides = tiny(spec.name) + [f"dataset.num_samples={spec.global_batch * spec.steps}"] + spec.overrides + extra
    cfg = compose_cfg(overrides)
    if cfg.backbone._target_.endswith("resnet.ResNet"):
        cfg = compose_cfg(overrides + ["backbone.zero_init_residual=true"])
    return typed(cfg)


def _slice(batch: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    n = len(batch["index"]) // world
    rows = slice(rank * n, (rank + 1) * n)
    return {
        "views": [v[rows] for v in batch["views"]],
        "view_targets": batch["view_targets"][rows],
        "masks": {k: m[rows] for k, m in batch["masks"].items()},
        "index": batch["index"][rows],
        "label": batch["label"][rows],
    }


def run_steps(spec: Spec, extra: list[str], rank: int = 0, world: int = 1) -> dict[str, Any]:
    """The steps of ``spec`` on this rank's share; losses, first/last averaged gradients, final state."""
    from selfsup import distributed
    from selfsup.data.loader import SeededViews
    from selfsup.data.views import Normalize
    from selfsup.engine.build import build_algorithm, build_dataset, view_pipelines
    from selfsup.engine.state import TrainState
    from selfsup.models.sync_batchnorm import convert_sync_batchnorm

    c = _config(spec, extra)
    ds = build_dataset(c.dataset, "train")
    torch.manual_seed(0)
    algo = build_algorithm(c, len(ds))
    if spec.sync_bn and world > 1:
        algo = convert_sync_batchnorm(algo, "cpu")
    algo.train()
    normalize = Normalize(ds.mean, ds.std, torch.device("cpu"))
    views = SeededViews(ds, view_pipelines(c))
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    state = TrainState(epoch=0, step=0, steps_per_epoch=spec.steps, epochs=1)
    ctx = _Ctx(algo, images, normalize, state)
    torch.manual_seed(1)
    algo.on_train_start(ctx)
    algo.on_epoch_start(ctx)
    order = algo.epoch_indices(0, 0)
    order = torch.arange(len(ds)) if order is None else order
    params = [p for p in algo.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=spec.lr)
    names = {p: n for n, p in algo.named_parameters()}
    out: dict[str, Any] = {"losses": [], "grads": []}
    b = spec.global_batch
    for s in range(spec.steps):
        keys = order[s * b : (s + 1) * b].tolist()
        loaded = default_collate([views[(i, 1_000 * s + i)] for i in keys])
        batch = _slice({**loaded, "views": [normalize(v) for v in loaded["views"]]}, rank, world)
        torch.manual_seed(100 + s)
        opt.zero_grad(set_to_none=False)
        loss = algo(batch)["loss"]
        loss.backward()
        for p in params:
            if p.grad is not None:
                distributed.all_reduce_(p.grad, op="mean")  # what DDP does
        algo.before_optimizer_step(state)
        if s in (0, spec.steps - 1):
            out["grads"].append({names[p]: p.grad.clone() for p in params if p.grad is not None})
        opt.step()
        state.step += 1
        algo.after_step(state)
        out["losses"].append(loss.detach().clone())
    out["state"] = {k: v.detach().clone() for k, v in algo.state_dict().items()}
    return out


@contextmanager
def gloo_rank(rank: int, world: int, port: int, timeout_s: float = 120) -> Iterator[Any]:
    """In a spawned process: become rank ``rank`` of ``world`` CPU processes in a gloo group, set up as torchrun
    would (environment variables, then ``selfsup.distributed.init``), one torch thread; yields the
    ``DistributedEnv`` and shuts the group down on exit."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        CUDA_VISIBLE_DEVICES="-1",
    )
    torch.set_num_threads(1)
    from selfsup import distributed

    env = distributed.init(device="cpu", backend="gloo", timeout_s=timeout_s)
    try:
        yield env
    finally:
        distributed.shutdown()


def _entry(rank: int, world: int, port: int, spec: Spec, out_dir: str) -> None:
    with gloo_rank(rank, world, port):
        torch.save(run_steps(spec, [], rank, world), Path(out_dir) / f"rank{rank}.pt")


def _close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float, rtol: float) -> None:
    """Integer tensors equal; float tensors within ``rtol`` of the reference's norm (plus ``atol``): float
    summation order differs between 1 and 2 processes, and a few steps amplify it element-wise (BatchNorm
    at 1x1 resolution), while a real difference (a missing gather, per-rank statistics) is of order 1."""
    if not a.is_floating_point():
        assert torch.equal(a, b), f"{what} differs: {a.flatten()[:8].tolist()} vs {b.flatten()[:8].tolist()}"
        return
    err, ref = float((a.double() - b.double()).norm()), float(b.double().norm())
    assert err <= rtol * ref + atol, f"{what}: |2 processes - 1 process| = {err:.3g}, |1 process| = {ref:.3g}"


def check_algorithm_ranks(
    name: str,
    overrides: list[str] | None = None,
    one_process_overrides: list[str] | None = None,
    global_batch: int = 8,
    steps: int = 3,
    sync_bn: bool = True,
    atol: float = 1e-6,
    rtol_first: float = 1e-4,
    rtol: float = 1e-2,
    tmp_dir: Path | None = None,
) -> dict[str, Any]:
    """Run ``steps`` of algorithm ``name`` on 2 gloo processes and on 1, assert they agree (see the module
    docstring); returns the 1-process result (losses, grads, state) for further checks."""
    import tempfile

    from selfsup.distributed import free_port

    spec = Spec(name, list(overrides or []), global_batch, steps, sync_bn)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run_steps(spec, list(one_process_overrides or []))
    finally:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(dir=tmp_dir) as out:
        mp.spawn(_entry, args=(WORLD, free_port(), spec, out), nprocs=WORLD, join=True)
        ranks = [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for s, want in enumerate(one["losses"]):
        got = torch.stack([r["losses"][s] for r in ranks]).mean()
        _close(got, want, f"{name}: step {s} loss (mean over ranks)", atol, rtol_first if s == 0 else rtol)
    for r, res in enumerate(ranks):
        for which, (g_two, g_one) in enumerate(zip(res["grads"], one["grads"], strict=True)):
            assert g_two.keys() == g_one.keys(), f"{name}: rank {r} has gradients for other parameters"
            for key, want in g_one.items():
                tol = rtol if which else rtol_first
                _close(g_two[key], want, f"{name}: rank {r} {('first', 'last')[which]} gradient of {key}", atol, tol)
        assert res["state"].keys() == one["state"].keys()
        for key, want in one["state"].items():
            _close(res["state"][key], want, f"{name}: rank {r} final state {key}", atol, rtol)
    return one
