"""FLUX blocks with the passes between their linears fused, through ComfyUI's block-replace hook.

ComfyUI's FLUX forward looks up `patches_replace["dit"][("double_block" | "single_block", i)]` before each block
(comfy/ldm/flux/model.py) and calls the patch with the block's inputs and the original block. A 4-bit FLUX model
gets one patch per block (`install_fused_flux_blocks`): the same computation as ComfyUI's DoubleStreamBlock /
SingleStreamBlock forward, with the block's own modules (the 4-bit linears, LoRA and all), except
- a linear's modulated input (affine-free LayerNorm, then · (1 + scale) + shift) comes from `ln_modulate`, one pass;
- q, k, v come from kernels/flux_ops.py `qk_norm_rope`: QKNorm, RoPE and the double block's txt ‖ img
  concatenation in one pass (ComfyUI: ~10 torch passes per block, ~20 ms of a FLUX step on an H200, docs/E2E.md);
- the single block's [attention | GELU(MLP)] input of linear2 comes from `concat_rows`, the GELU inside the copy
  (torch's GELU and cat take slow non-vectorised paths on the MLP part, a column slice of linear1's output).
With row bases (SVDQ_ROW_BASE=1, kernels/__init__.py) the producers of a 4-bit linear's input also write that linear's
activation row bases and int8 codes (`ln_modulate_rowbase`, `concat_rows_rowbase`; the double block's MLP GELU then
runs in `concat_rows_rowbase` too): its kernel 1 is left only the LoRA-down (docs/KERNELS.md §6d).
A call the fused forward does not cover (an attention mask, FLUX variants without per-block modulation, img-before-txt
order, inputs a newer ComfyUI passes that 0.3.75 did not) runs the original block; fp16 models keep ComfyUI's overflow guards. On the CPU the references are ComfyUI's
own ops, so the patched model's output is bitwise the original's there.
A user patch set later for the same block (e.g. PuLID's) replaces ours and gets the original block: still correct.
"""
import logging
import math

import torch
from comfy.ldm.modules.attention import optimized_attention  # ComfyUI's backend choice, as its FLUX code imports it

from ..kernels.flux_ops import concat_rows, concat_rows_rowbase, ln_modulate, ln_modulate_rowbase, qk_norm_rope


def _attention(q, k, v, heads, transformer_options):
    return optimized_attention(q, k, v, heads, skip_reshape=True, mask=None, transformer_options=transformer_options)


def _plain_layer_norm(norm) -> bool:
    return isinstance(norm, torch.nn.LayerNorm) and norm.weight is None and norm.bias is None


def _modulated(norm, x, mod):
    """norm(x) · (1 + scale) + shift (comfy/ldm/flux/layers.py apply_mod after the affine-free LayerNorm) in one pass."""
    if _plain_layer_norm(norm):
        return ln_modulate(x, mod.shift, mod.scale, norm.eps)
    return torch.addcmul(mod.shift, norm(x), 1 + mod.scale)


def _tanh_gelu(m) -> bool:
    return isinstance(m, torch.nn.GELU) and m.approximate == "tanh"


def _slot(linear, lead, like):
    """Where the op producing `linear`'s input (leading shape `lead`, dtype and device of `like`) may write the
    linear's row bases and codes (a 4-bit layer on row bases, core/qlinear.py row_base_slot), else None."""
    fn = getattr(linear, "row_base_slot", None)
    if fn is None or not getattr(linear, "quantized", False) or like.device.type != "cuda" or \
            torch.compiler.is_compiling():
        return None
    return fn(tuple(lead), math.prod(lead), like.dtype, like.device)


def _call(linear, x, slot):
    """linear(x), passing the slot x's producer wrote the row bases and codes into."""
    return linear(x) if slot is None else linear(x, row_base=slot)


