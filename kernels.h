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

// One matmul weight W [N, K], in one of three formats:
//   f32  w [N, K]
//   q4   qs [N, K/2] (llama.cpp's Q4_1 nibbles), d and m [N, K/32]: w = d * q + m
//   q8   q [N, K] int8, s [N, groups] (groups 1 or K/32): w = s * q
struct Weights {
    const float* w = nullptr;
    const uint8_t* qs = nullptr;
    const int8_t* q = nullptr;
    const float *d = nullptr, *m = nullptr, *s = nullptr;
    int64_t groups = 0, N = 0, K = 0;
};

// y[r * ldy + n] = sum_k x[r * K + k] * W[n, k] for r < M and n in [n0, n1), on the calling thread alone:
// callers split the outputs between threads in multiples of 4. tile: scratch of 4 * K floats.
void matmul_slice(const Weights& W, const float* x, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1,
                  Isa isa, float* tile);
// The same for all N outputs, on torch's threads.
void matmul(const Weights& W, const float* x, int64_t M, float* y, int64_t ldy, Isa isa);
// The int16 kernels' slice (kernels_int16.cpp): quantized weights only.
void int16_slice(const Weights& W, const float* x, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1, Isa isa);

}  // namespace slm
