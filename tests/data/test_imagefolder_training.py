"""End-to-end training runs on real CIFAR-10 JPEGs read through ImageFolder."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import pytest

from conftest import run_training, tiny

pytestmark = pytest.mark.slow

# the 7x7/2 stem keeps a 32x32 ResNet-18 run a few seconds on a CPU (the data path is what is tested)
STEM = "dataset.hints.stem=imagenet"


def _tiny_without_dataset(algo: str) -> list[str]:
    """tiny(algo) minus its fake-dataset choice and fake-only keys (num_samples, num_classes, seed)."""
    fake_only = ("dataset=", "dataset.num_samples=", "dataset.num_classes=", "dataset.seed=")
    return [o for o in tiny(algo) if not o.startswith(fake_only)]


def _imagefolder(root: Path, *extra: str) -> list[str]:
    return _tiny_without_dataset("simclr") + [
        "dataset=imagefolder",
        f"dataset.root={root}",
        "dataset.image_size=32",
        STEM,
        *extra,
    ]


def _copy_subset(src: Path, dst: Path, classes: int, per_class: int) -> Path:
    for cls in sorted(p for p in src.iterdir() if p.is_dir())[:classes]:
        (dst / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:per_class]:
            shutil.copy(f, dst / cls.name / f.name)
    return dst


def test_tiny_without_dataset_drops_fake_keys():
    overrides = _tiny_without_dataset("simclr")
    assert not any(o.startswith(("dataset=", "dataset.num_samples")) for o in overrides)
    assert "dataset.image_size=32" in overrides and "algo=simclr" in overrides


def test_train_on_class_folders(cifar_folder, tmp_path):
    # 10 real JPEGs of each of the 10 classes (all 300 take ~4x longer): 80 to train on, 20 held out for kNN
    root = _copy_subset(cifar_folder, tmp_path / "data", classes=10, per_class=10)
    result = run_training(_imagefolder(root, "dataset.val_fraction=0.2"), tmp_path / "run")
    assert result.epochs == 1 and result.steps == 80 // 16
    assert result.last_checkpoint == tmp_path / "run" / "last.pt" and result.last_checkpoint.is_file()
    assert math.isfinite(result.final_loss)
    for knn in (result.knn_initial, result.knn_final):  # top-1/top-5 over the 20 held-out images
        assert set(knn) == {"top1", "top5"} and knn["top5"] >= knn["top1"]
        assert all(abs(v * 20 - round(v * 20)) < 1e-6 for v in knn.values()), knn
    assert "ImageFolder" in (tmp_path / "run" / "config.yaml").read_text()


def test_train_on_flat_folder_is_unlabelled(cifar_folder, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for cls in sorted(cifar_folder.iterdir())[:4]:
        for f in sorted(cls.iterdir())[:8]:
            shutil.copy(f, flat / f"{cls.name}_{f.name}")
    result = run_training(_imagefolder(flat, "dataset.val_fraction=0"), tmp_path / "run")
    assert result.steps == 32 // 16 and (tmp_path / "run" / "last.pt").is_file()
    assert result.knn_initial is None and result.knn_final is None


def test_corrupt_jpeg_is_skipped(cifar_folder, tmp_path, caplog):
    root = _copy_subset(cifar_folder, tmp_path / "data", classes=3, per_class=5)
    bad = root / "airplane" / "0000_bad.jpg"  # 16 files = one batch: every file is read
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 8)
    overrides = _imagefolder(root, "dataset.val_fraction=0.0", "dataset.on_bad_image=skip")
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        result = run_training(overrides, tmp_path / "run")
    assert result.steps == 1 and result.last_checkpoint is not None and result.last_checkpoint.is_file()
    assert any(str(bad) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_corrupt_jpeg_in_knn_bank(cifar_folder, tmp_path, caplog):
    """An unreadable file among the kNN images is replaced by the next image (and named in a warning):
    its feature row is that image's row, every row is a real feature, and the monitor runs."""
    import torch

    from conftest import compose_cfg
    from selfsup.engine.trainer import Trainer

    root = _copy_subset(cifar_folder, tmp_path / "data", classes=3, per_class=11)
    bad = root / "airplane" / "0000_bad.jpg"
    bad.write_bytes(b"garbage" * 10)
    trainer = Trainer(compose_cfg(_imagefolder(root, "dataset.val_fraction=0.25", "knn.k=1000")), tmp_path / "run")
    split = next(ds for ds in (trainer.train_set, trainer.val_set) if any(p == str(bad) for p, _ in ds.samples))
    pos = [p for p, _ in split.samples].index(str(bad))
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        feats, _ = trainer._extract(trainer.algo.extract, split)
    assert any(str(bad) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    torch.testing.assert_close(feats[pos], feats[pos + 1], atol=1e-5, rtol=1e-5)  # the substitute
    assert (feats.norm(dim=1) > 0).all() and torch.isfinite(feats).all()
    knn = trainer.knn()
    assert knn is not None and set(knn) == {"top1"} and 0 < len(trainer.val_set) * knn["top1"] <= len(trainer.val_set)
