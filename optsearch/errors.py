"""Every error optsearch raises on purpose, in one place.

`UserError` is the base of what the user fixes (a spec, an option, a path, a study name): the CLI
prints it in one line and exits 2. `NothingToExport` means the study has no answer yet (exit 3).
Running out of memory is the spec's batch not fitting the device: exit 2 too.
`StorageUnreachable` is a storage that did not answer (exit 75, sysexits' EX_TEMPFAIL): the same
command may work in a minute, so an orchestrator retries it where it gives up on exit 2.
Anything else is a fault of ours or of a library (exit 1).
"""

from __future__ import annotations

EXIT_RUNTIME, EXIT_USAGE, EXIT_NOTHING, EXIT_TEMPFAIL = 1, 2, 3, 75


class UserError(Exception):
    """Bad input that the user fixes. Exit 2."""


class UsageError(UserError):
    """An option, a value or a study name is wrong."""


class SpecError(UserError):
    """A spec (or a command-line override of it) is invalid; `problems` holds one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class PromptError(UserError):
    """The prompt source cannot deliver the prompts asked for."""


class ModelLoadError(UserError):
    """The pipeline could not be loaded (missing folder, unknown hub id, bad dtype/device)."""


class StorageError(UserError):
    """The storage URL is malformed or the database cannot be reached."""


class StorageUnreachable(StorageError):
    """The database or storage proxy did not answer (refused, timed out, starting up): not a
    mistake in the command, which may work once the storage is up. Exit 75."""


class NothingToExport(Exception):
    """The study has no feasible trial yet. Exit 3."""


def exit_code_for(error: BaseException) -> int:
    if isinstance(error, NothingToExport):
        return EXIT_NOTHING
    if isinstance(error, StorageUnreachable):
        return EXIT_TEMPFAIL
    if isinstance(error, UserError) or out_of_memory(error):
        return EXIT_USAGE
    return EXIT_RUNTIME


def out_of_memory(error: BaseException) -> bool:
    """torch's (CUDA, MPS) or the host's out-of-memory: the spec's batch does not fit the device,
    which the user changes (told by name: this module loads no torch)."""
    return isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"


def error_text(error: BaseException) -> str:
    """What an error says, in one line: its first line; an out-of-memory's as far as it tells the
    user something: CUDA's first three sentences (what it tried to allocate, and what the GPU
    holds and has free), not its advice on the allocator's settings and the documentation's
    address that follow."""
    if not out_of_memory(error):
        return first_line(error)
    sentences = first_line(error).split(". ")
    return ". ".join(sentences[:3]).rstrip(".") + ("." if len(sentences) > 1 else "")


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def problem_lines(error: BaseException) -> list[str]:
    """The lines that tell the user what went wrong: one per spec problem, else the message's
    first line (a fault of ours names its type). Not masked: the caller masks what it prints."""
    if isinstance(error, SpecError):
        return list(error.problems)
    text = first_line(error) if str(error).strip() else ""
    if out_of_memory(error):  # a command's own batch (evaluate, study confirm, a notebook's search)
        return [f"out of memory ({error_text(error)}): the spec's prompts.batch_size does not fit "
                "this device; lower it"]
    if exit_code_for(error) == EXIT_RUNTIME:
        text = f"{type(error).__name__}: {text} (OPTSEARCH_DEBUG=1 shows the traceback)"
    return [text]
