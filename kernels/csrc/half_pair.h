// 16-bit element types (bf16 / fp16) <-> fp32, shared by the kernel sources. Pair16<T>: the element type's pair
// type and its two conversions; Pack2<T>: the same on the raw 32 bits the kernels load and store.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

template <typename T> struct Pair16;
template <> struct Pair16<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static __device__ __forceinline__ float2 to_float2(T2 v) { return __bfloat1622float2(v); }
  static __device__ __forceinline__ T2 from_floats(float a, float b) { return __floats2bfloat162_rn(a, b); }
};
template <> struct Pair16<__half> {
  using T2 = __half2;
  static __device__ __forceinline__ float2 to_float2(T2 v) { return __half22float2(v); }
  static __device__ __forceinline__ T2 from_floats(float a, float b) { return __floats2half2_rn(a, b); }
};
template <typename T> struct Pack2 {
  using T2 = typename Pair16<T>::T2;
  static __device__ __forceinline__ float2 to_f2(uint32_t u) { return Pair16<T>::to_float2(*reinterpret_cast<T2*>(&u)); }
  static __device__ __forceinline__ uint32_t from_f2(float a, float b) {
    T2 v = Pair16<T>::from_floats(a, b);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};
