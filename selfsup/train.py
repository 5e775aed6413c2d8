"""``python -m selfsup.train [group=option ...] [key=value ...]``: self-supervised pretraining.

Examples::

    python -m selfsup.train                                  # SimCLR, ResNet-18, digits, CPU
    python -m selfsup.train algo=odc
    python -m selfsup.train algo=mae backbone=vit_small
    python -m selfsup.train backbone=resnet50 dataset=imagefolder dataset.root=/data/in1k/train
    python -m selfsup.train experiment=simclr_resnet50_8xb32-coslr-200e_in1k dataset.root=...
    python -m selfsup.train --cfg job                        # print the composed config
    python -m selfsup.train -m algo=simclr,odc schedule.epochs=2    # a Hydra multirun sweep
    python -m selfsup.train --config-dir ~/my_configs experiment=my_run   # your own config files

Mistakes in the command line or the data (unknown option, misspelt key, wrong type, missing
dataset root, bad checkpoint, ...) print one line ``selfsup: error: ...`` and exit with status 2.
Set ``HYDRA_FULL_ERROR=1`` to see the traceback instead.
"""

from __future__ import annotations

import os
import re
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from selfsup import distributed
from selfsup.config import CONFIG_DIR, CONFIG_NAME
from selfsup.errors import SelfsupError, TrainingInterrupted

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C
_USER_ERRORS = (SelfsupError, HydraException, OmegaConfBaseException)


def user_error(exc: BaseException) -> BaseException | None:
    """The user-facing error behind ``exc`` (following ``raise ... from``), or None for a bug."""
    seen: BaseException | None = exc
    found = None
    while seen is not None:
        if isinstance(seen, SelfsupError):
            return seen
        if found is None and isinstance(seen, _USER_ERRORS):
            found = seen
        seen = seen.__cause__ or seen.__context__
    if found is not None and "Error in call to target" in str(found):
        cause = found.__cause__
        # a TypeError from a constructor = a key the target does not take
        return found if isinstance(cause, (TypeError, ValueError)) else None
    return found


def one_line(exc: BaseException) -> str:
    """Collapse a (Hydra / OmegaConf / DataLoader-wrapped) message into one readable line."""
    if isinstance(exc, MissingMandatoryValue) and getattr(exc, "full_key", None):
        return f"{exc.full_key} is not set: pass {exc.full_key}=<value> on the command line"
    text = str(exc)
    if isinstance(exc, HydraException) and isinstance(exc.__cause__, OmegaConfBaseException):
        text += "\n" + str(exc.__cause__)  # e.g. "Could not override 'x'" + "Key 'x' not in 'Y'"
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep the last line
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = re.sub(r"^[\w.]+Error: ", "", last)
    text = text.split("Config search path:")[0]
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("full_key:", "object_type=", "reference_type=", "To append to your config")):
            continue
        lines.append(line)
    joined = " ".join(lines)
    joined = re.sub(r"Available options in '([^']+)': ", r"(available options in '\1': ", joined)
    if "(available options" in joined:
        head, opts = joined.split("(available options", 1)
        name, _, values = opts.partition(": ")
        joined = f"{head.strip()} (available options{name}: {', '.join(values.split())})"
    return joined


def report(exc: BaseException) -> None:
    print(f"selfsup: error: {one_line(exc)}", file=sys.stderr, flush=True)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=CONFIG_NAME)
def _task(cfg: DictConfig) -> float | None:
    from selfsup.config import typed
    from selfsup.engine.run_dir import agree_on_run_dir
    from selfsup.engine.trainer import Trainer

    try:
        typed_cfg = typed(cfg)
        # torchrun workers each composed their own config (and run id): all use rank 0's directory
        distributed.init(typed_cfg.device, typed_cfg.dist.backend, typed_cfg.dist.timeout_s)
        run_dir = agree_on_run_dir(HydraConfig.get().runtime.output_dir)
        result = Trainer(typed_cfg, run_dir).fit()
    except TrainingInterrupted as e:  # Ctrl-C: stopped cleanly at a step boundary
        print(f"selfsup: {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as e:  # inside the job: report user errors here, before Hydra wraps them
        err = user_error(e)
        if err is None or os.environ.get("SELFSUP_FULL_ERROR") == "1":
            raise
        report(err)
        raise SystemExit(EXIT_USER_ERROR) from None
    finally:
        distributed.shutdown()
    return result.final_loss


def main() -> None:
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    if full:
        os.environ["SELFSUP_FULL_ERROR"] = "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let composition errors reach us unformatted
    try:
        _task()
    except Exception as e:
        err = user_error(e)
        if full or err is None:
            raise
        report(err)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
