"""kernels/csrc/tma_cache.h, the per-thread cache of encoded TMA descriptors, compiled by the system C++ compiler
around a stand-in encoder (the real one needs the CUDA driver): a repeated key is served without encoding and with
the same bytes, any changed input misses, a colliding key replaces its slot, a failed encode is not kept."""
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

HARNESS = r"""
#include <stdio.h>
#include "tma_cache.h"
struct Map { unsigned char bytes[128]; };
static int encodes = 0;
static bool fail_next = false;
static bool encode(const TmaKey& k, Map* m) {  // a descriptor that depends on every input
  ++encodes;
  if (fail_next) { fail_next = false; return false; }
  memset(m, 0, sizeof *m);
  memcpy(m->bytes, &k, sizeof k);
  m->bytes[100] = (unsigned char)encodes;  // which encode made it
  return true;
}
#define CHECK(c) do { if (!(c)) { printf("FAILED line %d: %s\n", __LINE__, #c); return 1; } } while (0)
int main() {
  static TmaCache<Map, 8> cache;
  Map a, b;
  TmaKey k{0x7f0000001000ull, 640, 8192, 640, 128, 128, 0, 3};
  CHECK(cache.get(k, &a, encode) && encodes == 1);
  CHECK(cache.get(k, &b, encode) && encodes == 1 && memcmp(&a, &b, sizeof a) == 0);  // a hit: same bytes
  TmaKey fields[8] = {k, k, k, k, k, k, k, k};
  fields[0].base += 256; fields[1].inner += 64; fields[2].outer += 1; fields[3].pitch += 64;
  fields[4].box_inner = 64; fields[5].box_outer = 192; fields[6].dtype = 7; fields[7].swizzle = 0;
  for (int i = 0; i < 8; ++i) {  // any changed input is another descriptor
    int before = encodes;
    CHECK(cache.get(fields[i], &b, encode) && encodes == before + 1);
    CHECK(memcmp(b.bytes, &fields[i], sizeof(TmaKey)) == 0);
  }
  // 8 slots: among many keys some collide and replace; every get still returns the key's own descriptor
  for (int i = 0; i < 64; ++i) {
    TmaKey q = k; q.outer = 1000 + i;
    CHECK(cache.get(q, &b, encode) && memcmp(b.bytes, &q, sizeof q) == 0);
  }
  TmaKey f = k; f.outer = 5;
  fail_next = true;
  CHECK(!cache.get(f, &b, encode));          // a failed encode
  int before = encodes;
  CHECK(cache.get(f, &b, encode) && encodes == before + 1);  // was not kept: encoded again
  printf("ok %d\n", encodes);
  return 0;
}
"""


def test_tma_cache(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    (tmp_path / "t.cpp").write_text(HARNESS)
    exe = tmp_path / "t"
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{ROOT / 'kernels' / 'csrc'}", "-o", str(exe),
                    str(tmp_path / "t.cpp")], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout + out.stderr
