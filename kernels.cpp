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
                   const half* d, const half* m, float* y, int64_t ldy, int64_t n0, int64_t n1) {
    const int64_t G = K / 32;
    for (int64_t n = n0; n < n1; ++n) {
        for (int64_t r = 0; r < M; ++r) {
            float acc = 0.f;
            for (int64_t g = 0; g < G; ++g) {
                const uint8_t* q = qs + n * K / 2 + g * 16;
                const float* xg = x + r * K + g * 32;
                float dot = 0.f;
                for (int j = 0; j < 16; ++j) dot += xg[j] * float(q[j] & 15) + xg[j + 16] * float(q[j] >> 4);
                acc += to_float(d[n * G + g]) * dot + to_float(m[n * G + g]) * xsum[r * G + g];
            }
            y[r * ldy + n] = acc;
        }
    }
}

void q8_rows_plain(const float* x, int64_t M, int64_t K, const int8_t* q, const half* s, int64_t groups,
                   float* y, int64_t ldy, int64_t n0, int64_t n1) {
    const int64_t group = K / groups;
    for (int64_t n = n0; n < n1; ++n) {
        for (int64_t r = 0; r < M; ++r) {
            float acc = 0.f;
            for (int64_t g = 0; g < groups; ++g) {
                float dot = 0.f;
                for (int64_t j = g * group; j < (g + 1) * group; ++j) dot += x[r * K + j] * float(q[n * K + j]);
                acc += to_float(s[n * groups + g]) * dot;
            }
            y[r * ldy + n] = acc;
        }
    }
}