def _modulated_input(linear, norm, x, mod):
    """(`linear`'s modulated input, the slot ln_modulate wrote its row bases and codes into, or None)."""
    if _plain_layer_norm(norm):
        slot = _slot(linear, x.shape[:-1], x)
        y = None if slot is None else ln_modulate_rowbase(x, mod.shift, mod.scale, norm.eps, slot)
        if y is not None:
            return y, slot
    return _modulated(norm, x, mod), None


def _mlp(mlp, norm, x, mod):
    """A double block's MLP (ComfyUI: Sequential(Linear, GELU(tanh), Linear)) on its modulated input. Where the
    second linear reads row bases, the GELU runs in concat_rows_rowbase (b alone), which writes them."""
    if not (isinstance(mlp, torch.nn.Sequential) and len(mlp) == 3 and _tanh_gelu(mlp[1])):
        return mlp(_modulated(norm, x, mod))
    fc1, fc2 = mlp[0], mlp[2]
    h = _call(fc1, *_modulated_input(fc1, norm, x, mod))
    slot = _slot(fc2, h.shape[:-1], h)
    g = None if slot is None else concat_rows_rowbase(None, h, True, slot)
    if g is not None:
        return fc2(g, row_base=slot)
    return fc2(mlp[1](h))


def _joined_input(linear, a, b, gelu_b: bool):
    """(concat_rows(a, b, gelu_b), the slot it wrote `linear`'s row bases and codes into, or None)."""
    slot = _slot(linear, b.shape[:-1], b)
    y = None if slot is None else concat_rows_rowbase(a, b, gelu_b, slot)
    if y is not None:
        return y, slot
    return concat_rows(a, b, gelu_b=gelu_b), None


def _fp16_guard(x):
    return torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504) if x.dtype == torch.float16 else x


def _scales(attn_norm):
    return attn_norm.query_norm.scale, attn_norm.key_norm.scale


class _BlockPatch:
    """A patches_replace entry bound to its block module. ModelPatcher.clone() deep-copies model_options: the
    patch is shared instead (a copy would duplicate the block's weights; clones share the model anyway)."""

    KNOWN_ARGS = frozenset()  # what ComfyUI 0.3.75's FLUX forward passes; anything more is a newer ComfyUI's input

    def __init__(self, block):
        self.block = block

    def __deepcopy__(self, memo):
        return self

    def covered(self, args) -> bool:
        """Whether the fused forward computes what the block would for these inputs (else the original block runs)."""
        return (args.keys() <= self.KNOWN_ARGS and args.get("attn_mask") is None and args.get("pe") is not None
                and bool(self.block.modulation))


class FusedDoubleBlock(_BlockPatch):
    """patches_replace entry for a FLUX double block (ComfyUI's DoubleStreamBlock.forward with the fused passes)."""

    KNOWN_ARGS = frozenset(("img", "txt", "vec", "pe", "attn_mask", "transformer_options"))

    def __call__(self, args, extra):
        blk = self.block
        if not self.covered(args) or blk.flipped_img_txt:
            return extra["original_block"](args)
        img, txt, vec, pe = args["img"], args["txt"], args["vec"], args["pe"]
        opts = args.get("transformer_options") or {}
        img_mod1, img_mod2 = blk.img_mod(vec)
        txt_mod1, txt_mod2 = blk.txt_mod(vec)
        img_qkv = _call(blk.img_attn.qkv, *_modulated_input(blk.img_attn.qkv, blk.img_norm1, img, img_mod1))
        txt_qkv = _call(blk.txt_attn.qkv, *_modulated_input(blk.txt_attn.qkv, blk.txt_norm1, txt, txt_mod1))
        q, k, v = qk_norm_rope([(txt_qkv, *_scales(blk.txt_attn.norm)), (img_qkv, *_scales(blk.img_attn.norm))], pe,
                               blk.num_heads)
        del img_qkv, txt_qkv
        attn = _attention(q, k, v, blk.num_heads, opts)
        del q, k, v
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]
        img += blk.img_attn.proj(img_attn) * img_mod1.gate
        del img_attn
        img += _mlp(blk.img_mlp, blk.img_norm2, img, img_mod2) * img_mod2.gate
        txt += blk.txt_attn.proj(txt_attn) * txt_mod1.gate
        del txt_attn
        txt += _mlp(blk.txt_mlp, blk.txt_norm2, txt, txt_mod2) * txt_mod2.gate
        return {"img": img, "txt": _fp16_guard(txt)}


