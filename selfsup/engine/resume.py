"""What may change when a run is resumed (the rule, applied by the trainer):

* **Free to change** — how the run is executed or watched, not what it learns: ``device``,
  ``precision``, ``compile``, ``compile_mode``, ``channels_last``, ``fused_optimizer``, ``deterministic``,
  ``dataset.cache``, ``data.decode``, ``loader.*``, ``checkpoint.*``, ``log.*``, ``knn.*``, ``dist.*``,
  ``launcher.*`` (and ``resume`` itself). (``data.executor`` is not: the two executors draw other views.)
* **Re-planned** — ``schedule.epochs``: the remaining steps follow the schedule of the new length (the
  lr at the resume step is that schedule's, so it can jump when the length changes; the log says so).
* **Allowed with a warning** — ``dataset.root`` / ``dataset.val_root`` (the same data moved).
* **Refused, with the list of differences** — everything else (the algorithm and its optimiser, the
  backbone, the dataset, the rest of the schedule, the seed, ...), unless ``resume_force=true``: then
  the new values apply from the resume step on.

Whatever the case, the optimiser's hyper-parameters (lr, weight decay, momentum, ...) are taken from the
current config and only its state (momentum buffers, Adam moments) from the checkpoint, so the lr the
log prints is the lr the run uses — also when the number of processes, and with it the linearly
scaled lr, changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

FREE = (
    "resume",
    "resume_force",
    "overwrite",
    "device",
    "precision",
    "compile",
    "compile_mode",
    "channels_last",
    "fused_optimizer",
    "deterministic",
    "dataset.cache",
    "data.decode",
    "loader.",
    "checkpoint.",
    "log.",
    "knn.",
    "dist.",
    "launcher.",
)
REPLANNED = ("schedule.epochs",)
# what a checkpoint written before a setting existed ran with (its config lacks the key)
ABSENT_MEANS = {"data.executor": "per_sample"}
WARNED = ("dataset.root", "dataset.val_root")


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> leaf values (lists are leaves)."""
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``key -> (checkpoint's value, current value)`` for every setting that differs."""
    a, b = flatten(old), flatten(new)
    for key, value in ABSENT_MEANS.items():
        if key in b:
            a.setdefault(key, value)
    return {
        k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)
    }


def classify(diff: Mapping[str, tuple[Any, Any]]) -> tuple[dict, dict, dict]:
    """(re-planned, warned, refused) subsets of ``diff``; free keys are dropped."""
    replanned, warned, refused = {}, {}, {}
    for key, values in diff.items():
        if _matches(key, FREE):
            continue
        if _matches(key, REPLANNED):
            replanned[key] = values
        elif _matches(key, WARNED):
            warned[key] = values
        else:
            refused[key] = values
    return replanned, warned, refused


def describe(diff: Mapping[str, tuple[Any, Any]], limit: int = 6) -> str:
    def short(v: Any) -> str:
        text = str(v)
        return text if len(text) <= 40 else text[:37] + "..."

    keys = sorted(diff, key=lambda k: (not k.endswith("_target_"), k))  # which classes changed, first
    items = [f"{k}: {short(diff[k][0])} -> {short(diff[k][1])}" for k in keys]
    return "; ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")