// --- exact fp32 tiles -------------------------------------------------------------------------------------
// One body per vector width: VEC (a register of LANES floats) and its load, FMA, sum and int8/uint8 widening.
// dequant_NAME writes `count` outputs' weights (rows n.. of W) into tile[count][K] (fp32 weights need none:
// their rows are the tile); micro_NAME<NB, RB> adds up NB outputs for RB activation rows, each pair in its own
// accumulator, then sums the lanes once; direct_NAME<RB> does the same for a few rows with the weights
// dequantized in registers and used at once.
#define SLM_TILES(NAME, TARGET, VEC, LANES, LOAD, STORE, FMA, MUL, SET1, ZERO, SUM, U8_TO_F32, I8_TO_F32)       \
    TARGET const float* dequant_##NAME(const Weights& W, int64_t n, int count, float* tile) {                  \
        const int64_t K = W.K, G = K / 32;                                                                     \
        if (W.w != nullptr) return W.w + n * K;                                                                \
        for (int i = 0; i < count; ++i) {                                                                      \
            float* out = tile + i * K;                                                                         \
            if (W.qs != nullptr) {                                                                             \
                const uint8_t* q = W.qs + (n + i) * K / 2;                                                     \
                for (int64_t g = 0; g < G; ++g) {                                                              \
                    const VEC dg = SET1(_cvtsh_ss(W.d[(n + i) * G + g])), mg = SET1(_cvtsh_ss(W.m[(n + i) * G + g])); \
                    for (int j = 0; j < 16; j += LANES) {                                                      \
                        STORE(out + g * 32 + j, FMA(U8_TO_F32(q + g * 16 + j, 15, 0), dg, mg));                \
                        STORE(out + g * 32 + 16 + j, FMA(U8_TO_F32(q + g * 16 + j, 15, 4), dg, mg));           \
                    }                                                                                          \
                }                                                                                              \
            } else {                                                                                           \
                const int8_t* q = W.q + (n + i) * K;                                                           \
                const int64_t group = K / W.groups;                                                            \
                for (int64_t g = 0; g < W.groups; ++g) {                                                       \
                    const VEC scale = SET1(_cvtsh_ss(W.s[(n + i) * W.groups + g]));                            \
                    for (int64_t j = g * group; j < (g + 1) * group; j += LANES)                               \
                        STORE(out + j, MUL(I8_TO_F32(q + j), scale));                                          \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        return tile;                                                                                           \
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
    template <int RB>                                                                                          \
    TARGET void direct_##NAME(const Weights& W, const float* x, float* y, int64_t ldy, int64_t n0, int64_t n1) { \
        const int64_t K = W.K, G = K / 32;                                                                     \
        constexpr int HALF = 16 / LANES;  /* q4: the first HALF chunks of a group are low nibbles */            \
        for (int64_t n = n0; n + 4 <= n1; n += 4) {                                                            \
            VEC acc[4][RB];                                                                                    \
            for (int i = 0; i < 4; ++i)                                                                        \
                for (int j = 0; j < RB; ++j) acc[i][j] = ZERO();                                               \
            for (int64_t g = 0; g < G; ++g)                                                                    \
                for (int c = 0; c < 32 / LANES; ++c) {                                                         \
                    const int64_t k = g * 32 + c * LANES;                                                      \
                    VEC w[4], xv[RB];                                                                          \
                    for (int i = 0; i < 4; ++i) {                                                              \
                        const int64_t row = n + i;                                                             \
                        if (W.w != nullptr) w[i] = LOAD(W.w + row * K + k);                                    \
                        else if (W.qs != nullptr)                                                              \
                            w[i] = FMA(U8_TO_F32(W.qs + row * K / 2 + g * 16 + (c % HALF) * LANES, 15,          \
                                                 c < HALF ? 0 : 4), SET1(_cvtsh_ss(W.d[row * G + g])),        \
                                       SET1(_cvtsh_ss(W.m[row * G + g])));                                     \
                        else                                                                                   \
                            w[i] = MUL(I8_TO_F32(W.q + row * K + k),                                           \
                                       SET1(_cvtsh_ss(W.groups == 1 ? W.s[row] : W.s[row * W.groups + g])));   \
                    }                                                                                          \
                    for (int j = 0; j < RB; ++j) xv[j] = LOAD(x + j * K + k);                                  \
                    for (int i = 0; i < 4; ++i)                                                                \
                        for (int j = 0; j < RB; ++j) acc[i][j] = FMA(w[i], xv[j], acc[i][j]);                  \
                }                                                                                              \
            for (int i = 0; i < 4; ++i)                                                                        \
                for (int j = 0; j < RB; ++j) y[j * ldy + n + i] = SUM(acc[i][j]);                              \
        }                                                                                                      \
    }                                                                                                          \
    /* outputs n0..n1 for all M rows: a few rows directly, three at a time; more through tiles of NB outputs, \
       RB rows at a time */                                                                                    \
    TARGET void slice_##NAME(const Weights& W, const float* x, int64_t M, float* y, int64_t ldy, int64_t n0,   \
                             int64_t n1, float* tile) {                                                        \
        constexpr int NB = 4, RB = 4;                                                                          \
        const int64_t K = W.K;                                                                                 \
        if (M <= DIRECT_ROWS) {                                                                                \
            const int64_t whole = n0 + (n1 - n0) / 4 * 4;                                                      \
            for (int64_t r = 0; r < M; r += 3) {                                                               \
                const int64_t rows = std::min<int64_t>(3, M - r);                                              \
                if (rows == 1) direct_##NAME<1>(W, x + r * K, y + r * ldy, ldy, n0, whole);                    \
                else if (rows == 2) direct_##NAME<2>(W, x + r * K, y + r * ldy, ldy, n0, whole);               \
                else direct_##NAME<3>(W, x + r * K, y + r * ldy, ldy, n0, whole);                              \
            }                                                                                                  \
            n0 = whole;                                                                                        \
        }                                                                                                      \
        for (int64_t n = n0; n < n1; n += NB) {                                                                \
            const int count = int(std::min<int64_t>(NB, n1 - n));                                             \
            const float* t = dequant_##NAME(W, n, count, tile);                                                \
            int64_t r = 0;                                                                                     \
            for (; count == NB && r + RB <= M; r += RB) micro_##NAME<NB, RB>(t, x + r * K, K, y + r * ldy, ldy, n); \
            if (count == NB && M - r == 3) micro_##NAME<NB, 3>(t, x + r * K, K, y + r * ldy, ldy, n);         \
            if (count == NB && M - r == 2) micro_##NAME<NB, 2>(t, x + r * K, K, y + r * ldy, ldy, n);         \
            if (count == NB && M - r == 1) micro_##NAME<NB, 1>(t, x + r * K, K, y + r * ldy, ldy, n);         \
            r = count == NB ? M : r;                                                                           \
            for (int i = 0; i < count && r < M; ++i) /* the last outputs, fewer than NB */                     \
                for (int64_t j = r; j < M; ++j) micro_##NAME<1, 1>(t + i * K, x + j * K, K, y + j * ldy, ldy, n + i); \
        }                                                                                                      \
    }

constexpr int64_t DIRECT_ROWS = 6;  // up to here weights dequantized in registers beat a tile (bench gemv)

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

void f32_rows_plain(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t ldy, int64_t n0,
                    int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
        for (int64_t r = 0; r < M; ++r) {
            float acc = 0.f;
            for (int64_t k = 0; k < K; ++k) acc += x[r * K + k] * w[n * K + k];
            y[r * ldy + n] = acc;
        }
}

bool cpu_has(Isa isa) {
    static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                             __builtin_cpu_supports("f16c");
    static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                               __builtin_cpu_supports("avx512vl");
    switch (isa) {
        case Isa::avx2: case Isa::avx2_int16: return avx2;
        case Isa::avx512: return avx512;
        case Isa::avx_vnni: return avx2 && __builtin_cpu_supports("avxvnni");
        case Isa::avx512_vnni: case Isa::avx512_int8: return avx512 && __builtin_cpu_supports("avx512vnni");
        default: return true;
    }
}

const char* NAMES[] = {"plain", "avx2", "avx512", "avx2-int16", "avx-vnni", "avx512-vnni", "plain-int8", "avx512-int8"};
const Isa BEST_FIRST[] = {Isa::avx512, Isa::avx2, Isa::avx512_vnni, Isa::avx_vnni, Isa::avx2_int16,
                          Isa::avx512_int8, Isa::plain_int8, Isa::plain};

}  // namespace

