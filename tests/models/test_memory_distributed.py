"""Queue, MemoryBank and shuffling BN with 2 gloo processes on CPU against 1 process with the same global batch.

One spawn of 2 ranks (``torch.multiprocessing``, gloo, 127.0.0.1, a free port; the harness of
``tests/test_distributed.py``) runs every scenario below and writes each rank's results to ``rank{r}.pt``;
each test compares them with the same computation done here, in one process without a process group.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from selfsup import distributed
from selfsup.models.memory import MemoryBank, Queue

WORLD = 2
SPAWN_TIMEOUT = 180  # covers the module fixture's 2-process run
Job = tuple[str, Callable[[int, Any], dict], Any]


# ---------------------------------------------------------------------------------------------- harness
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, jobs: list[Job], out_dir: str) -> None:
    """Spawned rank: torchrun-like environment -> selfsup.distributed.init -> each job -> rank{r}.pt."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        CUDA_VISIBLE_DEVICES="-1",
    )
    torch.set_num_threads(1)
    env = distributed.init(device="cpu", backend="gloo", timeout_s=60)
    try:
        assert (env.rank, env.world_size) == (rank, world)
        results: dict[str, Any] = {}
        for name, target, payload in jobs:
            results[name] = target(rank, payload)
            distributed.barrier()
            torch.save(results, Path(out_dir) / f"rank{rank}.pt")  # partial results survive a later failure
    finally:
        distributed.shutdown()


def _shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    n = len(t) // WORLD
    return t[rank * n : (rank + 1) * n]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[list[dict], str | None]:
    """Every scenario's per-rank results (index = rank), and the error of the 2-process run if any."""
    jobs: list[Job] = [
        ("queue", _queue_worker, _queue_payload()),
        ("bank", _bank_worker, _bank_payload()),
        ("shuffle", _shuffle_worker, _shuffle_payload()),
    ]
    out = tmp_path_factory.mktemp("ranks")
    error = None
    try:
        mp.spawn(_entry, args=(WORLD, _free_port(), jobs, str(out)), nprocs=WORLD, join=True)
    except Exception as e:  # reported by the tests whose scenario is missing
        error = f"{type(e).__name__}: {e}"
    files = [out / f"rank{r}.pt" for r in range(WORLD)]
    return [torch.load(f, weights_only=False) if f.is_file() else {} for f in files], error


def _results(two_ranks: tuple[list[dict], str | None], name: str) -> list[Any]:
    results, error = two_ranks
    if any(name not in r for r in results):
        pytest.fail(f"the 2-process run did not complete scenario {name!r}:\n{error}")
    return [r[name] for r in results]


# ---------------------------------------------------------------------------------------------- Queue
QUEUE_SIZE, QUEUE_DIM, QUEUE_SEED = 8, 4, 3


