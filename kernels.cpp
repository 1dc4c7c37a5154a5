// Weight-only quantized matmuls for CPUs, y = x @ W.T, built at first use by kernels.py.
//
//   q4: 4-bit weights in groups of 32, llama.cpp's Q4_1 layout: w = d * q + m with q in [0, 15].
//       qs [N, K/2] uint8: for each group, 16 bytes; byte j holds weight j (low nibble) and j + 16 (high).
//       d, m [N, K/32] float16.
//   q8: 8-bit weights, one scale per group of G (32 is llama.cpp's Q8_0, K is one per output channel):
//       w = s * q, q [N, K] int8, s [N, K/G] float32.
//
// The activations stay fp32 and each group's product is d * sum(x * q) + m * sum(x), so the result is the
// product with the dequantized weights up to the order of summation. A GEMV reads each weight once, so
// its speed is how fast 0.6 (q4) or 1 (q8) byte per weight streams in: that is what beats fp32 at batch 1.
// The AVX2 + FMA + F16C code is chosen at run time; any other CPU gets the plain loops, same results.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>
#include <vector>

namespace {

float half_to_float(uint16_t h) {  // IEEE half -> float, exactly (no F16C needed)
    uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) { bits = sign; }
        else {  // subnormal: normalise
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; --exp; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) { bits = sign | 0x7f800000u | (man << 13); }
    else { bits = sign | ((exp + 127 - 15) << 23) | (man << 13); }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// --- plain loops: the reference and the fallback ------------------------------------------------------
void q4_rows_plain(const float* x, const float* xsum, int64_t M, int64_t K, const uint8_t* qs,
                   const uint16_t* d, const uint16_t* m, float* y, int64_t N, int64_t n0, int64_t n1) {
    const int64_t G = K / 32;
    for (int64_t n = n0; n < n1; ++n) {
        for (int64_t r = 0; r < M; ++r) {
            float acc = 0.f;
            for (int64_t g = 0; g < G; ++g) {
                const uint8_t* q = qs + n * K / 2 + g * 16;
                const float* xg = x + r * K + g * 32;
                float dot = 0.f;
                for (int j = 0; j < 16; ++j) dot += xg[j] * float(q[j] & 15) + xg[j + 16] * float(q[j] >> 4);
                acc += half_to_float(d[n * G + g]) * dot + half_to_float(m[n * G + g]) * xsum[r * G + g];
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

// A group's 32 weights as 4 vectors of 8 floats: bytes 0-7 hold weights 0-7 (low nibbles) and 16-23
// (high), bytes 8-15 weights 8-15 and 24-31.
struct Group { __m256 w0, w1, w2, w3; };

__attribute__((target("avx2,fma,f16c"))) inline Group unpack(const uint8_t* q) {
    const __m256i low = _mm256_set1_epi32(15);
    const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8)));
    return {_mm256_cvtepi32_ps(_mm256_and_si256(a, low)), _mm256_cvtepi32_ps(_mm256_and_si256(b, low)),
            _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4)), _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4))};
}

__attribute__((target("avx2,fma,f16c"))) inline __m256 dot32(const float* x, const Group& w) {
    __m256 dot = _mm256_mul_ps(_mm256_loadu_ps(x), w.w0);
    dot = _mm256_fmadd_ps(_mm256_loadu_ps(x + 8), w.w1, dot);
    dot = _mm256_fmadd_ps(_mm256_loadu_ps(x + 16), w.w2, dot);
    return _mm256_fmadd_ps(_mm256_loadu_ps(x + 24), w.w3, dot);
}

