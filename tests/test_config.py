"""Every option of every config group and every experiment overlay composes and instantiates;
typed schemas reject misspelt keys, wrong types and unknown options while composing."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.errors import ConfigCompositionException, HydraException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from conftest import CONF, compose_cfg, run_training
from selfsup.algorithms.base import Algorithm
from selfsup.engine.trainer import build, build_dataset
from selfsup.errors import ConfigError

GROUPS = ["algo", "backbone", "dataset", "schedule", "launcher"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_its_options():
    assert options("algo") == ["mae", "odc", "simclr"]
    assert options("backbone") == ["resnet18", "resnet50", "vit_base", "vit_small", "vit_tiny"]
    assert options("dataset") == ["cifar10", "digits", "fake", "imagefolder"]
    assert options("schedule") == ["cosine", "cpu", "step"]
    assert options("launcher") == ["local"]
    assert options("experiment") == [
        "mae_vit-base-p16_8xb512-coslr-400e_in1k",
        "odc_resnet50_8xb64-steplr-440e_in1k",
        "simclr_resnet50_8xb32-coslr-200e_in1k",
    ]


def test_defaults():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    expected = {"algo": "simclr", "backbone": "resnet18", "dataset": "digits", "schedule": "cpu", "launcher": "local"}
    assert {g: choices[g] for g in GROUPS} == expected
    assert choices["algo_dataset"] == "simclr_digits" and choices["experiment"] is None
    assert cfg.algo.model._target_.endswith("SimCLR")
    assert cfg.backbone.arch == "resnet18"
    assert cfg.dataset._target_.endswith("Digits")
    assert cfg.schedule.epochs == 7 and cfg.launcher.name == "local"
    assert cfg.device == "auto" and cfg.resume is None and cfg.deterministic is False


def _instantiate(cfg):
    c = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    backbone = build(c["backbone"])
    algo = build(c["algo"]["model"], backbone=backbone)
    assert isinstance(algo, Algorithm)
    return backbone, algo


@pytest.mark.parametrize("algo", options("algo"))
def test_every_algo_instantiates(algo):
    backbone_opt = "vit_tiny" if algo == "mae" else "resnet18"
    _, model = _instantiate(compose_cfg([f"algo={algo}", f"backbone={backbone_opt}", "dataset=fake"]))
    assert model.num_views == (2 if algo == "simclr" else 1)


@pytest.mark.parametrize("backbone", options("backbone"))
def test_every_backbone_instantiates_and_runs(backbone):
    cfg = compose_cfg([f"backbone={backbone}", "dataset=fake", "dataset.image_size=32"])
    net = instantiate(OmegaConf.to_container(cfg.backbone, resolve=True, enum_to_str=True))
    with torch.no_grad():
        out = net.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, net.num_features)


def test_resnet_stem_follows_the_dataset_unless_overridden():
    assert compose_cfg(["dataset=cifar10", "dataset.root=/x"]).backbone.stem == "cifar"
    assert compose_cfg(["dataset=digits"]).backbone.stem == "imagenet"
    assert compose_cfg(["dataset=cifar10", "dataset.root=/x", "backbone.stem=imagenet"]).backbone.stem == "imagenet"


@pytest.mark.parametrize("dataset", options("dataset"))
def test_every_dataset_composes_and_instantiates(dataset, request):
    overrides = [f"dataset={dataset}"]
    # only the datasets read from disk need the CIFAR-10 JPEG archive
    cifar_folder = request.getfixturevalue("cifar_folder") if dataset in ("imagefolder", "cifar10") else None
    if dataset == "imagefolder":
        overrides.append(f"dataset.root={cifar_folder}")
    cfg = compose_cfg(overrides)
    c = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    if dataset == "cifar10":  # no CIFAR-10 pickles here: the error must say what to do
        c["dataset"]["root"] = str(cifar_folder)
        with pytest.raises(Exception, match="dataset.download=true"):
            build_dataset(c["dataset"], "train")
        return
    ds = build_dataset(c["dataset"], "train")
    image, label, index = ds[0]
    assert image.dtype == torch.uint8 and image.shape[0] == 3 and index == 0


def test_required_roots_are_missing_until_given():
    cfg = compose_cfg(["dataset=imagefolder"])
    with pytest.raises(OmegaConfBaseException, match="dataset.root"):
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


SCHEDULES = {  # (policy, epochs, warm-up epochs)
    "cosine": ("cosine", 200, 10),
    "cpu": ("cosine", 7, 1),
    "step": ("step", 440, 0),
}


@pytest.mark.parametrize("schedule", options("schedule"))
def test_every_schedule_composes(schedule):
    s = compose_cfg([f"schedule={schedule}"]).schedule
    assert (s.policy, s.epochs, s.warmup_epochs) == SCHEDULES[schedule]


def test_step_schedule_is_mmselfsup_odc_steplr():
    s = compose_cfg(["schedule=step"]).schedule
    assert (s.epochs, list(s.milestones), s.gamma, s.policy) == (440, [400], 0.4, "step")


# ---------------------------------------------------------------- experiment overlays

EXPECTED = {
    "odc_resnet50_8xb64-steplr-440e_in1k": dict(
        target="ODC", arch="resnet50", lr=0.06, base_batch=512, batch=64, epochs=440, policy="step", optim="sgd"
    ),
    "mae_vit-base-p16_8xb512-coslr-400e_in1k": dict(
        target="MAE", arch=None, lr=1.5e-4, base_batch=256, batch=512, epochs=400, policy="cosine", optim="adamw"
    ),
    "simclr_resnet50_8xb32-coslr-200e_in1k": dict(
        target="SimCLR", arch="resnet50", lr=0.3, base_batch=256, batch=32, epochs=200, policy="cosine", optim="lars"
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_experiment_overlay_reproduces_the_recipe(name):
    e = EXPECTED[name]
    cfg = compose_cfg([f"experiment={name}", "dataset.root=/data/in1k"])
    assert cfg.algo.model._target_.endswith(e["target"])
    assert cfg.algo.optimizer.name == e["optim"] and cfg.algo.optimizer.lr == pytest.approx(e["lr"])
    assert cfg.algo.optimizer.base_batch_size == e["base_batch"]
    assert (cfg.schedule.batch_size, cfg.schedule.epochs, cfg.schedule.policy) == (e["batch"], e["epochs"], e["policy"])
    assert cfg.dataset.image_size == 224 and cfg.dataset.root == "/data/in1k"
    if e["arch"]:
        assert cfg.backbone.arch == e["arch"] and cfg.backbone.stem == "imagenet"
    # 8 GPUs x per-GPU batch, linearly scaled: the effective lr of the recipe
    from selfsup.engine.optim import scaled_lr

    lr = scaled_lr(cfg.algo.optimizer.lr, 8 * e["batch"], cfg.algo.optimizer.base_batch_size)
    assert lr == pytest.approx({"ODC": 0.06, "MAE": 2.4e-3, "SimCLR": 0.3}[e["target"]])


def test_overlay_details():
    mae = compose_cfg(["experiment=mae_vit-base-p16_8xb512-coslr-400e_in1k", "dataset.root=/x"])
    assert (mae.backbone.embed_dim, mae.backbone.depth, mae.backbone.patch_size) == (768, 12, 16)
    assert (mae.algo.model.decoder_dim, mae.algo.model.decoder_depth, mae.algo.model.mask_ratio) == (512, 8, 0.75)
    assert mae.schedule.warmup_epochs == 40 and list(mae.algo.optimizer.betas) == [0.9, 0.95]
    odc = compose_cfg(["experiment=odc_resnet50_8xb64-steplr-440e_in1k", "dataset.root=/x"])
    assert (odc.algo.model.num_clusters, odc.algo.model.min_cluster) == (10000, 20)
    assert odc.algo.optimizer.paramwise.head.momentum == 0.0 and odc.sync_bn
    simclr = compose_cfg(["experiment=simclr_resnet50_8xb32-coslr-200e_in1k", "dataset.root=/x"])
    assert simclr.backbone.zero_init_residual and simclr.sync_bn and simclr.algo.views[0].copies == 2
    assert simclr.schedule.warmup_epochs == 10 and simclr.algo.model.temperature == 0.1


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_experiment_overlay_trains_a_step(name, tmp_path):
    """Each recipe, shrunk to a few images of 64 px, runs one optimizer step end to end."""
    overrides = [
        f"experiment={name}",
        "dataset=fake",
        "dataset.num_samples=8",
        "dataset.image_size=64",
        "schedule.batch_size=4",
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
        "knn.enabled=false",
    ]
    if name.startswith("odc"):
        overrides += ["algo.model.num_clusters=2", "algo.model.min_cluster=1"]
    result = run_training(overrides, tmp_path)
    assert result.steps == 2 and math.isfinite(result.final_loss) and result.last_checkpoint.is_file()
    ckpt = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["meta"]["algo"] == EXPECTED[name]["target"]
    assert ckpt["config"] == (tmp_path / "config.yaml").read_text()


# ---------------------------------------------------------------- (algo, dataset) specialisations


def test_digits_specialisation_applies_only_to_digits():
    digits = compose_cfg(["algo=simclr", "dataset=digits"])
    folder = compose_cfg(["algo=simclr", "dataset=imagefolder", "dataset.root=/x"])
    assert digits.algo.optimizer.name == "sgd" and digits.algo.views[0].hflip == 0.0
    assert folder.algo.optimizer.name == "lars" and folder.algo.views[0].hflip == 0.5
    assert compose_cfg(["algo=mae"]).algo.model.decoder_dim == 128  # CPU-sized decoder on digits
    assert compose_cfg(["algo=mae", "dataset=fake"]).algo.model.decoder_dim == 512  # paper default elsewhere


def test_mae_picks_a_vit_unless_told_otherwise():
    assert compose_cfg(["algo=mae"]).backbone._target_.endswith("VisionTransformer")
    cfg = compose_cfg(["algo=mae", "backbone=resnet18"])
    with pytest.raises(ConfigError, match="MAE needs a ViT backbone"):
        _instantiate(cfg)


# ---------------------------------------------------------------- typed schemas


@pytest.mark.parametrize(
    "override, match",
    [
        ("schedule.lrr=0.1", "lrr"),
        ("algo.model.temprature=0.2", "temprature"),
        ("schedule.epochs=ten", "epochs"),
        ("precision=fp8", "fp8"),
        ("algo.optimizer.name=adam", "adam"),
        ("backbone.stem=tiny", "tiny"),
        ("dataset.on_bad_image=ignore", "ignore"),
        ("algo=byol", "algo/byol"),
        ("backbone=resnet34", "backbone/resnet34"),
    ],
)
def test_typed_config_rejects_bad_values(override, match):
    extra = ["dataset=imagefolder", "dataset.root=/x"] if override.startswith("dataset.") else []
    with pytest.raises((HydraException, ConfigCompositionException, OmegaConfBaseException), match=match):
        compose_cfg(extra + [override])
