"""Quality on trained weights (issue 8): small diffusion models trained here on Fashion-MNIST with
ComfyUI's own SD1.5 / SDXL / FLUX classes, metrics with offline weights, and the 4-bit methods."""
