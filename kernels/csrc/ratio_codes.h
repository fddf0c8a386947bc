// The int_ratio activation codes' arithmetic, shared by kernel 1b (svdq.cu) and the ops that produce a row-base
// linear's input (flux_ops.cu): both must make bit for bit the same bases, multipliers and code bytes, so each
// operation sequence lives here once. The reference (kernels/reference.py quantize_groups_ratio) is the oracle.
#pragma once
#include <stdint.h>

#include "half_pair.h"

static constexpr float RATIO_FLT_MIN_NORMAL = 1.17549435e-38f;
static constexpr float RATIO_MAGIC = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer, half to even

// x * (1/lambda) for 8 columns (16 bytes) of one row: 1/lambda is prepared once per layer, at most 1 ulp from x / lambda
template <typename T>
__device__ __forceinline__ void smooth8(const uint4& raw, const float (&lam)[8], float (&v)[8]) {
  const uint32_t* u = reinterpret_cast<const uint32_t*>(&raw);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float2 f = Pack2<T>::to_f2(u[j]);
    v[2 * j] = f.x * lam[2 * j];
    v[2 * j + 1] = f.y * lam[2 * j + 1];
  }
}

// max of a and |v| over 8 values (max is exact: any order gives the same float)
__device__ __forceinline__ float absmax8(const float (&v)[8], float a = 0.f) {
#pragma unroll
  for (int e = 0; e < 8; ++e) a = fmaxf(a, fabsf(v[e]));
  return a;
}

// the max over the 8 lanes that differ in lane bits 0-2 (the lanes holding one row's 64-column group); every lane
// of the warp must call it
__device__ __forceinline__ float lanes8_max(float a) {
  a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, 1));
  a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, 2));
  return fmaxf(a, __shfl_xor_sync(0xffffffffu, a, 4));
}

// smooth8 with 1/lambda read from global memory (16-byte aligned): 8 columns of one row, x * (1/lambda)
template <typename T>
__device__ __forceinline__ void smooth8_ldg(const uint4& raw, const float* __restrict__ smooth_rcp, float (&v)[8]) {
  const float4 l0 = __ldg(reinterpret_cast<const float4*>(smooth_rcp));
  const float4 l1 = __ldg(reinterpret_cast<const float4*>(smooth_rcp + 4));
  const float lam[8] = {l0.x, l0.y, l0.z, l0.w, l1.x, l1.y, l1.z, l1.w};
  smooth8<T>(raw, lam, v);
}

// A row's or chunk's base from its absmax of smoothed values: the reference's fp32 multiply by fp32(1/126)
__device__ __forceinline__ float ratio_base(float amax) { return amax * (1.0f / 126.0f); }

// A group's multiplier from its absmax and its base: clamp(ceil(amax / (7 base)), 1, 18) by IEEE division (the
// reference's op sequence); 1 for a zero base
__device__ __forceinline__ float ratio_mult(float amax, float base) {
  const float unit = base * 7.0f;
  return unit > 0.f ? fminf(fmaxf(ceilf(__fdiv_rn(amax, unit)), 1.f), 18.f) : 1.f;
}

// 1 / step as kernels 1 and 1b take it. Steps below the smallest normal float get step 1: rcp.approx.ftz would flush
// them to 0 and return inf (their values are below ~1e-36, so their codes are 0 either way).
__device__ __forceinline__ float ratio_step_rcp(float step) {
  float inv;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(inv) : "f"(step >= RATIO_FLT_MIN_NORMAL ? step : 1.0f));
  return inv;
}

// 8 smoothed values -> 8 int8 bytes code x f (f the group's integer multiplier, inv its step's reciprocal).
// The bits of round(v / step) + 1.5*2^23 times f hold code x f in their low byte (the constant's is 0): one IMAD where
// a clamp, an FADD and an FFMA were. No clamp: the multiplier makes |v / step| <= 7 up to a few ulps for finite inputs
// (ceil(amax / 7 base), and at its cap 18 amax <= 126 base), so round() <= 7.
__device__ __forceinline__ uint2 ratio_codes8(const float (&v)[8], float inv, uint32_t f) {
  uint32_t w[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) w[e] = __float_as_uint(__fadd_rn(__fmul_rn(v[e], inv), RATIO_MAGIC)) * f;
  // low bytes of w[0..3] / w[4..7] -> one word each (3 PRMT per 4 codes)
  const uint32_t lo = __byte_perm(__byte_perm(w[0], w[1], 0x0040), __byte_perm(w[2], w[3], 0x0040), 0x5410);
  const uint32_t hi = __byte_perm(__byte_perm(w[4], w[5], 0x0040), __byte_perm(w[6], w[7], 0x0040), 0x5410);
  return make_uint2(lo, hi);
}
