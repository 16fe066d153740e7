"""User-facing errors: one clear line, non-zero exit, no traceback wall."""
from __future__ import annotations


class PipelineError(Exception):
    """An error caused by the user's input or environment, reported as one line.

    Stage entry points catch it, print ``error: <message>`` to stderr and exit with status 2.
    """
