// SVDQuant W4A4 kernels behind a plain C ABI (no libtorch): loaded with ctypes by kernels/_lib.py.
//
// Kernel 1  quantize_act_lora_down: one pass over X (M x K, bf16/fp16): X/lambda -> per-(token, 64-group)
//           absmax INT4 codes (emitted as packed int4 or as e4m3 bytes) + fp32 scales, and X . proj_down
//           (bf16/fp16 mma.sync, fp32 accumulate). K is split over gridDim.y CTAs per 64-row block; each
//           split stores its fp32 partial to its own workspace slice; the slices are summed along a fixed
//           4-ary tree over the split index (each node by the last child CTA to arrive at its counter),
//           the root into lora_act: bitwise deterministic run to run (no float atomics anywhere).
// Kernel 1b quant_i8_ratio_kernel: kernel 1 for int_ratio int8 activations (FMT_I8, Hopper path 91), same
//           bytes and bases; the chunk's X / 1/lambda / proj_down tiles staged in smem by double-buffered
//           cp.async, 8 warps per 64-row block, <= 128 registers (2 CTAs per SM on sm_90).
// Kernel 2a w4a4_gemm_sm90 (sm_90a only): e4m3 x e4m3 wgmma per 64-group (integer codes are exact in
//           e4m3; per-group partials <= 3136 are exact in the fp32 accumulator), promoted to fp32 with
//           a_scale*w_scale by CUDA cores while the next group's wgmma runs; epilogue: LoRA-up as tf32
//           wgmma into the same accumulators, bias, cast.
// Kernel 2b w4a4_gemm_mma (sm_80+): INT4 mma.sync m16n8k64 on the natural packed layout (emulated on
//           Hopper: correctness only there).
//
// Internal layouts (produced by kernels/__init__.py prepare_weights and kernel 1):
//   ascales  fp32 (K/64, Mp)  Mp = round_up(M, 4)        (transposed vs. the reference's (M, K/64))
//   wscales  fp32 (K/64, N)                                (the file layout, as fp32)
//   qact     path 90: e4m3 bytes (M, K); path 80: packed int4 (M, K/2) (low nibble = even k)
//   qweight  path 90: e4m3 bytes (N, K); path 80: packed int4 (N, K/2) (the file layout)
//   lora_act fp32 (M, rp), proj_down (K, rp) in x's dtype, proj_up fp32 (N, rp); rp = rank padded to 32
//   kernel-1 workspace (svdq_quant_workspace): partials fp32 (S, M, rp), counters int32 (row blocks x S), zeroed
#include <cuda.h>  // CUtensorMap types only; the driver entry point is fetched at run time
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <mutex>
#include <type_traits>
#include <utility>
#include <stdlib.h>
#include <string.h>

#include "half_pair.h"
#include "ratio_codes.h"
#include "svdq_abi.h"
#include "tma_cache.h"
#include "wgmma_gen.h"

enum { FMT_INT4 = 0, FMT_E4M3 = 1, FMT_I8 = 2 };
// ABI activation formats of svdq_quantize_act_lora_down (kernel 1's FMT x float/int_ratio scales)
// AF_I8_ROW_GIVEN: AF_I8_ROW whose row bases the caller already wrote into ascales (the op that produced X computed
// them: kernels/csrc/flux_ops.cu ln_modulate / concat_rows), so kernel 1 skips its row-base pass. AF_I8_ROW_CODES:
// that op wrote the codes (qact) too, so kernel 1 computes only the LoRA-down.
enum { AF_INT4 = 0, AF_E4M3 = 1, AF_INT4_RATIO = 2, AF_I8_RATIO = 3, AF_I8_ROW = 4, AF_I8_ROW_GIVEN = 5,
       AF_I8_ROW_CODES = 6 };
static constexpr int G = 64;  // group size (the only one the kernels implement)
static constexpr int QF = 4;
static constexpr int RATIO_CHUNK = 4;  // groups sharing one int_ratio activation base (kernels/reference.py ACT_CHUNK_GROUPS)  // fan-in of kernel 1's fixed LoRA-down reduction tree over K-splits

// ------------------------------------------------------------------------------------------------
// small device helpers
// ------------------------------------------------------------------------------------------------
// Programmatic dependent launch (sm_90+; launch_pdl below): a kernel launched with it may start while the kernel
// before it in the stream is still running, and must wait here before it touches memory that kernel writes (or any
// earlier one: that kernel completed only after its own wait). A no-op for a kernel launched without it.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
// Lets the next kernel in the stream, if launched with PDL, start its prologue as SMs free up (it still waits for
// this kernel's completion in pdl_wait before reading anything).
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ void st_shared_v4(uint32_t addr, float4 v) {
  asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w) : "memory");
}
__device__ __forceinline__ float2 ld_shared_f2(uint32_t addr) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ uint4 ld_shared_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  int n = valid ? 16 : 0;  // src-size 0 -> zero fill
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// L2 (coherent) 16-byte load that the compiler may not move across the fences/barriers around it.
__device__ __forceinline__ float4 ld_cg_f4(const float* p) {
  float4 v;
  asm volatile("ld.global.cg.v4.f32 {%0,%1,%2,%3}, [%4];\n" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p) : "memory");
  return v;
}

// e4m3 byte of an integer code in [-7, 7] (exact): magnitude LUT + sign bit. Works on every arch.
__device__ __forceinline__ uint32_t code_to_e4m3(int q) {
  const uint64_t lut = 0x4E4C4A4844403800ull;  // 0,1,2,3,4,5,6,7
  uint32_t mag = (uint32_t)(q < 0 ? -q : q);
  uint32_t b = (uint32_t)(lut >> (8 * mag)) & 0xFFu;
  return q < 0 ? (b | 0x80u) : b;
}

// Fixed tree of fan-in QF over kernel 1's K-split index (gridDim.y): node (level, j) covers splits
// [j*span*QF, +span*QF) and is summed (children in index order) by whichever child CTA arrives last at its
// counter, into the slot of its first child; the root writes lora. The tree, not the arrival order, fixes
// every rounding; the reductions are spread over many CTAs and the tail is log_QF(S) short levels.
// Called by every thread of a CTA of NTH threads (64-row block) after its partial is in its `part` slice.
template <int RP, int NTH>
__device__ __forceinline__ void lora_split_tree(float* __restrict__ part, int* __restrict__ cnt, float* __restrict__ lora,
                                                int M) {
  const int S = gridDim.y;
  __shared__ int is_last;
  const int r0 = blockIdx.x * 64;
  const int n4 = min(64, M - r0) * RP / 4;  // float4 chunks of this row block in one slice (contiguous)
  const size_t slice = (size_t)M * RP;
  float* base = part + (size_t)r0 * RP;
  int* cnt_rb = cnt + (size_t)blockIdx.x * S;  // <= S nodes per row block for QF = 4
  int lvl_off = 0;
  for (int span = 1; span < S; span *= QF) {
    const int node = blockIdx.y / (span * QF);
    const int first = node * span * QF;
    const int nch = min(QF, (S - first + span - 1) / span);
    const bool root = span * QF >= S;
    if (nch > 1) {
      __threadfence();  // this CTA's slot (its partial or its last node sum) visible before the counter moves
      __syncthreads();
      if (threadIdx.x == 0) {
        const int prev = atomicAdd(cnt_rb + lvl_off + node, 1);  // integer: order-independent
        is_last = prev == nch - 1;
        if (is_last) cnt_rb[lvl_off + node] = 0;  // leaves the counters zeroed
      }
      __syncthreads();
      if (!is_last) return;
      __threadfence();
      float* dst = root ? lora + (size_t)r0 * RP : base + (size_t)first * slice;
      for (int c0 = threadIdx.x; c0 < n4; c0 += 4 * NTH) {
        float4 v[QF][4];
#pragma unroll
        for (int ch = 0; ch < QF; ++ch)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int c = c0 + i * NTH;
            v[ch][i] = (ch < nch && c < n4) ? ld_cg_f4(base + (size_t)(first + ch * span) * slice + 4 * c)
                                            : make_float4(0.f, 0.f, 0.f, 0.f);
          }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int c = c0 + i * NTH;
          float4 sum = v[0][i];
#pragma unroll
          for (int ch = 1; ch < QF; ++ch)
            if (ch < nch) { sum.x += v[ch][i].x; sum.y += v[ch][i].y; sum.z += v[ch][i].z; sum.w += v[ch][i].w; }
          if (c < n4) reinterpret_cast<float4*>(dst)[c] = sum;
        }
      }
    }
    lvl_off += (S + span * QF - 1) / (span * QF);
  }
}


// max |x * (1/lambda)| over one row's 64-column group, held as 8 columns per lane by the 8 lanes that share the
// row (lanes differing in bits 0-2); every one of them gets the result
template <typename T>
__device__ __forceinline__ float smoothed_row_absmax(const uint4& raw, const float (&lam)[8]) {
  float v[8];
  smooth8<T>(raw, lam, v);
  return lanes8_max(absmax8(v));
}

