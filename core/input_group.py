"""Input groups at run time: 4-bit linears fed the very same input tensor that share one smoothing vector and one
proj_down (SD/SDXL attention's q/k/v, and k/v on the text: the file's `input_groups`, docs/FORMAT.md) quantize
that input once.

ComfyUI's attention calls to_q(x), to_k(x), to_v(x) one after the other with one tensor object. The first member
called with a tensor computes for all: on Hopper's int8 path one GEMM over the members' weights side by side
(kernels.fuse_prepared; each member returns a column view of the output), elsewhere one kernel-1 pass (quantize +
LoRA-down) whose output each member's GEMM reads. The others find the result (same object, same version counter:
not modified in place since). The kept result is dropped once every member has read it, or when a member sees
another tensor. Each output equals the member's own run alone (bitwise on the GPU paths: tests/gpu). No module
forward is replaced, so ComfyUI's attention patches (which call the projections themselves) keep working; under
torch.compile members run alone (no tensor identity in a traced graph).
"""
import logging

import torch

from .. import kernels

log = logging.getLogger(__name__)


class InputGroup:
    def __init__(self, members: list):
        self.members = members
        self._kept = None   # (input tensor, its version, ("out", fused output) or ("in", SharedInput), unread members)
        self._fused = None  # (the members' prepared dicts' ids, the fused prepared layer or None)
        self._cols = []
        a = 0
        for m in members:  # each member's columns of the fused output
            self._cols.append((a, a + m.out_features))
            a += m.out_features

    def forward(self, member, x: torch.Tensor, prepared: dict):
        """member's 4-bit output for x (before its LoRA terms), or None: then the member runs alone."""
        kept = self._kept
        if kept is not None and kept[0] is x and kept[1] == x._version:
            result, waiting = kept[2], kept[3]
        else:
            fused = self._fused_layer()
            if fused is not None:  # one GEMM for every member; each takes its columns
                result = ("out", kernels.linear(x, fused, member.group_size))
            else:  # one kernel-1 pass; each member runs its own GEMM on it
                shared = kernels.quantize_input(x, prepared, member.group_size)
                if shared is None:
                    self._kept = None
                    return None
                result = ("in", shared)
            waiting = set(range(len(self.members)))
            self._kept = (x, x._version, result, waiting)
        index = member._input_group_index
        waiting.discard(index)
        if not waiting:
            self._kept = None  # everyone has read it: free the buffer and the reference to x
        if result[0] == "out":
            a, b = self._cols[index]
            return result[1][..., a:b]
        return kernels.linear_from_input(result[1], prepared, member.group_size)

    def _fused_layer(self):
        """The members as one prepared layer (kernels.fuse_prepared), made once every member holds its prepared
        tensors for one device and dtype, and again after any of them was prepared anew (moved, cast)."""
        cached = [getattr(m, "_prepared", None) for m in self.members]
        if any(c is None for c in cached) or len({c[0] for c in cached}) != 1:
            return None
        key = tuple(id(c[1]) for c in cached)
        if self._fused is None or self._fused[0] != key:
            self._fused = (key, kernels.fuse_prepared([c[1] for c in cached]))
        return self._fused[1]

    def reset(self) -> None:
        """Forget what was kept and the fused layer (a member moved: its tensors are elsewhere now)."""
        self._kept = None
        self._fused = None


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
