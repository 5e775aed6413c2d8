"""python -m selfsup.benchmark: one entry point for every benchmark; here the entry itself and bench=knn
(the linear, SVM, semi-supervised and fine-tune benchmarks have their own tests under tests/eval/)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from conftest import run_tool
from selfsup.benchmark import RESULTS, BenchmarkConfig, run
from selfsup.config import compose_tool
from selfsup.data.views import Normalize
from selfsup.engine.build import build_dataset
from selfsup.engine.pretrained import load_pretrained
from selfsup.eval.features import extract_features
from selfsup.eval.knn import knn_accuracy


def bench(*overrides: str) -> dict:
    return run(compose_tool("benchmark", BenchmarkConfig, ["device=cpu", *overrides]))


def test_knn_benchmark_measures_the_checkpoints_features_on_the_held_out_split(simclr_digits_ckpt, tmp_path):
    record = bench(f"ckpt={simclr_digits_ckpt}", f"out={tmp_path}", "bench.k=[1,20]")
    # the same number computed here from the checkpoint, independently of the benchmark's plumbing
    pre = load_pretrained(simclr_digits_ckpt)
    train, val = build_dataset(pre.config.dataset, "train"), build_dataset(pre.config.dataset, "val")
    norm = Normalize(train.mean, train.std, pre.algo.backbone.conv1.weight.device)
    bank, bank_labels = extract_features(pre.algo.extract, train, norm)
    queries, query_labels = extract_features(pre.algo.extract, val, norm)
    for k in (1, 20):
        expected = knn_accuracy(queries, query_labels, bank, bank_labels, 10, k=k)
        assert record["metrics"][f"top1_k{k}"] == pytest.approx(100 * expected["top1"])
        assert record["metrics"][f"top5_k{k}"] == pytest.approx(100 * expected["top5"])
    assert record["headline"] == "top1_k20" and 50 < record["metrics"]["top1_k20"] <= 100
    assert (record["train_images"], record["val_images"], record["dataset"]) == (1437, 360, "digits")
    assert record["epoch"] == 2 and record["options"] == {"k": [1, 20], "temperature": 0.07, "stage": "pooled"}
    saved = json.loads((tmp_path / "knn_digits.json").read_text())
    assert saved["metrics"] == record["metrics"] and saved["checkpoint"] == str(simclr_digits_ckpt)


def test_every_run_adds_a_markdown_row(simclr_digits_ckpt, tmp_path):
    bench(f"ckpt={simclr_digits_ckpt}", f"out={tmp_path}", "bench.k=[20]")
    bench(f"ckpt={simclr_digits_ckpt}", f"out={tmp_path}", "bench.k=[5]", "bench.stage=layer3")
    lines = (tmp_path / RESULTS).read_text().splitlines()
    assert lines[0].startswith("| checkpoint | epoch | bench | dataset | metric | value |") and len(lines) == 4
    assert "| knn | digits | top1_k20 |" in lines[2] and "| knn | digits | top1_k5 |" in lines[3]


def test_the_command_prints_the_number_and_where_it_went(simclr_digits_ckpt, tmp_path):
    proc = run_tool("selfsup.benchmark", f"ckpt={simclr_digits_ckpt}", f"out={tmp_path}", "bench.k=[20]")
    assert proc.returncode == 0, proc.stderr
    assert "knn top1_k20 = " in proc.stdout and str(tmp_path / "knn_digits.json") in proc.stdout
    default = run_tool("selfsup.benchmark", "--cfg", "ckpt=x")
    assert "perplexity" not in default.stdout and "temperature: 0.07" in default.stdout


def test_bad_input_is_one_line_and_exit_2(simclr_digits_ckpt, tmp_path, capsys, monkeypatch):
    """In-process through main() (the CLI run above shows the same path in a subprocess)."""
    from selfsup.benchmark import main

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 10, 10)).save(flat / f"{i}.png")
    cases = {
        (f"ckpt={tmp_path / 'nope.pt'}",): "does not exist",
        (): "ckpt is not set",
        (f"ckpt={tmp_path}",): "is a folder, not a checkpoint",
        (f"ckpt={simclr_digits_ckpt}", "bench=nope"): "Could not find 'bench/nope'",
        (f"ckpt={simclr_digits_ckpt}", "bench.k=[0]"): "bench.k must be",
        (f"ckpt={simclr_digits_ckpt}", "bench.stage=layer9"): "unknown stage",
        (f"ckpt={simclr_digits_ckpt}", "dataset=imagefolder", f"dataset.root={flat}"): "needs labelled images",
    }
    for args, message in cases.items():
        with pytest.raises(SystemExit) as exit_:
            main([*args, f"out={tmp_path / 'out'}", "device=cpu"])
        assert exit_.value.code == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("selfsup: error: ") and message in lines[0], (args, lines)


def test_an_exported_backbone_is_benchmarked_with_the_architecture_named(simclr_digits_ckpt, tmp_path, capsys):
    """An exported file (torchvision keys, no config) gives the same kNN as its checkpoint once backbone= names
    its architecture and dataset= its data; without them, or with another architecture, one error line."""
    from selfsup.benchmark import main
    from selfsup.tools.export import export

    exported = export(simclr_digits_ckpt, tmp_path / "zoo" / "r18").path
    same = ["bench.k=[20]", "device=cpu"]
    want = bench(f"ckpt={simclr_digits_ckpt}", f"out={tmp_path / 'a'}", *same)["metrics"]
    got = bench(
        f"ckpt={exported}",
        f"out={tmp_path / 'b'}",
        "backbone=resnet18",
        "backbone.stem=imagenet",
        "dataset=digits",
        *same,
    )
    assert got["metrics"] == pytest.approx(want) and got["epoch"] is None
    cases = {
        ("dataset=digits",): "name the architecture, e.g. backbone=resnet50",
        ("backbone=resnet18",): "also choose the dataset, e.g. dataset=digits",
        ("backbone=resnet50", "dataset=digits"): "",
        ("backbone=vit_tiny", "dataset=digits"): "",
    }
    for args, message in cases.items():
        with pytest.raises(SystemExit) as exit_:
            main([f"ckpt={exported}", *args, f"out={tmp_path / 'c'}", *same])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and err[-1].startswith("selfsup: error: ") and message in err[-1], (args, err)
        assert len([line for line in err if line.startswith("selfsup: error")]) == 1


def test_knn_on_real_cifar_images_from_an_image_folder(simclr_digits_ckpt, cifar_folder, tmp_path):
    """Any dataset option: the CIFAR-10 JPEGs of ../shared/data as a class-folder tree, 20% of each class held
    out (the kNN bank never holds those)."""
    record = bench(
        f"ckpt={simclr_digits_ckpt}",
        f"out={tmp_path}",
        "dataset=imagefolder",
        f"dataset.root={cifar_folder}",
        "dataset.image_size=32",
        "dataset.val_fraction=0.2",
        "bench.k=[20]",
    )
    assert (record["train_images"], record["val_images"]) == (240, 60)
    assert record["dataset"] == f"imagefolder:{cifar_folder.name}" and record["metrics"]["top5_k20"] >= 10.0
