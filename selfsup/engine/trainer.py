"""The training loop: plain PyTorch, torchrun-aware, one process or DDP.

The pieces live elsewhere and are reused by tools and benchmarks: building (``engine/build.py``),
checkpoints (``engine/checkpoint.py``), the seeded loader (``data/loader.py``), schedules
(``engine/schedules.py``), the kNN monitor (``eval/knn.py``). What is left here reads like the loop.

Work directory = the Hydra run dir: ``config.yaml`` (resolved), ``train.log``, ``metrics.jsonl``,
``tb/`` and the checkpoints ``last.pt`` / ``epoch_NNNN.pt`` side by side.
"""

from __future__ import annotations

import inspect
import logging
import os
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from selfsup import distributed
from selfsup.algorithms.base import Algorithm, Batch
from selfsup.config import Precision, TrainConfig, to_plain, typed
from selfsup.data.datasets import ImageDataset
from selfsup.data.loader import SeededViews, resolve_workers, train_loader
from selfsup.data.views import Normalize, view_sizes
from selfsup.engine.build import build_algorithm, build_dataset, view_pipelines
from selfsup.engine.checkpoint import CheckpointManager
from selfsup.engine.logger import MetricLogger, Progress
from selfsup.engine.optim import OptimizerName, build_optimizer, scaled_lr
from selfsup.engine.schedules import LRFactor, scheduled_value
from selfsup.engine.state import TrainState
from selfsup.errors import ConfigError, TrainingDiverged
from selfsup.eval.knn import KNNMonitor
from selfsup.models.sync_batchnorm import convert_sync_batchnorm

log = logging.getLogger("selfsup")


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; with ``deterministic`` also force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


@dataclass
class TrainResult:
    run_dir: Path
    epochs: int
    steps: int
    seconds: float
    last_checkpoint: Path | None
    final_loss: float | None
    knn_initial: dict[str, float] | None
    knn_final: dict[str, float] | None


