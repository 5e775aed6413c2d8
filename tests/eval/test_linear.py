"""bench=linear: the probe on features with a known answer, the frozen backbone, the stages, the CLI."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import run_tool
from selfsup.benchmark import BenchmarkConfig, run
from selfsup.config import compose_tool
from selfsup.data.datasets import Digits
from selfsup.eval import linear, supervised
from selfsup.eval.bench import BenchContext
from selfsup.eval.encoder import eval_datasets, load_encoder
from selfsup.eval.linear import LinearBenchmark, fit_feature_probe, probe_accuracy, recipe_for

FAKE = ["dataset=fake", "dataset.num_samples=64", "dataset.image_size=32", "dataset.num_classes=8"]


pytestmark = pytest.mark.usefixtures("one_thread")


FAST_RECIPE = LinearBenchmark().resolve("fast")[0]


def bench_cfg(ckpt, out, *overrides: str) -> BenchmarkConfig:
    return compose_tool("benchmark", BenchmarkConfig, [f"ckpt={ckpt}", "device=cpu", f"out={out}", *overrides])


def make_ctx(ckpt, out, *overrides: str) -> BenchContext:
    """The context ``python -m selfsup.benchmark`` builds (the encoder and splits are reachable)."""
    cfg = bench_cfg(ckpt, out, *overrides)
    encoder = load_encoder(cfg.ckpt, cfg.device)
    train, val = eval_datasets(cfg, encoder)
    assert val is not None
    return BenchContext(encoder, train, val, out, cfg)


def image_hashes(dataset, indices=None) -> set[str]:
    rows = range(len(dataset)) if indices is None else indices
    return {hashlib.sha1(dataset[int(i)][0].numpy().tobytes()).hexdigest() for i in rows}


def test_probe_learns_features_that_are_the_labels():
    gen = torch.Generator().manual_seed(0)
    y, yv = torch.randint(0, 10, (300,), generator=gen), torch.randint(0, 10, (200,), generator=gen)
    x = F.one_hot(y, 10).float() + 0.05 * torch.randn(300, 10, generator=gen)
    xv = F.one_hot(yv, 10).float() + 0.05 * torch.randn(200, 10, generator=gen)
    probe = fit_feature_probe(x, y, 10, FAST_RECIPE)
    assert probe_accuracy(probe, xv, yv, 10) == {"top1": 100.0, "top5": 100.0}


def test_probe_on_random_labels_is_at_chance():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(3000, 32, generator=gen), torch.randint(0, 10, (3000,), generator=gen)
    xv, yv = torch.randn(3000, 32, generator=gen), torch.randint(0, 10, (3000,), generator=gen)
    acc = probe_accuracy(fit_feature_probe(x, y, 10, replace(FAST_RECIPE, epochs=20)), xv, yv, 10)
    assert abs(acc["top1"] - 10.0) < 2.5  # binomial sd 0.55 points
    assert abs(acc["top5"] - 50.0) < 4.0


def digit_pixels(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits at their native 8x8 resolution (the 32 px images average-pooled back), flattened."""
    data = Digits(split)
    return F.avg_pool2d(data.images[:, :1].float() / 255, 4).flatten(1), data.labels


