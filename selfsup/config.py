"""Configs: where they live, their typed schemas, and the one compose function.

The YAML tree is ``conf/`` at the top of the checkout, shipped in the wheel as ``selfsup/conf``
(``CONFIG_DIR``), so ``python -m selfsup.train`` and ``selfsup-train`` work from any directory once
selfsup is installed. Users add their own ``experiment/``, ``dataset/``, ``algo/`` ... files in a
folder of their own, passed with ``--config-dir DIR`` (command line) or ``config_dirs=[DIR]``
(:func:`compose`); both put it on Hydra's search path.

**One home per hyper-parameter.** The constructor of an algorithm, backbone or dataset is the source
of truth for its defaults: :func:`schema_of` turns the signature into a typed dataclass, registered in
Hydra's ConfigStore as ``schema/<group>/<name>`` for every ``conf/<group>/<name>.yaml`` (found by
reading the file's ``_target_``). Each YAML extends its schema (``defaults: [/schema/<group>/<name>@_here_]``)
and states only what differs, so a misspelt key (``algo.model.temprature=0.2``), a value of the wrong
type (``schedule.epochs=ten``) or an unknown option (``backbone.stem=tiny``: ``Literal[...]``
annotations become enums) fails while Hydra composes, before anything is built. Adding an algorithm
is its module plus ``conf/algo/<name>.yaml``: nothing to register by hand.

The other groups' schemas are owned by the code that reads them (``ScheduleConfig`` in
``engine/schedules.py``, ``OptimizerConfig`` in ``engine/optim.py``, ``ViewConfig`` in
``data/views.py``, ...) and assembled here into :class:`TrainConfig`; the trainer reads the composed
config as these typed objects (:func:`typed`). Layout of a composed run config::

    algo:      model (``_target_`` = the algorithm class + its hyper-parameters),
               views (the augmentation pipelines), optimizer (type, lr for ``base_batch_size``)
    backbone:  ``_target_`` = a ResNet or ViT class and its shape
    dataset:   ``_target_`` = a dataset class, resolution, normalisation, held-out split
    schedule:  epochs, per-device batch, accumulation, LR policy (warm-up, cosine / step), LR scaling
    launcher:  how processes are started: local | torchrun | slurm | submitit_local (``launch/config.py``)
    (top level) device, precision, seed, resume, checkpoint, logging, kNN monitor, ...
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, make_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict, read_write

from selfsup.data.datasets import BackboneHints, Cache, check_image_size
from selfsup.data.loader import DataConfig, LoaderConfig
from selfsup.data.views import ViewConfig
from selfsup.distributed import DistConfig
from selfsup.engine.checkpoint import CheckpointConfig
from selfsup.engine.logger import LogConfig
from selfsup.engine.optim import OptimizerConfig
from selfsup.engine.run_dir import member_dir, run_id
from selfsup.engine.schedules import ScheduleConfig
from selfsup.errors import ConfigError
from selfsup.eval.knn import KNNConfig
from selfsup.launch.config import LauncherConfig, SlurmConfig, SubmititConfig, TorchrunConfig

T = TypeVar("T")
CONFIG_DIR = Path(__file__).resolve().parent / "conf"
CONFIG_NAME = "train"


# --------------------------------------------------------------------------------------------
# schemas generated from constructor signatures

_ENUMS: dict[tuple[str, ...], type[Enum]] = {}


def _literal_enum(values: tuple[Any, ...], name: str) -> type[Enum]:
    """One ``str`` enum per set of ``Literal`` values (OmegaConf rejects other values, listing these)."""
    key = tuple(str(v) for v in values)
    if key not in _ENUMS:
        _ENUMS[key] = Enum(name, [(v, v) for v in key], type=str)  # type: ignore[assignment]
    return _ENUMS[key]


def _field_type(annotation: Any, name: str) -> Any:
    """An annotation OmegaConf can validate: primitives, Optional, List/Dict of them, dataclasses,
    enums; ``Literal[...]`` becomes an enum; anything else (modules, tensors, callables) is ``Any``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in (int, float, str, bool) or annotation is Any:
        return annotation
    if inspect.isclass(annotation) and (dataclasses.is_dataclass(annotation) or issubclass(annotation, Enum)):
        return annotation
    if origin is Literal:
        return _literal_enum(args, name)
    if origin is Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return Optional[_field_type(inner[0], name)]  # noqa: UP045 - OmegaConf wants typing.Optional
        return Any
    if origin in (list, tuple, Sequence, typing.Sequence):
        elem = _field_type(args[0], name) if args else Any
        return list[elem] if elem in (int, float, str, bool) or dataclasses.is_dataclass(elem) else list[Any]  # type: ignore[valid-type]
    if origin in (dict, Mapping, typing.Mapping):
        value = _field_type(args[1], name) if len(args) == 2 else Any
        return dict[str, value]  # type: ignore[valid-type]
    return Any


