"""count_params: per top-level module, all and trainable parameters (never buffers), from a config as
training composes it or from a checkpoint's stored config; bad input is one error line and exit 2."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import compose_cfg, run_tool, run_training, tiny
from selfsup.config import typed
from selfsup.engine.build import build_algorithm
from selfsup.errors import CheckpointError, ConfigError
from selfsup.tools.count_params import count_checkpoint, count_config, format_table, parse


def hand_count(algo_name: str) -> tuple[dict[str, tuple[int, int]], int, int]:
    """Per top-level child: (all, trainable) numel of its parameters; and the totals over the algorithm."""
    algo = build_algorithm(typed(compose_cfg(tiny(algo_name))), 64)
    rows = {}
    for name, child in algo.named_children():
        params = list(child.parameters())
        if params:
            rows[name] = (sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad))
    total = sum(p.numel() for p in algo.parameters())
    buffers = sum(b.numel() for b in algo.buffers())
    assert buffers > 0  # BatchNorm statistics / MAE's positional table: present, and not to be counted
    return rows, total, buffers


def as_rows(result: dict) -> dict[str, tuple[int, int]]:
    return {r["name"]: (r["params"], r["trainable"]) for r in result["modules"]}


@pytest.mark.parametrize("algo", ["simclr", "mae", "byol"])
def test_counts_equal_a_hand_count_per_module(algo):
    result = count_config(tiny(algo))
    rows, total, buffers = hand_count(algo)
    assert as_rows(result) == rows
    assert "backbone" in rows and len(rows) >= 2  # the backbone and the algorithm's neck/decoder/heads
    assert result["total"]["params"] == total == sum(n for n, _ in rows.values())
    assert result["total"]["params"] != total + buffers


def test_trainable_differs_where_the_algorithm_freezes_a_network():
    rows = as_rows(count_config(tiny("byol")))
    assert rows["target"][0] == rows["backbone"][0] + rows["projector"][0] and rows["target"][1] == 0
    trainable = count_config(tiny("byol"))["total"]["trainable"]
    assert trainable == sum(t for _, t in rows.values()) == sum(n for name, (n, _) in rows.items() if name != "target")
    simclr = count_config(tiny("simclr"))["total"]
    assert simclr["params"] == simclr["trainable"]


def test_the_table_shows_millions_and_exact_counts():
    result = count_config(tiny("simclr"))
    text = format_table(result)
    lines = text.splitlines()
    assert lines[0].startswith("SimCLR (resnet18) from config")
    total = result["total"]["params"]
    assert lines[-1].split()[0] == "total" and f"{total:,}" in lines[-1] and f"{total / 1e6:.5g}" in lines[-1]
    assert any(line.startswith("backbone ") for line in lines) and any(line.startswith("neck ") for line in lines)


def test_the_command_line_is_parsed():
    assert parse(["algo=mae", "--json"]) == (["algo=mae"], None, True)
    assert parse(["ckpt=x.pt", "json=false"]) == ([], "x.pt", False)
    for bad in (["--bogus"], ["json=maybe"], ["ckpt="], ["ckpt=x.pt", "algo=mae"]):
        with pytest.raises(ConfigError):
            parse(bad)


@pytest.fixture(scope="module")
def byol_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("byol")
    run_training(tiny("byol") + ["knn.enabled=false"], run)
    return run


def test_a_checkpoint_counts_as_its_config(byol_run):
    from_ckpt = count_checkpoint(byol_run / "last.pt")
    from_cfg = count_config(tiny("byol"))
    assert from_ckpt["modules"] == from_cfg["modules"] and from_ckpt["total"] == from_cfg["total"]
    assert from_ckpt["source"] == str(byol_run / "last.pt")


def test_a_missing_checkpoint_or_a_folder_is_one_clear_error(byol_run, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        count_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint"):
        count_checkpoint(byol_run)


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_tool("selfsup.tools.count_params", *args)


@pytest.mark.slow
def test_the_command_line(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 not really a torch file")
    cases = {
        "json": [*tiny("mae"), "--json"],
        "unknown algo": ["algo=nope"],
        "unknown key": ["algo.model.nokey=1"],
        "unknown option": ["--bogus"],
        "missing ckpt": [f"ckpt={tmp_path / 'missing.pt'}"],
        "corrupt ckpt": [f"ckpt={corrupt}"],
    }
    with ThreadPoolExecutor(2) as pool:
        procs = dict(zip(cases, pool.map(lambda a: cli(*a), cases.values()), strict=True))
    ok = procs.pop("json")
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["modules"] == count_config(tiny("mae"))["modules"] and out["algo"] == "MAE"
    for name, proc in procs.items():
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("selfsup: error: "), (name, proc.stderr)
        assert not proc.stdout.strip(), name
