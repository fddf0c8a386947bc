"""CPU-only (CI): the kernels package imports without the CUDA library or a GPU and falls back to the reference."""
import torch

from comfyui_svdquant import kernels
from comfyui_svdquant.kernels import _lib
from comfyui_svdquant.kernels import reference as ref

from _layers import make_layer, make_x


def test_cpu_uses_reference_and_matches():
    assert kernels.backend_name("cpu") == "reference"
    lay = make_layer(128, 256, 16, torch.float32, "cpu")
    p = kernels.prepare_weights(lay, torch.device("cpu"))
    x = make_x(5, 256, torch.float32, "cpu").reshape(1, 5, 256)
    y = kernels.linear(x, p)
    y_ref = ref.svdquant_linear(x, lay["qweight"], lay["wscales"], lay["smooth_factor"], lay["proj_down"],
                                lay["proj_up"], lay["bias"])
    assert torch.equal(y, y_ref)


def test_missing_library_is_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("SVDQ_KERNELS_LIB", str(tmp_path / "nope.so"))
    monkeypatch.setattr(_lib, "_tried", False)
    monkeypatch.setattr(_lib, "_lib", None)
    monkeypatch.setattr(_lib, "_candidates", lambda: iter([tmp_path / "nope.so"]))
    assert _lib.load() is None
    assert "not found" in _lib.load_error()
    assert _lib.device_path(0) == 0
    monkeypatch.setattr(_lib, "_tried", False)  # let the next user load the real one


def test_forced_reference(monkeypatch):
    monkeypatch.setenv("SVDQ_BACKEND", "reference")
    assert kernels.backend_name("cuda") == "reference"


def test_compiled_path_is_one_op_per_linear(monkeypatch):
    """Under torch.compile a 4-bit linear is one `svdquant::linear` op (one dispatch of host time per layer, not two),
    traced without a graph break. Run on the CPU with the op's CUDA kernel stood in by a CPU implementation that
    returns the right shape; the kernels themselves are compared compiled vs eager on the GPU (tests/gpu)."""
    from _layers import make_ratio_layer
    ops = kernels._get_ops()
    monkeypatch.setattr(kernels, "_device_path", lambda device: 90)
    p = kernels.prepare_weights(make_ratio_layer(128, 256, 16, torch.bfloat16, "cpu"), torch.device("cpu"))
    assert p["_path"] == 91
    calls = []
    stand_in = torch.library.Library("svdquant", "IMPL")
    stand_in.impl("linear", lambda x2, *a: calls.append(x2.shape) or x2.new_zeros(x2.shape[0], a[2].shape[0]), "CPU")
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    try:
        torch._dynamo.reset()
        y = torch.compile(lambda x: ops.linear(x, p) + 1, backend=backend, fullgraph=True)(
            make_x(7, 256, torch.bfloat16, "cpu"))
    finally:
        stand_in._destroy()
        torch._dynamo.reset()
    targets = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.svdquant.linear.default) == 1
    assert not any("quantize_act_lora_down" in str(t) or "w4a4_gemm" in str(t) for t in targets)
    assert calls == [(7, 256)] and y.shape == (7, 128)


def test_packed_weights_need_hopper_and_kernel_2d(monkeypatch):
    """weights_in_vram=compact (packed_weights) selects kernel 2d only on Hopper with a library that has it; there it
    drops the N x K int8 copy from the bytes ComfyUI is told about. Without kernel 2d it falls back to the copy (2c),
    and other paths never hold one. Decided without a GPU: the device path and the library's answer are stood in."""
    n, k, r = 3072, 3072, 32
    for path, has_2d, name, saved in [(90, True, "cuda-sm90a-int8-packed", n * k), (90, False, "cuda-sm90a-int8", 0),
                                      (80, True, "cuda-mma-int4", 0)]:
        monkeypatch.setattr(kernels, "_device_path", lambda d, p=path: p)
        monkeypatch.setattr(_lib, "has_packed_gemm", lambda h=has_2d: h)
        assert kernels.backend_name("cuda", "int_ratio", packed=True) == name
        fast = kernels.prepared_extra_bytes(n, k, r, "cuda", ratio=True)
        compact = kernels.prepared_extra_bytes(n, k, r, "cuda", ratio=True, packed=True)
        assert fast - compact == saved, (path, has_2d)


