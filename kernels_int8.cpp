// The int8 kernels for passes of many tokens: activations rounded to 8 bits per group of 32 (x = s * q8), as
// llama.cpp's Q8_1 and OpenVINO's dynamic quantization do, so that AVX-512 VNNI's vpdpbusd multiplies and adds
// 64 byte pairs an instruction where an fp32 FMA does 16. Only each group's integer sum becomes a float.
//
// Each 16 outputs' weights are first repacked into a panel that stays in L1: one 64-byte vector holds four
// consecutive weights of each of the 16 outputs (its 32-bit lanes), so that one vpdpbusd adds four products
// into each output's lane against four activations of one row, broadcast. The panel is then used for every
// row, eight at a time. q4 (Q4_1) weights are unsigned nibbles, the instruction's unsigned operand; int8 ones
// are signed, so there the activations become unsigned (q + 128) and each group takes back 128 * sum(w).
// Opt in with --machine quant_kernel=avx512-int8 (the numbers change, as they do in llama.cpp); fp32 weights run the exact tiles.
#include "kernels.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>

namespace slm {
namespace {

// The activations: per row and group of 32, int8 values q (q + 128 as unsigned bytes for int8 weights), the
// scale s = max |x| / 127 and the exact fp32 sum of x (the q4 offset m multiplies it).
struct Activations {
    std::vector<int8_t> q;
    std::vector<float> scale, sum;
};

// One group of 32: its scale and sum, and its values rounded to int8 (to nearest, ties to even) into q.
inline void group_to_int8(const float* x, bool unsigned_bytes, int8_t* q, float* scale, float* sum) {
    float top = 0.f, total = 0.f;
    for (int j = 0; j < 32; ++j) { top = std::max(top, std::fabs(x[j])); total += x[j]; }
    const float inverse = top > 0.f ? 127.f / top : 0.f;
    for (int j = 0; j < 32; ++j) {
        const int v = int(std::nearbyint(x[j] * inverse));
        q[j] = int8_t(unsigned_bytes ? v ^ -128 : v);  // v ^ -128 is v + 128 read as a byte
    }
    *scale = top / 127.f, *sum = total;
}

Activations to_int8(const float* x, int64_t M, int64_t K, bool unsigned_bytes,
                    void (*group)(const float*, bool, int8_t*, float*, float*)) {
    const int64_t groups = M * K / 32;
    Activations a{std::vector<int8_t>(M * K), std::vector<float>(groups), std::vector<float>(groups)};
    for (int64_t i = 0; i < groups; ++i) group(x + i * 32, unsigned_bytes, a.q.data() + i * 32, &a.scale[i], &a.sum[i]);
    return a;
}

// The same arithmetic in plain loops, on any CPU: the reference the AVX-512 kernel is tested against.
void int8_rows_plain(const Weights& W, const Activations& a, int64_t M, float* y, int64_t ldy, int64_t n0,
                     int64_t n1) {
    const int64_t K = W.K, G = K / 32;
    for (int64_t n = n0; n < n1; ++n)
        for (int64_t r = 0; r < M; ++r) {
            float acc = 0.f;
            for (int64_t g = 0; g < G; ++g) {
                const int8_t* xq = a.q.data() + (r * G + g) * 32;
                int32_t dot = 0;
                if (W.qs != nullptr) {
                    const uint8_t* q = W.qs + n * K / 2 + g * 16;
                    for (int j = 0; j < 16; ++j) dot += (q[j] & 15) * xq[j] + (q[j] >> 4) * xq[j + 16];
                    acc += to_float(W.d[n * G + g]) * a.scale[r * G + g] * float(dot) +
                           to_float(W.m[n * G + g]) * a.sum[r * G + g];
                } else {
                    int32_t wsum = 0;
                    for (int j = 0; j < 32; ++j) {
                        const int32_t w = W.q[n * K + g * 32 + j];
                        dot += w * (uint8_t(xq[j]));
                        wsum += w;
                    }
                    const float s = to_float(W.groups == 1 ? W.s[n] : W.s[n * G + g]);
                    acc += s * a.scale[r * G + g] * float(dot) - 128.f * float(wsum) * s * a.scale[r * G + g];
                }
            }
            y[r * ldy + n] = acc;
        }
}

#define SLM_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

SLM_VNNI void group_to_int8_avx512(const float* x, bool unsigned_bytes, int8_t* q, float* scale, float* sum) {
    const __m512 lo = _mm512_loadu_ps(x), hi = _mm512_loadu_ps(x + 16);
    const float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const __m512 inverse = _mm512_set1_ps(top > 0.f ? 127.f / top : 0.f);
    const __m512i flip = _mm512_set1_epi32(unsigned_bytes ? -128 : 0);
    for (int half = 0; half < 2; ++half) {  // rounds to nearest, ties to even, as std::nearbyint does
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(half ? hi : lo, inverse));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16 * half), _mm512_cvtepi32_epi8(_mm512_xor_si512(v, flip)));
    }
    *scale = top / 127.f, *sum = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
}

