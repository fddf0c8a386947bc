"""The 4-bit linear layer: holds the tensors of docs/FORMAT.md and calls the kernels.

`QuantizedLinearMixin` carries the whole behaviour so that the plain `SVDQuantLinear` (tests,
scripts) and ComfyUI's operation class (wrappers/ops.py) share one implementation.
Tensors are frozen Parameters rather than buffers: ComfyUI's ModelPatcher moves, counts and
offloads a module by its parameters.
"""
import torch
from torch import nn

from .. import kernels
from .layer_quant import ACT_BITS

# The tensors of one 4-bit layer by scale mode (docs/FORMAT.md); bias is optional in both.
TENSOR_NAMES = {
    "float": ("qweight", "wscales", "smooth_factor", "proj_down", "proj_up"),
    "int_ratio": ("qweight", "wscale_mult", "wscale_base", "smooth_factor", "proj_down", "proj_up"),
}
# Tensors computed in the model's dtype; int_ratio multipliers (uint8) and bases (fp32) keep theirs.
COMPUTE_DTYPE_TENSORS = ("wscales", "smooth_factor", "proj_down", "proj_up")
# Optional tensor of layers with unsigned activations (docs/FORMAT.md §1): the shift c (fp32, (1,)).
ACT_SHIFT = "act_shift"


def scale_mode_of(tensors) -> str:
    """The scale mode a layer's tensors (dict or state-dict key set) are in."""
    return "int_ratio" if any(str(k).endswith("wscale_mult") for k in tensors) else "float"


KERNEL_CACHE = "kernel_cache"


def _weight_placeholder(module, state_dict, prefix, local_metadata):
    """List an empty `weight` entry for 4-bit layers: frameworks that attach patches by state-dict key
    (ComfyUI's LoRA loaders) then see the layer; it has no data, so sizes and copies are unaffected.

    Also a `kernel_cache` entry (meta, no data) as large as the copy the CUDA kernels prepare on the GPU
    beside the layer's tensors: ComfyUI sizes modules and models by their state dicts
    (model_management.module_size) to decide how much of a model fits, so it must see that copy too."""
    if getattr(module, "quantized", False):
        state_dict[prefix + "weight"] = torch.empty(0, device="meta")
        extra = module.kernel_cache_bytes()
        if extra:
            state_dict[prefix + KERNEL_CACHE] = torch.empty(extra, dtype=torch.uint8, device="meta")


