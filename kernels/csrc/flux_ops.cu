// The FLUX block's attention preparation and the single block's concatenation, behind the same C ABI as svdq.cu
// (wrappers/flux_blocks.py calls them; kernels/reference.py qk_norm_rope / concat_rows / ln_modulate are the
// references). Also the blocks' modulated LayerNorm (ln_modulate, below), in place of two passes, and the single
// block's MLP GELU inside its concatenation (concat_rows), in place of a pass over a strided slice.
//
// ComfyUI's FLUX forward prepares attention with ~10 torch passes per block over the qkv projection's output: the
// q and k RMSNorms, RoPE in fp32 (a conversion to fp32, a multiply, an addcmul, a conversion back, for q and k),
// the double blocks' three concatenations of txt and img along the sequence, and copies to contiguous layouts
// (docs/E2E.md, the FLUX profile: ~20 ms of a 140 ms step on an H200). Here one pass reads each token's q, k and v
// once and writes the attention's q, k, v in (B, H, L, D), contiguous:
//
//   q' = rope(bf16(rms_norm(q) * q_scale)),  k' likewise,  v' = v,   rope(x)[2i+j] = f[i,j,0]·x[2i] + f[i,j,1]·x[2i+1]
//
// with the intermediate rounded to the compute dtype where ComfyUI's ops round it (RMSNorm's output, RoPE's
// output), fp32 inside. Tokens come from up to two sources concatenated along L (the double block's txt then img),
// each with its own row stride (the single block's qkv is a column slice of linear1's output) and its own RMSNorm
// scales; each row holds [3, H, D]. pe: fp32 (Bpe, 1, L, D/2, 2, 2), Bpe = 1 (broadcast) or B.
//
// Work split: one warp per (token, head); lane l owns elements 4l..4l+3 (two RoPE pairs), so D = 128 (FLUX's head
// dim) exactly. 8 warps per block walk the heads of one token, sharing its pe row through L1.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "half_pair.h"
#include "ratio_codes.h"
#include "svdq_abi.h"

namespace {

constexpr int HEAD_DIM = 128;
constexpr int WARPS = 8;

template <typename T> struct Vec4 {  // four 16-bit values as one 8-byte load/store, fp32 in registers
  __device__ static void load(const T* p, float (&v)[4]) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    const float2 a = Pack2<T>::to_f2(u.x), b = Pack2<T>::to_f2(u.y);
    v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
  }
  __device__ static void store(T* p, const float (&v)[4]) {
    *reinterpret_cast<uint2*>(p) = make_uint2(Pack2<T>::from_f2(v[0], v[1]), Pack2<T>::from_f2(v[2], v[3]));
  }
  __device__ static float round(float v) { return static_cast<float>(T(v)); }  // to T (nearest even) and back
  __device__ static float to_f(T v) { return static_cast<float>(v); }
};

