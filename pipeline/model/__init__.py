"""The model: one adapter per family, loading (path, GGUF, random init) and layer-by-layer streaming."""
