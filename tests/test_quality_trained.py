"""Quality on TRAINED weights (issue 8), the CPU subset of bench/bench_quality.py.

The fixtures in tests/fixtures/trained/ are small SD1.5-, SDXL- and FLUX-architecture models trained
here on Fashion-MNIST with ComfyUI's own classes (bench/quality/train.py); not the real models.
Per family: the 16-bit model draws its classes (so the fixture is trained and conditioned), and
through ComfyUI's sampler SVDQuant rank 32 stays closer to the 16-bit images than smoothing alone,
which stays closer than naive W4A4 (per-image PSNR to the 16-bit image, paired over fixed seeds:
the mean gain must exceed twice its standard error), with the per-layer output errors in the same
order. Metric weights are not needed here (PSNR only).
"""
import math
import os
import pathlib
import sys

import pytest
import torch

from harness import config

ROOT = pathlib.Path(__file__).resolve().parents[1]
FMNIST = pathlib.Path(os.environ.get("SVDQ_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
# CI (.ci/run) installs the data; elsewhere a missing package skips, unless SVDQ_REQUIRE_COMFY=1 (scripts/test.sh).
_NO_DATA = (not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file()) and os.environ.get("SVDQ_REQUIRE_COMFY") != "1"
pytestmark = [pytest.mark.comfy,
              pytest.mark.skipif(config.comfyui_missing_reason() is not None,
                                 reason=str(config.comfyui_missing_reason())),
              pytest.mark.skipif(_NO_DATA, reason=f"no Fashion-MNIST at {FMNIST}: apt-get install dataset-fashion-mnist")]

FAMILIES = ("sd15", "sdxl", "flux")
SEEDS_PER_CLASS = 2
STEPS = 10
CFG = 3.0
ORDER = ("svdq_r32", "smooth_only", "naive_w4a4")  # best first


@pytest.fixture(scope="module")
def q():
    import comfy_inprocess
    comfy_inprocess.import_comfy()
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    from quality import fmnist, methods, metrics, reference_models
    return fmnist, methods, metrics, reference_models


def _classes_seeds():
    classes = [c for c in range(10) for _ in range(SEEDS_PER_CLASS)]
    return classes, list(range(len(classes)))


_SAMPLES_16BIT = {}


def _samples_16bit(rm, family):
    """The 16-bit model's samples, drawn once per family for both tests."""
    if family not in _SAMPLES_16BIT:
        classes, seeds = _classes_seeds()
        _SAMPLES_16BIT[family] = rm.sample(rm.load_trained(family), family, classes, seeds, STEPS, CFG)
    return _SAMPLES_16BIT[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_fixture_draws_its_classes(q, family):
    """Class-mean of the samples is closest to the real class-mean of the same class (≥ 8 of 10);
    random or unconditioned weights give about 1 in 10."""
    fmnist, _, _, rm = q
    images, labels = fmnist.load("test")
    real = torch.stack([fmnist.to_unit(images[labels == c][:200]).mean(0).flatten() for c in range(10)])
    img = _samples_16bit(rm, family)
    gen = torch.stack([img[i * SEEDS_PER_CLASS:(i + 1) * SEEDS_PER_CLASS].mean(0).flatten() for i in range(10)])
    dist = torch.cdist(gen, real)
    hits = int((dist.argmin(1) == torch.arange(10)).sum())
    assert hits >= 8, f"{family}: only {hits}/10 classes drawn recognisably (nearest real class mean: {dist.argmin(1).tolist()})"


@pytest.mark.parametrize("family", FAMILIES)
def test_svdquant_beats_smoothing_beats_naive(q, family):
    _, methods, metrics, rm = q
    classes, seeds = _classes_seeds()
    img16 = _samples_16bit(rm, family)
    psnr, err = {}, {}
    for name in ORDER:
        qm, report, _ = methods.quantize_trained(family, methods.METHODS[name], calib_steps=STEPS, cfg=CFG)
        psnr[name] = metrics.psnr(rm.sample(qm, family, classes, seeds, STEPS, CFG), img16)
        err[name] = report["summary"]["mean_error"]
        del qm
    means = {k: round(float(v.mean()), 2) for k, v in psnr.items()}
    assert err["svdq_r32"] < err["smooth_only"] < err["naive_w4a4"], (family, err)
    for better, worse in zip(ORDER, ORDER[1:]):
        d = psnr[better] - psnr[worse]
        se = float(d.std()) / math.sqrt(len(d))
        assert float(d.mean()) > 2 * se, (f"{family}: {better} not better than {worse} by more than 2 standard errors "
                                          f"(PSNR gain {float(d.mean()):.2f} dB, se {se:.2f}; means {means})")


def test_metrics_sanity(q):
    """PSNR/SSIM/KID/FID from bench/quality/metrics.py behave as the definitions say."""
    fmnist, _, metrics, _ = q
    images, _ = fmnist.load("test")
    x = fmnist.to_unit(images[:32])
    blur = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1,) * 4, mode="replicate"), 3, 1)
    assert torch.isinf(metrics.psnr(x, x)).all() and torch.allclose(metrics.ssim(x, x), torch.ones(32))
    assert 10 < float(metrics.psnr(x, blur).mean()) < 40 and 0.3 < float(metrics.ssim(x, blur).mean()) < 0.95
    assert float(metrics.ssim(x, x.roll(1, 0)).mean()) < float(metrics.ssim(x, blur).mean())
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 16, generator=g, dtype=torch.float64), torch.randn(400, 16, generator=g, dtype=torch.float64)
    # same distribution: KID ≈ 0 (measured 0.02 ± 0.02); a unit mean shift: measured 7.2
    assert abs(metrics.kid(a, b, subsets=20, subset_size=200)[0]) < 0.1
    assert metrics.kid(a, b + 1, subsets=20, subset_size=200)[0] > 1
    # FID of N(0, I) vs N(1, I) in 16 dims is |Δμ|² = 16; sampling noise is well under 2 at n=400
    assert metrics.fid(a, b) < 2 and abs(metrics.fid(a, b + 1) - 16) < 3