struct Source {  // one of the (up to two) token sources; element strides
  const void* ptr;
  const void* q_scale;
  const void* k_scale;
  long long batch_stride;
  long long row_stride;
  int rows;
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// RMSNorm (fp32 inside, rounded to T as torch's rms_norm returns it), then RoPE on the lane's two pairs.
template <typename T>
__device__ __forceinline__ void norm_rope(float (&v)[4], const T* scale, int lane, float eps, const float4 (&f)[2]) {
  const float ss = warp_sum(v[0] * v[0] + v[1] * v[1] + v[2] * v[2] + v[3] * v[3]);
  const float r = rsqrtf(ss * (1.f / HEAD_DIM) + eps);
  float w[4];
  Vec4<T>::load(scale + 4 * lane, w);
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = Vec4<T>::round(v[i] * r * w[i]);
#pragma unroll
  for (int p = 0; p < 2; ++p) {  // f[p] = (f00, f01, f10, f11) of pair 2*lane + p
    const float x0 = v[2 * p], x1 = v[2 * p + 1];
    v[2 * p] = fmaf(f[p].y, x1, f[p].x * x0);
    v[2 * p + 1] = fmaf(f[p].w, x1, f[p].z * x0);
  }
}

template <typename T>
__global__ void __launch_bounds__(32 * WARPS) qk_norm_rope_kernel(Source s0, Source s1, const float* __restrict__ pe,
                                                                  long long pe_batch_stride, T* __restrict__ q,
                                                                  T* __restrict__ k, T* __restrict__ v, int heads,
                                                                  float eps) {
  const int L = s0.rows + s1.rows;
  const int token = blockIdx.x, b = blockIdx.y;  // token within the concatenated sequence
  const bool first = token < s0.rows;  // fields picked one by one: a reference to either parameter puts both on the stack
  const T* src = first ? reinterpret_cast<const T*>(s0.ptr) + b * s0.batch_stride + token * s0.row_stride
                       : reinterpret_cast<const T*>(s1.ptr) + b * s1.batch_stride + (token - s0.rows) * s1.row_stride;
  const T* q_scale = reinterpret_cast<const T*>(first ? s0.q_scale : s1.q_scale);
  const T* k_scale = reinterpret_cast<const T*>(first ? s0.k_scale : s1.k_scale);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float4* pf = reinterpret_cast<const float4*>(pe + b * pe_batch_stride + (long long)token * (HEAD_DIM * 2));
  float4 f[2];
  f[0] = __ldg(pf + 2 * lane);
  f[1] = __ldg(pf + 2 * lane + 1);
  for (int h = warp; h < heads; h += WARPS) {
    float a[4], c[4], d[4];
    Vec4<T>::load(src + h * HEAD_DIM + 4 * lane, a);
    Vec4<T>::load(src + (heads + h) * HEAD_DIM + 4 * lane, c);
    Vec4<T>::load(src + (2 * heads + h) * HEAD_DIM + 4 * lane, d);
    norm_rope<T>(a, q_scale, lane, eps, f);
    norm_rope<T>(c, k_scale, lane, eps, f);
    const long long o = (((long long)b * heads + h) * L + token) * HEAD_DIM + 4 * lane;
    Vec4<T>::store(q + o, a);
    Vec4<T>::store(k + o, c);
    Vec4<T>::store(v + o, d);
  }
}

// torch's GELU(approximate="tanh") in fp32 (its CUDA kernel's formula, with tanhf), on a 16-byte piece of T
template <typename T>
__device__ __forceinline__ uint4 gelu_piece(uint4 u) {
  const T* e = reinterpret_cast<const T*>(&u);
  float v[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float x = Vec4<T>::to_f(e[i]);
    const float inner = 0.7978845608028654f * (x + 0.044715f * (x * x * x));
    v[i] = 0.5f * x * (1.f + tanhf(inner));
  }
  uint4 o;
  Vec4<T>::store(reinterpret_cast<T*>(&o), *reinterpret_cast<const float(*)[4]>(v));
  Vec4<T>::store(reinterpret_cast<T*>(&o) + 4, *reinterpret_cast<const float(*)[4]>(v + 4));
  return o;
}

// The next linear's activation row base and codes (kernels/csrc/svdq.cu AF_I8_ROW_GIVEN / AF_I8_ROW_CODES),
// computed where a row of its input is made. The base: the max over the row of |y * (1/lambda)| on the values as
// stored (16-bit, read back exactly as kernel 1b reads them), times fp32(1/126), as svdq.cu's row_base_kernel; the
// codes: kernel 1b's, from ratio_codes.h. Same float operations, so bases and codes are bit for bit kernel 1b's.
template <typename T>
__device__ __forceinline__ float smoothed_absmax8(const uint4& stored, const float* __restrict__ smooth_rcp) {
  float v[8];
  smooth8_ldg<T>(stored, smooth_rcp, v);
  return absmax8(v);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// The row's base from each thread's max (NT threads, red: NT / 32 floats of shared memory), returned to every thread;
// thread 0 writes it to rowbase[m], and block 0 zeroes rows M..Mp-1, which kernel 2e's padded base vector holds.
template <int NT>
__device__ __forceinline__ float row_base(float v, float* red, float* __restrict__ rowbase, int m, int M, int Mp) {
  v = warp_max(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // red may still be read by an earlier reduction
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = 0.f;
#pragma unroll
  for (int w = 0; w < NT / 32; ++w) t = fmaxf(t, red[w]);
  const float base = ratio_base(t);
  if (threadIdx.x == 0) rowbase[m] = base;
  if (m == 0 && threadIdx.x < Mp - M) rowbase[M + threadIdx.x] = 0.f;
  return base;
}

// Codes x multipliers (int8) of one 16-byte piece of the row, 8 columns of a 64-column group whose other 56 columns
// are held by the 7 neighbouring lanes (lanes differing in bits 0-2; every lane of the warp must call, `active` says
// whether this one holds a piece): the group's absmax over those 8 lanes, its multiplier, the 8 code bytes to dst.
template <typename T>
__device__ __forceinline__ void write_codes8(const uint4& stored, const float* __restrict__ smooth_rcp, float base,
                                             bool active, uint8_t* __restrict__ dst) {
  float v[8];
  float a = 0.f;
  if (active) {
    smooth8_ldg<T>(stored, smooth_rcp, v);
    a = absmax8(v);
  }
  a = lanes8_max(a);
  if (active) {
    const float mult = ratio_mult(a, base);
    *reinterpret_cast<uint2*>(dst) = ratio_codes8(v, ratio_step_rcp(base * mult), static_cast<uint32_t>(mult));
  }
}

// out[m, :ka] = a[m, :ka], out[m, ka:ka+kb] = b[m, :kb] (GELU on b's part when GELU); 16-byte pieces, grid-stride.
template <typename T, bool GELU>
__global__ void concat_rows_kernel(const uint4* __restrict__ a, long long lda, int ka, const uint4* __restrict__ b,
                                   long long ldb, int kb, uint4* __restrict__ out, int rows) {
  const int pa = ka / 8, pw = (ka + kb) / 8;  // pieces of a per row, of the output row
  const long long total = (long long)rows * pw;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
    const long long m = i / pw;
    const int p = (int)(i - m * pw);
    if (p < pa) {
      out[i] = a[m * (lda / 8) + p];
    } else {
      const uint4 u = b[m * (ldb / 8) + (p - pa)];
      out[i] = GELU ? gelu_piece<T>(u) : u;
    }
  }
}

// concat_rows_kernel's output with the next linear's row base (and codes where qact is not null): one block per row
// (the base needs the whole row), the same pieces and GELU, each thread's pieces held in registers until the base is
// known (up to CR_PIECES per thread: K <= 16384). ka may be 0 (b alone: the double block's MLP GELU).
constexpr int CR_THREADS = 256, CR_PIECES = 8;

template <typename T, bool GELU>
__global__ void __launch_bounds__(CR_THREADS) concat_rows_rowbase_kernel(
    const uint4* __restrict__ a, long long lda, int ka, const uint4* __restrict__ b, long long ldb, int kb,
    uint4* __restrict__ out, const float* __restrict__ smooth_rcp, float* __restrict__ rowbase,
    uint8_t* __restrict__ qact, int rows, int Mp) {
  __shared__ float red[CR_THREADS / 32];
  const int m = blockIdx.x, pa = ka / 8, pw = (ka + kb) / 8;
  uint4 held[CR_PIECES];
  float amax = 0.f;
#pragma unroll
  for (int s = 0; s < CR_PIECES; ++s) {
    const int p = threadIdx.x + s * CR_THREADS;
    if (p < pw) {
      uint4 u;
      if (p < pa) {
        u = a[m * (lda / 8) + p];
      } else {
        u = b[m * (ldb / 8) + (p - pa)];
        if (GELU) u = gelu_piece<T>(u);
      }
      out[(long long)m * pw + p] = u;
      held[s] = u;
      amax = fmaxf(amax, smoothed_absmax8<T>(u, smooth_rcp + p * 8));
    }
  }
  const float base = row_base<CR_THREADS>(amax, red, rowbase, m, rows, Mp);
  if (qact == nullptr) return;
  uint8_t* qr = qact + (long long)m * (ka + kb);
#pragma unroll
  for (int s = 0; s < CR_PIECES; ++s) {
    const int p = threadIdx.x + s * CR_THREADS;
    if (s * CR_THREADS < pw)  // block-uniform: every lane of a warp with any piece left takes part in the shuffles
      write_codes8<T>(held[s], smooth_rcp + p * 8, base, p < pw, qr + p * 8);
  }
}

// y = LayerNorm(x) · (1 + scale) + shift, the FLUX blocks' modulated input of a linear (ComfyUI: an affine-free
// LayerNorm pass, then an addcmul pass): one block per row, the row held in registers (C <= LN_THREADS · 8 · LN_VPT),
// mean then variance from the held values (two-pass; torch's LayerNorm uses Welford's: equal up to fp32 rounding),
// fp32 inside, rounded to T where ComfyUI's ops round (the LayerNorm's output, 1 + scale, the result).
// scale and shift: (B, C) rows of the modulation output with element row stride mod_ld; row m uses sample m / rows.
constexpr int LN_THREADS = 128, LN_VPT = 4;  // 128 threads x 4 vectors of 8 = up to 4096 channels

template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  float a[4], b[4];
  Vec4<T>::load(p, a);
  Vec4<T>::load(p + 4, b);
#pragma unroll
  for (int i = 0; i < 4; ++i) { v[i] = a[i]; v[4 + i] = b[i]; }
}

template <typename T>
__device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // red is reused by the next call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = 0.f;
#pragma unroll
  for (int w = 0; w < LN_THREADS / 32; ++w) t += red[w];
  return t;
}

