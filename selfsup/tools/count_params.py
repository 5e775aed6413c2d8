"""Parameters of an algorithm per top-level module (backbone, neck, head, decoder, target, ...), all and
trainable, in millions and exact: MMSelfSup's ``count_parameters.py``. Buffers (BatchNorm statistics,
positional tables, memory banks) are not parameters and are not counted.

    python -m selfsup.tools.count_params                        # the default run: SimCLR, ResNet-18
    python -m selfsup.tools.count_params algo=mae backbone=vit_base
    python -m selfsup.tools.count_params ckpt=outputs/<run>/last.pt   # the algorithm a checkpoint holds
    python -m selfsup.tools.count_params algo=byol --json       # (or json=true) machine-readable

Every other argument is a Hydra override, composed as ``python -m selfsup.train`` composes it.
``ckpt=PATH`` rebuilds the algorithm from the config the checkpoint stores (``load_pretrained``), so it
takes no overrides. Bad input prints one line ``selfsup: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from torch import nn

from selfsup.errors import ConfigError
from selfsup.tools import run_cli

TOTAL = "total"
OWN = "(own)"  # parameters registered on the algorithm itself, outside any child module


def _count(params: Any) -> tuple[int, int]:
    """(all, trainable) element counts of an iterable of parameters."""
    total = trainable = 0
    for p in params:
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def count(model: nn.Module) -> dict[str, Any]:
    """``{"modules": [{"name", "params", "trainable"}, ...], "total": {"params", "trainable"}}`` of
    ``model``: one entry per top-level child that holds parameters (in registration order), then
    parameters of ``model`` itself if any. The total counts every parameter once (a parameter that two
    children share is in both rows but once in the total)."""
    rows = []
    for name, child in model.named_children():
        n, t = _count(child.parameters())
        if n:
            rows.append({"name": name, "params": n, "trainable": t})
    n, t = _count(model.parameters(recurse=False))
    if n:
        rows.append({"name": OWN, "params": n, "trainable": t})
    n, t = _count(model.parameters())
    return {"modules": rows, "total": {"params": n, "trainable": t}}


def _millions(n: int) -> str:
    return f"{n / 1e6:.5g}"  # MMSelfSup's format


def format_table(result: dict[str, Any]) -> str:
    rows = [*result["modules"], {"name": TOTAL, **result["total"]}]
    head = ("module", "params (M)", "trainable (M)", "params", "trainable")
    cells = [head] + [
        (r["name"], _millions(r["params"]), _millions(r["trainable"]), f"{r['params']:,}", f"{r['trainable']:,}")
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]

    def line(c: tuple[str, ...]) -> str:
        return "  ".join([c[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(c[1:], widths[1:], strict=True)])

    rule = "-" * len(line(head))
    title = f"{result['algo']} ({result['backbone']}) from {result['source']}"
    body = [line(c) for c in cells]
    return "\n".join([title, body[0], rule, *body[1:-1], rule, body[-1]])


def _fewest_samples(model_node: Any) -> int:
    """A dataset size the algorithm accepts in ``setup`` (its memory banks are buffers, not counted):
    ODC needs ``num_clusters x min_cluster`` images; the others take any number."""
    from selfsup.config import to_plain

    plain = to_plain(model_node)
    return max(1, int(plain.get("num_clusters") or 1) * max(1, int(plain.get("min_cluster") or 1)))


def count_config(overrides: list[str]) -> dict[str, Any]:
    """The counts of the algorithm ``python -m selfsup.train <overrides>`` would train (freshly built)."""
    from selfsup.config import compose, typed
    from selfsup.engine.build import build_algorithm

    cfg = typed(compose(overrides))
    algo = build_algorithm(cfg, _fewest_samples(cfg.algo.model))
    return _describe(algo, "config" + (f" ({' '.join(overrides)})" if overrides else ""))


def count_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The counts of the algorithm a checkpoint holds, rebuilt from its stored config."""
    from selfsup.engine.pretrained import existing_file, load_pretrained

    return _describe(load_pretrained(existing_file(path)).algo, str(path))


def _describe(algo: nn.Module, source: str) -> dict[str, Any]:
    backbone = getattr(algo, "backbone", None)
    name = getattr(backbone, "arch", None) or type(backbone).__name__
    return {"algo": type(algo).__name__, "backbone": str(name), "source": source, **count(algo)}


def parse(argv: list[str]) -> tuple[list[str], str | None, bool]:
    """(Hydra overrides, ckpt path or None, json?) from the command line."""
    overrides: list[str] = []
    ckpt: str | None = None
    as_json = False
    for arg in argv:
        key, eq, value = arg.partition("=")
        if arg == "--json":
            as_json = True
        elif eq and key == "json":
            if value.lower() not in ("true", "false"):
                raise ConfigError(f"json= takes true or false, got {value!r}")
            as_json = value.lower() == "true"
        elif eq and key == "ckpt":
            if not value:
                raise ConfigError("ckpt= needs a path: ckpt=outputs/<run>/last.pt")
            ckpt = value
        elif arg.startswith("-"):
            raise ConfigError(
                f"unknown option {arg}: count_params takes Hydra overrides (algo=mae backbone=vit_base), "
                "ckpt=PATH and --json"
            )
        else:
            overrides.append(arg)
    if ckpt is not None and overrides:
        raise ConfigError(
            f"ckpt= counts the algorithm with the config stored in the checkpoint; drop the overrides "
            f"({' '.join(overrides)}) or drop ckpt="
        )
    return overrides, ckpt, as_json


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return

    def count() -> tuple[dict[str, Any], bool]:
        overrides, ckpt, as_json = parse(argv)
        return (count_checkpoint(ckpt) if ckpt is not None else count_config(overrides)), as_json

    result, as_json = run_cli(count)
    print(json.dumps(result, indent=2) if as_json else format_table(result), flush=True)


if __name__ == "__main__":
    main()
