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
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from selfsup import distributed
from selfsup.algorithms.base import Algorithm, Batch
from selfsup.config import Precision, TrainConfig, to_plain, typed
from selfsup.data.batched import BatchedViews
from selfsup.data.datasets import Cache, ImageDataset, ImageFolder, resident_images
from selfsup.data.loader import (
    Decode,
    Executor,
    ResidentLoader,
    SeededCrops,
    SeededFiles,
    SeededViews,
    collate_files,
    decode_files,
    epoch_sampler,
    resolve_cache,
    resolve_workers,
    train_loader,
)
from selfsup.data.views import Normalize, view_sizes
from selfsup.engine import checkpoint as ckpt_io
from selfsup.engine import resume as resume_rule
from selfsup.engine import run_dir as run_dirs
from selfsup.engine.build import build_algorithm, build_dataset, view_pipelines
from selfsup.engine.checkpoint import CheckpointManager
from selfsup.engine.logger import MetricLogger, Progress
from selfsup.engine.optim import OptimizerName, build_optimizer, scaled_lr
from selfsup.engine.schedules import LRFactor, scheduled_value
from selfsup.engine.state import TrainState
from selfsup.errors import CheckpointError, ConfigError, TrainingDiverged, TrainingInterrupted, TrainingPreempted
from selfsup.eval.knn import KNNMonitor
from selfsup.models.sync_batchnorm import convert_sync_batchnorm

log = logging.getLogger("selfsup")

