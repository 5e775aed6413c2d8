"""load_pretrained: a trained algorithm (with its state, e.g. ODC's memory) back from a checkpoint, with
a report of what loaded; a checkpoint without the backbone is an error, not a random network."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import compose_cfg, run_training, tiny
from selfsup.algorithms.odc import ODC
from selfsup.config import typed
from selfsup.engine import checkpoint as ckpt_io
from selfsup.engine.pretrained import config_from_checkpoint, load_pretrained, load_state
from selfsup.errors import CheckpointError


@pytest.fixture(scope="module")
def odc_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("odc")
    run_training(tiny("odc") + ["knn.enabled=false"], run)
    return run


def test_load_pretrained_restores_the_algorithm_and_its_state(odc_run, caplog):
    ckpt = ckpt_io.load(odc_run / "last.pt")
    with caplog.at_level(logging.INFO, logger="selfsup"):
        pre = load_pretrained(odc_run / "last.pt")
    assert isinstance(pre.algo, ODC) and not pre.algo.training
    assert (pre.epoch, pre.step) == (ckpt["epoch"], ckpt["step"]) and pre.meta["num_samples"] == 64
    state = pre.algo.state_dict()
    assert state.keys() == ckpt["model"].keys()
    assert all(torch.equal(state[k], ckpt["model"][k]) for k in state)  # weights and the memory
    assert pre.report.loaded == len(ckpt["model"]) and not pre.report.missing and not pre.report.unexpected
    assert any(f"loaded {len(ckpt['model'])} tensors" in r.getMessage() for r in caplog.records)
    x = torch.randn(2, 3, 32, 32)
    assert pre.algo.extract(x).shape == (2, 512)


def test_the_config_comes_back_typed(odc_run):
    cfg = config_from_checkpoint(ckpt_io.load(odc_run / "last.pt")["config"])
    expected = typed(compose_cfg(tiny("odc") + ["knn.enabled=false"]))
    assert cfg == expected


def test_a_checkpoint_without_the_backbone_is_refused(odc_run, tmp_path):
    ckpt = ckpt_io.load(odc_run / "last.pt")
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if k != "backbone.layer4.1.conv2.weight"}
    ckpt_io.save_atomic(ckpt, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"does not hold the backbone \(1 of its tensors are missing"):
        load_pretrained(tmp_path / "partial.pt")


def test_missing_heads_and_unexpected_keys_are_reported_not_hidden(odc_run):
    pre = load_pretrained(odc_run / "last.pt")
    state = dict(pre.algo.state_dict())
    state.pop("head.weight")
    state["extra.weight"] = torch.zeros(1)
    report = load_state(pre.algo, state, "edited")
    assert report.missing == ["head.weight"] and report.unexpected == ["extra.weight"]
    assert "missing 1: head.weight" in str(report) and "unexpected 1: extra.weight" in str(report)
    state["backbone.conv1.weight"] = torch.zeros(1, 1)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_state(pre.algo, state, "edited")


def test_not_a_training_checkpoint(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="is not a selfsup training checkpoint"):
        load_pretrained(tmp_path / "other.pth")
