"""Throughput of the data path: the view pipeline alone, each ``dataset.cache`` mode, and training end to end.

Builds the run exactly as ``python -m selfsup.train`` would (same Hydra overrides), then prints::

    views   per_sample  cpu    ...  img/s   (torchvision per image, seeding included: the reference)
    views   batched     cpu    ...  img/s   (x faster than per_sample)
    views   batched     cuda   ...  img/s   (when a GPU is there)
    loader  cache=none|memory|device ... img/s   (loader + views on the device, no model)
    train   data        ...  img/s = x% of the synthetic step rate (Trainer.train_step on batches already there)

An image is one source image with all its views. Run it on a quiet machine; the figures of one run are
comparable with each other (they share the machine's load)::

    python -m selfsup.tools.benchmark_data                       # the default run: SimCLR views of digits
    python -m selfsup.tools.benchmark_data --batches 20 -- dataset=imagefolder dataset.root=/data/cifar10/train \\
        schedule.batch_size=512 device=cuda

Options before ``--`` are the benchmark's; everything after it are Hydra overrides.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import default_collate

from selfsup.config import compose


def _rate(fn: Callable[[], Any], images: int, repeats: int, sync: Callable[[], None]) -> float:
    """Images per second of ``fn`` (one warm-up call, then ``repeats`` timed calls)."""
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return images * repeats / (time.perf_counter() - t0)


def _kornia_pipeline(spec: Any) -> Any:
    """kornia.augmentation's counterpart of one view declaration (per-sample parameters, float [0, 1] input)."""
    import kornia.augmentation as K

    ops: list[Any] = [
        K.RandomResizedCrop((spec.size, spec.size), scale=tuple(spec.crop_scale), ratio=tuple(spec.crop_ratio))
    ]
    if spec.rotation or spec.translate:
        ops.append(
            K.RandomAffine(
                degrees=spec.rotation, translate=(spec.translate, spec.translate) if spec.translate else None
            )
        )
    if spec.hflip > 0:
        ops.append(K.RandomHorizontalFlip(p=spec.hflip))
    if spec.color_jitter > 0:
        ops.append(K.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue, p=spec.color_jitter))
    if spec.grayscale > 0:
        ops.append(K.RandomGrayscale(p=spec.grayscale))
    if spec.blur > 0:
        from selfsup.data.batched import blur_kernel_size

        k = blur_kernel_size(spec)
        ops.append(K.RandomGaussianBlur((k, k), tuple(spec.blur_sigma), p=spec.blur))
    if spec.solarize > 0:
        ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=spec.solarize))
    return K.AugmentationSequential(*ops)


def compare_libraries(specs: list[Any], images: torch.Tensor, repeats: int) -> list[dict[str, Any]]:
    """The same views made by kornia (per-sample parameters; if installed) and by torchvision v2 called on the
    whole batch (ONE set of parameters for all images: wrong for SSL, shown for its speed only), on the CPU."""
    from selfsup.data.views import build_view_transform, expand_views

    rows = []
    runs = expand_views(specs)
    n = len(images)
    tv = [build_view_transform(spec) for spec in runs]
    rate = _rate(lambda: [t(images) for t in tv], n, repeats, lambda: None)
    rows.append({"what": "views", "mode": "torchvision_on_batch", "device": "cpu", "img_per_s": rate})
    try:
        kornia_runs = [_kornia_pipeline(spec) for spec in runs]
    except ImportError:
        return rows
    rate = _rate(lambda: [k(images.float() / 255) for k in kornia_runs], n, repeats, lambda: None)
    rows.append({"what": "views", "mode": "kornia", "device": "cpu", "img_per_s": rate})
    return rows


SECTIONS = ("views", "loader", "train")