// One k16 step of kernel 1's LoRA-down on mma.sync m16n8k16 (fp32 accumulate): A = this warp's 16 rows of smoothed
// X, loaded by ldmatrix from `a_addr` (this lane's row address); B = rows [k0, k0 + 16) of the proj_down tile in smem
// (`ps_stride` bytes per row), all NT n8-tiles of the rank into acc[NT][4].
template <typename T, int NT, int NA>
__device__ __forceinline__ void lora_down_k16(float (&acc)[NA][4], uint32_t a_addr, const uint8_t* pd, int ps_stride,
                                              int k0, int lane) {
  uint32_t a[4];
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(a_addr));
#pragma unroll
  for (int nt2 = 0; nt2 < NT / 2; ++nt2) {
    uint32_t b[4];
    const int mi = lane >> 3;
    const int krow = k0 + (mi & 1) * 8 + (lane & 7);
    const int ncol = nt2 * 16 + (mi >> 1) * 8;
    const uint32_t addr = smem_u32(pd + krow * ps_stride + ncol * 2);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                 : "r"(addr));
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float* c = acc[nt2 * 2 + h];
      if constexpr (std::is_same<T, __nv_bfloat16>::value) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[2 * h]), "r"(b[2 * h + 1]));
      } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[2 * h]), "r"(b[2 * h + 1]));
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Kernel 1: quantize activations + LoRA down.
// CTA = 4 warps = 64 rows; warp w owns rows [16w, 16w+16) of the CTA's row block; the CTA walks
// groups [blockIdx.y*gpc, ...) in chunks of CH groups (CH = 4 for int_ratio scales, whose base is the
// chunk's absmax / 126; 1 otherwise). proj_down's 64 x rp chunk is staged in smem once per CTA and group.
// Formats: FMT_INT4 packed codes + fp32 per-group scales; FMT_E4M3 codes as e4m3 bytes + per-group scales;
// FMT_I8 (int_ratio only) code x multiplier as int8 bytes + one fp32 base per (chunk, row).
// ------------------------------------------------------------------------------------------------
template <typename T, int FMT, int RP, bool RATIO>
__global__ void __launch_bounds__(128) quant_lora_down_kernel(const T* __restrict__ x, const float* __restrict__ smooth_rcp,
                                                              const T* __restrict__ pdown, uint8_t* __restrict__ qact,
                                                              float* __restrict__ ascales, float* __restrict__ lora,
                                                              float* __restrict__ part, int* __restrict__ cnt, int M,
                                                              int K, int Mp, int gpc) {
  static_assert(FMT != FMT_I8 || RATIO, "int8 codes carry the int_ratio multiplier");
  constexpr int CH = RATIO ? RATIO_CHUNK : 1;
  constexpr int XS = G * 2 + 16;         // X tile row stride in bytes (padded)
  constexpr int PS = RP * 2 + 16;        // proj_down chunk row stride in bytes (padded)
  __shared__ __align__(16) uint8_t xs_all[4][16 * XS];
  __shared__ __align__(16) uint8_t ps_all[2][RP > 0 ? G * PS : 16];  // double-buffered proj_down chunk

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;
  const int row0 = blockIdx.x * 64 + warp * 16;
  const int ngroups = K / G;
  const int g_begin = blockIdx.y * gpc;  // gpc is a multiple of RATIO_CHUNK: chunks never straddle CTAs
  const int g_end = min(ngroups, g_begin + gpc);
  uint8_t* xs = xs_all[warp];

  constexpr int NT = RP / 8;  // n-tiles of 8 in the LoRA accumulators
  float acc[NT > 0 ? NT : 1][4];
#pragma unroll
  for (int i = 0; i < (NT > 0 ? NT : 1); ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

  const int ch = lane & 7;  // this thread's 16-byte chunk (8 values) within the group
  // per-row pointers, computed once (the loop below only adds the group offset)
  const T* xr[4];
  uint8_t* qr[4];
  bool rv[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = row0 + i * 4 + (lane >> 3);
    rv[i] = m < M;
    const int mc = rv[i] ? m : 0;
    xr[i] = x + (size_t)mc * K + ch * 8;
    qr[i] = qact + (size_t)mc * (FMT == FMT_INT4 ? K / 2 : K) + ch * (FMT == FMT_INT4 ? 4 : 8);
  }
  auto load_chunk = [&](uint4 (&dst)[CH][4], int c0) {
#pragma unroll
    for (int j = 0; j < CH; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        dst[j][i] = (rv[i] && c0 + j < g_end) ? __ldg(reinterpret_cast<const uint4*>(xr[i] + (c0 + j) * G))
                                              : make_uint4(0, 0, 0, 0);
  };
  // CH == 1: the next group's X is prefetched into registers; int_ratio chunks (CH = 4) issue their 16 loads at
  // once instead (enough bytes in flight, and the registers are needed for the chunk itself)
  constexpr int NP = CH == 1 ? 1 : 0;
  uint4 nxt[NP ? CH : 1][4];
  if constexpr (NP) load_chunk(nxt, g_begin);
  constexpr int CPR = RP * 2 / 16;  // 16-byte chunks per proj_down row
  constexpr int CPT = RP > 0 ? G * CPR / 128 : 1;  // chunks per thread
  uint32_t pd_src[CPT], pd_dst[CPT];  // element offset in a group's proj_down rows / smem byte offset
#pragma unroll
  for (int k = 0; k < CPT; ++k) {
    const int c = threadIdx.x + 128 * k;
    const int r = RP > 0 ? c / (CPR > 0 ? CPR : 1) : 0, cc = RP > 0 ? c % (CPR > 0 ? CPR : 1) : 0;
    pd_src[k] = r * RP + cc * 8;
    pd_dst[k] = r * PS + cc * 16;
  }
  auto stage_pdown = [&](int g, uint8_t* dst) {  // proj_down[g*64 .. +64, 0..RP) -> smem, async
    const T* src = pdown + (size_t)g * G * RP;
    const uint32_t d = smem_u32(dst);
#pragma unroll
    for (int k = 0; k < CPT; ++k) cp_async16(d + pd_dst[k], src + pd_src[k], true);
    cp_async_commit();
  };
  if (RP > 0 && g_begin < g_end) stage_pdown(g_begin, ps_all[0]);
  for (int c0 = g_begin; c0 < g_end; c0 += CH) {
    uint4 raw[CH][4];
    if constexpr (NP) {
#pragma unroll
      for (int i = 0; i < 4; ++i) raw[0][i] = nxt[0][i];
      if (c0 + CH < g_end) load_chunk(nxt, c0 + CH);  // prefetch the next group's X while this one is processed
    } else {
      load_chunk(raw, c0);
    }
    // 1/lambda of group j for this thread's 8 columns (L1-resident; reloaded rather than held in registers)
    auto load_lam = [&](int j, float (&lam)[8]) {
      const int g = min(c0 + j, g_end - 1);  // groups past the end (last chunk) are never stored
      const float4* sp = reinterpret_cast<const float4*>(smooth_rcp + g * G + ch * 8);
      float4 a = __ldg(sp), b = __ldg(sp + 1);
      lam[0] = a.x; lam[1] = a.y; lam[2] = a.z; lam[3] = a.w;
      lam[4] = b.x; lam[5] = b.y; lam[6] = b.z; lam[7] = b.w;
    };
    // per (group, row) absmax over the 8 lanes that share the row
    float amax[CH][4];
#pragma unroll
    for (int j = 0; j < CH; ++j) {
      float lam[8];
      load_lam(j, lam);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        amax[j][i] = smoothed_row_absmax<T>(raw[j][i], lam);
      }
    }
    // for int_ratio the multiplier per (group, row) and the chunk base per row; step = base * mult
    // (float mode: mult holds the step itself and base is unused)
    float mult[CH][4], base[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (RATIO) {
        float cm = 0.f;
#pragma unroll
        for (int j = 0; j < CH; ++j) cm = fmaxf(cm, amax[j][i]);
        base[i] = ratio_base(cm);
#pragma unroll
        for (int j = 0; j < CH; ++j) mult[j][i] = ratio_mult(amax[j][i], base[i]);
      } else {
#pragma unroll
        for (int j = 0; j < CH; ++j)
          mult[j][i] = amax[j][i] * (1.0f / 7.0f);  // as torch computes `amax / 7` on CUDA (times the reciprocal)
        base[i] = 0.f;
      }
    }
    // round-half-even to an integer in [-7, 7] with the 1.5*2^23 trick: the low mantissa bits of
    // t + 1.5*2^23 are the two's-complement integer (no float->int conversion instructions)
    constexpr float MAGIC = 12582912.0f;
#pragma unroll
    for (int j = 0; j < CH; ++j) {
      const int g = c0 + j;
      if (g >= g_end) break;
      if (RP > 0) {
        cp_async_wait<0>();  // this thread's part of proj_down chunk g has landed
        __syncthreads();     // everyone's part visible; everyone done with the other buffer
        if (g + 1 < g_end) stage_pdown(g + 1, ps_all[(g + 1 - g_begin) & 1]);
#pragma unroll
        for (int i = 0; i < 4; ++i) *reinterpret_cast<uint4*>(xs + (i * 4 + (lane >> 3)) * XS + ch * 16) = raw[j][i];
      }
      float lam[8];
      load_lam(j, lam);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = row0 + i * 4 + (lane >> 3);
        if (m >= M) continue;
        float v[8];
        smooth8<T>(raw[j][i], lam, v);
        const float sc = RATIO ? base[i] * mult[j][i] : mult[j][i];
        const float inv = ratio_step_rcp(sc);
        if (ch == 0) {
          if (FMT == FMT_I8) {
            if (j == 0) ascales[(size_t)(c0 / CH) * Mp + m] = base[i];
          } else {
            ascales[(size_t)g * Mp + m] = sc;
          }
        }
        if (FMT == FMT_INT4) {
          uint32_t w = 0;
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            float t = fminf(fmaxf(v[e] * inv, -7.f), 7.f);
            w |= (__float_as_uint(t + MAGIC) & 0xFu) << (4 * e);
          }
          *reinterpret_cast<uint32_t*>(qr[i] + g * (G / 2)) = w;
        } else if (FMT == FMT_I8) {
          const float f = mult[j][i];
          uint32_t out2[2] = {0u, 0u};
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const float q = (fminf(fmaxf(v[e] * inv, -7.f), 7.f) + MAGIC) - MAGIC;  // rounded code
            out2[e >> 2] |= (__float_as_uint(fmaf(q, f, MAGIC)) & 0xFFu) << (8 * (e & 3));  // code x f, int8
          }
          *reinterpret_cast<uint2*>(qr[i] + g * G) = make_uint2(out2[0], out2[1]);
        } else {
          uint32_t out2[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            uint32_t sel = 0, sgn = 0;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              float t = fminf(fmaxf(v[4 * h + e] * inv, -7.f), 7.f);
              sel |= (__float_as_uint(fabsf(t) + MAGIC) & 0x7u) << (4 * e);
              sgn |= ((__float_as_uint(t) >> 24) & 0x80u) << (8 * e);
            }
            // e4m3 bytes of 0..7 selected by the magnitudes, then the sign bits
            out2[h] = __byte_perm(0x44403800u, 0x4E4C4A48u, sel) | sgn;
          }
          *reinterpret_cast<uint2*>(qr[i] + g * G) = make_uint2(out2[0], out2[1]);
        }
      }
      if (RP > 0) {
        __syncwarp();  // this warp's X tile visible to the warp (the proj_down chunk was made visible above)
        const uint8_t* ps = ps_all[(g - g_begin) & 1];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
          lora_down_k16<T, NT>(acc, smem_u32(xs + (lane & 15) * XS + (kk * 16 + (lane >> 4) * 8) * 2), ps, PS, kk * 16,
                               lane);
        __syncwarp();  // the X tile is rewritten by the next group
      } else {
        __syncwarp();
      }
    }
  }
  // LoRA-down partial of this split. No float atomics: with one split the CTA owns the whole sum; else
  // each split writes its own slice of `part`, summed along a fixed tree below (bitwise reproducible).
  if (RP > 0 && g_begin < g_end) {  // the launch makes every split non-empty
    const int S = gridDim.y;
    float* dst = S == 1 ? lora : part + (size_t)blockIdx.y * M * RP;
    const int m0 = row0 + gid, m1 = m0 + 8;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      int col = nt * 8 + 2 * tig;
      if (m0 < M) *reinterpret_cast<float2*>(dst + (size_t)m0 * RP + col) = make_float2(acc[nt][0], acc[nt][1]);
      if (m1 < M) *reinterpret_cast<float2*>(dst + (size_t)m1 * RP + col) = make_float2(acc[nt][2], acc[nt][3]);
    }
    if (S > 1) lora_split_tree<RP, 128>(part, cnt, lora, M);
  }
}

// ------------------------------------------------------------------------------------------------
// Kernel 1b: quantize + LoRA-down for int_ratio int8 activations (FMT_I8, the Hopper path 91).
// Same outputs, bit for bit, as quant_lora_down_kernel<T, FMT_I8, RP, true>: every code and base comes from
// the same float operations in the same order (x * (1/lambda), fabs/fmax absmax, 3 xor shuffles, base =
// max * (1/126), IEEE-divided multiplier, rcp.approx step, magic rounding); only the max over a chunk's
// four group maxima is taken in another order, which is exact. lora_act sums in another (fixed) order.
// Why a second kernel: the first one held a chunk's 4 x 64 columns of X in 64 registers per thread (219-254
// registers, 2 CTAs of 4 warps per SM), loaded them only when the chunk started (no overlap of the next
// chunk's loads with this chunk's work inside a CTA) and staged proj_down per 64-group behind a
// __syncthreads. Here the chunk's X tile (64 rows x 256 columns), its 1/lambda and its proj_down rows
// (256 x RP) are copied to shared memory by cp.async, double-buffered across chunks (proj_down double-
// buffered for RP <= 32, else single-buffered behind a second barrier to stay at 2 CTAs per SM), so the
// next chunk's 33 KB are in flight while this one is processed; one __syncthreads per chunk.
// CTA = 8 warps, 64 rows: warp w handles rows 16*(w&3) .. +16 and groups 2*(w>>2) .. +2 of every chunk
// (absmax, codes, and the LoRA-down mma over those 128 columns); the two warps of a row block exchange
// their per-row maxima through smem at a 64-thread named barrier, and sum their LoRA-down partials in a
// fixed order (low K half + high K half) at the end of the split. All reads of X come from smem: 2 x
// LDS.128 per 8 values (absmax pass, code pass) + ldmatrix. Occupancy on sm_90: RP <= 64 -> <= 128
// registers and 104-109 KB smem, 2 CTAs (16 warps) per SM; RP 96/128 -> 121/137 KB, 1 CTA per SM.
// ------------------------------------------------------------------------------------------------
template <int RP>
struct QI8 {
  static constexpr int ROWS = 64, NTH = 256;
  static constexpr int CK = G * RATIO_CHUNK;          // columns per chunk (256)
  static constexpr int XS = CK * 2 + 16;              // X tile row stride in bytes (+16: ldmatrix conflict-free)
  static constexpr int PS = RP * 2 + 16;              // proj_down tile row stride in bytes
  static constexpr int PDS = RP == 0 ? 0 : (RP <= 32 ? 2 : 1);  // proj_down stages
  static constexpr int X_BYTES = ROWS * XS;           // 33 792
  static constexpr int L_BYTES = CK * 4;              // 1/lambda of the chunk, fp32
  static constexpr int P_BYTES = RP > 0 ? CK * PS : 0;
  static constexpr int L_OFF = 2 * X_BYTES, P_OFF = L_OFF + 2 * L_BYTES, C_OFF = P_OFF + PDS * P_BYTES;
  static constexpr int SMEM = C_OFF + 2 * ROWS * 4;   // + per-(K half, row) chunk maxima
  static_assert(ROWS * RP * 4 <= X_BYTES, "the LoRA pair sums reuse X stage 0");
};

// named barrier 1 + slab of the two warps of a 16-row slab (compile-time ids: ptxas then reserves 5 barriers,
// not all 16 as it does for a register id)
__device__ __forceinline__ void bar_sync_slab(int slab) {
  switch (slab) {
    case 0: asm volatile("bar.sync 1, 64;\n" ::: "memory"); break;
    case 1: asm volatile("bar.sync 2, 64;\n" ::: "memory"); break;
    case 2: asm volatile("bar.sync 3, 64;\n" ::: "memory"); break;
    default: asm volatile("bar.sync 4, 64;\n" ::: "memory"); break;
  }
}

