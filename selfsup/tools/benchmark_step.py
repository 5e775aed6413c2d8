"""Training-step throughput of an algorithm on synthetic, already-normalised data on the device.

Builds the run exactly as ``python -m selfsup.train`` would (same Hydra overrides, same trainer:
precision, channels_last, torch.compile, fused optimizers, LR schedule), then times
``Trainer.train_step`` on random batches that already sit on the device, so the figure is the
model + optimizer step alone, without the data pipeline. Prints one line per run::

    python -m selfsup.tools.benchmark_step --steps 30 -- algo=simclr backbone=resnet50 \\
        dataset=fake dataset.image_size=224 schedule.batch_size=256 compile=true

Options before ``--`` are the benchmark's; everything after it are Hydra overrides. ``--lars`` times the LARS
optimizer step alone on the run's model, the multi-tensor (foreach) step against the per-parameter loop.
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
from selfsup.config import compose, typed


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
        real = trainer.to_device(next(iter(trainer.loader(0))))  # one real batch: the views' targets and masks
        batch: Batch = {**real, "views": views}
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


def lars_step_ms(overrides: list[str], steps: int = 20) -> dict[str, float]:
    """Milliseconds per LARS step on the run's model (random gradients): foreach vs the per-parameter loop."""
    from selfsup.engine.build import build_algorithm
    from selfsup.engine.lars import LARS
    from selfsup.engine.optim import param_groups

    cfg = typed(compose(["knn.enabled=false", *overrides]))
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    out: dict[str, float] = {}
    for foreach in (False, True):
        algo = build_algorithm(cfg, 1024).to(device)
        groups = param_groups(algo, cfg.algo.optimizer, 0.1)
        opt = LARS(groups, lr=0.1, momentum=0.9, weight_decay=1e-6, foreach=foreach)
        for p in algo.parameters():
            p.grad = torch.randn_like(p) if p.requires_grad else None
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        for _ in range(3):
            opt.step()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.step()
        sync()
        out["foreach" if foreach else "loop"] = 1000 * (time.perf_counter() - t0) / steps
    out["params"] = float(sum(1 for p in algo.parameters() if p.requires_grad))
    return out


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
    parser.add_argument("--lars", action="store_true", help="time the LARS step alone: foreach vs loop")
    args = parser.parse_args(own)
    logging.basicConfig(level=logging.WARNING)
    if args.lars:
        r = lars_step_ms(overrides, args.steps)
        print(
            f"LARS step over {r['params']:.0f} parameter tensors: foreach {r['foreach']:.2f} ms, "
            f"loop {r['loop']:.2f} ms ({r['loop'] / r['foreach']:.1f}x)",
            flush=True,
        )
        return
    print(format_result(benchmark(overrides, args.steps, args.warmup)), flush=True)


if __name__ == "__main__":
    main()
