// Weight-only quantized matmuls for CPUs, y = x @ W.T, built at first use by layers.py.
//
//   q4: 4-bit weights in groups of 32, llama.cpp's Q4_1 layout: w = d * q + m with q in [0, 15].
//       qs [N, K/2] uint8: for each group, 16 bytes; byte j holds weight j (low nibble) and j + 16 (high).
//       d, m [N, K/32] float32 (GGUF's fp16 values, widened exactly).
//   q8: 8-bit weights, one scale per group of G (32 is llama.cpp's Q8_0, K is one per output channel):
//       w = s * q, q [N, K] int8, s [N, K/G] float32.
//
// The default kernels are exact: a few outputs' weights at a time are dequantized into a tile that stays in L1,
// then multiplied with fp32 activations by a register-blocked FMA micro-kernel (4 outputs x 4 rows). So the
// result is the product with the dequantized weights in fp32, up to the order of summation, whatever the number
// of rows: a row's numbers do not depend on the batch it is in. The weights stream in once per call at 0.6 (q4)
// or 1 (q8) byte each, which is what beats fp32 weights at batch 1.
//   avx512   16-lane FMAs       avx2   8-lane FMAs       plain   scalar loops, any CPU
// kernels_int16.cpp has faster-at-one-row kernels that round activations to 16 bits (opt-in).
// Each op takes the instruction set to run (isas() lists this CPU's, best first), so which code ran is the
// caller's explicit choice, never a silent fallback.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>

namespace slm {
namespace {

// --- plain loops: the reference and the fallback ------------------------------------------------------
void q4_rows_plain(const float* x, const float* xsum, int64_t M, int64_t K, const uint8_t* qs,
                   const float* d, const float* m, float* y, int64_t ldy, int64_t n0, int64_t n1) {
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
            y[r * ldy + n] = acc;
        }
    }
}

void q8_rows_plain(const float* x, int64_t M, int64_t K, const int8_t* q, const float* s, int64_t groups,
                   float* y, int64_t ldy, int64_t n0, int64_t n1) {
    const int64_t group = K / groups;
    for (int64_t n = n0; n < n1; ++n) {
        for (int64_t r = 0; r < M; ++r) {
            float acc = 0.f;
            for (int64_t g = 0; g < groups; ++g) {
                float dot = 0.f;
                for (int64_t j = g * group; j < (g + 1) * group; ++j) dot += x[r * K + j] * float(q[n * K + j]);
                acc += s[n * groups + g] * dot;
            }
            y[r * ldy + n] = acc;
        }
    }
}

