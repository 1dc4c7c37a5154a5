// What kernels.cpp (the quantized matmuls) gives step.cpp (the fused decoder step).
#pragma once
#include <torch/extension.h>

#include <string>
#include <vector>

namespace slm {

// The instruction sets a kernel can run with, worst first. Which one runs is always the caller's explicit choice.
enum class Isa { plain, avx2, avxvnni, avx512 };

std::vector<std::string> isas();           // this CPU's, best first ("plain" last: it runs anywhere)
Isa parse_isa(const std::string& name);    // refuses a name this CPU cannot run

// y[r * ldy + n] = sum_k x[r * K + k] * W[n, k] for r < M, n < N: W the dequantized weights.
// q4: qs [N, K/2] (llama.cpp's Q4_1 nibbles), d and m [N, K/32]. q8: q [N, K] int8, s [N, groups] (groups 1 or K/32).
void q4_matmul(const float* x, int64_t M, int64_t K, const uint8_t* qs, const float* d, const float* m, int64_t N,
               float* y, int64_t ldy, Isa isa);
void q8_matmul(const float* x, int64_t M, int64_t K, const int8_t* q, const float* s, int64_t groups, int64_t N,
               float* y, int64_t ldy, Isa isa);

}  // namespace slm
