"""Shared test helpers: compose configs like the CLI does, run short trainings, real images."""

from __future__ import annotations

import json
import os
import tarfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import DictConfig

from selfsup.config import CONFIG_DIR, compose

REPO = Path(__file__).resolve().parents[1]
CONF = CONFIG_DIR
# the CIFAR-10 training JPEGs (cifar10/train/<class>/*.jpg in a .tar.gz): SELFSUP_CIFAR_TAR, or the
# project's shared data next to the checkout
CIFAR_TAR = Path(os.environ.get("SELFSUP_CIFAR_TAR", REPO.parent / "shared" / "data" / "cifar10-train.tar.gz"))

# fast, CPU-only settings every test run starts from (tests add their own overrides after these)
FAST = [
    "device=cpu",
    "loader.num_workers=0",
    "log.tensorboard=false",
    "log.progress=false",
    "knn.batch_size=128",
]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test``: ``-n auto --dist loadfile``) each worker gets its share of the cores
    for torch's threads, so that the workers do not oversubscribe them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are skipped where torch sees no CUDA GPU (CI; the GPU check script runs them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (selfsup/tools/gpu_check.sh runs these on one)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:  # the marker, not a parameter id such as "cuda"
            item.add_marker(skip)


def compose_cfg(overrides: list[str] | None = None, fast: bool = True, **kwargs) -> DictConfig:
    """The config ``python -m selfsup.train <overrides>`` would get (plus the FAST settings)."""
    return compose((FAST if fast else []) + list(overrides or []), **kwargs)


# every algorithm: discovered from conf/algo/, not listed by hand
ALGOS = sorted(p.stem for p in (CONF / "algo").glob("*.yaml"))

# per algorithm: the overrides that make it seconds-long on a CPU (small heads / decoder); every
# algorithm in conf/algo/ needs an entry (tests/test_config.py checks)
TINY: dict[str, list[str]] = {
    "simclr": ["algo.model.hidden_dim=64", "algo.model.out_dim=32"],
    "byol": ["algo.model.hidden_dim=64", "algo.model.out_dim=32"],
    "odc": [
        "algo.model.num_clusters=4",
        "algo.model.min_cluster=2",
        "algo.model.hidden_dim=64",
        "algo.model.feat_dim=32",
    ],
    "mae": [
        "algo.model.decoder_dim=32",
        "algo.model.decoder_depth=1",
        "algo.model.decoder_heads=2",
        "backbone.embed_dim=32",
        "backbone.depth=2",
        "backbone.num_heads=2",
        "backbone.patch_size=8",
    ],
    # issue 10's zoo: each helper owns its own line(s) below
    "relative-loc": ["algo.model.hidden_dim=64", "algo.views.0.size=36", "algo.views.0.grid.patch_size=10"],
    "rotation-pred": [],
    "deepcluster": ["algo.model.num_clusters=4", "algo.model.pca_dim=8"],
    "npid": ["algo.model.feat_dim=16", "algo.model.num_negatives=32", "algo.model.temperature=0.5"],
    "mocov1": ["algo.model.out_dim=32", "algo.model.queue_size=64"],
    "mocov2": ["algo.model.hidden_dim=64", "algo.model.out_dim=32", "algo.model.queue_size=64"],
    "mocov3": ["algo.model.hidden_dim=64", "algo.model.out_dim=32"],
    "densecl": ["algo.model.hidden_dim=64", "algo.model.out_dim=32", "algo.model.queue_size=64"],
    "simsiam": ["algo.model.hidden_dim=64", "algo.model.out_dim=64", "algo.model.pred_hidden_dim=32"],
    "barlowtwins": ["algo.model.hidden_dim=64", "algo.model.out_dim=64"],
    "swav": [
        "algo.model.num_prototypes=16",
        "algo.model.hidden_dim=64",
        "algo.model.out_dim=32",
        "algo.views.1.copies=2",
        "algo.views.1.size=16",
        "algo.model.queue_length=32",
        "algo.model.queue_start_epoch=0",
        "algo.model.freeze_prototypes_iters=2",
    ],
    "vicreg": ["algo.model.hidden_dim=64", "algo.model.out_dim=64"],
    "dino": [
        "algo.model.out_dim=128",
        "algo.model.hidden_dim=64",
        "algo.model.bottleneck_dim=32",
        "algo.views.2.copies=2",
        "algo.views.2.size=16",
        "algo.model.momentum.start=0.9",  # a teacher that moves within 30 steps (0.996: ~1,000 steps)
    ],
}
VIT_ALGOS = {"mae"}  # algorithms that need a ViT backbone (the others get a ResNet-18)