// --- exact fp32 tiles -------------------------------------------------------------------------------------
// One body per vector width: VEC (a register of LANES floats) and its load, FMA, sum and int8/uint8 widening.
// dequant_NAME writes `count` outputs' weights (rows n.. of W) into tile[count][K]; micro_NAME<NB, RB> adds up
// NB outputs for RB activation rows, each pair in its own accumulator, then sums the lanes once.
#define SLM_TILES(NAME, TARGET, VEC, LANES, LOAD, STORE, FMA, MUL, SET1, ZERO, SUM, U8_TO_F32, I8_TO_F32)       \
    TARGET void dequant_##NAME(const uint8_t* qs, const int8_t* q8, const float* d, const float* m,             \
                               const float* s, int64_t groups, int64_t K, int64_t n, int count, float* tile) {  \
        const int64_t G = K / 32;                                                                              \
        for (int i = 0; i < count; ++i) {                                                                      \
            float* out = tile + i * K;                                                                         \
            if (qs != nullptr) {                                                                               \
                const uint8_t* q = qs + (n + i) * K / 2;                                                       \
                for (int64_t g = 0; g < G; ++g) {                                                              \
                    const VEC dg = SET1(d[(n + i) * G + g]), mg = SET1(m[(n + i) * G + g]);                    \
                    for (int j = 0; j < 16; j += LANES) {                                                      \
                        STORE(out + g * 32 + j, FMA(U8_TO_F32(q + g * 16 + j, 15, 0), dg, mg));                \
                        STORE(out + g * 32 + 16 + j, FMA(U8_TO_F32(q + g * 16 + j, 15, 4), dg, mg));           \
                    }                                                                                          \
                }                                                                                              \
            } else {                                                                                           \
                const int8_t* q = q8 + (n + i) * K;                                                            \
                const int64_t group = K / groups;                                                              \
                for (int64_t g = 0; g < groups; ++g) {                                                         \
                    const VEC scale = SET1(s[(n + i) * groups + g]);                                           \
                    for (int64_t j = g * group; j < (g + 1) * group; j += LANES)                               \
                        STORE(out + j, MUL(I8_TO_F32(q + j), scale));                                          \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    }                                                                                                          \
    template <int NB, int RB>                                                                                  \
    TARGET void micro_##NAME(const float* tile, const float* x, int64_t K, float* y, int64_t ldy, int64_t n) { \
        VEC acc[NB][RB];                                                                                       \
        for (int i = 0; i < NB; ++i)                                                                           \
            for (int j = 0; j < RB; ++j) acc[i][j] = ZERO();                                                   \
        for (int64_t k = 0; k < K; k += LANES) {                                                               \
            VEC w[NB], xv[RB];                                                                                 \
            for (int i = 0; i < NB; ++i) w[i] = LOAD(tile + i * K + k);                                        \
            for (int j = 0; j < RB; ++j) xv[j] = LOAD(x + j * K + k);                                          \
            for (int i = 0; i < NB; ++i)                                                                       \
                for (int j = 0; j < RB; ++j) acc[i][j] = FMA(w[i], xv[j], acc[i][j]);                          \
        }                                                                                                      \
        for (int i = 0; i < NB; ++i)                                                                           \
            for (int j = 0; j < RB; ++j) y[j * ldy + n + i] = SUM(acc[i][j]);                                  \
    }                                                                                                          \
    /* few rows (decode): four outputs' weights dequantized in registers and used at once, no tile between */  \
    template <int RB>                                                                                          \
    TARGET void direct_##NAME(const uint8_t* qs, const int8_t* q8, const float* d, const float* m,             \
                              const float* s, int64_t groups, const float* x, int64_t K, float* y, int64_t ldy, \
                              int64_t n0, int64_t n1) {                                                        \
        const int64_t G = K / 32;                                                                              \
        constexpr int HALF = 16 / LANES;  /* q4: the first HALF chunks of a group are low nibbles */            \
        for (int64_t n = n0; n + 4 <= n1; n += 4) {                                                            \
            VEC acc[4][RB];                                                                                    \
            for (int i = 0; i < 4; ++i)                                                                        \
                for (int j = 0; j < RB; ++j) acc[i][j] = ZERO();                                               \
            for (int64_t g = 0; g < G; ++g)                                                                    \
                for (int c = 0; c < 32 / LANES; ++c) {                                                         \
                    VEC w[4], xv[RB];                                                                          \
                    for (int i = 0; i < 4; ++i)                                                                \
                        w[i] = qs != nullptr                                                                   \
                            ? FMA(U8_TO_F32(qs + (n + i) * K / 2 + g * 16 + (c % HALF) * LANES, 15,           \
                                            c < HALF ? 0 : 4), SET1(d[(n + i) * G + g]), SET1(m[(n + i) * G + g])) \
                            : MUL(I8_TO_F32(q8 + (n + i) * K + g * 32 + c * LANES),                            \
                                  SET1(groups == 1 ? s[n + i] : s[(n + i) * groups + g]));                     \
                    for (int j = 0; j < RB; ++j) xv[j] = LOAD(x + j * K + g * 32 + c * LANES);                 \
                    for (int i = 0; i < 4; ++i)                                                                \
                        for (int j = 0; j < RB; ++j) acc[i][j] = FMA(w[i], xv[j], acc[i][j]);                  \
                }                                                                                              \
            for (int i = 0; i < 4; ++i)                                                                        \
                for (int j = 0; j < RB; ++j) y[j * ldy + n + i] = SUM(acc[i][j]);                              \
        }                                                                                                      \
    }                                                                                                          \
    /* outputs n0..n1 for all M rows: NB outputs dequantized at a time, then RB rows at a time */              \
    TARGET void tiles_##NAME(const uint8_t* qs, const int8_t* q8, const float* d, const float* m,              \
                             const float* s, int64_t groups, const float* x, int64_t M, int64_t K, float* y,   \
                             int64_t ldy, int64_t n0, int64_t n1, float* tile) {                               \
        constexpr int NB = 4, RB = 4;                                                                          \
        for (int64_t n = n0; n < n1; n += NB) {                                                                \
            const int count = int(std::min<int64_t>(NB, n1 - n));                                             \
            dequant_##NAME(qs, q8, d, m, s, groups, K, n, count, tile);                                        \
            int64_t r = 0;                                                                                     \
            for (; count == NB && r + RB <= M; r += RB) micro_##NAME<NB, RB>(tile, x + r * K, K, y + r * ldy, ldy, n); \
            if (count == NB && M - r == 3) micro_##NAME<NB, 3>(tile, x + r * K, K, y + r * ldy, ldy, n);      \
            if (count == NB && M - r == 2) micro_##NAME<NB, 2>(tile, x + r * K, K, y + r * ldy, ldy, n);      \
            if (count == NB && M - r == 1) micro_##NAME<NB, 1>(tile, x + r * K, K, y + r * ldy, ldy, n);      \
            r = count == NB ? M : r;                                                                           \
            for (int i = 0; i < count && r < M; ++i) /* the last outputs, fewer than NB */                     \
                for (int64_t j = r; j < M; ++j) micro_##NAME<1, 1>(tile + i * K, x + j * K, K, y + j * ldy, ldy, n + i); \
        }                                                                                                      \
    }

