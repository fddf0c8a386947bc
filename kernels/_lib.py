"""ctypes binding of the compiled CUDA library (kernels/csrc/svdq.cu): a C ABI, no libtorch.

Where the library is looked for, first hit wins:
1. `$SVDQ_KERNELS_LIB` (a file path);
2. `kernels/_build/libsvdq_kernels.so` (kernels/build.sh);
3. the `svdquant_kernels` wheel (kernels/build_wheel.py), if installed.
Nothing here imports torch at module import; nothing raises when the library is absent:
`load()` returns None and the callers fall back to the pure-torch reference.
"""
import ctypes
import os
import pathlib
import threading

LIB_NAME = "libsvdq_kernels.so"
ABI_VERSION = 3  # 2: quantize takes a workspace (deterministic LoRA-down K-split sum); 3: int_ratio formats, path 91
DT_F16, DT_BF16 = 0, 1
# activation formats of svdq_quantize_act_lora_down (kernels/csrc/svdq.cu AF_*)
FMT_INT4, FMT_E4M3, FMT_INT4_RATIO, FMT_I8_RATIO = 0, 1, 2, 3
FMT_I8_ROW = 4  # FMT_I8_RATIO's codes with one base per row for all of K (kernel 2e, path 91 variants 20-24)
FMT_I8_ROW_GIVEN = 5  # FMT_I8_ROW from row bases the op that produced x already wrote (has_row_base_producers)
FMT_I8_ROW_CODES = 6  # FMT_I8_ROW whose bases and codes that op wrote: kernel 1 computes only the LoRA-down
FMT_ROW = (FMT_I8_ROW, FMT_I8_ROW_GIVEN, FMT_I8_ROW_CODES)  # one base per row (kernel 2e's input)
RATIO_CHUNK = 4  # groups per int_ratio activation base (kernels/reference.py ACT_CHUNK_GROUPS)

_lock = threading.Lock()
_lib = None
_load_error = None
_tried = False


def _candidates():
    env = os.environ.get("SVDQ_KERNELS_LIB")
    if env:
        yield pathlib.Path(env)
    yield pathlib.Path(__file__).resolve().parent / "_build" / LIB_NAME
    try:
        import svdquant_kernels  # the wheel built by kernels/build_wheel.py

        yield pathlib.Path(svdquant_kernels.library_path())
    except Exception:
        pass


class LinearArgs(ctypes.Structure):
    """kernels/csrc/svdq_abi.h SvdqLinearArgs, field for field (svdq_linear: both kernels of a linear in one call)."""
    _fields_ = [(n, ctypes.c_void_p) for n in ("x", "smooth", "pdown", "qact", "ascales", "lora", "part", "cnt",
                                                "qweight", "wscales", "wmult", "proj_up", "bias", "out", "stream")] + \
               [(n, ctypes.c_int) for n in ("M", "N", "K", "Mp", "rp", "dtype", "fmt", "path", "variant", "device")]


def _linear_args_match(lib) -> bool:
    """Whether the library's SvdqLinearArgs has LinearArgs' size and field offsets."""
    out = (ctypes.c_longlong * 32)()
    n = lib.svdq_linear_args_layout(out, 32)
    want = [ctypes.sizeof(LinearArgs)] + [getattr(LinearArgs, f).offset for f, _ in LinearArgs._fields_]
    return n == len(want) and list(out[:n]) == want


