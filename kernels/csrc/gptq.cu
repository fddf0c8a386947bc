// GPTQ's sequential column loop for one block of B <= 128 columns, behind the same C ABI as svdq.cu.
//
// core/gptq.py is the reference: columns in order, each weight rounded on its fixed step, the rounding
// error scaled by 1/diag(H⁻¹ block) and pushed onto the block's later columns through the upper Cholesky
// factor of H⁻¹. Output channels (rows of the weight) never interact inside a block, so one thread runs
// the whole recurrence for one channel: column j's value is w[j] − Σ_{i<j} hb[i][j]·e[i] (the same terms,
// subtracted in the same order, as the reference's updates after each column), with the channel's errors
// kept in shared memory. The block then costs O(B²) FMAs per channel in one launch instead of ~8 launches
// per column from Python; the update of the columns after the block stays one GEMM in torch.
//
// Layouts (all fp32, row-major, column j of the weight = row j here, as core/gptq.py's working copy):
//   w (B, N) the block's weights as updated by earlier blocks; st (B, N) steps (0 = dead group: code 0);
//   hb (B, ldh) the H⁻¹ Cholesky block (row i, column j at hb[i * ldh + j]); q (B, N) codes out, as floats;
//   err (B, N) scaled errors out.
#include <cuda_runtime.h>
#include <stdint.h>

#include "svdq_abi.h"

static constexpr int GPTQ_MAX_B = 128;
static constexpr int GPTQ_THREADS = 64;

__global__ void __launch_bounds__(GPTQ_THREADS) gptq_block_kernel(const float* __restrict__ w,
                                                                 const float* __restrict__ st,
                                                                 const float* __restrict__ hb, int ldh,
                                                                 float* __restrict__ q, float* __restrict__ err,
                                                                 int B, int N, float qmax) {
  __shared__ float e_s[GPTQ_MAX_B][GPTQ_THREADS];  // this thread's errors of the block's earlier columns
  const int t = threadIdx.x;
  const int n = blockIdx.x * GPTQ_THREADS + t;
  if (n >= N) return;  // each thread reads only its own e_s column: no barrier needed
  for (int j = 0; j < B; ++j) {
    float acc = w[(size_t)j * N + n];
    for (int i = 0; i < j; ++i) acc = __fsub_rn(acc, __fmul_rn(__ldg(hb + (size_t)i * ldh + j), e_s[i][t]));
    const float s = st[(size_t)j * N + n];
    // torch.round is round-half-even, as rintf; IEEE division as the reference's w / step
    const float code = s > 0.f ? fminf(fmaxf(rintf(__fdiv_rn(acc, s)), -qmax), qmax) : 0.f;
    const float e = __fmul_rn(__fsub_rn(acc, __fmul_rn(code, s)), __fdiv_rn(1.0f, __ldg(hb + (size_t)j * ldh + j)));
    e_s[j][t] = e;
    q[(size_t)j * N + n] = code;
    err[(size_t)j * N + n] = e;
  }
}

SVDQ_API int svdq_gptq_block(const float* w, const float* st, const float* hb, int ldh, float* q, float* err, int B,
                             int N, float qmax, void* stream) {
  if (B < 1 || B > GPTQ_MAX_B || N < 1 || ldh < B || !w || !st || !hb || !q || !err) return ERR_BAD_ARG;
  const int blocks = (N + GPTQ_THREADS - 1) / GPTQ_THREADS;
  gptq_block_kernel<<<blocks, GPTQ_THREADS, 0, (cudaStream_t)stream>>>(w, st, hb, ldh, q, err, B, N, qmax);
  return (int)cudaGetLastError();
}