// RB: also the next linear's row base (smooth_rcp its 1/lambda (C,), rowbase (Mp,)) and, where qact is not null, its
// codes (M, C) int8; else all three are null.
template <typename T, bool RB>
__global__ void __launch_bounds__(LN_THREADS) ln_modulate_kernel(const T* __restrict__ x, long long ldx,
                                                                 const T* __restrict__ shift,
                                                                 const T* __restrict__ scale, long long mod_ld,
                                                                 T* __restrict__ y, int C, int rows, float eps,
                                                                 const float* __restrict__ smooth_rcp,
                                                                 float* __restrict__ rowbase,
                                                                 uint8_t* __restrict__ qact, int M, int Mp) {
  __shared__ float red[LN_THREADS / 32];
  const int m = blockIdx.x, sample = m / rows;
  const T* xr = x + (long long)m * ldx;
  float v[LN_VPT][8];
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < LN_VPT; ++i) {
    const int c = (threadIdx.x + i * LN_THREADS) * 8;
    if (c < C) {
      load8<T>(xr + c, v[i]);
#pragma unroll
      for (int j = 0; j < 8; ++j) s += v[i][j];
    }
  }
  const float mean = block_sum<T>(s, red) / C;
  float q = 0.f;
#pragma unroll
  for (int i = 0; i < LN_VPT; ++i) {
    if ((threadIdx.x + i * LN_THREADS) * 8 < C) {
#pragma unroll
      for (int j = 0; j < 8; ++j) { v[i][j] -= mean; q += v[i][j] * v[i][j]; }
    }
  }
  const float rstd = rsqrtf(block_sum<T>(q, red) / C + eps);
  const T* sh = shift + (long long)sample * mod_ld;
  const T* sc = scale + (long long)sample * mod_ld;
  float amax = 0.f;
  uint4 held[LN_VPT];  // the stored values, for the codes once the row's base is known
