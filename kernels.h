// What the kernels give each other and step.cpp (the fused decoder step).
#pragma once
#include <torch/extension.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

namespace slm {

// The kernels' instruction sets. avx512, avx2 and plain compute in fp32 (exact: the dequantized weights);
// the int16 ones (kernels_int16.cpp) round activations to 16 bits, the int8 ones (kernels_int8.cpp) to 8 bits.
// Which runs is always the caller's choice.
enum class Isa { plain, avx2, avx512, avx2_int16, avx_vnni, avx512_vnni, plain_int8, avx512_int8 };
enum class Family { plain, avx2, avx512 };  // the vector width the other loops (step.cpp) use with it

std::vector<std::string> isas();           // this CPU's, best first ("plain" last: it runs anywhere)
Isa parse_isa(const std::string& name);    // refuses a name this CPU cannot run
Family family(Isa isa);

// One matmul weight W [N, K], in one of four formats:
//   f32  w [N, K]
//   q4   qs [N, K/2] (llama.cpp's Q4_1 nibbles), d and m [N, K/32]: w = d * q + m
//   q8   q [N, K] int8, s [N, groups] (groups 1 or K/32): w = s * q
//   bf16 b [N, K] (the fused step's bf16 models, kernels_bf16.cpp)
// The scales d, m and s are fp16, as GGUF stores them (half of what fp32 scales would add to each weight's bytes).
using half = uint16_t;
struct Panels;
struct Weights {
    const float* w = nullptr;
    const uint8_t* qs = nullptr;
    const int8_t* q = nullptr;
    const half *d = nullptr, *m = nullptr, *s = nullptr;
    const uint16_t* b = nullptr;
    const uint16_t* bp = nullptr;  // b's panels for the AVX-512 kernel (pack_bf16_panels)
    int64_t groups = 0, N = 0, K = 0;
    const Panels* panels = nullptr;  // the int8 kernels' repacked copy, where the caller made one (pack_panels)
};

// Quantized weights repacked for the int8 kernels, 16 outputs a panel, made once by the fused step; per panel
// and group of 32: 32-bit words per output lane (4 for q4's nibbles, 8 for int8), and a scale and an offset
// per lane.
struct Panels {
    std::vector<int32_t> w;
    std::vector<float> scale, offset;
};
Panels pack_panels(const Weights& W);

// fp16 to fp32, exactly, on any CPU (the SIMD paths use F16C's instructions instead).
inline float to_float(half h) {
    const uint32_t sign = uint32_t(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    float value;
    if (exponent == 0) value = std::ldexp(float(mantissa), -24);                      // zero and subnormals
    else if (exponent == 31) value = mantissa ? NAN : INFINITY;
    else value = std::ldexp(float(mantissa | 0x400), int(exponent) - 25);
    uint32_t bits;
    std::memcpy(&bits, &value, 4);
    bits |= sign;
    std::memcpy(&value, &bits, 4);
    return value;
}

// bf16 to fp32 (exact: the upper half of an fp32).
inline float from_bf16(uint16_t h) {
    const uint32_t bits = uint32_t(h) << 16;
    float value;
    std::memcpy(&value, &bits, 4);
    return value;
}

// y[r * ldy + n] = sum_k x[r * K + k] * W[n, k] for r < M and n in [n0, n1), on the calling thread alone:
// callers split the outputs between threads in multiples of 4. tile: scratch of 4 * K floats.
void matmul_slice(const Weights& W, const float* x, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1,
                  Isa isa, float* tile);
// The same for all N outputs, on torch's threads.
void matmul(const Weights& W, const float* x, int64_t M, float* y, int64_t ldy, Isa isa);
// The int16 kernels' slice (kernels_int16.cpp): quantized weights only.
void int16_slice(const Weights& W, const float* x, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1, Isa isa);
// The int8 kernels' slice (kernels_int8.cpp): quantized weights only.
void int8_slice(const Weights& W, const float* x, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1, Isa isa);

// The bf16 kernels (kernels_bf16.cpp): "avx512-bf16" where this CPU has it, and "plain-bf16" anywhere.
std::vector<std::string> bf16_kernels();
std::vector<uint16_t> pack_bf16_panels(const Weights& W);  // W.b, as the AVX-512 kernel reads it (W.bp)
// x is rounded to bf16 into xb (scratch) first; the AVX-512 kernel reads W.bp, in whole panels from n0.
void bf16_slice(const Weights& W, const float* x, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1,
                const std::string& kernel, std::vector<uint16_t>& xb);
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w, const std::string& kernel);

}  // namespace slm
