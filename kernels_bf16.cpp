// bf16 weights for the fused step (--dtype bf16): y = x @ W.T with W in bf16 and x rounded to bf16 (to nearest,
// ties to even), the products summed in fp32: what oneDNN's bf16 GEMMs and OpenVINO's bf16 inference compute.
// AVX-512 BF16's vdpbf16ps adds 32 products an instruction, twice an fp32 FMA's 16, and the weights stream at
// 2 bytes each, from a copy in panels made once (pack_bf16_panels): 2 to 3.5 times the speed of the same
// instruction on the model's own rows, which must add each output's 16 lanes at the end (AMD EPYC, 1 to 32 rows).
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

// The panel layout: 16 outputs by 2 inputs a 64-byte vector, [N/16][K/2][16][2], the last panel padded with
// zeros. vdpbf16ps then adds a pair of inputs (broadcast) times a pair of each of 16 outputs' weights into
// those outputs' own lanes: no sums across lanes, and 16 finished outputs a store.
template <int NB, int RB>
SLM_BF16 void tile(const uint16_t* panels, const uint16_t* x, int64_t K, float* y, int64_t ldy, int64_t n,
                   int64_t n1) {
    __m512 acc[RB][NB];
    for (int j = 0; j < RB; ++j)
        for (int i = 0; i < NB; ++i) acc[j][i] = _mm512_setzero_ps();
    const uint16_t* w = panels + n * K;  // panel n / 16 (16 K values each)
    for (int64_t k = 0; k < K; k += 2) {
        __m512bh wv[NB];
        for (int i = 0; i < NB; ++i) wv[i] = (__m512bh)_mm512_loadu_si512(w + i * 16 * K + k * 16);
        for (int j = 0; j < RB; ++j) {
            uint32_t pair;
            std::memcpy(&pair, x + j * K + k, 4);
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(int(pair));
            for (int i = 0; i < NB; ++i) acc[j][i] = _mm512_dpbf16_ps(acc[j][i], wv[i], xv);
        }
    }
    for (int i = 0; i < NB; ++i) {
        const int64_t col = n + 16 * i, left = std::min<int64_t>(16, n1 - col);
        const __mmask16 lanes = left == 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
        for (int j = 0; j < RB; ++j) _mm512_mask_storeu_ps(y + j * ldy + col, lanes, acc[j][i]);
    }
}

// NB panels from output n, every row: RB rows at a time (as many sums as the registers hold), then the rest.
template <int NB>
SLM_BF16 void panel_rows(const uint16_t* panels, const uint16_t* x, int64_t M, int64_t K, float* y, int64_t ldy,
                         int64_t n, int64_t n1) {
    constexpr int RB = NB >= 8 ? 2 : 6;
    int64_t r = 0;
    for (; r + RB <= M; r += RB) tile<NB, RB>(panels, x + r * K, K, y + r * ldy, ldy, n, n1);
    const uint16_t* xr = x + r * K;
    float* yr = y + r * ldy;
    if constexpr (RB == 6) {
        switch (M - r) {
            case 5: return tile<NB, 5>(panels, xr, K, yr, ldy, n, n1);
            case 4: return tile<NB, 4>(panels, xr, K, yr, ldy, n, n1);
            case 3: return tile<NB, 3>(panels, xr, K, yr, ldy, n, n1);
            case 2: return tile<NB, 2>(panels, xr, K, yr, ldy, n, n1);
            default: break;
        }
    }
    if (M - r == 1) tile<NB, 1>(panels, xr, K, yr, ldy, n, n1);
}

}  // namespace

bool cpu_has_avx512_bf16() {
    static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
    return has;
}

std::vector<uint16_t> pack_bf16_panels(const Weights& W) {
    const int64_t K = W.K, panels = (W.N + 15) / 16;
    std::vector<uint16_t> p(panels * 16 * K, 0);
    for (int64_t n = 0; n < W.N; ++n)
        for (int64_t k = 0; k < K; ++k) p[(n / 16) * 16 * K + (k / 2) * 32 + (n % 16) * 2 + k % 2] = W.b[n * K + k];
    return p;
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
    TORCH_CHECK(!simd || (W.bp != nullptr && n0 % 16 == 0), "the 'avx512-bf16' kernel takes packed panels, whole");
    if (n1 <= n0) return;
    xb.resize(M * K);
    if (!simd) {
        for (int64_t i = 0; i < M * K; ++i) xb[i] = to_bf16(x[i]);
        return rows_plain(W.b, xb.data(), M, K, y, ldy, n0, n1);
    }
    to_bf16_avx512(x, M * K, xb.data());
    int64_t n = n0;
    if (M <= 2)  // eight panels at a time: enough sums in flight to cover the instruction's latency
        for (; n + 128 <= n1; n += 128) panel_rows<8>(W.bp, xb.data(), M, K, y, ldy, n, n1);
    for (; n + 64 <= n1; n += 64) panel_rows<4>(W.bp, xb.data(), M, K, y, ldy, n, n1);
    for (; n < n1; n += 16) panel_rows<1>(W.bp, xb.data(), M, K, y, ldy, n, n1);  // the last panels, one at a time
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w, const std::string& kernel) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 (M, K)");
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.size(1) == x.size(1),
                "w must be contiguous bf16 (N, K)");
    Weights W;
    W.b = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), W.N = w.size(0), W.K = w.size(1);
    std::vector<uint16_t> panels;  // packed per call: this entry point is for tests
    if (kernel == "avx512-bf16") panels = pack_bf16_panels(W), W.bp = panels.data();
    at::Tensor y = at::empty({x.size(0), W.N}, x.options());
    at::parallel_for(0, (W.N + 15) / 16, 1, [&](int64_t b0, int64_t b1) {
        std::vector<uint16_t> xb;
        bf16_slice(W, x.data_ptr<float>(), x.size(0), y.data_ptr<float>(), W.N, b0 * 16, std::min(W.N, b1 * 16),
                   kernel, xb);
    });
    return y;
}

}  // namespace slm
