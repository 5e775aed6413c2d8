"""Every option of every config group and every experiment overlay composes and instantiates;
typed schemas (generated from the constructors) reject misspelt keys, wrong types and unknown options
while composing; no config file restates a value it inherits."""

from __future__ import annotations

import inspect
import math
from typing import NamedTuple

import pytest
import torch
from hydra.errors import ConfigCompositionException, HydraException
from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from conftest import ALGOS, CONF, TINY, VIT_ALGOS, compose_cfg, run_training
from selfsup.algorithms.base import Algorithm
from selfsup.config import compose, group_schema, target_of, typed
from selfsup.data.views import count_views
from selfsup.engine.build import build, build_backbone, build_dataset
from selfsup.errors import ConfigError

GROUPS = ["algo", "backbone", "dataset", "schedule", "launcher"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_algorithm_has_a_tiny_test_setting():
    assert ALGOS and set(TINY) == set(ALGOS), "add the new algorithm's small settings to TINY in tests/conftest.py"


@pytest.mark.parametrize("group", ["algo", "backbone", "dataset", "schedule", "launcher", "bench"])
def test_every_group_file_extends_its_schema(group):
    """conf/<group>/<name>.yaml starts from /schema/<group>/<name> (generated from its _target_'s
    constructor, or the launcher's own dataclass) or, for the schedules, /schema/schedule/base. Launchers
    that set Hydra's own launcher live in the global package and place their schema at ``launcher``."""
    for name in options(group):
        raw = OmegaConf.load(CONF / group / f"{name}.yaml")
        own = f"/schema/{group}/{name}@_here_" if group != "schedule" else f"/schema/{group}/base@_here_"
        allowed = {own, f"/schema/{group}/{name}@{group}"} if group == "launcher" else {own}
        assert raw.defaults[0] in allowed, f"conf/{group}/{name}.yaml must start with '- {own}'"


def test_every_group_has_its_options():
    assert options("algo") == ALGOS
    assert options("backbone") == ["resnet18", "resnet50", "vit_base", "vit_small", "vit_tiny"]
    assert options("dataset") == ["cifar10", "digits", "fake", "imagefolder"]
    assert options("schedule") == ["cosine", "cpu", "step"]
    assert options("launcher") == ["local", "slurm", "submitit_local", "torchrun"]
    assert options("experiment") == sorted(EXPECTED), "add the overlay's recipe to EXPECTED"


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
    assert cfg.schedule.epochs == 9 and cfg.launcher.name == "local"
    assert cfg.device == "auto" and cfg.resume is None and cfg.deterministic is False


def _instantiate(cfg):
    c = typed(cfg)
    backbone = build_backbone(c.backbone)
    algo = build(c.algo.model, backbone=backbone)
    assert isinstance(algo, Algorithm)
    return backbone, algo


@pytest.mark.parametrize("algo", ALGOS)
def test_every_algo_instantiates(algo):
    backbone_opt = "vit_tiny" if algo in VIT_ALGOS else "resnet18"
    cfg = compose_cfg([f"algo={algo}", f"backbone={backbone_opt}", "dataset=fake"])
    _, model = _instantiate(cfg)
    assert type(model).__name__ == cfg.algo.model._target_.rsplit(".", 1)[1]
    assert model.num_views == count_views(typed(cfg).algo.views)  # copies x rotations / grid patches


@pytest.mark.parametrize("algo", ALGOS)
def test_algorithm_defaults_come_from_the_constructor(algo):
    """The composed config holds the constructor's default for every argument that no config file sets."""
    cfg = compose_cfg([f"algo={algo}", "dataset=fake"])
    cls = get_class(cfg.algo.model._target_)
    raw_model = OmegaConf.load(CONF / "algo" / f"{algo}.yaml").get("model", {})
    checked = 0
    for name, param in inspect.signature(cls).parameters.items():
        if name == "backbone" or name in raw_model or param.default is inspect.Parameter.empty:
            continue
        value = OmegaConf.to_container(cfg.algo.model, resolve=True, enum_to_str=True)[name]
        default = param.default
        if hasattr(default, "__dataclass_fields__"):
            default = {k: getattr(default, k) for k in default.__dataclass_fields__}
            value = {k: v for k, v in value.items() if k != "_target_"}
        assert value == default or value == list(default) if isinstance(default, tuple) else value == default, name
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("backbone", options("backbone"))
def test_every_backbone_instantiates_and_runs(backbone):
    cfg = compose_cfg([f"backbone={backbone}", "dataset=fake", "dataset.image_size=32"])
    net = build_backbone(typed(cfg).backbone)
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
    if dataset == "cifar10":  # no CIFAR-10 pickles here: the error must say what to do
        overrides.append(f"dataset.root={cifar_folder}")
    c = typed(compose_cfg(overrides))
    if dataset == "cifar10":
        with pytest.raises(Exception, match="dataset.download=true"):
            build_dataset(c.dataset, "train")
        return
    ds = build_dataset(c.dataset, "train")
    image, label, index = ds[0]
    assert image.dtype == torch.uint8 and image.shape[0] == 3 and index == 0


def test_required_roots_are_missing_until_given():
    cfg = compose_cfg(["dataset=imagefolder"])
    with pytest.raises(OmegaConfBaseException, match="dataset.root"):
        typed(cfg)


SCHEDULES = {  # (policy, epochs, warm-up epochs)
    "cosine": ("cosine", 200, 10),
    "cpu": ("cosine", 9, 1),
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


class Recipe(NamedTuple):
    """What an MMSelfSup overlay must reproduce (its config file and name)."""

    target: str  # the algorithm class
    arch: str | None  # the ResNet, None for a ViT
    lr: float
    base_batch: int
    batch: int  # per GPU
    epochs: int
    policy: str
    optim: str
    effective_lr: float  # lr x (GPUs x batch) / base_batch


# fmt: off
EXPECTED = {
    "byol_resnet50_16xb256-coslr-200e_in1k":
        Recipe("BYOL", "resnet50", 4.8, 4096, 256, 200, "cosine", "lars", 4.8),
    "odc_resnet50_8xb64-steplr-440e_in1k":
        Recipe("ODC", "resnet50", 0.06, 512, 64, 440, "step", "sgd", 0.06),
    "mae_vit-base-p16_8xb512-coslr-400e_in1k":
        Recipe("MAE", None, 0.00015, 256, 512, 400, "cosine", "adamw", 0.0024),
    "simclr_resnet50_8xb32-coslr-200e_in1k":
        Recipe("SimCLR", "resnet50", 0.3, 256, 32, 200, "cosine", "lars", 0.3),
    "barlowtwins_resnet50_8xb256-coslr-300e_in1k":
        Recipe("BarlowTwins", "resnet50", 0.2, 256, 256, 300, "cosine", "lars", 1.6),
    "deepcluster-sobel_resnet50_8xb64-steplr-200e_in1k":
        Recipe("DeepCluster", "resnet50", 0.1, 512, 64, 200, "step", "sgd", 0.1),
    "densecl_resnet50_8xb32-coslr-200e_in1k":
        Recipe("DenseCL", "resnet50", 0.03, 256, 32, 200, "cosine", "sgd", 0.03),
    "dino_vit-base-p16_8xb64-amp-coslr-100e_in1k":
        Recipe("DINO", None, 0.0024, 512, 64, 100, "cosine", "adamw", 0.0024),
    "mocov1_resnet50_8xb32-steplr-200e_in1k":
        Recipe("MoCo", "resnet50", 0.03, 256, 32, 200, "step", "sgd", 0.03),
    "mocov2_resnet50_8xb32-coslr-200e_in1k":
        Recipe("MoCo", "resnet50", 0.03, 256, 32, 200, "cosine", "sgd", 0.03),
    "mocov3_resnet50_8xb512-amp-coslr-100e_in1k":
        Recipe("MoCoV3", "resnet50", 9.6, 4096, 512, 100, "cosine", "lars", 9.6),
    "mocov3_vit-small-p16_16xb256-amp-coslr-300e_in1k":
        Recipe("MoCoV3", None, 0.0024, 4096, 256, 300, "cosine", "adamw", 0.0024),
    "npid_resnet50_8xb32-steplr-200e_in1k":
        Recipe("NPID", "resnet50", 0.03, 256, 32, 200, "step", "sgd", 0.03),
    "relative-loc_resnet50_8xb64-steplr-70e_in1k":
        Recipe("RelativeLoc", "resnet50", 0.2, 512, 64, 70, "step", "sgd", 0.2),
    "rotation-pred_resnet50_8xb16-steplr-70e_in1k":
        Recipe("RotationPred", "resnet50", 0.2, 128, 16, 70, "step", "sgd", 0.2),
    "simsiam_resnet50_8xb32-coslr-100e_in1k":
        Recipe("SimSiam", "resnet50", 0.05, 256, 32, 100, "cosine", "sgd", 0.05),
    "simsiam_resnet50_8xb32-coslr-200e_in1k":
        Recipe("SimSiam", "resnet50", 0.05, 256, 32, 200, "cosine", "sgd", 0.05),
    "swav_resnet50_8xb32-mcrop-2-6-coslr-200e_in1k-224-96":
        Recipe("SwAV", "resnet50", 0.6, 256, 32, 200, "cosine", "lars", 0.6),
    "vicreg_resnet50_8xb256-coslr-1000e_in1k":
        Recipe("VICReg", "resnet50", 0.2, 256, 256, 1000, "cosine", "lars", 1.6),
}
# fmt: on


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_experiment_overlay_reproduces_the_recipe(name):
    e = EXPECTED[name]
    cfg = compose_cfg([f"experiment={name}", "dataset.root=/data/in1k"])
    assert cfg.algo.model._target_.endswith(e.target)
    assert cfg.algo.optimizer.name == e.optim and cfg.algo.optimizer.lr == pytest.approx(e.lr)
    assert cfg.algo.optimizer.base_batch_size == e.base_batch
    assert (cfg.schedule.batch_size, cfg.schedule.epochs, cfg.schedule.policy) == (e.batch, e.epochs, e.policy)
    assert cfg.dataset.image_size == 224 and cfg.dataset.root == "/data/in1k"
    if e.arch:
        assert cfg.backbone.arch == e.arch and cfg.backbone.stem == "imagenet"
    # GPUs x per-GPU batch (from the name), linearly scaled: the effective lr of the recipe
    from selfsup.engine.optim import scaled_lr

    gpus = int(name.split("_")[2].split("xb")[0])
    lr = scaled_lr(cfg.algo.optimizer.lr, gpus * e.batch, cfg.algo.optimizer.base_batch_size)
    assert lr == pytest.approx(e.effective_lr)


def test_overlay_details():
    mae = compose_cfg(["experiment=mae_vit-base-p16_8xb512-coslr-400e_in1k", "dataset.root=/x"])
    assert (mae.backbone.embed_dim, mae.backbone.depth, mae.backbone.patch_size) == (768, 12, 16)
    assert (mae.algo.model.decoder_dim, mae.algo.model.decoder_depth, mae.algo.model.mask_ratio) == (512, 8, 0.75)
    assert mae.schedule.warmup_epochs == 40 and list(mae.algo.optimizer.betas) == [0.9, 0.95]
    odc = compose_cfg(["experiment=odc_resnet50_8xb64-steplr-440e_in1k", "dataset.root=/x"])
    assert (odc.algo.model.num_clusters, odc.algo.model.min_cluster) == (10000, 20)
    assert odc.algo.optimizer.paramwise.head.momentum == 0.0 and odc.sync_bn
    byol = compose_cfg(["experiment=byol_resnet50_16xb256-coslr-200e_in1k", "dataset.root=/x"])
    assert byol.algo.model.momentum.start == 0.99 and byol.algo.model.momentum.end == 1.0 and byol.sync_bn
    assert (byol.algo.model.hidden_dim, byol.algo.model.out_dim) == (4096, 256) and byol.checkpoint.keep == 3
    assert [v.blur for v in byol.algo.views] == [1.0, 0.1] and [v.solarize for v in byol.algo.views] == [0.0, 0.2]
    assert byol.schedule.warmup_epochs == 10 and byol.schedule.warmup_start_factor == 1e-4
    assert compose_cfg(["algo=byol"]).algo.model.momentum.start == 0.996  # the paper's, without the recipe
    simclr = compose_cfg(["experiment=simclr_resnet50_8xb32-coslr-200e_in1k", "dataset.root=/x"])
    assert simclr.backbone.zero_init_residual and simclr.sync_bn and simclr.algo.views[0].copies == 2
    assert simclr.schedule.warmup_epochs == 10 and simclr.algo.model.temperature == 0.1


# per overlay, beyond small_size: what makes one step on 8 images possible (clusters <= images, fewer negatives)
SHRINK: dict[str, list[str]] = {
    "odc_resnet50_8xb64-steplr-440e_in1k": ["algo.model.num_clusters=2", "algo.model.min_cluster=1"],
    "deepcluster-sobel_resnet50_8xb64-steplr-200e_in1k": ["algo.model.num_clusters=2"],
    "npid_resnet50_8xb32-steplr-200e_in1k": ["algo.model.num_negatives=64"],
}


def small_size(cfg) -> list[str]:
    """What every recipe needs for one step on a few 64 px images in seconds: no lr steps (their epochs lie
    beyond 1), 32 px crops where a view has its own larger size (multi-crop's 96 px), the recipes' ImageNet
    stem for ResNets (the fake data's hint is CIFAR's 3x3 stem: ResNet-50 at full resolution, 20 s a step),
    heads of at most 512 (Barlow Twins' and VICReg's 8192 x 8192, DINO's 65,536 outputs: minutes and GiBs on
    a CPU), ViTs of 2 blocks with ImageNet's 16 px patches."""
    out = ["schedule.milestones=[]"] if cfg.schedule.get("milestones") else []
    views = enumerate(cfg.algo.views)
    out += [f"algo.views.{i}.size=32" for i, v in views if isinstance(v.size, int) and v.size > 64 and not v.grid.cells]
    out += ["backbone.stem=imagenet"] if "stem" in cfg.backbone else []
    out += [f"algo.model.{k}=512" for k in ("hidden_dim", "out_dim") if cfg.algo.model.get(k, 0) > 2048]
    vit = cfg.backbone.get("depth", 0) > 2  # 2 blocks (a ViT-B checkpoint: ~1 GiB), 16 px patches (fake: 4 px)
    out += ["backbone.depth=2", "backbone.patch_size=16"] if vit else []
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", options("experiment"))
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
    result = run_training(overrides + SHRINK.get(name, []) + small_size(compose_cfg(overrides)), tmp_path)
    assert result.steps == 2 and math.isfinite(result.final_loss) and result.last_checkpoint.is_file()
    ckpt = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["meta"]["algo"] == EXPECTED[name].target
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
        ("backbone.stem=tiny", "Invalid value 'tiny', expected one of [imagenet, cifar]"),
        ("dataset.on_bad_image=ignore", "Invalid value 'ignore', expected one of [skip, error]"),
        ("algo=foo", "algo/foo"),
        ("backbone=resnet34", "backbone/resnet34"),
    ],
)
def test_typed_config_rejects_bad_values(override, match):
    extra = ["dataset=imagefolder", "dataset.root=/x"] if override.startswith("dataset.") else []
    with pytest.raises((HydraException, ConfigCompositionException, OmegaConfBaseException)) as e:
        compose_cfg(extra + [override])
    assert match in str(e.value) + " " + str(e.value.__cause__)


