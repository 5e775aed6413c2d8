"""MoCo's Queue, NPID's MemoryBank and MoCo's shuffling BN (batch_shuffle / batch_unshuffle), in one process.

References: a Python list for the queue (FIFO, one key at a time), numpy float64 row loops for the memory bank
update (MMSelfSup's SimpleMemory convention, momentum != 0.5 so that swapped weights fail). The 2-process
behaviour (gathers, broadcast) is in test_memory_distributed.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selfsup import distributed
from selfsup.errors import ConfigError
from selfsup.models.memory import MemoryBank, Queue

# ---------------------------------------------------------------------------------------------- Queue


def test_queue_starts_with_seeded_unit_keys_and_ptr_zero():
    torch.manual_seed(0)
    q = Queue(7, 5)
    assert q.features.shape == (7, 5) and q.features.dtype == torch.float32
    torch.testing.assert_close(q.features.norm(dim=1), torch.ones(7))
    assert q.ptr.dtype == torch.long and q.ptr.shape == () and int(q.ptr) == 0
    assert set(q.state_dict()) == {"features", "ptr"}
    torch.manual_seed(0)
    assert torch.equal(Queue(7, 5).features, q.features)  # the global RNG, as MoCo's randn
    assert not torch.equal(Queue(7, 5).features, q.features)


class ListQueue:
    """The reference: a list of slots written one key at a time at ptr, ptr wrapping around."""

    def __init__(self, initial: list[list[float]]) -> None:
        self.slots = [list(row) for row in initial]
        self.ptr = 0

    def enqueue(self, keys: list[list[float]]) -> None:
        for key in keys:
            self.slots[self.ptr] = list(key)
            self.ptr = (self.ptr + 1) % len(self.slots)


def test_queue_is_fifo_with_wrap_around_like_a_list():
    """Batches that fit, end exactly at the end, run past it, fill it exactly, and exceed it."""
    size, dim = 5, 3
    torch.manual_seed(1)
    q = Queue(size, dim)
    ref = ListQueue(q.features.tolist())
    stream: list[list[float]] = []
    for step, n in enumerate((2, 3, 4, 1, 5, 7, 3, 12)):
        keys = torch.arange(len(stream), len(stream) + n, dtype=torch.float32)[:, None] * torch.ones(dim) + step / 10
        stream += keys.tolist()
        q.enqueue(keys)
        ref.enqueue(keys.tolist())
        assert int(q.ptr) == ref.ptr == len(stream) % size, f"step {step}"
        assert q.features.tolist() == ref.slots, f"step {step}"
        # FIFO: once full, the queue holds exactly the newest `size` keys, the oldest overwritten first
        if len(stream) >= size:
            assert sorted(q.features.tolist()) == sorted(stream[-size:]), f"step {step}"
            assert q.features[(int(q.ptr) - 1) % size].tolist() == stream[-1]  # newest just before ptr
            assert q.features[int(q.ptr)].tolist() == stream[-size]  # oldest at ptr: overwritten next


def test_queue_stores_bf16_keys_as_float32_detached():
    torch.manual_seed(0)
    q = Queue(6, 4)
    keys = (torch.randn(3, 4) / 3).to(torch.bfloat16).requires_grad_()
    q.enqueue(keys * 1)  # a key with a graph, as an encoder output
    assert q.features.dtype == torch.float32 and not q.features.requires_grad
    assert torch.equal(q.features[:3], keys.detach().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q.enqueue(torch.nn.functional.linear(torch.randn(2, 4), torch.randn(4, 4)))
    assert q.features.dtype == torch.float32 and int(q.ptr) == 5


def test_queue_forward_is_a_copy_usable_in_a_loss_across_enqueue():
    """MoCo: logits against the queue, enqueue, then backward. Autograd saved the queue for the gradient of q,
    so forward() must hand out a copy (queue.clone().detach()), not the buffer that enqueue overwrites."""
    torch.manual_seed(0)
    q = Queue(4, 3)
    contents = q()
    assert torch.equal(contents, q.features) and contents.data_ptr() != q.features.data_ptr()
    assert not contents.requires_grad
    query = torch.randn(2, 3, requires_grad=True)
    logits = query @ q().T
    q.enqueue(torch.randn(2, 3))
    logits.sum().backward()  # fails with "modified by an inplace operation" if forward() returned the buffer
    torch.testing.assert_close(query.grad, contents.sum(0).expand(2, 3))


def test_queue_state_dict_round_trip_resumes_ptr_and_keys():
    torch.manual_seed(0)
    q = Queue(5, 2)
    q.enqueue(torch.randn(3, 2))
    q.enqueue(torch.randn(4, 2))
    assert int(q.ptr) == 2
    state = {k: v.clone() for k, v in q.state_dict().items()}
    torch.manual_seed(1)
    resumed = Queue(5, 2)
    assert not torch.equal(resumed.features, q.features) and int(resumed.ptr) == 0
    resumed.load_state_dict(state)
    assert torch.equal(resumed.features, q.features) and int(resumed.ptr) == 2
    keys = torch.randn(2, 2)
    q.enqueue(keys)
    resumed.enqueue(keys)
    assert torch.equal(resumed.features, q.features) and int(resumed.ptr) == int(q.ptr) == 4
    assert torch.equal(resumed.features[2:4], keys)


@pytest.mark.parametrize(("size", "dim", "bad"), [(0, 4, "size"), (8, 0, "dim"), (2.5, 4, "size"), (8, True, "dim")])
def test_queue_rejects_bad_sizes(size, dim, bad):
    with pytest.raises(ConfigError, match=rf"Queue needs {bad} >= 1 \(an integer\)"):
        Queue(size, dim)


@pytest.mark.parametrize("shape", [(3, 5), (3,), (2, 4, 1)])
def test_queue_rejects_keys_of_another_shape(shape):
    q = Queue(8, 4)
    with pytest.raises(ValueError, match=r"expects keys of shape \[n, 4\] \(one key per row\), got "):
        q.enqueue(torch.randn(*shape))


# ---------------------------------------------------------------------------------------------- MemoryBank
def _bank_reference(bank: np.ndarray, index: list[int], feats: np.ndarray, momentum: float) -> np.ndarray:
    """MMSelfSup SimpleMemory, row by row in float64: v <- L2norm((1 - momentum) v + momentum L2norm(f))."""
    out = bank.astype(np.float64).copy()
    for i, f in zip(index, feats.astype(np.float64)):
        f = f / np.sqrt((f * f).sum())
        v = (1 - momentum) * out[i] + momentum * f
        out[i] = v / np.sqrt((v * v).sum())
    return out


def test_memory_bank_starts_with_seeded_unit_rows():
    torch.manual_seed(0)
    bank = MemoryBank(12, 4)
    assert bank.features.shape == (12, 4) and bank.features.dtype == torch.float32 and bank.momentum == 0.5
    torch.testing.assert_close(bank.features.norm(dim=1), torch.ones(12))
    assert set(bank.state_dict()) == {"features"}
    torch.manual_seed(0)
    assert torch.equal(MemoryBank(12, 4).features, bank.features)


def test_memory_bank_update_is_simplememorys_formula():
    """momentum weighs the new feature (MMSelfSup); NPID's m = 1 - momentum weighs the old entry."""
    torch.manual_seed(0)
    momentum = 0.3
    bank = MemoryBank(10, 4, momentum=momentum)
    old = bank.features.numpy().copy()
    index = [3, 7, 0]
    feats = 3 * torch.randn(3, 4)  # not normalised: the bank normalises them
    bank.update(torch.tensor(index), feats)
    want = _bank_reference(old, index, feats.numpy(), momentum)
    np.testing.assert_allclose(bank.features.numpy(), want, rtol=0, atol=1e-6)
    untouched = [i for i in range(10) if i not in index]
    np.testing.assert_array_equal(bank.features.numpy()[untouched], old[untouched])  # exactly unchanged
    # the swapped convention (momentum weighing the old entry) gives other rows: the check is not vacuous
    swapped = _bank_reference(old, index, feats.numpy(), 1 - momentum)
    assert np.abs(swapped[index] - want[index]).max() > 1e-2
    # NPID's official form with m = 1 - momentum is the same update
    npid = old.astype(np.float64).copy()
    m = 1 - momentum
    for i, f in zip(index, feats.numpy().astype(np.float64)):
        v = m * npid[i] + (1 - m) * f / np.linalg.norm(f)
        npid[i] = v / np.linalg.norm(v)
    np.testing.assert_allclose(bank.features.numpy(), npid, rtol=0, atol=1e-6)


