"""``bench=svm`` (MMSelfSup's VOC07 SVM protocol) against toy data with known answers, an independent
re-implementation of MMSelfSup's scripts, AP by its definition, and end to end on the digits checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import LinearSVC

from conftest import run_tool
from selfsup.benchmark import BenchmarkConfig, run
from selfsup.config import compose_tool
from selfsup.errors import ConfigError
from selfsup.eval.svm import MMSELFSUP_COSTS, SVMBenchmark, svm_evaluate


def ap_by_definition(positive: np.ndarray, scores: np.ndarray) -> float:
    """Mean over the positives of the precision at each positive's rank (scores without ties)."""
    order = np.argsort(-scores, kind="stable")
    hits = positive[order].astype(bool)
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision_at[hits].mean())


def test_ap_definition_on_a_hand_example():
    # ranked: + - + - +  ->  precisions at the positives: 1/1, 2/3, 3/5
    scores = np.array([0.5, 0.9, 0.6, 0.8, 0.7])
    positive = np.array([1, 1, 0, 0, 1])
    assert ap_by_definition(positive, scores) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert average_precision_score(positive, scores) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)


def blobs(seed: int, classes: int, per_class: int, dim: int, spread: float):
    """Training and held-out features (float32, like the encoder's) of Gaussian blobs around random centres,
    ``per_class`` training and ``per_class // 2`` held-out images per class, labels cycling over the classes."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    out = []
    for n in (per_class, per_class // 2):
        y = np.arange(classes * n) % classes
        out += [(centres[y] + spread * rng.normal(size=(len(y), dim))).astype(np.float32), y]
    return out


def mmselfsup_reference(tx, ty, vx, vy, classes, costs, folds=3):
    """train_svm_kfold_parallel.py + test_svm.py as written in MMSelfSup (per class, per cost), with sklearn's
    AP on the held-out split; the folds are written out instead of cross_val_score's."""
    tx, vx = tx.astype(np.float64), vx.astype(np.float64)  # svm_helper.load_input_data
    tx = tx / (np.linalg.norm(tx, axis=1) + 1e-5)[:, None]
    vx = vx / (np.linalg.norm(vx, axis=1) + 1e-5)[:, None]
    cv_ap, chosen, scores = np.zeros((classes, len(costs))), [], []
    for c in range(classes):
        labels = np.where(ty == c, 1, -1)
        for j, cost in enumerate(costs):
            aps = []
            for fit_idx, test_idx in StratifiedKFold(folds).split(tx, labels):
                clf = LinearSVC(C=cost, class_weight={1: 2, -1: 1}, dual=True, max_iter=2000, random_state=0)
                clf.fit(tx[fit_idx], labels[fit_idx])
                aps.append(ap_by_definition(labels[test_idx] == 1, clf.decision_function(tx[test_idx])))
            cv_ap[c, j] = np.mean(aps)
        chosen.append(costs[int(np.argmax(cv_ap[c]))])
        clf = LinearSVC(C=chosen[-1], class_weight={1: 2, -1: 1}, dual=True, max_iter=2000, random_state=0)
        scores.append(clf.fit(tx, labels).decision_function(vx))
    return cv_ap, np.array(chosen), np.stack(scores, axis=1)


def test_matches_an_independent_implementation_of_mmselfsup():
    tx, ty, vx, vy = blobs(0, 4, 30, 16, spread=1.6)
    vx, vy = vx[: len(vx) - 3], vy[: len(vy) - 3]  # uneven classes
    costs = [1.0, 10.0, 0.5**4, 0.5**10]
    res = svm_evaluate(tx, ty, vx, vy, 4, costs=costs)
    cv_ap, chosen, scores = mmselfsup_reference(tx, ty, vx, vy, 4, costs)
    np.testing.assert_allclose(res.cv_ap, cv_ap, rtol=1e-6)
    np.testing.assert_array_equal(res.costs, chosen)
    assert len(set(chosen.tolist())) > 1  # the classes pick different costs: the per-class choice is tested
    np.testing.assert_allclose(res.scores, scores, rtol=1e-6, atol=1e-9)
    ap = [ap_by_definition(vy == c, scores[:, c]) for c in range(4)]
    np.testing.assert_allclose(res.ap, ap, rtol=1e-9)
    assert res.map == pytest.approx(np.mean(ap))
    assert res.top1 == pytest.approx(np.mean(scores.argmax(1) == vy))
    assert 0.5 < res.map < 1.0 and 0.4 < res.top1 < 1.0  # neither trivial nor chance: the comparison can fail