// 2 CTAs per SM (128 registers) where the shared memory allows two: sm_90 and RP <= 64. Elsewhere one
// (sm_80's 164 KB and sm_86/89/120's 100 KB per SM hold one CTA at most; there FMT_I8 is not the GEMM path).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ != 900
#define QI8_MIN_BLOCKS(RP) 1
#else
#define QI8_MIN_BLOCKS(RP) ((RP) >= 96 ? 1 : 2)
#endif
template <typename T, int RP>
__global__ void __launch_bounds__(256, QI8_MIN_BLOCKS(RP)) quant_i8_ratio_kernel(const T* __restrict__ x, const float* __restrict__ smooth_rcp,
                                                                const T* __restrict__ pdown, uint8_t* __restrict__ qact,
                                                                float* __restrict__ ascales, float* __restrict__ lora,
                                                                float* __restrict__ part, int* __restrict__ cnt, int M,
                                                                int K, int Mp, int gpc,
                                                                const float* __restrict__ rowbase, bool lora_only) {
  using C = QI8<RP>;
  extern __shared__ __align__(16) uint8_t smem[];
  pdl_wait();               // x, and AF_I8_ROW's bases, come from the kernels before this one
  pdl_launch_dependents();  // kernel 2 may set up its pipeline as this kernel's CTAs leave their SMs
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int half = warp >> 2, wr = warp & 3;  // K half of the chunk (groups 2*half, 2*half+1), 16-row slab
  const int gid = lane >> 2, tig = lane & 3, ch = lane & 7;
  const int rb0 = blockIdx.x * C::ROWS;
  const int ngroups = K / G;
  const int g_begin = blockIdx.y * gpc;  // gpc is a multiple of RATIO_CHUNK: chunks never straddle CTAs
  const int g_end = min(ngroups, g_begin + gpc);
  const int nck = (g_end - g_begin + RATIO_CHUNK - 1) / RATIO_CHUNK;
  const uint32_t s0 = smem_u32(smem);

  // cp.async of chunk c0's X rows (zero-filled past M and past g_end) and 1/lambda into stage `buf`.
  // Thread = one 16-byte piece (column lane*8 of the chunk) of rows warp, warp+8, ..., warp+56.
  const T* x_thr = x + (size_t)(rb0 + warp) * K + lane * 8;  // dereferenced only for rows < M
  const size_t x_step = (size_t)8 * K;
  auto issue_x = [&](int c0, int buf) {
    const bool gok = c0 + (lane >> 3) < g_end;
    const uint32_t dst = s0 + buf * C::X_BYTES + warp * C::XS + lane * 16;
#pragma unroll
    for (int k = 0; k < C::ROWS / 8; ++k) {
      const bool ok = gok && rb0 + warp + 8 * k < M;
      cp_async16(dst + k * 8 * C::XS, ok ? x_thr + k * x_step + c0 * G : x, ok);
    }
    if (tid < C::CK / 4 && !lora_only) {
      const bool ok = c0 + (tid >> 4) < g_end;
      cp_async16(s0 + C::L_OFF + buf * C::L_BYTES + tid * 16, smooth_rcp + (ok ? c0 * G + tid * 4 : 0), ok);
    }
  };
  // cp.async of proj_down rows [c0*64, +256) (zero-filled past g_end: no garbage meets the zero X columns)
  auto issue_pd = [&](int c0, int buf) {
    constexpr int CPR = RP * 2 / 16;  // 16-byte pieces per proj_down row
#pragma unroll
    for (int k = 0; k < (RP > 0 ? CPR : 0); ++k) {
      const int idx = tid + C::NTH * k, r = idx / CPR, cc = idx % CPR;
      const bool ok = c0 + r / G < g_end;
      const T* src = pdown + (ok ? (size_t)(c0 * G + r) * RP + cc * 8 : 0);
      cp_async16(s0 + C::P_OFF + buf * C::P_BYTES + r * C::PS + cc * 16, src, ok);
    }
  };
  auto load_lam = [&](const float* lt, int gl, float (&lam)[8]) {
    const float4 a = *reinterpret_cast<const float4*>(lt + gl * G + ch * 8);
    const float4 b = *reinterpret_cast<const float4*>(lt + gl * G + ch * 8 + 4);
    lam[0] = a.x; lam[1] = a.y; lam[2] = a.z; lam[3] = a.w;
    lam[4] = b.x; lam[5] = b.y; lam[6] = b.z; lam[7] = b.w;
  };

  constexpr int NT = RP / 8;
  float acc[NT > 0 ? NT : 1][4];
#pragma unroll
  for (int i = 0; i < (NT > 0 ? NT : 1); ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float* cms = reinterpret_cast<float*>(smem + C::C_OFF);  // [K half][row] max over the half's 2 groups

  issue_x(g_begin, 0);
  if (C::PDS > 0) issue_pd(g_begin, 0);
  cp_async_commit();
  for (int it = 0; it < nck; ++it) {
    const int c0 = g_begin + it * RATIO_CHUNK;
    const int xb = it & 1, pb = C::PDS == 2 ? (it & 1) : 0;
    cp_async_wait<0>();  // this thread's pieces of chunk `it` have landed
    __syncthreads();     // everyone's pieces visible; everyone done with chunk it-1's buffers
    if (it + 1 < nck) {  // prefetch the next chunk into the buffers chunk it-1 used
      issue_x(c0 + RATIO_CHUNK, xb ^ 1);
      if (C::PDS == 2) issue_pd(c0 + RATIO_CHUNK, pb ^ 1);
      cp_async_commit();
    }
    const uint8_t* xt = smem + xb * C::X_BYTES;
    const float* lt = reinterpret_cast<const float*>(smem + C::L_OFF + xb * C::L_BYTES);

    if (!lora_only) {  // (block-uniform) AF_I8_ROW_CODES: the codes are already written
      // per (group, row) absmax over the 8 lanes that share the row
      float amax[2][4];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        float lam[8];
        load_lam(lt, 2 * half + j, lam);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = wr * 16 + i * 4 + (lane >> 3);
          const uint4 raw = *reinterpret_cast<const uint4*>(xt + r * C::XS + (2 * half + j) * (G * 2) + ch * 16);
          amax[j][i] = smoothed_row_absmax<T>(raw, lam);
        }
      }
      // chunk max per row = max of both halves' maxima (max is exact: any order gives the same float)
      float pm[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        pm[i] = fmaxf(amax[0][i], amax[1][i]);
        if (ch == 0) cms[half * C::ROWS + wr * 16 + i * 4 + (lane >> 3)] = pm[i];
      }
      // the two warps of this 16-row slab (w and w^4); cms is rewritten only after the next __syncthreads
      bar_sync_slab(wr);
      float mult[2][4], base[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float cm = fmaxf(pm[i], cms[(half ^ 1) * C::ROWS + wr * 16 + i * 4 + (lane >> 3)]);
        const int m = rb0 + wr * 16 + i * 4 + (lane >> 3);
        // the reference's fp32 multiply by the fp32 constant 1/126; AF_I8_ROW: the row's base, made by row_base_kernel
        // (rowbase then is ascales itself, which this kernel does not write in that format)
        base[i] = rowbase ? (m < M ? rowbase[m] : 0.f) : ratio_base(cm);
#pragma unroll
        for (int j = 0; j < 2; ++j) mult[j][i] = ratio_mult(amax[j][i], base[i]);
        if (!rowbase && half == 0 && ch == 0 && m < M) ascales[(size_t)(c0 / RATIO_CHUNK) * Mp + m] = base[i];
      }
      // codes x multipliers as int8 (round-half-even by the 1.5*2^23 trick, as kernel 1)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int gl = 2 * half + j, g = c0 + gl;
        if (g >= g_end) break;  // warp-uniform
        float lam[8];
        load_lam(lt, gl, lam);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = wr * 16 + i * 4 + (lane >> 3), m = rb0 + r;
          if (m >= M) continue;
          const uint4 raw = *reinterpret_cast<const uint4*>(xt + r * C::XS + gl * (G * 2) + ch * 16);
          float v[8];
          smooth8<T>(raw, lam, v);
          *reinterpret_cast<uint2*>(qact + (size_t)m * K + g * G + ch * 8) =
              ratio_codes8(v, ratio_step_rcp(base[i] * mult[j][i]), static_cast<uint32_t>(mult[j][i]));
        }
      }
    }  // !lora_only
    if constexpr (RP > 0) {
      // LoRA-down of this warp's 16 rows x 128 columns (the half's two groups) on mma.sync m16n8k16
      const uint8_t* pt = smem + C::P_OFF + pb * C::P_BYTES;
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
        const int k0 = half * 128 + kk * 16;
        lora_down_k16<T, NT>(acc, s0 + xb * C::X_BYTES + (wr * 16 + (lane & 15)) * C::XS + (k0 + (lane >> 4) * 8) * 2, pt,
                             C::PS, k0, lane);
      }
      if (C::PDS == 1 && it + 1 < nck) {
        __syncthreads();  // every warp done with this chunk's proj_down before the single buffer is refilled
        issue_pd(c0 + RATIO_CHUNK, 0);
        cp_async_commit();
      }
    }
  }
  // LoRA-down partial of this split: low K half + high K half per element (fixed order), then as kernel 1
  if constexpr (RP > 0) {
    float4* red = reinterpret_cast<float4*>(smem);  // X stage 0: no cp.async is pending (none issued after the last wait)
    __syncthreads();  // every warp done reading the X tiles
    if (half == 1) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) red[(wr * NT + nt) * 32 + lane] = make_float4(acc[nt][0], acc[nt][1], acc[nt][2], acc[nt][3]);
    }
    __syncthreads();
    const int S = gridDim.y;
    if (half == 0) {
      float* dst = S == 1 ? lora : part + (size_t)blockIdx.y * M * RP;
      const int m0 = rb0 + wr * 16 + gid, m1 = m0 + 8;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float4 o = red[(wr * NT + nt) * 32 + lane];
        const int col = nt * 8 + 2 * tig;
        if (m0 < M) *reinterpret_cast<float2*>(dst + (size_t)m0 * RP + col) = make_float2(acc[nt][0] + o.x, acc[nt][1] + o.y);
        if (m1 < M) *reinterpret_cast<float2*>(dst + (size_t)m1 * RP + col) = make_float2(acc[nt][2] + o.z, acc[nt][3] + o.w);
      }
    }
    if (S > 1) lora_split_tree<RP, C::NTH>(part, cnt, lora, M);
  }
}

// AF_I8_ROW's first pass: each row's base for the whole of K, max |x * (1/lambda)| * fp32(1/126) (the reference's
// quantize_groups_ratio with one chunk per row), into abase (Mp floats; rows M..Mp-1 get 0). One warp per row,
// 16-byte loads; kernel 1b then reads the bases instead of taking each chunk's maximum.
template <typename T>
__global__ void __launch_bounds__(256) row_base_kernel(const T* __restrict__ x, const float* __restrict__ smooth_rcp,
                                                       float* __restrict__ abase, int M, int K, int Mp) {
  pdl_wait();
  pdl_launch_dependents();  // kernel 1b follows
  const int row = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= Mp) return;
  float a = 0.f;
  if (row < M) {
    const T* xr = x + (size_t)row * K;
    // U 16-byte loads of X in flight per lane before any is used (measured no faster than one at a time on the
    // H200, docs/KERNELS.md §6c: this pass costs a read of X either way); K is a multiple of 64, so a lane's pieces
    // past K are only at the end
    constexpr int U = 4;
    for (int k0 = lane * 8; k0 < K; k0 += 256 * U) {
      uint4 raw[U];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (k0 + 256 * u < K) raw[u] = __ldg(reinterpret_cast<const uint4*>(xr + k0 + 256 * u));  // kept in L2 for kernel 1b
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int k = k0 + 256 * u;
        if (k >= K) break;
        float v[8];
        smooth8_ldg<T>(raw[u], smooth_rcp + k, v);
        a = absmax8(v, a);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
  }
  if (lane == 0) abase[row] = ratio_base(a);
}

// ------------------------------------------------------------------------------------------------
// Kernel 2b: generic INT4 mma.sync path (sm_80+). CTA 128 threads = 64 x 64 tile; warp w: 16 rows x 64.
// ------------------------------------------------------------------------------------------------
template <typename OutT>
__global__ void __launch_bounds__(128) gemm_mma_s4_kernel(const uint32_t* __restrict__ qa, const float* __restrict__ sa,
                                                          const uint32_t* __restrict__ qw, const float* __restrict__ sw,
                                                          const float* __restrict__ lora, const float* __restrict__ pup,
                                                          const float* __restrict__ bias, OutT* __restrict__ out, int M,
                                                          int N, int K, int Mp, int rp) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;
  const int m0 = blockIdx.y * 64 + warp * 16 + gid, m1 = m0 + 8;
  const int nbase = blockIdx.x * 64;
  const int KW = K / 8;  // 32-bit words per row
  float acc[8][4];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  const int ngroups = K / G;
  for (int g = 0; g < ngroups; ++g) {
    uint32_t a[4] = {0, 0, 0, 0};
    if (m0 < M) { a[0] = qa[(size_t)m0 * KW + g * 8 + tig]; a[2] = qa[(size_t)m0 * KW + g * 8 + tig + 4]; }
    if (m1 < M) { a[1] = qa[(size_t)m1 * KW + g * 8 + tig]; a[3] = qa[(size_t)m1 * KW + g * 8 + tig + 4]; }
    float s0 = m0 < M ? sa[(size_t)g * Mp + m0] : 0.f;
    float s1 = m1 < M ? sa[(size_t)g * Mp + m1] : 0.f;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      int n = nbase + nt * 8 + gid;
      uint32_t b0 = 0, b1 = 0;
      if (n < N) { b0 = qw[(size_t)n * KW + g * 8 + tig]; b1 = qw[(size_t)n * KW + g * 8 + tig + 4]; }
      int c[4] = {0, 0, 0, 0};
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
      asm volatile(
          "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
          : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
      int col = nbase + nt * 8 + 2 * tig;
      float w0 = col < N ? sw[(size_t)g * N + col] : 0.f;
      float w1 = col + 1 < N ? sw[(size_t)g * N + col + 1] : 0.f;
      acc[nt][0] = fmaf((float)c[0], s0 * w0, acc[nt][0]);
      acc[nt][1] = fmaf((float)c[1], s0 * w1, acc[nt][1]);
      acc[nt][2] = fmaf((float)c[2], s1 * w0, acc[nt][2]);
      acc[nt][3] = fmaf((float)c[3], s1 * w1, acc[nt][3]);
    }
  }
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    int col = nbase + nt * 8 + 2 * tig;
    if (col >= N) continue;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      int m = h ? m1 : m0;
      if (m >= M) continue;
      float y0 = acc[nt][2 * h], y1 = acc[nt][2 * h + 1];
      for (int r = 0; r < rp; ++r) {
        float l = lora[(size_t)m * rp + r];
        y0 = fmaf(l, pup[(size_t)col * rp + r], y0);
        y1 = fmaf(l, pup[(size_t)(col + 1) * rp + r], y1);
      }
      if (bias) { y0 += bias[col]; y1 += bias[col + 1]; }
      *reinterpret_cast<uint32_t*>(out + (size_t)m * N + col) = Pack2<OutT>::from_f2(y0, y1);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Kernel 2a: Hopper e4m3 wgmma path (sm_90a).
// CTA = 2 warpgroups (256 threads), tile 128 tokens x BN outputs, K stage = 128 (two 64-groups),
// STAGES-deep cp.async pipeline into 128B-swizzled K-major tiles. Each warpgroup owns 64 tokens and
// keeps three accumulator sets: acc (promoted fp32), P0/P1 (the two groups of a stage) so that the
// promotion of one group overlaps the wgmma of the next.
// ------------------------------------------------------------------------------------------------
struct Sm90Params {
  const uint8_t* qa; const float* sa; const uint8_t* qw; const float* sw;
  const float* lora; const float* pup; const float* bias; void* out;
  int M, N, K, Mp, rp;
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ uint64_t make_desc(uint32_t saddr) {
  uint64_t d = 0;
  d |= (uint64_t)((saddr & 0x3FFFF) >> 4);
  d |= (uint64_t)1 << 16;             // LBO (unused for swizzled K-major)
  d |= (uint64_t)(1024 >> 4) << 32;   // SBO: 8 rows x 128 B
  d |= (uint64_t)1 << 62;             // 128B swizzle
  return d;
}
__device__ __forceinline__ void wg_arrive() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
__device__ __forceinline__ void fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

template <int BN, int NKB>
__device__ __forceinline__ void lora_up_wgmma(float* acc, uint32_t la, uint32_t lb) {
#pragma unroll
  for (int kb = 0; kb < NKB; ++kb)
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma_tf32<BN>(acc, make_desc(la + kb * 128 * 128 + kk * 32), make_desc(lb + kb * BN * 128 + kk * 32), 1);
}
#endif

// ------------------------------------------------------------------------------------------------
// Kernel 2a (v2): warp-specialised Hopper path. 3 warpgroups: WG0 = producer (one thread issues TMA
// loads of A/B tiles and both scale vectors per stage, then the LoRA tiles as extra "stages"),
// WG1/WG2 = consumers (64 tokens each). Full/empty mbarriers per stage: the two consumer warpgroups
// run decoupled, so one's promotion overlaps the other's wgmma. setmaxnreg: producer 40, consumers 232.
// ------------------------------------------------------------------------------------------------
// TMA descriptors of one GEMM launch (passed by value as a __grid_constant__ parameter)
struct WsMaps {
  CUtensorMap a, b, sa, sw, lora, pup;
  CUtensorMap wm;  // kernel 2d: the weight multipliers (K/64, N) uint8
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void mbar_init(uint32_t a, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(a), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t a, uint32_t tx) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(a), "r"(tx) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t a) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(a) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t a, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\nLAB_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra LAB_WAIT;\n}\n" ::"r"(a),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void tma_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

