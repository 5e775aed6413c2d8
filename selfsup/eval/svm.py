"""Linear SVMs on frozen features, scored by mean average precision: the VOC07 SVM benchmark of
MMSelfSup (``tools/benchmarks/classification/svm_voc07``: ``train_svm_kfold_parallel.py``,
``test_svm.py``, ``svm_helper.py``, inherited from fair_self_supervision_benchmark), on any labelled
dataset.

Protocol (defaults = MMSelfSup's)::

    x <- x / (||x||_2 + 1e-5)                     every row, train and held-out (svm_helper.normalize_features)
    for each class c:                             one vs rest: y = +1 for class c, -1 otherwise
        for each cost C in the grid:              {1, 10, 100} + {0.5^4 .. 0.5^19}
            LinearSVC(C, squared hinge, L2 penalty, dual, class_weight {+1: 2, -1: 1}, max_iter 2000)
            cv_ap[c, C] = mean AP over a 3-fold stratified split of the TRAINING split (sklearn cross_validate)
        cost[c] = the first C of the grid with the highest cv_ap  (the held-out split is never looked at)
        refit on the whole training split with cost[c]; score the held-out split (decision_function)
    ap[c] = average_precision_score(held-out y == c, scores[:, c]);  map = mean_c ap[c]
    top1 = accuracy of argmax_c scores[:, c]      (a multi-class reading of the same SVMs; not in MMSelfSup)

Reported in percent: ``map`` (the headline) and ``top1``; with several ``stages`` ``map_<stage>`` and
``top1_<stage>`` for each, the headline being the last stage's. Up to 20 classes (VOC07 has 20) the
metrics also hold each class's AP ``ap_<c>`` and chosen cost ``cost_<c>`` (``ap_<stage>_<c>``,
``cost_<stage>_<c>`` with several stages); with more classes they are only logged.

Differences from MMSelfSup, all deliberate:

* Features: ``stages`` are this project's stage features (``pooled`` = the encoder's feature; ``stem``,
  ``layer1`` .. ``layer4`` = MMSelfSup's ``feat1`` .. ``feat5``), globally average-pooled. MMSelfSup's
  ``extract.py`` pools ResNet-50 maps to about 9k dimensions per stage (``MultiPooling``); only ``feat5``
  (2048-d, global pooling) is the same.
* Held-out AP: sklearn's ``average_precision_score``, the non-interpolated AP (mean over positives of the
  precision at each positive's rank), as in the cross-validation. MMSelfSup's ``test_svm.py`` scores the
  test set with ``svm_helper.calculate_ap``, the area under the monotone precision envelope, which is
  never lower (digits, the tests' 2-epoch SimCLR checkpoint: 96.74 here, 96.84 by the envelope).
* ``random_state`` of the SVMs is the benchmark's ``seed``, so reruns are identical (MMSelfSup sets none).
* Cost: MMSelfSup's whole grid by default: 10 classes x 19 costs x 3 folds + 10 refits = 580 fits take
  about 21 s of one CPU core on 1,437 digits features of 512-d, most of it in the C = 100 fits, which
  stop at ``max_iter`` (as MMSelfSup's do; counted in the log). ``jobs`` spreads the fits over
  processes as MMSelfSup's ``multiprocessing.Pool`` does, with the same results; a shorter grid
  (``bench.costs=[0.1,1,10]``) is faster.

Single-label data (digits, CIFAR-10, class folders) give every image exactly one positive class, so each
one-vs-rest problem has ~1/K positives. VOC07 itself is multi-label (an image is positive for every
class it contains) and marks "difficult" objects: MMSelfSup trains with them as negatives and leaves
them out of the test AP. That needs per-class targets in {-1, 0, 1} that no dataset here provides; a
VOC reader is not implemented.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import average_precision_score
from sklearn.model_selection import cross_validate
from sklearn.svm import LinearSVC
from sklearn.utils.parallel import Parallel, delayed

from selfsup.errors import ConfigError
from selfsup.eval.bench import POOLED, BenchContext, Benchmark

log = logging.getLogger("selfsup")

# svm_helper.parse_cost_list("1.0,10.0,100.0") as MMSelfSup's eval_svm_full.sh calls it
MMSELFSUP_COSTS: list[float] = [1.0, 10.0, 100.0] + [0.5**n for n in range(4, 20)]
PER_CLASS_METRICS_MAX = 20  # per-class AP / cost go into the metrics up to this many classes (VOC07: 20)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm + 1e-5, in float64 (``svm_helper.normalize_features``)."""
    x = np.asarray(x, dtype=np.float64)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-5)