def _bind(lib):
    c_int, c_void_p = ctypes.c_int, ctypes.c_void_p
    lib.svdq_abi_version.restype = c_int
    lib.svdq_abi_version.argtypes = []
    lib.svdq_error_string.restype = ctypes.c_char_p
    lib.svdq_error_string.argtypes = [c_int]
    lib.svdq_device_path.restype = c_int
    lib.svdq_device_path.argtypes = [c_int]
    lib.svdq_quantize_act_lora_down.restype = c_int
    lib.svdq_quantize_act_lora_down.argtypes = [c_void_p] * 8 + [c_int] * 7 + [c_void_p]
    lib.svdq_quant_workspace.restype = c_int
    lib.svdq_quant_workspace.argtypes = [c_int] * 4 + [ctypes.POINTER(ctypes.c_longlong), ctypes.POINTER(c_int)]
    lib.svdq_w4a4_gemm.restype = c_int
    lib.svdq_w4a4_gemm.argtypes = [c_void_p] * 8 + [c_int] * 9 + [c_void_p]
    if hasattr(lib, "svdq_gptq_block"):  # optional: a library built before it still serves the linear
        lib.svdq_gptq_block.restype = c_int
        lib.svdq_gptq_block.argtypes = [c_void_p] * 3 + [c_int] + [c_void_p] * 2 + [c_int] * 2 + [ctypes.c_float, c_void_p]
    if hasattr(lib, "svdq_w4a4_gemm_packed"):  # optional as well (kernel 2d)
        lib.svdq_w4a4_gemm_packed.restype = c_int
        lib.svdq_w4a4_gemm_packed.argtypes = [c_void_p] * 9 + [c_int] * 7 + [c_void_p]
    if hasattr(lib, "svdq_w4a16_gemv"):  # optional as well (kernels/csrc/w4a16.cu)
        lib.svdq_w4a16_gemv.restype = c_int
        lib.svdq_w4a16_gemv.argtypes = [c_void_p] * 10 + [c_int] * 5 + [c_void_p]
    if hasattr(lib, "svdq_linear"):  # optional as well: both kernels in one call (used when its layout matches)
        lib.svdq_linear_args_layout.restype = c_int
        lib.svdq_linear_args_layout.argtypes = [ctypes.POINTER(ctypes.c_longlong), c_int]
        lib.svdq_linear.restype = c_int
        lib.svdq_linear.argtypes = [ctypes.POINTER(LinearArgs)]
        lib.svdq_linear_ok = _linear_args_match(lib)
    if hasattr(lib, "svdq_qk_norm_rope"):  # optional as well (kernels/csrc/flux_ops.cu)
        c_ll = ctypes.c_longlong
        lib.svdq_qk_norm_rope.restype = c_int
        lib.svdq_qk_norm_rope.argtypes = ([c_void_p, c_ll, c_ll, c_int, c_void_p, c_void_p] * 2
                                          + [c_void_p, c_ll] + [c_void_p] * 3 + [c_int, c_int, ctypes.c_float]
                                          + [c_int, c_int, c_void_p])
        lib.svdq_ln_modulate.restype = c_int
        lib.svdq_ln_modulate.argtypes = [c_void_p, c_ll, c_void_p, c_void_p, c_ll, c_void_p, c_int, c_int, c_int,
                                         ctypes.c_float, c_int, c_int, c_void_p]
        lib.svdq_concat_rows.restype = c_int
        lib.svdq_concat_rows.argtypes = [c_void_p, c_ll, c_int, c_void_p, c_ll, c_int, c_int, c_void_p, c_int, c_int,
                                         c_void_p]
    if hasattr(lib, "svdq_ln_modulate_rowbase"):  # optional as well: the producers of FMT_I8_ROW_GIVEN's row bases
        c_ll = ctypes.c_longlong
        lib.svdq_ln_modulate_rowbase.restype = c_int
        lib.svdq_ln_modulate_rowbase.argtypes = [c_void_p, c_ll, c_void_p, c_void_p, c_ll, c_void_p, c_int, c_int,
                                                 c_int, ctypes.c_float, c_void_p, c_void_p, c_void_p, c_int, c_int,
                                                 c_int, c_void_p]
        lib.svdq_concat_rows_rowbase.restype = c_int
        lib.svdq_concat_rows_rowbase.argtypes = [c_void_p, c_ll, c_int, c_void_p, c_ll, c_int, c_int, c_void_p, c_int,
                                                 c_void_p, c_void_p, c_void_p, c_int, c_int, c_int, c_void_p]
    return lib


def _has(symbol: str) -> bool:
    lib = load()
    return lib is not None and hasattr(lib, symbol)


def has_flux_ops() -> bool:
    """Whether the loaded library has the FLUX blocks' kernels (kernels/csrc/flux_ops.cu)."""
    return _has("svdq_qk_norm_rope")


def has_row_base_producers() -> bool:
    """Whether the loaded library's FLUX kernels can also write the next linear's row bases and codes
    (FMT_I8_ROW_GIVEN, FMT_I8_ROW_CODES)."""
    return _has("svdq_ln_modulate_rowbase")


def has_gptq() -> bool:
    """Whether the loaded library has the GPTQ block kernel (kernels/csrc/gptq.cu)."""
    return _has("svdq_gptq_block")


def has_packed_gemm() -> bool:
    """Whether the loaded library has the Hopper GEMM on packed weights (kernel 2d, svdq_w4a4_gemm_packed)."""
    return _has("svdq_w4a4_gemm_packed")


def has_linear_call() -> bool:
    """Whether the loaded library runs a whole linear in one call (svdq_linear, with the layout Python expects)."""
    return _has("svdq_linear") and getattr(load(), "svdq_linear_ok", False) is True


def has_gemv() -> bool:
    """Whether the loaded library has the W4A16 GEMV of the 16-bit-activation layers (kernels/csrc/w4a16.cu)."""
    return _has("svdq_w4a16_gemv")


def load():
    """The loaded library, or None (see `load_error()`)."""
    global _lib, _load_error, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        errors = []
        for path in _candidates():
            if not path.is_file():
                errors.append(f"{path}: not found")
                continue
            try:
                lib = _bind(ctypes.CDLL(str(path)))
                if lib.svdq_abi_version() != ABI_VERSION:
                    errors.append(f"{path}: ABI {lib.svdq_abi_version()} != {ABI_VERSION}")
                    continue
                _lib = lib
                break
            except (OSError, AttributeError) as e:
                errors.append(f"{path}: {e}")
        _load_error = None if _lib is not None else "; ".join(errors)
        _tried = True
        return _lib


def load_error():
    load()
    return _load_error


class KernelError(RuntimeError):
    pass


def check(code: int, what: str):
    if code != 0:
        msg = _lib.svdq_error_string(code).decode() if _lib is not None else str(code)
        raise KernelError(f"{what} failed: {msg} (code {code})")


_paths = {}


_ws = {}


def quant_workspace(m: int, k: int, rp: int, index: int):
    """(fp32 partial count, int32 counter count) of the quantize kernel's workspace; (0, 0) when none."""
    key = (m, k, rp, index)
    r = _ws.get(key)
    if r is None:
        pf, nc = ctypes.c_longlong(0), ctypes.c_int(0)
        check(_lib.svdq_quant_workspace(m, k, rp, index, ctypes.byref(pf), ctypes.byref(nc)), "svdq_quant_workspace")
        r = _ws[key] = (int(pf.value), int(nc.value))
    return r


def device_path(index: int) -> int:
    """90: sm_90a wgmma path; 80: INT4 mma.sync path; 0: no CUDA path for this device."""
    lib = load()
    if lib is None:
        return 0
    if index not in _paths:
        _paths[index] = int(lib.svdq_device_path(int(index)))
    return _paths[index]
