"""Training-step throughput of an algorithm on synthetic, already-normalised data on the device.

Builds the run exactly as ``python -m selfsup.train`` would (same Hydra overrides, same trainer:
precision, channels_last, torch.compile, fused optimizers, LR schedule), then times
``Trainer.train_step`` on random batches that already sit on the device, so the figure is the
model + optimizer step alone, without the data pipeline. Prints one line per run::

    python -m selfsup.tools.benchmark_step --steps 30 -- algo=simclr backbone=resnet50 \\
        dataset=fake dataset.image_size=224 schedule.batch_size=256 compile=true

Options before ``--`` are the benchmark's; everything after it are Hydra overrides.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from typing import Any

import torch

from selfsup.algorithms.base import Batch
from selfsup.config import compose


def benchmark(overrides: list[str], steps: int = 20, warmup: int = 5) -> dict[str, Any]:
    """img/s and peak memory of ``steps`` timed optimizer steps after ``warmup`` untimed ones."""
    from selfsup.engine.trainer import Trainer, peak_memory_gib

    cfg = compose(["knn.enabled=false", "log.tensorboard=false", *overrides])
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir)
        algo, device = trainer.algo, trainer.device
        bs = int(cfg.schedule.batch_size)
        size = trainer.view_sizes[0]
        memory_format = trainer.normalize.memory_format
        views = [
            torch.randn(bs, 3, s, s, device=device).contiguous(memory_format=memory_format) for s in trainer.view_sizes
        ]
        item = trainer.train_views[(0, 0)]  # one real item: the views' targets and masks
        batch: Batch = {
            "views": views,
            "view_targets": item["view_targets"].to(device).expand(bs, -1),
            "masks": {k: m.to(device).expand(bs, *m.shape) for k, m in item["masks"].items()},
            "index": torch.randint(0, len(trainer.train_set), (bs,), device=device),
            "label": torch.zeros(bs, dtype=torch.long, device=device),
        }
        trainer.algo.on_train_start(trainer)
        trainer.model.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t_compile = time.perf_counter()
        for _ in range(warmup):
            out, _ = trainer.train_step(batch)
        float(out["loss"].detach())  # waits for the device
        t0 = time.perf_counter()
        for _ in range(steps):
            out, _ = trainer.train_step(batch)
        loss = float(out["loss"].detach())
        seconds = time.perf_counter() - t0
        peak = peak_memory_gib(device)  # allocated by torch on CUDA, resident (RSS) on the CPU
        return {
            "algo": type(algo).__name__,
            "backbone": getattr(algo.backbone, "arch", type(algo.backbone).__name__),
            "size": size,
            "batch": bs,
            "precision": trainer.precision,
            "compiled": bool(cfg.compile),
            "img_per_s": bs * steps / seconds,
            "step_ms": 1000 * seconds / steps,
            "warmup_s": t0 - t_compile,
            "peak_gib": peak,
            "loss": loss,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        }


def format_result(r: dict) -> str:
    mode = "compiled" if r["compiled"] else "eager"
    return (
        f"{r['algo']} {r['backbone']} {r['size']}px batch {r['batch']} {r['precision']} {mode} on {r['device']}: "
        f"{r['img_per_s']:,.0f} img/s ({r['step_ms']:.1f} ms/step), "
        f"peak {r['peak_gib']:.1f} GiB{' RSS' if r['device'] == 'cpu' else ''}, "
        f"warm-up {r['warmup_s']:.0f} s, loss {r['loss']:.4f}"
    )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(own)
    logging.basicConfig(level=logging.WARNING)
    print(format_result(benchmark(overrides, args.steps, args.warmup)), flush=True)


if __name__ == "__main__":
    main()
