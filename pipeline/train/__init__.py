"""Rotation training: trainable rotations, the training loop, its streamed and distributed forms."""