def _field_default(value: Any) -> Any:
    if value is inspect.Parameter.empty:
        return field(default=MISSING)
    if isinstance(value, (list, tuple, dict)) or dataclasses.is_dataclass(value):
        snapshot: Any = list(value) if isinstance(value, tuple) else value
        return field(default_factory=lambda: copy.deepcopy(snapshot))
    return field(default=value)


def schema_of(
    target: Callable[..., Any],
    exclude: Sequence[str] = (),
    extra: Sequence[tuple[str, Any, Any]] = (),
    name: str | None = None,
) -> type:
    """A typed dataclass with ``_target_`` and one field per constructor argument of ``target``
    (default = the constructor's default; no default = required, ``???``), minus ``exclude`` (the
    arguments the trainer passes itself, e.g. ``backbone``), plus ``extra`` fields.

    A dataclass-typed argument (e.g. ``ScalarSchedule``) gets a nested schema with its own
    ``_target_``, so Hydra builds the object before calling ``target``.
    """
    init = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(init)
    except Exception as e:  # an annotation that cannot be evaluated is a bug in that module
        raise TypeError(f"cannot read the type hints of {target}: {e}") from e
    path = f"{target.__module__}.{target.__qualname__}"
    fields: list[tuple[str, Any, Any]] = [("_target_", str, field(default=path))]
    for pname, param in inspect.signature(init).parameters.items():
        if pname == "self" or pname in exclude or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        ftype = _field_type(hints.get(pname, Any), f"{target.__name__}_{pname}")
        default = param.default
        if inspect.isclass(ftype) and dataclasses.is_dataclass(ftype) and not hasattr(ftype, "_target_"):
            nested = schema_of(ftype, name=f"{ftype.__name__}Schema")
            value = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else {}  # type: ignore[arg-type]
            fields.append((pname, nested, field(default_factory=functools.partial(nested, **value))))
            continue
        fields.append((pname, ftype, _field_default(default)))
    fields.extend(extra)
    return make_dataclass(name or f"{target.__name__}Schema", fields)


# --------------------------------------------------------------------------------------------
# the groups


@dataclass
class AlgoConfig:
    model: Any = MISSING  # the algorithm: _target_ + constructor arguments (generated schema)
    views: list[ViewConfig] = MISSING
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)


class Precision(str, Enum):
    auto = "auto"  # bf16 autocast on CUDA, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"  # autocast + dynamic loss scaling (CUDA only)


