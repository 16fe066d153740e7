"""User-facing errors: one clear line, non-zero exit, no traceback wall."""
from __future__ import annotations

import sys


class PipelineError(Exception):
    """An error caused by the user's input or environment, reported as one line.

    Stage entry points catch it, print ``error: <message>`` to stderr and exit with status 2.
    """


def check_int(value, what: str, low: int, none_ok: bool = False) -> None:
    """Refuse (PipelineError, one line) a setting ``what`` that is not an integer >= ``low`` (a bool
    is not an integer here); ``none_ok``: null is allowed too."""
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        extra = "null or " if none_ok else ""
        raise PipelineError(f"{what}={value!r}: must be {extra}an integer >= {low}")


def cli_errors_as_one_line(fn, *args) -> None:
    """Run a CLI body; a PipelineError ends it with one ``error:`` line and exit status 2."""
    try:
        fn(*args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
