// The decoder step fused into one call: what model.py's GPT.step computes, without Python between the ops.
//
// A step is a flat batch of N tokens, each with its own cache row and slot (its RoPE position): decode tokens,
// prompt chunks and speculative drafts alike, any number per row. Every layer runs RMSNorm, the q/k/v
// projections, RoPE, the KV-cache writes, attention of each token over its own row's slots up to its own (each
// row as long as it is, no padding), o, RMSNorm, gate/up, SwiGLU and down; then the final norm and the head for
// the tokens whose logits are wanted. The weights stay the model's own tensors (fp32, or the quantized layers'
// int4/int8 blocks), so the numbers are the model's, up to the order of summation; bf16 weights multiply
// inputs rounded to bf16 (kernels_bf16.cpp), the rest of the pass in fp32. The KV cache is fp32, or
// (opt-in, --kv-cache-dtype int8) 8 bits a value with one scale per slot and head, which changes the numbers.
//
// The loops are written once and compiled per instruction set (the quantized matmuls are kernels.cpp's); the
// model runs the set machine.py chose, so a test can pin it.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>

namespace slm {
namespace {

// --- the 8-bit KV cache: each slot of each kv head holds hd int8 values, then one fp32 scale --------------------
// Symmetric, rounded to nearest: scale = max |x| / 127, q = round(x / scale). tests/test_runner.py checks the
// slots against the same rule in torch.
inline float slot_scale(const int8_t* slot, int64_t hd) {
    float scale;
    std::memcpy(&scale, slot + hd, sizeof scale);
    return scale;
}

inline void store_q8(const float* x, int64_t hd, int8_t* slot) {
    float top = 0.f;
    for (int64_t j = 0; j < hd; ++j) top = std::max(top, std::fabs(x[j]));
    const float scale = top / 127.f;
    for (int64_t j = 0; j < hd; ++j) slot[j] = scale > 0.f ? int8_t(std::nearbyint(x[j] / scale)) : int8_t(0);
    std::memcpy(slot + hd, &scale, sizeof scale);
}

// A slot's stored values and the factor they take: an fp32 cache's own (1), an 8-bit one's and its scale.
inline const float* slot_raw(const float* cache, int64_t s, int64_t hd) { return cache + s * hd; }
inline const int8_t* slot_raw(const int8_t* cache, int64_t s, int64_t hd) { return cache + s * (hd + 4); }
inline float slot_factor(const float*, int64_t, int64_t) { return 1.f; }
inline float slot_factor(const int8_t* cache, int64_t s, int64_t hd) { return slot_scale(cache + s * (hd + 4), hd); }

// Vectors of floats that the compiler lowers to each target's registers (one zmm, two ymm, ...).
typedef float vec16 __attribute__((vector_size(64)));
typedef float vec8 __attribute__((vector_size(32)));
typedef float vec4 __attribute__((vector_size(16)));

// --- the elementwise and attention loops, per instruction set ------------------------------------------------
// Dot products keep 16 partial sums, so that the compiler vectorises them for the target (a float sum in one
// accumulator may not be reordered).
#define SLM_LOOPS(NAME, TARGET, HSUM, WIDEN)                                                           \
    TARGET inline float dot_##NAME(const float* a, const float* b, int64_t n) {                                \
        float acc[16] = {0};                                                                                   \
        int64_t j = 0;                                                                                         \
        for (; j + 16 <= n; j += 16)                                                                           \
            for (int t = 0; t < 16; ++t) acc[t] += a[j + t] * b[j + t];                                        \
        for (; j < n; ++j) acc[j % 16] += a[j] * b[j];                                                         \
        return HSUM(acc);                                                                                      \
    }                                                                                                          \
    /* y[i] = x[i] / rms(x[i]) * w, row by row */                                                              \
    TARGET void rmsnorm_##NAME(const float* x, const float* w, float* y, int64_t rows, int64_t n, float eps) { \
        for (int64_t r = 0; r < rows; ++r) {                                                                   \
            const float scale = 1.f / std::sqrt(dot_##NAME(x + r * n, x + r * n, n) / n + eps);                \
            for (int64_t j = 0; j < n; ++j) y[r * n + j] = x[r * n + j] * scale * w[j];                         \
        }                                                                                                      \
    }                                                                                                          \
    /* rotate-half RoPE, in place, on `heads` heads of one token */                                            \
    TARGET void rope_##NAME(float* x, int64_t heads, int64_t hd, const float* cos, const float* sin) {         \
        const int64_t half = hd / 2;                                                                           \
        for (int64_t h = 0; h < heads; ++h) {                                                                  \
            float* v = x + h * hd;                                                                             \
            float lo[256], hi[256];                                                                            \
            for (int64_t j = 0; j < half; ++j) { lo[j] = v[j]; hi[j] = v[j + half]; }                          \
            for (int64_t j = 0; j < half; ++j) {                                                               \
                v[j] = lo[j] * cos[j] - hi[j] * sin[j];                                                        \
                v[j + half] = hi[j] * cos[j + half] + lo[j] * sin[j + half];                                   \
            }                                                                                                  \
        }                                                                                                      \
    }                                                                                                          \
    /* e^y: Cephes' expf polynomial (within 2 ulp) in plain arithmetic, which vectorises in a loop (a call to  \
       std::exp per value does not: a row of 1,000 slots has 1,000 of them per head, SwiGLU one per activation) */ \
    TARGET inline float exp_##NAME(float y) {                                                                  \
        y = std::min(std::max(y, -87.f), 88.f);                                                                \
        const float k = (y * 1.44269504f + 12582912.f) - 12582912.f; /* round to nearest */                    \
        const float r = y - k * 0.693359375f + k * 2.12194440e-4f;                                             \
        float p = 1.9875691500e-4f;                                                                            \
        p = p * r + 1.3981999507e-3f;                                                                          \
        p = p * r + 8.3334519073e-3f;                                                                          \
        p = p * r + 4.1665795894e-2f;                                                                          \
        p = p * r + 1.6666665459e-1f;                                                                          \
        p = p * r + 5.0000001201e-1f;                                                                          \
        p = p * r * r + r + 1.f;                                                                               \
        const int32_t bits = (int32_t(k) + 127) << 23;                                                         \
        float two_k;                                                                                           \
        std::memcpy(&two_k, &bits, sizeof two_k);                                                              \
        return p * two_k;                                                                                      \
    }                                                                                                          \
    /* e^(x[s] - top) in place, and their sum */                                                               \
    TARGET float exp_shifted_##NAME(float* x, int64_t n, float top) {                                          \
        float acc[16] = {0};                                                                                   \
        int64_t s = 0;                                                                                         \
        for (; s < n; ++s) x[s] = exp_##NAME(x[s] - top);                                                      \
        for (s = 0; s + 16 <= n; s += 16)                                                                      \
            for (int t = 0; t < 16; ++t) acc[t] += x[s + t];                                                   \
        float total = 0.f;                                                                                     \
        for (; s < n; ++s) total += x[s];                                                                      \
        for (int t = 0; t < 16; ++t) total += acc[t];                                                          \
        return total;                                                                                          \
    }                                                                                                          \
    /* 16 floats from a slot (an 8-bit one's widened), and the sum of 16 lanes as a tree */                  \
    TARGET inline vec16 load16_##NAME(const float* p) {                                                        \
        vec16 v;                                                                                               \
        std::memcpy(&v, p, sizeof v);                                                                          \
        return v;                                                                                              \
    }                                                                                                          \
    TARGET inline vec16 load16_##NAME(const int8_t* p) { return WIDEN(p); }                                   \
    TARGET inline float sum16_##NAME(vec16 v) {                                                                \
        const vec8 e = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +                                \
                       __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);                           \
        const vec4 f = __builtin_shufflevector(e, e, 0, 1, 2, 3) + __builtin_shufflevector(e, e, 4, 5, 6, 7);  \
        return (f[0] + f[2]) + (f[1] + f[3]);                                                                  \
    }                                                                                                          \
    /* out[h] = sum over slots s of p[h, s] * v[s], 16 * B outputs at a time in B independent sums, which     \
       stay in registers over all the slots */                                                                 \
    template <int B, typename T>                                                                               \
    TARGET void weigh_##NAME(const float* p, int64_t heads, const T* v, int64_t n, int64_t hd, float* out) {   \
        for (int64_t h = 0; h < heads; ++h)                                                                    \
            for (int64_t j = 0; j < hd; j += 16 * B) {                                                         \
                vec16 acc[B] = {};                                                                             \
                for (int64_t s = 0; s < n; ++s) {                                                              \
                    const float weight = p[h * n + s];                                                         \
                    const T* vs = slot_raw(v, s, hd) + j;                                                      \
                    for (int b = 0; b < B; ++b) acc[b] += weight * load16_##NAME(vs + 16 * b);                 \
                }                                                                                              \
                std::memcpy(out + h * hd + j, acc, sizeof acc);                                                \
            }                                                                                                  \
    }                                                                                                          \
    /* `heads` query heads (q: heads x hd) that share one kv head, over its slots 0..last of one row:          \
       softmax(q.k / sqrt(hd)) @ v in fp32. Each slot is read once for all of them; scores: heads x (last+1) */ \
    template <typename T>                                                                                      \
    TARGET void attend_##NAME(const float* q, int64_t heads, const T* k, const T* v, int64_t last, int64_t hd,  \
                              float* scores, float* out) {                                                     \
        const float scale = 1.f / std::sqrt(float(hd));                                                        \
        const int64_t n = last + 1;                                                                            \
        float buffer[512], top[64], total[64];                                                                 \
        for (int64_t h = 0; h < heads; ++h) top[h] = -INFINITY;                                                \
        for (int64_t s = 0; s < n; ++s) {                                                                      \
            const T* ks = slot_raw(k, s, hd);                                                                  \
            const float factor = slot_factor(k, s, hd) * scale;                                                \
            for (int64_t h = 0; h < heads; ++h) {                                                              \
                float dot;                                                                                     \
                if (hd % 16 == 0) {                                                                            \
                    vec16 acc = {};                                                                            \
                    for (int64_t j = 0; j < hd; j += 16)                                                       \
                        acc += load16_##NAME(q + h * hd + j) * load16_##NAME(ks + j);                          \
                    dot = sum16_##NAME(acc);                                                                   \
                } else {                                                                                       \
                    for (int64_t j = 0; j < hd; ++j) buffer[j] = float(ks[j]);                                 \
                    dot = dot_##NAME(q + h * hd, buffer, hd);                                                  \
                }                                                                                              \
                const float score = scores[h * n + s] = dot * factor;                                          \
                top[h] = std::max(top[h], score);                                                              \
            }                                                                                                  \
        }                                                                                                      \
        for (int64_t h = 0; h < heads; ++h) total[h] = exp_shifted_##NAME(scores + h * n, n, top[h]);           \
        for (int64_t h = 0; h < heads; ++h) /* each weight times its slot's scale (8-bit cache) */             \
            for (int64_t s = 0; s < n; ++s) scores[h * n + s] *= slot_factor(v, s, hd) / total[h];            \
        if (hd % 64 == 0) return weigh_##NAME<4>(scores, heads, v, n, hd, out);                                \
        if (hd % 16 == 0) return weigh_##NAME<1>(scores, heads, v, n, hd, out);                                \
        for (int64_t j = 0; j < heads * hd; ++j) out[j] = 0.f;                                                 \
        for (int64_t s = 0; s < n; ++s)                                                                        \
            for (int64_t h = 0; h < heads; ++h)                                                                \
                for (int64_t j = 0; j < hd; ++j) out[h * hd + j] += scores[h * n + s] * float(slot_raw(v, s, hd)[j]); \
    }                                                                                                          \
    /* y[r, j] = silu(gu[r, j]) * gu[r, f + j] */                                                              \
    TARGET void swiglu_##NAME(const float* gu, float* y, int64_t rows, int64_t f) {                            \
        for (int64_t r = 0; r < rows; ++r)                                                                     \
            for (int64_t j = 0; j < f; ++j) {                                                                  \
                const float g = gu[r * 2 * f + j];                                                             \
                y[r * f + j] = g / (1.f + exp_##NAME(-g)) * gu[r * 2 * f + f + j];                             \
            }                                                                                                  \
    }

