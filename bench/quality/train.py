"""Train one reference model (sd15 / sdxl / flux) on Fashion-MNIST with ComfyUI's own model class.

The loss is taken through ComfyUI's model sampling, so the sampler's schedule is what the model
learns: SD1.5/SDXL: EPS prediction on the 1000-step scaled-linear discrete schedule (t uniform);
FLUX: flow matching (velocity) with ComfyUI's FLUX time shift (1.15), t uniform before the shift.
Both reduce to mean(((denoised - x0) / sigma)^2) with denoised = model.apply_model(x_t, sigma, ...).
Conditioning: the all-MiniLM-L6-v2 caption embeddings of the 10 classes (tests/fixtures/trained/
captions.safetensors), zeroed for 10% of the samples so classifier-free guidance works.
EMA weights (decay 0.995 after warm-up) are what the fixture keeps (fp16).

  python bench/quality/train.py --family sd15 --steps 3000 --threads 1 --work .work/train
Resumable: state (weights, EMA, optimizer, step, RNG) is saved every --save-every steps and at the
end; running the same command again continues. --minutes bounds one run's wall time.
"""
import argparse
import json
import math
import os
import pathlib
import sys
import time

import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from quality import comfy_env, fmnist, reference_models as rm  # noqa: E402


def init_weights_(model: torch.nn.Module, family: str) -> None:
    """ComfyUI builds layers with uninitialised storage: give every parameter PyTorch's default init,
    norms scale 1 / bias 0, and zero the output layer (the net starts by predicting 0)."""
    nn = torch.nn
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
        for m in model.modules():
            for base in (nn.Linear, nn.Conv2d, nn.Conv1d, nn.GroupNorm, nn.LayerNorm, nn.Embedding):
                if isinstance(m, base):
                    base.reset_parameters(m)
                    break
        for name, p in model.named_parameters():
            if torch.isnan(p).any():
                if p.ndim == 1 and name.rsplit(".", 1)[-1] in ("scale", "weight"):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    raise RuntimeError(f"{family}: no initialiser for parameter {name} {tuple(p.shape)}")
        last = [model.out[-1]] if family != "flux" else [model.final_layer.linear, model.final_layer.adaLN_modulation[-1]]
        for m in last:
            m.weight.zero_()
            m.bias.zero_()


class Conditioner:
    """Per-batch model kwargs for apply_model, from class labels (with CFG dropout)."""

    def __init__(self, base_model, family):
        self.family = family
        self.ctx, self.pooled = rm.captions()
        self.base = base_model

    def __call__(self, labels, drop_p, gen):
        ctx, pooled = self.ctx[labels], self.pooled[labels]
        keep = (torch.rand(len(labels), generator=gen) >= drop_p).float()
        ctx, pooled = ctx * keep[:, None, None], pooled * keep[:, None]
        if self.family == "sd15":
            return {"c_crossattn": ctx}
        if self.family == "sdxl":
            return {"c_crossattn": ctx, "y": self.base.encode_adm(pooled_output=pooled)}
        return {"c_crossattn": ctx, "y": pooled, "guidance": torch.full((len(labels),), rm.FLUX_GUIDANCE)}


