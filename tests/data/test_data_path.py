"""Where the images live (``dataset.cache``) and who makes the views (``data.executor``, ``data.decode``): every
path gives the trainer the same batches of the same images with views drawn from the same per-image seeds."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import compose_cfg, tiny
from selfsup.data.datasets import Cache, Digits, FakeImages
from selfsup.data.loader import Executor, ResidentLoader, epoch_sampler, resolve_cache
from selfsup.engine.resume import changes, classify
from selfsup.engine.trainer import Trainer
from selfsup.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("one_thread")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _trainer(tmp_path: Path, *overrides: str, dataset: str = "fake") -> Trainer:
    cfg = compose_cfg([*tiny("simclr", dataset), "knn.enabled=false", "log.tensorboard=false", *overrides])
    return Trainer(cfg, tmp_path / "_".join(o.replace("/", "") for o in overrides)[:80] or "run")


def _first_batches(trainer: Trainer, n: int = 2) -> list[dict]:
    return [trainer.to_device(b) for b in itertools.islice(trainer.loader(1, skip_batches=1), n)]


def test_cache_auto_keeps_in_memory_datasets_resident_and_reads_folders_through_workers():
    digits = Digits("val")
    assert resolve_cache(Cache.auto, digits, CPU, Executor.batched) is Cache.memory
    assert resolve_cache(Cache.auto, digits, CUDA, Executor.batched) is Cache.device
    assert resolve_cache(Cache.auto, digits, CPU, Executor.per_sample) is Cache.none
    assert resolve_cache(Cache.auto, object(), CUDA, Executor.batched) is Cache.none  # an image folder
    assert resolve_cache(Cache.device, digits, CPU, Executor.batched) is Cache.memory  # the CPU's memory
    with pytest.raises(ConfigError, match="dataset.cache=memory needs data.executor=batched"):
        resolve_cache(Cache.memory, digits, CPU, Executor.per_sample)


def test_the_resident_loader_gives_the_samplers_batches():
    """Whole batches of the seeded permutation (the tail dropped), this rank's share, from a given batch on; the
    images and labels of those indices."""
    data = FakeImages("train", num_samples=50)
    sampler = epoch_sampler(50, 8, epoch=3, seed=1, rank=1, world_size=2, skip_batches=1)
    keys = list(epoch_sampler(50, 8, epoch=3, seed=1, rank=1, world_size=2))
    batches = list(ResidentLoader(data.images, data.labels, sampler, 8))
    assert len(batches) == 2 == len(ResidentLoader(data.images, data.labels, sampler, 8))  # 25 per rank: 3, skip 1
    for b, batch in enumerate(batches):
        want = keys[8 * (b + 1) : 8 * (b + 2)]
        assert batch["index"].tolist() == [i for i, _ in want] and batch["seeds"].tolist() == [s for _, s in want]
        assert torch.equal(batch["images"], data.images[batch["index"]])
        assert torch.equal(batch["label"], data.labels[batch["index"]])


def test_every_cache_mode_and_worker_count_gives_the_same_views(tmp_path):
    """cache=memory (the whole batch on the device) and cache=none (workers cut the views, the device colours
    them) with 0 or 2 workers: the same images in the same order and the same views up to the uint8 rounding of
    the workers' cut; the per-sample executor shows the same images with other (torchvision-drawn) views."""
    memory = _first_batches(_trainer(tmp_path, "dataset.cache=memory"))
    none0 = _first_batches(_trainer(tmp_path, "dataset.cache=none", "loader.num_workers=0"))
    none2 = _first_batches(_trainer(tmp_path, "dataset.cache=none", "loader.num_workers=2"))
    per_sample = _first_batches(_trainer(tmp_path, "data.executor=per_sample"))
    for a, b, c, d in zip(memory, none0, none2, per_sample, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["index"], d["index"])
        for va, vb, vc, vd in zip(a["views"], b["views"], c["views"], d["views"], strict=True):
            assert torch.equal(vb, vc)  # the number of workers changes nothing
            assert (va - vb).abs().max() < 0.1  # normalised units: ~2.5 grey levels
            assert (va - vd).abs().mean() > 0.05  # other generators, other views
        assert torch.equal(a["view_targets"], b["view_targets"])


def test_the_executor_times_itself_and_cache_memory_has_no_loader_wait(tmp_path):
    trainer = _trainer(tmp_path, "dataset.cache=memory")
    assert trainer.cache is Cache.memory and trainer.resident is not None and trainer.train_views is None
    _first_batches(trainer)
    assert trainer._aug_time > 0