// The sum of 16 partial sums: a tree in plain code; one vector's lanes where there are vectors.
inline float tree_sum(const float* acc) {
    float v[16];
    std::copy(acc, acc + 16, v);
    for (int width = 8; width > 0; width /= 2)
        for (int t = 0; t < width; ++t) v[t] += v[t + width];
    return v[0];
}

__attribute__((target("avx2,fma,f16c"))) inline float avx2_sum(const float* acc) {
    const __m256 v = _mm256_add_ps(_mm256_loadu_ps(acc), _mm256_loadu_ps(acc + 8));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))) inline float avx512_sum(const float* acc) {
    return _mm512_reduce_add_ps(_mm512_loadu_ps(acc));
}

// 16 int8 values as floats (GCC 12 widens bytes to floats one by one where it is left to itself).
inline vec16 plain_widen(const int8_t* p) {
    vec16 v;
    for (int t = 0; t < 16; ++t) v[t] = float(p[t]);
    return v;
}

__attribute__((target("avx2,fma,f16c"))) inline vec16 avx2_widen(const int8_t* p) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m256 halves[2] = {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)),
                              _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)))};
    vec16 v;
    std::memcpy(&v, halves, sizeof v);
    return v;
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))) inline vec16 avx512_widen(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

SLM_LOOPS(plain, , tree_sum, plain_widen)
SLM_LOOPS(avx2, __attribute__((target("avx2,fma,f16c"))), avx2_sum, avx2_widen)
SLM_LOOPS(avx512, __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))), avx512_sum, avx512_widen)

