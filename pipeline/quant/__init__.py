"""Quantizers: activation/KV fake quantization, weight codes and scales, GPTQ."""