// Grouped rasterisation of blockIdx.x into a (BM x BN) output tile origin: 8 M-tiles share each sweep over N,
// so the weight tiles they all read stay in L2.
template <int BM, int BN>
__device__ __forceinline__ void tile_origin(int M, int N, int& m0, int& n0) {
  const int ntn = (N + BN - 1) / BN, ntm = (M + BM - 1) / BM;
  const int tile = blockIdx.x;
  const int group = 8 * ntn;
  const int first_m = (tile / group) * 8;
  const int gm_size = min(ntm - first_m, 8);
  m0 = (first_m + (tile % group) % gm_size) * BM;
  n0 = ((tile % group) / gm_size) * BN;
}

// The producer/consumer ring's mbarriers at bar_base: full[STAGES] (one TMA arrival + bytes), then empty[STAGES]
// (one arrival per consumer thread).
// With a converter (packed weights, kernel 2d), full[] also takes `full_count - 1` converter arrivals and a third
// ring raw[STAGES] (one TMA arrival + bytes) follows: the packed weight tile has landed, to be expanded.
template <int STAGES>
__device__ __forceinline__ void init_ring(uint32_t bar_base, int consumer_threads, int full_count = 1,
                                          bool raw_ring = false) {
  for (int i = 0; i < STAGES; ++i) {
    mbar_init(bar_base + 8 * i, full_count);
    mbar_init(bar_base + 8 * (STAGES + i), consumer_threads);
    if (raw_ring) mbar_init(bar_base + 8 * (2 * STAGES + i), 1);
  }
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// The common start of the warp-specialised GEMMs (kernels 2, 2a, 2c): the dynamic shared memory aligned to
// 1024 B (TMA swizzle; the pointer keeps its shared-space provenance), STAGES stages of STAGE_BYTES then the
// full/empty mbarrier ring; this CTA's output tile; its K stages (two groups of 64 each) and the LoRA-up stages
// after them. Thread 0 initialises the ring for `consumers` arrivals; every thread waits for it.
template <int BM, int BN, int STAGES, int STAGE_BYTES>
struct WsCta {
  uint8_t* smem;
  uint32_t sbase, bar_base;
  int m0, n0, nstages, nkb, total;
  __device__ __forceinline__ WsCta(uint8_t* smem_raw, int M, int N, int K, int rp, int consumers, int full_count = 1,
                                   bool raw_ring = false) {
    smem = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
    sbase = smem_u32(smem);
    bar_base = sbase + STAGES * STAGE_BYTES;
    tile_origin<BM, BN>(M, N, m0, n0);
    nstages = (K / G + 1) / 2;
    nkb = rp / 32;
    total = nstages + nkb;
    if (threadIdx.x == 0) init_ring<STAGES>(bar_base, consumers, full_count, raw_ring);
    __syncthreads();
    pdl_wait();  // launched with PDL (launch_pdl): the ring is set up while kernel 1 finishes; its outputs from here on
  }
  __device__ __forceinline__ uint32_t full_bar(int i) const { return bar_base + 8 * i; }
  __device__ __forceinline__ uint32_t empty_bar(int i) const { return bar_base + 8 * (STAGES + i); }
  __device__ __forceinline__ uint32_t raw_bar(int i) const { return bar_base + 8 * (2 * STAGES + i); }
  // A consumer: blocks until stage s's TMA loads have landed; returns its slot.
  __device__ __forceinline__ uint8_t* wait_stage(int s) const {
    mbar_wait(full_bar(s % STAGES), (s / STAGES) & 1);
    return smem + (s % STAGES) * STAGE_BYTES;
  }
  // A consumer thread is done with stage s's slot (the producer refills it once all consumers are).
  __device__ __forceinline__ void release_stage(int s) const { mbar_arrive(empty_bar(s % STAGES)); }
};

// Float path: one group's fp32 partial sums P (the wgmma fragment of rows r0, r0 + 8) promoted into acc with the
// rows' activation scales a0, a1 and the weight scales sw of the tile's BN columns (this thread's pairs at 2·tig).
template <int BN>
__device__ __forceinline__ void promote_group(float* acc, const float* P, float a0, float a1, const float* sw, int tig) {
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
    float2 w = *reinterpret_cast<const float2*>(sw + 8 * j + 2 * tig);
    acc[4 * j + 0] = fmaf(P[4 * j + 0], a0 * w.x, acc[4 * j + 0]);
    acc[4 * j + 1] = fmaf(P[4 * j + 1], a0 * w.y, acc[4 * j + 1]);
    acc[4 * j + 2] = fmaf(P[4 * j + 2], a1 * w.x, acc[4 * j + 2]);
    acc[4 * j + 3] = fmaf(P[4 * j + 3], a1 * w.y, acc[4 * j + 3]);
  }
}

// What consumer warpgroup cw reads of a landed stage (layout S): the shared addresses of its 64 A rows and of the
// B tile (wgmma descriptor bases), the activation scales (int_ratio: bases) and, float path, the weight scales.
template <class S>
struct ConsumerStage {
  uint32_t a_base, b_base;
  const float *sa, *sw;
  __device__ __forceinline__ ConsumerStage(const uint8_t* st, int cw)
      : a_base(smem_u32(st) + cw * 64 * 128),
        b_base(smem_u32(st + S::A_BYTES)),
        sa(reinterpret_cast<const float*>(st + S::A_BYTES + S::B_BYTES)),
        sw(reinterpret_cast<const float*>(st + S::A_BYTES + S::B_BYTES + S::SA_BYTES)) {}
};

// A consumer thread's place: consumer warpgroup cw (warpgroup 0 produces), its accumulator rows r0 and r0 + 8 of
// the tile, and tig, its column pair within each 8-column block of the wgmma fragment.
struct ConsumerLane {
  int cw, tig, r0;
  __device__ __forceinline__ explicit ConsumerLane(int tid) {
    const int wl = (tid >> 5) & 3, lane = tid & 31;
    cw = (tid >> 7) - 1;
    tig = lane & 3;
    r0 = cw * 64 + wl * 16 + (lane >> 2);
  }
};

// The producer thread of every Hopper GEMM. Per 128-K stage: the A and B tiles and the stage's scales (float path:
// the activation and weight scales of its two groups, at (m0, 2s) / (n0, 2s); int_ratio: the activation bases of
// its 256-K chunk, at (m0, s/2)); then the LoRA-up tiles (lora_act rows into A's place, proj_up rows into B's) as
// extra stages. Offsets and transaction byte counts come from the kernel's shared-memory layout.
struct StageLayout {
  int stage_bytes, a_bytes, b_bytes;  // slot pitch; A and B tile sizes (B starts at a_bytes)
  int sa_tx, sw_off, sw_tx;           // scale bytes per stage (0: none, row bases); weight scales' offset (sw_tx 0: none)
  int lora_tx;                        // bytes of one LoRA stage
};
template <int STAGES, bool RATIO>
__device__ __forceinline__ void produce_stages(const WsMaps& maps, const StageLayout& L, uint32_t sbase, uint32_t bar_base,
                                               int m0, int n0, int nstages, int total) {
  for (int s = 0; s < total; ++s) {
    const int slot = s % STAGES;
    const uint32_t full = bar_base + 8 * slot;
    if (s >= STAGES) mbar_wait(bar_base + 8 * (STAGES + slot), ((s / STAGES) - 1) & 1);
    const uint32_t st = sbase + slot * L.stage_bytes;
    if (s < nstages) {
      mbar_expect_tx(full, L.a_bytes + L.b_bytes + L.sa_tx + L.sw_tx);
      tma_2d(st, &maps.a, s * 128, m0, full);
      tma_2d(st + L.a_bytes, &maps.b, s * 128, n0, full);
      if (L.sa_tx) tma_2d(st + L.a_bytes + L.b_bytes, &maps.sa, m0, RATIO ? s / 2 : 2 * s, full);
      if (!RATIO) tma_2d(st + L.sw_off, &maps.sw, n0, 2 * s, full);
    } else {
      const int kb = s - nstages;
      mbar_expect_tx(full, L.lora_tx);
      tma_2d(st, &maps.lora, kb * 32, m0, full);
      tma_2d(st + L.a_bytes, &maps.pup, kb * 32, n0, full);
    }
  }
}

// All NC consumer warpgroups of the CTA at named barrier 5 (the producer warpgroup does not take part).
template <int NC>
__device__ __forceinline__ void consumers_sync() {
  asm volatile("bar.sync 5, %0;\n" ::"n"(128 * NC) : "memory");
}

// The consumer warpgroup's tail, shared by every Hopper GEMM: the LoRA-up tiles (extra pipeline stages after the K
// loop, A = lora_act rows, B = proj_up rows, fp32) as tf32 wgmma into the fp32 accumulators, then + bias, cast and
// store of this warpgroup's 64 x BN outputs. Barrier layout: full[STAGES] then empty[STAGES] at bar_base.
// The outputs go through shared memory (the pipeline ring, free once every consumer warpgroup has waited for its last
// wgmma: the producer has issued its last stage and all of them have landed): the accumulator fragments hold 4 bytes
// per row and 8-column block, as 48 scattered 4-byte stores per thread (ncu at FLUX qkv: 13 % of the stall samples,
// LSU-queue throttled); staged, a quarter warp stores 128 contiguous bytes of a row with 16-byte stores.
template <int BN, int STAGES, int NC, typename OutT>
__device__ __forceinline__ void consumer_tail(float (&acc)[BN / 2], uint32_t sbase, uint32_t bar_base, int stage_bytes,
                                              int a_bytes, int nstages, int nkb, int cw, int r0, int tig, int m0,
                                              int n0, int M, int N, const float* __restrict__ bias,
                                              OutT* __restrict__ out) {
  constexpr int RS = BN * 2 + 16;  // staging row stride, bytes: +16 puts the 8 rows of a fragment store on 8 bank quads
  constexpr int BIAS_OFF = NC * 64 * RS;  // then each warpgroup's copy of the tile's bias row (BN floats)
  static_assert(BIAS_OFF + NC * BN * 4 <= STAGES * (NC * 64 * 128 + BN * 128), "output staging exceeds the ring");
  // The tile's bias row, one float4 per thread, loaded now so that the LoRA-up hides its latency (loaded inside the
  // guarded store loop, 16-24 serial L2 round trips per tile were a quarter of the stall samples at FLUX qkv, ncu)
  const int t = threadIdx.x & 127;
  float4 bq = make_float4(0.f, 0.f, 0.f, 0.f);
  if (bias && t < BN / 4 && n0 + 4 * t < N) bq = __ldg(reinterpret_cast<const float4*>(bias + n0 + 4 * t));
  if (nkb > 0) {
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) fence_operand(acc[i]);
    for (int kb = 0; kb < nkb; ++kb) {
      const int s = nstages + kb, slot = s % STAGES;
      mbar_wait(bar_base + 8 * slot, (s / STAGES) & 1);
      const uint32_t la = sbase + slot * stage_bytes + cw * 64 * 128;
      const uint32_t lb = sbase + slot * stage_bytes + a_bytes;
      wg_arrive();
      lora_up_wgmma<BN, 1>(acc, la, lb);
      wg_commit();
      wg_wait<0>();
      mbar_arrive(bar_base + 8 * (STAGES + slot));
    }
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) fence_operand(acc[i]);
  }
  consumers_sync<NC>();  // every warpgroup's last wgmma has read the ring
  const uint32_t stg = sbase + cw * 64 * RS, bs = sbase + BIAS_OFF + cw * BN * 4;
  if (t < BN / 4) st_shared_v4(bs + 16 * t, bq);
  consumers_sync<NC>();
  const int lr = r0 - cw * 64;  // this thread's first row within the warpgroup's 64
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
    const float2 b = ld_shared_f2(bs + (8 * j + 2 * tig) * 4);
    const uint32_t at = stg + lr * RS + (8 * j + 2 * tig) * 2;
    st_shared_u32(at, Pack2<OutT>::from_f2(acc[4 * j + 0] + b.x, acc[4 * j + 1] + b.y));
    st_shared_u32(at + 8 * RS, Pack2<OutT>::from_f2(acc[4 * j + 2] + b.x, acc[4 * j + 3] + b.y));
  }
  consumers_sync<NC>();
  constexpr int PPR = BN / 8;  // 16-byte pieces per row
#pragma unroll 4
  for (int i = 0; i < 64 * PPR / 128; ++i) {
    const int c = t + 128 * i, row = c / PPR, piece = c % PPR;
    const int gm = m0 + cw * 64 + row, col = n0 + piece * 8;
    if (gm < M && col < N)
      *reinterpret_cast<uint4*>(out + (size_t)gm * N + col) = ld_shared_v4(stg + row * RS + piece * 16);
  }
}
#endif


template <int BN, int STAGES>
struct WsSmem {
  static constexpr int A_BYTES = 128 * 128;
  static constexpr int B_BYTES = BN * 128;
  static constexpr int SA_BYTES = 2 * 128 * 4;
  static constexpr int SW_BYTES = 2 * BN * 4;
  static constexpr int STAGE_BYTES = A_BYTES + B_BYTES + SA_BYTES + SW_BYTES;  // multiple of 1024
  static constexpr int TOTAL = STAGES * STAGE_BYTES + 2 * STAGES * 8 + 1024;
};

template <int BN, int STAGES, typename OutT>
__global__ void __launch_bounds__(384, 1)
    gemm_sm90_ws_kernel(const __grid_constant__ WsMaps maps, const float* __restrict__ bias, OutT* __restrict__ out, int M,
                        int N, int K, int rp) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using S = WsSmem<BN, STAGES>;
  static_assert(S::STAGE_BYTES % 1024 == 0, "stage alignment");
  extern __shared__ uint8_t smem_raw[];
  const WsCta<128, BN, STAGES, S::STAGE_BYTES> c(smem_raw, M, N, K, rp, 256);
  const int tid = threadIdx.x;
  const int wg = tid >> 7;

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (tid == 0) {
      const StageLayout L = {S::STAGE_BYTES, S::A_BYTES, S::B_BYTES, S::SA_BYTES, S::A_BYTES + S::B_BYTES + S::SA_BYTES,
                             S::SW_BYTES, S::A_BYTES + S::B_BYTES};
      produce_stages<STAGES, false>(maps, L, c.sbase, c.bar_base, c.m0, c.n0, c.nstages, c.total);
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const ConsumerLane ln(tid);
    const int cw = ln.cw, tig = ln.tig, r0 = ln.r0;
    float acc[BN / 2], P0[BN / 2], P1[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) { acc[i] = 0.f; P0[i] = 0.f; P1[i] = 0.f; }


    for (int s = 0; s < c.nstages; ++s) {
      const ConsumerStage<S> st(c.wait_stage(s), cw);
      const uint32_t a_base = st.a_base, b_base = st.b_base;
      const float *sa_s = st.sa, *sw_s = st.sw;
      wg_arrive();
      wgmma_e4m3<BN>(P0, make_desc(a_base + 0), make_desc(b_base + 0), 0);
      wgmma_e4m3<BN>(P0, make_desc(a_base + 32), make_desc(b_base + 32), 1);
      wg_commit();
      wgmma_e4m3<BN>(P1, make_desc(a_base + 64), make_desc(b_base + 64), 0);
      wgmma_e4m3<BN>(P1, make_desc(a_base + 96), make_desc(b_base + 96), 1);
      wg_commit();
      wg_wait<1>();
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) fence_operand(P0[i]);
      promote_group<BN>(acc, P0, sa_s[r0], sa_s[r0 + 8], sw_s, tig);  // overlaps group 1's wgmma
      wg_wait<0>();
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) fence_operand(P1[i]);
      promote_group<BN>(acc, P1, sa_s[128 + r0], sa_s[128 + r0 + 8], sw_s + BN, tig);
      c.release_stage(s);
    }
    consumer_tail<BN, STAGES, 2, OutT>(acc, c.sbase, c.bar_base, S::STAGE_BYTES, S::A_BYTES, c.nstages, c.nkb, cw, r0, tig,
                                    c.m0, c.n0, M, N, bias, out);
  }