struct Loops {
    void (*rmsnorm)(const float*, const float*, float*, int64_t, int64_t, float);
    void (*rope)(float*, int64_t, int64_t, const float*, const float*);
    void (*attend)(const float*, int64_t, const float*, const float*, int64_t, int64_t, float*, float*);
    void (*attend_q8)(const float*, int64_t, const int8_t*, const int8_t*, int64_t, int64_t, float*, float*);
    void (*swiglu)(const float*, float*, int64_t, int64_t);
};

Loops loops_for(Isa isa) {
    if (family(isa) == Family::avx512)
        return {rmsnorm_avx512, rope_avx512, attend_avx512<float>, attend_avx512<int8_t>, swiglu_avx512};
    if (family(isa) == Family::plain)
        return {rmsnorm_plain, rope_plain, attend_plain<float>, attend_plain<int8_t>, swiglu_plain};
    return {rmsnorm_avx2, rope_avx2, attend_avx2<float>, attend_avx2<int8_t>, swiglu_avx2};
}

// --- linear layers --------------------------------------------------------------------------------------------
// One matmul weight, from the model's own tensors: fp32 [N, K]; or int4 (qs, d, m) / int8 (q, s) blocks.
struct Linear {
    at::Tensor a, b, c;  // held, so that the pointers in W stay valid
    Weights W;
    Panels panels;       // the int8 kernels' copy of quantized weights, made at their first use
    std::vector<uint16_t> bf16_panels;  // the AVX-512 bf16 kernel's copy of bf16 weights, likewise