def make_svc(cost: float, positive_weight: float = 2.0, max_iter: int = 2000, seed: int = 0) -> LinearSVC:
    """MMSelfSup's per-class SVM (``train_svm_kfold_parallel.py``); labels are +1 / -1."""
    return LinearSVC(
        C=cost,
        class_weight={1: positive_weight, -1: 1.0},
        intercept_scaling=1.0,
        penalty="l2",
        loss="squared_hinge",
        tol=1e-4,
        dual=True,
        max_iter=max_iter,
        random_state=seed,
    )


def _hit_max_iter(svc: LinearSVC) -> int:
    return int(svc.n_iter_ >= svc.max_iter)


@dataclass
class SVMResult:
    cv_ap: np.ndarray  # [classes, costs] mean cross-validation AP on the training split
    costs: np.ndarray  # [classes] the chosen cost of each class
    scores: np.ndarray  # [held-out, classes] decision_function of each class's SVM
    ap: np.ndarray  # [classes] held-out AP (NaN for a class with no held-out image)
    map: float  # mean of the defined APs
    top1: float  # accuracy of argmax over the classes' scores
    unconverged: int  # fits that stopped at max_iter


def svm_evaluate(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    num_classes: int,
    costs: list[float] = MMSELFSUP_COSTS,
    folds: int = 3,
    positive_weight: float = 2.0,
    max_iter: int = 2000,
    normalize: bool = True,
    jobs: int = 1,
    seed: int = 0,
) -> SVMResult:
    """The protocol of the module docstring on single-label data (labels in ``0 .. num_classes-1``).
    APs and accuracy are fractions here."""
    train_y, val_y = np.asarray(train_y), np.asarray(val_y)
    counts = np.bincount(train_y, minlength=num_classes)
    if counts.min() < folds:
        thin = [c for c in range(num_classes) if counts[c] < folds]
        raise ConfigError(
            f"bench=svm: class(es) {thin} have fewer training images ({counts[thin].min()}) than "
            f"bench.folds={folds}; {folds}-fold cross-validation needs at least {folds} per class: "
            "lower bench.folds or use a dataset with more images per class"
        )
    if normalize:
        train_x, val_x = l2_normalize(train_x), l2_normalize(val_x)
    else:
        train_x, val_x = np.asarray(train_x, dtype=np.float64), np.asarray(val_x, dtype=np.float64)
    targets = [np.where(train_y == c, 1, -1) for c in range(num_classes)]

    def svc(cost: float) -> LinearSVC:
        return make_svc(cost, positive_weight, max_iter, seed)

    # Processes, not threads: liblinear shuffles with one RNG global to the process (sklearn's _newrand),
    # so threads would draw from it in turn and the fits would change from run to run. The workers run
    # sklearn's own functions, so they import sklearn, not this package (and torch); sklearn's Parallel
    # hands them the warning filters: a fit stopping at max_iter is counted here, not warned about.
    parallel = Parallel(n_jobs=jobs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        cv = parallel(
            delayed(cross_validate)(
                svc(k), train_x, targets[c], cv=folds, scoring="average_precision", return_estimator=True
            )
            for c in range(num_classes)
            for k in costs
        )
        cv_ap = np.array([run["test_score"].mean() for run in cv]).reshape(num_classes, len(costs))
        chosen = np.array(costs, dtype=np.float64)[cv_ap.argmax(axis=1)]  # the first best, as test_svm.py
        fits = parallel(delayed(LinearSVC.fit)(svc(chosen[c]), train_x, targets[c]) for c in range(num_classes))
    unconverged = sum(_hit_max_iter(m) for run in cv for m in run["estimator"]) + sum(map(_hit_max_iter, fits))

    scores = np.stack([model.decision_function(val_x) for model in fits], axis=1)
    ap = np.full(num_classes, np.nan)
    for c in range(num_classes):
        if (val_y == c).any():
            ap[c] = average_precision_score(val_y == c, scores[:, c])
    top1 = float((scores.argmax(axis=1) == val_y).mean())
    return SVMResult(cv_ap, chosen, scores, ap, float(np.nanmean(ap)), top1, unconverged)


class SVMBenchmark(Benchmark):
    """``bench=svm``: per-class linear SVMs on frozen features, cost chosen by cross-validated AP on the
    training split, held-out mAP and top-1 (MMSelfSup's VOC07 SVM; see the module docstring).

    Args:
        stages: features to score, each on its own: ``pooled`` (the encoder's feature), ``stem``,
            ``layer1`` .. ``layer4`` (MMSelfSup's feat1 .. feat5), ``block<i>``, ``last``.
        costs: the SVM cost grid searched per class (MMSelfSup: 1, 10, 100, 0.5^4 .. 0.5^19).
        folds: cross-validation folds of the training split.
        positive_weight: class weight of the positives (negatives: 1).
        max_iter: liblinear iterations per fit.
        normalize: L2-normalise every feature row first (MMSelfSup does).
        jobs: processes for the fits (joblib; -1 = every core).
    """

    name = "svm"
    headline = "map"

    def __init__(
        self,
        stages: list[str] = [POOLED],  # noqa: B006 - Hydra passes lists
        costs: list[float] = MMSELFSUP_COSTS,
        folds: int = 3,
        positive_weight: float = 2.0,
        max_iter: int = 2000,
        normalize: bool = True,
        jobs: int = 1,
    ) -> None:
        stages, costs = [str(s) for s in stages], [float(c) for c in costs]
        if not stages or len(set(stages)) != len(stages):
            raise ConfigError(f"bench.stages must be a non-empty list of distinct stage names, got {stages}")
        if not costs or not all(np.isfinite(c) and c > 0 for c in costs):
            raise ConfigError(f"bench.costs must be a non-empty list of SVM costs > 0, got {costs}")
        if folds < 2:
            raise ConfigError(f"bench.folds must be >= 2 (cross-validation folds of the training split), got {folds}")
        if not positive_weight > 0:
            raise ConfigError(f"bench.positive_weight must be > 0, got {positive_weight}")
        if max_iter < 1:
            raise ConfigError(f"bench.max_iter must be >= 1, got {max_iter}")
        if jobs == 0 or jobs < -1:
            raise ConfigError(f"bench.jobs must be >= 1, or -1 for every core, got {jobs}")
        self.stages, self.costs, self.folds = stages, costs, int(folds)
        self.positive_weight, self.max_iter = float(positive_weight), int(max_iter)
        self.normalize, self.jobs = bool(normalize), int(jobs)
        if len(stages) > 1:
            self.headline = f"map_{stages[-1]}"  # type: ignore[misc]

    def run(self, ctx: BenchContext) -> dict[str, Any]:
        train, train_y = ctx.features(ctx.train, self.stages)
        val, val_y = ctx.features(ctx.val, self.stages)
        k = ctx.num_classes
        metrics: dict[str, Any] = {}
        for stage in self.stages:
            start = time.perf_counter()
            res = svm_evaluate(
                train[stage].numpy(),
                train_y.numpy(),
                val[stage].numpy(),
                val_y.numpy(),
                k,
                self.costs,
                self.folds,
                self.positive_weight,
                self.max_iter,
                self.normalize,
                self.jobs,
                ctx.cfg.seed,
            )
            fits = k * (len(self.costs) * self.folds + 1)
            log.info(
                "svm %s (%d-d): mAP %.2f, top-1 %.2f; %d fits in %.1f s",
                stage,
                train[stage].shape[1],
                100 * res.map,
                100 * res.top1,
                fits,
                time.perf_counter() - start,
            )
            per_class = (f"{c}: {100 * ap:.1f} @ {cost:g}" for c, (ap, cost) in enumerate(zip(res.ap, res.costs)))
            log.info("svm %s per class (AP %%, cost): %s", stage, ", ".join(per_class))
            if res.unconverged:  # the protocol's: with MMSelfSup's grid the C = 100 fits usually stop there
                log.info("svm %s: %d of %d fits stopped at max_iter=%d", stage, res.unconverged, fits, self.max_iter)
            missing = [c for c in range(k) if np.isnan(res.ap[c])]
            if missing:
                log.warning("svm %s: class(es) %s have no held-out image; mAP is over the others", stage, missing)
            sfx = f"_{stage}" if len(self.stages) > 1 else ""
            metrics[f"map{sfx}"] = 100.0 * res.map
            metrics[f"top1{sfx}"] = 100.0 * res.top1
            if k <= PER_CLASS_METRICS_MAX:
                metrics.update({f"ap{sfx}_{c}": 100.0 * float(res.ap[c]) for c in range(k) if c not in missing})
                metrics.update({f"cost{sfx}_{c}": float(res.costs[c]) for c in range(k)})
        return metrics