#define SLM_512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define SLM_256 __attribute__((target("avx2,fma,f16c")))

// 16 lanes
SLM_512 inline __m512 avx512_u8(const uint8_t* p, int mask, int shift) {  // 16 nibbles of bytes p[0..15]
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(b, shift), _mm512_set1_epi32(mask)));
}
SLM_512 inline __m512 avx512_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
SLM_TILES(avx512, SLM_512, __m512, 16, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_fmadd_ps, _mm512_mul_ps,
          _mm512_set1_ps, _mm512_setzero_ps, _mm512_reduce_add_ps, avx512_u8, avx512_i8)

// 8 lanes
SLM_256 inline __m256 avx2_u8(const uint8_t* p, int mask, int shift) {  // 8 nibbles of bytes p[0..7]
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(b, shift), _mm256_set1_epi32(mask)));
}
SLM_256 inline __m256 avx2_i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
SLM_256 inline float avx2_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
SLM_TILES(avx2, SLM_256, __m256, 8, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps, _mm256_mul_ps,
          _mm256_set1_ps, _mm256_setzero_ps, avx2_sum, avx2_u8, avx2_i8)

bool cpu_has(Isa isa) {
    static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                             __builtin_cpu_supports("f16c");
    static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                               __builtin_cpu_supports("avx512vl");
    switch (isa) {
        case Isa::avx2: case Isa::avx2_int16: return avx2;
        case Isa::avx512: return avx512;
        case Isa::avx_vnni: return avx2 && __builtin_cpu_supports("avxvnni");
        case Isa::avx512_vnni: return avx512 && __builtin_cpu_supports("avx512vnni");
        default: return true;
    }
}

const char* NAMES[] = {"plain", "avx2", "avx512", "avx2-int16", "avx-vnni", "avx512-vnni"};
const Isa BEST_FIRST[] = {Isa::avx512, Isa::avx2, Isa::avx512_vnni, Isa::avx_vnni, Isa::avx2_int16, Isa::plain};

constexpr int64_t DIRECT_ROWS = 6;  // up to here weights dequantized in registers beat a tile (bench gemv)

// The exact kernels for outputs in parallel chunks of whole tiles; q4 (qs) or q8 (q8, s, groups).
void tiles(const uint8_t* qs, const int8_t* q8, const float* d, const float* m, const float* s, int64_t groups,
           const float* x, int64_t M, int64_t K, int64_t N, float* y, int64_t ldy, Isa isa) {
    at::parallel_for(0, (N + 3) / 4, 2, [&](int64_t b0, int64_t b1) {
        std::vector<float> tile(4 * K);
        int64_t n0 = b0 * 4;
        const int64_t n1 = std::min(N, b1 * 4);
        if (M <= DIRECT_ROWS) {  // whole blocks of four outputs directly, three rows at a time; the tiles do the rest
            const int64_t whole = n0 + (n1 - n0) / 4 * 4;
            for (int64_t r = 0; r < M; r += 3) {
                const float* xr = x + r * K;
                float* yr = y + r * ldy;
                const int64_t rows = std::min<int64_t>(3, M - r);
                if (isa == Isa::avx512) {
                    if (rows == 1) direct_avx512<1>(qs, q8, d, m, s, groups, xr, K, yr, ldy, n0, whole);
                    else if (rows == 2) direct_avx512<2>(qs, q8, d, m, s, groups, xr, K, yr, ldy, n0, whole);
                    else direct_avx512<3>(qs, q8, d, m, s, groups, xr, K, yr, ldy, n0, whole);
                } else {
                    if (rows == 1) direct_avx2<1>(qs, q8, d, m, s, groups, xr, K, yr, ldy, n0, whole);
                    else if (rows == 2) direct_avx2<2>(qs, q8, d, m, s, groups, xr, K, yr, ldy, n0, whole);
                    else direct_avx2<3>(qs, q8, d, m, s, groups, xr, K, yr, ldy, n0, whole);
                }
            }
            n0 = whole;
        }
        if (isa == Isa::avx512) tiles_avx512(qs, q8, d, m, s, groups, x, M, K, y, ldy, n0, n1, tile.data());
        else tiles_avx2(qs, q8, d, m, s, groups, x, M, K, y, ldy, n0, n1, tile.data());
    });
}

}  // namespace