    explicit Linear(const std::vector<at::Tensor>& t) : a(t.at(0)), b(t.at(1)), c(t.at(2)) {
        TORCH_CHECK(a.is_contiguous() && a.device().is_cpu(), "weights must be contiguous CPU tensors");
        W.N = a.size(0);
        if (a.scalar_type() == at::kFloat) {
            W.w = a.data_ptr<float>(), W.K = a.size(1);
        } else if (a.scalar_type() == at::kBFloat16) {
            W.b = reinterpret_cast<const uint16_t*>(a.data_ptr<at::BFloat16>()), W.K = a.size(1);
        } else if (a.scalar_type() == at::kByte) {
            W.qs = a.data_ptr<uint8_t>(), W.d = scales(b), W.m = scales(c), W.K = a.size(1) * 2;
        } else {
            W.q = a.data_ptr<int8_t>(), W.s = scales(b), W.groups = b.size(1), W.K = a.size(1);
        }
    }

    static const half* scales(const at::Tensor& t) {
        TORCH_CHECK(t.scalar_type() == at::kHalf && t.is_contiguous(), "quantized weights' scales must be fp16");
        return reinterpret_cast<const half*>(t.data_ptr<at::Half>());
    }

    // Row `id` of W, dequantized (the embedding lookup of a tied, quantized head).
    void row(int64_t id, float* out) const {
        const int64_t K = W.K;
        if (W.w != nullptr) {
            std::copy(W.w + id * K, W.w + (id + 1) * K, out);
        } else if (W.b != nullptr) {
            for (int64_t j = 0; j < K; ++j) out[j] = from_bf16(W.b[id * K + j]);
        } else if (W.qs != nullptr) {
            const int64_t G = K / 32;
            const uint8_t* q = W.qs + id * K / 2;
            for (int64_t g = 0; g < G; ++g)
                for (int j = 0; j < 16; ++j) {
                    const float d = to_float(W.d[id * G + g]), m = to_float(W.m[id * G + g]);
                    out[g * 32 + j] = d * float(q[g * 16 + j] & 15) + m;
                    out[g * 32 + j + 16] = d * float(q[g * 16 + j] >> 4) + m;
                }
        } else {
            const int64_t group = K / W.groups;
            for (int64_t j = 0; j < K; ++j) out[j] = to_float(W.s[id * W.groups + j / group]) * float(W.q[id * K + j]);
        }
    }
};