class OutOfPlaceAdds(TorchFunctionMode):
    """ComfyUI's FLUX blocks update the residual stream in place (`img += ...`), which autograd
    refuses once a norm saved that tensor. Training only: `a += b` becomes `a = a + b` (same
    values; Python rebinds the name to the result)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "add_":  # what `a += b` dispatches to
            return torch.add(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def draw_sigma(ms, family, n, gen):
    if family == "flux":
        u = torch.rand(n, generator=gen) * (1 - 1e-3) + 1e-3
        return ms.sigma(u)
    t = torch.randint(0, len(ms.sigmas), (n,), generator=gen)
    return ms.sigmas[t]


def loss_fn(base, family, x0, kw, gen):
    ms = base.model_sampling
    sigma = draw_sigma(ms, family, x0.shape[0], gen)
    eps = torch.randn(x0.shape, generator=gen)
    xt = ms.noise_scaling(sigma, eps, x0)
    den = base.apply_model(xt, sigma, **kw)
    return (((den - x0) / sigma.view(-1, 1, 1, 1)) ** 2).mean()


def lr_at(step, total, peak, warmup=200):
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))))


def save_png_grid(images, path, nrow):
    """images N×1×28×28 in [-1, 1] -> a PNG grid (2 px gaps)."""
    from PIL import Image
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]
    n = x.shape[0]
    ncol = math.ceil(n / nrow)
    canvas = torch.full((nrow * 30, ncol * 30), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = i % nrow, i // nrow
        canvas[r * 30 + 1:r * 30 + 29, c * 30 + 1:c * 30 + 29] = x[i]
    Image.fromarray(canvas.numpy()).save(path)


def export_fixture(ema: dict, family: str, path, meta: dict):
    import safetensors.torch
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in ema.items()}
    tmp = str(path) + ".tmp"
    safetensors.torch.save_file(sd, tmp, metadata={"family": family, "unet_config": json.dumps(rm.FAMILIES[family][1]),
                                                   **{k: str(v) for k, v in meta.items()}})
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=list(rm.FAMILIES), required=True)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--minutes", type=float, default=0, help="stop this run after this long (0: no limit)")
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--work", default=".work/train")
    ap.add_argument("--out", default=None, help="fixture path (default tests/fixtures/trained/<family>_fmnist.safetensors)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    comfy_env.import_comfy()
    fam = args.family
    work = pathlib.Path(args.work) / fam
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "state.pt"

    base = rm.build(fam)
    dm = base.diffusion_model
    init_weights_(dm, fam)
    n_params = sum(p.numel() for p in dm.parameters())
    opt = torch.optim.AdamW(dm.parameters(), lr=args.lr, weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in dm.state_dict().items()}
    gen = torch.Generator().manual_seed(args.seed)
    step = 0
    if state_path.is_file():
        st = torch.load(state_path, weights_only=True)  # tensors, dicts and numbers only: no code runs
        dm.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        ema, step = st["ema"], st["step"]
        gen.set_state(st["gen"])
        print(f"resumed {fam} at step {step}", flush=True)
    else:
        print(f"{fam}: {type(base).__name__} / {type(dm).__name__}, {n_params / 1e6:.2f} M params, "
              f"batch {args.batch}, lr {args.lr}, {args.steps} steps, {args.threads} threads", flush=True)

    images, labels = fmnist.load("train")
    x_all = fmnist.encode(fmnist.to_unit(images), fam)
    cond = Conditioner(base, fam)

    def save_state():
        tmp = str(state_path) + ".tmp"
        torch.save({"model": dm.state_dict(), "opt": opt.state_dict(), "ema": ema, "step": step, "gen": gen.get_state()}, tmp)
        os.replace(tmp, state_path)

    t0 = t_win = time.time()
    run_loss, seen = 0.0, 0
    dm.train()
    while step < args.steps:
        if args.minutes and time.time() - t0 > args.minutes * 60:
            print(f"time limit reached at step {step}", flush=True)
            break
        idx = torch.randint(0, x_all.shape[0], (args.batch,), generator=gen)
        kw = cond(labels[idx], 0.1, gen)
        with OutOfPlaceAdds():
            loss = loss_fn(base, fam, x_all[idx], kw, gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dm.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in dm.state_dict().items():
                if v.is_floating_point():
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                else:
                    ema[k].copy_(v)
        run_loss += float(loss)
        seen += 1
        if step % 25 == 0:
            now = time.time()
            print(f"step {step} loss {run_loss / seen:.4f} lr {lr_at(step, args.steps, args.lr):.2e} "
                  f"{(now - t0) / 60:.1f} min this run ({(now - t_win) / seen:.2f} s/step)", flush=True)
            run_loss, seen, t_win = 0.0, 0, now
        if step % args.save_every == 0:
            save_state()
    save_state()

    out = pathlib.Path(args.out) if args.out else rm.fixture_path(fam)
    out.parent.mkdir(parents=True, exist_ok=True)
    export_fixture(ema, fam, out, {"steps": step, "batch": args.batch, "lr": args.lr, "params": n_params,
                                   "data": "Fashion-MNIST train (Debian dataset-fashion-mnist)"})
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB, EMA weights at step {step})", flush=True)
    mp = rm.load_trained(fam, out)
    classes = [c for c in range(10) for _ in range(8)]
    seeds = list(range(len(classes)))
    imgs = rm.sample(mp, fam, classes, seeds, steps=20, cfg=3.0)
    grid = work / f"samples_step{step}.png"
    save_png_grid(imgs, grid, nrow=8)
    print(f"samples (columns = classes {', '.join(fmnist.CLASSES)}; 20 euler steps, cfg 3): {grid}", flush=True)


if __name__ == "__main__":
    main()