@pytest.fixture(scope="module")
def jpeg_folder(cifar_folder, tmp_path_factory) -> Path:
    """Two classes of real CIFAR-10 JPEGs."""
    out = tmp_path_factory.mktemp("two_classes")
    for cls in sorted(p.name for p in cifar_folder.iterdir())[:2]:
        (out / cls).symlink_to(cifar_folder / cls, target_is_directory=True)
    return out


def test_decoding_on_the_device_gives_the_views_of_decoding_in_the_workers(jpeg_folder, tmp_path):
    """data.decode=device (here the CPU stands in for the GPU): the same images as PIL in the workers, up to the
    decoders' rounding, hence nearly the same views."""
    common = [f"dataset.root={jpeg_folder}", "dataset.cache=none"]
    pil = _first_batches(_trainer(tmp_path, *common, dataset="imagefolder"))
    device = _first_batches(_trainer(tmp_path, *common, "data.decode=device", dataset="imagefolder"))
    for a, b in zip(pil, device, strict=True):
        assert torch.equal(a["index"], b["index"])
        for va, vb in zip(a["views"], b["views"], strict=True):
            assert (va - vb).abs().mean() < 0.05
    # the files' bytes read in worker processes: the same batches
    workers = _first_batches(_trainer(tmp_path, *common, "data.decode=device", "loader.num_workers=2",
                                      dataset="imagefolder"))  # fmt: skip
    for a, b in zip(device, workers, strict=True):
        assert torch.equal(a["index"], b["index"])
        assert all(torch.equal(va, vb) for va, vb in zip(a["views"], b["views"], strict=True))


@pytest.mark.cuda
def test_on_cuda_resident_images_and_nvjpeg_give_the_cpus_batches(jpeg_folder, tmp_path):
    """dataset.cache=device (images on the GPU, the executor there) and data.decode=device (nvJPEG): the batches
    of the CPU paths, up to float and decoder rounding."""
    pairs = [
        (["device=cpu", "dataset.cache=memory"], ["device=cuda", "dataset.cache=device"], "fake"),
        ([f"dataset.root={jpeg_folder}", "dataset.cache=none", "device=cpu"],
         [f"dataset.root={jpeg_folder}", "dataset.cache=none", "device=cuda", "data.decode=device"], "imagefolder"),
    ]  # fmt: skip
    for on_cpu, on_gpu, dataset in pairs:
        want = _first_batches(_trainer(tmp_path, *on_cpu, dataset=dataset))
        got = _first_batches(_trainer(tmp_path, *on_gpu, dataset=dataset))
        for a, b in zip(want, got, strict=True):
            assert torch.equal(a["index"], b["index"].cpu())
            for va, vb in zip(a["views"], b["views"], strict=True):
                assert vb.is_cuda and (va - vb.cpu()).abs().mean() < 0.05


def test_decoding_on_the_device_needs_jpeg_files_of_an_image_folder(jpeg_folder, tmp_path):
    with pytest.raises(ConfigError, match="data.decode=device decodes the JPEGs of an image folder"):
        _trainer(tmp_path, "data.decode=device")  # fake images in memory
    folder = tmp_path / "mixed"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for k in range(20):
            Image.new("RGB", (32, 32), (k * 10, 0, 0)).save(folder / cls / f"{k}.png")
    trainer = _trainer(tmp_path, f"dataset.root={folder}", "dataset.cache=none", "data.decode=device",
                       dataset="imagefolder")  # fmt: skip
    with pytest.raises(DataError, match=r"data.decode=device decodes JPEG files only and cannot read .*\.png"):
        _first_batches(trainer, 1)


def test_resume_may_change_where_images_live_and_how_they_decode_but_not_the_executor():
    old = {"data": {"executor": "batched", "decode": "cpu"}, "dataset": {"cache": "memory"}, "compile_mode": "default"}
    new = {
        "data": {"executor": "batched", "decode": "device"},
        "dataset": {"cache": "none"},
        "compile_mode": "max-autotune",
    }
    assert classify(changes(old, new)) == ({}, {}, {})
    refused = classify(changes(old, {**new, "data": {"executor": "per_sample", "decode": "cpu"}}))[2]
    assert refused == {"data.executor": ("batched", "per_sample")}  # other views
    # a checkpoint from before the batched executor (no data.executor key) made per-sample views
    assert classify(changes({}, {"data": {"executor": "per_sample"}})) == ({}, {}, {})
    assert classify(changes({}, {"data": {"executor": "batched"}}))[2] == {"data.executor": ("per_sample", "batched")}


def test_compile_mode_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="compile_mode='fastest' must be one of default, reduce-overhead"):
        _trainer(tmp_path, "compile_mode=fastest")