// R activation rows (1 to 4, a compile-time count so the accumulators live in registers) share one unpacking
// of each weight group; with one or two rows, two outputs at a time also share each load of x.
template <int R>
__attribute__((target("avx2,fma,f16c")))
void q4_block_avx2(const float* x, const float* xsum, int64_t K, const uint8_t* qs, const uint16_t* d,
                   const uint16_t* m, float* y, int64_t N, int64_t n0, int64_t n1) {
    const int64_t G = K / 32;
    constexpr int OUT = R <= 2 ? 2 : 1;
    for (int64_t n = n0; n < n1; n += OUT) {
        const int outs = int(std::min<int64_t>(OUT, n1 - n));
        __m256 acc[OUT][R];
        float mins[OUT][R];  // sum over groups of m * sum(x)
        for (int o = 0; o < OUT; ++o)
            for (int r = 0; r < R; ++r) { acc[o][r] = _mm256_setzero_ps(); mins[o][r] = 0.f; }
        for (int64_t g = 0; g < G; ++g) {
            for (int o = 0; o < OUT; ++o) {
                if (o >= outs) break;
                const int64_t row = n + o;
                const Group w = unpack(qs + row * K / 2 + g * 16);
                const __m256 scale = _mm256_set1_ps(_cvtsh_ss(d[row * G + g]));
                const float mg = _cvtsh_ss(m[row * G + g]);
                for (int r = 0; r < R; ++r) {
                    acc[o][r] = _mm256_fmadd_ps(scale, dot32(x + r * K + g * 32, w), acc[o][r]);
                    mins[o][r] += mg * xsum[r * G + g];
                }
            }
        }
        for (int o = 0; o < outs; ++o)
            for (int r = 0; r < R; ++r) y[r * N + n + o] = hsum(acc[o][r]) + mins[o][r];
    }
}

template <int R>
__attribute__((target("avx2,fma,f16c")))
void q8_block_avx2(const float* x, int64_t K, const int8_t* q, const float* s, int64_t group, float* y,
                   int64_t N, int64_t n0, int64_t n1) {
    const int64_t G = K / group;
    for (int64_t n = n0; n < n1; ++n) {
        __m256 acc[R];
        for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
        for (int64_t g = 0; g < G; ++g) {
            const __m256 scale = _mm256_set1_ps(s[n * G + g]);
            __m256 dot[R];
            for (int r = 0; r < R; ++r) dot[r] = _mm256_setzero_ps();
            for (int64_t j = g * group; j < (g + 1) * group; j += 8) {
                const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + n * K + j));
                const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
                for (int r = 0; r < R; ++r) dot[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + j), w, dot[r]);
            }
            for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(scale, dot[r], acc[r]);
        }
        for (int r = 0; r < R; ++r) y[r * N + n] = hsum(acc[r]);
    }
}

// All M rows, four at a time, for outputs n0..n1.
void q4_rows_avx2(const float* x, const float* xsum, int64_t M, int64_t K, const uint8_t* qs,
                  const uint16_t* d, const uint16_t* m, float* y, int64_t N, int64_t n0, int64_t n1) {
    const int64_t G = K / 32;
    for (int64_t r = 0; r < M; r += 4) {
        const float *xr = x + r * K, *sr = xsum + r * G;
        float* yr = y + r * N;
        switch (std::min<int64_t>(4, M - r)) {
            case 1: q4_block_avx2<1>(xr, sr, K, qs, d, m, yr, N, n0, n1); break;
            case 2: q4_block_avx2<2>(xr, sr, K, qs, d, m, yr, N, n0, n1); break;
            case 3: q4_block_avx2<3>(xr, sr, K, qs, d, m, yr, N, n0, n1); break;
            default: q4_block_avx2<4>(xr, sr, K, qs, d, m, yr, N, n0, n1);
        }
    }
}