def benchmark(
    overrides: list[str], batches: int = 10, repeats: int = 5, compare: bool = False, what: tuple[str, ...] = SECTIONS
) -> list[dict[str, Any]]:
    """One row per measurement of each section in ``what``: {"what", "mode", "device", "img_per_s", ...}."""
    from selfsup.engine.trainer import Trainer

    unknown = set(what) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    base = ["knn.enabled=false", "log.tensorboard=false", *overrides]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(compose(base), run_dir)
        device, bs = trainer.device, int(trainer.cfg.schedule.batch_size)
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        steps = min(batches, len(trainer.train_set) // bs)
        if "views" in what:
            rows += _views(trainer, repeats, compare, sync)
        if "loader" in what:
            rows += _loaders(trainer, base, batches, steps, sync)
        if "train" in what:
            rows.append(_train(trainer, overrides, batches, steps, sync))
    return rows


def _views(trainer: Any, repeats: int, compare: bool, sync: Callable[[], None]) -> list[dict[str, Any]]:
    """The view pipeline alone on one batch: per-sample (torchvision per image, seeding included; the reference)
    and batched, on the CPU and on the run's GPU."""
    from selfsup.data.batched import BatchedViews
    from selfsup.data.datasets import resident_images
    from selfsup.data.loader import SeededViews
    from selfsup.engine.build import view_pipelines

    n = min(len(trainer.train_set), int(trainer.cfg.schedule.batch_size))
    if trainer.resident is not None:  # the run's own cache (memory or device): decoded once already
        batch = trainer.resident[0][:n].cpu()
    else:
        batch = resident_images(trainer.train_set, trainer.num_workers, limit=n)[0]
    seeds = torch.arange(n, dtype=torch.long) * 1_000_003 + 7
    rows: list[dict[str, Any]] = []
    per_sample = SeededViews(trainer.train_set, view_pipelines(trainer.cfg))
    keys = [(i, int(seeds[i])) for i in range(n)]
    rate = _rate(lambda: default_collate([per_sample[k] for k in keys]), n, max(1, repeats // 2), lambda: None)
    rows.append({"what": "views", "mode": "per_sample", "device": "cpu", "img_per_s": rate})
    executor = BatchedViews(trainer.cfg.algo.views)
    rate = _rate(lambda: executor(batch, seeds), n, repeats, lambda: None)
    rows.append({"what": "views", "mode": "batched", "device": "cpu", "img_per_s": rate})
    if compare:
        rows += compare_libraries(list(trainer.cfg.algo.views), batch, repeats)
    if trainer.device.type == "cuda":
        on_gpu, gpu_seeds = batch.to(trainer.device), seeds.to(trainer.device)
        rate = _rate(lambda: executor(on_gpu, gpu_seeds), n, repeats * 4, sync)
        rows.append({"what": "views", "mode": "batched", "device": trainer.device.type, "img_per_s": rate})
    return rows


def _loaders(trainer: Any, base: list[str], batches: int, steps: int, sync: Callable[[], None]) -> list[dict[str, Any]]:
    """The loader of each cache mode (+ the executor on the device), no model."""
    from selfsup.engine.trainer import Trainer

    def drain(t: Trainer) -> Callable[[], None]:
        def run() -> None:
            for i, b in enumerate(t.loader(0)):
                if i >= batches:
                    break
                t.to_device(b)

        return run

    rows: list[dict[str, Any]] = []
    device, bs = trainer.device, int(trainer.cfg.schedule.batch_size)
    modes = ["none", "memory"] + (["device"] if device.type == "cuda" else [])
    for mode in modes:
        with tempfile.TemporaryDirectory() as other:  # the run's own mode: its trainer (and its cache)
            # resident images are decoded once on the CPU: data.decode=device is for cache=none
            decode = [] if mode == "none" else ["data.decode=cpu"]
            t = (
                trainer
                if mode == trainer.cache.value
                else Trainer(compose([*base, f"dataset.cache={mode}", *decode]), other)
            )
            rate = _rate(drain(t), steps * bs, 1, sync)
            rows.append({"what": "loader", "mode": f"cache={mode}", "device": device.type, "img_per_s": rate})
    return rows


def _train(trainer: Any, overrides: list[str], batches: int, steps: int, sync: Callable[[], None]) -> dict[str, Any]:
    """Training on real data (the run's own cache and executor) against batches already on the device."""
    from selfsup.tools.benchmark_step import benchmark as step_benchmark

    synthetic = step_benchmark(overrides, steps=max(3, batches), warmup=2)["img_per_s"]

    def train() -> None:
        for i, b in enumerate(trainer.loader(0)):
            if i >= batches:
                break
            trainer.train_step(trainer.to_device(b))

    trainer.model.train()
    rate = _rate(train, steps * int(trainer.cfg.schedule.batch_size), 1, sync)
    return {
        "what": "train",
        "mode": f"data.executor={trainer.executor.value} dataset.cache={trainer.cache.value}",
        "device": trainer.device.type,
        "img_per_s": rate,
        "synthetic_img_per_s": synthetic,
    }


def format_rows(rows: list[dict[str, Any]]) -> str:
    ref = next((r["img_per_s"] for r in rows if r["mode"] == "per_sample"), None)
    lines = []
    for r in rows:
        line = f"{r['what']:<7} {r['mode']:<24} {r['device']:<5} {r['img_per_s']:>10,.0f} img/s"
        if r["what"] == "views" and ref and r["mode"] != "per_sample":
            line += f"  ({r['img_per_s'] / ref:.1f}x per_sample; {1000 / r['img_per_s']:.3f} ms/img)"
        elif r["what"] == "views":
            line += f"  ({1000 / r['img_per_s']:.3f} ms/img)"
        if "synthetic_img_per_s" in r:
            s = r["synthetic_img_per_s"]
            line += f"  = {100 * r['img_per_s'] / s:.0f}% of the synthetic step rate ({s:,.0f} img/s)"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10, help="batches per loader / training measurement")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of the view pipeline alone")
    parser.add_argument(
        "--compare", action="store_true", help="also time kornia (if installed) and torchvision v2 on whole batches"
    )
    parser.add_argument("--what", default=",".join(SECTIONS), help="comma-separated sections (default: all)")
    args = parser.parse_args(own)
    logging.basicConfig(level=logging.WARNING)
    what = tuple(w.strip() for w in args.what.split(",") if w.strip())
    if not set(what) <= set(SECTIONS):
        parser.error(f"--what {args.what}: choose sections from {', '.join(SECTIONS)}")
    print(format_rows(benchmark(overrides, args.batches, args.repeats, args.compare, what)), flush=True)


if __name__ == "__main__":
    main()
