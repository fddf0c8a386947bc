"""ComfyUI-free SVDQuant core: calibration statistics, smoothing, low-rank split, 4-bit packing,
the quantized linear module and the checkpoint format (docs/FORMAT.md)."""