#endif
}

// ------------------------------------------------------------------------------------------------
// Kernel 2a (v6 candidate): 3 consumer warpgroups (192 tokens x 128 outputs per CTA), one fp32 partial
// buffer each (64 + 64 registers, setmaxnreg 160): more warpgroups issue wgmma while others promote.
// ------------------------------------------------------------------------------------------------
template <int STAGES>
struct Ws6Smem {
  static constexpr int BN = 128, BM = 192;
  static constexpr int A_BYTES = BM * 128;
  static constexpr int B_BYTES = BN * 128;
  static constexpr int SA_BYTES = 2048;  // 2 x 192 floats, padded
  static constexpr int SW_BYTES = 2 * BN * 4;
  static constexpr int STAGE_BYTES = A_BYTES + B_BYTES + SA_BYTES + SW_BYTES;
  static constexpr int TOTAL = STAGES * STAGE_BYTES + 2 * STAGES * 8 + 1024;
};

template <int STAGES, typename OutT>
__global__ void __launch_bounds__(512, 1)
    gemm_sm90_ws6_kernel(const __grid_constant__ WsMaps maps, const float* __restrict__ bias, OutT* __restrict__ out,
                         int M, int N, int K, int rp) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using S = Ws6Smem<STAGES>;
  constexpr int BN = S::BN, BM = S::BM;
  static_assert(S::STAGE_BYTES % 1024 == 0, "stage alignment");
  extern __shared__ uint8_t smem_raw[];
  const WsCta<BM, BN, STAGES, S::STAGE_BYTES> c(smem_raw, M, N, K, rp, 384);
  const int tid = threadIdx.x;
  const int wg = tid >> 7;

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
    if (tid == 0) {
      const StageLayout L = {S::STAGE_BYTES, S::A_BYTES, S::B_BYTES, 2 * BM * 4, S::A_BYTES + S::B_BYTES + S::SA_BYTES,
                             S::SW_BYTES, S::A_BYTES + BN * 128};
      produce_stages<STAGES, false>(maps, L, c.sbase, c.bar_base, c.m0, c.n0, c.nstages, c.total);
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 160;\n");
    const ConsumerLane ln(tid);
    const int cw = ln.cw, tig = ln.tig, r0 = ln.r0;
    float acc[BN / 2], P[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) { acc[i] = 0.f; P[i] = 0.f; }
    for (int s = 0; s < c.nstages; ++s) {
      const ConsumerStage<S> st(c.wait_stage(s), cw);
      const uint32_t a_base = st.a_base, b_base = st.b_base;
      const float *sa_s = st.sa, *sw_s = st.sw;
#pragma unroll
      for (int grp = 0; grp < 2; ++grp) {
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) fence_operand(P[i]);
        wg_arrive();
        wgmma_e4m3<BN>(P, make_desc(a_base + grp * 64), make_desc(b_base + grp * 64), 0);
        wgmma_e4m3<BN>(P, make_desc(a_base + grp * 64 + 32), make_desc(b_base + grp * 64 + 32), 1);
        wg_commit();
        wg_wait<0>();
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) fence_operand(P[i]);
        promote_group<BN>(acc, P, sa_s[grp * BM + r0], sa_s[grp * BM + r0 + 8], sw_s + grp * BN, tig);
      }
      c.release_stage(s);
    }
    consumer_tail<BN, STAGES, 3, OutT>(acc, c.sbase, c.bar_base, S::STAGE_BYTES, S::A_BYTES, c.nstages, c.nkb, cw, r0, tig,
                                    c.m0, c.n0, M, N, bias, out);
  }
#endif
}

template <int STAGES, typename OutT>
static int launch_sm90_ws6(const Sm90Params& p, cudaStream_t st);

// ------------------------------------------------------------------------------------------------
// Kernel 2c (v7, sm_90a): the int_ratio Hopper path. Operands are int8 = code x multiplier (|.| <= 126),
// so a chunk of RATIO_CHUNK groups (256 K) is summed exactly by s8 wgmma into s32 accumulators with no
// per-group promotion; once per chunk the s32 sum (|.| < 2^22) becomes fp32 by the magic-number trick
// and is added with the chunk's activation base: acc += float(s) * abase[m, c]. The weight base (one per
// output column) multiplies the finished sum in the epilogue, then LoRA-up (tf32 wgmma), bias, cast.
// Warp-specialised as v2: WG0 = TMA producer, NC consumer warpgroups of 64 tokens; stage = 128 K
// (half a chunk), STAGES-deep full/empty mbarrier ring; the LoRA tiles follow as extra stages.
// ------------------------------------------------------------------------------------------------
template <int BN, int STAGES, int NC, bool PACKED = false>
struct I8Smem {  // TOTAL must stay within the 227 KB an sm_90 CTA may use
  static constexpr int BM = 64 * NC;
  static constexpr int A_BYTES = BM * 128;
  static constexpr int B_BYTES = BN * 128;
  static constexpr int SA_BYTES = BM * 4;
  // kernel 2d (PACKED): the TMA lands the stage's packed int4 weights (BN rows x 64 bytes) at PK_OFF; the converter
  // warps expand them into B's place
  static constexpr int PK_OFF = (A_BYTES + B_BYTES + SA_BYTES + 1023) / 1024 * 1024;
  static constexpr int PK_BYTES = PACKED ? BN * 64 : 0;
  static constexpr int PKM_OFF = PK_OFF + PK_BYTES;  // and the stage's two groups' multipliers (2 x BN bytes)
  static constexpr int PKM_BYTES = PACKED ? 2 * BN : 0;
  static constexpr int STAGE_BYTES = (PKM_OFF + PKM_BYTES + 1023) / 1024 * 1024;
  static constexpr int RINGS = PACKED ? 3 : 2;  // full, empty (+ raw: the packed tile landed)
  static constexpr int TOTAL = STAGES * STAGE_BYTES + RINGS * STAGES * 8 + 1024;
  static_assert(TOTAL <= 227 * 1024, "int_ratio GEMM tile does not fit in shared memory");
};
constexpr int I8P_CONVERTERS = 96;  // kernel 2d: warps 1-3 of the producer warpgroup expand the packed weights

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void fence_operand(int32_t& r) { asm volatile("" : "+r"(r)::"memory"); }

// Kernel 2d's producer thread: as produce_stages for int_ratio, but each K stage's weight tile is the packed int4
// (BN x 64 bytes) and lands on the raw ring for the converter warps; A and the activation bases land on full.
template <int BN, int STAGES, class S, class C>
__device__ __forceinline__ void produce_stages_packed(const WsMaps& maps, const C& c) {
  for (int s = 0; s < c.total; ++s) {
    const int slot = s % STAGES;
    if (s >= STAGES) mbar_wait(c.empty_bar(slot), ((s / STAGES) - 1) & 1);
    const uint32_t st = c.sbase + slot * S::STAGE_BYTES;
    if (s < c.nstages) {
      mbar_expect_tx(c.full_bar(slot), S::A_BYTES + S::SA_BYTES);
      tma_2d(st, &maps.a, s * 128, c.m0, c.full_bar(slot));
      tma_2d(st + S::A_BYTES + S::B_BYTES, &maps.sa, c.m0, s / 2, c.full_bar(slot));
      mbar_expect_tx(c.raw_bar(slot), S::PK_BYTES + S::PKM_BYTES);
      tma_2d(st + S::PK_OFF, &maps.b, s * 64, c.n0, c.raw_bar(slot));
      tma_2d(st + S::PKM_OFF, &maps.wm, c.n0, 2 * s, c.raw_bar(slot));
    } else {
      const int kb = s - c.nstages;
      mbar_expect_tx(c.full_bar(slot), S::BM * 128 + BN * 128);
      tma_2d(st, &maps.lora, kb * 32, c.m0, c.full_bar(slot));
      tma_2d(st + S::A_BYTES, &maps.pup, kb * 32, c.n0, c.full_bar(slot));
    }
  }
}

// 8 packed codes (nibble i = code i, two's complement) times the group multiplier f in [0, 18] as 8 int8 bytes, code 0
// lowest. Two codes per 16-bit lane, offset to c + 8 >= 0; one IMAD per pair multiplies and adds bias = 256 - 8f per
// lane, so each lane holds c*f + 256 in [112, 382] (no borrow into the next lane) and its low byte is the int8 c*f.
__device__ __forceinline__ void expand8(uint32_t w, uint32_t f, uint32_t bias, uint32_t& lo, uint32_t& hi) {
  w ^= 0x88888888u;  // all 8 nibbles to c + 8 at once (a mask and an XOR per pair would take two LOP3s)
  const uint32_t a = (w & 0x000F000Fu) * f + bias;          // codes 0, 4
  const uint32_t b = ((w >> 4) & 0x000F000Fu) * f + bias;   // codes 1, 5
  const uint32_t c = ((w >> 8) & 0x000F000Fu) * f + bias;   // codes 2, 6
  const uint32_t d = ((w >> 12) & 0x000F000Fu) * f + bias;  // codes 3, 7
  const uint32_t ab = __byte_perm(a, b, 0x6240);                            // codes 0, 1, 4, 5
  const uint32_t cd = __byte_perm(c, d, 0x6240);                            // codes 2, 3, 6, 7
  lo = __byte_perm(ab, cd, 0x5410);
  hi = __byte_perm(ab, cd, 0x7632);
}

// One unit of kernel 2d's expansion: 32 codes w (one row, K offset 32 j) times f into the row's two swizzled
// 16-byte units lo and hi of the int8 operand.
__device__ __forceinline__ void expand_unit(const uint4& w, uint32_t f, uint8_t* lo, uint8_t* hi) {
  const uint32_t bias = (256u - 8u * f) * 0x00010001u;
  uint4 o0, o1;
  expand8(w.x, f, bias, o0.x, o0.y);
  expand8(w.y, f, bias, o0.z, o0.w);
  expand8(w.z, f, bias, o1.x, o1.y);
  expand8(w.w, f, bias, o1.z, o1.w);
  *reinterpret_cast<uint4*>(lo) = o0;
  *reinterpret_cast<uint4*>(hi) = o1;
}

// Kernel 2d's converter warps (I8P_CONVERTERS threads, t = 0..95): each K stage's packed tile becomes the int8
// operand the resident copy of kernel 2c holds (code x multiplier, |.| <= 126), written where the TMA would have put
// that copy: row n at n x 128 bytes, its 16-byte unit j at j ^ (n mod 8) (the 128B swizzle of the wgmma
// descriptors). Then a proxy fence (generic-proxy writes, async-proxy reads) and one arrival on the stage's full
// barrier; LoRA stages only arrive, once the slot's previous phase is over. Rows past N and groups past K are
// zero-filled by the TMA, codes and multipliers alike (f = 0 expands to 0).
template <int BN, int STAGES, class S, class C>
__device__ __forceinline__ void expand_stages(const C& c, int t) {
  // Thread t expands units u = t + 96 i (512 units of 32 codes per stage): row n = t / 4 + 24 i, quarter j = t % 4 of
  // the row's 64 packed bytes (group j / 2). 24 i is a multiple of 8, so j and the row's swizzle (n mod 8) are the
  // thread's own constants and every address is a base plus i times a stride, computed once (the per-unit index
  // arithmetic was a quarter of the converter's instructions, and its instructions are kernel 2d's time: ncu).
  constexpr int ROWS = I8P_CONVERTERS / 4;  // rows per round
  static_assert(I8P_CONVERTERS % 4 == 0 && ROWS % 8 == 0 && BN * 4 >= I8P_CONVERTERS, "converter mapping");
  const int j = t & 3, n0 = t >> 2, sw = n0 & 7;
  const int src = S::PK_OFF + n0 * 64 + j * 16, mul = S::PKM_OFF + (j >> 1) * BN + n0;
  const int lo = S::A_BYTES + n0 * 128 + (((2 * j) ^ sw) << 4), hi = S::A_BYTES + n0 * 128 + (((2 * j + 1) ^ sw) << 4);
  const int rounds = (BN * 4 - t + I8P_CONVERTERS - 1) / I8P_CONVERTERS;
  for (int s = 0; s < c.total; ++s) {
    const int slot = s % STAGES;
    uint8_t* st = c.smem + slot * S::STAGE_BYTES;
    if (s < c.nstages) {
      mbar_wait(c.raw_bar(slot), (s / STAGES) & 1);
#pragma unroll 2
      for (int i = 0; i < rounds; ++i) {
        const uint4 w = *reinterpret_cast<const uint4*>(st + src + i * ROWS * 64);
        expand_unit(w, st[mul + i * ROWS], st + lo + i * ROWS * 128, st + hi + i * ROWS * 128);
      }
      fence_proxy_async();
    } else if (s >= STAGES) {
      mbar_wait(c.empty_bar(slot), ((s / STAGES) - 1) & 1);
    }
    mbar_arrive(c.full_bar(slot));
  }
}
#endif

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
// ROWB main loop (kernel 2e): one activation base per token over the whole of K, so the integer sum of all K needs no
// per-chunk promotion: every stage's wgmmas accumulate into the same int32 registers (|sum| <= K·126² < 2^31 for
// K < 135 000), one wgmma group stays in flight while the previous stage's slot is released (the usual Hopper
// mainloop: no consumer waits for its own tensor-core work), and the floats are made once, after the loop:
// acc = float(sum) · a_row · w_row. Half the registers of the chunked loop (no fp32 accumulators beside the
// int32 ones), which is what lets a consumer warpgroup hold a 64 x 256 tile.
template <int BN, class S, class C>
__device__ __forceinline__ void rowbase_mainloop(const C& c, int cw, int32_t (&P)[BN / 2]) {
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) P[i] = 0;
  for (int s = 0; s < c.nstages; ++s) {
    const ConsumerStage<S> st(c.wait_stage(s), cw);
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) fence_operand(P[i]);
    wg_arrive();
    wgmma_s8<BN>(P, make_desc(st.a_base + 0), make_desc(st.b_base + 0), s > 0);
    wgmma_s8<BN>(P, make_desc(st.a_base + 32), make_desc(st.b_base + 32), 1);
    wgmma_s8<BN>(P, make_desc(st.a_base + 64), make_desc(st.b_base + 64), 1);
    wgmma_s8<BN>(P, make_desc(st.a_base + 96), make_desc(st.b_base + 96), 1);
    wg_commit();
    wg_wait<1>();  // stage s - 1's wgmmas are done: its slot can be refilled while stage s's run
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) fence_operand(P[i]);
    if (s > 0) c.release_stage(s - 1);
  }
  wg_wait<0>();
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) fence_operand(P[i]);
  if (c.nstages > 0) c.release_stage(c.nstages - 1);
}
#endif

