// W4A16 GEMV for the layers that keep 16-bit activations (docs/FORMAT.md §1: FLUX's modulation linears, the
// imported Nunchaku AWQ ones), behind the same C ABI as svdq.cu. kernels/reference.py svdquant_linear_act16 is
// the reference.
//
//   Y[m, n] = Σ_g step[n, g] · Σ_{k∈g} (x[m, k] · smooth_rcp[k]) · code[n, k]  +  Σ_r lora[m, r] · up[n, r]  +  bias[n]
//
// These layers read one vector per image (M = batch), so their cost is reading the weight: this kernel reads the
// packed codes (0.5 byte per weight) once, where a 16-bit weight made per call (or kept resident) costs 2 bytes
// read plus, when made per call, its unpacking passes (+27 ms per FLUX step measured on the H200, docs/E2E.md).
//
// Work split: a block owns GV_ROWS output rows and one tile of up to MT activation rows; its threads stride over
// the row's 32-code chunks (16 bytes of packed codes, half a group of 64), so a warp reads 512 contiguous bytes
// of each row. X·(1/λ) is re-read per block from L1/L2 (a few KB; the weight is the traffic). Each chunk's dot
// product is summed in fp32 and scaled by its group's step; the per-thread sums are reduced over the warp, then
// over the block's warps in a fixed order (bitwise reproducible), and the block's first threads add the low-rank
// term and the bias and store.
//
// Layouts: x (M, K) and lora (M, r) and up (N, r) in the compute dtype; qweight (N, K/2) packed, low nibble =
// even column; steps fp32 (N, K/64) (float scales, transposed at prepare), or mult uint8 (N, K/64) with base
// fp32 (N,) (int_ratio: step = base[n]·mult[n, g]); smooth_rcp fp32 (K,); bias fp32 (N,) or null.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "svdq_abi.h"

namespace {

constexpr int GV_ROWS = 8;          // output rows per block
constexpr int GV_MAX_THREADS = 256;
constexpr int GV_CHUNK = 32;         // codes per thread step: 16 bytes of a packed row
constexpr int GV_GROUP = 64;

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

// Signed 4-bit code j of a packed word, as a float, without an int->float conversion instruction: the nibble
// flipped to offset binary (code + 8) is OR-ed into the mantissa of 2^23 and 2^23 + 8 subtracted (exact).
__device__ __forceinline__ float code_at(uint32_t offset_word, int j) {
  return __uint_as_float(0x4B000000u | ((offset_word >> (4 * j)) & 0xFu)) - 8388616.0f;
}

// 16 smoothed activations x[m, k0 .. k0+15] · smooth_rcp as fp32.
template <typename T>
__device__ __forceinline__ void load_xs16(const T* __restrict__ xrow, const float* __restrict__ srcp, int k0,
                                          float (&xs)[16]) {
  const uint4* xv = reinterpret_cast<const uint4*>(xrow + k0);  // 2 x 8 halves
  const float4* sv = reinterpret_cast<const float4*>(srcp + k0);
#pragma unroll
  for (int v = 0; v < 2; ++v) {
    const uint4 raw = __ldg(xv + v);
    const T* h = reinterpret_cast<const T*>(&raw);
    const float4 s0 = __ldg(sv + 2 * v), s1 = __ldg(sv + 2 * v + 1);
    const float s[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) xs[8 * v + i] = to_f(h[i]) * s[i];
  }
}

template <typename T, int MT>
__global__ void __launch_bounds__(GV_MAX_THREADS) w4a16_gemv_kernel(
    const T* __restrict__ x, const float* __restrict__ smooth_rcp, const uint8_t* __restrict__ qweight,
    const float* __restrict__ steps, const uint8_t* __restrict__ mult, const float* __restrict__ base,
    const T* __restrict__ lora, const T* __restrict__ up, const float* __restrict__ bias, T* __restrict__ y, int M,
    int N, int K, int r) {
  __shared__ float red[GV_MAX_THREADS / 32][GV_ROWS * MT];
  const int n0 = blockIdx.x * GV_ROWS;
  const int m0 = blockIdx.y * MT;
  const int chunks = K / GV_CHUNK;
  const int groups = K / GV_GROUP;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float acc[GV_ROWS][MT];
#pragma unroll
  for (int i = 0; i < GV_ROWS; ++i)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[i][m] = 0.f;

  for (int c = tid; c < chunks; c += blockDim.x) {
    const int g = c / 2;
    uint4 w[GV_ROWS];  // all rows' 16 bytes first: GV_ROWS loads in flight per thread
    float st[GV_ROWS];
#pragma unroll
    for (int i = 0; i < GV_ROWS; ++i) {
      const int n = min(n0 + i, N - 1);  // rows past N compute a duplicate that is never stored
      w[i] = __ldg(reinterpret_cast<const uint4*>(qweight + (size_t)n * (K / 2)) + c);
      st[i] = steps ? __ldg(steps + (size_t)n * groups + g) : __ldg(base + n) * (float)__ldg(mult + (size_t)n * groups + g);
    }
    float part[GV_ROWS][MT];
#pragma unroll
    for (int i = 0; i < GV_ROWS; ++i)
#pragma unroll
      for (int m = 0; m < MT; ++m) part[i][m] = 0.f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // two halves of 16 codes: 16·MT activation registers instead of 32·MT
      float xs[MT][16];
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m0 + m < M) {
          load_xs16(x + (size_t)(m0 + m) * K, smooth_rcp, c * GV_CHUNK + 16 * h, xs[m]);
        } else {
#pragma unroll
          for (int j = 0; j < 16; ++j) xs[m][j] = 0.f;
        }
      }
#pragma unroll
      for (int i = 0; i < GV_ROWS; ++i) {
        const uint32_t words[2] = {h ? w[i].z : w[i].x, h ? w[i].w : w[i].y};
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const uint32_t ow = words[q] ^ 0x88888888u;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const float cf = code_at(ow, j);
#pragma unroll
            for (int m = 0; m < MT; ++m) part[i][m] = fmaf(xs[m][8 * q + j], cf, part[i][m]);
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < GV_ROWS; ++i)
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[i][m] = fmaf(part[i][m], st[i], acc[i][m]);
  }