class QuantizedLinearMixin:
    group_size = 64
    quantized = False
    packed_weights = False  # Hopper: kernel 2d on the packed codes instead of an int8 copy (set_packed_weights)

    def set_quantized(self, tensors: dict, group_size: int = 64) -> None:
        """Become 4-bit with these natural-layout tensors (bias optional)."""
        n, k2 = tensors["qweight"].shape
        self.out_features, self.in_features = n, k2 * 2
        self.rank = tensors["proj_down"].shape[1]
        self.group_size = group_size
        self.scale_mode = scale_mode_of(tensors)
        self.register_parameter("weight", None)
        for name in TENSOR_NAMES[self.scale_mode]:
            self.register_parameter(name, nn.Parameter(tensors[name], requires_grad=False))
        b = tensors.get("bias")
        self.register_parameter("bias", None if b is None else nn.Parameter(b, requires_grad=False))
        shift = tensors.get(ACT_SHIFT)
        self.register_parameter(ACT_SHIFT, None if shift is None else nn.Parameter(shift.float(), requires_grad=False))
        bits = tensors.get(ACT_BITS)  # 16-bit activations (marker); absent = 4-bit
        self.register_parameter(ACT_BITS, None if bits is None else nn.Parameter(bits, requires_grad=False))
        self.quantized = True
        self._prepared = None
        self._direct = None  # the eager fast path's call, valid while _prepared is the one it was made with
        self._lora = None
        self._input_group = None  # set by core/input_group.attach_input_groups
        if not getattr(self, "_weight_key_hook", None):
            self._weight_key_hook = self._register_state_dict_hook(_weight_placeholder)

    def set_lora(self, terms) -> None:
        """Extra low-rank terms (D (K×r), U (N×r)) added as (X·D)·Uᵀ, e.g. LoRAs; None removes them."""
        self._lora = terms

    def set_packed_weights(self, packed: bool) -> None:
        """On Hopper, run int_ratio layers on the packed 4-bit codes in VRAM (kernel 2d) instead of an int8 copy
        (kernel 2c: twice the weight bytes, faster). Other GPUs read the packed codes either way."""
        self.packed_weights = bool(packed)
        self._prepared = None

    def kernel_cache_bytes(self, device=None) -> int:
        """Bytes the kernels prepare on `device` (default: the current CUDA device) for this layer."""
        if device is None:
            if not torch.cuda.is_available():
                return 0
            device = torch.device("cuda", torch.cuda.current_device())
        return kernels.prepared_extra_bytes(self.out_features, self.in_features, self.rank, device,
                                            unsigned=getattr(self, ACT_SHIFT, None) is not None,
                                            act16=getattr(self, ACT_BITS, None) is not None,
                                            ratio=getattr(self, "scale_mode", "float") == "int_ratio",
                                            packed=self.packed_weights)

    def _apply(self, fn, *args, **kwargs):
        self._prepared = None  # cached kernel-ready tensors belong to the old device
        if getattr(self, "_input_group", None) is not None:
            self._input_group.reset()  # and so does the group's fused layer
        out = super()._apply(fn, *args, **kwargs)
        if getattr(self, "quantized", False):
            dev = self.qweight.device
            if dev.type == "cuda" and self.kernel_cache_bytes(dev):
                # Prepared now, not at the first call: ComfyUI plans a later load from the memory in use plus what
                # it has loaded (the kernel_cache entries included), so the copy it counted must already exist.
                self.kernel_tensors(self.proj_down.dtype, dev)
        return out

    def kernel_tensors(self, dtype, device) -> dict:
        """Tensors in the compute dtype, prepared for the kernel on `device`.

        Cached while the weights live on `device`; when they are offloaded elsewhere (ComfyUI's
        low-VRAM mode), they are moved for this call only.
        """
        key = (device, dtype)
        cached = getattr(self, "_prepared", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        t = {n: getattr(self, n).to(device, non_blocking=True) for n in TENSOR_NAMES[self.scale_mode]}
        for n in COMPUTE_DTYPE_TENSORS:
            if n in t:
                t[n] = t[n].to(dtype)
        t["bias"] = None if self.bias is None else self.bias.to(device, dtype)
        if self.act_shift is not None:
            t[ACT_SHIFT] = self.act_shift.to(device)
        t["act16"] = getattr(self, ACT_BITS, None) is not None
        t["packed_weights"] = self.packed_weights
        prepared = kernels.prepare_weights(t, device)
        if self.qweight.device == device:
            self._prepared = (key, prepared)
        return prepared

    def row_base_slot(self, lead, m: int, dtype, device):
        """Where the op producing this layer's next input (leading shape `lead`, m rows) may write the layer's
        activation row bases and codes (kernels.row_base_slot), or None; pass it to the call as `row_base=`."""
        if getattr(self, "_input_group", None) is not None or getattr(self, ACT_BITS, None) is not None or \
                self.qweight.device != device:  # offloaded: prepared per call, the slot would outlive its tensors
            return None
        return kernels.row_base_slot(self.kernel_tensors(dtype, device), lead, m, dtype, device)

    def _keep_direct_call(self, x: torch.Tensor, prepared: dict) -> None:
        """Keep the eager fast path's call for inputs like x, if `prepared` is the cached preparation."""
        cached = self._prepared
        if cached is None or cached[1] is not prepared:
            return
        fn = kernels.direct_call(x, prepared, self.group_size)
        if fn is not None:  # object.__setattr__: nn.Module's own costs ~1 µs, and this is a plain tuple
            object.__setattr__(self, "_direct", (cached, x.dtype, x.device, fn, prepared))

    def forward_quantized(self, x: torch.Tensor, row_base=None) -> torch.Tensor:
        # Eager fast path: the call the previous one resolved to (kernels.direct_call), while the prepared tensors
        # are still the cached ones it was made with (a move or re-preparation replaces them) and nothing was
        # attached since; SD steps are host-bound and run hundreds of these per step.
        compiling = torch.compiler.is_compiling()  # first: a traced forward reads none of this
        d = None if compiling else self._direct
        if (d is not None and d[0] is self._prepared and x.dtype is d[1] and row_base is None and self._lora is None
                and self._input_group is None and x.device == d[2] and x.is_contiguous() and x.numel()):
            return d[3](x, d[4])
        prepared = self.kernel_tensors(x.dtype, x.device)
        group = getattr(self, "_input_group", None)  # layers sharing this input's quantization (core/input_group.py)
        lora = getattr(self, "_lora", None)
        y = None
        if group is not None and not compiling:
            y = group.forward(self, x, prepared)
        if y is None:
            y = kernels.linear(x, prepared, self.group_size, row_base=row_base)
            if group is None and lora is None and not compiling and prepared.get("_path"):
                self._keep_direct_call(x, prepared)
        if lora is not None:
            d, u = lora
            y = y + (x @ d.to(x.device, x.dtype)) @ u.to(x.device, x.dtype).t()
        return y


class SVDQuantLinear(QuantizedLinearMixin, nn.Module):
    """Y = Q(X/λ)·Q(R)ᵀ + (X·proj_down)·proj_upᵀ + b, a drop-in for nn.Linear(K, N)."""

    def __init__(self, tensors: dict, group_size: int = 64):
        super().__init__()
        self.set_quantized(tensors, group_size)

    @classmethod
    def from_tensors(cls, tensors: dict, group_size: int = 64) -> "SVDQuantLinear":
        return cls(tensors, group_size)

    def forward(self, x, row_base=None):
        return self.forward_quantized(x, row_base)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"group_size={self.group_size}, scales={self.scale_mode}, bias={self.bias is not None}"
                + ("" if self.act_shift is None else ", unsigned activations")
                + ("" if getattr(self, ACT_BITS, None) is None else ", 16-bit activations"))
