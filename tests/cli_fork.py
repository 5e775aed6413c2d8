"""Run many ``python -m selfsup.train <args>`` command lines cheaply: one warm process imports selfsup.train (torch,
torchvision, Hydra: ~3 s of CPU per interpreter on a small machine) and forks a child per command line, which runs
the module as ``__main__`` with its own argv, working directory, environment variables, stdout and stderr (files),
and exit status, exactly as a fresh interpreter would from that point on.

Protocol: one JSON object per stdin line, {"args", "cwd", "env", "stdout", "stderr"} (file paths); the server runs
up to ``SELFSUP_FORK_JOBS`` children at a time and, once all have ended, prints {"code": exit status} per request,
in the order asked. ``tests/test_cli.py`` runs its 42 bad-input command lines through it. The warm process only
imports (no torch operation has run in it), so forking it is safe.
"""

from __future__ import annotations

import json
import os
import runpy
import sys

import selfsup.train  # noqa: F401  (imported once here: torch, torchvision, Hydra, selfsup)


def _child(request: dict) -> None:
    os.chdir(request["cwd"])
    os.environ.update(request["env"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.argv = ["selfsup.train", *request["args"]]
    code = 0
    try:
        runpy.run_module("selfsup.train", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - what the interpreter would print
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    requests = [json.loads(line) for line in sys.stdin if line.strip()]
    jobs = max(1, int(os.environ.get("SELFSUP_FORK_JOBS", "2")))
    running: dict[int, int] = {}  # pid -> request number
    codes: dict[int, int] = {}
    pending = list(enumerate(requests))
    while pending or running:
        while pending and len(running) < jobs:
            number, request = pending.pop(0)
            pid = os.fork()
            if pid == 0:
                _child(request)
            running[pid] = number
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    for number in range(len(requests)):
        print(json.dumps({"code": codes[number]}), flush=True)


if __name__ == "__main__":
    main()