def test_memory_bank_momentum_one_replaces_and_zero_keeps():
    torch.manual_seed(0)
    feats = torch.randn(2, 3)
    bank = MemoryBank(4, 3, momentum=1.0)
    bank.update(torch.tensor([1, 2]), feats)
    torch.testing.assert_close(bank.features[1:3], F.normalize(feats, dim=1))
    bank = MemoryBank(4, 3, momentum=0)
    before = bank.features.clone()
    bank.update(torch.tensor([1, 2]), feats)
    torch.testing.assert_close(bank.features, before)


def test_memory_bank_update_under_bf16_autocast_is_float32_math():
    torch.manual_seed(0)
    bank = MemoryBank(16, 8, momentum=0.2)
    old = bank.features.clone()
    x, w = torch.randn(5, 8), torch.randn(8, 8)
    index = torch.tensor([0, 4, 9, 10, 15])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = F.linear(x, w)  # an encoder output under autocast
        assert feats.dtype == torch.bfloat16
        bank.update(index, feats)
    assert bank.features.dtype == torch.float32
    f32 = feats.float()  # the bf16 values, in float32
    want = torch.tensor(_bank_reference(old.numpy(), index.tolist(), f32.numpy(), 0.2), dtype=torch.float32)
    torch.testing.assert_close(bank.features, want, atol=1e-6, rtol=0)
    # not vacuous: the same update computed in bf16 is far off
    in_bf16 = F.normalize(0.8 * old[index].bfloat16() + 0.2 * F.normalize(feats, dim=1), dim=1).float()
    assert (in_bf16 - want[index]).abs().max() > 1e-4


