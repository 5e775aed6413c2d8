"""The command line: bad input gives one clear error line and exit status 2, nothing lost.

Every case runs ``python -m selfsup.train`` in a subprocess, as a user would. The bad-input cases are
started together (a module fixture, as many at a time as there are cores): each spends most of its
~5 s importing torch, so running them side by side keeps the suite short.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import REPO, tiny

pytestmark = pytest.mark.slow

CPU = ["device=cpu", "loader.num_workers=0", "log.tensorboard=false", "knn.enabled=false"]


def cli(*args: str, cwd: Path | None = None, full_error: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
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


def write_images(folder: Path, n: int, size: int = 12, fmt: str = "png") -> Path:
    """``n`` small random RGB images (no data set needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        color = ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)
        Image.new("RGB", (size, size), color).save(folder / f"{i:04d}.{fmt}")
    return folder


# ---------------------------------------------------------------------------------------------- bad input
# id -> (arguments, text the one error line must contain); "{tmp}" is the case's own temporary folder
BAD_INPUT: dict[str, tuple[list[str], str]] = {
    "unknown-algo": (
        ["algo=foo"],
        "Could not find 'algo/foo' (available options in 'algo': "
        + ", ".join(sorted(p.stem for p in (REPO / "conf" / "algo").glob("*.yaml")))
        + ")",
    ),
    "unknown-backbone": (["backbone=resnet101"], "backbone/resnet101"),
    "misspelt-key": (["schedule.lrr=0.1"], "Key 'lrr' not in 'ScheduleConfig'"),
    "wrong-type": (["schedule.epochs=ten"], "Value 'ten' of type 'str' could not be converted to Integer"),
    "unknown-precision": (["precision=fp8"], "Invalid value 'fp8'"),
    "missing-root": (["dataset=imagefolder"], "dataset.root is not set: pass dataset.root=<value>"),
    "root-not-found": (
        ["dataset=imagefolder", "dataset.root=/no/such/folder"],
        "dataset root /no/such/folder does not exist",
    ),
    "empty-root": (["dataset=imagefolder", "dataset.root={tmp}/empty"], "holds no images"),
    "resume-not-found": (["resume=/no/such/last.pt"], "checkpoint /no/such/last.pt does not exist"),
    "odc-too-many-clusters": (
        ["algo=odc", "algo.model.num_clusters=5000"],
        "more clusters (algo.model.num_clusters=5000) than training",
    ),
    "odc-one-cluster": (["algo=odc", "algo.model.num_clusters=1"], "ODC needs num_clusters >= 2"),
    "mae-resnet": (["algo=mae", "backbone=resnet18"], "MAE needs a ViT backbone"),
    "mae-mask-ratio-1": (["algo=mae", "algo.model.mask_ratio=1.0"], "algo.model.mask_ratio must be in [0, 1), got 1.0"),
    "mae-mask-ratio-negative": (
        ["algo=mae", "algo.model.mask_ratio=-0.1"],
        "algo.model.mask_ratio must be in [0, 1), got -0.1",
    ),
    "batch-too-large": (["schedule.batch_size=4096"], "lower schedule.batch_size"),
    "accumulate-0": (["schedule.accumulate=0"], "schedule.accumulate must be >= 1, got 0"),
    "base-batch-0": (["algo.optimizer.base_batch_size=0"], "algo.optimizer.base_batch_size must be >= 1, got 0"),
    "workers-negative": (["loader.num_workers=-1"], "loader.num_workers must be >= 0 or null (auto), got -1"),
    "empty-train-split": (
        ["dataset.val_fraction=0.9999"],
        "dataset.val_fraction=0.9999 holds out 1797 of the 1797 images and leaves none to train on",
    ),
    "fp16-on-cpu": (["precision=fp16"], "precision=fp16 needs a CUDA device; use precision=bf16 or fp32 on the CPU"),
    "device-foo": (["device=foo"], "device='foo' is not one of auto, cpu, cuda, cuda:N"),
    "cuda-missing": (["device=cuda"], "CUDA is not available"),
    "val-root-without-classes": (
        [
            "dataset=imagefolder",
            "dataset.root={tmp}/classes",
            "dataset.val_root={tmp}/flat",
            "dataset.image_size=16",
            "schedule.batch_size=4",
            "knn.enabled=true",  # the val split is read for the kNN monitor
        ],
        "dataset.val_root={tmp}/flat has no class folders but dataset.root has",
    ),
    "corrupt-image": (
        [
            "dataset=imagefolder",
            "dataset.root={tmp}/classes",
            "dataset.image_size=16",
            "schedule.batch_size=4",
            "dataset.on_bad_image=error",
        ],
        "cannot read image {tmp}/classes/a/0000_broken.jpg",
    ),
    # numeric settings are checked where the config is composed (the dataclasses' __post_init__), with
    # the value the user typed (not, e.g., the batch-scaled learning rate)
    "lr-negative": (["algo.optimizer.lr=-1"], "algo.optimizer.lr must be > 0, got -1.0"),
    "image-size-0": (["dataset.image_size=0"], "dataset.image_size must be >= 8, got 0"),
    "image-size-own-views": (  # views with their own size: the dataset's check names it
        ["dataset=fake", "algo.views.0.size=32", "dataset.image_size=-3"],
        "dataset.image_size must be >= 8, got -3",
    ),
    "view-size-0": (["algo.views.0.size=0"], "algo.views[].size must be >= 1"),
    "batch-size-0": (["schedule.batch_size=0"], "schedule.batch_size must be >= 1, got 0"),
    "warmup-longer-than-training": (
        ["schedule.warmup_epochs=5"],
        "schedule.warmup_epochs must be in [0, schedule.epochs=1], got 5.0",
    ),
    "view-probability": (["algo.views.0.blur=1.5"], "algo.views[].blur=1.5 is a probability and must be in [0, 1]"),
    "view-crop-scale": (
        ["algo.views.0.crop_scale=[0.5,0.1]"],
        "algo.views[].crop_scale must be two numbers [min, max] with 0 < min <= max <= 1, got [0.5, 0.1]",
    ),
    "prefetch-0": (
        ["loader.prefetch_factor=0"],
        "loader.prefetch_factor must be >= 1 (batches buffered per worker), got 0",
    ),
    "checkpoint-keep-negative": (["checkpoint.keep=-1"], "checkpoint.keep must be >= 0 (0 = keep all), got -1"),
    "knn-temperature-0": (["knn.temperature=0"], "knn.temperature must be > 0, got 0.0"),
    # resume= with something that is not a selfsup checkpoint (never: torch's advice to unpickle it)
    "resume-text-file": (
        ["resume={tmp}/notes.txt"],
        "{tmp}/notes.txt is not a selfsup checkpoint (not a file written by torch.save); pass the last.pt",
    ),
    "resume-random-bytes": (
        ["resume={tmp}/random.pt"],
        "{tmp}/random.pt is not a selfsup checkpoint (not a file written by torch.save)",
    ),
    "resume-jpeg": (
        ["resume={tmp}/classes/a/0000.jpg"],
        "{tmp}/classes/a/0000.jpg is not a selfsup checkpoint (not a file written by torch.save)",
    ),
    "resume-pickled-module": (
        ["resume={tmp}/module.pt"],
        "{tmp}/module.pt is not a selfsup checkpoint: it holds Python objects (torch.nn.modules.linear.Linear) "
        "that would have to be unpickled, which selfsup never does for files it is given",
    ),
    "resume-folder": (
        ["resume={tmp}/old_run"],
        "resume={tmp}/old_run is a folder, not a checkpoint: pass the .pt file (e.g. {tmp}/old_run/last.pt) "
        "or run in that folder with hydra.run.dir={tmp}/old_run resume=auto",
    ),
}


