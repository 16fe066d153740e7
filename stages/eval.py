"""DVC stage entry point (thin): see pipeline/steps/evaluate.py. Run by hand: python stages/eval.py +model=NAME"""
from _bootstrap import stage_main

from pipeline.steps.evaluate import run

if __name__ == "__main__":
    stage_main(run)()
