"""DVC stage entry point (thin): see pipeline/steps/report.py."""
from _bootstrap import stage_main

from pipeline.steps.report import run

if __name__ == "__main__":
    stage_main(run)()