class FusedSingleBlock(_BlockPatch):
    """patches_replace entry for a FLUX single block (ComfyUI's SingleStreamBlock.forward with the fused passes)."""

    KNOWN_ARGS = frozenset(("img", "vec", "pe", "attn_mask", "transformer_options"))

    def __call__(self, args, extra):
        blk = self.block
        if not self.covered(args):
            return extra["original_block"](args)
        x, vec, pe = args["img"], args["vec"], args["pe"]
        opts = args.get("transformer_options") or {}
        mod, _ = blk.modulation(vec)
        h = _call(blk.linear1, *_modulated_input(blk.linear1, blk.pre_norm, x, mod))
        split = 3 * blk.hidden_size
        q, k, v = qk_norm_rope([(h[..., :split], *_scales(blk.norm))], pe, blk.num_heads)
        attn = _attention(q, k, v, blk.num_heads, opts)
        del q, k, v
        mlp = h[..., split:]
        if _tanh_gelu(blk.mlp_act):  # FLUX.1: the GELU inside the concatenation's copy
            inp, slot = _joined_input(blk.linear2, attn, mlp, True)
        else:
            inp, slot = _joined_input(blk.linear2, attn, blk.mlp_act(mlp), False)
        del h, attn, mlp
        out = _call(blk.linear2, inp, slot)
        del inp
        x += out * mod.gate
        return {"img": _fp16_guard(x)}


def _flux_blocks(diffusion_model):
    """(double blocks, single blocks) of a ComfyUI FLUX model whose blocks this module knows, else None."""
    double, single = getattr(diffusion_model, "double_blocks", None), getattr(diffusion_model, "single_blocks", None)
    if double is None or single is None:
        return None
    if not all(type(b).__name__ == "DoubleStreamBlock" for b in double):
        return None
    if not all(type(b).__name__ == "SingleStreamBlock" for b in single):
        return None
    needed = ("img_mod", "img_norm1", "img_attn", "img_norm2", "img_mlp", "txt_mod", "txt_norm1", "txt_attn",
              "txt_norm2", "txt_mlp", "num_heads", "flipped_img_txt", "modulation")
    if not all(hasattr(b, n) for b in double for n in needed):
        return None
    if not all(hasattr(b, n) for b in single for n in ("modulation", "pre_norm", "linear1", "linear2", "norm",
                                                       "mlp_act", "hidden_size", "num_heads")):
        return None
    return double, single


def install_fused_flux_blocks(patcher) -> int:
    """Set a fused-forward patch for every block of the patcher's FLUX model; returns how many (0: not FLUX)."""
    blocks = _flux_blocks(patcher.model.diffusion_model)
    if blocks is None:
        return 0
    double, single = blocks
    for i, b in enumerate(double):
        patcher.set_model_patch_replace(FusedDoubleBlock(b), "dit", "double_block", i)
    for i, b in enumerate(single):
        patcher.set_model_patch_replace(FusedSingleBlock(b), "dit", "single_block", i)
    logging.info(f"[svdquant] FLUX: fused block forward for {len(double)} double and {len(single)} single blocks")
    return len(double) + len(single)


def remove_fused_flux_blocks(patcher) -> int:
    """Take this module's patches off a patcher (benchmarks compare with and without); returns how many."""
    dit = patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    ours = [key for key, fn in dit.items() if isinstance(fn, _BlockPatch)]
    for key in ours:
        del dit[key]
    return len(ours)