// Linears applied to the same input, their outputs side by side (q, k, v; or gate, up).
struct Projections {
    std::vector<Linear> parts;
    int64_t N = 0;

    Projections(const std::vector<std::vector<at::Tensor>>& specs) {
        for (const auto& spec : specs) { parts.emplace_back(spec); N += parts.back().W.N; }
    }
};

struct Layer {
    at::Tensor input_norm, post_norm;
    Projections qkv, o, gate_up, down;
};

}  // namespace

class Model {
  public:
    // embed: a Linear spec whose rows are the token embeddings (the fp32 table, or a tied quantized head);
    // layers: per layer the two norm weights and the specs of q/k/v (one fused, or three), o, gate/up, down.
    Model(int64_t n_head, int64_t n_kv_head, int64_t head_dim, double eps, at::Tensor rope_cos, at::Tensor rope_sin,
          std::vector<at::Tensor> embed, std::vector<std::vector<at::Tensor>> norms,
          std::vector<std::vector<std::vector<std::vector<at::Tensor>>>> projections, at::Tensor norm,
          std::vector<std::vector<at::Tensor>> head)
        : H(n_head), Hkv(n_kv_head), hd(head_dim), eps(float(eps)), cos(std::move(rope_cos)),
          sin(std::move(rope_sin)), embed(embed), norm(std::move(norm)), head(head) {
        TORCH_CHECK(hd % 2 == 0 && hd / 2 <= 256, "head_dim must be even and at most 512");
        TORCH_CHECK(H % Hkv == 0 && H / Hkv <= 64, "at most 64 query heads may share a kv head");
        for (size_t l = 0; l < norms.size(); ++l) {
            const auto& p = projections[l];
            layers.push_back({norms[l][0], norms[l][1], Projections(p.at(0)), Projections(p.at(1)),
                              Projections(p.at(2)), Projections(p.at(3))});
        }
    }