def test_vit_only_option_rejected_on_a_resnet():
    with pytest.raises((HydraException, ConfigCompositionException), match="Could not override 'backbone.global_pool'"):
        compose_cfg(["backbone=resnet18", "backbone.global_pool=avg"])
    assert compose_cfg(["backbone=vit_tiny", "backbone.global_pool=avg"]).backbone.global_pool == "avg"


# ---------------------------------------------------------------- one home per hyper-parameter
# A config file holds only what differs from what it inherits: a group file from its schema (the
# constructor's defaults), a specialisation from the config without it, an experiment from its groups.


def _leaves(node, prefix=""):
    """(dotted key, value) of every value a raw YAML sets; lists are leaves."""
    if isinstance(node, DictConfig):
        for key in node:
            if key in ("defaults", "hydra"):
                continue
            yield from _leaves(node._get_node(key), f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


def _value(node):
    return OmegaConf.to_container(node, resolve=False) if isinstance(node, (DictConfig, ListConfig)) else node._value()


def _restated(raw: DictConfig, base: DictConfig, prefix: str = "") -> list[str]:
    """Keys of ``raw`` whose value equals ``base``'s at the same key (list entries are compared with
    their element schema's defaults, since a list replaces the inherited list)."""
    found = []
    for key, node in _leaves(raw):
        if key.endswith("_target_"):
            continue  # names the class the schema is generated from
        try:
            inherited = OmegaConf.select(base, key, throw_on_resolution_failure=False, default="<absent>")
        except OmegaConfBaseException:  # e.g. a required (???) value
            inherited = "<absent>"
        value = _value(node)
        if isinstance(inherited, (DictConfig, ListConfig)):
            inherited = OmegaConf.to_container(inherited, resolve=False)
        if isinstance(value, list) and value and isinstance(value[0], dict):
            node_ = base
            for part in key.split("."):
                node_ = node_._get_node(part)
            element = node_._metadata.element_type
            defaults = OmegaConf.structured(element)
            for i, item in enumerate(value):
                found += [f"{prefix}{key}[{i}].{k}" for k, v in item.items() if k in defaults and defaults[k] == v]
            if value == inherited:
                found.append(prefix + key)
        elif value == inherited and not (isinstance(value, str) and value.startswith("${") and False):
            found.append(prefix + key)
    return found


@pytest.mark.parametrize("group", ["algo", "backbone", "dataset", "schedule", "launcher", "bench"])
def test_group_files_state_only_what_differs_from_the_schema(group):
    from hydra.core.config_store import ConfigStore

    for name in options(group):
        raw = OmegaConf.load(CONF / group / f"{name}.yaml")
        if group in ("algo", "backbone", "dataset", "bench"):
            sub = "model" if group == "algo" else None
            schema = OmegaConf.structured(group_schema(group, target_of(CONF / group / f"{name}.yaml", sub)))
        elif group == "launcher":
            schema = ConfigStore.instance().load(f"schema/{group}/{name}.yaml").node
            raw = raw.get("launcher", raw) if str(raw.defaults[0]).endswith("@launcher") else raw
        else:
            schema = ConfigStore.instance().load(f"schema/{group}/base.yaml").node
        assert not _restated(raw, schema), f"conf/{group}/{name}.yaml restates its schema's defaults"


def test_train_yaml_states_only_what_differs_from_the_schema():
    from selfsup.config import TrainConfig

    raw = OmegaConf.load(CONF / "train.yaml")
    assert not _restated(raw, OmegaConf.structured(TrainConfig))


@pytest.mark.parametrize("name", options("algo_dataset"))
def test_specialisations_state_only_what_differs(name):
    algo, dataset = name.split("_", 1)
    raw = OmegaConf.load(CONF / "algo_dataset" / f"{name}.yaml")
    without = compose([f"algo={algo}", f"dataset={dataset}", "~algo_dataset"])
    assert not _restated(raw, without), f"conf/algo_dataset/{name}.yaml restates inherited values"


@pytest.mark.parametrize("name", options("experiment"))
def test_experiments_state_only_what_differs(name):
    raw = OmegaConf.load(CONF / "experiment" / f"{name}.yaml")
    groups = [
        f"{d.split(':')[0].replace('override /', '').strip()}={d.split(':')[1].strip()}"
        for d in (
            next(iter(e.keys())) + ":" + next(iter(e.values())) if isinstance(e, DictConfig) else e
            for e in raw.defaults
        )
    ]
    without = compose(groups + ["dataset.root=/x"])
    restated = _restated(raw, without)
    assert not restated, f"conf/experiment/{name}.yaml restates {restated}"


def test_the_restatement_check_can_fail(tmp_path):
    """Planted: an experiment that restates a value its groups already give."""
    exp = tmp_path / "experiment"
    exp.mkdir()
    (exp / "restating.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /algo: simclr\n  - override /schedule: cosine\n"
        "schedule:\n  epochs: 200\n  batch_size: 999\nalgo:\n  views:\n    - size: 32\n      hflip: 0.5\n"
    )
    raw = OmegaConf.load(exp / "restating.yaml")
    without = compose(["algo=simclr", "schedule=cosine"])
    assert _restated(raw, without) == ["schedule.epochs", "algo.views[0].hflip"]
