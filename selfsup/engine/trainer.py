"""The training loop: plain PyTorch, torchrun-aware, one process or DDP.

Work directory = the Hydra run dir: ``config.yaml`` (resolved), ``train.log``, ``metrics.jsonl``,
``tb/`` and the checkpoints ``last.pt`` / ``epoch_NNNN.pt`` side by side.
"""

from __future__ import annotations

import inspect
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from selfsup import distributed
from selfsup.algorithms.base import Algorithm, Batch
from selfsup.data.datasets import ImageDataset
from selfsup.data.views import MultiViewDataset, Normalize, build_view_transform, expand_views
from selfsup.engine import checkpoint as ckpt_io
from selfsup.engine.logger import MetricLogger, Progress
from selfsup.engine.optim import build_optimizer, scaled_lr
from selfsup.engine.schedules import LRFactor
from selfsup.errors import ConfigError, SelfsupError, TrainingDiverged
from selfsup.eval.features import extract_features
from selfsup.eval.knn import knn_accuracy
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


def build(cfg: dict[str, Any], **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, re-raising our own one-line errors instead of Hydra's wrapper."""
    try:
        return instantiate(cfg, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, SelfsupError):
            raise e.__cause__ from None
        raise


def build_dataset(cfg: dict[str, Any], split: str) -> ImageDataset:
    """Instantiate ``cfg`` (the ``dataset`` node as a plain dict) for ``split``."""
    return build({k: v for k, v in cfg.items() if k != "hints"}, split=split)


class SeededSampler(DistributedSampler):
    """DistributedSampler (shuffle by seed + epoch, drop the tail so every rank gets the same
    number of distinct images) that also hands each item its own augmentation seed.

    Item i of epoch e is augmented with seed f(seed, e, i) whatever the worker, the number of
    workers or an interruption in between, so resumed runs see exactly the same views.
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        for i in super().__iter__():
            yield i, (base + i) % 2**63


class SeededViews(MultiViewDataset):
    """MultiViewDataset that takes ``(index, seed)`` keys from ``SeededSampler``."""

    def __getitem__(self, key: Any) -> dict[str, Any]:
        i, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return super().__getitem__(i)


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
    def __init__(self, cfg: DictConfig, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        c = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True, throw_on_missing=True)
        self.cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        assert isinstance(c, dict)
        self.c = c
        self.env = distributed.init(c["device"], c["dist"]["backend"], c["dist"]["timeout_s"])
        self.device = self.env.device
        self.is_main = self.env.is_main
        if not self.is_main:  # one copy of every message: rank 0 speaks, the others only warn
            logging.getLogger().setLevel(logging.WARNING)
        self.seed = int(c["seed"])
        seed_everything(self.seed, c["deterministic"])
        sched, optim_cfg = c["schedule"], c["algo"]["optimizer"]

        # ---- data
        self.train_set = build_dataset(c["dataset"], "train")
        if len(self.train_set) == 0:
            raise ConfigError("the training split is empty; lower dataset.val_fraction or add images")
        self.val_set: ImageDataset | None = None
        if c["knn"]["enabled"] and self.train_set.has_labels:
            val = build_dataset(c["dataset"], "val")
            self.val_set = val if len(val) > 0 else None
        self.view_specs = expand_views(c["algo"]["views"])
        self.train_views = SeededViews(self.train_set, [build_view_transform(v) for v in self.view_specs])

        # ---- model
        backbone = build(c["backbone"])
        self.algo: Algorithm = build(c["algo"]["model"], backbone=backbone)
        if len(self.view_specs) != self.algo.num_views:
            raise ConfigError(
                f"{type(self.algo).__name__} takes {self.algo.num_views} view(s) per image but algo.views "
                f"declares {len(self.view_specs)}; fix the views' copies"
            )
        self.algo.setup(len(self.train_set))
        if self.env.world_size > 1:  # same initial weights everywhere, different masks/dropout per rank
            seed_everything(self.seed + self.env.rank, c["deterministic"])
        self.precision = self._resolve_precision(c["precision"])
        if c["sync_bn"]:
            if self.env.world_size > 1:  # torch's kernels on CUDA, all-gathered statistics on CPU (gloo)
                self.algo = convert_sync_batchnorm(self.algo, self.device)
            else:
                log.info("sync_bn=true has no effect in a single process (plain BatchNorm is used)")
        self.algo.to(self.device)
        is_conv = hasattr(backbone, "layer4")
        channels_last = c["channels_last"] if c["channels_last"] is not None else is_conv
        if channels_last:
            self.algo.to(memory_format=torch.channels_last)
        self.normalize = Normalize(self.train_set.mean, self.train_set.std, self.device, channels_last)
        self.num_workers = self._resolve_workers(c["loader"]["num_workers"])

        # ---- optimisation
        ws, bs, acc = self.env.world_size, int(sched["batch_size"]), int(sched["accumulate"])
        if bs < 1 or acc < 1:
            raise ConfigError("schedule.batch_size and schedule.accumulate must be >= 1")
        self.global_batch = bs * ws * acc
        self.base_lr = float(optim_cfg["lr"])
        self.lr = scaled_lr(self.base_lr, self.global_batch, int(optim_cfg["base_batch_size"]), sched["scale_lr"])
        fused = c["fused_optimizer"]
        if fused is None:
            fused = self.device.type == "cuda" and optim_cfg["name"] in ("sgd", "adamw")
        self.optimizer = build_optimizer(self.algo, optim_cfg, self.lr, fused=bool(fused))
        self.micro_per_epoch = (len(self.train_set) // ws) // bs
        self.steps_per_epoch = self.micro_per_epoch // acc
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"one optimizer step needs {self.global_batch} images (schedule.batch_size={bs} x {ws} process(es) "
                f"x accumulate {acc}) but the training split has {len(self.train_set)}; lower schedule.batch_size"
            )
        self.epochs = int(sched["epochs"])
        total = self.epochs * self.steps_per_epoch
        factor = LRFactor(
            sched["policy"],
            total,
            int(round(sched["warmup_epochs"] * self.steps_per_epoch)),
            sched["warmup_start_factor"],
            sched["min_lr_ratio"],
            [m * self.steps_per_epoch for m in sched["milestones"]],
            sched["gamma"],
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.epoch, self.step = 0, 0
        self.knn_initial: dict[str, float] | None = None
        self.resumed_from: Path | None = None
        self._maybe_resume(c["resume"])
        if c["compile"]:
            for module in self.algo.compile_targets():
                module.compile()
        self.model: nn.Module = self.algo
        if ws > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # memory banks and queues are kept identical by the algorithms' own collectives
            buffers = (
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

    def _resolve_workers(self, workers: int | None) -> int:
        """Loader processes per rank: as configured, or 0 on the CPU (the CPU is busy computing)
        and min(8, cores per local process - 1) on a GPU."""
        if workers is not None:
            if workers < 0:
                raise ConfigError(f"loader.num_workers must be >= 0 or null (auto), got {workers}")
            return int(workers)
        if self.device.type == "cpu":
            return 0
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return max(1, min(8, (os.cpu_count() or 2) // local - 1))

    def autocast(self) -> Any:
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _maybe_resume(self, resume: str | None) -> None:
        if not resume:
            return
        if resume == "auto":
            path = ckpt_io.find_last(self.run_dir)
            if path is None:
                log.info("resume=auto: no last.pt in %s, starting from scratch", self.run_dir)
                return
        else:
            path = Path(resume).expanduser()
        state = ckpt_io.load(path)
        ckpt_io.load_model_state(self.algo, state["model"], str(path))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rngs = state.get("rng") or []
        if len(rngs) == self.env.world_size:
            ckpt_io.set_rng_state(rngs[self.env.rank])
        else:
            log.warning(
                "checkpoint has RNG states for %d process(es), this run has %d: reseeding",
                len(rngs),
                self.env.world_size,
            )
            seed_everything(self.seed + 1000 * state["epoch"] + self.env.rank, self.c["deterministic"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.knn_initial = state.get("knn_initial")
        self.resumed_from = path
        log.info("resumed from %s (epoch %d, step %d)", path, self.epoch, self.step)

    # ------------------------------------------------------------------ evaluation
    def extract_features(self, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """TrainContext service: ``fn`` over the whole training set in eval mode."""
        return self._extract(fn, self.train_set)[0]

    def _extract(self, fn: Callable[[Tensor], Tensor], dataset: ImageDataset) -> tuple[Tensor, Tensor]:
        was_training = self.algo.training
        self.algo.eval()
        try:
            return extract_features(
                fn,
                dataset,
                self.normalize,
                batch_size=self.c["knn"]["batch_size"],
                num_workers=min(self.num_workers, 2),
                autocast=self.autocast,
            )
        finally:
            self.algo.train(was_training)

    def knn(self) -> dict[str, float] | None:
        """Weighted kNN top-1/top-5 of backbone features: train split = bank, val split = queries."""
        if self.val_set is None:
            return None
        k = self.c["knn"]
        bank, bank_labels = self._extract(self.algo.extract, self.train_set)
        queries, query_labels = self._extract(self.algo.extract, self.val_set)
        return knn_accuracy(
            queries, query_labels, bank, bank_labels, self.train_set.num_classes, k["k"], k["temperature"]
        )

    # ------------------------------------------------------------------ checkpoints
    def _save(self) -> Path:
        rng = ckpt_io.rng_state()
        rngs: list[Any] = [rng]
        if self.env.world_size > 1:
            rngs = [None] * self.env.world_size
            dist.all_gather_object(rngs, rng)
        path = self.run_dir / "last.pt"
        if self.is_main:
            state = {
                "format": ckpt_io.FORMAT,
                "version": 1,
                "epoch": self.epoch,
                "step": self.step,
                "model": self.algo.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "rng": rngs,
                "knn_initial": self.knn_initial,
                "config": self.cfg_yaml,
                "meta": {
                    "algo": type(self.algo).__name__,
                    "backbone": type(self.algo.backbone).__name__,
                    "num_samples": len(self.train_set),
                    "world_size": self.env.world_size,
                    "global_batch": self.global_batch,
                    "torch": str(torch.__version__),
                },
            }
            interval, keep = self.c["checkpoint"]["interval"], self.c["checkpoint"]["keep"]
            if interval > 0 and (self.epoch % interval == 0 or self.epoch == self.epochs):
                epoch_path = ckpt_io.save_atomic(state, self.run_dir / f"epoch_{self.epoch:04d}.pt")
                self._link_or_save(epoch_path, path, state)
                if keep > 0:
                    for old in sorted(self.run_dir.glob("epoch_*.pt"))[:-keep]:
                        old.unlink(missing_ok=True)
            else:
                ckpt_io.save_atomic(state, path)
        distributed.barrier()
        return path

    @staticmethod
    def _link_or_save(src: Path, dst: Path, state: dict[str, Any]) -> None:
        """Point ``dst`` at the same bytes as ``src`` (hard link, atomic rename); copy if needed."""
        tmp = dst.with_name(f".{dst.name}.link.tmp")
        try:
            tmp.unlink(missing_ok=True)
            os.link(src, tmp)
            os.replace(tmp, dst)
        except OSError:
            ckpt_io.save_atomic(state, dst)

    # ------------------------------------------------------------------ training
    def _loader(self, epoch: int) -> DataLoader:
        sampler = SeededSampler(
            self.train_views,
            num_replicas=self.env.world_size,
            rank=self.env.rank,
            shuffle=True,
            seed=self.seed,
            drop_last=True,
        )
        sampler.set_epoch(epoch)
        lc = self.c["loader"]
        workers = self.num_workers
        return DataLoader(
            self.train_views,
            batch_size=int(self.c["schedule"]["batch_size"]),
            sampler=sampler,
            num_workers=workers,
            drop_last=True,
            pin_memory=lc["pin_memory"] and self.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=lc["prefetch_factor"] if workers > 0 else None,
            generator=torch.Generator().manual_seed(self.seed + epoch),
        )

    def _check_finite(self, loss: float) -> None:
        if not np.isfinite(loss):
            last = ckpt_io.find_last(self.run_dir)
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"loss became {loss} at epoch {self.epoch + 1}, step {self.step}; {where}. "
                "Lower algo.optimizer.lr, add schedule.warmup_epochs or schedule.clip_grad, or use precision=fp32"
            )

    def to_device(self, batch: dict[str, Any]) -> Batch:
        """A loader batch (uint8 views) -> a normalised batch on the device."""
        return {
            "views": [self.normalize(v) for v in batch["views"]],
            "index": batch["index"].to(self.device, non_blocking=True),
            "label": batch["label"].to(self.device, non_blocking=True),
        }

    def train_step(self, inputs: Batch, last_micro: bool = True) -> tuple[dict[str, Tensor], dict | None]:
        """Forward + backward of one micro-batch; on the last micro-batch of an accumulation
        window also the optimizer step, LR schedule and the algorithm's ``after_step`` hook.
        Returns the algorithm's outputs and what ``after_step`` reported."""
        acc = int(self.c["schedule"]["accumulate"])
        ddp = isinstance(self.model, DistributedDataParallel)
        with nullcontext() if last_micro or not ddp else self.model.no_sync():
            with self.autocast():
                out = self.model(inputs)
            self.scaler.scale(out["loss"] / acc).backward()
        if not last_micro:
            return out, None
        clip = self.c["schedule"]["clip_grad"]
        if clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.algo.parameters(), float(clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return out, self.algo.after_step(self.step)

    def _train_epoch(self, logger: MetricLogger, progress: Progress) -> float:
        acc, interval = int(self.c["schedule"]["accumulate"]), int(self.c["log"]["interval"])
        self.model.train()
        progress.start(self.epoch, self.epochs, self.steps_per_epoch)
        loss_sum = torch.zeros((), device=self.device)
        epoch_sum = torch.zeros((), device=self.device)
        extra_sums: dict[str, Tensor] = {}
        seen, window_micro, t_window = 0, 0, time.perf_counter()
        micro_limit = self.steps_per_epoch * acc
        for i, batch in enumerate(self._loader(self.epoch)):
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
            if self.step % interval == 0 or step_in_epoch == self.steps_per_epoch:
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
                logger.write("train", self.step, self.epoch + step_in_epoch / self.steps_per_epoch, **scalars)
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
        c = self.c
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(self.cfg_yaml)
        logger = MetricLogger(self.run_dir, self.is_main, c["log"]["tensorboard"])
        progress = Progress(self.is_main, c["log"]["progress"], c["log"]["interval"])
        opt = c["algo"]["optimizer"]
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
            c["schedule"]["batch_size"],
            self.env.world_size,
            c["schedule"]["accumulate"],
        )
        log.info(
            "lr: base %.4g for batch %d -> effective %.4g for batch %d (linear scaling %s)",
            self.base_lr,
            opt["base_batch_size"],
            self.lr,
            self.global_batch,
            "on" if c["schedule"]["scale_lr"] else "off",
        )
        logger.write("config", self.step, self.epoch, base_lr=self.base_lr, lr=self.lr, global_batch=self.global_batch)
        final_loss: float | None = None
        try:
            if self.resumed_from is None:
                self.knn_initial = self.knn()
                if self.knn_initial:
                    log.info("kNN before training (random init): %s", _fmt(self.knn_initial))
                    logger.write("knn", self.step, self.epoch, **self.knn_initial)
            self.algo.on_train_start(self)
            while self.epoch < self.epochs:
                final_loss = self._train_epoch(logger, progress)
                self.epoch += 1
                log.info("epoch %d/%d done: loss %.4f", self.epoch, self.epochs, final_loss)
                interval = c["knn"]["interval"]
                if interval and self.epoch % interval == 0 and self.epoch < self.epochs:
                    result = self.knn()
                    if result:
                        log.info("kNN after epoch %d: %s", self.epoch, _fmt(result))
                        logger.write("knn", self.step, self.epoch, **result)
                self._save()
            knn_final = self.knn()
            if knn_final:
                logger.write("knn", self.step, self.epoch, **knn_final)
        finally:
            progress.close()
            logger.close()
        seconds = time.perf_counter() - t0
        result = TrainResult(
            self.run_dir,
            self.epoch,
            self.step,
            seconds,
            ckpt_io.find_last(self.run_dir),
            final_loss,
            self.knn_initial,
            knn_final,
        )
        if self.is_main:
            self._summary(result)
        return result

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
            k = self.c["knn"]
            before = f"{r.knn_initial['top1']:.4f}" if r.knn_initial else "n/a"
            lines.append(
                f"  kNN top-1 (k={k['k']}, T={k['temperature']}, {len(self.val_set or [])} held-out images): "
                f"random init {before} -> trained {r.knn_final['top1']:.4f}"
            )
        for line in lines:
            log.info(line)


def _fmt(result: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in result.items())
