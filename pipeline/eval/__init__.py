"""Evaluation: perplexity, zero-shot, activation statistics, seed statistics and results tables."""
