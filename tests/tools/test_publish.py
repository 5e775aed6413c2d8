"""publish: a training checkpoint slimmed to what load_pretrained needs (no optimizer, scheduler, scaler,
RNG), on the CPU, written atomically as <stem>-<sha8>.pth (its own SHA-256's first 8 hex digits), still
loadable with weights_only=True and by load_pretrained; bad input is one error line and exit 2."""

from __future__ import annotations

import hashlib
import re
import subprocess

import pytest
import torch

from conftest import run_tool, run_training, tiny
from selfsup.engine import checkpoint as ckpt_io
from selfsup.engine.pretrained import load_pretrained
from selfsup.errors import CheckpointError
from selfsup.tools.publish import KEEP, output_stem, publish, sha256_file

TRAINING_ONLY = ("optimizer", "scheduler", "scaler", "rng")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("simclr")
    run_training(tiny("simclr") + ["knn.enabled=false"], run)
    return run


@pytest.fixture(scope="module")
def published(run, tmp_path_factory):
    return publish(run / "last.pt", tmp_path_factory.mktemp("zoo") / "simclr_r18.pth")


def test_the_name_carries_the_files_own_hash(published):
    digest = hashlib.sha256(published.path.read_bytes()).hexdigest()
    assert published.sha256 == digest == sha256_file(published.path, chunk=1000)
    assert re.fullmatch(r"simclr_r18-[0-9a-f]{8}\.pth", published.path.name)
    assert published.path.name == f"simclr_r18-{digest[:8]}.pth"
    assert [p.name for p in published.path.parent.iterdir()] == [published.path.name]  # no temporary left


def test_only_what_load_pretrained_needs_is_kept_on_the_cpu(run, published):
    original = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert all(original.get(k) is not None for k in TRAINING_ONLY)  # the training checkpoint has them
    state = torch.load(published.path, map_location="cpu", weights_only=True)
    assert set(state) <= set(KEEP) and {"model", "config", "meta", "epoch", "step", "format"} <= set(state)
    assert not set(TRAINING_ONLY) & set(state) and set(TRAINING_ONLY) <= set(published.dropped)
    assert all(v.device.type == "cpu" for v in state["model"].values())
    assert state["model"].keys() == original["model"].keys()
    assert all(torch.equal(state["model"][k], original["model"][k]) for k in state["model"])
    assert published.size_out < published.size_in == (run / "last.pt").stat().st_size
    assert published.size_out == published.path.stat().st_size


def test_load_pretrained_gives_the_same_weights(run, published):
    original = load_pretrained(run / "last.pt")
    again = load_pretrained(published.path)
    assert (again.epoch, again.step, again.meta) == (original.epoch, original.step, original.meta)
    assert again.config == original.config and not again.report.missing and not again.report.unexpected
    want, got = original.algo.backbone.state_dict(), again.algo.backbone.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_out_is_a_folder_or_a_stem(run, tmp_path):
    src = run / "last.pt"
    assert output_stem(src, tmp_path) == tmp_path / "last"
    assert output_stem(src, f"{tmp_path / 'new'}/") == tmp_path / "new" / "last"
    assert output_stem(src, tmp_path / "model") == tmp_path / "model"
    assert output_stem(src, tmp_path / "model.pt") == tmp_path / "model"
    p = publish(src, tmp_path)
    assert p.path.parent == tmp_path and p.path.name.startswith("last-")


def test_bad_input_is_a_checkpoint_error(run, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        publish(tmp_path / "nope.pt", tmp_path)
    with pytest.raises(CheckpointError, match="is a folder"):
        publish(run, tmp_path)
    ckpt = ckpt_io.load(run / "last.pt")
    ckpt["config"] = ""
    ckpt_io.save_atomic(ckpt, tmp_path / "noconfig.pt")
    with pytest.raises(CheckpointError, match="no config"):
        publish(tmp_path / "noconfig.pt", tmp_path / "out")


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_tool("selfsup.tools.publish", *args)


@pytest.mark.slow
def test_the_command_line(run, tmp_path):
    ok = cli(str(run / "last.pt"), str(tmp_path / "zoo" / "simclr"))
    assert ok.returncode == 0, ok.stderr
    path, size, sha = ok.stdout.splitlines()
    assert re.fullmatch(r"size: \S+ MB -> \S+ MB \(dropped .*optimizer.*\)", size)
    digest = sha256_file(path)
    assert path == str(tmp_path / "zoo" / f"simclr-{digest[:8]}.pth") and sha == f"sha256: {digest}"
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    for args in ([str(tmp_path / "missing.pt"), str(tmp_path)], [str(corrupt), str(tmp_path)], ["--bogus"], ["a"]):
        proc = cli(*args)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("selfsup: error: "), (args, proc.stderr)


def test_training_does_not_resume_from_a_published_file(published, tmp_path):
    """A published file has no optimizer state: resuming from it would silently restart the optimiser, so
    it is refused with what to do instead."""
    from conftest import compose_cfg
    from selfsup.engine.trainer import Trainer

    with pytest.raises(CheckpointError, match=r"holds weights only \(no optimizer state.*load_pretrained"):
        Trainer(compose_cfg(tiny("simclr") + ["knn.enabled=false", f"resume={published.path}"]), tmp_path)
