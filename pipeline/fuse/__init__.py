"""Fusing rotations into a model layer by layer, and perplexity of fused models."""
