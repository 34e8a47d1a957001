"""The optsearch console script, forked from a process that has imported its libraries once.

A command that evaluates spends about 8 s of a CI core importing torch, diffusers, open_clip and
transformers before it parses its spec; the suite runs some hundred of them. This server
imports them once per test process and forks a child per command: the child is a fresh
`optsearch` process in all a test can see (its own pid, arguments, environment, working
folder, stdout and stderr, exit status; `main()` runs once in it, as in the console script),
but for the seconds of imports. Only imports run before the fork (no thread, no torch op), so
the child starts as a new interpreter would. `optsearch_cmd` uses it where it passes no `env`
of its own (an environment read at import, e.g. huggingface_hub's HF_HOME, or one without
torch, needs a new interpreter).

Protocol, one JSON line each way: the test sends {"argv", "cwd", "env", "stdout", "stderr"}; the
server answers {"pid"} once forked and {"pid", "status"} (os.waitpid's) once the child ended.
A request with "status" (a file's path) is a process the test runs beside its own work (a
worker it signals, two workers at once): the server answers {"pid"} and goes on; a keeper
process waits for the child and writes its status, as JSON, to that file.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def _preload() -> None:
    """What the commands import (evaluating ones: seconds of it), nothing they compute."""
    import diffusers  # noqa: F401
    import open_clip  # noqa: F401
    import optuna  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import optsearch.cli.commands  # noqa: F401
    import optsearch.cli.main  # noqa: F401
    import optsearch.cli.preflight  # noqa: F401
    import optsearch.measure.evaluate  # noqa: F401
    import optsearch.measure.served  # noqa: F401
    import optsearch.optimize.worker  # noqa: F401


def _run_command(request: dict) -> None:
    """In the forked child: become `optsearch <argv>` and exit as the console script would."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path, mode in ((0, os.devnull, os.O_RDONLY),
                           (1, request["stdout"], os.O_WRONLY | os.O_TRUNC),
                           (2, request["stderr"], os.O_WRONLY | os.O_TRUNC)):
        opened = os.open(path, mode)
        os.dup2(opened, fd)
        os.close(opened)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a new interpreter has it
    if request.get("new_session"):
        os.setsid()
    sys.argv = list(request["argv"])
    from optsearch.cli import main

    sys.exit(main())  # the interpreter ends here: threads joined, atexit run, streams flushed


def _spawn(request: dict, answers) -> tuple[int, int]:
    """Fork a keeper that forks the command and writes its exit status to request["status"] once
    it ends: (the keeper's pid, for the server to reap; the command's, as soon as it runs)."""
    readable, writable = os.pipe()
    keeper = os.fork()
    if keeper == 0:
        answers.close()
        os.close(readable)
        pid = os.fork()
        if pid == 0:
            os.close(writable)
            _run_command(request)
        os.write(writable, f"{pid}\n".encode())
        os.close(writable)
        _, status = os.waitpid(pid, 0)
        written = request["status"] + ".part"
        with open(written, "w") as file:
            json.dump({"status": status}, file)
        os.replace(written, request["status"])  # whole, or not there
        os._exit(0)
    os.close(writable)
    with os.fdopen(readable) as pipe:
        return keeper, int(pipe.readline())


def serve() -> None:
    """Fork one child per request line on stdin, one at a time; end at EOF."""
    _preload()
    sys.path[0] = os.path.dirname(sys.argv[1])  # the console script's folder, as it has it
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # a child's prints go to its own files only
    keepers: set[int] = set()
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        keepers -= {pid for pid in keepers if os.waitpid(pid, os.WNOHANG)[0]}
        if request.get("status"):
            keeper, pid = _spawn(request, answers)
            keepers.add(keeper)
            answers.write(json.dumps({"pid": pid}) + "\n")
            continue
        pid = os.fork()
        if pid == 0:
            answers.close()
            _run_command(request)
        answers.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        answers.write(json.dumps({"pid": pid, "status": status}) + "\n")


if __name__ == "__main__":
    serve()