void q8_rows_avx2(const float* x, int64_t M, int64_t K, const int8_t* q, const float* s, int64_t group,
                  float* y, int64_t N, int64_t n0, int64_t n1) {
    for (int64_t r = 0; r < M; r += 4) {
        const float* xr = x + r * K;
        float* yr = y + r * N;
        switch (std::min<int64_t>(4, M - r)) {
            case 1: q8_block_avx2<1>(xr, K, q, s, group, yr, N, n0, n1); break;
            case 2: q8_block_avx2<2>(xr, K, q, s, group, yr, N, n0, n1); break;
            case 3: q8_block_avx2<3>(xr, K, q, s, group, yr, N, n0, n1); break;
            default: q8_block_avx2<4>(xr, K, q, s, group, yr, N, n0, n1);
        }
    }
}

bool use_avx2(bool allowed) {
    static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                            __builtin_cpu_supports("f16c");
    return allowed && has;
}

void check_x(const at::Tensor& x, int64_t K) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == K && x.is_contiguous(),
                "x must be a contiguous float32 matrix with ", K, " columns");
}

at::Tensor q4_linear_impl(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m,
                          bool simd) {
    const int64_t N = qs.size(0), K = qs.size(1) * 2, M = x.size(0), G = K / 32;
    check_x(x, K);
    TORCH_CHECK(K % 32 == 0 && qs.scalar_type() == at::kByte && d.scalar_type() == at::kHalf &&
                m.scalar_type() == at::kHalf && d.size(1) == G && m.size(1) == G, "bad q4 weight layout");
    auto y = at::empty({M, N}, x.options());
    std::vector<float> xsum(M * G, 0.f);  // each group's sum of x, for the m * sum(x) terms
    const float* xp = x.data_ptr<float>();
    for (int64_t i = 0; i < M * K; ++i) xsum[i / 32] += xp[i];
    const auto* dp = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
    const auto* mp = reinterpret_cast<const uint16_t*>(m.data_ptr<at::Half>());
    const bool fast = use_avx2(simd);
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
        (fast ? q4_rows_avx2 : q4_rows_plain)(xp, xsum.data(), M, K,
                                              qs.data_ptr<uint8_t>(), dp, mp, y.data_ptr<float>(), N, n0, n1);
    });
    return y;
}

at::Tensor q8_linear_impl(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, bool simd) {
    const int64_t N = q.size(0), K = q.size(1), M = x.size(0), group = K / s.size(1);
    check_x(x, K);
    TORCH_CHECK(q.scalar_type() == at::kChar && s.scalar_type() == at::kFloat && K % s.size(1) == 0 &&
                group % 8 == 0, "bad q8 weight layout");
    auto y = at::empty({M, N}, x.options());
    const bool fast = use_avx2(simd);
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
        (fast ? q8_rows_avx2 : q8_rows_plain)(x.data_ptr<float>(), M, K, q.data_ptr<int8_t>(),
                                              s.data_ptr<float>(), group, y.data_ptr<float>(), N, n0, n1);
    });
    return y;
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m) {
    return q4_linear_impl(x, qs, d, m, true);
}
at::Tensor q4_linear_plain(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m) {
    return q4_linear_impl(x, qs, d, m, false);
}
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s) {
    return q8_linear_impl(x, q, s, true);
}
at::Tensor q8_linear_plain(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s) {
    return q8_linear_impl(x, q, s, false);
}

}  // namespace

// Dispatcher ops, so that a compiled graph calls them without going through Python.
TORCH_LIBRARY(slm, lib) {
    lib.def("q4_linear(Tensor x, Tensor qs, Tensor d, Tensor m) -> Tensor");
    lib.def("q4_linear_plain(Tensor x, Tensor qs, Tensor d, Tensor m) -> Tensor");
    lib.def("q8_linear(Tensor x, Tensor q, Tensor s) -> Tensor");
    lib.def("q8_linear_plain(Tensor x, Tensor q, Tensor s) -> Tensor");
}

TORCH_LIBRARY_IMPL(slm, CPU, lib) {
    lib.impl("q4_linear", &q4_linear);
    lib.impl("q4_linear_plain", &q4_linear_plain);
    lib.impl("q8_linear", &q8_linear);
    lib.impl("q8_linear_plain", &q8_linear_plain);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {}
