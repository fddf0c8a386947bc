"""Fashion-MNIST (Debian `dataset-fashion-mnist`) and the exact pixel "latent" each family uses.

No trained VAE can be had here, so the latent is the image itself, rearranged without loss:
28x28 in [-1, 1] -> pad to 32x32 (background -1) -> space-to-depth. SD1.5/SDXL (4 latent
channels): 2x2 blocks -> 4x16x16. FLUX (16 latent channels): 4x4 blocks -> 16x8x8, which FLUX
patchifies 2x2 itself (16 tokens). `decode` is the exact inverse of `encode`.
These tensors are the model-space latents (after ComfyUI's process_latent_in).
"""
import gzip
import os

import numpy as np
import torch
import torch.nn.functional as F

DATA_DIR = os.environ.get("SVDQ_FMNIST_DIR", "/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
CAPTIONS = tuple(f"a photo of a {c}" if c != "trousers" else "a photo of trousers" for c in CLASSES)
BLOCK = {"sd15": 2, "sdxl": 2, "flux": 4}   # space-to-depth block per family
PAD = 2                                     # 28 + 2 + 2 = 32


def _read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(split: str = "train"):
    """(images uint8 N×28×28, labels int64 N) of 'train' (60k) or 'test' (10k)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    img = os.path.join(DATA_DIR, f"{prefix}-images-idx3-ubyte.gz")
    lab = os.path.join(DATA_DIR, f"{prefix}-labels-idx1-ubyte.gz")
    for p in (img, lab):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found: apt-get install dataset-fashion-mnist (or set SVDQ_FMNIST_DIR)")
    return torch.from_numpy(_read_idx(img).copy()), torch.from_numpy(_read_idx(lab).astype(np.int64))


def to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 N×28×28 -> float N×1×28×28 in [-1, 1]."""
    return images_u8.float().div(127.5).sub(1).unsqueeze(1)


def encode(x: torch.Tensor, family: str) -> torch.Tensor:
    """N×1×28×28 in [-1, 1] -> the family's model-space latent."""
    return F.pixel_unshuffle(F.pad(x, (PAD,) * 4, value=-1.0), BLOCK[family])


def decode(z: torch.Tensor, family: str) -> torch.Tensor:
    """Exact inverse of `encode`: N×1×28×28 (not clamped)."""
    return F.pixel_shuffle(z, BLOCK[family])[:, :, PAD:-PAD, PAD:-PAD]


def latent_shape(family: str) -> tuple:
    b = BLOCK[family]
    return (b * b, 32 // b, 32 // b)


def pixel_size(family: str) -> int:
    """The width/height ComfyUI's samplers are told: the latent is 1/8 of it for every family."""
    return latent_shape(family)[1] * 8
