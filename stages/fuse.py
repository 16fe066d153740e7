"""DVC stage entry point (thin): see pipeline/steps/fuse.py. Run by hand: python stages/fuse.py +model=NAME"""
from _bootstrap import stage_main

from pipeline.steps.fuse import run

if __name__ == "__main__":
    stage_main(run)()
