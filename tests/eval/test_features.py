"""Feature extraction for the kNN monitor (and every later benchmark) against features computed by
hand: the dataset's deterministic eval transform, scaling to [0, 1], mean/std normalisation, the
backbone in eval mode."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from conftest import compose_cfg, tiny
from selfsup.data.datasets import InMemoryImages
from selfsup.data.views import Normalize
from selfsup.eval.features import extract_features
from selfsup.eval.knn import knn_accuracy

MEAN, STD = (0.3, 0.5, 0.7), (0.2, 0.25, 0.3)


def _by_hand(images: torch.Tensor, size: int, mean=MEAN, std=STD) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> resize the short side to ``size``, centre-crop, [0, 1], (x - mean) / std."""
    out = []
    for img in images:
        x = TF.center_crop(TF.resize(img, [size], antialias=True), [size, size]).double() / 255.0
        out.append((x - torch.tensor(mean, dtype=torch.float64)[:, None, None]) / torch.tensor(std)[:, None, None])
    return torch.stack(out)


def test_extract_features_uses_eval_transform_and_normalisation():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (7, 3, 40, 48), dtype=torch.uint8, generator=gen)
    data = InMemoryImages(images, torch.arange(7) % 3, 3, image_size=32, mean=MEAN, std=STD)
    weight = torch.randn(3 * 32 * 32, 4, generator=gen, dtype=torch.float64)
    fn = lambda x: (x.double().flatten(1) @ weight).float()  # noqa: E731
    feats, labels = extract_features(fn, data, Normalize(MEAN, STD, torch.device("cpu")), batch_size=3)
    expected = (_by_hand(images, 32).flatten(1) @ weight).float()
    assert feats.shape == (7, 4) and torch.equal(labels, torch.arange(7) % 3)
    torch.testing.assert_close(feats, expected, atol=1e-4, rtol=1e-5)
    # without the normalisation the features are far off: the comparison can fail
    raw = (_by_hand(images, 32, mean=(0, 0, 0), std=(1, 1, 1)).flatten(1) @ weight).float()
    assert (raw - expected).abs().max() > 1.0


def test_trainer_knn_uses_backbone_features_of_normalised_eval_images(tmp_path):
    """The trainer's kNN monitor = weighted kNN over backbone features computed by hand (eval mode:
    BatchNorm running statistics, no dropout), bank = train split, queries = val split."""
    from selfsup.engine.trainer import Trainer

    trainer = Trainer(compose_cfg(tiny("simclr") + ["dataset.std=[0.2,0.3,0.4]", "knn.k=5"]), tmp_path)
    backbone = trainer.algo.backbone
    with torch.no_grad():  # BN running statistics differ from a fresh batch's: eval mode matters
        trainer.algo.train()(
            trainer.to_device(
                {
                    "views": [trainer.train_set.images[:16]] * 2,
                    "index": torch.arange(16),
                    "label": torch.zeros(16, dtype=torch.long),
                }
            )
        )
    train_set, val_set = trainer.train_set, trainer.val_set
    assert val_set is not None and len(val_set) == 16

    def features(ds) -> torch.Tensor:
        x = _by_hand(ds.images, 32, mean=ds.mean, std=ds.std).float()
        with torch.no_grad():
            return backbone.eval()(x)

    bank, queries = features(train_set), features(val_set)
    backbone.train()
    got, _ = trainer._extract(trainer.algo.extract, train_set)
    torch.testing.assert_close(got, bank, atol=1e-4, rtol=1e-4)
    assert trainer.algo.training  # the trainer puts the model back in training mode
    expected = knn_accuracy(queries, val_set.labels, bank, train_set.labels, train_set.num_classes, k=5)
    assert trainer.knn() == expected


def test_stage_features_end_in_the_backbones_own_feature():
    """stem/layer1..layer4 (ResNet) and block1..blockN (ViT) are pooled stage outputs with the stages' widths;
    the last stage is what the backbone itself returns (layer4 avg-pooled; the ViT's normalised CLS)."""
    from selfsup.eval.features import stage_features, stage_names
    from selfsup.models.resnet import ResNet
    from selfsup.models.vit import VisionTransformer

    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    resnet = ResNet("resnet18").eval()
    names = stage_names(resnet)
    assert names == ["stem", "layer1", "layer2", "layer3", "layer4"]
    feats = stage_features(resnet, x, names)
    assert [f.shape[1] for f in feats.values()] == [64, 64, 128, 256, 512]
    torch.testing.assert_close(feats["layer4"], resnet(x))
    assert stage_features(resnet, x, ["last"]).keys() == {"layer4"}
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2).eval()
    assert stage_names(vit) == ["block1", "block2", "block3"]
    feats = stage_features(vit, x, ["block1", "block3"])
    torch.testing.assert_close(feats["block3"], vit(x))
    assert not torch.allclose(feats["block1"], feats["block3"])
    mean = stage_features(vit, x, ["block3"], token="mean")["block3"]
    tokens = torch.cat([(vit.cls_token + vit.pos_embed[:, :1]).expand(3, -1, -1), vit.embed(x)], 1)
    torch.testing.assert_close(mean, vit.norm(vit.blocks(tokens))[:, 1:].mean(1))


def test_unknown_stage_is_one_clear_error():
    from selfsup.errors import ConfigError
    from selfsup.eval.features import stage_features
    from selfsup.models.resnet import ResNet

    with pytest.raises(ConfigError, match="unknown stage.*layer5.*choose from stem, layer1"):
        stage_features(ResNet("resnet18"), torch.zeros(1, 3, 32, 32), ["layer5"])
