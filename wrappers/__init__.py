"""ComfyUI glue: operation classes, loading, calibration through ComfyUI's sampler, saving."""
