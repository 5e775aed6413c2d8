"""``python -m selfsup.tools.runs``: one row per run dir, the status rules, filters, sorting, JSON, errors.

Most cases use fabricated run dirs (config.yaml + metrics.jsonl + status.json, written here); one is a
real tiny training run, so the tool keeps up with what the trainer actually writes.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import fake_run, run_tool, run_training, tiny
from selfsup.errors import SelfsupError
from selfsup.tools import runs


def row_of(path: Path, **kwargs) -> dict:
    return runs.describe(path, **kwargs)


# ------------------------------------------------------------------------------------------- status rules
def test_status_without_status_json(tmp_path):
    done = fake_run(tmp_path / "done", epochs=2, done=2, age_s=7200)
    fresh = fake_run(tmp_path / "fresh", epochs=3, done=1)
    dead = fake_run(tmp_path / "dead", epochs=3, done=1, age_s=3600)
    assert row_of(done)["status"] == "finished"
    assert row_of(fresh)["status"] == "running"
    assert row_of(dead)["status"] == "crashed?"
    assert row_of(dead, stale_minutes=120)["status"] == "running"  # --stale moves the line
    assert (row_of(dead)["epochs"], row_of(done)["epochs"]) == ("1/3", "2/2")


def test_status_json_wins_and_stale_running_is_crashed(tmp_path):
    for state in ("finished", "failed", "interrupted", "preempted", "crashed"):
        path = fake_run(tmp_path / state, epochs=3, done=1, status={"status": state, "epochs": 3, "epochs_done": 1})
        assert row_of(path)["status"] == state
    failed = fake_run(tmp_path / "err", epochs=3, done=1, status={"status": "failed", "error": "loss is NaN"})
    assert row_of(failed)["error"] == "loss is NaN"
    alive = fake_run(tmp_path / "alive", epochs=3, done=1, status={"status": "running"})
    killed = fake_run(tmp_path / "killed", epochs=3, done=1, status={"status": "running"}, age_s=3600)
    assert row_of(alive)["status"] == "running"
    assert row_of(killed)["status"] == "crashed?"


def test_row_values_from_metrics_and_status(tmp_path):
    plain = row_of(fake_run(tmp_path / "a", epochs=2, done=2, torn=True))  # the torn last line is skipped
    assert (plain["algo"], plain["backbone"], plain["dataset"]) == ("simclr", "resnet18", "fake")
    assert plain["final_loss"] == pytest.approx(5.2)
    assert (plain["knn_before"], plain["knn_after"]) == (0.25, 0.5)
    assert plain["seconds"] == 9.0
    status = {"status": "finished", "epochs": 2, "epochs_done": 2, "final_loss": 1.5, "seconds": 42.0}
    status |= {"knn_before": {"top1": 0.1}, "knn_after": {"top1": 0.9}, "overrides": ["algo=simclr"]}
    told = row_of(fake_run(tmp_path / "b", status=status))
    assert (told["final_loss"], told["knn_before"], told["knn_after"], told["seconds"]) == (1.5, 0.1, 0.9, 42.0)
    assert told["overrides"] == ["algo=simclr"]
    no_hydra = row_of(fake_run(tmp_path / "c", algo="byol", choices=False))  # class names instead of choices
    assert (no_hydra["algo"], no_hydra["backbone"], no_hydra["dataset"]) == ("BYOL", "resnet18", "FakeImages")


# ------------------------------------------------------------------------------------ finding, filtering
@pytest.fixture
def tree(tmp_path):
    """outputs/ with two runs and multirun/ with a sweep of two members (a summary file beside them)."""
    fake_run(tmp_path / "outputs/simclr/2026-01-01_00-00-00-aaaaaa", epochs=2, done=2)
    fake_run(tmp_path / "outputs/byol/2026-01-02_00-00-00-bbbbbb", algo="byol", epochs=7, done=1, age_s=3600)
    sweep = tmp_path / "multirun/simclr/2026-01-03_00-00-00"
    fake_run(sweep / "0_schedule.epochs=2", epochs=2, done=2, status={"status": "finished", "final_loss": 3.0})
    fake_run(sweep / "1_schedule.epochs=7", epochs=7, done=2, status={"status": "failed", "final_loss": 2.0})
    (sweep / "summary.json").write_text("[]")
    (tmp_path / "outputs/not_a_run").mkdir()
    return tmp_path


def test_finds_every_run_under_the_default_roots(tree, monkeypatch):
    monkeypatch.chdir(tree)
    rows = runs.collect([])
    assert len(rows) == 4
    assert {Path(r["run_dir"]).name for r in rows} == {
        "2026-01-01_00-00-00-aaaaaa",
        "2026-01-02_00-00-00-bbbbbb",
        "0_schedule.epochs=2",
        "1_schedule.epochs=7",
    }
    assert len(runs.collect(["multirun"])) == 2
    assert len(runs.collect(["outputs/simclr/2026-01-01_00-00-00-aaaaaa"])) == 1  # a ROOT that is a run


def test_filters(tree, monkeypatch):
    monkeypatch.chdir(tree)
    assert {r["algo"] for r in runs.collect([], ["algo=byol"])} == {"byol"}
    assert len(runs.collect([], ["algo=simclr"])) == 3
    assert len(runs.collect([], ["schedule.epochs=7"])) == 2
    assert len(runs.collect([], ["schedule.epochs=7", "algo=simclr"])) == 1
    assert len(runs.collect([], ["algo.model._target_=selfsup.algorithms.byol.BYOL"])) == 1
    assert len(runs.collect([], ["algo.model._target_=SimCLR"])) == 3  # a class name alone
    assert runs.collect([], ["schedule.epochs=3"]) == []
    with pytest.raises(SelfsupError, match="schedule.epoch"):
        runs.collect([], ["schedule.epoch=7"])  # a typo is an error, not an empty table


def test_sorting(tree, monkeypatch):
    monkeypatch.chdir(tree)
    losses = [r["final_loss"] for r in runs.collect([], sort="loss")]
    assert losses == sorted(losses)
    assert [r["final_loss"] for r in runs.collect([], sort="-final_loss")] == sorted(losses, reverse=True)
    assert [r["epochs_done"] for r in runs.collect([], sort="epochs")] == [1, 2, 2, 2]
    assert [r["algo"] for r in runs.collect([], sort="algo")] == ["byol", "simclr", "simclr", "simclr"]
    statuses = [r["status"] for r in runs.collect([], sort="status")]
    assert statuses == sorted(statuses)
    with pytest.raises(SelfsupError, match="cannot sort by 'colour'"):
        runs.collect([], sort="colour")


def test_table_is_aligned(tree, monkeypatch):
    monkeypatch.chdir(tree)
    lines = runs.format_table(runs.collect([], sort="run_dir")).splitlines()
    assert lines[0].split()[:5] == ["algo", "backbone", "dataset", "epochs", "status"]
    assert len(lines) == 5
    start = lines[0].index("status")
    assert [line[start:].split()[0] for line in lines[1:]] == ["finished", "failed", "crashed?", "finished"]
    assert lines[1].split()[-1] == str(Path("multirun/simclr/2026-01-03_00-00-00/0_schedule.epochs=2"))
    assert "0.2500 -> 0.5000" in lines[-1] and lines[-1].split()[-1] == str(
        Path("outputs/simclr/2026-01-01_00-00-00-aaaaaa")
    )


def test_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SelfsupError, match="no run under outputs/ or multirun/"):
        runs.collect([])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SelfsupError, match="empty holds no run"):
        runs.collect(["empty"])
    with pytest.raises(SelfsupError, match="no such"):
        runs.collect(["missing"])
    with pytest.raises(SelfsupError, match="not key=value"):
        runs.parse_filters(["=3"])


def test_real_run(tmp_path):
    """What the trainer writes (status.json, metrics, .hydra-less config.yaml) reads as a finished run."""
    run_dir = tmp_path / "real"
    run_training(tiny("simclr") + ["schedule.epochs=2", "log.interval=1"], run_dir)
    row = runs.describe(run_dir)
    assert (row["status"], row["epochs"], row["algo"], row["dataset"]) == ("finished", "2/2", "SimCLR", "FakeImages")
    assert row["final_loss"] is not None and row["seconds"] is not None
    assert row["knn_before"] is not None and row["knn_after"] is not None
    assert runs.apply_filters([run_dir], runs.parse_filters(["schedule.epochs=2"])) == [run_dir]
    assert runs.apply_filters([run_dir], runs.parse_filters(["schedule.epochs=1"])) == []


# ---------------------------------------------------------------------------------------- command line
def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_tool("selfsup.tools.runs", *args, cwd=cwd, timeout=120)


@pytest.mark.slow
def test_cli(tree):
    table = cli("algo=simclr", "--sort=-loss", cwd=tree)
    assert table.returncode == 0, table.stderr
    assert len(table.stdout.splitlines()) == 1 + 3 + 1  # header, 3 runs, "(3 run(s) match ...)"
    rows = json.loads(cli("--json", "multirun", cwd=tree).stdout)
    assert [r["status"] for r in rows] == ["finished", "failed"]
    bad = cli("nowhere", cwd=tree)
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("selfsup: error: "), bad.stderr