Family family(Isa isa) {
    if (isa == Isa::avx512 || isa == Isa::avx512_vnni) return Family::avx512;
    return isa == Isa::plain ? Family::plain : Family::avx2;
}

std::vector<std::string> isas() {
    std::vector<std::string> out;
    for (Isa isa : BEST_FIRST)
        if (cpu_has(isa)) out.push_back(NAMES[int(isa)]);
    return out;
}

Isa parse_isa(const std::string& name) {
    for (Isa isa : BEST_FIRST) {
        if (name == NAMES[int(isa)]) {
            TORCH_CHECK(cpu_has(isa), "this CPU cannot run the '", name, "' kernels");
            return isa;
        }
    }
    TORCH_CHECK(false, "unknown kernel instruction set '", name, "'");
}

void q4_matmul(const float* x, int64_t M, int64_t K, const uint8_t* qs, const float* d, const float* m, int64_t N,
               float* y, int64_t ldy, Isa isa) {
    if (isa == Isa::plain) {
        const int64_t G = K / 32;
        std::vector<float> xsum(M * G, 0.f);  // each group's sum of x, for the m * sum(x) terms
        for (int64_t i = 0; i < M * K; ++i) xsum[i / 32] += x[i];
        at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
            q4_rows_plain(x, xsum.data(), M, K, qs, d, m, y, ldy, n0, n1);
        });
    } else if (isa == Isa::avx512 || isa == Isa::avx2) {
        tiles(qs, nullptr, d, m, nullptr, 0, x, M, K, N, y, ldy, isa);
    } else {
        q4_matmul_int16(x, M, K, qs, d, m, N, y, ldy, isa);
    }
}

void q8_matmul(const float* x, int64_t M, int64_t K, const int8_t* q, const float* s, int64_t groups, int64_t N,
               float* y, int64_t ldy, Isa isa) {
    if (isa == Isa::plain) {
        at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
            q8_rows_plain(x, M, K, q, s, groups, y, ldy, n0, n1);
        });
    } else if (isa == Isa::avx512 || isa == Isa::avx2) {
        tiles(nullptr, q, nullptr, nullptr, s, groups, x, M, K, N, y, ldy, isa);
    } else {
        q8_matmul_int16(x, M, K, q, s, groups, N, y, ldy, isa);
    }
}

namespace {

void check_x(const at::Tensor& x, int64_t K) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == K && x.is_contiguous(),
                "x must be a contiguous float32 matrix with ", K, " columns");
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m,
                     const std::string& isa) {
    const int64_t N = qs.size(0), K = qs.size(1) * 2, G = K / 32;
    check_x(x, K);
    TORCH_CHECK(K % 32 == 0 && qs.scalar_type() == at::kByte && d.scalar_type() == at::kFloat &&
                m.scalar_type() == at::kFloat && d.size(1) == G && m.size(1) == G && qs.is_contiguous() &&
                d.is_contiguous() && m.is_contiguous(), "bad q4 weight layout");
    auto y = at::empty({x.size(0), N}, x.options());
    q4_matmul(x.data_ptr<float>(), x.size(0), K, qs.data_ptr<uint8_t>(), d.data_ptr<float>(), m.data_ptr<float>(), N,
              y.data_ptr<float>(), N, parse_isa(isa));
    return y;
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, const std::string& isa) {
    const int64_t N = q.size(0), K = q.size(1);
    check_x(x, K);
    TORCH_CHECK(q.scalar_type() == at::kChar && s.scalar_type() == at::kFloat && K % 32 == 0 &&
                (s.size(1) == 1 || s.size(1) == K / 32) && q.is_contiguous() && s.is_contiguous(),
                "bad q8 weight layout: one scale per row or per 32");
    auto y = at::empty({x.size(0), N}, x.options());
    q8_matmul(x.data_ptr<float>(), x.size(0), K, q.data_ptr<int8_t>(), s.data_ptr<float>(), s.size(1), N,
              y.data_ptr<float>(), N, parse_isa(isa));
    return y;
}

}  // namespace
}  // namespace slm

// Dispatcher ops, so that a compiled graph calls them without going through Python.
TORCH_LIBRARY(slm, lib) {
    lib.def("q4_linear(Tensor x, Tensor qs, Tensor d, Tensor m, str isa) -> Tensor");
    lib.def("q8_linear(Tensor x, Tensor q, Tensor s, str isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(slm, CPU, lib) {
    lib.impl("q4_linear", &slm::q4_linear);
    lib.impl("q8_linear", &slm::q8_linear);
}