def tiny(algo: str, dataset: str = "fake") -> list[str]:
    """Overrides for a seconds-long run of ``algo`` (small heads, 32 px) on ``dataset``."""
    data = ["dataset=fake", "dataset.num_samples=64"] if dataset == "fake" else [f"dataset={dataset}"]
    common = data + ["dataset.image_size=32", "schedule.batch_size=16", "schedule.epochs=1", "schedule.warmup_epochs=0"]
    resnet = ["backbone=resnet18", "backbone.stem=imagenet"]  # the 7x7/2 stem: ~10x faster at 32 px
    vit = ["backbone=vit_tiny"]
    return [f"algo={algo}", *TINY[algo]] + (vit if algo in VIT_ALGOS else resnet) + common


def run_training(overrides: list[str], run_dir: Path):
    from selfsup.engine.trainer import Trainer

    return Trainer(compose_cfg(overrides), run_dir).fit()


# what torchrun, SLURM and the seed's scripts set: a command a test starts must not inherit them
LAUNCH_VARS = {
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "PORT",
    "NNODES",
    "NODE_RANK",
    "TORCHELASTIC_RUN_ID",
}


def launch_env(**extra: str) -> dict[str, str]:
    """The environment for a ``python -m selfsup.train`` a test starts: this one without the launch, SLURM,
    submitit and Hydra variables of whatever runs the tests, on the CPU, one thread, unbuffered."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "SUBMITIT_", "HYDRA_", "SELFSUP_FULL"))
    }
    env.update(CUDA_VISIBLE_DEVICES="-1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def run_tool(module: str, *args: str, cwd: Path | None = None, timeout: float = 300):
    """``python -m <module> <args>`` as a user runs it (CPU, no HYDRA_FULL_ERROR): the completed process."""
    import subprocess
    import sys

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def relative_update_error(init: dict, one: dict, two: dict) -> dict[str, float]:
    """Per floating tensor: |two - one| / |one - init|, how far run ``two``'s weights are from run ``one``'s
    relative to what training moved them (both from the same ``init``). Tensors that training moved by
    less than 1e-5 of their norm are left out: a Linear bias before a BatchNorm (BYOL's heads) has a zero
    gradient in exact arithmetic, so its "update" is rounding noise. Integer tensors must be equal."""
    out = {}
    for key, want in one.items():
        if want.is_floating_point():
            moved = (want - init[key]).double().norm()
            if moved > 1e-5 * init[key].double().norm():
                out[key] = float((two[key] - want).double().norm() / moved)
        else:
            assert torch.equal(two[key], want), key  # num_batches_tracked
    return out


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory) -> Path:
    """30 real CIFAR-10 training JPEGs per class, extracted to a temporary class-folder tree."""
    if not CIFAR_TAR.is_file():
        message = f"{CIFAR_TAR} not found (the CIFAR-10 JPEG archive; set SELFSUP_CIFAR_TAR to its path)"
        if os.environ.get("SELFSUP_REQUIRE_SHARED_DATA") == "1":  # set by .ci/run: CI must test on real images
            pytest.fail(message + "; SELFSUP_REQUIRE_SHARED_DATA=1 makes this a failure")
        pytest.skip(message)
    out = tmp_path_factory.mktemp("cifar")
    per_class: dict[str, int] = {}
    with tarfile.open(CIFAR_TAR, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 4:
                continue
            cls = parts[2]
            if per_class.get(cls, 0) >= 30:
                continue
            per_class[cls] = per_class.get(cls, 0) + 1
            target = out / cls / parts[3]
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src:  # type: ignore[union-attr]
                target.write_bytes(src.read())
    return out


@pytest.fixture(scope="session")
def simclr_digits_ckpt(tmp_path_factory) -> Path:
    """A SimCLR ResNet-18 checkpoint from a short default run on digits (2 epochs, 7x7 stem, 32 px): what
    the evaluation tools and benchmarks are tested on. Shared by the session; do not modify the file."""
    run = tmp_path_factory.mktemp("simclr_digits")
    run_training(["schedule.epochs=2", "knn.enabled=false"], run)
    return run / "last.pt"


@pytest.fixture(scope="session")
def mae_digits_ckpt(tmp_path_factory) -> Path:
    """A tiny MAE ViT checkpoint (2 blocks of 32-d, patch 8, norm_pix_loss) from one epoch on digits at 32 px.
    Shared by the session; do not modify the file."""
    run = tmp_path_factory.mktemp("mae_digits")
    run_training(tiny("mae", "digits") + ["knn.enabled=false"], run)
    return run / "last.pt"


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny tensors, where threads only add synchronisation (on a busy
    2-core machine the probe tests took 60 s with torch's 2 threads, 0.8 s with one):
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def training_loaders(monkeypatch) -> list[tuple[object, list[int]]]:
    """Every (dataset, image indices) that the benchmarks' ``supervised.training_loader`` is asked for during
    the test, in order; the loaders themselves are the real ones."""
    from selfsup.eval import supervised

    calls: list[tuple[object, list[int]]] = []
    real = supervised.training_loader

    def spy(dataset, indices, *args, **kwargs):
        calls.append((dataset, list(indices)))
        return real(dataset, indices, *args, **kwargs)

    monkeypatch.setattr(supervised, "training_loader", spy)
    return calls


@pytest.fixture(autouse=True)
def _isolate_env(monkeypatch):
    """No test depends on a GPU or on a torchrun environment of the machine running it."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("SELFSUP_TEST_CUDA", "-1"))


def fake_run(
    path: Path,
    algo: str = "simclr",
    epochs: int = 2,
    done: int = 2,
    status: dict | None = None,
    age_s: float = 0.0,
    torn: bool = False,
    choices: bool = True,
) -> Path:
    """A run dir as the trainer leaves it: resolved config, ``done`` epochs of metrics, optional status."""
    target = {"simclr": "selfsup.algorithms.simclr.SimCLR", "byol": "selfsup.algorithms.byol.BYOL"}[algo]
    cfg = {
        "algo": {"model": {"_target_": target, "hidden_dim": 64}},
        "backbone": {"_target_": "selfsup.models.resnet.ResNet", "arch": "resnet18"},
        "dataset": {"_target_": "selfsup.data.datasets.FakeImages", "num_samples": 64},
        "schedule": {"epochs": epochs, "batch_size": 16},
        "seed": 0,
    }
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    if choices:
        (path / ".hydra").mkdir()
        hydra = {"hydra": {"runtime": {"choices": {"algo": algo, "backbone": "resnet18", "dataset": "fake"}}}}
        (path / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
        (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"algo={algo}", f"schedule.epochs={epochs}"]))
    t0 = 1_800_000_000.0
    records = [
        {"kind": "config", "epoch": 0, "step": 0, "time": t0},
        {"kind": "knn", "step": 0, "time": t0, "top1": 0.25},
    ]
    for e in range(1, done + 1):
        for s in range(1, 5):
            step = (e - 1) * 4 + s
            loss = 6.0 - 0.1 * step
            records.append(
                {"kind": "train", "epoch": step / 4, "step": step, "time": t0 + step, "loss": loss, "lr": 0.01}
            )
        records.append({"kind": "epoch", "epoch": e, "step": 4 * e, "time": t0 + 4 * e, "loss": 6.0 - 0.4 * e})
    if done == epochs:
        records.append({"kind": "knn", "epoch": done, "step": 4 * done, "time": t0 + 4 * done + 1, "top1": 0.5})
    lines = [json.dumps(r) for r in records] + (['{"kind": "train", "step": 9, "lo'] if torn else [])
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if status is not None:
        (path / "status.json").write_text(json.dumps(status))
    if age_s:
        then = time.time() - age_s
        for f in path.rglob("*"):
            os.utime(f, (then, then))
    return path