def test_memory_bank_repeated_index_keeps_its_last_feature():
    """DistributedSampler padding can repeat an index in the global batch: one update, from its last feature."""
    torch.manual_seed(0)
    bank = MemoryBank(8, 3, momentum=0.4)
    old = bank.features.numpy().copy()
    feats = torch.randn(4, 3)
    bank.update(torch.tensor([2, 5, 2, 6]), feats)
    want = _bank_reference(old, [5, 2, 6], feats[[1, 2, 3]].numpy(), 0.4)  # row 2 from feats[2], once
    np.testing.assert_allclose(bank.features.numpy(), want, rtol=0, atol=1e-6)


def test_memory_bank_state_dict_round_trip():
    torch.manual_seed(0)
    bank = MemoryBank(6, 2, momentum=0.3)
    bank.update(torch.tensor([1, 4]), torch.randn(2, 2))
    torch.manual_seed(1)
    resumed = MemoryBank(6, 2, momentum=0.3)
    resumed.load_state_dict(bank.state_dict())
    assert torch.equal(resumed.features, bank.features)


@pytest.mark.parametrize("bad", [[-1], [10], [3, 12]])
def test_memory_bank_rejects_an_index_out_of_range(bad):
    bank = MemoryBank(10, 2)
    with pytest.raises(ValueError, match=r"dataset index (-1|10|12) outside \[0, 10\).*num_samples=len\(train set\)"):
        bank.update(torch.tensor(bad), torch.randn(len(bad), 2))


def test_memory_bank_rejects_bad_index_or_feature_shapes():
    bank = MemoryBank(10, 2)
    with pytest.raises(ValueError, match=r"index as a 1-D integer tensor.*dtype torch.float32"):
        bank.update(torch.tensor([1.0, 2.0]), torch.randn(2, 2))
    with pytest.raises(ValueError, match=r"index as a 1-D integer tensor.*got shape \(2, 1\)"):
        bank.update(torch.tensor([[1], [2]]), torch.randn(2, 2))
    with pytest.raises(ValueError, match=r"features of shape \[len\(index\), dim\] = \[2, 2\], got \(2, 3\)"):
        bank.update(torch.tensor([1, 2]), torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"features of shape \[len\(index\), dim\] = \[2, 2\], got \(3, 2\)"):
        bank.update(torch.tensor([1, 2]), torch.randn(3, 2))


@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan"), "0.5"])
def test_memory_bank_rejects_a_bad_momentum(momentum):
    with pytest.raises(ConfigError, match=r"momentum=.* must be in \[0, 1\]; it weighs the new feature"):
        MemoryBank(10, 2, momentum=momentum)


