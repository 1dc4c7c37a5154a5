// Weight-only quantized matmuls for CPUs, y = x @ W.T, built at first use by kernels.py.
//
//   q4: 4-bit weights in groups of 32, llama.cpp's Q4_1 layout: w = d * q + m with q in [0, 15].
//       qs [N, K/2] uint8: for each group, 16 bytes; byte j holds weight j (low nibble) and j + 16 (high).
//       d, m [N, K/32] float32 (GGUF's fp16 values, widened exactly).
//   q8: 8-bit weights, one scale per group of G (32 is llama.cpp's Q8_0, K is one per output channel):
//       w = s * q, q [N, K] int8, s [N, K/G] float32.
//
// The activations stay fp32 and each group's product is d * sum(x * q) + m * sum(x), so the result is the
// product with the dequantized weights up to the order of summation. A GEMV reads each weight once, so
// its speed is how fast 0.6 (q4) or 1 (q8) byte per weight streams in: that is what beats fp32 at batch 1.
// Each op takes the instruction set to run (isas() lists this CPU's, best first; the plain loops run anywhere),
// so which code ran is the caller's explicit choice, never a silent fallback.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

namespace {

// --- plain loops: the reference and the fallback ------------------------------------------------------
void q4_rows_plain(const float* x, const float* xsum, int64_t M, int64_t K, const uint8_t* qs,
                   const float* d, const float* m, float* y, int64_t N, int64_t n0, int64_t n1) {
    const int64_t G = K / 32;
    for (int64_t n = n0; n < n1; ++n) {
        for (int64_t r = 0; r < M; ++r) {
            float acc = 0.f;
            for (int64_t g = 0; g < G; ++g) {
                const uint8_t* q = qs + n * K / 2 + g * 16;
                const float* xg = x + r * K + g * 32;
                float dot = 0.f;
                for (int j = 0; j < 16; ++j) dot += xg[j] * float(q[j] & 15) + xg[j + 16] * float(q[j] >> 4);
                acc += d[n * G + g] * dot + m[n * G + g] * xsum[r * G + g];
            }
            y[r * N + n] = acc;
        }
    }
}

void q8_rows_plain(const float* x, int64_t M, int64_t K, const int8_t* q, const float* s, int64_t group,
                   float* y, int64_t N, int64_t n0, int64_t n1) {
    const int64_t G = K / group;
    for (int64_t n = n0; n < n1; ++n) {
        for (int64_t r = 0; r < M; ++r) {
            float acc = 0.f;
            for (int64_t g = 0; g < G; ++g) {
                float dot = 0.f;
                for (int64_t j = g * group; j < (g + 1) * group; ++j) dot += x[r * K + j] * float(q[n * K + j]);
                acc += s[n * G + g] * dot;
            }
            y[r * N + n] = acc;
        }
    }
}

// --- AVX2 + FMA + F16C ----------------------------------------------------------------------------------
__attribute__((target("avx2,fma,f16c"))) float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// The AVX2 path takes activations as 16-bit fixed point per group of 32, x = s * q16 (error at most
// 1.5e-5 of the group's largest |x|), so that vpmaddwd multiplies and adds weights and activations as integers
// (32-bit sums: 15 * 32767 * 4 per lane cannot overflow) and only each group's sum is converted to float.
struct Activations {
    std::vector<int16_t> q;      // [M, K]
    std::vector<float> scale;    // [M, K / 32]
    std::vector<float> sum;      // [M, K / 32]: each group's sum of x, in fp32
};

Activations to_fixed_point(const float* x, int64_t M, int64_t K) {
    const int64_t G = K / 32;
    Activations a{std::vector<int16_t>(M * K), std::vector<float>(M * G), std::vector<float>(M * G)};
    for (int64_t i = 0; i < M * G; ++i) {
        const float* xg = x + i * 32;
        float top = 0.f, sum = 0.f;
        for (int j = 0; j < 32; ++j) { top = std::max(top, std::fabs(xg[j])); sum += xg[j]; }
        const float s = top > 0.f ? top / 32767.f : 1.f;
        for (int j = 0; j < 32; ++j) a.q[i * 32 + j] = int16_t(std::lrintf(xg[j] / s));
        a.scale[i] = s;
        a.sum[i] = sum;
    }
    return a;
}

__attribute__((target("avx2,fma,f16c"))) inline __m256i load16(const int16_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// One group's dot in integers: its 32 weights as int16 (w0: weights 0-15, w1: 16-31) times the group's
// fixed-point activations xq, eight 32-bit partial sums converted to float.
__attribute__((target("avx2,fma,f16c"))) inline __m256 group_dot(__m256i w0, __m256i w1, const int16_t* xq) {
    return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(w0, load16(xq)),
                                               _mm256_madd_epi16(w1, load16(xq + 16))));
}

