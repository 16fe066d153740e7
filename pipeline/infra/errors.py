"""User-facing errors: one clear line, non-zero exit, no traceback wall."""
from __future__ import annotations

import sys


class PipelineError(Exception):
    """An error caused by the user's input or environment, reported as one line.

    Stage entry points catch it, print ``error: <message>`` to stderr and exit with status 2.
    """


def check_int(value, what: str, low: int, none_ok: bool = False, high: int | None = None) -> None:
    """Refuse (PipelineError, one line) a setting ``what`` that is not an integer in ``low..high``
    (a bool is not an integer here); ``none_ok``: null is allowed too."""
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        extra = "null or " if none_ok else ""
        bound = f"in {low}..{high}" if high is not None else f">= {low}"
        shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:20]}... ({len(repr(value))} characters)"
        raise PipelineError(f"{what}={shown}: must be {extra}an integer {bound}")


def cli_errors_as_one_line(fn, *args) -> None:
    """Run a CLI body; a PipelineError ends it with one ``error:`` line and exit status 2."""
    try:
        fn(*args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
