"""DVC stage entry point (thin): see pipeline/steps/rank_sweep.py. Run by hand: python stages/rank_sweep.py +model=NAME method=respinquant"""
from _bootstrap import stage_main

from pipeline.steps.rank_sweep import run

if __name__ == "__main__":
    stage_main(run)()