# torch.compile's modes (compile=true): reduce-overhead adds CUDA graphs, max-autotune searches kernels
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# what SLURM sends before a time limit or a preemption (USR1 / USR2 with --signal, TERM), and kill's default:
# the run stops at the next step boundary with a checkpoint of that step
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGUSR1", "SIGUSR2", "SIGTERM") if hasattr(signal, name))


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
        self.env = distributed.init(c.device, c.dist.backend, c.dist.timeout_s, c.dist.addr, c.dist.port)
        self.device, self.is_main = self.env.device, self.env.is_main
        if not self.is_main:  # one copy of every message: rank 0 speaks, the others only warn
            logging.getLogger().setLevel(logging.WARNING)
        run_dirs.prepare(self.run_dir, c.resume, c.overwrite)  # never write over another run by accident
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
        if c.knn.enabled and self.val_set is None:
            why = "the images have no class folders" if not self.train_set.has_labels else "there is no held-out split"
            log.info(
                "kNN monitor off: %s; for labelled class folders set dataset.val_fraction=0.1 or "
                "dataset.val_root=<folder> (knn.enabled=false silences this)",
                why,
            )
        self.view_sizes = view_sizes(c.algo.views)  # the side of every view the algorithm receives
        self.executor = Executor(c.data.executor)
        cache = Cache(getattr(c.dataset, "cache", Cache.auto))
        self.cache = resolve_cache(cache, self.train_set, self.device, self.executor)
        self.batched = BatchedViews(c.algo.views) if self.executor is Executor.batched else None
        self.resident: tuple[Tensor, Tensor] | None = None
        self.train_views: Dataset | None = None
        if self.batched is None:
            self.train_views = SeededViews(self.train_set, view_pipelines(c))
        elif Decode(c.data.decode) is Decode.device:
            if self.cache is not Cache.none or not isinstance(self.train_set, ImageFolder):
                raise ConfigError(
                    "data.decode=device decodes the JPEGs of an image folder read through workers; it needs "
                    f"dataset=imagefolder with dataset.cache=none (got {type(self.train_set).__name__}, cache "
                    f"{self.cache.value}); drop data.decode=device or set dataset.cache=none"
                )
            self.train_views = SeededFiles(self.train_set)
        elif self.cache is Cache.none:
            self.train_views = SeededCrops(self.train_set, self.batched)

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
        if self.cache in (Cache.memory, Cache.device):  # decoded once; on the device for cache=device
            images, labels = resident_images(self.train_set, self.num_workers)
            where = self.device if self.cache is Cache.device else torch.device("cpu")
            self.resident = images.to(where), labels.to(where)

        # ---- optimisation
        ws, bs, acc = self.env.world_size, c.schedule.batch_size, c.schedule.accumulate  # >= 1: ScheduleConfig
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
            save_only=("scheduler",),
        )
        self.resumed_from: Path | None = None
        self._interrupted = False  # set by Ctrl-C or a stop signal: stop at the next step boundary
        self._stop_signal: int | None = None  # the stop signal (USR1/USR2/TERM), None for Ctrl-C
        self._stop_after_epoch = False  # a stop asked at an epoch's last step: after its checkpoint
        self._fit_start_time, self._fit_start_step = time.perf_counter(), 0
        self._aug_time = 0.0  # seconds the batched executor spent making views (since the last log line)
        self.aug_seconds = 0.0  # ... in this fit (the run summary reports it)
        self._maybe_resume(c.resume)

        if c.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"compile_mode={c.compile_mode!r} must be one of {', '.join(COMPILE_MODES)}")
        if c.compile:
            for module in self.algo.compile_targets():
                module.compile(mode=None if c.compile_mode == "default" else c.compile_mode)
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
        ckpt = ckpt_io.load(path)
        if "optimizer" not in ckpt:  # published (selfsup.tools.publish) or otherwise weights only
            raise CheckpointError(
                f"{path} holds weights only (no optimizer state: a published checkpoint?), so training cannot "
                "continue from it exactly; resume from the run's own last.pt, or load its weights with "
                "selfsup.engine.pretrained.load_pretrained"
            )
        self._check_resume_config(path, ckpt)
        # the optimiser's state (momentum buffers, moments) comes from the checkpoint, its
        # hyper-parameters (lr, weight decay, ...) from this run's config
        fresh = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.checkpoints.restore(path, ckpt)
        for group, values in zip(self.optimizer.param_groups, fresh):
            group.update(values)
        if ckpt.get("rng_restored") is False:
            seed_everything(self.seed + 1000 * int(ckpt["epoch"]) + self.env.rank, self.cfg.deterministic)
        self.state.epoch, self.state.step = int(ckpt["epoch"]), int(ckpt["step"])
        self._set_schedule_step(self.state.step)
        self.knn_initial = ckpt.get("knn_initial")
        self.resumed_from = path
        log.info(
            "resumed from %s (epoch %d, step %d of %d): lr now %.4g",
            path,
            self.state.epoch,
            self.state.step,
            self.state.total_steps,
            self.optimizer.param_groups[0]["lr"],
        )

    def _check_resume_config(self, path: Path, ckpt: dict[str, Any]) -> None:
        """The resume rule (``engine/resume.py``): refuse changed settings unless resume_force."""
        if not ckpt.get("config"):
            return
        diff = resume_rule.changes(yaml.safe_load(ckpt["config"]), to_plain(self.cfg))
        replanned, warned, refused = resume_rule.classify(diff)
        if refused and not self.cfg.resume_force:
            raise ConfigError(
                f"{path} was trained with other settings ({resume_rule.describe(refused)}); resume with the "
                "settings it was trained with, or pass resume_force=true to continue with the new ones"
            )
        if refused:
            log.warning("resume_force=true: continuing with changed settings: %s", resume_rule.describe(refused))
        if warned:
            log.warning("resuming with moved data: %s", resume_rule.describe(warned))
        if replanned:
            log.info(
                "schedule re-planned for %d epochs (%s): the remaining steps follow the new schedule",
                self.state.epochs,
                resume_rule.describe(replanned),
            )

    def _set_schedule_step(self, step: int) -> None:
        """Put the lr schedule at optimizer step ``step`` (the lr of each group = its base lr x factor)."""
        self.scheduler.last_epoch = step
        lrs = [base * factor(step) for base, factor in zip(self.scheduler.base_lrs, self.scheduler.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs

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
        try:
            return self.knn_monitor.features(self.algo, fn, dataset)
        finally:
            self._report_unreadable()

    def knn(self) -> dict[str, float] | None:
        """Weighted kNN top-1/top-5 of backbone features: train split = bank, val split = queries."""
        try:
            return self.knn_monitor(self.algo)
        finally:
            self._report_unreadable()

    def _report_unreadable(self) -> None:
        """One warning per image file that could not be decoded, the first time any pass met it (image
        folders flag them in shared memory, also from DataLoader workers)."""
        for ds in (self.train_set, self.val_set):
            for path in getattr(ds, "new_unreadable", lambda: [])():
                log.warning("skipped unreadable image %s (the next readable image is used in its place)", path)

    def unreadable_count(self) -> int:
        return sum(getattr(ds, "unreadable_count", lambda: 0)() for ds in (self.train_set, self.val_set))

    # ------------------------------------------------------------------ checkpoints
    def _save(self, epoch_end: bool = True) -> Path:
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
        return self.checkpoints.save(self.state.epoch, self.state.step, final, extra, epoch_end=epoch_end)

    # ------------------------------------------------------------------ training
    def loader(self, epoch: int, skip_batches: int = 0, order: Tensor | None = None) -> Iterable[dict[str, Any]]:
        c = self.cfg
        if self.resident is not None:
            ws, rank = self.env.world_size, self.env.rank
            bs = c.schedule.batch_size
            sampler = epoch_sampler(len(self.train_set), bs, epoch, self.seed, rank, ws, skip_batches, order)
            return ResidentLoader(*self.resident, sampler, bs)
        assert self.train_views is not None
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
            skip_batches,
            order,
            collate_files if isinstance(self.train_views, SeededFiles) else None,
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
        """A loader batch -> a normalised batch on the device. The batch holds uint8 views (per-sample
        executor), or source images / worker-cut crops and their seeds, which the batched executor turns into
        views here (timed: ``aug_s``). A hand-made batch without ``view_targets`` / ``masks`` gets -1 targets
        and no masks."""
        if "seeds" in batch:
            t0 = time.perf_counter()
            assert self.batched is not None
            seeds = batch["seeds"].to(self.device, non_blocking=True)
            with torch.no_grad():
                if "data" in batch:  # data.decode=device: JPEG bytes -> images -> crops, all on the device
                    files = list(batch["data"].split(batch["lengths"].tolist()))
                    images = decode_files(files, self.device, lambda i: self._path(batch["index"][i]))
                    crops = self.batched.crops_of(images, batch["seeds"].tolist())
                    made = self.batched(None, seeds, cropped=crops)
                elif "crops" in batch:
                    crops = [c.to(self.device, non_blocking=True) for c in batch["crops"]]
                    made = self.batched(None, seeds, cropped=crops)
                else:
                    made = self.batched(batch["images"].to(self.device, non_blocking=True), seeds)
            batch = {**batch, "views": made[0], "view_targets": made[1], "masks": made[2]}
            self._aug_time += time.perf_counter() - t0
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

    def _path(self, index: Tensor) -> str:
        """The file of training image ``index`` (an image folder's)."""
        return str(self.train_set.samples[int(index)][0])  # type: ignore[attr-defined]

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

    def _stop_requested(self, at_log_step: bool) -> bool:
        """Whether a Ctrl-C or a stop signal asked to stop. One process: after any step. Several: the ranks
        agree (one all-reduce, which waits for the device) only at log steps, where the loss is all-reduced
        anyway, so that no step of the hot path pays a host synchronisation; a rank that got no signal
        itself stops as preempted when another rank got one."""
        if self.env.world_size == 1:
            return self._interrupted
        if not at_log_step:
            return False
        flags = torch.tensor([float(self._interrupted), float(self._stop_signal is not None)], device=self.device)
        interrupted, signalled = distributed.all_reduce_(flags).tolist()
        if signalled > 0 and self._stop_signal is None:
            self._stop_signal = signal.SIGTERM
        return interrupted > 0

    def _train_epoch(self, logger: MetricLogger, progress: Progress) -> float | None:
        """One epoch (or its rest, after a resume in the middle of it); returns its mean loss (None when
        nothing of it was left)."""
        acc, interval = self.cfg.schedule.accumulate, self.cfg.log.interval
        steps_per_epoch = self.state.steps_per_epoch
        done = self.state.step - self.state.epoch * steps_per_epoch  # steps of this epoch already taken
        self.model.train()
        self.algo.on_epoch_start(self)
        order = self.algo.epoch_indices(self.state.epoch, self.seed)
        progress.start(self.state.epoch, self.state.epochs, steps_per_epoch, done)
        loss_sum = torch.zeros((), device=self.device)
        epoch_sum = torch.zeros((), device=self.device)
        extra_sums: dict[str, Tensor] = {}
        seen, window_micro, processed = 0, 0, 0
        t_window = t_epoch = t_ready = time.perf_counter()
        data_time = 0.0
        micro_limit = (steps_per_epoch - done) * acc
        for i, batch in enumerate(self.loader(self.state.epoch, done * acc, order)):
            if i >= micro_limit:
                break
            data_time += time.perf_counter() - t_ready  # waiting for the loader
            inputs = self.to_device(batch)
            last_micro = (i + 1) % acc == 0
            out, extra = self.train_step(inputs, last_micro)
            loss_sum += out["loss"].detach().float()
            for k, v in out.items():
                if k != "loss":
                    extra_sums[k] = extra_sums.get(k, torch.zeros((), device=self.device)) + v.detach().float()
            seen += inputs["views"][0].shape[0] * self.env.world_size
            window_micro += 1
            processed += 1
            t_ready = time.perf_counter()
            if not last_micro:
                continue
            step_in_epoch = done + (i + 1) // acc
            at_log_step = self.state.step % interval == 0 or step_in_epoch == steps_per_epoch
            stop = self._stop_requested(at_log_step)
            if at_log_step or stop:
                mean_loss = float(distributed.all_reduce_(loss_sum.clone(), "mean")) / window_micro
                self._check_finite(mean_loss)
                now = time.perf_counter()
                elapsed = now - t_window
                scalars = {
                    "loss": mean_loss,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "img_per_s": seen / max(elapsed, 1e-9),
                    "data_s": data_time,  # of this window: waiting for batches ...
                    "aug_s": self._aug_time,  # ... making views on the device (batched executor) ...
                    "compute_s": max(0.0, elapsed - data_time - self._aug_time),  # ... and everything else
                    "peak_mem_gib": peak_memory_gib(self.device),
                    "eta_s": self._eta(now),
                }
                scalars.update({k: float(v) / window_micro for k, v in extra_sums.items()})
                if extra:
                    scalars.update(extra)
                logger.write("train", self.state.step, self.state.epoch + step_in_epoch / steps_per_epoch, **scalars)
                progress.update(step_in_epoch, scalars)
                epoch_sum += loss_sum
                loss_sum.zero_()
                extra_sums = {}
                seen, window_micro, data_time = 0, 0, 0.0
                self.aug_seconds += self._aug_time
                self._aug_time = 0.0
                t_window = t_ready = time.perf_counter()
            else:
                progress.update(step_in_epoch)
            if stop and step_in_epoch < steps_per_epoch:
                raise _Stop
            self._stop_after_epoch = stop  # at the epoch's last step: end the epoch first (its checkpoint)
        progress.close()
        if processed == 0:  # resumed from a checkpoint of this epoch's last step: nothing left in it
            return None
        epoch_sum += loss_sum
        epoch_loss = float(distributed.all_reduce_(epoch_sum, "mean")) / max(1, processed)
        self._check_finite(epoch_loss)
        seconds = time.perf_counter() - t_epoch
        logger.write(
            "epoch",
            self.state.step,
            self.state.epoch + 1,
            loss=epoch_loss,
            seconds=seconds,
            img_per_s=processed * self.cfg.schedule.batch_size * self.env.world_size / max(seconds, 1e-9),
            peak_mem_gib=peak_memory_gib(self.device),
        )
        return epoch_loss

    def _eta(self, now: float) -> float:
        """Seconds until the last step, from this run's average step time so far."""
        steps = self.state.step - self._fit_start_step
        left = self.state.total_steps - self.state.step
        return (now - self._fit_start_time) / max(1, steps) * left

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._interrupted and self._stop_signal is None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._interrupted = True
        if self.is_main:
            log.warning("Ctrl-C: stopping after this step and writing a checkpoint (press Ctrl-C again to abort)")

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is None and self.is_main:
            log.warning(
                "%s: stopping after this step and writing a checkpoint of it (preemption or time limit)",
                signal.Signals(signum).name,
            )
        self._interrupted = True
        self._stop_signal = self._stop_signal or signum

    def fit(self) -> TrainResult:
        t0 = time.perf_counter()
        c = self.cfg
        if self.resumed_from is not None and self.state.epoch >= self.state.epochs:
            return self._nothing_left(t0)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(self.cfg_yaml)
            if self.resumed_from is not None:  # records past the checkpoint's step are logged again
                dropped = run_dirs.truncate_metrics(self.run_dir, self.state.step)
                if dropped:
                    log.info("metrics.jsonl: dropped %d record(s) logged after step %d", dropped, self.state.step)
        purge = self.state.step + 1 if self.resumed_from is not None else None
        logger = MetricLogger(self.run_dir, self.is_main, c.log.tensorboard, purge_step=purge)
        progress = Progress(self.is_main, c.log.progress, c.log.interval)
        self._log_start(logger)
        final_loss: float | None = None
        knn_final: dict[str, float] | None = None
        self._interrupted, self._stop_signal, self._stop_after_epoch = False, None, False
        self._fit_start_time, self._fit_start_step = time.perf_counter(), self.state.step
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
            for sig in STOP_SIGNALS:  # replaces submitit's requeue handler while training (train.py calls it after)
                previous[sig] = signal.signal(sig, self._on_stop_signal)
        try:
            if self.resumed_from is None:
                self.knn_initial = self.knn()
                if self.knn_initial:
                    log.info("kNN before training (random init): %s", _fmt(self.knn_initial))
                    logger.write("knn", self.state.step, self.state.epoch, **self.knn_initial)
            self.algo.on_train_start(self)
            while self.state.epoch < self.state.epochs:
                epoch_loss = self._train_epoch(logger, progress)
                final_loss = epoch_loss if epoch_loss is not None else final_loss
                self._report_unreadable()
                self.state.epoch += 1
                if epoch_loss is not None:
                    log.info("epoch %d/%d done: loss %.4f", self.state.epoch, self.state.epochs, epoch_loss)
                interval = c.knn.interval
                if interval and self.state.epoch % interval == 0 and self.state.epoch < self.state.epochs:
                    knn = self.knn()
                    if knn:
                        log.info("kNN after epoch %d: %s", self.state.epoch, _fmt(knn))
                        logger.write("knn", self.state.step, self.state.epoch, **knn)
                self._save()
                if self._stop_after_epoch and self.state.epoch < self.state.epochs:
                    raise _Stop
            knn_final = self.knn()
            if knn_final:
                logger.write("knn", self.state.step, self.state.epoch, **knn_final)
        except _Stop:
            raise self._interrupted_at_step() from None
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
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

    def _interrupted_at_step(self) -> TrainingInterrupted:
        """After a Ctrl-C or a stop signal: a checkpoint of this step (if past the first) and how to resume."""
        how = "interrupted" if self._stop_signal is None else f"stopped by {signal.Signals(self._stop_signal).name}"
        last = self.checkpoints.last
        if self.state.step == 0:
            message = f"{how} before the first optimizer step; nothing was saved"
        else:
            saved = last is not None and int(ckpt_io.load(last, mmap=True)["step"]) == self.state.step
            # the epoch's own checkpoint when it is this step; else last.pt alone (epoch files stay intact)
            path = last if saved and last is not None else self._save(epoch_end=False)
            message = (
                f"{how} at epoch {self.state.epoch + 1}, step {self.state.step}: saved {path}; continue with: "
                f"{resume_command(self.run_dir)}"
            )
        if self._stop_signal is not None:
            return TrainingPreempted(message, self._stop_signal)
        return TrainingInterrupted(message)

    def _nothing_left(self, t0: float) -> TrainResult:
        path = self.resumed_from
        log.info(
            "nothing left to train: %s finished epoch %d of %d (step %d); it is the final checkpoint. "
            "To train longer, resume it with schedule.epochs=N (N > %d)",
            path,
            self.state.epoch,
            self.state.epochs,
            self.state.step,
            self.state.epoch,
        )
        seconds = time.perf_counter() - t0
        return TrainResult(self.run_dir, self.state.epoch, self.state.step, seconds, path, None, self.knn_initial, None)

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
        last = r.last_checkpoint
        linked = next((e for e in epochs if last and (self.run_dir / e).samefile(last)), None) if last else None
        on_disk = f"{last}" + (f" (= {linked})" if linked else "")
        if epochs:
            kept = f"checkpoint.keep={self.cfg.checkpoint.keep}" if self.cfg.checkpoint.keep else "all kept"
            on_disk += f"; {len(epochs)} epoch checkpoint(s) on disk: {', '.join(epochs)} ({kept})"
        lines = [
            f"finished {type(self.algo).__name__} ({type(self.algo.backbone).__name__}) in {r.seconds:.1f} s: "
            f"{r.epochs} epochs, {r.steps} steps",
            f"  run dir:     {self.run_dir}",
            f"  checkpoints: {on_disk}",
            f"  logs:        {self.run_dir / 'train.log'}, {self.run_dir / 'metrics.jsonl'}, {self.run_dir / 'tb'}",
        ]
        if self.batched is not None:
            share = 100 * self.aug_seconds / max(r.seconds, 1e-9)
            lines.append(
                f"  views:       made in {self.aug_seconds:.2f} s on {self.device.type} ({share:.1f}% of the run; "
                "aug_s per log line in metrics.jsonl)"
            )
        unreadable = self.unreadable_count()
        if unreadable:
            lines.append(f"  unreadable images skipped: {unreadable} (named in the warnings above)")
        if r.knn_final is not None:
            k = self.cfg.knn
            before = f"{r.knn_initial['top1']:.4f}" if r.knn_initial else "n/a"
            lines.append(
                f"  kNN top-1 (k={k.k}, T={k.temperature}, {len(self.val_set or [])} held-out images): "
                f"random init {before} -> trained {r.knn_final['top1']:.4f}"
            )
        for line in lines:
            log.info(line)


class _Stop(Exception):
    """Raised inside the epoch loop when a Ctrl-C asked the run to stop at this step."""


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: allocated by torch on a CUDA device, resident (RSS) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def resume_command(run_dir: Path) -> str:
    """The command line that continues this run in ``run_dir`` (this run's own overrides if Hydra ran it)."""
    overrides: list[str] = []
    where = [f"hydra.run.dir={run_dir}"]
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            skip = ("resume=", "hydra.run.dir=", "overwrite=")
            overrides = [o for o in hc.overrides.task if not o.startswith(skip)]
            if hc.mode == RunMode.MULTIRUN:  # launcher=slurm / a sweep member: the sweep dir decides
                where = [f"hydra.sweep.dir={run_dir.parent}", f"hydra.sweep.subdir={run_dir.name}"]
    except Exception:  # noqa: BLE001 - only a hint
        overrides = []
    return " ".join(["python -m selfsup.train", *overrides, *where, "resume=auto"])


def _fmt(result: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in result.items())