def test_separable_features_are_perfect():
    rng = np.random.default_rng(2)
    ty, vy = np.arange(60) % 6, np.arange(30) % 6
    tx = np.eye(6)[ty] + 0.05 * rng.normal(size=(60, 6))
    vx = np.eye(6)[vy] + 0.05 * rng.normal(size=(30, 6))
    res = svm_evaluate(tx, ty, vx, vy, 6, costs=[1.0, 0.01])
    assert res.map == 1.0 and res.top1 == 1.0
    assert np.all(res.ap == 1.0)


def test_random_labels_score_the_class_prior():
    rng = np.random.default_rng(3)
    tx, vx = rng.normal(size=(400, 16)), rng.normal(size=(800, 16))
    ty, vy = rng.integers(0, 4, 400), rng.integers(0, 4, 800)
    res = svm_evaluate(tx, ty, vx, vy, 4, costs=[0.1, 1.0])
    prior = np.bincount(vy, minlength=4) / len(vy)
    assert res.map == pytest.approx(prior.mean(), abs=0.04)  # 0.25
    assert res.top1 == pytest.approx(0.25, abs=0.05)


def test_costs_are_chosen_on_the_training_split_only():
    tx, ty, vx, vy = blobs(4, 5, 24, 12, spread=2.0)
    costs = [100.0, 1.0, 0.5**4, 0.5**8, 0.5**12]
    res = svm_evaluate(tx, ty, vx, vy, 5, costs=costs)
    shuffled = svm_evaluate(tx, ty, vx, np.random.default_rng(6).permutation(vy), 5, costs=costs)
    np.testing.assert_array_equal(res.cv_ap, shuffled.cv_ap)
    np.testing.assert_array_equal(res.costs, shuffled.costs)
    np.testing.assert_array_equal(res.scores, shuffled.scores)  # the SVMs never saw the held-out labels
    assert shuffled.map < res.map - 0.2  # while the held-out scores do depend on them


def test_rows_are_l2_normalised():
    tx, ty, vx, vy = blobs(7, 3, 20, 8, spread=1.5)
    rng = np.random.default_rng(9)
    scale_t, scale_v = rng.uniform(0.05, 20.0, (len(tx), 1)), rng.uniform(0.05, 20.0, (len(vx), 1))
    costs = [1.0, 0.5**6]
    plain = svm_evaluate(tx, ty, vx, vy, 3, costs=costs)
    scaled = svm_evaluate(tx * scale_t, ty, vx * scale_v, vy, 3, costs=costs)
    np.testing.assert_allclose(scaled.scores, plain.scores, rtol=1e-4, atol=1e-6)
    unnormalised = svm_evaluate(tx * scale_t, ty, vx * scale_v, vy, 3, costs=costs, normalize=False)
    assert not np.allclose(unnormalised.scores, plain.scores, rtol=1e-2)


def test_positive_weight_favours_the_positives():
    """Up-weighting the positives (MMSelfSup: class_weight {+1: 2, -1: 1}) raises their scores."""
    tx, ty, vx, vy = blobs(10, 4, 30, 6, spread=3.0)
    low = svm_evaluate(tx, ty, vx, vy, 4, costs=[1.0], positive_weight=0.5)
    high = svm_evaluate(tx, ty, vx, vy, 4, costs=[1.0], positive_weight=2.0)
    assert (high.scores.mean(0) > low.scores.mean(0) + 0.1).all()


@pytest.mark.slow  # starts worker processes
def test_parallel_jobs_give_the_same_result():
    """Processes, each with its own liblinear RNG (threads would share sklearn's global one)."""
    tx, ty, vx, vy = blobs(12, 3, 20, 8, spread=1.5)
    one = svm_evaluate(tx, ty, vx, vy, 3, costs=[1.0, 0.1])
    two = svm_evaluate(tx, ty, vx, vy, 3, costs=[1.0, 0.1], jobs=2)
    np.testing.assert_array_equal(one.scores, two.scores)
    np.testing.assert_array_equal(one.cv_ap, two.cv_ap)


def test_fits_stopping_at_max_iter_are_counted():
    tx, ty, vx, vy = blobs(17, 3, 12, 6, spread=1.0)
    assert svm_evaluate(tx, ty, vx, vy, 3, costs=[1.0, 0.1], max_iter=1).unconverged == 3 * (2 * 3 + 1)
    assert svm_evaluate(tx, ty, vx, vy, 3, costs=[1.0, 0.1]).unconverged == 0


