"""The ``python -m`` tools: sweeps, seed runs, the experiment matrix, profiling, diagnostics."""
