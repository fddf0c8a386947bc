"""Input groups at run time: 4-bit linears fed the very same input tensor that share one smoothing vector and one
proj_down (SD/SDXL attention's q/k/v, and k/v on the text: the file's `input_groups`, docs/FORMAT.md) quantize
that input once.

ComfyUI's attention calls to_q(x), to_k(x), to_v(x) one after the other with one tensor object. The first member
called with a tensor runs kernel 1 (quantize + LoRA-down) and keeps its output; the others find it (same object,
same version counter: not modified in place since) and run only their GEMM. Outputs are bitwise those of the
members run alone (the same kernel-1 arithmetic on the same input). The kept output is dropped once every member
has read it, or when a member sees another tensor. No module forward is replaced, so ComfyUI's attention patches
(which call the projections themselves) keep working; under torch.compile members run alone (no tensor identity
in a traced graph).
"""
import logging

import torch

from .. import kernels

log = logging.getLogger(__name__)


class InputGroup:
    def __init__(self, members: list):
        self.members = members
        self._kept = None  # (input tensor, its version, SharedInput, members that have not read it yet)

    def forward(self, member, x: torch.Tensor, prepared: dict):
        """member's 4-bit output for x (before its LoRA terms), or None: then the member runs alone."""
        kept = self._kept
        if kept is not None and kept[0] is x and kept[1] == x._version:
            shared, waiting = kept[2], kept[3]
        else:
            shared = kernels.quantize_input(x, prepared, member.group_size)
            if shared is None:
                self._kept = None
                return None
            waiting = set(range(len(self.members)))
            self._kept = (x, x._version, shared, waiting)
        waiting.discard(member._input_group_index)
        if not waiting:
            self._kept = None  # everyone has read it: free kernel 1's buffer and the reference to x
        return kernels.linear_from_input(shared, prepared, member.group_size)

    def clear(self) -> None:
        self._kept = None


def _same(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.detach().cpu(), b.detach().cpu())


def attach_input_groups(root: torch.nn.Module, groups, source: str = "") -> int:
    """Make each declared group of 4-bit linears under `root` (names relative to it) an InputGroup. A group whose
    members are missing, not 4-bit, of different scale modes or group sizes, with activations not quantized by
    kernel 1, or without one smoothing vector and proj_down stays ungrouped (logged; the members run alone).
    Returns the number of groups attached."""
    modules = dict(root.named_modules())
    attached = 0
    for names in groups or []:
        mods = [modules.get(n) for n in names]
        why = None
        if len(mods) < 2 or any(m is None or not getattr(m, "quantized", False) for m in mods):
            why = "not all of them are 4-bit layers of this model"
        elif len({(m.scale_mode, m.group_size, m.in_features) for m in mods}) != 1:
            why = "their scale modes, group sizes or input sizes differ"
        elif any(m.act_shift is not None or getattr(m, "act_bits", None) is not None for m in mods):
            why = "their activations are not 4-bit signed codes"
        elif not all(_same(m.smooth_factor, mods[0].smooth_factor) and _same(m.proj_down, mods[0].proj_down)
                     for m in mods[1:]):
            why = "their smooth_factor or proj_down differ"
        if why:
            log.warning(f"[svdquant] {source}: input group {list(names)} runs ungrouped: {why}")
            continue
        group = InputGroup(mods)
        for i, m in enumerate(mods):
            m._input_group, m._input_group_index = group, i
        attached += 1
    return attached


def detach_input_groups(root: torch.nn.Module) -> int:
    """Make every grouped layer under `root` run alone again (benchmarks compare both); returns how many groups."""
    groups = set()
    for m in root.modules():
        g = getattr(m, "_input_group", None)
        if g is not None:
            groups.add(id(g))
            m._input_group = None
    return len(groups)