// R activation rows (1 to 4, a compile-time count so the accumulators live in registers) share one unpacking
// of each weight group. Per group: sum(q * q16) in integers, then acc += d * s * that (one convert, one FMA).
template <int R>
__attribute__((target("avx2,fma,f16c")))
void q4_block_avx2(const Activations& a, int64_t r0, int64_t K, const uint8_t* qs, const float* d,
                   const float* m, float* y, int64_t N, int64_t n0, int64_t n1) {
    const int64_t G = K / 32;
    const __m256i low = _mm256_set1_epi16(15);
    for (int64_t n = n0; n < n1; ++n) {
        __m256 acc[R];
        for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
        for (int64_t g = 0; g < G; ++g) {
            const __m256i bytes = _mm256_cvtepu8_epi16(
                _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + n * K / 2 + g * 16)));
            const __m256i w_lo = _mm256_and_si256(bytes, low), w_hi = _mm256_srli_epi16(bytes, 4);
            const float dg = d[n * G + g];
            for (int r = 0; r < R; ++r) {
                const int64_t i = (r0 + r) * G + g;
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dg * a.scale[i]), group_dot(w_lo, w_hi, a.q.data() + i * 32),
                                         acc[r]);
            }
        }
        for (int r = 0; r < R; ++r) {  // + the sum over groups of m * sum(x), in fp32, 8 groups at a time
            const float* sums = a.sum.data() + (r0 + r) * G;
            __m256 mins = _mm256_setzero_ps();
            int64_t g = 0;
            for (; g + 8 <= G; g += 8)
                mins = _mm256_fmadd_ps(_mm256_loadu_ps(m + n * G + g), _mm256_loadu_ps(sums + g), mins);
            float tail = 0.f;
            for (; g < G; ++g) tail += m[n * G + g] * sums[g];
            y[(r0 + r) * N + n] = hsum(acc[r]) + hsum(mins) + tail;
        }
    }
}

// q8 weights: per 32-weight group the same integer dot, scaled by the weight group's and the activations' scale.
template <int R>
__attribute__((target("avx2,fma,f16c")))
void q8_block_avx2(const Activations& a, int64_t r0, int64_t K, const int8_t* q, const float* s, int64_t group,
                   float* y, int64_t N, int64_t n0, int64_t n1) {
    const int64_t G = K / 32;
    const bool per_channel = group == K;  // else groups of 32 (Q8_0)
    for (int64_t n = n0; n < n1; ++n) {
        __m256 acc[R];
        for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
        for (int64_t g = 0; g < G; ++g) {
            const int8_t* w = q + n * K + g * 32;
            const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
            const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16)));
            const float wscale = per_channel ? s[n] : s[n * G + g];
            for (int r = 0; r < R; ++r) {
                const int64_t i = (r0 + r) * G + g;
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(wscale * a.scale[i]), group_dot(w0, w1, a.q.data() + i * 32),
                                         acc[r]);
            }
        }
        for (int r = 0; r < R; ++r) y[(r0 + r) * N + n] = hsum(acc[r]);
    }
}

// All M rows, four at a time, for outputs n0..n1.
void q4_rows_avx2(const Activations& a, int64_t M, int64_t K, const uint8_t* qs, const float* d,
                  const float* m, float* y, int64_t N, int64_t n0, int64_t n1) {
    for (int64_t r = 0; r < M; r += 4) {
        switch (std::min<int64_t>(4, M - r)) {
            case 1: q4_block_avx2<1>(a, r, K, qs, d, m, y, N, n0, n1); break;
            case 2: q4_block_avx2<2>(a, r, K, qs, d, m, y, N, n0, n1); break;
            case 3: q4_block_avx2<3>(a, r, K, qs, d, m, y, N, n0, n1); break;
            default: q4_block_avx2<4>(a, r, K, qs, d, m, y, N, n0, n1);
        }
    }
}

