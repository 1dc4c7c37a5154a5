// The int16 dot-product kernels: activations rounded to 16-bit fixed point per group of 32, x = s * q16 (error
// at most 1.5e-5 of the group's largest |x|; llama.cpp rounds them to 8 bits), so that weights and activations
// multiply and add as integers and only each group's sum becomes a float:
//   avx2-int16   vpmaddwd + vpaddd, 256-bit      avx-vnni     vpdpwssd, 256-bit (AVX-VNNI)
//   avx512-vnni  vpdpwssd, 512-bit (AVX-512 VNNI)
// At one row they read and unpack each weight once and are the fastest kernels here; from a few rows on, the
// exact fp32 tiles of kernels.cpp win (measured in bench gemv). Opt in with --machine quant_kernel=avx512-vnni.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>

namespace slm {
namespace {

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

// --- 256-bit: AVX2 and AVX-VNNI -----------------------------------------------------------------------------
// One body for both; DOT is one group's integer dot: its 32 weights as int16 (w0: weights 0-15, w1: 16-31)
// times the group's fixed-point activations xq (32-bit sums: 15 * 32767 * 2 per lane cannot overflow).
// R activation rows (1 to 4, a compile-time count so the accumulators live in registers) share one unpacking of
// each weight group.
#define SLM_256_KERNELS(NAME, TARGET, DOT)                                                                      \
    __attribute__((target(TARGET))) inline float hsum_##NAME(__m256 v) {                                       \
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));                          \
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                                                 \
        return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));                                                \
    }                                                                                                           \
    __attribute__((target(TARGET))) inline __m256 dot_##NAME(__m256i w0, __m256i w1, const int16_t* xq) {       \
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));                            \
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16));                       \
        return _mm256_cvtepi32_ps(DOT);                                                                         \
    }                                                                                                           \
    template <int R>                                                                                            \
    __attribute__((target(TARGET))) void q4_block_##NAME(const Activations& a, int64_t r0, int64_t K,           \
            const uint8_t* qs, const half* d, const half* m, float* y, int64_t ldy, int64_t n0, int64_t n1) {   \
        const int64_t G = K / 32;                                                                               \
        const __m256i low = _mm256_set1_epi16(15);                                                              \
        for (int64_t n = n0; n < n1; ++n) {                                                                     \
            __m256 acc[R];                                                                                      \
            for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();                                           \
            for (int64_t g = 0; g < G; ++g) {                                                                   \
                const __m256i bytes = _mm256_cvtepu8_epi16(                                                     \
                    _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + n * K / 2 + g * 16)));                \
                const __m256i w0 = _mm256_and_si256(bytes, low), w1 = _mm256_srli_epi16(bytes, 4);              \
                const float dg = _cvtsh_ss(d[n * G + g]);                                                       \
                for (int r = 0; r < R; ++r) {                                                                   \
                    const int64_t i = (r0 + r) * G + g;                                                         \
                    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dg * a.scale[i]),                                   \
                                             dot_##NAME(w0, w1, a.q.data() + i * 32), acc[r]);                  \
                }                                                                                               \
            }                                                                                                   \
            for (int r = 0; r < R; ++r) { /* + the sum over groups of m * sum(x), 8 groups at a time */         \
                const float* sums = a.sum.data() + (r0 + r) * G;                                                \
                __m256 mins = _mm256_setzero_ps();                                                              \
                int64_t g = 0;                                                                                  \
                for (; g + 8 <= G; g += 8)                                                                      \
                    mins = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(                                     \
                        reinterpret_cast<const __m128i*>(m + n * G + g))), _mm256_loadu_ps(sums + g), mins);    \
                float tail = 0.f;                                                                               \
                for (; g < G; ++g) tail += _cvtsh_ss(m[n * G + g]) * sums[g];                                   \
                y[(r0 + r) * ldy + n] = hsum_##NAME(acc[r]) + hsum_##NAME(mins) + tail;                         \
            }                                                                                                   \
        }                                                                                                       \
    }                                                                                                           \
    template <int R>                                                                                            \
    __attribute__((target(TARGET))) void q8_block_##NAME(const Activations& a, int64_t r0, int64_t K,           \
            const int8_t* q, const half* s, int64_t groups, float* y, int64_t ldy, int64_t n0, int64_t n1) {    \
        const int64_t G = K / 32;                                                                               \
        for (int64_t n = n0; n < n1; ++n) {                                                                     \
            __m256 acc[R];                                                                                      \
            for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();                                           \
            for (int64_t g = 0; g < G; ++g) {                                                                   \
                const int8_t* w = q + n * K + g * 32;                                                           \
                const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));  \
                const __m256i w1 = _mm256_cvtepi8_epi16(                                                        \
                    _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16)));                                 \
                const float wscale = _cvtsh_ss(groups == 1 ? s[n] : s[n * G + g]);                             \
                for (int r = 0; r < R; ++r) {                                                                   \
                    const int64_t i = (r0 + r) * G + g;                                                         \
                    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(wscale * a.scale[i]),                               \
                                             dot_##NAME(w0, w1, a.q.data() + i * 32), acc[r]);                  \
                }                                                                                               \
            }                                                                                                   \
            for (int r = 0; r < R; ++r) y[(r0 + r) * ldy + n] = hsum_##NAME(acc[r]);                            \
        }                                                                                                       \
    }

SLM_256_KERNELS(avx2, "avx2,fma,f16c",
                _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1)))