// A panel holds the outputs in the order the 4 x 4 transposes leave them: lane 4i + j is output 4j + i.
constexpr int LANE_OUTPUT[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};

// Four 32-bit words (16 bytes at p[row] + offset) of each of 16 rows, transposed: out[c] lane 4i + j holds word
// c of row 4j + i.
SLM_VNNI inline void transpose_16x4(const uint8_t* const* p, int64_t offset, __m512i out[4]) {
    __m512i a[4];
    for (int j = 0; j < 4; ++j) {
        __m512i v = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p[4 * j] + offset)));
        for (int i = 1; i < 4; ++i)
            v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p[4 * j + i] + offset)), i);
        a[j] = v;  // its 128-bit lane i: row 4j + i
    }
    const __m512i u0 = _mm512_unpacklo_epi32(a[0], a[1]), u1 = _mm512_unpackhi_epi32(a[0], a[1]);
    const __m512i u2 = _mm512_unpacklo_epi32(a[2], a[3]), u3 = _mm512_unpackhi_epi32(a[2], a[3]);
    out[0] = _mm512_unpacklo_epi64(u0, u2), out[1] = _mm512_unpackhi_epi64(u0, u2);
    out[2] = _mm512_unpacklo_epi64(u1, u3), out[3] = _mm512_unpackhi_epi64(u1, u3);
}

// Outputs n .. n + count (count <= 16; the missing lanes repeat the last output) into one panel: for each group,
// q4: 4 vectors whose byte j holds weight j of a run (low nibble, runs 0-3) and of the run 4 later (high);
// int8: 8 vectors of four signed weights a lane. Run c of a group is its weights 4c .. 4c + 3.
SLM_VNNI void pack(const Weights& W, int64_t n, int count, int32_t* words, float* scale, float* offset) {
    const int64_t K = W.K, G = K / 32;
    const bool q4 = W.qs != nullptr;
    const int per = q4 ? 4 : 8;
    const uint8_t* rows[16];
    for (int i = 0; i < 16; ++i) {
        const int64_t out = n + std::min(i, count - 1);
        rows[i] = q4 ? W.qs + out * K / 2 : reinterpret_cast<const uint8_t*>(W.q + out * K);
    }
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t g = 0; g < G; ++g) {
        __m512i w[8];
        transpose_16x4(rows, q4 ? g * 16 : g * 32, w);
        if (!q4) transpose_16x4(rows, g * 32 + 16, w + 4);
        for (int c = 0; c < per; ++c) _mm512_storeu_si512(words + (g * per + c) * 16, w[c]);
        __m512i wsum = _mm512_setzero_si512();  // int8: each lane's sum of its 32 weights
        if (!q4)
            for (int c = 0; c < 8; ++c) wsum = _mm512_dpbusd_epi32(wsum, ones, w[c]);
        alignas(64) int32_t sums[16];
        _mm512_store_si512(sums, wsum);
        for (int lane = 0; lane < 16; ++lane) {
            const int64_t out = n + std::min(LANE_OUTPUT[lane], count - 1);
            if (q4) {
                scale[g * 16 + lane] = _cvtsh_ss(W.d[out * G + g]);
                offset[g * 16 + lane] = _cvtsh_ss(W.m[out * G + g]);
            } else {
                const float s = _cvtsh_ss(W.groups == 1 ? W.s[out] : W.s[out * G + g]);
                scale[g * 16 + lane] = s;
                offset[g * 16 + lane] = -128.f * float(sums[lane]) * s;
            }
        }
    }
}