@dataclass
class TrainConfig:
    algo: AlgoConfig = MISSING
    backbone: Any = MISSING  # _target_ + constructor arguments (generated schema)
    dataset: Any = MISSING  # _target_ + constructor arguments + hints (generated schema)
    schedule: ScheduleConfig = MISSING
    launcher: LauncherConfig = MISSING
    seed: int = 0
    deterministic: bool = False  # deterministic kernels (bit-for-bit repeatable runs)
    device: str = "auto"  # auto | cpu | cuda | cuda:N   (CUDA_VISIBLE_DEVICES=-1 also forces the CPU)
    precision: Precision = Precision.auto
    channels_last: bool | None = None  # None = on for conv nets
    compile: bool = False  # torch.compile the algorithm's compile_targets() in place
    # torch.compile's mode: default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    compile_mode: str = "default"
    sync_bn: bool = False  # synchronised BatchNorm when there are several processes
    fused_optimizer: bool | None = None  # None = fused SGD/AdamW on CUDA
    resume: str | None = None  # PATH to a checkpoint, or "auto" (last.pt in the run dir)
    # resume although the optimisation, model or data settings differ from the checkpoint's (listed)
    resume_force: bool = False
    # start over in a run dir that already holds a run: its checkpoints and logs are deleted first
    overwrite: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    knn: KNNConfig = field(default_factory=KNNConfig)
    dist: DistConfig = field(default_factory=DistConfig)


# group -> (sub-node that holds the _target_, constructor arguments the trainer passes itself, extra fields)
_GENERATED: dict[str, tuple[str | None, tuple[str, ...], tuple[tuple[str, Any, Any], ...]]] = {
    "algo": ("model", ("backbone",), ()),
    "backbone": (None, (), ()),
    "dataset": (
        None,
        ("split",),
        (("hints", BackboneHints, field(default_factory=BackboneHints)), ("cache", Cache, field(default=Cache.auto))),
    ),
    "bench": (None, (), ()),  # the benchmarks of python -m selfsup.benchmark (conf/bench/)
}


def target_of(yaml_file: Path, sub: str | None) -> str:
    """The ``_target_`` a group file names (``model._target_`` for algorithms)."""
    raw = OmegaConf.load(yaml_file)
    node = raw.get(sub) if sub and isinstance(raw, DictConfig) else raw
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not target:
        where = f"{sub}._target_" if sub else "_target_"
        raise ConfigError(f"{yaml_file} names no {where}: add the class it configures, e.g. {where}: pkg.module.Class")
    return str(target)


@functools.cache
def group_schema(group: str, target: str) -> type:
    """The typed schema of ``target`` in ``group`` (algo: wrapped in an :class:`AlgoConfig`); one class
    per (group, target), so configs composed twice compare equal."""
    from hydra.utils import get_class

    sub, exclude, extra = _GENERATED[group]
    cls = get_class(target)
    schema = schema_of(cls, exclude=exclude, extra=extra)
    if group == "algo":
        return make_dataclass(
            f"{cls.__name__}AlgoConfig", [("model", schema, field(default_factory=schema))], bases=(AlgoConfig,)
        )
    return schema


