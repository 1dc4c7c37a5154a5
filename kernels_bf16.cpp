// bf16 weights for the fused step (--dtype bf16): y = x @ W.T with W in bf16 and x rounded to bf16 (to nearest,
// ties to even), the products summed in fp32: what oneDNN's bf16 GEMMs and OpenVINO's bf16 inference compute.
// AVX-512 BF16's vdpbf16ps adds 32 products an instruction, twice an fp32 FMA's 16, and the weights stream at
// 2 bytes each, as the model holds them: no copy, no repacking (64 bytes of a row are 32 consecutive weights).
// plain-bf16 is the same arithmetic in plain loops on any CPU: the reference the AVX-512 kernel is tested
// against, not a fast path.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>

namespace slm {
namespace {

// fp32 to bf16, to nearest with ties to even (finite values: activations).
inline uint16_t to_bf16(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    return uint16_t((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

// Products of two bf16 numbers are exact in fp32 (8-bit significands), so only the order of summation differs
// from the AVX-512 kernel.
void rows_plain(const uint16_t* w, const uint16_t* x, int64_t M, int64_t K, float* y, int64_t ldy, int64_t n0,
                int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
        for (int64_t r = 0; r < M; ++r) {
            float acc = 0.f;
            for (int64_t k = 0; k < K; ++k) acc += from_bf16(w[n * K + k]) * from_bf16(x[r * K + k]);
            y[r * ldy + n] = acc;
        }
}

#define SLM_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

SLM_BF16 void to_bf16_avx512(const float* x, int64_t n, uint16_t* out) {  // n: a multiple of 32
    for (int64_t i = 0; i < n; i += 32) {
        const __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
        _mm512_storeu_si512(out + i, reinterpret_cast<const __m512i&>(pair));
    }
}

// NB outputs (from n) times RB rows, each pair in its own 16-lane sum over K, added across its lanes at the end.
template <int NB, int RB>
SLM_BF16 void block(const uint16_t* w, const uint16_t* x, int64_t K, float* y, int64_t ldy, int64_t n) {
    __m512 acc[NB][RB];
    for (int i = 0; i < NB; ++i)
        for (int j = 0; j < RB; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __m512bh wv[NB];
        for (int i = 0; i < NB; ++i) wv[i] = (__m512bh)_mm512_loadu_si512(w + (n + i) * K + k);
        for (int j = 0; j < RB; ++j) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + j * K + k);
            for (int i = 0; i < NB; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv[i], xv);
        }
    }
    for (int i = 0; i < NB; ++i)
        for (int j = 0; j < RB; ++j) y[j * ldy + n + i] = _mm512_reduce_add_ps(acc[i][j]);
}

SLM_BF16 void rows_avx512(const uint16_t* w, const uint16_t* x, int64_t M, int64_t K, float* y, int64_t ldy,
                          int64_t n) {
    int64_t r = 0;  // six rows at a time: 24 sums, 4 weight vectors and a row's vector fill the 32 registers
    for (; r + 6 <= M; r += 6) block<4, 6>(w, x + r * K, K, y + r * ldy, ldy, n);
    switch (M - r) {
        case 5: return block<4, 5>(w, x + r * K, K, y + r * ldy, ldy, n);
        case 4: return block<4, 4>(w, x + r * K, K, y + r * ldy, ldy, n);
        case 3: return block<4, 3>(w, x + r * K, K, y + r * ldy, ldy, n);
        case 2: return block<4, 2>(w, x + r * K, K, y + r * ldy, ldy, n);
        case 1: return block<4, 1>(w, x + r * K, K, y + r * ldy, ldy, n);
        default: return;
    }
}

}  // namespace

bool cpu_has_avx512_bf16() {
    static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
    return has;
}

std::vector<std::string> bf16_kernels() {
    if (cpu_has_avx512_bf16()) return {"avx512-bf16", "plain-bf16"};
    return {"plain-bf16"};
}

void bf16_slice(const Weights& W, const float* x, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1,
                const std::string& kernel, std::vector<uint16_t>& xb) {
    const int64_t K = W.K;
    TORCH_CHECK(K % 32 == 0, "bf16 weights need a multiple of 32 inputs, not ", K);
    const bool simd = kernel == "avx512-bf16";
    TORCH_CHECK(simd || kernel == "plain-bf16", "unknown bf16 kernel '", kernel, "'");
    TORCH_CHECK(!simd || cpu_has_avx512_bf16(), "this CPU cannot run the 'avx512-bf16' kernel");
    if (n1 <= n0) return;
    xb.resize(M * K);
    if (!simd) {
        for (int64_t i = 0; i < M * K; ++i) xb[i] = to_bf16(x[i]);
        return rows_plain(W.b, xb.data(), M, K, y, ldy, n0, n1);
    }
    to_bf16_avx512(x, M * K, xb.data());
    int64_t n = n0;
    if (M <= 2)  // eight outputs at a time: enough sums in flight to cover the instruction's latency
        for (; n + 8 <= n1; n += 8)
            M == 1 ? block<8, 1>(W.b, xb.data(), K, y, ldy, n) : block<8, 2>(W.b, xb.data(), K, y, ldy, n);
    for (; n + 4 <= n1; n += 4) rows_avx512(W.b, xb.data(), M, K, y, ldy, n);
    for (; n < n1; ++n)  // the last few outputs, one at a time, every row
        for (int64_t r = 0; r < M; ++r) block<1, 1>(W.b, xb.data() + r * K, K, y + r * ldy, ldy, n);
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w, const std::string& kernel) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 (M, K)");
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.size(1) == x.size(1),
                "w must be contiguous bf16 (N, K)");
    Weights W;
    W.b = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), W.N = w.size(0), W.K = w.size(1);
    at::Tensor y = at::empty({x.size(0), W.N}, x.options());
    at::parallel_for(0, (W.N + 15) / 16, 1, [&](int64_t b0, int64_t b1) {
        std::vector<uint16_t> xb;
        bf16_slice(W, x.data_ptr<float>(), x.size(0), y.data_ptr<float>(), W.N, b0 * 16, std::min(W.N, b1 * 16),
                   kernel, xb);
    });
    return y;
}

}  // namespace slm
