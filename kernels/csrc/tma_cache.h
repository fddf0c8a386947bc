// A per-thread cache of encoded TMA descriptors (CUtensorMap), keyed by every input of the encode call.
// Every Hopper GEMM launch needs 4-5 descriptors; most of them (the weights, and the activations in the buffer
// kernels/ops.py keeps per stream) are the same from one call of a layer to the next, and a descriptor is a pure
// function of its inputs, so a hit is exactly what encoding would give. Direct-mapped; a colliding key replaces
// the slot; a failed encode is not kept. Header-only and CUDA-free so that tests/test_tma_cache.py compiles it
// with the system C++ compiler around a stand-in encoder.
#pragma once

#include <stdint.h>
#include <string.h>

struct TmaKey {  // 48 bytes, no padding: compared with memcmp
  uint64_t base, inner, outer, pitch;
  uint32_t box_inner, box_outer;
  int32_t dtype, swizzle;
};
static_assert(sizeof(TmaKey) == 48, "TmaKey must have no padding");

template <typename Map, int SLOTS = 1024>
struct TmaCache {
  struct Slot {
    Map map;
    TmaKey key;
    bool used;
  };
  Slot slots[SLOTS] = {};

  static uint64_t hash(const TmaKey& k) {
    uint64_t h = k.base * 0x9E3779B97F4A7C15ull;
    const uint64_t parts[] = {k.inner, k.outer, k.pitch, ((uint64_t)k.box_inner << 32) | k.box_outer,
                              ((uint64_t)(uint32_t)k.dtype << 32) | (uint32_t)k.swizzle};
    for (uint64_t p : parts) h = (h ^ p) * 0xBF58476D1CE4E5B9ull + (h >> 29);
    return h ^ (h >> 32);
  }

  // The map for k: the kept one, or encode(k, out) (kept only when it succeeds). Returns encode's success.
  template <typename Encode>
  bool get(const TmaKey& k, Map* out, Encode encode) {
    Slot& s = slots[hash(k) % SLOTS];
    if (s.used && memcmp(&s.key, &k, sizeof(TmaKey)) == 0) {
      *out = s.map;
      return true;
    }
    if (!encode(k, out)) return false;
    s.map = *out;
    s.key = k;
    s.used = true;
    return true;
  }
};
