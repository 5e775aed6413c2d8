"""The command line: bad input gives one clear error line and exit status 2, nothing lost."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, tiny

pytestmark = pytest.mark.slow

CPU = ["device=cpu", "loader.num_workers=0", "log.tensorboard=false", "knn.enabled=false"]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1", "PYTHONWARNINGS": "ignore"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "selfsup.train", *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("selfsup: error: ")
    return lines[0]


def test_cfg_job_prints_the_composed_config():
    proc = cli("algo=odc", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "_target_: selfsup.algorithms.odc.ODC" in proc.stdout and "schedule:" in proc.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (["algo=foo"], "Could not find 'algo/foo' (available options in 'algo': mae, odc, simclr)"),
        (["backbone=resnet101"], "backbone/resnet101"),
        (["schedule.lrr=0.1"], "Key 'lrr' not in 'ScheduleConfig'"),
        (["schedule.epochs=ten"], "Value 'ten' of type 'str' could not be converted to Integer"),
        (["precision=fp8"], "Invalid value 'fp8'"),
        (["dataset=imagefolder"], "dataset.root"),
        (["dataset=imagefolder", "dataset.root=/no/such/folder"], "dataset root /no/such/folder does not exist"),
        (["resume=/no/such/last.pt"], "checkpoint /no/such/last.pt does not exist"),
        (["algo=odc", "algo.model.num_clusters=5000"], "more clusters (algo.model.num_clusters=5000) than training"),
        (["algo=mae", "backbone=resnet18"], "MAE needs a ViT backbone"),
        (["schedule.batch_size=4096"], "lower schedule.batch_size"),
        (["device=cuda"], "CUDA is not available"),
    ],
)
def test_bad_input_gives_one_line(args, expected, tmp_path):
    line = one_error_line(cli(*CPU, *args, f"hydra.run.dir={tmp_path}"))
    assert expected in line, line


def test_empty_dataset_root(tmp_path):
    (tmp_path / "empty").mkdir()
    line = one_error_line(
        cli("dataset=imagefolder", f"dataset.root={tmp_path / 'empty'}", *CPU, f"hydra.run.dir={tmp_path / 'run'}")
    )
    assert "holds no images" in line


def test_corrupt_image_with_on_bad_image_error(cifar_folder, tmp_path):
    root = tmp_path / "imgs" / "cls"
    root.mkdir(parents=True)
    for src in sorted((cifar_folder / "cat").iterdir())[:8]:
        (root / src.name).write_bytes(src.read_bytes())
    (root / "0000_broken.jpg").write_bytes(b"\xff\xd8 truncated")
    args = [a for a in tiny("simclr") if not a.startswith("dataset.")] + [
        "dataset=imagefolder",
        f"dataset.root={root.parent}",
        "dataset.image_size=32",
        "schedule.batch_size=4",
        "dataset.on_bad_image=error",
        *CPU,
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    line = one_error_line(cli(*args))
    assert "cannot read image" in line and "0000_broken.jpg" in line


def test_resume_with_another_architecture(tmp_path):
    first = cli(*tiny("simclr"), *CPU, f"hydra.run.dir={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr[-3000:]
    line = one_error_line(
        cli(*tiny("mae"), *CPU, f"resume={tmp_path / 'a' / 'last.pt'}", f"hydra.run.dir={tmp_path / 'b'}")
    )
    assert "another architecture" in line and "missing keys: " in line and "unexpected keys: " in line


def test_diverging_run_stops_with_one_line(tmp_path):
    line = one_error_line(
        cli(*tiny("simclr"), *CPU, "algo.optimizer.lr=1e30", "log.interval=1", f"hydra.run.dir={tmp_path}")
    )
    assert "loss became nan" in line or "loss became inf" in line
    assert "no checkpoint was written yet" in line and not (tmp_path / "last.pt").exists()


def test_full_traceback_on_request(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "selfsup.train", "algo=foo", f"hydra.run.dir={tmp_path}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_a_run_prints_where_its_outputs_are(tmp_path):
    proc = cli(*tiny("simclr"), "device=cpu", "loader.num_workers=0", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert f"run dir:     {tmp_path}" in out and "last.pt" in out and "metrics.jsonl" in out
    assert "kNN top-1" in out and "random init" in out and "trained" in out
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.yaml", "train.log", "metrics.jsonl", "last.pt", "epoch_0001.pt"} <= files
    assert any((tmp_path / "tb").iterdir())  # TensorBoard event file


def test_multirun_sweep(tmp_path):
    proc = cli("-m", *tiny("mae"), *CPU, "algo.model.mask_ratio=0.5,0.75", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(tmp_path.glob("*/last.pt"))) == 2
