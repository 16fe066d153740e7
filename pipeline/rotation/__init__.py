"""Rotation matrices: Hadamard, Cayley-orthonormal, residual subspaces (no nn.Module)."""