SLM_256_KERNELS(avxvnni, "avx2,fma,f16c,avxvnni",
                _mm256_dpwssd_avx_epi32(_mm256_dpwssd_avx_epi32(_mm256_setzero_si256(), w0, x0), w1, x1))

// --- 512-bit: AVX-512 VNNI ----------------------------------------------------------------------------------
// A whole group in one register: its 32 weights as int16, one vpdpwssd against the 32 activations.
#define SLM_512 "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"

__attribute__((target(SLM_512))) inline __m512 dot_avx512(__m512i w, const int16_t* xq) {
    const __m512i x = _mm512_loadu_si512(xq);
    return _mm512_cvtepi32_ps(_mm512_dpwssd_epi32(_mm512_setzero_si512(), w, x));
}

template <int R>
__attribute__((target(SLM_512))) void q4_block_avx512(const Activations& a, int64_t r0, int64_t K,
        const uint8_t* qs, const half* d, const half* m, float* y, int64_t ldy, int64_t n0, int64_t n1) {
    const int64_t G = K / 32;
    const __m256i low = _mm256_set1_epi16(15);
    for (int64_t n = n0; n < n1; ++n) {
        __m512 acc[R];
        for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
        for (int64_t g = 0; g < G; ++g) {
            const __m256i bytes = _mm256_cvtepu8_epi16(
                _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + n * K / 2 + g * 16)));
            const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(bytes, low)),
                                                 _mm256_srli_epi16(bytes, 4), 1);
            const float dg = _cvtsh_ss(d[n * G + g]);
            for (int r = 0; r < R; ++r) {
                const int64_t i = (r0 + r) * G + g;
                acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(dg * a.scale[i]), dot_avx512(w, a.q.data() + i * 32),
                                         acc[r]);
            }
        }
        for (int r = 0; r < R; ++r) {  // + the sum over groups of m * sum(x), 16 groups at a time
            const float* sums = a.sum.data() + (r0 + r) * G;
            __m512 mins = _mm512_setzero_ps();
            int64_t g = 0;
            for (; g + 16 <= G; g += 16)
                mins = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + n * G + g))),
                                       _mm512_loadu_ps(sums + g), mins);
            float tail = 0.f;
            for (; g < G; ++g) tail += _cvtsh_ss(m[n * G + g]) * sums[g];
            y[(r0 + r) * ldy + n] = _mm512_reduce_add_ps(acc[r]) + _mm512_reduce_add_ps(mins) + tail;
        }
    }
}

template <int R>
__attribute__((target(SLM_512))) void q8_block_avx512(const Activations& a, int64_t r0, int64_t K,
        const int8_t* q, const half* s, int64_t groups, float* y, int64_t ldy, int64_t n0, int64_t n1) {
    const int64_t G = K / 32;
    for (int64_t n = n0; n < n1; ++n) {
        __m512 acc[R];
        for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
        for (int64_t g = 0; g < G; ++g) {
            const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + n * K + g * 32)));
            const float wscale = _cvtsh_ss(groups == 1 ? s[n] : s[n * G + g]);
            for (int r = 0; r < R; ++r) {
                const int64_t i = (r0 + r) * G + g;
                acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(wscale * a.scale[i]), dot_avx512(w, a.q.data() + i * 32),
                                         acc[r]);
            }
        }
        for (int r = 0; r < R; ++r) y[(r0 + r) * ldy + n] = _mm512_reduce_add_ps(acc[r]);
    }
}

// All M rows, four at a time, for outputs n0..n1, with one instruction set's blocks.
#define SLM_ROWS(KIND, NAME, ...)                                                                              \
    for (int64_t r = 0; r < M; r += 4) {                                                                        \
        switch (std::min<int64_t>(4, M - r)) {                                                                  \
            case 1: KIND##_block_##NAME<1>(a, r, K, __VA_ARGS__); break;                                        \
            case 2: KIND##_block_##NAME<2>(a, r, K, __VA_ARGS__); break;                                        \
            case 3: KIND##_block_##NAME<3>(a, r, K, __VA_ARGS__); break;                                        \
            default: KIND##_block_##NAME<4>(a, r, K, __VA_ARGS__);                                              \
        }                                                                                                       \
    }

}  // namespace

void int16_slice(const Weights& W, const float* x, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1,
                 Isa isa) {
    const int64_t K = W.K;
    const Activations a = to_fixed_point(x, M, K);  // each thread its own: a few rows, cheap beside the weights
    const uint8_t* qs = W.qs;
    const int8_t* q = W.q;
    const half *d = W.d, *m = W.m, *s = W.s;
    const int64_t groups = W.groups;
    if (qs != nullptr) {
        if (isa == Isa::avx512_vnni) {
            SLM_ROWS(q4, avx512, qs, d, m, y, ldy, n0, n1)
        } else if (isa == Isa::avx_vnni) {
            SLM_ROWS(q4, avxvnni, qs, d, m, y, ldy, n0, n1)
        } else {
            SLM_ROWS(q4, avx2, qs, d, m, y, ldy, n0, n1)
        }
    } else if (isa == Isa::avx512_vnni) {
        SLM_ROWS(q8, avx512, q, s, groups, y, ldy, n0, n1)
    } else if (isa == Isa::avx_vnni) {
        SLM_ROWS(q8, avxvnni, q, s, groups, y, ldy, n0, n1)
    } else {
        SLM_ROWS(q8, avx2, q, s, groups, y, ldy, n0, n1)
    }
}

}  // namespace slm
