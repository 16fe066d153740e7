"""The exported checkpoint and its W4A4 inference: kernels, Linear4bit, benchmarks."""
