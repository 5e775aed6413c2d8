"""bench=finetune: layer-wise lr decay, the drop-path rebuild, end-to-end training that moves the backbone."""

from __future__ import annotations

import hashlib
import logging

import pytest
import torch

from selfsup.benchmark import BenchmarkConfig, run
from selfsup.config import compose_tool
from selfsup.data.datasets import FakeImages
from selfsup.data.views import Normalize
from selfsup.errors import ConfigError
from selfsup.eval import finetune, supervised
from selfsup.eval.bench import BenchContext
from selfsup.eval.encoder import eval_datasets, load_encoder
from selfsup.eval.finetune import FineTuneBenchmark, trainable_copy
from selfsup.eval.supervised import FineTuneClassifier, TrainRecipe, layer_decay_mults, make_optimizer
from selfsup.models.vit import VisionTransformer

FAKE = ["dataset=fake", "dataset.num_samples=64", "dataset.image_size=32", "dataset.num_classes=8"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_ctx(ckpt, out, *overrides: str) -> BenchContext:
    cfg = compose_tool("benchmark", BenchmarkConfig, [f"ckpt={ckpt}", "device=cpu", f"out={out}", *overrides])
    encoder = load_encoder(cfg.ckpt, cfg.device)
    train, val = eval_datasets(cfg, encoder)
    assert val is not None
    return BenchContext(encoder, train, val, out, cfg)


class TinyConvNet(torch.nn.Sequential):
    num_features = 8 * 4 * 4

    def __init__(self) -> None:
        conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        super().__init__(conv, torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten())


def test_the_supervised_loop_learns_an_easy_task():
    """The shared loop end to end (augmented loader, optimizer, schedule, evaluation) on learnable synthetic
    images: the held-out accuracy is high (wrong labels in training or evaluation would give ~25%)."""
    train, val = FakeImages("train", num_samples=64), FakeImages("val", num_samples=128)  # 4 classes, 32 val
    torch.manual_seed(0)
    model = FineTuneClassifier(TinyConvNet(), train.num_classes)
    recipe = TrainRecipe(epochs=10, batch_size=32, optimizer="sgd", lr=1.0, base_batch_size=256, weight_decay=1e-4)
    normalize = Normalize(train.mean, train.std, torch.device("cpu"))
    transform = supervised.train_transform(32, crop_scale=(0.6, 1.0))
    result = supervised.fit(
        model, train, range(len(train)), recipe, transform=transform, normalize=normalize, num_classes=train.num_classes
    )
    assert result.steps == 10 * 2 and result.lr == pytest.approx(1.0 * 32 / 256)
    acc = supervised.evaluate(model, val, normalize)
    assert set(acc) == {"pooled"} and set(acc["pooled"]) == {"top1"}  # no top-5 with 4 classes
    assert acc["pooled"]["top1"] >= 90.0  # measured 100; with shuffled training labels 22


def test_the_supervised_loop_is_repeatable():
    """Same seed: the same crops, order, MixUp draws and initial head, so the same weights."""
    train = FakeImages("train", num_samples=32)
    normalize = Normalize(train.mean, train.std, torch.device("cpu"))
    recipe = TrainRecipe(epochs=2, batch_size=8, optimizer="sgd", lr=1.0, base_batch_size=256, mixup=0.8, cutmix=1.0)
    states = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        model = FineTuneClassifier(TinyConvNet(), train.num_classes)
        transform = supervised.train_transform(32)
        supervised.fit(
            model, train, range(32), recipe, transform=transform, normalize=normalize, seed=seed, num_classes=4
        )
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_layer_decay_gives_each_parameter_its_lr():
    depth, decay, head_mult, lr = 3, 0.5, 10.0, 0.004
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2)
    model = FineTuneClassifier(vit, num_classes=5)
    mults = {**layer_decay_mults(vit, decay), "head.": head_mult}
    recipe = TrainRecipe(epochs=1, batch_size=8, optimizer="adamw", lr=lr, base_batch_size=8, weight_decay=0.05)
    recipe.lr_mults = mults
    optimizer, _, _ = make_optimizer(model, recipe, 8, 1, torch.device("cpu"))
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}

    def expected(name: str) -> float:
        if name.startswith(("backbone.patch_embed.", "backbone.cls_token")):
            return lr * decay ** (depth + 1)  # 0.5^4
        if name.startswith("backbone.blocks."):
            k = int(name.split(".")[2])
            return lr * decay ** (depth - k)  # blocks.0: 0.5^3 .. blocks.2: 0.5^1
        if name.startswith("head."):
            return lr * head_mult
        assert name.startswith("backbone.norm."), name
        return lr

    names = dict(model.named_parameters())
    assert len(lr_of) == len(names)
    for name, p in names.items():
        assert lr_of[id(p)] == pytest.approx(expected(name)), name
        no_decay = p.ndim <= 1 or name == "backbone.cls_token"
        assert wd_of[id(p)] == (0.0 if no_decay else 0.05), name
    # a ResNet has no blocks: no factors; decay 1.0 = off
    assert layer_decay_mults(torch.nn.Conv2d(3, 3, 1), 0.65) == {} and layer_decay_mults(vit, 1.0) == {}


