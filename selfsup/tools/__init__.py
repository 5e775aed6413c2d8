"""Command-line tools: benchmarks, parameter counts, publishing, the run overview and training curves.

:func:`run_cli` is how each tool's ``main`` reports: a user error (bad option, missing or corrupt file)
becomes one ``selfsup: error: ...`` line and exit status 2, as in ``python -m selfsup.train``;
``HYDRA_FULL_ERROR=1`` shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_cli(body: Callable[[], T], verbose: bool = False) -> T:
    """Run a tool's ``body`` with warnings-level logging (``verbose``: selfsup's progress lines too, as
    ``[HH:MM:SS] message``); report user errors in one line and exit 2."""
    from selfsup.train import EXIT_USER_ERROR, report, user_error

    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    if verbose:
        logging.getLogger("selfsup").setLevel(logging.INFO)
    try:
        return body()
    except Exception as e:
        err = user_error(e)
        if err is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        report(err)
        sys.exit(EXIT_USER_ERROR)
