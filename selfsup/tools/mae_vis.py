"""MAE reconstructions of one image, four panels in one PNG (MMSelfSup's ``tools/misc/mae_visualization.py``,
1.x ``tools/analysis_tools/visualize_reconstruction.py``)::

    python -m selfsup.tools.mae_vis img=photo.jpg ckpt=outputs/mae/<run>/last.pt          # -> <run>/mae_vis/photo.png
    python -m selfsup.tools.mae_vis img=photo.jpg ckpt=... out=vis.png seed=3 mask_ratio=0.5 denorm=original

Panels, left to right: **original** | **masked** (removed patches filled with mid-grey 0.5, visible ones as
they are) | **reconstruction** (every patch as the decoder predicts it, the visible ones included) |
**reconstruction + visible** (x * (1 - m) + pred * m: the visible patches pasted back). The command prints
the PNG's path, the loss (MSE over the removed patches, in the model's target units, as in training) and
the mask ratio.

1. The image (any PIL mode; alpha over black, as the datasets read it) is resized on its short side to the
   model's image size and centre-cropped, then normalised with the checkpoint dataset's mean/std.
2. The mask is fixed by ``seed``: noise [1, L] = ``torch.rand`` of a ``torch.Generator`` seeded with it (on
   the CPU, so every device gives the same mask) goes to ``MAE.reconstruct``, which keeps the
   ``int(L * (1 - mask_ratio))`` patches of smallest noise. ``mask_ratio``: default the checkpoint's.
3. The predictions go back to pixels (below), are un-normalised with the dataset mean/std and clamped to [0, 1].

**De-normalisation of norm_pix_loss models** (``denorm``; MMSelfSup 0.x skipped it and showed wrong
colours, its issue #628). Such a model predicts patch l as (t_l - mu_l) / s_l, where mu_l is the mean and
s_l = sqrt(var_l + 1e-6) the (unbiased) standard deviation of the patch's p*p*3 normalised target values,
one scalar pair per patch shared by its three channels, so pred_l * s_l + mu_l inverts it exactly and the
colour is in pred itself. What mu_l and s_l to use:

* visible patches (the encoder saw them): their own mu_l, s_l;
* removed patches, ``denorm=visible`` (default): what the visible patches tell, per image,
  mu = mean over visible v of mu_v and s = sqrt(mean over visible v of s_v^2) (the pooled within-patch
  standard deviation). One pair per patch, like the normalisation it inverts (a per-channel pair would
  undo a transform the model never learnt); exact when the patches share one mean and variance, and it
  uses nothing the model did not see. A removed patch in a region brighter or darker than the visible
  average comes out at the average brightness and contrast: the model was never asked for them;
* removed patches, ``denorm=original``: each with its own mu_l, s_l, the standard MAE demo's practice (1.x
  ``--norm-pix``). It leaks two numbers per hidden patch (its brightness and contrast) that the model
  never saw, so the removed patches look better than the model alone makes them.

A model trained with ``norm_pix_loss=false`` predicts normalised pixels directly; ``denorm`` is unused.

``out``: a ``.png`` path, or a folder that gets ``<image stem>.png``; default
``<checkpoint folder>/mae_vis/<image stem>.png``. ``device``: auto | cpu | cuda | cuda:N; ``precision``:
auto (bf16 autocast on CUDA, fp32 on the CPU) | fp32 | bf16 | fp16. Every key: ``--cfg``.

Bad input (missing or non-MAE checkpoint, missing or unreadable image, bad option) prints one line
``selfsup: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import os
import struct
import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from omegaconf import MISSING, OmegaConf
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

from selfsup.algorithms.mae import MAE
from selfsup.config import compose_tool
from selfsup.data.datasets import to_rgb_uint8
from selfsup.distributed import resolve_device
from selfsup.engine.pretrained import existing_file, load_pretrained
from selfsup.errors import CheckpointError, ConfigError, DataError
from selfsup.eval.encoder import EvalConfig, check_checkpoint_arg, resolve_precision
from selfsup.models.masking import patchify, unpatchify

CONFIG_NAME = "mae_vis"
TOOL = "mae_vis"
TITLES = ("original", "masked", "reconstruction", "reconstruction + visible")
GREY = 0.5  # fill of the removed patches in the masked panel, in [0, 1] RGB
PANEL_INCHES = 3.0  # each panel is 3 x 3 inches; the figure is 12 x 3.6 inches at DPI: 1200 x 360 px
FIGSIZE = (4 * PANEL_INCHES, PANEL_INCHES + 0.6)
DPI = 100
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


class Denorm(str, Enum):
    visible = "visible"  # removed patches: the visible patches' pooled mean and std (default)
    original = "original"  # removed patches: their own mean and std (MAE demo; leaks hidden statistics)


@dataclass
class MAEVisConfig(EvalConfig):
    img: str = MISSING  # the image to mask and reconstruct (any format PIL reads)
    mask_ratio: float | None = None  # fraction of patches removed; None = the checkpoint's
    denorm: Denorm = Denorm.visible  # statistics for removed patches of norm_pix_loss models (module docstring)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mask_ratio is not None and not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}; e.g. mask_ratio=0.75")


class Panels(NamedTuple):
    """The four panels, each float32 [H, W, 3] RGB in [0, 1]."""

    original: np.ndarray
    masked: np.ndarray
    reconstruction: np.ndarray
    pasted: np.ndarray  # reconstruction + visible


class Visualisation(NamedTuple):
    panels: Panels
    loss: float  # MSE over the removed patches (target units), as in training
    mask: Tensor  # [L] 1 = removed
    pred: Tensor  # [L, p*p*3] the raw prediction (target units), on the CPU


# ----------------------------------------------------------------------------------------- image


def read_image(path: str | os.PathLike) -> Tensor:
    """The image at ``path`` as uint8 [3, H, W] RGB; a missing or undecodable file is a :class:`DataError`."""
    if not str(path) or str(path) == MISSING:  # img= (e.g. make mae-vis without IMG=)
        raise DataError("img is not set: pass img=<path to a PNG/JPEG/... file>")
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a folder, not an image file" if p.is_dir() else "does not exist"
        raise DataError(f"image {p} {what}: pass img=<path to a PNG/JPEG/... file>")
    try:
        with Image.open(p) as img:
            return to_rgb_uint8(img)
    except _DECODE_ERRORS as e:
        raise DataError(f"cannot read image {p} ({e}): pass img=<path to a PNG/JPEG/... file PIL can open>") from None


def fit_image(image: Tensor, size: int) -> Tensor:
    """uint8 [3, H, W] -> [3, size, size]: short side resized to ``size`` (antialiased), centre crop."""
    if tuple(image.shape[-2:]) == (size, size):
        return image
    return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])(image)


def normalise(image: Tensor, mean: list[float], std: list[float]) -> Tensor:
    """uint8 [3, H, W] -> float [1, 3, H, W] = (image / 255 - mean) / std, per channel."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((image.float() / 255 - m) / s)[None]


