// What the kernels give each other and step.cpp (the fused decoder step).
#pragma once
#include <torch/extension.h>

#include <string>
#include <vector>

namespace slm {

// The kernels' instruction sets. avx512, avx2 and plain compute in fp32 (exact: the dequantized weights);
// the int16 ones (kernels_int16.cpp) round activations to 16 bits. Which runs is always the caller's choice.
enum class Isa { plain, avx2, avx512, avx2_int16, avx_vnni, avx512_vnni };
enum class Family { plain, avx2, avx512 };  // the vector width the other loops (step.cpp) use with it

std::vector<std::string> isas();           // this CPU's, best first ("plain" last: it runs anywhere)
Isa parse_isa(const std::string& name);    // refuses a name this CPU cannot run
Family family(Isa isa);

// y[r * ldy + n] = sum_k x[r * K + k] * W[n, k] for r < M, n < N: W the dequantized weights.
// q4: qs [N, K/2] (llama.cpp's Q4_1 nibbles), d and m [N, K/32]. q8: q [N, K] int8, s [N, groups] (groups 1 or K/32).
void q4_matmul(const float* x, int64_t M, int64_t K, const uint8_t* qs, const float* d, const float* m, int64_t N,
               float* y, int64_t ldy, Isa isa);
void q8_matmul(const float* x, int64_t M, int64_t K, const int8_t* q, const float* s, int64_t groups, int64_t N,
               float* y, int64_t ldy, Isa isa);
void q4_matmul_int16(const float* x, int64_t M, int64_t K, const uint8_t* qs, const float* d, const float* m,
                     int64_t N, float* y, int64_t ldy, Isa isa);
void q8_matmul_int16(const float* x, int64_t M, int64_t K, const int8_t* q, const float* s, int64_t groups,
                     int64_t N, float* y, int64_t ldy, Isa isa);

}  // namespace slm
