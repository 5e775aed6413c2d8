"""selfsup works installed, not only in the checkout: configs ship in the wheel, both entry points run
from any directory, and users add their own config files without forking."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from conftest import REPO, tiny
from selfsup.config import compose

pytestmark = pytest.mark.slow

QUICK = ["device=cpu", "loader.num_workers=0", "log.tensorboard=false", "knn.enabled=false"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    env.update(CUDA_VISIBLE_DEVICES="-1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with selfsup installed from a freshly built wheel (not editable). Its dependencies
    (torch, hydra, ...) come from this environment through a path entry, which adds their directory to
    sys.path but not this environment's editable install of selfsup."""
    tmp = tmp_path_factory.mktemp("install")
    wheel_dir = tmp / "dist"
    build = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(REPO),
        ],
        tmp,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(wheel_dir.glob("selfsup-*.whl"))
    venv = tmp / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)], tmp).returncode == 0
    python = venv / "bin" / "python"
    # the venv's own pip (console scripts get its interpreter), before the venv can see this environment
    install = _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], tmp)
    assert install.returncode == 0, install.stderr[-3000:]
    site = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip()
    )
    (site / "selfsup-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_the_wheel_holds_the_configs(installed):
    python = installed / "bin" / "python"
    out = _run(
        [str(python), "-c", "import selfsup, selfsup.config as c; print(selfsup.__file__); print(c.CONFIG_DIR)"],
        Path("/"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    module, config_dir = out.stdout.split()
    assert module.startswith(str(installed)) and config_dir.startswith(str(installed))  # not the checkout
    assert (Path(config_dir) / "train.yaml").is_file() and (Path(config_dir) / "algo" / "simclr.yaml").is_file()


@pytest.mark.parametrize("entry", ["module", "script"])
def test_installed_entry_points_train_from_any_directory(installed, entry, tmp_path):
    cmd = (
        [str(installed / "bin" / "python"), "-m", "selfsup.train"]
        if entry == "module"
        else [str(installed / "bin" / "selfsup-train")]
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    proc = _run([*cmd, *tiny("simclr"), *QUICK, "hydra.run.dir=run"], work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "run" / "last.pt").is_file() and "finished SimCLR" in proc.stdout + proc.stderr


def test_console_script_in_the_development_venv(tmp_path):
    script = Path(sys.executable).parent / "selfsup-train"
    proc = _run([str(script), "algo=odc", "--cfg", "job"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert yaml.safe_load(proc.stdout)["algo"]["model"]["_target_"] == "selfsup.algorithms.odc.ODC"


def _user_configs(root: Path) -> Path:
    """A user's own config folder: a dataset variant and an experiment of their own."""
    (root / "dataset").mkdir(parents=True)
    (root / "experiment").mkdir()
    (root / "dataset" / "tiny_fake.yaml").write_text(
        "defaults:\n  - /schema/dataset/fake@_here_\n  - _self_\n\n"
        "_target_: selfsup.data.datasets.FakeImages\nnum_samples: 48\nnum_classes: 3\nimage_size: 32\n"
    )
    (root / "experiment" / "my_run.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /dataset: tiny_fake\n\nseed: 7\nschedule:\n  epochs: 1\n"
    )
    return root


def test_user_config_dir_in_compose(tmp_path):
    cfg = compose(["experiment=my_run"], config_dirs=[_user_configs(tmp_path / "mine")])
    assert cfg.seed == 7 and cfg.dataset.num_samples == 48 and cfg.schedule.epochs == 1


def test_user_config_dir_on_the_command_line(tmp_path):
    conf = _user_configs(tmp_path / "mine")
    args = [a for a in tiny("simclr") if not a.startswith(("dataset", "schedule.epochs"))]
    proc = _run(
        [
            sys.executable,
            "-m",
            "selfsup.train",
            "--config-dir",
            str(conf),
            "experiment=my_run",
            *args,
            *QUICK,
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["seed"] == 7 and cfg["dataset"]["num_samples"] == 48 and cfg["dataset"]["num_classes"] == 3
    # and a typo in the user's own file is caught by the schema it extends
    (conf / "dataset" / "tiny_fake.yaml").write_text(
        "defaults:\n  - /schema/dataset/fake@_here_\n  - _self_\n\n"
        "_target_: selfsup.data.datasets.FakeImages\nnum_sample: 48\n"
    )
    bad = _run(
        [sys.executable, "-m", "selfsup.train", "--config-dir", str(conf), "dataset=tiny_fake", "--cfg", "job"],
        tmp_path,
    )
    assert bad.returncode == 2 and "num_sample" in bad.stderr