def mask_noise(seed: int, num_patches: int) -> Tensor:
    """[1, L] uniform noise from a CPU generator seeded with ``seed``: it decides the mask."""
    return torch.rand(1, num_patches, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------- de-normalisation


def pixel_patches(
    pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool, denorm: Denorm | str = Denorm.visible, eps: float = 1e-6
) -> Tensor:
    """Predictions [B, L, P] in normalised-image units (the module docstring gives the formulas).

    pred: [B, L, P] the model's output; target: [B, L, P] patchify of the normalised image (only the
    visible patches' statistics are read, unless ``denorm=original``); mask: [B, L] 1 = removed.
    """
    if not norm_pix:
        return pred
    mu = target.mean(dim=-1, keepdim=True)  # [B, L, 1]
    sd = (target.var(dim=-1, keepdim=True) + eps).sqrt()  # [B, L, 1], unbiased var as in the loss
    if Denorm(denorm) is Denorm.visible:
        seen = (1 - mask.float())[..., None]  # [B, L, 1] 1 = visible
        count = seen.sum(dim=1, keepdim=True)  # [B, 1, 1]
        if bool((count == 0).any()):
            raise ConfigError(
                "no patch is visible at this mask_ratio, so denorm=visible has no statistics to use: "
                "lower mask_ratio, or pass denorm=original"
            )
        mu_seen = (mu * seen).sum(dim=1, keepdim=True) / count  # [B, 1, 1]
        sd_seen = ((sd.square() * seen).sum(dim=1, keepdim=True) / count).sqrt()  # [B, 1, 1]
        mu = torch.where(seen.bool(), mu, mu_seen)
        sd = torch.where(seen.bool(), sd, sd_seen)
    return pred * sd + mu


def compose_panels(
    image: Tensor,
    pred: Tensor,
    mask: Tensor,
    patch_size: int,
    mean: list[float],
    std: list[float],
    norm_pix: bool,
    denorm: Denorm | str = Denorm.visible,
    eps: float = 1e-6,
) -> Panels:
    """The four panels of ``image`` (uint8 [3, S, S], already at the model's size), from the model's
    ``pred`` ([1, L, p*p*3] or [L, p*p*3], target units) and ``mask`` ([1, L] or [L], 1 = removed)."""
    pred, mask = pred.float().reshape(1, -1, pred.shape[-1]), mask.float().reshape(1, -1)
    p = patch_size
    x = image.float() / 255  # [3, S, S] in [0, 1]
    target = patchify(normalise(image, mean, std), p)  # [1, L, P]
    patches = pixel_patches(pred, target, mask, norm_pix, denorm, eps)  # [1, L, P] normalised units
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    recon = (unpatchify(patches, p, 3)[0] * s + m).clamp(0, 1)  # [3, S, S]
    removed = unpatchify(mask[..., None].expand(-1, -1, p * p * 3), p, 3)[0].bool()  # [3, S, S]
    masked = torch.where(removed, torch.full_like(x, GREY), x)
    pasted = torch.where(removed, recon, x)

    def hwc(t: Tensor) -> np.ndarray:
        return t.permute(1, 2, 0).numpy().astype(np.float32)

    return Panels(hwc(x), hwc(masked), hwc(recon), hwc(pasted))


# ---------------------------------------------------------------------------------------- the tool


def visualise(
    algo: MAE,
    image: Tensor,
    mean: list[float],
    std: list[float],
    seed: int = 0,
    denorm: Denorm | str = Denorm.visible,
    autocast: AbstractContextManager | None = None,
) -> Visualisation:
    """Mask ``image`` (uint8 [3, S, S] at the model's size) with the mask of ``seed``, reconstruct it with
    ``algo`` (its ``mask_ratio``), and compose the panels."""
    device = next(algo.parameters()).device
    x = normalise(image, mean, std).to(device)  # [1, 3, S, S]
    noise = mask_noise(seed, algo.backbone.num_patches)  # [1, L]
    with torch.no_grad(), autocast or nullcontext():
        out = algo.reconstruct(x, noise)
    pred, mask = out.pred.float().cpu(), out.mask.float().cpu()  # [1, L, P], [1, L]
    loss_fn = algo.loss_fn
    panels = compose_panels(
        image, pred, mask, algo.backbone.patch_size, mean, std, loss_fn.norm_pix, denorm, loss_fn.eps
    )
    return Visualisation(panels, float(out.loss), mask[0], pred[0])


def save_panels(panels: Panels, path: Path, title: str) -> None:
    """One row of the four panels with their titles, ``title`` above, to ``path`` (PNG, FIGSIZE at DPI)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    axes = fig.subplots(1, 4)
    for ax, panel, name in zip(axes, panels, TITLES):
        ax.imshow(panel, interpolation="nearest", vmin=0.0, vmax=1.0)
        ax.set_title(name, fontsize=11)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.8, wspace=0.04)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=DPI)
    os.replace(tmp, path)


def output_path(cfg: MAEVisConfig) -> Path:
    """``out`` if it ends in .png; ``<out>/<image stem>.png`` for a folder; default under the checkpoint's folder."""
    stem = f"{Path(cfg.img).stem}.png"
    if not cfg.out:
        return Path(cfg.ckpt).expanduser().resolve().parent / TOOL / stem
    out = Path(cfg.out).expanduser()
    if out.suffix.lower() == ".png":
        return out
    if out.suffix and not out.is_dir():
        raise ConfigError(f"out={cfg.out} is not a .png file: pass out=<name>.png, or a folder to write {stem} in")
    return out / stem


class Result(NamedTuple):
    out: Path
    vis: Visualisation
    algo: MAE  # the checkpoint's model, eval mode, its mask_ratio as used
    mean: list[float]  # the checkpoint dataset's normalisation
    std: list[float]


def run(cfg: MAEVisConfig) -> Result:
    """Reconstruct ``cfg.img`` with the MAE in ``cfg.ckpt`` and write the four-panel PNG."""
    check_checkpoint_arg(cfg.ckpt)
    for key in ("dataset", "backbone"):
        if getattr(cfg, key) is not None:
            raise ConfigError(
                f"mae_vis takes no {key}= option: the image size, normalisation and architecture are the "
                "checkpoint's own (exported backbone files have no decoder to reconstruct with)"
            )
    out = output_path(cfg)
    image = read_image(cfg.img)  # before the checkpoint: a bad image fails fast
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    pre = load_pretrained(existing_file(cfg.ckpt), device)
    algo = pre.algo
    if not isinstance(algo, MAE):
        raise CheckpointError(
            f"{cfg.ckpt} holds a {type(algo).__name__}, not an MAE: mae_vis shows masked-patch reconstructions, "
            "which only MAE checkpoints (trained with algo=mae) make"
        )
    if cfg.mask_ratio is not None:
        algo.mask_ratio = cfg.mask_ratio
    mean, std = list(pre.config.dataset.mean), list(pre.config.dataset.std)
    image = fit_image(image, algo.backbone.img_size)
    autocast: AbstractContextManager = nullcontext()
    if precision != "fp32":
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        autocast = torch.autocast(device_type=device.type, dtype=dtype)
    vis = visualise(algo, image, mean, std, cfg.seed, cfg.denorm, autocast)
    removed, total = int(vis.mask.sum()), vis.mask.numel()
    how = f"denorm={Denorm(cfg.denorm).value}" if algo.loss_fn.norm_pix else "pixel targets"
    title = (
        f"{Path(cfg.img).name}   seed {cfg.seed}   mask ratio {removed / total:.2f} ({removed}/{total} patches)   "
        f"loss {vis.loss:.4f}   {how}   {Path(cfg.ckpt).name} (epoch {pre.epoch})"
    )
    save_panels(vis.panels, out, title)
    return Result(out, vis, algo, mean, std)


def main(argv: list[str] | None = None) -> None:
    from selfsup.tools import run_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return
    if "--cfg" in argv:  # the composed options
        cfg = run_cli(lambda: compose_tool(CONFIG_NAME, MAEVisConfig, [a for a in argv if a != "--cfg"]))
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
        return
    result = run_cli(lambda: run(compose_tool(CONFIG_NAME, MAEVisConfig, argv)))
    mask = result.vis.mask
    removed, total = int(mask.sum()), mask.numel()
    target = "per-patch normalised pixels" if result.algo.loss_fn.norm_pix else "normalised pixels"
    print(f"wrote {result.out}")
    print(f"loss {result.vis.loss:.4f} (MSE over the removed patches, {target})")
    print(f"mask ratio {removed / total:.2f} ({removed} of {total} patches removed)", flush=True)


if __name__ == "__main__":
    main()