@pytest.mark.parametrize(("n", "dim", "bad"), [(0, 2, "num_samples"), (10, -1, "dim")])
def test_memory_bank_rejects_bad_sizes(n, dim, bad):
    with pytest.raises(ConfigError, match=rf"MemoryBank needs {bad} >= 1"):
        MemoryBank(n, dim)


def test_sample_negatives_are_uniform_indices_in_range_and_seeded():
    bank = MemoryBank(10, 2)
    neg = bank.sample_negatives(50, 200, generator=torch.Generator().manual_seed(0))
    assert neg.shape == (200, 50) and neg.dtype == torch.long
    assert int(neg.min()) == 0 and int(neg.max()) == 9
    counts = torch.bincount(neg.flatten(), minlength=10).float()
    assert ((counts - 1000).abs() < 150).all(), counts  # 10,000 draws, 1,000 expected per row (std ~30)
    again = bank.sample_negatives(50, 200, generator=torch.Generator().manual_seed(0))
    assert torch.equal(neg, again)
    assert not torch.equal(neg, bank.sample_negatives(50, 200, generator=torch.Generator().manual_seed(1)))
    torch.manual_seed(3)
    a = bank.sample_negatives(4, 3)
    torch.manual_seed(3)
    assert torch.equal(a, bank.sample_negatives(4, 3))  # the global RNG without a generator
    assert bank.sample_negatives(4, 0).shape == (0, 4)


def test_sample_negatives_rejects_bad_counts():
    bank = MemoryBank(10, 2)
    with pytest.raises(ConfigError, match=r"sample_negatives needs num \(negatives per sample\) >= 1"):
        bank.sample_negatives(0, 4)
    with pytest.raises(ValueError, match=r"sample_negatives needs batch >= 0 \(the batch size\), got -1"):
        bank.sample_negatives(4, -1)


# ---------------------------------------------------------------------------------------------- shuffling BN
def test_batch_shuffle_is_a_permutation_that_unshuffle_inverts():
    x = torch.arange(8 * 3, dtype=torch.float32).view(8, 3)
    shuffled, unshuffle = distributed.batch_shuffle(x, generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(perm, torch.arange(8))
    assert torch.equal(shuffled, x[perm])
    assert unshuffle.dtype == torch.long and torch.equal(unshuffle, torch.argsort(perm))
    assert torch.equal(perm[unshuffle], torch.arange(8)) and torch.equal(unshuffle[perm], torch.arange(8))
    assert torch.equal(distributed.batch_unshuffle(shuffled, unshuffle), x)
    # key-encoder style: per-row outputs of the shuffled batch come back in the original order
    out = shuffled * 2 + 1
    assert torch.equal(distributed.batch_unshuffle(out, unshuffle), x * 2 + 1)


def test_batch_shuffle_uses_the_generator_or_the_global_rng():
    x = torch.arange(16).view(16, 1)
    a, ia = distributed.batch_shuffle(x, generator=torch.Generator().manual_seed(5))
    b, ib = distributed.batch_shuffle(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(ia, ib)
    c, _ = distributed.batch_shuffle(x, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(a, c)
    torch.manual_seed(2)
    d, _ = distributed.batch_shuffle(x)
    torch.manual_seed(2)
    assert torch.equal(d, distributed.batch_shuffle(x)[0])


def test_batch_shuffle_then_unshuffle_passes_gradients_through():
    x = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(6, 4)
    shuffled, unshuffle = distributed.batch_shuffle(x, generator=torch.Generator().manual_seed(0))
    (distributed.batch_unshuffle(shuffled, unshuffle) * w).sum().backward()
    assert torch.equal(x.grad, w)


def test_batch_shuffle_and_unshuffle_reject_bad_inputs():
    with pytest.raises(ValueError, match=r"batch_shuffle expects a batch \[n, ...\].*0-d tensor"):
        distributed.batch_shuffle(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"batch_unshuffle expects a batch \[n, ...\].*0-d tensor"):
        distributed.batch_unshuffle(torch.tensor(1.0), torch.arange(1))
    with pytest.raises(ValueError, match=r"world_size \* n = 1 \* 4 = 4 entries, got shape \(5,\)"):
        distributed.batch_unshuffle(torch.randn(4, 2), torch.arange(5))
    with pytest.raises(ValueError, match=r"an integer tensor.*dtype torch.float32"):
        distributed.batch_unshuffle(torch.randn(4, 2), torch.arange(4.0))
