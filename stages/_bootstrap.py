"""Make ``pipeline`` importable when a stage script runs from a source checkout without install."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.infra.config import stage_main  # noqa: E402

__all__ = ["stage_main"]
