"""Evaluation: the corpora (calibration and test windows), perplexity, zero-shot, activation statistics, seed statistics and results tables."""
