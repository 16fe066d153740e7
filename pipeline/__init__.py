"""ReSpinQuant pipeline library. ``pipeline.load_quantized(path)`` loads an exported checkpoint."""


def __getattr__(name: str):
    if name in ("load_quantized", "load_tokenizer"):  # lazy: importing pipeline stays cheap
        from .export import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