#pragma unroll
  for (int i = 0; i < LN_VPT; ++i) {
    const int c = (threadIdx.x + i * LN_THREADS) * 8;
    if (c < C) {
      float a[8], b[8], o[4], o2[4];
      load8<T>(sh + c, a);
      load8<T>(sc + c, b);
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // rounded where ComfyUI's ops round: the LayerNorm output and 1 + scale
        o[j] = fmaf(Vec4<T>::round(v[i][j] * rstd), Vec4<T>::round(1.f + b[j]), a[j]);
        o2[j] = fmaf(Vec4<T>::round(v[i][4 + j] * rstd), Vec4<T>::round(1.f + b[4 + j]), a[4 + j]);
      }
      const uint4 u = make_uint4(Pack2<T>::from_f2(o[0], o[1]), Pack2<T>::from_f2(o[2], o[3]),
                                 Pack2<T>::from_f2(o2[0], o2[1]), Pack2<T>::from_f2(o2[2], o2[3]));
      *reinterpret_cast<uint4*>(y + (long long)m * C + c) = u;
      held[i] = u;
      if (RB) amax = fmaxf(amax, smoothed_absmax8<T>(u, smooth_rcp + c));
    }
  }
  if constexpr (RB) {
    const float base = row_base<LN_THREADS>(amax, red, rowbase, m, M, Mp);
    if (qact == nullptr) return;
#pragma unroll
    for (int i = 0; i < LN_VPT; ++i) {
      const int c = (threadIdx.x + i * LN_THREADS) * 8;
      if (i * LN_THREADS * 8 < C)  // block-uniform (C is a multiple of 64: a group's 8 lanes are all in or all out)
        write_codes8<T>(held[i], smooth_rcp + c, base, c < C, qact + (long long)m * C + c);
    }
  }
}