Family family(Isa isa) {
    if (isa == Isa::avx512 || isa == Isa::avx512_vnni || isa == Isa::avx512_int8) return Family::avx512;
    return isa == Isa::plain || isa == Isa::plain_int8 ? Family::plain : Family::avx2;
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

void matmul_slice(const Weights& W, const float* x, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1,
                  Isa isa, float* tile) {
    if (n1 <= n0) return;
    switch (isa) {
        case Isa::avx512: return slice_avx512(W, x, M, y, ldy, n0, n1, tile);
        case Isa::avx2: return slice_avx2(W, x, M, y, ldy, n0, n1, tile);
        case Isa::plain:
            if (W.w != nullptr) return f32_rows_plain(x, M, W.K, W.w, y, ldy, n0, n1);
            if (W.q != nullptr) return q8_rows_plain(x, M, W.K, W.q, W.s, W.groups, y, ldy, n0, n1);
            {
                const int64_t G = W.K / 32;
                std::vector<float> xsum(M * G, 0.f);  // each group's sum of x, for the m * sum(x) terms
                for (int64_t i = 0; i < M * W.K; ++i) xsum[i / 32] += x[i];
                return q4_rows_plain(x, xsum.data(), M, W.K, W.qs, W.d, W.m, y, ldy, n0, n1);
            }
        case Isa::avx512_int8:  // fp32 weights run the exact tiles
            if (W.w != nullptr) return slice_avx512(W, x, M, y, ldy, n0, n1, tile);
            return int8_slice(W, x, M, y, ldy, n0, n1, isa);
        case Isa::plain_int8:
            if (W.w != nullptr) return f32_rows_plain(x, M, W.K, W.w, y, ldy, n0, n1);
            return int8_slice(W, x, M, y, ldy, n0, n1, isa);
        default:
            TORCH_CHECK(W.w == nullptr, "the int16 kernels take quantized weights only");
            return int16_slice(W, x, M, y, ldy, n0, n1, isa);
    }
}

void matmul(const Weights& W, const float* x, int64_t M, float* y, int64_t ldy, Isa isa) {
    at::parallel_for(0, (W.N + 3) / 4, 1, [&](int64_t b0, int64_t b1) {
        std::vector<float> tile(4 * W.K);
        matmul_slice(W, x, M, y, ldy, b0 * 4, std::min(W.N, b1 * 4), isa, tile.data());
    });
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
    TORCH_CHECK(K % 32 == 0 && qs.scalar_type() == at::kByte && d.scalar_type() == at::kHalf &&
                m.scalar_type() == at::kHalf && d.size(1) == G && m.size(1) == G && qs.is_contiguous() &&
                d.is_contiguous() && m.is_contiguous(), "bad q4 weight layout");
    auto y = at::empty({x.size(0), N}, x.options());
    Weights W;
    W.qs = qs.data_ptr<uint8_t>(), W.N = N, W.K = K;
    W.d = reinterpret_cast<const half*>(d.data_ptr<at::Half>()), W.m = reinterpret_cast<const half*>(m.data_ptr<at::Half>());
    matmul(W, x.data_ptr<float>(), x.size(0), y.data_ptr<float>(), N, parse_isa(isa));
    return y;
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, const std::string& isa) {
    const int64_t N = q.size(0), K = q.size(1);
    check_x(x, K);
    TORCH_CHECK(q.scalar_type() == at::kChar && s.scalar_type() == at::kHalf && K % 32 == 0 &&
                (s.size(1) == 1 || s.size(1) == K / 32) && q.is_contiguous() && s.is_contiguous(),
                "bad q8 weight layout: one scale per row or per 32");
    auto y = at::empty({x.size(0), N}, x.options());
    Weights W;
    W.q = q.data_ptr<int8_t>(), W.s = reinterpret_cast<const half*>(s.data_ptr<at::Half>()), W.groups = s.size(1);
    W.N = N, W.K = K;
    matmul(W, x.data_ptr<float>(), x.size(0), y.data_ptr<float>(), N, parse_isa(isa));
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