def test_drop_path_rebuild_loads_every_weight(mae_digits_ckpt):
    encoder = load_encoder(mae_digits_ckpt, "cpu")
    net = trainable_copy(encoder, None, drop_path_rate=0.2)
    assert net is not encoder.backbone
    rates = [getattr(b.drop_path, "p", 0.0) for b in net.blocks]
    assert rates == pytest.approx([0.0, 0.2])  # linear in depth, as timm/MAE
    mine, theirs = net.state_dict(), encoder.backbone.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert all(p.requires_grad for p in net.parameters())


def test_finetune_vit_trains_the_backbone_and_leaves_the_encoder(mae_digits_ckpt, tmp_path, training_loaders):
    ctx = make_ctx(mae_digits_ckpt, tmp_path, *FAKE, "bench=finetune")
    before = {k: v.clone() for k, v in ctx.encoder.backbone.state_dict().items()}
    loaders = training_loaders
    bench = FineTuneBenchmark(epochs=2, batch_size=16, lr=0.02, mixup=0.8, cutmix=1.0)
    metrics = bench.run(ctx)
    assert set(metrics) == {"top1", "top5"} and all(0.0 <= v <= 100.0 for v in metrics.values())
    tuned = bench.model.backbone.state_dict()
    # every block moved, the encoder itself did not
    for k in ("patch_embed.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.0.weight", "norm.weight"):
        assert not torch.equal(tuned[k], before[k]), k
    after = ctx.encoder.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # trained on the training split only
    assert len(loaders) == 2 and all(d is ctx.train and idx == list(range(len(ctx.train))) for d, idx in loaders)
    hashes = {hashlib.sha1(ctx.val[i][0].numpy().tobytes()).hexdigest() for i in range(len(ctx.val))}
    assert not hashes & {hashlib.sha1(ctx.train[i][0].numpy().tobytes()).hexdigest() for i in range(len(ctx.train))}


def test_finetune_resnet_end_to_end(simclr_digits_ckpt, tmp_path, caplog):
    cfg = compose_tool(
        "benchmark",
        BenchmarkConfig,
        [f"ckpt={simclr_digits_ckpt}", "device=cpu", f"out={tmp_path}", *FAKE, "bench=finetune"]
        + ["bench.epochs=1", "bench.batch_size=32", "bench.optimizer=sgd", "bench.lr=0.5", "bench.base_batch_size=256"],
    )
    with caplog.at_level(logging.INFO, logger="selfsup"):
        record = run(cfg)
    assert set(record["metrics"]) == {"top1", "top5"} and record["headline"] == "top1"
    assert (tmp_path / "finetune_fakeimages.json").is_file()
    assert "| finetune | fakeimages | top1 |" in (tmp_path / "results.md").read_text()
    # a ResNet has no layers to decay and no drop path: both said, not silently applied
    assert "layer_decay=0.65 ignored" in caplog.text and "drop_path_rate=0.1 ignored" in caplog.text


def test_finetune_recipe_defaults():
    r = FineTuneBenchmark().recipe
    assert (r.optimizer, r.lr, r.base_batch_size, r.weight_decay, r.label_smoothing) == ("adamw", 2e-3, 1024, 0.05, 0.1)
    assert (r.epochs, r.warmup_epochs, r.policy, r.mixup, r.cutmix) == (100, 5.0, "cosine", 0.0, 0.0)
    assert FineTuneBenchmark(epochs=10).recipe.warmup_epochs == pytest.approx(0.5)  # 5% of the run
    bench = FineTuneBenchmark()
    assert (bench.layer_decay, bench.drop_path_rate) == (0.65, 0.1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layer_decay": 0.0}, "bench.layer_decay"),
        ({"drop_path_rate": 1.0}, "bench.drop_path_rate"),
        ({"label_smoothing": -0.1}, "bench.label_smoothing"),
        ({"epochs": 2, "warmup_epochs": 5}, "bench.warmup_epochs=5"),
        ({"schedule": "step", "milestones": [200]}, "bench.milestones"),
        ({"head_lr_mult": 0}, "bench.head_lr_mult"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FineTuneBenchmark(**kwargs)


def test_trainable_copy_is_a_copy(simclr_digits_ckpt):
    encoder = load_encoder(simclr_digits_ckpt, "cpu")
    net = finetune.trainable_copy(encoder, None, drop_path_rate=0.1)  # a ResNet: copied as is
    assert net is not encoder.backbone
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), encoder.backbone.state_dict().values()))