#pragma unroll
  for (int i = 0; i < GV_ROWS; ++i)
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      float v = acc[i][m];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) red[warp][i * MT + m] = v;
    }
  __syncthreads();
  const int nwarps = blockDim.x >> 5;
  for (int e = tid; e < GV_ROWS * MT; e += blockDim.x) {
    const int i = e / MT, m = e % MT, n = n0 + i, row = m0 + m;
    if (n >= N || row >= M) continue;
    float v = 0.f;
    for (int wi = 0; wi < nwarps; ++wi) v += red[wi][e];
    if (r) {
      const T* lr = lora + (size_t)row * r;
      const T* ur = up + (size_t)n * r;
      float lo = 0.f;
      for (int j = 0; j < r; ++j) lo = fmaf(to_f(__ldg(lr + j)), to_f(__ldg(ur + j)), lo);
      v += lo;
    }
    if (bias) v += __ldg(bias + n);
    y[(size_t)row * N + n] = from_f<T>(v);
  }
}

template <typename T, int MT>
int launch(const void* x, const float* smooth_rcp, const uint8_t* qweight, const float* steps, const uint8_t* mult,
           const float* base, const void* lora, const void* up, const float* bias, void* y, int M, int N, int K, int r,
           cudaStream_t stream) {
  const int chunks = K / GV_CHUNK;
  const int passes = (chunks + GV_MAX_THREADS - 1) / GV_MAX_THREADS;       // chunks per thread
  const int threads = ((chunks + passes - 1) / passes + 31) / 32 * 32;      // balanced, whole warps
  const dim3 grid((N + GV_ROWS - 1) / GV_ROWS, (M + MT - 1) / MT);
  if (grid.y > 65535) return ERR_BAD_ARG;
  w4a16_gemv_kernel<T, MT><<<grid, threads, 0, stream>>>(
      static_cast<const T*>(x), smooth_rcp, qweight, steps, mult, base, static_cast<const T*>(lora),
      static_cast<const T*>(up), bias, static_cast<T*>(y), M, N, K, r);
  return (int)cudaGetLastError();
}

template <typename T>
int dispatch_m(const void* x, const float* smooth_rcp, const uint8_t* qweight, const float* steps, const uint8_t* mult,
               const float* base, const void* lora, const void* up, const float* bias, void* y, int M, int N, int K,
               int r, cudaStream_t stream) {
  // the M tile sets the activation registers (16·MT): batch 1 and 2 run without padding rows
  if (M == 1) return launch<T, 1>(x, smooth_rcp, qweight, steps, mult, base, lora, up, bias, y, M, N, K, r, stream);
  if (M == 2) return launch<T, 2>(x, smooth_rcp, qweight, steps, mult, base, lora, up, bias, y, M, N, K, r, stream);
  return launch<T, 4>(x, smooth_rcp, qweight, steps, mult, base, lora, up, bias, y, M, N, K, r, stream);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

// dtype: 0 fp16, 1 bf16 (svdq.cu DT_*). Exactly one of steps / (mult and base) is given; lora and up both or
// neither (r = 0). x, qweight and smooth_rcp 16-byte aligned; K a multiple of 64.
SVDQ_API int svdq_w4a16_gemv(const void* x, const float* smooth_rcp, const void* qweight, const float* steps,
                             const void* mult, const float* base, const void* lora, const void* up, const float* bias,
                             void* y, int M, int N, int K, int r, int dtype, void* stream) {
  if (M < 1 || N < 1 || K < GV_GROUP || K % GV_GROUP || r < 0 || !x || !smooth_rcp || !qweight || !y) return ERR_BAD_ARG;
  if (!steps == !(mult && base) || (r > 0 && (!lora || !up))) return ERR_BAD_ARG;
  if (!aligned16(x) || !aligned16(qweight) || !aligned16(smooth_rcp)) return ERR_BAD_ARG;
  const auto* qw = static_cast<const uint8_t*>(qweight);
  const auto* mu = static_cast<const uint8_t*>(mult);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype == 1) return dispatch_m<__nv_bfloat16>(x, smooth_rcp, qw, steps, mu, base, lora, up, bias, y, M, N, K, r, s);
  if (dtype == 0) return dispatch_m<__half>(x, smooth_rcp, qw, steps, mu, base, lora, up, bias, y, M, N, K, r, s);
  return ERR_BAD_ARG;
}
