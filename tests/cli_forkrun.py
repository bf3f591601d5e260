"""Runs many run.py command lines, paying Python's and JAX's start-up once (for tests).

    python tests/cli_forkrun.py < cases.json > results.json

cases.json: [{"argv": [...], "env": {...}}, ...]. After importing grok1.cli (and with it JAX,
whose backend is not started yet), each case runs in a forked child exactly as run.py runs it,
`cli.main(argv)`, with stdin empty and stdout / stderr captured; a few children run at a time.
results.json: [{"status": exit status, "stdout": text, "stderr": text}, ...] in case order.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from grok1 import cli  # noqa: E402

PARALLEL = 3


def child(case: dict, out: str, err: str) -> None:
    os.chdir(ROOT)
    os.environ.update(case.get("env", {}))
    for fd, path, flags in (
        (0, os.devnull, os.O_RDONLY),
        (1, out, os.O_WRONLY),
        (2, err, os.O_WRONLY),
    ):
        target = os.open(path, flags)
        os.dup2(target, fd)
        os.close(target)
    status = 99
    try:
        status = cli.main(case["argv"])
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def main() -> None:
    cases = json.load(sys.stdin)
    tmp = tempfile.mkdtemp(prefix="cli_forkrun")
    files = [
        (os.path.join(tmp, f"{i}.out"), os.path.join(tmp, f"{i}.err")) for i in range(len(cases))
    ]
    for out, err in files:
        open(out, "w").close()
        open(err, "w").close()
    running, status = {}, {}
    sys.stdout.flush()
    for i, case in enumerate(cases):
        while len(running) >= PARALLEL:
            pid, code = os.wait()
            status[running.pop(pid)] = os.waitstatus_to_exitcode(code)
        pid = os.fork()
        if pid == 0:
            child(case, *files[i])
        running[pid] = i
    while running:
        pid, code = os.wait()
        status[running.pop(pid)] = os.waitstatus_to_exitcode(code)
    results = []
    for i in range(len(cases)):
        out, err = (open(f, encoding="utf-8", errors="replace").read() for f in files[i])
        results.append({"status": status[i], "stdout": out, "stderr": err})
    shutil.rmtree(tmp)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
