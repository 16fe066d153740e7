"""DVC stage entry point (thin): see pipeline/steps/calibrate.py. Run by hand: python stages/calibrate.py +model=NAME"""
from _bootstrap import stage_main

from pipeline.steps.calibrate import run

if __name__ == "__main__":
    stage_main(run)()
