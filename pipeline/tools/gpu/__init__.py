"""The GPU check: prepare, run (stages, scale, kernels) and merge its results."""