def test_class_with_too_few_training_images():
    tx, ty, _, _ = blobs(14, 3, 10, 4, spread=1.0)
    ty = ty.copy()
    ty[ty == 2] = 0
    ty[:2] = 2  # class 2: two training images
    with pytest.raises(ConfigError, match=r"class\(es\) \[2\] have fewer training images \(2\) than bench.folds=3"):
        svm_evaluate(tx, ty, tx, ty, 3, costs=[1.0])


def test_class_without_held_out_images_is_left_out_of_the_map():
    tx, ty, vx, vy = blobs(15, 3, 12, 6, spread=1.0)
    keep = vy != 1
    res = svm_evaluate(tx, ty, vx[keep], vy[keep], 3, costs=[1.0])
    assert np.isnan(res.ap[1]) and res.map == pytest.approx(np.mean(res.ap[[0, 2]]))


def test_default_grid_is_mmselfsups():
    assert MMSELFSUP_COSTS[:3] == [1.0, 10.0, 100.0]
    assert MMSELFSUP_COSTS[3:] == [2.0**-n for n in range(4, 20)]
    bench = SVMBenchmark()
    assert bench.costs == MMSELFSUP_COSTS and bench.costs is not MMSELFSUP_COSTS
    assert (bench.folds, bench.positive_weight, bench.max_iter, bench.normalize) == (3, 2.0, 2000, True)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"costs": [1.0, -1.0]}, r"bench.costs must be a non-empty list of SVM costs > 0"),
        ({"costs": []}, r"bench.costs must be a non-empty list"),
        ({"folds": 1}, r"bench.folds must be >= 2"),
        ({"positive_weight": 0.0}, r"bench.positive_weight must be > 0"),
        ({"max_iter": 0}, r"bench.max_iter must be >= 1"),
        ({"jobs": 0}, r"bench.jobs must be >= 1, or -1"),
        ({"stages": []}, r"bench.stages must be a non-empty list of distinct"),
        ({"stages": ["pooled", "pooled"]}, r"bench.stages must be a non-empty list of distinct"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        SVMBenchmark(**options)


def test_benchmark_end_to_end(simclr_digits_ckpt, tmp_path):
    record = run(
        compose_tool(
            "benchmark",
            BenchmarkConfig,
            ["bench=svm", f"ckpt={simclr_digits_ckpt}", "device=cpu", f"out={tmp_path}", "bench.costs=[0.1,1]"],
        )
    )
    metrics = record["metrics"]
    assert record["bench"] == "svm" and record["headline"] == "map"
    assert 60.0 < metrics["map"] <= 100.0 and 50.0 < metrics["top1"] <= 100.0
    assert metrics["map"] == pytest.approx(np.mean([metrics[f"ap_{c}"] for c in range(10)]))
    assert {metrics[f"cost_{c}"] for c in range(10)} <= {0.1, 1.0}
    saved = json.loads(Path(record["json"]).read_text())
    assert saved["metrics"] == metrics and saved["options"]["costs"] == [0.1, 1.0]
    row = (tmp_path / "results.md").read_text().splitlines()[-1]
    assert "| svm | digits | map | " in row and f"top1 {metrics['top1']:.2f}" in row


@pytest.mark.slow  # two command-line runs
def test_cli_several_stages_another_dataset_and_a_bad_option(simclr_digits_ckpt, tmp_path):
    proc = run_tool(
        "selfsup.benchmark",
        "bench=svm",
        f"ckpt={simclr_digits_ckpt}",
        "dataset=fake",  # 256 + 64 synthetic images of 4 classes: any labelled dataset will do
        "device=cpu",
        f"out={tmp_path}",
        "bench.stages=[layer2,pooled]",
        "bench.costs=[1.0]",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "svm map_pooled = " in proc.stdout
    metrics = json.loads((tmp_path / "svm_fakeimages.json").read_text())["metrics"]
    assert set(metrics) == {
        *(f"{m}_{s}" for m in ("map", "top1") for s in ("layer2", "pooled")),
        *(f"{m}_{s}_{c}" for m in ("ap", "cost") for s in ("layer2", "pooled") for c in range(4)),
    }

    bad = run_tool("selfsup.benchmark", "bench=svm", f"ckpt={simclr_digits_ckpt}", "bench.costs=[-1]", "bench.folds=1")
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr
    assert lines[0].startswith("selfsup: error: bench.costs must be a non-empty list of SVM costs > 0")
