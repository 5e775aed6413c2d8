"""Benchmarks of a trained checkpoint (MMSelfSup's ``tools/benchmarks``), one command for all of them::

    python -m selfsup.benchmark bench=knn ckpt=outputs/simclr/<run>/last.pt          # on its own dataset
    python -m selfsup.benchmark bench=linear ckpt=... dataset=cifar10 dataset.root=<folder>
    python -m selfsup.benchmark bench=svm ckpt=zoo/r50-1a2b3c4d.pth backbone=resnet50 dataset=imagefolder ...
    python -m selfsup.benchmark -m bench=knn,linear ckpt=a.pt,b.pt                   # not supported: loop

``bench``: knn | linear | svm | semisup | finetune (``conf/bench/<name>.yaml``; options as
``bench.<key>=...``). ``dataset``: any dataset option; by default the checkpoint's own. Its training split
trains the probe (or is the kNN bank), its labelled held-out split is where every number is measured —
never on images the probe trained on. Every run prints its headline number, writes
``<out>/<bench>_<dataset>.json`` (options, checkpoint, dataset, every metric) and appends a row to
``<out>/results.md``; ``out`` defaults to ``<checkpoint folder>/benchmarks``. Accuracies are in percent.

Bad input (missing checkpoint, wrong architecture, unlabelled data, unknown option) prints one line
``selfsup: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING, OmegaConf

from selfsup.config import compose_tool, to_plain
from selfsup.engine.checkpoint import write_text_atomic
from selfsup.errors import ConfigError
from selfsup.eval.bench import BenchContext, Benchmark
from selfsup.eval.encoder import EvalConfig, check_checkpoint_arg, default_out, eval_datasets, load_encoder

log = logging.getLogger("selfsup")
CONFIG_NAME = "benchmark"
RESULTS = "results.md"
COLUMNS = ("checkpoint", "epoch", "bench", "dataset", "metric", "value", "all metrics")


@dataclass
class BenchmarkConfig(EvalConfig):
    bench: Any = MISSING  # _target_ + options (generated schema, conf/bench/<name>.yaml)


def dataset_name(dataset: Any) -> str:
    name = type(dataset).__name__.lower()
    root = getattr(dataset, "root", None)
    return f"{name}:{Path(str(root)).name}" if root else name


def _cell(v: Any) -> str:
    """A number for the markdown table: 2 decimals, or 3 significant digits when that would show 0.00."""
    if isinstance(v, float):
        return f"{v:.2f}" if v == 0 or abs(v) >= 0.01 else f"{v:.3g}"
    return str(v)


def markdown_row(record: dict[str, Any]) -> str:
    others = ", ".join(f"{k} {_cell(v)}" for k, v in record["metrics"].items())
    value = record["metrics"].get(record["headline"])
    cells = [
        record["checkpoint"],
        str(record["epoch"]),
        record["bench"],
        record["dataset"],
        record["headline"],
        _cell(value),
        others,
    ]
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def append_row(path: Path, row: str) -> None:
    """Add ``row`` to the markdown table in ``path`` (written with its header when new)."""
    text = path.read_text() if path.is_file() else ""
    if not text:
        text = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    write_text_atomic(text + row + "\n", path)


def run(cfg: BenchmarkConfig) -> dict[str, Any]:
    """Run ``cfg.bench`` on ``cfg.ckpt``; the record written to the JSON file."""
    from selfsup.engine.build import build

    check_checkpoint_arg(cfg.ckpt)
    torch.manual_seed(cfg.seed)
    bench = build(cfg.bench)
    if not isinstance(bench, Benchmark):
        raise ConfigError(f"bench._target_ builds a {type(bench).__name__}, not a selfsup Benchmark")
    encoder = load_encoder(cfg.ckpt, cfg.device, cfg.backbone, cfg.precision)
    train, val = eval_datasets(cfg, encoder)
    if not train.has_labels or val is None:
        why = "has no labels" if not train.has_labels else "has no labelled held-out split"
        raise ConfigError(
            f"bench={bench.name} needs labelled images and a held-out split to measure on, but the dataset {why}: "
            "use class folders with dataset.val_fraction=0.1 (or dataset.val_root=<folder>), or another dataset"
        )
    out = default_out(cfg, "benchmarks")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    metrics = bench.run(BenchContext(encoder, train, val, out, cfg))
    dataset = dataset_name(train)
    stem = f"{bench.name}_{dataset.replace(':', '_')}"
    record: dict[str, Any] = {
        "bench": bench.name,
        "checkpoint": str(cfg.ckpt),
        "epoch": encoder.epoch,
        "dataset": dataset,
        "train_images": len(train),
        "val_images": len(val),
        "headline": bench.headline,
        "metrics": metrics,
        "options": {k: v for k, v in to_plain(cfg.bench).items() if k != "_target_"},
        "device": str(encoder.device),
        "precision": encoder.precision,
        "seconds": round(time.perf_counter() - start, 2),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "json": str(out / f"{stem}.json"),
    }
    write_text_atomic(json.dumps(record, indent=2) + "\n", out / f"{stem}.json")
    append_row(out / RESULTS, markdown_row(record))
    return record


def main(argv: list[str] | None = None) -> None:
    from selfsup.tools import run_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return
    if "--cfg" in argv:  # the composed options, as --cfg job shows a training run's
        cfg = run_cli(lambda: compose_tool(CONFIG_NAME, BenchmarkConfig, [a for a in argv if a != "--cfg"]))
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
        return
    record = run_cli(lambda: run(compose_tool(CONFIG_NAME, BenchmarkConfig, argv)), verbose=True)
    value = record["metrics"].get(record["headline"])
    shown = f"{value:.2f}" if isinstance(value, float) else str(value)
    print(f"{record['bench']} {record['headline']} = {shown}  ({record['dataset']}, {record['checkpoint']})")
    print(f"written to {record['json']} and {Path(record['json']).with_name(RESULTS)}", flush=True)


if __name__ == "__main__":
    main()