def test_probe_is_converged_like_logistic_regression():
    """On the digits' raw pixels the fast probe matches scikit-learn's (converged) logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    (x, y), (xv, yv) = digit_pixels("train"), digit_pixels("val")
    ours = probe_accuracy(fit_feature_probe(x, y, 10, FAST_RECIPE), xv, yv, 10)["top1"]
    scale = StandardScaler().fit(x.numpy())
    ref = LogisticRegression(max_iter=5000).fit(scale.transform(x.numpy()), y.numpy())
    theirs = 100.0 * ref.score(scale.transform(xv.numpy()), yv.numpy())  # 96.7 (ours: 96.1)
    assert ours > 94.0
    assert abs(ours - theirs) <= 1.5


def test_fast_probe_on_the_simclr_checkpoint(simclr_digits_ckpt, tmp_path, monkeypatch):
    """The fast probe on the session's 2-epoch SimCLR ResNet-18 (digits, 360 held-out images).

    Measured (two builds of this fixture checkpoint seen; the fixture is not bit-for-bit repeatable across
    sessions): pooled 90.8 / 94.4, layer1 98.9 / 95.8, layer2 97.2 / 96.9, layer3 96.4 / 96.9; the same probe
    on the raw pixels (8x8, the digits' native resolution) gets 96.1, and on a randomly initialised
    ResNet-18 95.6 (pooled) / 98.3 (layer1). So two epochs of SimCLR do NOT reliably beat the raw-pixel floor
    (nor random weights) with a linear probe, on any stage: the differences are a few images either way.
    What is asserted is what holds: every stage is far above chance (10%) and within 10 points of the pixel
    floor (shuffled labels or misaligned features would give ~10%)."""
    seen = []
    real = linear.fit_feature_probe

    def spy(x, *args, **kwargs):
        seen.append(x)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(linear, "fit_feature_probe", spy)
    record = run(bench_cfg(simclr_digits_ckpt, tmp_path, "bench=linear", "bench.stages=[pooled,layer1]"))
    metrics = record["metrics"]
    assert set(metrics) == {"top1_pooled", "top5_pooled", "top1_layer1", "top5_layer1"}
    assert record["headline"] == "top1_layer1" and record["val_images"] == 360
    (x, y), (xv, yv) = digit_pixels("train"), digit_pixels("val")
    floor = probe_accuracy(fit_feature_probe(x, y, 10, FAST_RECIPE), xv, yv, 10)["top1"]  # 96.1
    for stage in ("pooled", "layer1"):
        assert metrics[f"top1_{stage}"] > max(85.0, floor - 10.0), stage
        assert metrics[f"top5_{stage}"] > 97.0, stage
    # the probes trained on the 1437 training images' features, never on the held-out ones
    assert [len(s) for s in seen] == [1437, 1437]


@pytest.fixture
def protocol_ctx(simclr_digits_ckpt, tmp_path):
    return make_ctx(simclr_digits_ckpt, tmp_path, *FAKE, "bench=linear")


def test_protocol_heads_per_stage_and_the_backbone_stays_frozen(protocol_ctx, monkeypatch):
    ctx = protocol_ctx
    before = {k: v.clone() for k, v in ctx.encoder.backbone.state_dict().items()}
    loaders, heads = [], {}
    real_loader, real_fit = supervised.training_loader, supervised.fit

    def loader_spy(dataset, indices, *args, **kwargs):
        loaders.append((dataset, list(indices)))
        return real_loader(dataset, indices, *args, **kwargs)

    def fit_spy(model, *args, **kwargs):
        heads["before"] = {k: v.clone() for k, v in model.state_dict().items()}
        out = real_fit(model, *args, **kwargs)
        heads["after"] = model.state_dict()
        return out

    monkeypatch.setattr(supervised, "training_loader", loader_spy)
    monkeypatch.setattr(supervised, "fit", fit_spy)
    bench = LinearBenchmark(mode="protocol", stages=["pooled", "layer3"], epochs=2, batch_size=16)
    metrics = bench.run(ctx)
    assert set(metrics) == {"top1_pooled", "top5_pooled", "top1_layer3", "top5_layer3"}
    assert all(0.0 <= v <= 100.0 for v in metrics.values())
    assert bench.headline == "top1_layer3"
    # recipe=auto on a SimCLR checkpoint: LARS with BN before the linear layer
    assert recipe_for(ctx.encoder) == "simclr" and bench.resolve("simclr")[1] is True
    # the backbone (weights and BatchNorm statistics) is untouched; the heads trained
    after = ctx.encoder.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert set(heads["after"]) == {k for k in heads["after"] if k.startswith("heads.")}
    moved = [k for k in heads["before"] if k.endswith("fc.weight")]
    assert len(moved) == 2 and all(not torch.equal(heads["before"][k], heads["after"][k]) for k in moved)
    # trained on (all of) the training split, never on a held-out image
    assert len(loaders) == 2 and all(d is ctx.train and idx == list(range(64)) for d, idx in loaders)
    assert image_hashes(ctx.train).isdisjoint(image_hashes(ctx.val))


def test_protocol_recipe_options():
    bench = LinearBenchmark(mode="protocol", recipe="moco", epochs=10, batch_size=64)
    recipe, bn = bench.resolve("moco")
    assert (recipe.optimizer, recipe.lr, recipe.base_batch_size, recipe.policy) == ("sgd", 30.0, 256, "step")
    assert recipe.milestones == [6.0, 8.0] and recipe.batch_size == 64 and bn is False  # 60% / 80% of the run
    mae, bn = LinearBenchmark(mode="protocol", recipe="mae", epochs=9).resolve("mae")
    assert (mae.optimizer, mae.lr, mae.base_batch_size, mae.batch_size, bn) == ("lars", 0.1, 256, 16384, True)
    assert mae.warmup_epochs == pytest.approx(1.0)  # 10 of 90 epochs
    swav = LinearBenchmark(mode="protocol", lr=0.5, weight_decay=0.0).resolve("swav")[0]
    assert (swav.lr, swav.weight_decay, swav.epochs, swav.policy) == (0.5, 0.0, 100, "cosine")


def test_cli_writes_json_and_markdown(simclr_digits_ckpt, tmp_path):
    proc = run_tool(
        "selfsup.benchmark", "bench=linear", f"ckpt={simclr_digits_ckpt}", "device=cpu", f"out={tmp_path}", *FAKE
    )
    assert proc.returncode == 0, proc.stderr
    assert "linear top1_pooled = " in proc.stdout
    record = json.loads((tmp_path / "linear_fakeimages.json").read_text())
    assert set(record["metrics"]) == {"top1_pooled", "top5_pooled"}
    assert record["options"]["mode"] == "fast"
    rows = (tmp_path / "results.md").read_text().splitlines()
    assert len(rows) == 3 and "| linear | fakeimages | top1_pooled |" in rows[2]


def test_unknown_recipe_is_one_error_line(simclr_digits_ckpt, tmp_path, capsys):
    """What ``python -m selfsup.benchmark`` does with it (its ``main``, in this process)."""
    from selfsup.benchmark import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench=linear", "bench.recipe=byol", f"ckpt={simclr_digits_ckpt}", f"out={tmp_path}"])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("selfsup: error:") and "byol" in lines[0], lines


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stages": []}, "bench.stages"),
        ({"stages": ["pooled", "pooled"]}, "bench.stages"),
        ({"epochs": 0}, "bench.epochs"),
        ({"lr": 0.0}, "bench.lr"),
        ({"epochs": 2, "warmup_epochs": 3}, "warmup_epochs"),
        ({"crop_scale": [0.5]}, "bench.crop_scale"),
    ],
)
def test_bad_options(kwargs, match):
    from selfsup.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        LinearBenchmark(**kwargs)


def test_a_stage_of_the_checkpoint_beats_the_input_pixel_floor(simclr_digits_ckpt, tmp_path):
    """The issue's "the linear probe beats the raw-pixel floor on digits", stated for what holds: the same fast
    probe on the pixels the encoder sees (32 px, flattened: 93.6 measured) against the probe on layer2 of the
    2-epoch checkpoint (97.2 / 96.9 in the two builds seen). The digits' native 8x8 pixels are a harder
    floor (96.1) that two epochs do not reliably beat (see the test above); neither do random weights."""
    record = run(bench_cfg(simclr_digits_ckpt, tmp_path, "bench=linear", "bench.stages=[layer2]"))
    data = {split: Digits(split) for split in ("train", "val")}
    x, xv = ((data[s].images.float() / 255).flatten(1) for s in ("train", "val"))
    floor = probe_accuracy(fit_feature_probe(x, data["train"].labels, 10, FAST_RECIPE), xv, data["val"].labels, 10)
    assert 85.0 < floor["top1"] < record["metrics"]["top1_layer2"] - 1.0, (floor, record["metrics"])