void q8_rows_avx2(const Activations& a, int64_t M, int64_t K, const int8_t* q, const float* s, int64_t group,
                  float* y, int64_t N, int64_t n0, int64_t n1) {
    for (int64_t r = 0; r < M; r += 4) {
        switch (std::min<int64_t>(4, M - r)) {
            case 1: q8_block_avx2<1>(a, r, K, q, s, group, y, N, n0, n1); break;
            case 2: q8_block_avx2<2>(a, r, K, q, s, group, y, N, n0, n1); break;
            case 3: q8_block_avx2<3>(a, r, K, q, s, group, y, N, n0, n1); break;
            default: q8_block_avx2<4>(a, r, K, q, s, group, y, N, n0, n1);
        }
    }
}

bool cpu_has_avx2() {
    static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                            __builtin_cpu_supports("f16c");
    return has;
}

// The instruction sets this CPU can run, best first; machine.py picks one (or a test pins one).
std::vector<std::string> isas() {
    std::vector<std::string> out;
    if (cpu_has_avx2()) out.push_back("avx2");
    out.push_back("plain");
    return out;
}

enum class Isa { plain, avx2 };

Isa check_isa(const std::string& isa) {
    if (isa == "plain") return Isa::plain;
    TORCH_CHECK(isa == "avx2", "unknown kernel instruction set '", isa, "'");
    TORCH_CHECK(cpu_has_avx2(), "this CPU cannot run the '", isa, "' kernels");
    return Isa::avx2;
}

void check_x(const at::Tensor& x, int64_t K) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == K && x.is_contiguous(),
                "x must be a contiguous float32 matrix with ", K, " columns");
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m,
                     const std::string& isa) {
    const int64_t N = qs.size(0), K = qs.size(1) * 2, M = x.size(0), G = K / 32;
    check_x(x, K);
    TORCH_CHECK(K % 32 == 0 && qs.scalar_type() == at::kByte && d.scalar_type() == at::kFloat &&
                m.scalar_type() == at::kFloat && d.size(1) == G && m.size(1) == G, "bad q4 weight layout");
    auto y = at::empty({M, N}, x.options());
    const float* xp = x.data_ptr<float>();
    const float *dp = d.data_ptr<float>(), *mp = m.data_ptr<float>();
    if (check_isa(isa) == Isa::avx2) {
        const Activations a = to_fixed_point(xp, M, K);
        at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
            q4_rows_avx2(a, M, K, qs.data_ptr<uint8_t>(), dp, mp, y.data_ptr<float>(), N, n0, n1);
        });
    } else {
        std::vector<float> xsum(M * G, 0.f);  // each group's sum of x, for the m * sum(x) terms
        for (int64_t i = 0; i < M * K; ++i) xsum[i / 32] += xp[i];
        at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
            q4_rows_plain(xp, xsum.data(), M, K, qs.data_ptr<uint8_t>(), dp, mp, y.data_ptr<float>(), N, n0, n1);
        });
    }
    return y;
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, const std::string& isa) {
    const int64_t N = q.size(0), K = q.size(1), M = x.size(0), group = K / s.size(1);
    check_x(x, K);
    TORCH_CHECK(q.scalar_type() == at::kChar && s.scalar_type() == at::kFloat && K % 32 == 0 &&
                (s.size(1) == 1 || s.size(1) == K / 32), "bad q8 weight layout: one scale per row or per 32");
    auto y = at::empty({M, N}, x.options());
    const float* xp = x.data_ptr<float>();
    if (check_isa(isa) == Isa::avx2) {
        const Activations a = to_fixed_point(xp, M, K);
        at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
            q8_rows_avx2(a, M, K, q.data_ptr<int8_t>(), s.data_ptr<float>(), group, y.data_ptr<float>(), N, n0, n1);
        });
    } else {
        at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
            q8_rows_plain(xp, M, K, q.data_ptr<int8_t>(), s.data_ptr<float>(), group, y.data_ptr<float>(), N, n0, n1);
        });
    }
    return y;
}

}  // namespace

// Dispatcher ops, so that a compiled graph calls them without going through Python.
TORCH_LIBRARY(slm, lib) {
    lib.def("q4_linear(Tensor x, Tensor qs, Tensor d, Tensor m, str isa) -> Tensor");
    lib.def("q8_linear(Tensor x, Tensor q, Tensor s, str isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(slm, CPU, lib) {
    lib.impl("q4_linear", &q4_linear);
    lib.impl("q8_linear", &q8_linear);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) { module.def("isas", &isas); }