    // The logits (len(logits_at), vocab) of one step: token i is ids[i] at slot positions[i] of cache row
    // rows[i], attending over that row's slots 0 .. positions[i] (its own included, just written). The whole
    // pass runs in one team of threads, which split each phase's work and meet at a barrier between phases.
    at::Tensor forward(const at::Tensor& ids, const at::Tensor& rows, const at::Tensor& positions,
                       const at::Tensor& logits_at, const std::vector<at::Tensor>& k_cache,
                       const std::vector<at::Tensor>& v_cache, const std::string& isa_name,
                       const std::string& bf16_kernel) const {
        const Isa isa = parse_isa(isa_name);
        repack(isa == Isa::avx512_int8, bf16_kernel == "avx512-bf16");
        const Loops loop = loops_for(isa);
        const int64_t N = ids.size(0), L = logits_at.size(0), D = embed.W.K, S = k_cache.at(0).size(2);
        const int64_t* id = ids.data_ptr<int64_t>();
        const int64_t* row = rows.data_ptr<int64_t>();
        const int64_t* pos = positions.data_ptr<int64_t>();
        const int64_t* at = logits_at.data_ptr<int64_t>();
        // an fp32 cache holds hd floats a slot; an 8-bit one hd int8 values and their scale (store_q8)
        const bool q8 = k_cache.at(0).scalar_type() == at::kChar;
        const int64_t stride = q8 ? hd + 4 : hd;
        TORCH_CHECK(k_cache[0].size(3) == stride, "a KV cache slot must hold ", stride, q8 ? " bytes" : " floats");
        for (int64_t i = 0; i < N; ++i)
            TORCH_CHECK(pos[i] >= 0 && pos[i] < S && row[i] >= 0 && row[i] < k_cache[0].size(0),
                        "token ", i, " is outside the KV cache");
        for (int64_t j = 0; j < L; ++j) TORCH_CHECK(at[j] >= 0 && at[j] < N, "logits_at[", j, "] is not a token");
        const int64_t width = (H + 2 * Hkv) * hd, F = layers.empty() ? 0 : layers[0].gate_up.N / 2;
        int64_t widest = D;
        for (const Layer& layer : layers) widest = std::max({widest, layer.down.parts[0].W.K});
        std::vector<float> x(N * D), h(N * D), tmp(N * D), qkv(N * width), attn(N * H * hd), gu(N * 2 * F),
            act(N * F), last(L * D);
        at::Tensor logits = at::empty({L, head.N}, at::TensorOptions().dtype(at::kFloat));
        float* out = logits.data_ptr<float>();
        const int64_t group = H / Hkv;
        const int threads = std::max(1, at::get_num_threads());
#pragma omp parallel num_threads(threads)
        {
            const int t = omp_get_thread_num(), team = omp_get_num_threads();
            std::vector<float> tile(4 * widest), scores(group * S);
            std::vector<uint16_t> rounded;  // the bf16 kernels' copy of their input
            auto part = [&](int64_t n, int64_t align) {  // this thread's share of [0, n), in multiples of align
                const int64_t per = ((n + align - 1) / align + team - 1) / team * align;
                return std::pair<int64_t, int64_t>(std::min(n, t * per), std::min(n, (t + 1) * per));
            };
            auto project = [&](const Projections& p, const float* in, int64_t M, float* y) {
                int64_t offset = 0;
                for (const Linear& linear : p.parts) {
                    const auto [n0, n1] = part(linear.W.N, 16);  // whole panels of the int8 kernels
                    if (linear.W.b != nullptr)
                        bf16_slice(linear.W, in, M, y + offset, p.N, n0, n1, bf16_kernel, rounded);
                    else
                        matmul_slice(linear.W, in, M, y + offset, p.N, n0, n1, isa, tile.data());
                    offset += linear.W.N;
                }
            };
            auto [r0, r1] = part(N, 1);  // the tokens this thread normalises, rotates and adds up
            for (int64_t i = r0; i < r1; ++i) embed.row(id[i], x.data() + i * D);
#pragma omp barrier
            for (size_t l = 0; l < layers.size(); ++l) {
                const Layer& layer = layers[l];
                float* kc = q8 ? nullptr : k_cache[l].data_ptr<float>();
                float* vc = q8 ? nullptr : v_cache[l].data_ptr<float>();
                int8_t* kq = q8 ? k_cache[l].data_ptr<int8_t>() : nullptr;
                int8_t* vq = q8 ? v_cache[l].data_ptr<int8_t>() : nullptr;
                loop.rmsnorm(x.data() + r0 * D, layer.input_norm.data_ptr<float>(), h.data() + r0 * D, r1 - r0, D,
                             eps);
#pragma omp barrier
                project(layer.qkv, h.data(), N, qkv.data());
#pragma omp barrier
                for (int64_t i = r0; i < r1; ++i) {  // RoPE on q and k, then k and v into the cache
                    float* token = qkv.data() + i * width;
                    loop.rope(token, H + Hkv, hd, cos.data_ptr<float>() + pos[i] * hd,
                              sin.data_ptr<float>() + pos[i] * hd);
                    for (int64_t g = 0; g < Hkv; ++g) {
                        const int64_t slot = ((row[i] * Hkv + g) * S + pos[i]) * stride;
                        const float *k = token + (H + g) * hd, *v = token + (H + Hkv + g) * hd;
                        if (q8) {
                            store_q8(k, hd, kq + slot);
                            store_q8(v, hd, vq + slot);
                        } else {
                            std::copy(k, k + hd, kc + slot);
                            std::copy(v, v + hd, vc + slot);
                        }
                    }
                }
#pragma omp barrier
                // Work items: a token's query heads that share a kv head (its slots read once for all), or, where
                // that leaves a thread idle (a few tokens), one query head each.
                const int64_t heads = N * Hkv >= 2 * team ? group : 1;
                const auto [w0, w1] = part(N * H / heads, 1);
                for (int64_t w = w0; w < w1; ++w) {
                    const int64_t i = w / (H / heads), q_head = w % (H / heads) * heads;
                    const int64_t base = (row[i] * Hkv + q_head / group) * S * stride;
                    const float* q = qkv.data() + i * width + q_head * hd;
                    float* y = attn.data() + i * H * hd + q_head * hd;
                    if (q8)
                        loop.attend_q8(q, heads, kq + base, vq + base, pos[i], hd, scores.data(), y);
                    else
                        loop.attend(q, heads, kc + base, vc + base, pos[i], hd, scores.data(), y);
                }
#pragma omp barrier
                project(layer.o, attn.data(), N, tmp.data());
#pragma omp barrier
                for (int64_t j = r0 * D; j < r1 * D; ++j) x[j] += tmp[j];
                loop.rmsnorm(x.data() + r0 * D, layer.post_norm.data_ptr<float>(), h.data() + r0 * D, r1 - r0, D,
                             eps);
#pragma omp barrier
                project(layer.gate_up, h.data(), N, gu.data());
#pragma omp barrier
                loop.swiglu(gu.data() + r0 * 2 * F, act.data() + r0 * F, r1 - r0, F);
#pragma omp barrier
                project(layer.down, act.data(), N, tmp.data());
#pragma omp barrier
                for (int64_t j = r0 * D; j < r1 * D; ++j) x[j] += tmp[j];
#pragma omp barrier
            }
            const auto [j0, j1] = part(L, 1);
            for (int64_t j = j0; j < j1; ++j)
                loop.rmsnorm(x.data() + at[j] * D, norm.data_ptr<float>(), last.data() + j * D, 1, D, eps);
#pragma omp barrier
            project(head, last.data(), L, out);
        }
        return logits;
    }

