"""DVC stage entry point (thin): see pipeline/steps/approximate.py.
Run by hand: python stages/approximate.py +model=NAME method=respinquant approx.rank=32"""
from _bootstrap import stage_main

from pipeline.steps.approximate import run

if __name__ == "__main__":
    stage_main(run)()
