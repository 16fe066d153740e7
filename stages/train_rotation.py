"""DVC stage entry point (thin): see pipeline/steps/rotate.py. Run by hand: python stages/train_rotation.py +model=NAME"""
from _bootstrap import stage_main

from pipeline.steps.rotate import run

if __name__ == "__main__":
    stage_main(run)()