def _prepare(case: str, tmp: Path) -> None:
    (tmp / "empty").mkdir(parents=True)
    write_images(tmp / "classes" / "a", 6)
    write_images(tmp / "classes" / "b", 6)
    write_images(tmp / "flat", 4)
    if case == "corrupt-image":
        (tmp / "classes" / "a" / "0000_broken.jpg").write_bytes(b"\xff\xd8 truncated")
    if case == "resume-text-file":
        (tmp / "notes.txt").write_text("epoch: 3\nloss: 0.42\n")
    if case == "resume-random-bytes":
        (tmp / "random.pt").write_bytes(random.Random(0).randbytes(4096))
    if case == "resume-jpeg":
        write_images(tmp / "classes" / "a", 1, fmt="jpg")
    if case == "resume-pickled-module":
        import torch

        torch.save(torch.nn.Linear(2, 2), tmp / "module.pt")  # a whole module: loading it would run pickled code
    if case == "resume-folder":
        (tmp / "old_run").mkdir()
        (tmp / "old_run" / "last.pt").write_bytes(b"")  # the folder message only looks for the file


def cli_many(commands: list[list[str]], outputs: list[Path]) -> list[subprocess.CompletedProcess]:
    """``python -m selfsup.train <args>`` for each command line, with ``cli``'s environment, run as ``__main__`` in
    children forked from one process that imported it (``tests/cli_fork.py``): the interpreter start and the
    imports (~3 s of CPU each) are paid once, not per command line. Each command's output goes to files named
    after ``outputs``."""
    requests = [
        {"args": args, "cwd": str(REPO), "env": {}, "stdout": str(out) + ".out", "stderr": str(out) + ".err"}
        for args, out in zip(commands, outputs, strict=True)
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    env["SELFSUP_FORK_JOBS"] = str(max(2, os.cpu_count() or 2))
    server = subprocess.run(
        [sys.executable, str(REPO / "tests" / "cli_fork.py")],
        input="".join(json.dumps(r) + "\n" for r in requests),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert server.returncode == 0, server.stderr[-3000:]
    codes = [json.loads(line)["code"] for line in server.stdout.splitlines()]
    return [
        subprocess.CompletedProcess(
            ["selfsup.train", *r["args"]], code, Path(r["stdout"]).read_text(), Path(r["stderr"]).read_text()
        )
        for r, code in zip(requests, codes, strict=True)
    ]


@pytest.fixture(scope="module")
def bad_input_runs(request, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """The selected bad-input cases, run side by side (one epoch each, should a check be missing)."""
    selected = [
        item.callspec.params["case"]
        for item in request.session.items
        if item.originalname == "test_bad_input_gives_one_line" and hasattr(item, "callspec")
    ]
    tmps = [tmp_path_factory.mktemp(case) for case in selected]
    commands = []
    for case, tmp in zip(selected, tmps, strict=True):
        _prepare(case, tmp)
        args = [a.replace("{tmp}", str(tmp)) for a in BAD_INPUT[case][0]]
        commands.append([*CPU, "schedule.epochs=1", *args, f"hydra.run.dir={tmp / 'run'}"])
    procs = cli_many(commands, [tmp / "cli" for tmp in tmps])
    return dict(zip(selected, zip(procs, tmps, strict=True), strict=True))


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_gives_one_line(case, bad_input_runs):
    proc, tmp = bad_input_runs[case]
    line = one_error_line(proc)
    expected = BAD_INPUT[case][1].replace("{tmp}", str(tmp))
    assert expected in line, line
    assert "weights_only" not in line  # torch's advice to load with weights_only=False is never passed on
    assert not (tmp / "run" / "last.pt").exists()  # stopped before training: no checkpoint claims to be one


# ---------------------------------------------------------------------------------------------- runs
def test_cfg_job_prints_the_composed_config():
    proc = cli("algo=odc", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["algo"]["model"]["_target_"] == "selfsup.algorithms.odc.ODC" and cfg["schedule"]["epochs"] == 9


def test_resume_with_another_architecture(tmp_path):
    first = cli(*tiny("simclr"), *CPU, f"hydra.run.dir={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "a" / "last.pt"
    line = one_error_line(cli(*tiny("mae"), *CPU, f"resume={ckpt}", f"hydra.run.dir={tmp_path / 'b'}"))
    assert "was trained with other settings (algo.model._target_: selfsup.algorithms.simclr.SimCLR -> " in line
    assert "resume_force=true" in line
    line = one_error_line(
        cli(*tiny("mae"), *CPU, f"resume={ckpt}", "resume_force=true", f"hydra.run.dir={tmp_path / 'c'}")
    )
    assert "another architecture" in line and "missing keys: " in line and "unexpected keys: " in line


def test_diverging_run_stops_with_one_line(tmp_path):
    line = one_error_line(
        cli(*tiny("simclr"), *CPU, "algo.optimizer.lr=1e30", "log.interval=1", f"hydra.run.dir={tmp_path}")
    )
    assert "loss became nan" in line or "loss became inf" in line
    assert "no checkpoint was written yet" in line and not (tmp_path / "last.pt").exists()


def test_full_traceback_on_request(tmp_path):
    proc = cli("algo=foo", f"hydra.run.dir={tmp_path}", full_error=True)
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "MissingConfigException" in proc.stderr and "Could not find 'algo/foo'" in proc.stderr
    assert "selfsup: error:" not in proc.stderr  # the traceback replaces the one-line summary


def test_a_run_prints_where_its_outputs_are(tmp_path):
    proc = cli(*tiny("simclr"), "device=cpu", "loader.num_workers=0", "log.interval=1", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert f"run dir:     {tmp_path}" in out and "last.pt" in out and "metrics.jsonl" in out
    assert "kNN top-1" in out and "random init" in out and "trained" in out
    # the time spent making views: the sum of the aug_s of every log line
    made = re.search(r"views: +made in ([\d.]+) s on cpu \(([\d.]+)% of the run", out)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    aug = sum(r["aug_s"] for r in records if r["kind"] == "train")
    assert made and float(made.group(1)) == pytest.approx(aug, abs=0.0051) and aug > 0, out
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.yaml", "train.log", "metrics.jsonl", "last.pt", "epoch_0001.pt"} <= files
    assert any((tmp_path / "tb").iterdir())  # TensorBoard event file


def test_multirun_sweep(tmp_path):
    proc = cli("-m", *tiny("mae"), *CPU, "algo.model.mask_ratio=0.5,0.75", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(tmp_path.glob("*/last.pt"))
    assert len(runs) == 2
    ratios = sorted(yaml.safe_load((p.parent / "config.yaml").read_text())["algo"]["model"]["mask_ratio"] for p in runs)
    assert ratios == [0.5, 0.75]  # each job trained with its own value