def register_schemas(config_dir: Path = CONFIG_DIR) -> None:
    """Store ``schema`` (the :class:`TrainConfig`), ``schema/<group>/<name>`` for every YAML file of the
    generated groups, and the hand-written schemas of ``schedule`` and ``launcher``."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=TrainConfig)
    for group, (sub, _, _) in _GENERATED.items():
        for yaml_file in sorted((config_dir / group).glob("*.yaml")):
            cs.store(group=f"schema/{group}", name=yaml_file.stem, node=group_schema(group, target_of(yaml_file, sub)))
    cs.store(group="schema/schedule", name="base", node=ScheduleConfig)
    cs.store(group="schema/launcher", name="local", node=LauncherConfig)
    cs.store(group="schema/launcher", name="torchrun", node=TorchrunConfig)
    cs.store(group="schema/launcher", name="slurm", node=SlurmConfig)
    cs.store(group="schema/launcher", name="submitit_local", node=SubmititConfig)
    # the Hydra launchers behind launcher=slurm / submitit_local (hydra_plugins.selfsup_launcher); every
    # job setting is read from the typed ``launcher`` node
    for name, cls in (("selfsup_slurm", "SelfsupSlurmLauncher"), ("selfsup_submitit_local", "SelfsupLocalLauncher")):
        node = {
            "_target_": f"hydra_plugins.selfsup_launcher.{cls}",
            "submitit_folder": "${hydra.sweep.dir}/.submitit/%j",
        }
        cs.store(group="hydra/launcher", name=name, node=node, provider="selfsup")


register_schemas()
# ${run_id:}: the start time plus 6 random hex digits (selfsup.engine.run_dir); cached in the config, so a
# SLURM job composing its sweep config from the submitter's gets the submitter's value (Hydra copies the cache)
OmegaConf.register_new_resolver("run_id", run_id, replace=True, use_cache=True)
OmegaConf.register_new_resolver("member_dir", member_dir, replace=True)


# --------------------------------------------------------------------------------------------
# composing and reading


def compose(
    overrides: Sequence[str] = (),
    config_dirs: Sequence[str | Path] = (),
    return_hydra_config: bool = False,
    config_name: str = CONFIG_NAME,
) -> DictConfig:
    """The config ``python -m selfsup.train [--config-dir DIR] <overrides>`` gets (tools and tests use
    this; the command line uses the same ``CONFIG_DIR``/``CONFIG_NAME`` through ``@hydra.main``).
    ``config_name`` picks another primary config of ``conf/``: ``benchmark``, ``tsne``, ``mae_vis``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    extra = []
    if config_dirs:
        paths = ",".join(f"file://{Path(d).expanduser().resolve()}" for d in config_dirs)
        extra.append(f"hydra.searchpath=[{paths}]")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="selfsup"):
            return hydra_compose(config_name, overrides=[*extra, *overrides], return_hydra_config=return_hydra_config)
    finally:
        GlobalHydra.instance().clear()


def compose_tool(config_name: str, schema: type[T], overrides: Sequence[str] = ()) -> T:
    """A tool's config (``conf/<config_name>.yaml`` over its typed ``schema``, stored in the ConfigStore
    as ``<config_name>_schema``) composed with ``overrides`` and turned into ``schema``'s dataclass.
    Tools compose with the same Hydra machinery as training, so ``dataset=cifar10 dataset.root=...``
    and ``backbone=resnet50`` pick the same group files."""
    from omegaconf.errors import InterpolationResolutionError

    ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)
    cfg = compose(overrides, config_name=config_name)
    try:
        OmegaConf.resolve(cfg)
    except InterpolationResolutionError as e:
        if cfg.get("backbone") is not None and cfg.get("dataset") is None and "dataset" in str(e):
            raise ConfigError(
                "the backbone options follow the dataset's (image size, stem, patch size): with backbone=... "
                "also choose the dataset, e.g. dataset=digits or dataset=cifar10 dataset.root=<folder>"
            ) from None
        raise
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, schema)
    return obj


def typed(cfg: DictConfig | TrainConfig) -> TrainConfig:
    """The composed config as typed objects (interpolations resolved; a missing value is an error
    naming the key)."""
    if isinstance(cfg, TrainConfig):
        return cfg
    cfg = copy.deepcopy(cfg)
    OmegaConf.resolve(cfg)
    if "hydra" in cfg:
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]
    image_size = cfg.dataset.get("image_size") if isinstance(cfg.get("dataset"), DictConfig) else None
    if isinstance(image_size, int):
        check_image_size(image_size)  # named as typed, before the views that take it as their size
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, TrainConfig)
    return obj


def to_plain(node: Any) -> Any:
    """A typed config node (dataclass) or DictConfig as plain containers, enums as their values: what
    ``hydra.utils.instantiate`` and ``yaml`` dumps get."""
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        node = OmegaConf.structured(node)
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True, enum_to_str=True, throw_on_missing=True)
    return node


__all__ = [
    "CONFIG_DIR",
    "CONFIG_NAME",
    "AlgoConfig",
    "LauncherConfig",
    "Precision",
    "TrainConfig",
    "compose",
    "compose_tool",
    "group_schema",
    "register_schemas",
    "schema_of",
    "target_of",
    "to_plain",
    "typed",
]