// RB rows (r0..) times one panel, into y's outputs n .. n + count.
template <bool Q4, int RB>
SLM_VNNI void rows_times_panel(const int32_t* words, const float* scale, const float* offset,
                               const Activations& a, int64_t r0, int64_t K, float* y, int64_t ldy, int64_t n,
                               int count) {
    const int64_t G = K / 32;
    const __m512i low = _mm512_set1_epi8(15);
    __m512 acc[RB];
    for (int r = 0; r < RB; ++r) acc[r] = _mm512_setzero_ps();
    const int32_t* x = reinterpret_cast<const int32_t*>(a.q.data()) + r0 * K / 4;  // four bytes a word
    for (int64_t g = 0; g < G; ++g) {
        __m512i dot[RB];
        for (int r = 0; r < RB; ++r) dot[r] = _mm512_setzero_si512();
        for (int c = 0; c < (Q4 ? 4 : 8); ++c) {
            const __m512i v = _mm512_loadu_si512(words + (g * (Q4 ? 4 : 8) + c) * 16);
            for (int half = 0; half < (Q4 ? 2 : 1); ++half) {  // q4: run c's nibbles, then run c + 4's
                const int run = c + 4 * half;
                const __m512i w = Q4 ? _mm512_and_si512(half ? _mm512_srli_epi16(v, 4) : v, low) : v;
                for (int r = 0; r < RB; ++r) {
                    const __m512i xv = _mm512_set1_epi32(x[r * K / 4 + g * 8 + run]);
                    dot[r] = Q4 ? _mm512_dpbusd_epi32(dot[r], w, xv) : _mm512_dpbusd_epi32(dot[r], xv, w);
                }
            }
        }
        const __m512 sv = _mm512_loadu_ps(scale + g * 16), ov = _mm512_loadu_ps(offset + g * 16);
        for (int r = 0; r < RB; ++r) {
            const int64_t i = (r0 + r) * G + g;
            const __m512 s = _mm512_set1_ps(a.scale[i]);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), _mm512_mul_ps(sv, s), acc[r]);
            acc[r] = _mm512_fmadd_ps(ov, Q4 ? _mm512_set1_ps(a.sum[i]) : s, acc[r]);
        }
    }
    const __m512i order = _mm512_loadu_si512(LANE_OUTPUT);  // the transpose is its own inverse
    const __mmask16 keep = __mmask16((1u << count) - 1);
    for (int r = 0; r < RB; ++r)
        _mm512_mask_storeu_ps(y + (r0 + r) * ldy + n, keep, _mm512_permutexvar_ps(order, acc[r]));
}

// Outputs n0..n1 for all M rows: each panel (the caller's, or packed here) times the rows, eight at a time.
template <bool Q4>
SLM_VNNI void slice_vnni(const Weights& W, const Activations& a, int64_t M, float* y, int64_t ldy, int64_t n0,
                         int64_t n1) {
    const int64_t K = W.K, G = K / 32, per = Q4 ? 4 : 8;
    const bool packed = W.panels != nullptr && n0 % 16 == 0;
    std::vector<int32_t> words(packed ? 0 : G * per * 16);
    std::vector<float> scale(packed ? 0 : G * 16), offset(packed ? 0 : G * 16);
    for (int64_t n = n0; n < n1; n += 16) {
        const int count = int(std::min<int64_t>(16, n1 - n));
        const int32_t* w = words.data();
        const float *s = scale.data(), *o = offset.data();
        if (packed) {
            const int64_t panel = n / 16;
            w = W.panels->w.data() + panel * G * per * 16;
            s = W.panels->scale.data() + panel * G * 16, o = W.panels->offset.data() + panel * G * 16;
        } else {
            pack(W, n, count, words.data(), scale.data(), offset.data());
        }
        int64_t r = 0;
        for (; r + 8 <= M; r += 8) rows_times_panel<Q4, 8>(w, s, o, a, r, K, y, ldy, n, count);
        for (; r + 4 <= M; r += 4) rows_times_panel<Q4, 4>(w, s, o, a, r, K, y, ldy, n, count);
        for (; r < M; ++r) rows_times_panel<Q4, 1>(w, s, o, a, r, K, y, ldy, n, count);
    }
}

}  // namespace

Panels pack_panels(const Weights& W) {
    TORCH_CHECK(W.w == nullptr && W.K % 32 == 0, "the int8 kernels take int4/int8 weights");
    const int64_t G = W.K / 32, panels = (W.N + 15) / 16;
    Panels p{std::vector<int32_t>(panels * G * 16 * (W.qs ? 4 : 8)), std::vector<float>(panels * G * 16),
             std::vector<float>(panels * G * 16)};
    for (int64_t i = 0; i < panels; ++i)
        pack(W, i * 16, int(std::min<int64_t>(16, W.N - i * 16)), p.w.data() + i * G * 16 * (W.qs ? 4 : 8),
             p.scale.data() + i * G * 16, p.offset.data() + i * G * 16);
    return p;
}

void int8_slice(const Weights& W, const float* x, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1,
                Isa isa) {
    if (isa == Isa::plain_int8)
        return int8_rows_plain(W, to_int8(x, M, W.K, W.qs == nullptr, group_to_int8), M, y, ldy, n0, n1);
    // each thread rounds all rows itself: cheap beside its share of the weights' products
    const Activations a = to_int8(x, M, W.K, W.qs == nullptr, group_to_int8_avx512);
    if (W.qs != nullptr) return slice_vnni<true>(W, a, M, y, ldy, n0, n1);
    slice_vnni<false>(W, a, M, y, ldy, n0, n1);
}

}  // namespace slm