  private:
    // The kernels' panels, made once at their first use, under a lock (two engines may share a model): the int8
    // kernels' of every quantized weight (about 0.9 bytes a weight beside the model's own 0.6), the bf16 kernel's
    // of every bf16 one (a second copy).
    void repack(bool int8, bool bf16) const {
        if (!int8 && !bf16) return;
        std::lock_guard<std::mutex> hold(packing);
        int8 = int8 && !int8_packed, bf16 = bf16 && !bf16_packed;
        if (!int8 && !bf16) return;
        auto each = [&](Projections& p) {
            for (Linear& linear : p.parts)
                if (int8 && linear.W.b == nullptr && linear.W.w == nullptr)
                    linear.panels = pack_panels(linear.W), linear.W.panels = &linear.panels;
                else if (bf16 && linear.W.b != nullptr)
                    linear.bf16_panels = pack_bf16_panels(linear.W), linear.W.bp = linear.bf16_panels.data();
        };
        for (Layer& layer : layers) {
            each(layer.qkv), each(layer.o), each(layer.gate_up), each(layer.down);
        }
        each(head);
        int8_packed |= int8, bf16_packed |= bf16;
    }

    int64_t H, Hkv, hd;
    float eps;
    at::Tensor cos, sin;
    Linear embed;
    mutable std::vector<Layer> layers;
    at::Tensor norm;
    mutable Projections head;
    mutable std::mutex packing;
    mutable bool int8_packed = false, bf16_packed = false;
};

}  // namespace slm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
    module.def("isas", &slm::isas, "the instruction sets this CPU can run, best first");
    module.def("bf16_kernels", &slm::bf16_kernels, "the bf16 kernels this CPU can run, best first");
    module.def("bf16_linear", &slm::bf16_linear, "x @ w.T for bf16 w, x rounded to bf16 (a kernel by name)");
    pybind11::class_<slm::Model>(module, "Model")
        .def(pybind11::init<int64_t, int64_t, int64_t, double, at::Tensor, at::Tensor, std::vector<at::Tensor>,
                            std::vector<std::vector<at::Tensor>>,
                            std::vector<std::vector<std::vector<std::vector<at::Tensor>>>>, at::Tensor,
                            std::vector<std::vector<at::Tensor>>>())
        .def("forward", &slm::Model::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
}