// PACKED (kernel 2d): the weights stay packed int4 in VRAM (half the bytes of 2c's int8 copy, none beside the
// file's tensors); warps 1-3 of the producer warpgroup expand each stage's tile in shared memory (expand_stages).
// ROWB (kernel 2e): the activations carry one base per token for the whole row (abase_row, Mp floats) instead of
// one per 256-channel chunk; no activation bases travel with the stages (rowbase_mainloop).
template <int BN, int STAGES, int NC, typename OutT, bool PACKED = false, bool ROWB = false>
__global__ void __launch_bounds__(128 * (NC + 1), 1)
    gemm_sm90_i8_kernel(const __grid_constant__ WsMaps maps, const float* __restrict__ wbase,
                        const float* __restrict__ bias, OutT* __restrict__ out, int M, int N, int K, int rp,
                        const float* __restrict__ abase_row) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using S = I8Smem<BN, STAGES, NC, PACKED>;
  constexpr int BM = S::BM;
  extern __shared__ uint8_t smem_raw[];
  // two stages per 256-K chunk; PACKED: full[] also counts the converters' arrivals, plus the raw ring
  const WsCta<BM, BN, STAGES, S::STAGE_BYTES> c(smem_raw, M, N, K, rp, 128 * NC, PACKED ? 1 + I8P_CONVERTERS : 1,
                                                PACKED);
  const int tid = threadIdx.x;
  const int wg = tid >> 7;

  if (wg == 0) {
    // the register file (64K) must hold 128 x producer + 128*NC x consumer registers, or setmaxnreg.inc waits forever
    if constexpr (NC == 2) asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    else asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
    if constexpr (PACKED) {
      static_assert(NC == 2, "kernel 2d: 2 consumer warpgroups (the converters need the producer's 40 registers)");
      if (tid == 0) produce_stages_packed<BN, STAGES, S>(maps, c);
      else if (tid >= 32) expand_stages<BN, STAGES, S>(c, tid - 32);
    } else if (tid == 0) {
      const StageLayout L = {S::STAGE_BYTES, S::A_BYTES, S::B_BYTES, ROWB ? 0 : S::SA_BYTES, 0, 0, BM * 128 + BN * 128};
      produce_stages<STAGES, true>(maps, L, c.sbase, c.bar_base, c.m0, c.n0, c.nstages, c.total);
    }
  } else {
    static_assert(NC == 2 || NC == 3, "2 or 3 consumer warpgroups");
    if constexpr (NC == 2) asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");  // 128*40 + 256*232 <= 64K
    else asm volatile("setmaxnreg.inc.sync.aligned.u32 160;\n");                    // 128*24 + 384*160 <= 64K
    const ConsumerLane ln(tid);
    const int cw = ln.cw, tig = ln.tig, r0 = ln.r0;
    float acc[BN / 2];
    int32_t P[BN / 2];
    if constexpr (ROWB) {
      static_assert(!PACKED, "kernel 2e reads the int8 weight copy");
      rowbase_mainloop<BN, S>(c, cw, P);
      const int ma = c.m0 + r0;
      const float a0 = ma < M ? __ldg(abase_row + ma) : 0.f, a1 = ma + 8 < M ? __ldg(abase_row + ma + 8) : 0.f;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        const int col = c.n0 + 8 * j + 2 * tig;
        const float2 wb = col < N ? *reinterpret_cast<const float2*>(wbase + col) : make_float2(0.f, 0.f);
        acc[4 * j + 0] = __int2float_rn(P[4 * j + 0]) * (a0 * wb.x);
        acc[4 * j + 1] = __int2float_rn(P[4 * j + 1]) * (a0 * wb.y);
        acc[4 * j + 2] = __int2float_rn(P[4 * j + 2]) * (a1 * wb.x);
        acc[4 * j + 3] = __int2float_rn(P[4 * j + 3]) * (a1 * wb.y);
      }
      consumer_tail<BN, STAGES, NC, OutT>(acc, c.sbase, c.bar_base, S::STAGE_BYTES, S::A_BYTES, c.nstages, c.nkb, cw,
                                          r0, tig, c.m0, c.n0, M, N, bias, out);
      return;
    }
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) { acc[i] = 0.f; P[i] = 0; }

    for (int s = 0; s < c.nstages; ++s) {
      const ConsumerStage<S> st(c.wait_stage(s), cw);
      const uint32_t a_base = st.a_base, b_base = st.b_base;
      const int fresh = (s & 1) ? 1 : 0;  // scale-d 0 starts the chunk's integer sum
      wg_arrive();
      wgmma_s8<BN>(P, make_desc(a_base + 0), make_desc(b_base + 0), fresh);
      wgmma_s8<BN>(P, make_desc(a_base + 32), make_desc(b_base + 32), 1);
      wgmma_s8<BN>(P, make_desc(a_base + 64), make_desc(b_base + 64), 1);
      wgmma_s8<BN>(P, make_desc(a_base + 96), make_desc(b_base + 96), 1);
      wg_commit();
      if ((s & 1) == 0 && s + 1 < c.nstages) continue;  // first half of a chunk: keep issuing
      wg_wait<0>();
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) fence_operand(P[i]);
      const float a0 = st.sa[r0], a1 = st.sa[r0 + 8];
      // exact int -> float for |v| < 2^22: the bits of 1.5*2^23 + v, minus 1.5*2^23
      constexpr int MAGIC_I = 0x4B400000;
      constexpr float MAGIC_F = 12582912.0f;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        acc[4 * j + 0] = fmaf(__int_as_float(P[4 * j + 0] + MAGIC_I) - MAGIC_F, a0, acc[4 * j + 0]);
        acc[4 * j + 1] = fmaf(__int_as_float(P[4 * j + 1] + MAGIC_I) - MAGIC_F, a0, acc[4 * j + 1]);
        acc[4 * j + 2] = fmaf(__int_as_float(P[4 * j + 2] + MAGIC_I) - MAGIC_F, a1, acc[4 * j + 2]);
        acc[4 * j + 3] = fmaf(__int_as_float(P[4 * j + 3] + MAGIC_I) - MAGIC_F, a1, acc[4 * j + 3]);
      }
      c.release_stage(s);
      if (s & 1) c.release_stage(s - 1);  // the chunk's first stage is free too
    }
    // weight base per output column, then LoRA-up into the same accumulators
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      const int col = c.n0 + 8 * j + 2 * tig;
      const float2 wb = col < N ? *reinterpret_cast<const float2*>(wbase + col) : make_float2(0.f, 0.f);
      acc[4 * j + 0] *= wb.x; acc[4 * j + 1] *= wb.y; acc[4 * j + 2] *= wb.x; acc[4 * j + 3] *= wb.y;
    }
    consumer_tail<BN, STAGES, NC, OutT>(acc, c.sbase, c.bar_base, S::STAGE_BYTES, S::A_BYTES, c.nstages, c.nkb, cw, r0, tig,
                                    c.m0, c.n0, M, N, bias, out);
  }
#endif
}

// ------------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------------
static int g_sm_count[64];

static int sm_count(int dev) {
  if (dev < 0 || dev >= 64) return 132;
  if (!g_sm_count[dev]) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || v <= 0) v = 108;
    g_sm_count[dev] = v;
  }
  return g_sm_count[dev];
}

SVDQ_API int svdq_abi_version() { return 3; }

SVDQ_API const char* svdq_error_string(int code) {
  if (code == ERR_BAD_ARG) return "svdq: bad argument (shape/alignment/rank)";
  if (code == ERR_NO_PATH) return "svdq: no kernel for this device/path";
  return cudaGetErrorString((cudaError_t)code);
}

__global__ void probe_kernel(int* p) { if (p) *p = 1; }

// Which GEMM path serves device `dev`: 90 (sm_90a wgmma), 80 (INT4 mma.sync), 0 (none; caller falls back).
SVDQ_API int svdq_device_path(int dev) {
  if (cudaSetDevice(dev) != cudaSuccess) { cudaGetLastError(); return 0; }
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) return 0;
  cudaFuncAttributes fa;
  if (cudaFuncGetAttributes(&fa, probe_kernel) != cudaSuccess) { cudaGetLastError(); return 0; }
  if (major == 9 && minor == 0) return 90;
  if (major >= 8) return 80;
  return 0;
}

// Kernel-1 grid: 64-row blocks x K-splits (S). Depends on (M, K, device) only, so the workspace size
// that svdq_quant_workspace reports is the one the launch uses.
static void quant_grid(int M, int K, int dev, int* rowblocks_out, int* splits_out, int* gpc_out) {
  const int ngroups = K / G;
  const int rowblocks = (M + 63) / 64;
  int target = 8 * sm_count(dev);  // enough CTAs (4 warps each) to keep loads in flight on every SM
  int splits = (target + rowblocks - 1) / rowblocks;
  if (splits > ngroups) splits = ngroups;
  if (splits < 1) splits = 1;
  int gpc = (ngroups + splits - 1) / splits;
  gpc = (gpc + RATIO_CHUNK - 1) / RATIO_CHUNK * RATIO_CHUNK;  // int_ratio chunks never straddle two splits
  splits = (ngroups + gpc - 1) / gpc;  // every split non-empty
  *rowblocks_out = rowblocks;
  *splits_out = splits;
  *gpc_out = gpc;
}

