"""Which failures are the user's to fix (exit 2) and how each becomes one readable line."""

from __future__ import annotations

from .masking import mask_text

EXIT_RUNTIME, EXIT_USAGE, EXIT_NOTHING = 1, 2, 3


class UsageError(Exception):
    """Bad input that the user fixes: an option, a value, a study name. Exit 2."""


class NothingToExport(Exception):
    """The study has no feasible trial yet. Exit 3."""


def exit_code_for(error: BaseException) -> int:
    from .models import ModelLoadError
    from .prompts import PromptError
    from .spec import SpecError
    from .storage import StorageError

    if isinstance(error, NothingToExport):
        return EXIT_NOTHING
    if isinstance(error, (UsageError, SpecError, ModelLoadError, PromptError, StorageError)):
        return EXIT_USAGE
    return EXIT_RUNTIME


def one_line(error: BaseException) -> list[str]:
    """The lines to print: one per spec problem, else the first line of the message."""
    from .spec import SpecError

    if isinstance(error, SpecError):
        return [mask_text(line) for line in error.problems]
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if exit_code_for(error) == EXIT_RUNTIME:
        text = f"{type(error).__name__}: {text} (OPTSEARCH_DEBUG=1 shows the traceback)"
    return [mask_text(text)]
