"""Nunchaku's on-disk tensor tilings, undone: their packed tensors -> our natural layout (docs/FORMAT.md).

Written from reading the code that writes the files (deepcompressor `backend/nunchaku/utils.py`
NunchakuWeightPacker, `backend/tinychat/utils.py` pack_w4) and the kernels that read them
(nunchaku `src/kernels/zgemm`, `src/kernels/awq/gemv_awq.cu`); no code was copied. Index names
follow the PTX fragment of `mma.m16n8k64` (lane = 4·row-in-8 + thread-in-group). Every function
here is a pure permutation or bit extraction: no arithmetic on values.

W4A4 (SVDQuant) layers, N outputs, K inputs, both multiples of 128:
- `qweight` int8 (N, K/2), a stream of int32 words in the order
  (n_tile N/128, k_tile K/64, n_pack 8, n_lane 8, k_lane 4, n_half 2, k_half 2) with
  n = 128·n_tile + 16·n_pack + 8·n_half + n_lane, k = 64·k_tile + 32·k_half + 8·k_lane + r;
  each word holds its 8 codes r = 0..7 as nibbles from the low end, little-endian: byte b holds
  r = 2b (low nibble) and 2b+1 (high), which is our byte order, so undoing it moves whole bytes.
- `wscales` (K/64, N) and the per-channel vectors `bias` (N,), `smooth` (K,): for each block of
  128 channels (and each group), the order (p 8, l 4, s 2, t 2) with channel = 16p + 8s + 2l + t
  (each lane loads 2×2 scales, broadcast to the four lanes of an MMA row group).
- `lora_down` (K, r) / `lora_up` (N, r): 16×16 tiles (outer: channel tile, then rank tile), inside a
  tile the order (n_lane 8, k_lane 4, n_half 2, k_half 2, pair 2). In `lora_up` the channel is the
  MMA "n" (= 8·n_half + n_lane) and the rank the "k" (= 8·k_half + 2·k_lane + pair); in `lora_down`
  the roles swap: the rank is "n", the input channel "k".

W4A16 (AWQ, the adaLN modulation linears): `qweight` int32 (N/4, K/2) = int16 words (N/4, K):
rows 4i..4i+3 interleaved per 64 input channels; each int16 holds codes of channels
(c, c+8, c+16, c+24) of a 32-channel block as nibbles from the low end; codes are unsigned
0..15. `wscales`/`wzeros` (≥K/64, N): W = code·scale + zero (rows past K/64 are padding).
"""
import torch

TILE_N = 128   # output channels per weight tile / per scale block
TILE_K = 64    # input channels per k tile = group size of INT4 scales


class LayoutError(ValueError):
    """A packed tensor whose shape does not fit the Nunchaku layout."""


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise LayoutError(what)


def unpack_w4a4_weight(qweight: torch.Tensor) -> torch.Tensor:
    """Nunchaku packed int4 (N, K/2) int8 -> our packed int4 (N, K/2) int8 (low nibble = even k)."""
    _need(qweight.ndim == 2 and qweight.dtype == torch.int8, f"qweight must be 2-D int8, got {qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    _need(n % TILE_N == 0 and k % (2 * TILE_K) == 0, f"qweight {tuple(qweight.shape)}: N must be a multiple of 128 and K of 128")
    b = qweight.contiguous().reshape(n // TILE_N, k // TILE_K, 8, 8, 4, 2, 2, 4)
    # (n_tile, k_tile, n_pack, n_lane, k_lane, n_half, k_half, byte) -> (n..., k...)
    return b.permute(0, 2, 5, 3, 1, 6, 4, 7).reshape(n, k // 2).contiguous()


def unpack_channel_scales(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Nunchaku scale order -> natural: (G, n) for per-group scales, (n,) for a per-channel vector."""
    _need(n % TILE_N == 0 and packed.numel() % n == 0, f"scales of {packed.numel()} values do not tile {n} channels")
    groups = packed.numel() // n
    t = packed.contiguous().reshape(n // TILE_N, groups, 8, 4, 2, 2)
    # (block, group, p, l, s, t) -> (group, block, p, s, l, t)
    out = t.permute(1, 0, 2, 4, 3, 5).reshape(groups, n)
    return out.reshape(n) if packed.ndim == 1 else out.contiguous()


def unpack_lowrank(packed: torch.Tensor, down: bool) -> torch.Tensor:
    """Nunchaku `lora_down` (K, r) / `lora_up` (N, r) -> our proj_down (K, r) / proj_up (N, r)."""
    _need(packed.ndim == 2, f"low-rank tensor must be 2-D, got {tuple(packed.shape)}")
    c, r = packed.shape
    _need(c % 16 == 0 and r % 16 == 0, f"low-rank tensor {tuple(packed.shape)}: both sides must be multiples of 16")
    t = packed.contiguous().reshape(c // 16, r // 16, 8, 4, 2, 2, 2)  # (c_tile, r_tile, n_lane, k_lane, n_half, k_half, pair)
    if down:  # rank = n (n_half, n_lane), channel = k (k_half, k_lane, pair)
        return t.permute(0, 5, 3, 6, 1, 4, 2).reshape(c, r).contiguous()
    return t.permute(0, 4, 2, 1, 5, 3, 6).reshape(c, r).contiguous()  # channel = n, rank = k


def unpack_awq_codes(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """AWQ int32 (N/4, K/2) -> unsigned codes (N, K) uint8 in 0..15."""
    _need(qweight.ndim == 2 and qweight.dtype == torch.int32, f"AWQ qweight must be 2-D int32, got {qweight.dtype} {tuple(qweight.shape)}")
    n4, k2 = qweight.shape
    _need(k2 * 2 == k and k % TILE_K == 0, f"AWQ qweight {tuple(qweight.shape)} does not hold {k} input channels in groups of 64")
    words = qweight.contiguous().view(torch.int16).to(torch.int32).reshape(n4, k // 64, 4, 16)
    words = words.permute(0, 2, 1, 3).reshape(n4 * 4, k // 32, 8)        # (row, 32-block, word c)
    nib = torch.stack([(words >> (4 * s)) & 0xF for s in range(4)], dim=2)  # (row, block, s, c): channel 8s + c
    return nib.reshape(n4 * 4, k).to(torch.uint8)