class Trainer:
    def __init__(self, cfg: DictConfig | TrainConfig, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = c = typed(cfg)
        self.cfg_yaml = OmegaConf.to_yaml(to_plain(c))
        self.env = distributed.init(c.device, c.dist.backend, c.dist.timeout_s)
        self.device, self.is_main = self.env.device, self.env.is_main
        if not self.is_main:  # one copy of every message: rank 0 speaks, the others only warn
            logging.getLogger().setLevel(logging.WARNING)
        self.seed = c.seed
        seed_everything(self.seed, c.deterministic)

        # ---- data
        self.train_set = build_dataset(c.dataset, "train")
        if len(self.train_set) == 0:
            raise ConfigError("the training split is empty; lower dataset.val_fraction or add images")
        self.val_set: ImageDataset | None = None
        if c.knn.enabled and self.train_set.has_labels:
            val = build_dataset(c.dataset, "val")
            self.val_set = val if len(val) > 0 else None
        self.view_sizes = view_sizes(c.algo.views)  # the side of every view the algorithm receives
        self.train_views = SeededViews(self.train_set, view_pipelines(c))

        # ---- model
        self.algo: Algorithm = build_algorithm(c, len(self.train_set))
        if self.env.world_size > 1:  # same initial weights everywhere, different masks/dropout per rank
            seed_everything(self.seed + self.env.rank, c.deterministic)
        self.precision = self._resolve_precision(Precision(c.precision).value)
        if c.sync_bn and self.env.world_size > 1:  # torch's kernels on CUDA, all-gathered statistics on CPU (gloo)
            self.algo = convert_sync_batchnorm(self.algo, self.device)  # type: ignore[assignment]
        elif c.sync_bn:
            log.info("sync_bn=true has no effect in a single process (plain BatchNorm is used)")
        self.algo.to(self.device)
        is_conv = hasattr(self.algo.backbone, "layer4")
        channels_last = c.channels_last if c.channels_last is not None else is_conv
        if channels_last:
            self.algo.to(memory_format=torch.channels_last)
        self.normalize = Normalize(self.train_set.mean, self.train_set.std, self.device, channels_last)
        self.num_workers = resolve_workers(c.loader.num_workers, self.device)

        # ---- optimisation
        ws, bs, acc = self.env.world_size, c.schedule.batch_size, c.schedule.accumulate
        if bs < 1 or acc < 1:
            raise ConfigError("schedule.batch_size and schedule.accumulate must be >= 1")
        self.global_batch = bs * ws * acc
        opt = c.algo.optimizer
        self.base_lr = float(opt.lr)
        self.lr = scaled_lr(self.base_lr, self.global_batch, opt.base_batch_size, c.schedule.scale_lr)
        fused = c.fused_optimizer
        if fused is None:
            fused = self.device.type == "cuda" and OptimizerName(opt.name) is not OptimizerName.lars
        self.optimizer = build_optimizer(self.algo, opt, self.lr, fused=bool(fused))
        self.micro_per_epoch = (len(self.train_set) // ws) // bs
        steps_per_epoch = self.micro_per_epoch // acc
        if steps_per_epoch < 1:
            raise ConfigError(
                f"one optimizer step needs {self.global_batch} images (schedule.batch_size={bs} x {ws} process(es) "
                f"x accumulate {acc}) but the training split has {len(self.train_set)}; lower schedule.batch_size"
            )
        self.state = TrainState(epoch=0, step=0, steps_per_epoch=steps_per_epoch, epochs=c.schedule.epochs)
        s = c.schedule
        factor = LRFactor(
            s.policy,
            self.state.total_steps,
            int(round(s.warmup_epochs * steps_per_epoch)),
            s.warmup_start_factor,
            s.min_lr_ratio,
            [m * steps_per_epoch for m in s.milestones],
            s.gamma,
        )
        # a fixed_lr group (SimSiam's predictor) keeps its lr: its factor is always 1
        factors = [(lambda _: 1.0) if g.get("fixed_lr") else factor for g in self.optimizer.param_groups]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factors)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

        # ---- monitoring and checkpoints
        self.knn_monitor = KNNMonitor(
            c.knn, self.train_set, self.val_set, self.normalize, self.autocast, min(self.num_workers, 2)
        )
        self.knn_initial: dict[str, float] | None = None
        self.checkpoints = CheckpointManager(
            self.run_dir,
            c.checkpoint,
            {"model": self.algo, "optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler},
        )
        self.resumed_from: Path | None = None
        self._maybe_resume(c.resume)

        if c.compile:
            for module in self.algo.compile_targets():
                module.compile()
        self.model: nn.Module = self.algo
        if ws > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # memory banks and queues are kept identical by the algorithms' own collectives
            buffers: dict[str, Any] = (
                {"forward_sync_buffers": False}
                if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                else {"broadcast_buffers": False}
            )
            self.model = DistributedDataParallel(self.algo, device_ids=ids, **buffers)

    # ------------------------------------------------------------------ set-up helpers
    def _resolve_precision(self, precision: str) -> str:
        if precision == "auto":
            return "bf16" if self.device.type == "cuda" else "fp32"
        if precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("precision=fp16 needs a CUDA device; use precision=bf16 or fp32 on the CPU")
        return precision

    def autocast(self) -> AbstractContextManager:
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _maybe_resume(self, resume: str | None) -> None:
        if not resume:
            return
        if resume == "auto":
            path = self.checkpoints.last
            if path is None:
                log.info("resume=auto: no last.pt in %s, starting from scratch", self.run_dir)
                return
        else:
            path = Path(resume).expanduser()
        ckpt = self.checkpoints.restore(path)
        if ckpt.get("rng_restored") is False:
            seed_everything(self.seed + 1000 * int(ckpt["epoch"]) + self.env.rank, self.cfg.deterministic)
        self.state.epoch, self.state.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.knn_initial = ckpt.get("knn_initial")
        self.resumed_from = path
        log.info("resumed from %s (epoch %d, step %d)", path, self.state.epoch, self.state.step)

    # ------------------------------------------------------------------ services for the algorithm
    @property
    def epoch(self) -> int:
        return self.state.epoch

    @property
    def step(self) -> int:
        return self.state.step

    def extract_features(self, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """TrainContext service: ``fn`` over the whole training set in eval mode."""
        return self.knn_monitor.features(self.algo, fn, self.train_set)[0]

    def _extract(self, fn: Callable[[Tensor], Tensor], dataset: ImageDataset) -> tuple[Tensor, Tensor]:
        return self.knn_monitor.features(self.algo, fn, dataset)

    def knn(self) -> dict[str, float] | None:
        """Weighted kNN top-1/top-5 of backbone features: train split = bank, val split = queries."""
        return self.knn_monitor(self.algo)

    # ------------------------------------------------------------------ checkpoints
    def _save(self) -> Path:
        meta = {
            "algo": type(self.algo).__name__,
            "backbone": type(self.algo.backbone).__name__,
            "num_samples": len(self.train_set),
            "world_size": self.env.world_size,
            "global_batch": self.global_batch,
            "torch": str(torch.__version__),
        }
        extra = {"knn_initial": self.knn_initial, "config": self.cfg_yaml, "meta": meta}
        final = self.state.epoch == self.state.epochs
        return self.checkpoints.save(self.state.epoch, self.state.step, final, extra)

    # ------------------------------------------------------------------ training
    def _loader(self, epoch: int) -> DataLoader:
        c = self.cfg
        return train_loader(
            self.train_views,
            c.loader,
            c.schedule.batch_size,
            epoch,
            self.seed,
            self.env.rank,
            self.env.world_size,
            self.num_workers,
            self.device,
        )

    def _check_finite(self, loss: float) -> None:
        if not np.isfinite(loss):
            last = self.checkpoints.last
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"loss became {loss} at epoch {self.state.epoch + 1}, step {self.state.step}; {where}. "
                "Lower algo.optimizer.lr, add schedule.warmup_epochs or schedule.clip_grad, or use precision=fp32"
            )

    def to_device(self, batch: dict[str, Any]) -> Batch:
        """A loader batch (uint8 views) -> a normalised batch on the device (a hand-made batch without
        ``view_targets`` / ``masks`` gets -1 targets and no masks)."""
        views = batch["views"]
        targets = batch.get("view_targets")
        if targets is None:
            targets = torch.full((views[0].shape[0], len(views)), -1, dtype=torch.long)
        return {
            "views": [self.normalize(v) for v in views],
            "view_targets": targets.to(self.device, non_blocking=True),
            "masks": {k: m.to(self.device, non_blocking=True) for k, m in batch.get("masks", {}).items()},
            "index": batch["index"].to(self.device, non_blocking=True),
            "label": batch["label"].to(self.device, non_blocking=True),
        }

    def _apply_weight_decay_schedule(self) -> None:
        """Cosine weight decay from ``algo.optimizer.weight_decay`` to ``weight_decay_end`` (DINO)."""
        opt = self.cfg.algo.optimizer
        if opt.weight_decay_end is None or opt.weight_decay == 0:
            return
        ratio = scheduled_value(self.state.step, self.state.total_steps, 1.0, opt.weight_decay_end / opt.weight_decay)
        for group in self.optimizer.param_groups:
            group["weight_decay"] = group["base_weight_decay"] * ratio

    def train_step(self, inputs: Batch, last_micro: bool = True) -> tuple[dict[str, Tensor], dict | None]:
        """Forward + backward of one micro-batch; on the last micro-batch of an accumulation window
        also ``before_optimizer_step``, the optimizer step, the lr / weight-decay schedules and
        ``after_step``. Returns the algorithm's outputs and what ``after_step`` reported."""
        acc = self.cfg.schedule.accumulate
        ddp = isinstance(self.model, DistributedDataParallel)
        with nullcontext() if last_micro or not ddp else self.model.no_sync():  # type: ignore[operator]
            with self.autocast():
                out = self.model(inputs)
            self.scaler.scale(out["loss"] / acc).backward()
        if not last_micro:
            return out, None
        self.scaler.unscale_(self.optimizer)
        if self.cfg.schedule.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.algo.parameters(), float(self.cfg.schedule.clip_grad))
        self.algo.before_optimizer_step(self.state)
        self._apply_weight_decay_schedule()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.step += 1
        return out, self.algo.after_step(self.state)

    def _train_epoch(self, logger: MetricLogger, progress: Progress) -> float:
        acc, interval = self.cfg.schedule.accumulate, self.cfg.log.interval
        steps_per_epoch = self.state.steps_per_epoch
        self.model.train()
        self.algo.on_epoch_start(self)
        progress.start(self.state.epoch, self.state.epochs, steps_per_epoch)
        loss_sum = torch.zeros((), device=self.device)
        epoch_sum = torch.zeros((), device=self.device)
        extra_sums: dict[str, Tensor] = {}
        seen, window_micro, t_window = 0, 0, time.perf_counter()
        micro_limit = steps_per_epoch * acc
        for i, batch in enumerate(self._loader(self.state.epoch)):
            if i >= micro_limit:
                break
            inputs = self.to_device(batch)
            last_micro = (i + 1) % acc == 0
            out, extra = self.train_step(inputs, last_micro)
            loss_sum += out["loss"].detach().float()
            for k, v in out.items():
                if k != "loss":
                    extra_sums[k] = extra_sums.get(k, torch.zeros((), device=self.device)) + v.detach().float()
            seen += inputs["views"][0].shape[0] * self.env.world_size
            window_micro += 1
            if not last_micro:
                continue
            step_in_epoch = (i + 1) // acc
            if self.state.step % interval == 0 or step_in_epoch == steps_per_epoch:
                mean_loss = float(distributed.all_reduce_(loss_sum.clone(), "mean")) / window_micro
                self._check_finite(mean_loss)
                elapsed = time.perf_counter() - t_window
                scalars = {
                    "loss": mean_loss,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "img_per_s": seen / max(elapsed, 1e-9),
                }
                scalars.update({k: float(v) / window_micro for k, v in extra_sums.items()})
                if extra:
                    scalars.update(extra)
                logger.write("train", self.state.step, self.state.epoch + step_in_epoch / steps_per_epoch, **scalars)
                progress.update(step_in_epoch, scalars)
                epoch_sum += loss_sum
                loss_sum.zero_()
                extra_sums = {}
                seen, window_micro, t_window = 0, 0, time.perf_counter()
            else:
                progress.update(step_in_epoch)
        progress.close()
        epoch_sum += loss_sum
        epoch_loss = float(distributed.all_reduce_(epoch_sum, "mean")) / micro_limit
        self._check_finite(epoch_loss)
        return epoch_loss

    def fit(self) -> TrainResult:
        t0 = time.perf_counter()
        c = self.cfg
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(self.cfg_yaml)
        logger = MetricLogger(self.run_dir, self.is_main, c.log.tensorboard)
        progress = Progress(self.is_main, c.log.progress, c.log.interval)
        self._log_start(logger)
        final_loss: float | None = None
        knn_final: dict[str, float] | None = None
        try:
            if self.resumed_from is None:
                self.knn_initial = self.knn()
                if self.knn_initial:
                    log.info("kNN before training (random init): %s", _fmt(self.knn_initial))
                    logger.write("knn", self.state.step, self.state.epoch, **self.knn_initial)
            self.algo.on_train_start(self)
            while self.state.epoch < self.state.epochs:
                final_loss = self._train_epoch(logger, progress)
                self.state.epoch += 1
                log.info("epoch %d/%d done: loss %.4f", self.state.epoch, self.state.epochs, final_loss)
                interval = c.knn.interval
                if interval and self.state.epoch % interval == 0 and self.state.epoch < self.state.epochs:
                    knn = self.knn()
                    if knn:
                        log.info("kNN after epoch %d: %s", self.state.epoch, _fmt(knn))
                        logger.write("knn", self.state.step, self.state.epoch, **knn)
                self._save()
            knn_final = self.knn()
            if knn_final:
                logger.write("knn", self.state.step, self.state.epoch, **knn_final)
        finally:
            progress.close()
            logger.close()
        result = TrainResult(
            self.run_dir,
            self.state.epoch,
            self.state.step,
            time.perf_counter() - t0,
            self.checkpoints.last,
            final_loss,
            self.knn_initial,
            knn_final,
        )
        if self.is_main:
            self._summary(result)
        return result

    def _log_start(self, logger: MetricLogger) -> None:
        c = self.cfg
        log.info(
            "%s | %s | %d training images | %d process(es) on %s | %s | global batch %d "
            "(%d per process x %d x accumulate %d)",
            type(self.algo).__name__,
            type(self.algo.backbone).__name__,
            len(self.train_set),
            self.env.world_size,
            self.device,
            self.precision,
            self.global_batch,
            c.schedule.batch_size,
            self.env.world_size,
            c.schedule.accumulate,
        )
        log.info(
            "lr: base %.4g for batch %d -> effective %.4g for batch %d (linear scaling %s)",
            self.base_lr,
            c.algo.optimizer.base_batch_size,
            self.lr,
            self.global_batch,
            "on" if c.schedule.scale_lr else "off",
        )
        logger.write(
            "config",
            self.state.step,
            self.state.epoch,
            base_lr=self.base_lr,
            lr=self.lr,
            global_batch=self.global_batch,
        )

    def _summary(self, r: TrainResult) -> None:
        epochs = sorted(p.name for p in self.run_dir.glob("epoch_*.pt"))
        lines = [
            f"finished {type(self.algo).__name__} ({type(self.algo.backbone).__name__}) in {r.seconds:.1f} s: "
            f"{r.epochs} epochs, {r.steps} steps",
            f"  run dir:     {self.run_dir}",
            f"  checkpoints: {r.last_checkpoint}" + (f" (+ {', '.join(epochs[-3:])})" if epochs else ""),
            f"  logs:        {self.run_dir / 'train.log'}, {self.run_dir / 'metrics.jsonl'}, {self.run_dir / 'tb'}",
        ]
        if r.knn_final is not None:
            k = self.cfg.knn
            before = f"{r.knn_initial['top1']:.4f}" if r.knn_initial else "n/a"
            lines.append(
                f"  kNN top-1 (k={k.k}, T={k.temperature}, {len(self.val_set or [])} held-out images): "
                f"random init {before} -> trained {r.knn_final['top1']:.4f}"
            )
        for line in lines:
            log.info(line)


def _fmt(result: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in result.items())
