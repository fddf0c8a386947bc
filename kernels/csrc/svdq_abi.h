// What every source file of the C-ABI library shares: the export macro and the library's own error codes
// (returned beside CUDA's; svdq_error_string in svdq.cu names them).
#pragma once

#include <stddef.h>

#define SVDQ_API extern "C" __attribute__((visibility("default")))

enum { ERR_BAD_ARG = 10001, ERR_NO_PATH = 10002 };
enum { DT_F16 = 0, DT_BF16 = 1 };  // the dtype argument (kernels/_lib.py DT_*)

// Every argument of one eager 4-bit linear (kernel 1, then kernel 2 on its output), for svdq_linear: one call
// from Python instead of two with 16-18 converted arguments each (ctypes' per-argument cost was a third of a
// linear's host time). kernels/ops.py LinearArgs mirrors it field for field; svdq_linear_args_layout reports its
// size and offsets so that a mismatch is found when the library is loaded, not by a wrong launch.
struct SvdqLinearArgs {
  const void* x;          // (M, K) 16-bit activations
  const float* smooth;    // 1/lambda (K,)
  const void* pdown;      // proj_down (K, rp) in x's dtype, or null (rp = 0)
  void* qact;             // kernel 1's outputs (one caller buffer)
  float* ascales;
  float* lora;
  float* part;            // kernel 1's K-split workspace, or null
  int* cnt;
  const void* qweight;    // kernel 2: weights as the path reads them
  const float* wscales;
  const void* wmult;      // path 92's multipliers, else null
  const float* proj_up;
  const float* bias;      // or null
  void* out;              // (M, N)
  void* stream;
  int M, N, K, Mp, rp, dtype, fmt, path, variant, device;
};

// out[0] = sizeof(SvdqLinearArgs), out[1..25] = each field's offset in declaration order; returns the count (26).
// The library exports it (svdq_linear_args_layout); tests/test_linear_call_abi.py compiles it without CUDA.
static inline int svdq_linear_args_layout_of(long long* out, int n) {
#define SVDQ_OFF(f) (long long)offsetof(SvdqLinearArgs, f)
  const long long v[] = {(long long)sizeof(SvdqLinearArgs), SVDQ_OFF(x), SVDQ_OFF(smooth), SVDQ_OFF(pdown),
                         SVDQ_OFF(qact), SVDQ_OFF(ascales), SVDQ_OFF(lora), SVDQ_OFF(part), SVDQ_OFF(cnt),
                         SVDQ_OFF(qweight), SVDQ_OFF(wscales), SVDQ_OFF(wmult), SVDQ_OFF(proj_up), SVDQ_OFF(bias),
                         SVDQ_OFF(out), SVDQ_OFF(stream), SVDQ_OFF(M), SVDQ_OFF(N), SVDQ_OFF(K), SVDQ_OFF(Mp),
                         SVDQ_OFF(rp), SVDQ_OFF(dtype), SVDQ_OFF(fmt), SVDQ_OFF(path), SVDQ_OFF(variant),
                         SVDQ_OFF(device)};
#undef SVDQ_OFF
  const int total = (int)(sizeof(v) / sizeof(v[0]));
  for (int i = 0; i < total && i < n; ++i) out[i] = v[i];
  return total;
}