bool aligned(const void* p, int bytes) { return p && (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

}  // namespace

// q, k, v (B, H, L0 + L1, 128) from the qkv rows of source 0 (L0 tokens) then source 1 (L1 tokens, x1 null when 0).
// Strides in elements; rows and scales 8-byte aligned; pe 16-byte aligned. dtype: DT_F16 0 / DT_BF16 1.
SVDQ_API int svdq_qk_norm_rope(const void* x0, long long bs0, long long ld0, int L0, const void* qs0, const void* ks0,
                               const void* x1, long long bs1, long long ld1, int L1, const void* qs1, const void* ks1,
                               const float* pe, long long pe_bs, void* q, void* k, void* v, int B, int heads, float eps,
                               int dtype, int device, void* stream) {
  if (B < 1 || heads < 1 || L0 < 1 || L1 < 0 || B > 65535 || (L1 > 0 && (!x1 || !qs1 || !ks1))) return ERR_BAD_ARG;
  if (!aligned(x0, 8) || !aligned(qs0, 8) || !aligned(ks0, 8) || !aligned(pe, 16) || !aligned(q, 8) ||
      !aligned(k, 8) || !aligned(v, 8) || ld0 % 4 || bs0 % 4 || ld1 % 4 || bs1 % 4 || pe_bs % 4)
    return ERR_BAD_ARG;
  if (L1 > 0 && (!aligned(x1, 8) || !aligned(qs1, 8) || !aligned(ks1, 8))) return ERR_BAD_ARG;
  if (cudaSetDevice(device) != cudaSuccess) return (int)cudaGetLastError();
  const Source s0{x0, qs0, ks0, bs0, ld0, L0}, s1{x1, qs1, ks1, bs1, ld1, L1};
  const dim3 grid(L0 + L1, B);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (dtype == DT_BF16)
    qk_norm_rope_kernel<__nv_bfloat16><<<grid, 32 * WARPS, 0, st>>>(s0, s1, pe, pe_bs, (__nv_bfloat16*)q,
                                                                    (__nv_bfloat16*)k, (__nv_bfloat16*)v, heads, eps);
  else if (dtype == DT_F16)
    qk_norm_rope_kernel<__half><<<grid, 32 * WARPS, 0, st>>>(s0, s1, pe, pe_bs, (__half*)q, (__half*)k, (__half*)v,
                                                             heads, eps);
  else
    return ERR_BAD_ARG;
  return (int)cudaGetLastError();
}

// out (rows, ka + kb) = [a | b] row by row, b through GELU (tanh form) when gelu_b; 16-bit elements (dtype);
// ka, kb, lda, ldb multiples of 8; 16-byte-aligned pointers.
SVDQ_API int svdq_concat_rows(const void* a, long long lda, int ka, const void* b, long long ldb, int kb, int gelu_b,
                              void* out, int rows, int dtype, int device, void* stream) {
  if (rows < 1 || ka < 8 || kb < 8 || ka % 8 || kb % 8 || lda % 8 || ldb % 8 || lda < ka || ldb < kb ||
      !aligned(a, 16) || !aligned(b, 16) || !aligned(out, 16) || (dtype != DT_BF16 && dtype != DT_F16))
    return ERR_BAD_ARG;
  if (cudaSetDevice(device) != cudaSuccess) return (int)cudaGetLastError();
  const long long pieces = (long long)rows * ((ka + kb) / 8);
  const int threads = 256;
  const long long want = (pieces + threads - 1) / threads;
  const int blocks = (int)(want < 65536 ? want : 65536);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const uint4 *pa = (const uint4*)a, *pb = (const uint4*)b;
  uint4* po = (uint4*)out;
  if (!gelu_b)  // a copy: the element type does not matter
    concat_rows_kernel<__half, false><<<blocks, threads, 0, st>>>(pa, lda, ka, pb, ldb, kb, po, rows);
  else if (dtype == DT_BF16)
    concat_rows_kernel<__nv_bfloat16, true><<<blocks, threads, 0, st>>>(pa, lda, ka, pb, ldb, kb, po, rows);
  else
    concat_rows_kernel<__half, true><<<blocks, threads, 0, st>>>(pa, lda, ka, pb, ldb, kb, po, rows);
  return (int)cudaGetLastError();
}

template <bool RB>
static int launch_ln_modulate(const void* x, long long ldx, const void* shift, const void* scale, long long mod_ld,
                              void* y, int M, int C, int rows, float eps, const float* smooth_rcp, float* rowbase,
                              uint8_t* qact, int Mp, int dtype, cudaStream_t st) {
  if (dtype == DT_BF16)
    ln_modulate_kernel<__nv_bfloat16, RB><<<M, LN_THREADS, 0, st>>>((const __nv_bfloat16*)x, ldx,
        (const __nv_bfloat16*)shift, (const __nv_bfloat16*)scale, mod_ld, (__nv_bfloat16*)y, C, rows, eps, smooth_rcp,
        rowbase, qact, M, Mp);
  else if (dtype == DT_F16)
    ln_modulate_kernel<__half, RB><<<M, LN_THREADS, 0, st>>>((const __half*)x, ldx, (const __half*)shift,
        (const __half*)scale, mod_ld, (__half*)y, C, rows, eps, smooth_rcp, rowbase, qact, M, Mp);
  else
    return ERR_BAD_ARG;
  return (int)cudaGetLastError();
}

// y (M, C) contiguous = LayerNorm(x) (no affine) * (1 + scale[m / rows]) + shift[m / rows]; x rows with element
// stride ldx; shift/scale (B, C) with element row stride mod_ld. C a multiple of 8, at most 4096; 16-byte alignment.
SVDQ_API int svdq_ln_modulate(const void* x, long long ldx, const void* shift, const void* scale, long long mod_ld,
                              void* y, int M, int C, int rows, float eps, int dtype, int device, void* stream) {
  if (M < 1 || C < 8 || C % 8 || C > LN_THREADS * LN_VPT * 8 || rows < 1 || ldx < C || ldx % 8 || mod_ld % 8 ||
      !aligned(x, 16) || !aligned(shift, 16) || !aligned(scale, 16) || !aligned(y, 16))
    return ERR_BAD_ARG;
  if (cudaSetDevice(device) != cudaSuccess) return (int)cudaGetLastError();
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return launch_ln_modulate<false>(x, ldx, shift, scale, mod_ld, y, M, C, rows, eps, nullptr, nullptr, nullptr, M,
                                   dtype, st);
}

// svdq_ln_modulate, and the next linear's row bases (AF_I8_ROW_GIVEN): rowbase (Mp,) fp32, Mp = M rounded up to 4
// (rows M..Mp-1 get 0), from smooth_rcp (C,) fp32 = that linear's 1/lambda; both 16-byte aligned. With qact (M, C)
// (8-byte aligned, C a multiple of 64) also its int8 codes (AF_I8_ROW_CODES); qact null: bases only.
SVDQ_API int svdq_ln_modulate_rowbase(const void* x, long long ldx, const void* shift, const void* scale,
                                      long long mod_ld, void* y, int M, int C, int rows, float eps,
                                      const float* smooth_rcp, float* rowbase, void* qact, int Mp, int dtype,
                                      int device, void* stream) {
  if (M < 1 || C < 8 || C % 8 || C > LN_THREADS * LN_VPT * 8 || rows < 1 || ldx < C || ldx % 8 || mod_ld % 8 ||
      !aligned(x, 16) || !aligned(shift, 16) || !aligned(scale, 16) || !aligned(y, 16) || !aligned(smooth_rcp, 16) ||
      !aligned(rowbase, 16) || Mp < M || Mp - M >= LN_THREADS || (qact && (C % 64 || !aligned(qact, 8))))
    return ERR_BAD_ARG;
  if (cudaSetDevice(device) != cudaSuccess) return (int)cudaGetLastError();
  return launch_ln_modulate<true>(x, ldx, shift, scale, mod_ld, y, M, C, rows, eps, smooth_rcp, rowbase,
                                  (uint8_t*)qact, Mp, dtype, static_cast<cudaStream_t>(stream));
}

// svdq_concat_rows (ka may be 0 here: b alone; ka + kb at most CR_THREADS * CR_PIECES * 8 = 16384), and the next
// linear's row bases and, with qact, codes as svdq_ln_modulate_rowbase's; smooth_rcp has ka + kb entries.
SVDQ_API int svdq_concat_rows_rowbase(const void* a, long long lda, int ka, const void* b, long long ldb, int kb,
                                      int gelu_b, void* out, int rows, const float* smooth_rcp, float* rowbase,
                                      void* qact, int Mp, int dtype, int device, void* stream) {
  if (rows < 1 || ka < 0 || kb < 8 || ka % 8 || kb % 8 || ldb % 8 || ldb < kb || !aligned(b, 16) ||
      (ka > 0 && (lda % 8 || lda < ka || !aligned(a, 16))) || !aligned(out, 16) || !aligned(smooth_rcp, 16) ||
      !aligned(rowbase, 16) || Mp < rows || Mp - rows >= CR_THREADS || (dtype != DT_BF16 && dtype != DT_F16) ||
      ka + kb > CR_THREADS * CR_PIECES * 8 || (qact && ((ka + kb) % 64 || !aligned(qact, 8))))
    return ERR_BAD_ARG;
  if (cudaSetDevice(device) != cudaSuccess) return (int)cudaGetLastError();
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const uint4 *pa = (const uint4*)a, *pb = (const uint4*)b;
  uint4* po = (uint4*)out;
#define CRB(T, G) \
  concat_rows_rowbase_kernel<T, G><<<rows, CR_THREADS, 0, st>>>(pa, lda, ka, pb, ldb, kb, po, smooth_rcp, rowbase, \
                                                                 (uint8_t*)qact, rows, Mp)
  if (dtype == DT_BF16) {
    if (gelu_b) CRB(__nv_bfloat16, true); else CRB(__nv_bfloat16, false);
  } else {
    if (gelu_b) CRB(__half, true); else CRB(__half, false);
  }
#undef CRB
  return (int)cudaGetLastError();
}
