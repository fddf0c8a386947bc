"""ComfyUI operation classes whose Linear becomes 4-bit when its weights are SVDQuant tensors.

Passed as `custom_operations` when wrappers/loader.py builds a model (from a file, or from the
state dict Calibrate & Quantize just made): each Linear reads its own state dict and becomes
4-bit if it finds `qweight`. Linears are created on the meta device and receive real tensors from
the state dict, so a model is never materialised in 16 bits before its 4-bit weights arrive.
"""
from torch import nn

import comfy.ops

from ..core.qlinear import ACT_BITS, ACT_SHIFT, COMPUTE_DTYPE_TENSORS, TENSOR_NAMES, QuantizedLinearMixin


class _SVDQuantLinear(QuantizedLinearMixin):
    """A ComfyUI Linear (mixed in before ComfyUI's) that becomes 4-bit when its state dict holds `qweight`."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device="meta", dtype=dtype)
        self.load_dtype = dtype

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        def take(name):
            return state_dict.pop(prefix + name, None)

        if prefix + "qweight" in state_dict:
            mode = "int_ratio" if prefix + "wscale_mult" in state_dict else "float"
            tensors = {n: take(n) for n in TENSOR_NAMES[mode]}
            for n in COMPUTE_DTYPE_TENSORS:
                if n in tensors and self.load_dtype is not None:
                    tensors[n] = tensors[n].to(self.load_dtype)
            tensors["bias"] = take("bias")
            tensors[ACT_SHIFT] = take(ACT_SHIFT)  # unsigned activations (fp32); absent in most files
            tensors[ACT_BITS] = take(ACT_BITS)  # 16-bit activations (marker); absent in most files
            if tensors["bias"] is not None and self.load_dtype is not None:
                tensors["bias"] = tensors["bias"].to(self.load_dtype)
            self.set_quantized(tensors)  # group 64: the only size the file format allows today
            return
        for name in ("weight", "bias"):
            if getattr(self, name) is None:
                continue
            t = take(name)
            if t is None:
                missing_keys.append(prefix + name)
                continue
            if self.load_dtype is not None:
                t = t.to(self.load_dtype)
            setattr(self, name, nn.Parameter(t, requires_grad=False))

    def forward(self, *args, row_base=None, **kwargs):
        # row_base: where the op that produced the input wrote its row bases and codes (wrappers/flux_blocks.py)
        if self.quantized:
            return self.forward_quantized(args[0], row_base)
        return super().forward(*args, **kwargs)


class SVDQuantOps(comfy.ops.manual_cast):
    """For a compute dtype other than the weights' (ComfyUI's manual cast): 16-bit layers cast their weights per call."""
    class Linear(_SVDQuantLinear, comfy.ops.manual_cast.Linear):
        pass


class SVDQuantOpsDirect(comfy.ops.disable_weight_init):
    """Weights already in the compute dtype (what ComfyUI picks for a 16-bit model then: comfy.ops.pick_operations):
    the model's convolutions and norms skip manual_cast's per-call cast_bias_weight (measured +80-90 µs of host time
    per conv or group norm call on a development CPU; an SD1.5 UNet step runs a few hundred of them)."""
    class Linear(_SVDQuantLinear, comfy.ops.disable_weight_init.Linear):
        pass


def svdquant_ops(manual_cast_dtype):
    """The operations a 4-bit model is built with, chosen as ComfyUI chooses for 16-bit models."""
    return SVDQuantOps if manual_cast_dtype is not None else SVDQuantOpsDirect
