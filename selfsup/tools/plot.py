"""Training curves of one run or several, from ``metrics.jsonl``: loss, learning rate and kNN top-1.

::

    python -m selfsup.tools.plot outputs/simclr/2026-11-28_20-29-37-20510b     # -> <run>/curves.png
    python -m selfsup.tools.plot multirun/simclr/2026-11-28_21-00-00          # a sweep: every member overlaid
    python -m selfsup.tools.plot RUN_A RUN_B --out compare.png

One PNG, three panels sharing the x axis (optimizer steps; epochs on the top axis when every run has
the same steps per epoch): the loss of every ``train`` record with the per-epoch mean loss as markers,
the learning rate, and the kNN top-1 of every ``knn`` record. A RUN that is not itself a run dir (a
sweep dir, ``outputs/simclr``) stands for every run under it. Several runs are overlaid, one colour
each; the legend names a sweep member by its overrides (those that differ between the plotted runs)
and any other run by its directory. Default output: ``<RUN>/curves.png`` for a single RUN argument,
``./curves.png`` for several.

Lines of ``metrics.jsonl`` that are not JSON (torn by a crash mid-write) are skipped. A RUN that holds
no run, or runs without a single ``train`` record, print one ``selfsup: error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfsup.errors import DataError, SelfsupError
from selfsup.tools.runs import find_runs, read_metrics, read_overrides

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGSIZE = (10.0, 9.0)  # inches; at DPI, the PNG is 1000 x 900 pixels
DPI = 100
PANELS = (("loss", "loss"), ("lr", "learning rate"), ("top1", "kNN top-1"))


def expand(paths: Sequence[str | Path]) -> list[Path]:
    """The run dirs the arguments name: a run dir itself, or every run dir under a directory (a sweep)."""
    runs: list[Path] = []
    for arg in paths:
        path = Path(arg)
        if not path.is_dir():
            raise DataError(f"{arg}: no such directory")
        found = find_runs(path)
        if not found:
            raise DataError(f"{arg} holds no run (a run dir holds config.yaml, status.json or metrics.jsonl)")
        runs += [r for r in found if r not in runs]
    return runs


def _is_member(run_dir: Path) -> bool:
    """A sweep member: Hydra's ``<n>_<overrides>`` sub-dir of a ``multirun`` sweep dir."""
    return bool(re.match(r"\d+(_|$)", run_dir.name)) and (run_dir / ".hydra").is_dir()


def labels(runs: Sequence[Path]) -> list[str]:
    """Legend names: a sweep member's overrides that differ between ``runs`` (all of them if none
    differs), any other run's directory name."""
    overrides = {r: read_overrides(r) for r in runs}
    common = set.intersection(*(set(o) for o in overrides.values())) if len(runs) > 1 else set()
    out = []
    for r in runs:
        if _is_member(r) and overrides[r]:
            own = [o for o in overrides[r] if o not in common] or overrides[r]
            out.append(" ".join(own))
        else:
            out.append(r.name if len({x.name for x in runs}) == len(runs) else str(r))
    return out


def _series(records: list[dict[str, Any]], kind: str, field: str) -> tuple[list[float], list[float]]:
    points = [
        (float(r["step"]), float(r[field]))
        for r in records
        if r.get("kind") == kind and isinstance(r.get(field), (int, float)) and isinstance(r.get("step"), (int, float))
    ]
    return [p[0] for p in points], [p[1] for p in points]


def _steps_per_epoch(records: list[dict[str, Any]]) -> float | None:
    for r in records:
        if r.get("kind") == "epoch" and r.get("epoch") and r.get("step"):
            return float(r["step"]) / float(r["epoch"])
    return None


def plot_runs(runs: Sequence[Path], names: Sequence[str] | None = None) -> Figure:
    """A figure of loss, lr and kNN top-1 over steps, one line per run in each panel (epoch means and kNN
    points as markers, labelled ``_...`` so the legend lists each run once). Runs without a ``train``
    record are left out; none with one is an error."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    names = list(names) if names is not None else labels(runs)
    data = [(run, name, read_metrics(run)) for run, name in zip(runs, names)]
    data = [d for d in data if any(r.get("kind") == "train" for r in d[2])]
    if not data:
        which = ", ".join(str(r) for r in runs)
        raise DataError(f"nothing to plot: no train record in the metrics.jsonl of {which}")

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    axes = fig.subplots(len(PANELS), 1, sharex=True)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (_, name, records) in enumerate(data):
        color = colors[i % len(colors)]
        steps, loss = _series(records, "train", "loss")
        axes[0].plot(steps, loss, color=color, linewidth=1, label=name)
        steps, epoch_loss = _series(records, "epoch", "loss")
        axes[0].plot(steps, epoch_loss, "o", color=color, markersize=5, label=f"_{name} epoch mean")
        steps, lr = _series(records, "train", "lr")
        axes[1].plot(steps, lr, color=color, linewidth=1, label=name)
        steps, top1 = _series(records, "knn", "top1")
        axes[2].plot(steps, top1, "o-", color=color, linewidth=1, markersize=5, label=name)
    for ax, (_, title) in zip(axes, PANELS):
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")
    ratios = {_steps_per_epoch(records) for _, _, records in data}
    if len(ratios) == 1 and (spe := ratios.pop()):
        top = axes[0].secondary_xaxis("top", functions=(lambda s, k=spe: s / k, lambda e, k=spe: e * k))
        top.set_xlabel("epoch")
    axes[0].legend(loc="best", fontsize="small", ncol=1 + len(data) // 8)
    with warnings.catch_warnings():  # a long legend: tight_layout gives up, the figure is still fine
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
    return fig


def default_out(args: Sequence[str | Path]) -> Path:
    return Path(args[0]) / "curves.png" if len(args) == 1 else Path("curves.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m selfsup.tools.plot",
        description="Plot loss, lr and kNN top-1 of runs (a sweep dir: all its members) into one PNG.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="a run dir, or a directory of runs (a sweep)")
    parser.add_argument("--out", help="the PNG to write (default: RUN/curves.png; ./curves.png for several)")
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(ns.out) if ns.out else default_out(ns.runs)
    try:
        runs = expand(ns.runs)
        fig = plot_runs(runs)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            fig.savefig(out, dpi=DPI)
        except (OSError, ValueError) as e:  # a folder we cannot write to, an unknown image format
            raise DataError(f"cannot write {out}: {getattr(e, 'strerror', None) or e}") from e
    except SelfsupError as e:
        from selfsup.train import EXIT_USER_ERROR, report

        report(e)
        return EXIT_USER_ERROR
    print(f"{out} ({len(runs)} run(s))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
