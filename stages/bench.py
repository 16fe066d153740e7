"""DVC stage entry point (thin): see pipeline/steps/bench.py. Run by hand: python stages/bench.py +model=NAME"""
from _bootstrap import stage_main

from pipeline.steps.bench import run

if __name__ == "__main__":
    stage_main(run)()