def _queue_payload() -> list[torch.Tensor]:
    """Two steps with a global batch of 6 keys (2 ranks x 3): the second runs past the end of the queue."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(6, QUEUE_DIM, generator=gen) for _ in range(2)]


def _queue_run(batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    torch.manual_seed(QUEUE_SEED)  # the trainer seeds every rank alike before building the model
    q = Queue(QUEUE_SIZE, QUEUE_DIM)
    for keys in batches:
        q.enqueue(keys)
    return {k: v.clone() for k, v in q.state_dict().items()}


def _queue_worker(rank: int, batches: list[torch.Tensor]) -> dict:
    return _queue_run([_shard(b, rank) for b in batches])


@pytest.mark.slow
@pytest.mark.timeout(SPAWN_TIMEOUT)
def test_queue_enqueue_two_ranks_match_one_process(two_ranks):
    """2 ranks x 3 keys == 1 process enqueueing the 6 keys (rank 0's first), on both ranks, bit for bit."""
    batches = _queue_payload()
    ref = _queue_run(batches)
    assert int(ref["ptr"]) == 12 % QUEUE_SIZE
    local_only = _queue_run([_shard(b, 0) for b in batches])  # what a rank without the gather would hold
    assert not torch.equal(local_only["features"], ref["features"])
    for r in _results(two_ranks, "queue"):
        assert torch.equal(r["ptr"], ref["ptr"])
        assert torch.equal(r["features"], ref["features"])


# ---------------------------------------------------------------------------------------------- MemoryBank
BANK_SIZE, BANK_DIM, BANK_MOMENTUM, BANK_SEED = 12, 4, 0.3, 4


def _bank_payload() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two steps of 2 ranks x 3 samples; in the first, index 5 is on both ranks (DistributedSampler padding)."""
    gen = torch.Generator().manual_seed(1)
    index = [torch.tensor([1, 5, 9, 5, 2, 7]), torch.tensor([0, 3, 11, 4, 6, 1])]
    return [(i, 2 * torch.randn(6, BANK_DIM, generator=gen)) for i in index]


def _bank_run(steps: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    torch.manual_seed(BANK_SEED)
    bank = MemoryBank(BANK_SIZE, BANK_DIM, momentum=BANK_MOMENTUM)
    for index, feats in steps:
        bank.update(index, feats)
    return bank.features.clone()


def _bank_worker(rank: int, steps: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    return {"features": _bank_run([(_shard(i, rank), _shard(f, rank)) for i, f in steps])}


@pytest.mark.slow
@pytest.mark.timeout(SPAWN_TIMEOUT)
def test_memory_bank_update_two_ranks_match_one_process(two_ranks):
    steps = _bank_payload()
    ref = _bank_run(steps)
    for rank in range(WORLD):  # without the gather a rank would update only its own rows
        local_only = _bank_run([(_shard(i, rank), _shard(f, rank)) for i, f in steps])
        assert not torch.allclose(local_only, ref, atol=1e-3)
    results = _results(two_ranks, "bank")
    for r in results:
        torch.testing.assert_close(r["features"], ref, atol=1e-6, rtol=0)
    assert torch.equal(results[0]["features"], results[1]["features"])  # the ranks hold identical banks


# ---------------------------------------------------------------------------------------------- shuffling BN
SHUFFLE_N = 8  # global batch: 2 ranks x 4


def _shuffle_payload() -> dict:
    gen = torch.Generator().manual_seed(2)
    return {"x": torch.randn(SHUFFLE_N, 3, generator=gen), "w": torch.randn(SHUFFLE_N, 3, generator=gen)}


def _shuffle_worker(rank: int, p: dict) -> dict:
    x = _shard(p["x"], rank).clone().requires_grad_()
    # a different generator seed per rank: only the broadcast of rank 0's permutation makes them agree
    shuffled, unshuffle = distributed.batch_shuffle(x, generator=torch.Generator().manual_seed(10 + rank))
    out = 2 * shuffled + 1  # a per-sample "key encoder"
    restored = distributed.batch_unshuffle(out, unshuffle)
    (restored * _shard(p["w"], rank)).sum().backward()
    return {"shuffled": shuffled.detach(), "unshuffle": unshuffle, "restored": restored.detach(), "grad": x.grad}


@pytest.mark.slow
@pytest.mark.timeout(SPAWN_TIMEOUT)
def test_batch_shuffle_two_ranks_one_global_permutation(two_ranks):
    p = _shuffle_payload()
    perm = torch.randperm(SHUFFLE_N, generator=torch.Generator().manual_seed(10))  # rank 0's draw
    other = torch.randperm(SHUFFLE_N, generator=torch.Generator().manual_seed(11))
    assert not torch.equal(perm, other)  # rank 1 alone would use another permutation
    assert (perm[:4] >= 4).any() and (perm[4:] < 4).any()  # the slices mix the ranks' samples
    results = _results(two_ranks, "shuffle")
    # one permutation, identical on both ranks, equal to rank 0's
    for r in results:
        assert torch.equal(r["unshuffle"], torch.argsort(perm))
    # the union of the shuffled slices (rank order) is the global batch permuted by it
    assert torch.equal(torch.cat([r["shuffled"] for r in results]), p["x"][perm])
    for rank, r in enumerate(results):
        # unshuffle gives each rank the outputs of its own rows, in their order
        torch.testing.assert_close(r["restored"], 2 * _shard(p["x"], rank) + 1, atol=0, rtol=0)
        # and gradients reach the rank that owns each sample: d/dx sum(w * (2 x + 1)) = 2 w
        torch.testing.assert_close(r["grad"], 2 * _shard(p["w"], rank), atol=0, rtol=0)