class _RecordingLib:
    """Stands in for the CUDA library: records each entry point's arguments, returns success."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        if not name.startswith("svdq_"):
            raise AttributeError(name)
        return lambda *args: self.calls.append((name, args)) or 0


def test_eager_and_compiled_paths_pass_the_packed_layers_pointers(monkeypatch):
    """The eager path (linear_direct), the compiled path's op body and gemm_into hand kernel 2d (path 92) the same
    arguments in its ABI order (docs/KERNELS.md): the packed codes, their multipliers, K = 2 x the packed columns;
    path 91 goes to svdq_w4a4_gemm with its path and variant. The library is a recorder, so this runs on the CPU."""
    from _layers import make_ratio_layer
    ops = kernels._get_ops()
    lib = _RecordingLib()
    monkeypatch.setattr(_lib, "load", lambda: lib)
    monkeypatch.setattr(_lib, "has_packed_gemm", lambda: True)
    monkeypatch.setattr(_lib, "quant_workspace", lambda *a: (0, 0))
    monkeypatch.setattr(ops, "_raw_stream", lambda index: 77)
    monkeypatch.setattr(ops, "_act_scratch", lambda index, stream, size: torch.empty(size, dtype=torch.uint8))
    monkeypatch.setattr(kernels, "_device_path", lambda device: 90)
    n, k, m = 128, 256, 5
    lay = make_ratio_layer(n, k, 16, torch.bfloat16, "cpu")
    x = make_x(m, k, torch.bfloat16, "cpu")
    p92 = kernels.prepare_weights({**lay, "packed_weights": True}, torch.device("cpu"))
    p91 = kernels.prepare_weights(lay, torch.device("cpu"))
    assert (p92["_path"], p91["_path"]) == (92, 91)
    y92 = ops.linear_direct(x, p92)
    y_op = ops._linear_op(x, p92["_smooth_rcp"], ops.cast_cached(p92, "_proj_down", x.dtype), p92["_qw"],
                          p92["_wscales"], p92["_proj_up"], p92["_bias"], p92["_rp"], p92["_afmt"], 92, p92["_wmult"])
    ops.linear_direct(x, p91)
    gemms = [(name, args) for name, args in lib.calls if "gemm" in name]
    assert [g[0] for g in gemms] == ["svdq_w4a4_gemm_packed"] * 2 + ["svdq_w4a4_gemm"]
    for _, a in gemms[:2]:
        assert a[2] == p92["_qw"].data_ptr() and a[3] == p92["_wmult"].data_ptr() and a[4] == p92["_wscales"].data_ptr()
        assert a[9:14] == (m, n, k, a[12], p92["_rp"]) and a[-1] == 77 and len(a) == 17
    assert gemms[0][1][8] == y92.data_ptr() and gemms[1][1][8] == y_op.data_ptr()
    a91 = gemms[2][1]
    assert a91[2] == p91["_qw"].data_ptr() and a91[8:11] == (m, n, k) and a91[14:16] == (91, 0) and len(a91) == 18
    out = torch.empty(m, n, dtype=torch.bfloat16)
    qa, sa, la = (torch.empty(1, dtype=torch.uint8), torch.empty(1, 8), torch.empty(m, p92["_rp"]))
    ops.gemm_into(qa, sa, p92["_qw"], p92["_wscales"], la, p92["_proj_up"], p92["_bias"], out, 92, wmult=p92["_wmult"])
    name, a = lib.calls[-1]
    assert name == "svdq_w4a4_gemm_packed" and a[3] == p92["_wmult"].data_ptr() and a[9:12] == (m, n, k)
