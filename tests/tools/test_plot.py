"""``python -m selfsup.tools.plot``: loss, lr and kNN panels, one line per run, a real PNG, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, fake_run, run_training, tiny
from selfsup.errors import SelfsupError
from selfsup.tools import plot


def run_lines(ax) -> list:
    """The lines of ``ax`` that stand for a run (the legend's), not the epoch / kNN markers."""
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


def test_one_run_draws_loss_lr_and_knn(tmp_path):
    run = fake_run(tmp_path / "a", epochs=2, done=2, torn=True)
    fig = plot.plot_runs([run])
    loss, lr, knn = fig.axes[:3]
    assert [ax.get_ylabel() for ax in (loss, lr, knn)] == ["loss", "learning rate", "kNN top-1"]
    (line,) = run_lines(loss)
    assert list(line.get_xdata()) == list(range(1, 9))  # the torn line is skipped
    assert line.get_ydata()[0] == pytest.approx(5.9)
    epochs = [x for x in loss.get_lines() if x.get_label().startswith("_")]
    assert [list(x.get_xdata()) for x in epochs] == [[4.0, 8.0]]
    (lr_line,) = run_lines(lr)
    assert list(lr_line.get_ydata()) == [0.01] * 8
    (knn_line,) = run_lines(knn)
    assert list(knn_line.get_xdata()) == [0, 8] and list(knn_line.get_ydata()) == [0.25, 0.5]
    assert any(getattr(ax, "get_xlabel", lambda: "")() == "epoch" for ax in fig.axes[3:]) or any(
        child.get_xlabel() == "epoch" for child in loss.child_axes
    )


def test_sweep_is_overlaid_with_overrides_as_labels(tmp_path):
    sweep = tmp_path / "sweep"
    fake_run(sweep / "0_algo=simclr,schedule.epochs=2", epochs=2, done=2)
    fake_run(sweep / "1_algo=byol,schedule.epochs=2", algo="byol", epochs=2, done=1)
    members = plot.expand([sweep])
    assert len(members) == 2
    fig = plot.plot_runs(members)
    for ax in fig.axes[:3]:
        assert len(run_lines(ax)) == 2
    assert [line.get_label() for line in run_lines(fig.axes[0])] == ["algo=simclr", "algo=byol"]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["algo=simclr", "algo=byol"]


def test_png(tmp_path):
    run = fake_run(tmp_path / "a")
    assert plot.main([str(run)]) == 0
    with Image.open(run / "curves.png") as img:
        assert img.format == "PNG"
        assert img.size == (int(plot.FIGSIZE[0] * plot.DPI), int(plot.FIGSIZE[1] * plot.DPI))
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 1  # drawn, not blank
    out = tmp_path / "deep" / "two.png"
    assert plot.main([str(run), str(fake_run(tmp_path / "b")), "--out", str(out)]) == 0
    assert out.is_file()


def test_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SelfsupError, match="holds no run"):
        plot.expand([tmp_path / "empty"])
    with pytest.raises(SelfsupError, match="no such directory"):
        plot.expand([tmp_path / "missing"])
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "metrics.jsonl").write_text('{"kind": "config", "step": 0}\n{"kind": "tra\n')
    with pytest.raises(SelfsupError, match="nothing to plot"):
        plot.plot_runs([bare])
    assert plot.main([str(tmp_path / "empty")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("selfsup: error: ")


def test_real_run(tmp_path):
    run_dir = tmp_path / "real"
    run_training(tiny("simclr") + ["schedule.epochs=2", "log.interval=1"], run_dir)
    fig = plot.plot_runs(plot.expand([run_dir]))
    loss, lr, knn = fig.axes[:3]
    assert len(run_lines(loss)[0].get_xdata()) == 8  # 4 steps per epoch x 2 epochs, log.interval=1
    assert max(run_lines(lr)[0].get_ydata()) > 0
    assert len(run_lines(knn)[0].get_xdata()) == 2  # before and after


@pytest.mark.slow
def test_cli(tmp_path):
    run = fake_run(tmp_path / "a")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "selfsup.tools.plot"]
    ok = subprocess.run([*cmd, str(run)], env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert Path(run / "curves.png").is_file()
    bad = subprocess.run([*cmd, str(tmp_path / "nothing")], env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("selfsup: error: "), bad.stderr
