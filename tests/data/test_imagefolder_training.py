"""End-to-end training runs on real CIFAR-10 JPEGs read through ImageFolder."""

from __future__ import annotations

import logging
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
    assert result.final_loss is not None and result.final_loss == result.final_loss  # finite, not NaN
    assert result.knn_initial is not None and result.knn_final is not None
    assert set(result.knn_final) == {"top1", "top5"} and 0.0 <= result.knn_final["top1"] <= 1.0
    assert "ImageFolder" in (tmp_path / "run" / "config.yaml").read_text()


def test_train_on_flat_folder_is_unlabelled(cifar_folder, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for cls in sorted(cifar_folder.iterdir())[:4]:
        for f in sorted(cls.iterdir())[:8]:
            shutil.copy(f, flat / f"{cls.name}_{f.name}")
    result = run_training(_imagefolder(flat, "dataset.val_fraction=0.2"), tmp_path / "run")
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


def test_corrupt_jpeg_in_knn_bank(cifar_folder, tmp_path):
    root = _copy_subset(cifar_folder, tmp_path / "data", classes=3, per_class=11)
    (root / "airplane" / "0000_bad.jpg").write_bytes(b"garbage" * 10)
    # k >= bank size: every bank row, the bad one included, is a neighbour
    overrides = _imagefolder(root, "dataset.val_fraction=0.25", "knn.k=1000")
    result = run_training(overrides, tmp_path / "run")
    assert result.knn_final is not None