// Kernel-1b (int_ratio int8) shared memory per CTA for rank rp, and CTAs per SM that it allows (at most 2:
// __launch_bounds__(256, 2)); 0 when it does not fit a block on this device (then kernel 1 serves FMT_I8).
static int qi8_smem(int rp) {
  switch (rp) {
    case 0: return QI8<0>::SMEM;
    case 32: return QI8<32>::SMEM;
    case 64: return QI8<64>::SMEM;
    case 96: return QI8<96>::SMEM;
    case 128: return QI8<128>::SMEM;
    default: return 1 << 30;
  }
}
static int qi8_ctas_per_sm_query(int rp, int dev) {
  int per_block = 0, per_sm = 0;
  if (cudaDeviceGetAttribute(&per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  const int smem = qi8_smem(rp);
  if (smem > per_block) return 0;
  const int n = per_sm / (smem + 1024);  // 1 KB per CTA reserved by the driver
  return n < 1 ? 0 : (n > 2 ? 2 : n);
}

static int g_qi8_cps[64][5];  // per device and rp/32: CTAs per SM + 1 (0 = not queried yet)
static int qi8_ctas_per_sm(int rp, int dev) {
  if (dev < 0 || dev >= 64 || rp < 0 || rp > 128 || rp % 32) return qi8_ctas_per_sm_query(rp, dev);
  int& c = g_qi8_cps[dev][rp / 32];
  if (!c) c = qi8_ctas_per_sm_query(rp, dev) + 1;
  return c - 1;
}

// Kernel-1b grid: 64-row blocks x K-splits of whole 4-group chunks. The split count S first keeps every SM
// busy where it can (min(CTAs, SMs) as large as possible: a memory-bound pass needs loads from all SMs),
// then minimises a cost in chunk times: waves of resident CTAs x chunks per split + 1 per level of the
// LoRA reduction tree (a dependent global round trip, about one chunk's time); ties go to the smaller S
// (fewer partials). A CTA then walks several chunks where it can, and its double buffer overlaps the next
// chunk's loads with this chunk's work. Depends on (M, K, rp, device) only (svdq_quant_workspace).
static void quant_grid_i8(int M, int K, int rp, int dev, int* rowblocks_out, int* splits_out, int* gpc_out) {
  const int ngroups = K / G;
  const int nch = (ngroups + RATIO_CHUNK - 1) / RATIO_CHUNK;
  const int rowblocks = (M + 63) / 64;
  const int sms = sm_count(dev);
  const int per_sm = qi8_ctas_per_sm(rp, dev);
  const long long slots = (long long)(per_sm > 0 ? per_sm : 1) * sms;
  int best_cpc = nch;
  long long best_fill = -1, best_cost = 0;
  for (int s = 1; s <= nch; ++s) {
    const int cpc = (nch + s - 1) / s;  // chunks per split
    const int splits = (nch + cpc - 1) / cpc;
    if (splits != s) continue;  // the same partition as a smaller s
    int levels = 0;
    for (int span = 1; rp > 0 && span < splits; span *= QF) ++levels;
    const long long ctas = (long long)rowblocks * splits;
    const long long fill = ctas < sms ? ctas : sms;
    const long long cost = (ctas + slots - 1) / slots * cpc + levels;
    if (fill > best_fill || (fill == best_fill && cost < best_cost)) {
      best_fill = fill;
      best_cost = cost;
      best_cpc = cpc;
    }
  }
  *rowblocks_out = rowblocks;
  *gpc_out = best_cpc * RATIO_CHUNK;
  *splits_out = (ngroups + *gpc_out - 1) / *gpc_out;
}

// SVDQ_PDL=1 (read once): kernels 1b and 2c/2e of a linear are launched with programmatic dependent launch, so each
// one's launch and prologue overlap the tail of the kernel before it (the kernels wait in pdl_wait before reading
// its outputs). Off by default until measured.
static bool pdl_enabled() {
  static const bool on = [] {
    const char* v = getenv("SVDQ_PDL");
    return v && v[0] == '1';
  }();
  return on;
}

template <typename... KArgs, typename... Args>
static cudaError_t launch_pdl(void (*kern)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t st,
                              Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = st;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_enabled() ? 1 : 0;
  const cudaError_t e = cudaLaunchKernelEx(&cfg, kern, std::forward<Args>(args)...);
  const cudaError_t last = cudaGetLastError();  // as after a <<<>>> launch: the error state is read and cleared
  return e != cudaSuccess ? e : last;
}

template <typename T, int RP>
static int launch_quant_i8(const T* x, const float* smooth, const T* pd, uint8_t* q, float* ascales, float* lora,
                           float* part, int* cnt, int M, int K, int Mp, int dev, cudaStream_t st, bool row = false,
                           bool row_pass = true, bool lora_only = false) {
  if (lora_only && RP == 0) return 0;  // AF_I8_ROW_CODES without a low-rank branch: nothing left to compute
  static unsigned long long configured = 0;  // devices whose dynamic smem limit is raised (idempotent)
  const int smem = QI8<RP>::SMEM;
  if (dev >= 0 && dev < 64 && !(configured & (1ull << dev))) {
    if (cudaFuncSetAttribute(quant_i8_ratio_kernel<T, RP>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) !=
            cudaSuccess ||
        cudaFuncSetAttribute(quant_i8_ratio_kernel<T, RP>, cudaFuncAttributePreferredSharedMemoryCarveout,
                             cudaSharedmemCarveoutMaxShared) != cudaSuccess)
      return (int)cudaGetLastError();
    configured |= 1ull << dev;
  }
  int rowblocks, splits, gpc;
  quant_grid_i8(M, K, RP, dev, &rowblocks, &splits, &gpc);
  if (RP > 0 && splits > 1 && (!part || !cnt || ((uintptr_t)part & 15))) return ERR_BAD_ARG;
  if (row && row_pass) {  // AF_I8_ROW: the rows' bases first (ascales (1, Mp)), which every K-split then reads
    const cudaError_t e = launch_pdl(row_base_kernel<T>, dim3((Mp + 7) / 8), dim3(256), 0, st, x, smooth, ascales, M, K, Mp);
    if (e != cudaSuccess) return (int)e;
  }
  return (int)launch_pdl(quant_i8_ratio_kernel<T, RP>, dim3(rowblocks, splits), dim3(QI8<RP>::NTH), smem, st, x, smooth,
                         pd, q, ascales, lora, part, cnt, M, K, Mp, gpc, (const float*)(row ? ascales : nullptr),
                         lora_only);
}

template <typename T, int FMT, bool RATIO>
static int launch_quant(const void* x, const float* smooth, const void* pdown, void* qact, float* ascales, float* lora,
                        float* part, int* cnt, int M, int K, int Mp, int rp, int dev, cudaStream_t st,
                        bool row = false, bool row_pass = true, bool lora_only = false) {
  const T* xx = (const T*)x;
  const T* pd = (const T*)pdown;
  uint8_t* q = (uint8_t*)qact;
  if constexpr (FMT == FMT_I8) {  // kernel 1b where its shared memory fits (every sm_90 / sm_80 part)
    // SVDQ_I8_QUANT_KERNEL1=1 runs kernel 1 instead: tests/gpu/test_ratio_gpu.py compares the two bit for bit
    const char* legacy = getenv("SVDQ_I8_QUANT_KERNEL1");
    if (qi8_ctas_per_sm(rp, dev) > 0 && !(!row && legacy && legacy[0] == '1')) {
#define QI(RPV) \
  return launch_quant_i8<T, RPV>(xx, smooth, pd, q, ascales, lora, part, cnt, M, K, Mp, dev, st, row, row_pass, \
                                 lora_only)
      switch (rp) {
        case 0: QI(0);
        case 32: QI(32);
        case 64: QI(64);
        case 96: QI(96);
        case 128: QI(128);
        default: return ERR_BAD_ARG;
      }
#undef QI
    }
  }
  if (row) return ERR_NO_PATH;  // row bases: kernel 1b only
  int rowblocks, splits, gpc;
  quant_grid(M, K, dev, &rowblocks, &splits, &gpc);
  if (rp > 0 && splits > 1 && (!part || !cnt || ((uintptr_t)part & 15))) return ERR_BAD_ARG;
  dim3 grid(rowblocks, splits);
#define QL(RPV) \
  quant_lora_down_kernel<T, FMT, RPV, RATIO><<<grid, 128, 0, st>>>(xx, smooth, pd, q, ascales, lora, part, cnt, M, K, Mp, gpc)
  switch (rp) {
    case 0: QL(0); break;
    case 32: QL(32); break;
    case 64: QL(64); break;
    case 96: QL(96); break;
    case 128: QL(128); break;
    default: return ERR_BAD_ARG;
  }
#undef QL
  return (int)cudaGetLastError();
}

// Workspace of svdq_quantize_act_lora_down for (M, K, rp) on `device`: *part_floats fp32 partials and
// *counters int32 counters that must be zeroed before the call (the kernel leaves them zeroed). Both 0
// when none is needed (rp == 0 or a single K-split). Returns 0 or an error code.
SVDQ_API int svdq_quant_workspace(int M, int K, int rp, int device, long long* part_floats, int* counters) {
  if (!part_floats || !counters) return ERR_BAD_ARG;
  *part_floats = 0;
  *counters = 0;
  if (M <= 0 || K <= 0 || K % G || rp < 0) return ERR_BAD_ARG;
  // the format is not an argument: size for the larger of kernel 1's and kernel 1b's grids
  int rowblocks, splits, gpc, rb_i8, splits_i8, gpc_i8;
  quant_grid(M, K, device, &rowblocks, &splits, &gpc);
  quant_grid_i8(M, K, rp, device, &rb_i8, &splits_i8, &gpc_i8);
  if (splits_i8 > splits) splits = splits_i8;
  if (rp > 0 && splits > 1) {
    *part_floats = (long long)splits * M * rp;
    *counters = rowblocks * splits;  // tree nodes per row block <= splits (QF = 4); both grids use 64-row blocks
  }
  return 0;
}

// x (M, K) dtype; smooth = 1/smooth_factor, fp32 (K); proj_down (K, rp) dtype or NULL when rp == 0;
// fmt (AF_*): AF_INT4 qact (M, K/2) packed int4 + ascales fp32 (K/64, Mp) absmax/7; AF_E4M3 qact (M, K) e4m3 +
// the same scales; AF_INT4_RATIO packed int4 + per-group int_ratio steps base*f (K/64, Mp); AF_I8_RATIO qact
// (M, K) int8 = code*f + ascales = bases (ceil(K/256), Mp); AF_I8_ROW the same codes with one base per row for all
// of K, ascales (1, Mp) (kernel 2e's input); AF_I8_ROW_GIVEN those codes from the row bases already in ascales
// (rows M..Mp-1 zero; written by the op that produced x); AF_I8_ROW_CODES the codes in qact too (only lora is
// computed). lora fp32 (M, rp), every element written (need not
// be zeroed); part/cnt: the workspace of svdq_quant_workspace (NULL where it is 0).
SVDQ_API int svdq_quantize_act_lora_down(const void* x, const float* smooth, const void* pdown, void* qact,
                                         float* ascales, float* lora, float* part, int* cnt, int M, int K, int Mp,
                                         int rp, int dtype, int fmt, int device, void* stream) {
  if (cudaSetDevice(device) != cudaSuccess) return (int)cudaGetLastError();
  if (M <= 0 || K <= 0 || K % G || Mp < M || (rp > 0 && !pdown)) return ERR_BAD_ARG;
  if (((uintptr_t)x | (uintptr_t)smooth | (uintptr_t)pdown | (uintptr_t)qact) & 15) return ERR_BAD_ARG;
  if (rp > 0 && ((uintptr_t)lora & 15)) return ERR_BAD_ARG;
  cudaStream_t st = (cudaStream_t)stream;
#define QARGS x, smooth, pdown, qact, ascales, lora, part, cnt, M, K, Mp, rp, device, st
#define QDISPATCH(T)                                                                      \
  switch (fmt) {                                                                          \
    case AF_INT4: return launch_quant<T, FMT_INT4, false>(QARGS);                         \
    case AF_E4M3: return launch_quant<T, FMT_E4M3, false>(QARGS);                         \
    case AF_INT4_RATIO: return launch_quant<T, FMT_INT4, true>(QARGS);                    \
    case AF_I8_RATIO: return launch_quant<T, FMT_I8, true>(QARGS);                        \
    case AF_I8_ROW: return launch_quant<T, FMT_I8, true>(QARGS, true);                    \
    case AF_I8_ROW_GIVEN: return launch_quant<T, FMT_I8, true>(QARGS, true, false);       \
    case AF_I8_ROW_CODES: return launch_quant<T, FMT_I8, true>(QARGS, true, false, true); \
    default: return ERR_BAD_ARG;                                                          \
  }
  if (dtype == DT_BF16) { QDISPATCH(__nv_bfloat16) }
  if (dtype == DT_F16) { QDISPATCH(__half) }
#undef QDISPATCH
#undef QARGS
  return ERR_BAD_ARG;
}

// cudaFuncSetAttribute(MaxDynamicSharedMemorySize) once per kernel and device, not per launch. The call costs host
// time, and the CUDA runtime makes it wait for in-flight memory copies (reported for cuFuncSetAttribute in
// oneapi-src/unified-runtime#2678): in a sampling loop a copy queued behind the GPU's work turns that into a wait for
// the GPU. Every launcher passes its kernel's fixed shared-memory size, so the first successful call stands.
static cudaError_t smem_limit_once(const void* fn, int bytes) {
  struct Entry { const void* fn; unsigned long long devices; };
  static Entry table[512];
  static int used = 0;
  static std::mutex mu;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return cudaGetLastError();
  if (dev < 0 || dev >= 64) return cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  std::lock_guard<std::mutex> lock(mu);
  int i = 0;
  while (i < used && table[i].fn != fn) ++i;
  if (i < used && ((table[i].devices >> dev) & 1ull)) return cudaSuccess;
  const cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess) return e;
  if (i == used) {
    if (used == 512) return cudaSuccess;  // table full: this kernel keeps setting it per launch (correct, slower)
    table[used++] = Entry{fn, 0ull};
  }
  table[i].devices |= 1ull << dev;
  return cudaSuccess;
}

typedef CUresult (*EncodeTiledFn)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                  const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                  CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
static EncodeTiledFn encode_fn() {
  static EncodeTiledFn fn = nullptr;
  if (!fn) {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
      fn = (EncodeTiledFn)p;
  }
  return fn;
}
static bool encode_map(const TmaKey& k, CUtensorMap* m) {
  EncodeTiledFn fn = encode_fn();
  if (!fn) return false;
  cuuint64_t dims[2] = {k.inner, k.outer};
  cuuint64_t strides[1] = {k.pitch};
  cuuint32_t box[2] = {k.box_inner, k.box_outer};
  cuuint32_t estr[2] = {1, 1};
  return fn(m, (CUtensorMapDataType)k.dtype, 2, (void*)(uintptr_t)k.base, dims, strides, box, estr,
            CU_TENSOR_MAP_INTERLEAVE_NONE, (CUtensorMapSwizzle)k.swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// 2-D row-major tensor [outer, inner] with a row pitch in bytes; box [box_outer, box_inner]. Encoded once per distinct
// set of inputs and thread (tma_cache.h): a layer's calls reuse their descriptors.
static bool make_map(CUtensorMap* m, const void* base, CUtensorMapDataType dt, uint64_t inner, uint64_t outer,
                     uint64_t pitch, uint32_t box_inner, uint32_t box_outer, CUtensorMapSwizzle sw) {
  static thread_local TmaCache<CUtensorMap>* cache = new TmaCache<CUtensorMap>();  // ~180 KB per launching thread
  const TmaKey key{(uint64_t)(uintptr_t)base, inner, outer, pitch, box_inner, box_outer, (int32_t)dt, (int32_t)sw};
  return cache->get(key, m, encode_map);
}

// TMA maps every Hopper GEMM uses (zeroed first): the A and B byte tiles, K-major, 128-byte K boxes with
// the 128B swizzle, and with a LoRA branch the fp32 lora_act / proj_up tiles (32 ranks per box).
static bool make_operand_maps(WsMaps& maps, const Sm90Params& p, uint32_t BM, uint32_t BN) {
  memset(&maps, 0, sizeof(maps));
  bool ok = make_map(&maps.a, p.qa, CU_TENSOR_MAP_DATA_TYPE_UINT8, p.K, p.M, p.K, 128, BM, CU_TENSOR_MAP_SWIZZLE_128B) &&
            make_map(&maps.b, p.qw, CU_TENSOR_MAP_DATA_TYPE_UINT8, p.K, p.N, p.K, 128, BN, CU_TENSOR_MAP_SWIZZLE_128B);
  if (ok && p.rp > 0)
    ok = make_map(&maps.lora, p.lora, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, p.rp, p.M, (uint64_t)p.rp * 4, 32, BM,
                  CU_TENSOR_MAP_SWIZZLE_128B) &&
         make_map(&maps.pup, p.pup, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, p.rp, p.N, (uint64_t)p.rp * 4, 32, BN,
                  CU_TENSOR_MAP_SWIZZLE_128B);
  return ok;
}

// Float-scale path: the per-64-group fp32 scales of A (K/64, Mp) and B (K/64, N), two groups per 128-K stage.
static bool make_group_scale_maps(WsMaps& maps, const Sm90Params& p, uint32_t BM, uint32_t BN) {
  const int groups = p.K / G;
  return make_map(&maps.sa, p.sa, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, p.Mp, groups, (uint64_t)p.Mp * 4, BM, 2,
                  CU_TENSOR_MAP_SWIZZLE_NONE) &&
         make_map(&maps.sw, p.sw, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, p.N, groups, (uint64_t)p.N * 4, BN, 2,
                  CU_TENSOR_MAP_SWIZZLE_NONE);
}

template <int BN, int STAGES, typename OutT>
static int launch_sm90_ws(const Sm90Params& p, cudaStream_t st) {
  constexpr int BM = 128;
  using S = WsSmem<BN, STAGES>;
  WsMaps maps;
  if (!make_operand_maps(maps, p, BM, BN) || !make_group_scale_maps(maps, p, BM, BN)) return ERR_NO_PATH;
  void (*kern)(const WsMaps, const float*, OutT*, int, int, int, int);
  kern = gemm_sm90_ws_kernel<BN, STAGES, OutT>;
  cudaError_t e = smem_limit_once((const void*)kern, S::TOTAL);
  if (e != cudaSuccess) return (int)e;
  int tiles = ((p.N + BN - 1) / BN) * ((p.M + BM - 1) / BM);
  kern<<<tiles, 384, S::TOTAL, st>>>(maps, p.bias, (OutT*)p.out, p.M, p.N, p.K, p.rp);
  return (int)cudaGetLastError();
}

template <int STAGES, typename OutT>
static int launch_sm90_ws6(const Sm90Params& p, cudaStream_t st) {
  using S = Ws6Smem<STAGES>;
  constexpr int BN = S::BN, BM = S::BM;
  WsMaps maps;
  if (!make_operand_maps(maps, p, BM, BN) || !make_group_scale_maps(maps, p, BM, BN)) return ERR_NO_PATH;
  auto kern = gemm_sm90_ws6_kernel<STAGES, OutT>;
  cudaError_t e = smem_limit_once((const void*)kern, S::TOTAL);
  if (e != cudaSuccess) return (int)e;
  int tiles = ((p.N + BN - 1) / BN) * ((p.M + BM - 1) / BM);
  kern<<<tiles, 512, S::TOTAL, st>>>(maps, p.bias, (OutT*)p.out, p.M, p.N, p.K, p.rp);
  return (int)cudaGetLastError();
}

// path 90: qact/qweight e4m3 bytes; path 80: packed int4. See the layout notes at the top.
// variant (path 90): 0 = default (v6 for M >= 1536, N >= 640, K < 8192; else v2), 1 = v1 (cp.async), 5 = v3, 8 = v4, 9/10 = v5,
// 11 = v6, 12 = v2; 2/3/4/6/7 = timing-only diagnostics (wrong results, see gemm_sm90_ws_kernel).
// int_ratio Hopper GEMM (kernel 2c): qa int8 (M, K), abase fp32 (ceil(K/256), Mp), qw int8 (N, K), wbase fp32 (N);
// variants 20-24 (kernel 2e, 20 = its cost-model pick): abase (1, Mp), one base per row (AF_I8_ROW).
// Kernel 2d (PACKED): qw is the packed int4 (N, K/2) of the file and wmult its multipliers (K/64, N) uint8.
template <int BN, int STAGES, int NC, typename OutT, bool PACKED = false, bool ROWB = false>
static int launch_sm90_i8(const Sm90Params& p, cudaStream_t st, const uint8_t* wmult = nullptr) {
  using S = I8Smem<BN, STAGES, NC, PACKED>;
  constexpr int BM = S::BM;
  WsMaps maps;
  // ROWB: p.sa holds one base per token (1, Mp); its map is made (it is never loaded) so that every launch has one
  const int nchunks = ROWB ? 1 : (p.K / G + RATIO_CHUNK - 1) / RATIO_CHUNK;
  // one activation base per (256-channel chunk, token); the weight bases are read directly (p.sw)
  if (!make_operand_maps(maps, p, BM, BN) ||
      !make_map(&maps.sa, p.sa, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, p.Mp, nchunks, (uint64_t)p.Mp * 4, BM, 1,
                CU_TENSOR_MAP_SWIZZLE_NONE))
    return ERR_NO_PATH;
  // packed weights: 64-byte (128-code) boxes, unswizzled (the converters read them row by row)
  if (PACKED && !(make_map(&maps.b, p.qw, CU_TENSOR_MAP_DATA_TYPE_UINT8, p.K / 2, p.N, p.K / 2, 64, BN,
                            CU_TENSOR_MAP_SWIZZLE_NONE) &&
                   make_map(&maps.wm, wmult, CU_TENSOR_MAP_DATA_TYPE_UINT8, p.N, p.K / G, p.N, BN, 2,
                            CU_TENSOR_MAP_SWIZZLE_NONE)))
    return ERR_NO_PATH;
  auto kern = gemm_sm90_i8_kernel<BN, STAGES, NC, OutT, PACKED, ROWB>;
  cudaError_t e = smem_limit_once((const void*)kern, S::TOTAL);
  if (e != cudaSuccess) return (int)e;
  int tiles = ((p.N + BN - 1) / BN) * ((p.M + BM - 1) / BM);
  return (int)launch_pdl(kern, dim3(tiles), dim3(128 * (NC + 1)), S::TOTAL, st, maps, p.sw, p.bias, (OutT*)p.out, p.M,
                         p.N, p.K, p.rp, ROWB ? p.sa : nullptr);
}

// Tile shape for the int_ratio GEMM by a wave-quantisation cost model: waves = ceil(tiles / SMs), cost = waves x
// tile MACs x the shape's relative per-MAC time against 128x128, fitted on the H200 after the epilogue went through
// shared memory (2026-12-04, docs/KERNELS.md §4d): 192x128 0.90 (0.78-0.93 over the 12 shapes), 128x192 0.96. It
// picks the fastest measured shape on all 12 benchmark shapes.
// Kernel 2e (row bases, variants 21-24) has its own list, fitted on its first H200 run (2026-12-05,
// bench/results/h200_kernel2e_first.json: 0.84 for the three large tiles; the pick is the fastest tile on 11 of the
// 12 benchmark shapes and 0.3 % off on the last).
static int pick_i8_variant(int M, int N, int dev, bool row = false) {
  struct Shape { int variant, bm, bn; double eff; };
  const Shape chunked[3] = {{3, 128, 128, 1.0}, {1, 192, 128, 0.90}, {2, 128, 192, 0.96}};
  const Shape rowb[4] = {{24, 128, 128, 1.0}, {22, 192, 128, 0.84}, {23, 128, 192, 0.84}, {21, 128, 256, 0.84}};
  const int sms = sm_count(dev);
  int best = row ? 24 : 3;
  double best_cost = 0;
  for (int i = 0; i < (row ? 4 : 3); ++i) {
    const Shape& sh = row ? rowb[i] : chunked[i];
    const long tiles = (long)((M + sh.bm - 1) / sh.bm) * ((N + sh.bn - 1) / sh.bn);
    const double cost = (double)((tiles + sms - 1) / sms) * sh.bm * sh.bn * sh.eff;
    if (best_cost == 0 || cost < best_cost) { best_cost = cost; best = sh.variant; }
  }
  return best;
}

template <typename OutT>
static int dispatch_sm90_i8(const Sm90Params& p, int variant, int dev, cudaStream_t st) {
  if (variant == 0 || variant == 20) variant = pick_i8_variant(p.M, p.N, dev, variant == 20);
  switch (variant) {
    case 1: return launch_sm90_i8<128, 5, 3, OutT>(p, st);  // 192 x 128 tiles, 3 consumer warpgroups
    case 2: return launch_sm90_i8<192, 5, 2, OutT>(p, st);  // 128 x 192 tiles
    case 3: return launch_sm90_i8<128, 6, 2, OutT>(p, st);  // 128 x 128 tiles
    // kernel 2e, activations with one base per token (ascales (1, Mp)); being measured (docs/KERNELS.md §6c)
    case 21: return launch_sm90_i8<256, 4, 2, OutT, false, true>(p, st);  // 128 x 256 tiles
    case 22: return launch_sm90_i8<128, 5, 3, OutT, false, true>(p, st);  // 192 x 128
    case 23: return launch_sm90_i8<192, 5, 2, OutT, false, true>(p, st);  // 128 x 192
    case 24: return launch_sm90_i8<128, 6, 2, OutT, false, true>(p, st);  // 128 x 128
    default: return ERR_BAD_ARG;
  }
}

// The checks both GEMM entry points make: sizes, padded rank, the LoRA operands present with a rank, and the
// operands read as vectors (or by TMA) 16-byte aligned.
static bool gemm_args_ok(const void* qact, const float* ascales, const void* qweight, const float* wscales,
                         const float* lora, const float* proj_up, const float* bias, const void* out, int M, int N, int K,
                         int Mp, int rp) {
  if (M <= 0 || N <= 0 || K <= 0 || K % G || N % 64 || Mp < M || Mp % 4 || rp % 32 || rp > 128) return false;
  if (rp > 0 && (!lora || !proj_up)) return false;
  return !(((uintptr_t)qact | (uintptr_t)qweight | (uintptr_t)ascales | (uintptr_t)wscales | (uintptr_t)lora |
            (uintptr_t)proj_up | (uintptr_t)bias | (uintptr_t)out) & 15);
}

// Kernel 2d: the int_ratio Hopper GEMM on the file's packed weights (no int8 copy in VRAM): qweight packed int4
// (N, K/2), wmult uint8 (K/64, N), wbase fp32 (N); the rest as svdq_w4a4_gemm's path 91.
SVDQ_API int svdq_w4a4_gemm_packed(const void* qact, const float* abase, const void* qweight, const void* wmult,
                                   const float* wbase, const float* lora, const float* proj_up, const float* bias,
                                   void* out, int M, int N, int K, int Mp, int rp, int out_dtype, int device,
                                   void* stream) {
  if (cudaSetDevice(device) != cudaSuccess) return (int)cudaGetLastError();
  if (!wmult || !wbase || ((uintptr_t)wmult & 15) || !gemm_args_ok(qact, abase, qweight, wbase, lora, proj_up, bias, out,
                                                                      M, N, K, Mp, rp))
    return ERR_BAD_ARG;
  Sm90Params p{(const uint8_t*)qact, abase, (const uint8_t*)qweight, wbase, lora, proj_up, bias, out, M, N, K, Mp, rp};
  const auto* mu = static_cast<const uint8_t*>(wmult);
  cudaStream_t st = (cudaStream_t)stream;
  if (out_dtype == DT_BF16) return launch_sm90_i8<128, 5, 2, __nv_bfloat16, true>(p, st, mu);
  if (out_dtype == DT_F16) return launch_sm90_i8<128, 5, 2, __half, true>(p, st, mu);
  return ERR_BAD_ARG;
}

SVDQ_API int svdq_w4a4_gemm(const void* qact, const float* ascales, const void* qweight, const float* wscales,
                            const float* lora, const float* proj_up, const float* bias, void* out, int M, int N, int K,
                            int Mp, int rp, int out_dtype, int path, int variant, int device, void* stream) {
  if (cudaSetDevice(device) != cudaSuccess) return (int)cudaGetLastError();
  if (!gemm_args_ok(qact, ascales, qweight, wscales, lora, proj_up, bias, out, M, N, K, Mp, rp)) return ERR_BAD_ARG;
  cudaStream_t st = (cudaStream_t)stream;
  if (path == 90) {
    Sm90Params p{(const uint8_t*)qact, ascales, (const uint8_t*)qweight, wscales, lora, proj_up, bias, out, M, N, K, Mp, rp};
    // variant 0: v6 where it measured faster (docs/KERNELS.md), else v2; 11 = v6, 12 = v2
    const bool v6 = variant == 11 || (variant == 0 && M >= 1536 && N >= 640 && K < 8192);
    if (variant != 0 && variant != 11 && variant != 12) return ERR_BAD_ARG;
    if (v6) {
      if (out_dtype == DT_BF16) return launch_sm90_ws6<5, __nv_bfloat16>(p, st);
      if (out_dtype == DT_F16) return launch_sm90_ws6<5, __half>(p, st);
    } else {
      if (out_dtype == DT_BF16) return launch_sm90_ws<128, 5, __nv_bfloat16>(p, st);
      if (out_dtype == DT_F16) return launch_sm90_ws<128, 5, __half>(p, st);
    }
    return ERR_BAD_ARG;
  }
  if (path == 91) {  // int_ratio on Hopper: ascales = activation bases, wscales = weight bases (N)
    Sm90Params p{(const uint8_t*)qact, ascales, (const uint8_t*)qweight, wscales, lora, proj_up, bias, out, M, N, K, Mp, rp};
    if (out_dtype == DT_BF16) return dispatch_sm90_i8<__nv_bfloat16>(p, variant, device, st);
    if (out_dtype == DT_F16) return dispatch_sm90_i8<__half>(p, variant, device, st);
    return ERR_BAD_ARG;
  }
  if (path == 80) {
    dim3 grid((N + 63) / 64, (M + 63) / 64);
    if (out_dtype == DT_BF16)
      gemm_mma_s4_kernel<__nv_bfloat16><<<grid, 128, 0, st>>>((const uint32_t*)qact, ascales, (const uint32_t*)qweight,
                                                              wscales, lora, proj_up, bias, (__nv_bfloat16*)out, M, N, K,
                                                              Mp, rp);
    else if (out_dtype == DT_F16)
      gemm_mma_s4_kernel<__half><<<grid, 128, 0, st>>>((const uint32_t*)qact, ascales, (const uint32_t*)qweight, wscales,
                                                       lora, proj_up, bias, (__half*)out, M, N, K, Mp, rp);
    else
      return ERR_BAD_ARG;
    return (int)cudaGetLastError();
  }
  return ERR_NO_PATH;
}


// Both kernels of one eager linear (kernels/ops.py linear_direct): the two entry points above, in order. A null x
// skips kernel 1 (the GEMM of an input group's member on the group's kernel-1 output); a null out skips kernel 2
// (the group's shared kernel-1 pass).
SVDQ_API int svdq_linear(const SvdqLinearArgs* a) {
  if (!a || (!a->x && !a->out)) return ERR_BAD_ARG;
  if (a->x) {
    const int code = svdq_quantize_act_lora_down(a->x, a->smooth, a->rp ? a->pdown : nullptr, a->qact, a->ascales,
                                                 a->lora, a->part, a->cnt, a->M, a->K, a->Mp, a->rp, a->dtype, a->fmt,
                                                 a->device, a->stream);
    if (code || !a->out) return code;
  }
  const float* lora = a->rp ? a->lora : nullptr;
  const float* pup = a->rp ? a->proj_up : nullptr;
  if (a->path == 92)
    return svdq_w4a4_gemm_packed(a->qact, a->ascales, a->qweight, a->wmult, a->wscales, lora, pup, a->bias, a->out,
                                 a->M, a->N, a->K, a->Mp, a->rp, a->dtype, a->device, a->stream);
  return svdq_w4a4_gemm(a->qact, a->ascales, a->qweight, a->wscales, lora, pup, a->bias, a->out, a->M, a->N, a->K,
                        a->Mp, a->rp, a->dtype, a->path, a->variant, a->device, a->stream);
}

// SvdqLinearArgs as this library was compiled (svdq_abi.h): size, then each field's offset.
SVDQ_API int svdq_linear_args_layout(long long* out, int n) { return svdq_linear_args_layout_of(out, n); }
