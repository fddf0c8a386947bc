"""Wall time per calibration phase (capture, smoothing search, SVD, GPTQ, packing, saving)."""
import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class PhaseTimer:
    """Accumulates seconds per phase name. On CUDA it synchronises at phase edges, so the time of
    asynchronous kernels lands in the phase that launched them."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self._devices = set()

    def watch(self, device) -> None:
        d = torch.device(device) if device is not None else None
        if d is not None and d.type == "cuda":
            self._devices.add(d)

    def _sync(self):
        for d in self._devices:
            torch.cuda.synchronize(d)

    @contextmanager
    def __call__(self, phase: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[phase] += time.perf_counter() - t0

    def as_dict(self) -> dict:
        return {k: round(v, 3) for k, v in self.seconds.items()}
