// The decoder step fused into one call: what model.py's GPT.step computes, without Python between the ops.
//
// A step is a flat batch of N tokens, each with its own cache row and slot (its RoPE position): decode tokens,
// prompt chunks and speculative drafts alike, any number per row. Every layer runs RMSNorm, the q/k/v
// projections, RoPE, the KV-cache writes, attention of each token over its own row's slots up to its own (each
// row as long as it is, no padding), o, RMSNorm, gate/up, SwiGLU and down; then the final norm and the head for
// the tokens whose logits are wanted. The weights stay the model's own tensors (fp32, or the quantized layers'
// int4/int8 blocks), so the numbers are the model's, up to the order of summation.
//
// The loops are written once and compiled per instruction set (the quantized matmuls are kernels.cpp's); the
// model runs the set machine.py chose, so a test can pin it.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>

namespace slm {
namespace {

// --- the elementwise and attention loops, per instruction set ------------------------------------------------
// Dot products keep 16 partial sums, so that the compiler vectorises them for the target (a float sum in one
// accumulator may not be reordered).
#define SLM_LOOPS(NAME, TARGET)                                                                                \
    TARGET inline float dot_##NAME(const float* a, const float* b, int64_t n) {                                \
        float acc[16] = {0};                                                                                   \
        int64_t j = 0;                                                                                         \
        for (; j + 16 <= n; j += 16)                                                                           \
            for (int t = 0; t < 16; ++t) acc[t] += a[j + t] * b[j + t];                                        \
        float sum = 0.f;                                                                                       \
        for (; j < n; ++j) sum += a[j] * b[j];                                                                 \
        for (int t = 0; t < 16; ++t) sum += acc[t];                                                            \
        return sum;                                                                                            \
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
    /* one query head over slots 0..last of one row: softmax(q.k / sqrt(hd)) @ v, in fp32 */                   \
    TARGET void attend_##NAME(const float* q, const float* k, const float* v, int64_t last, int64_t hd,        \
                              float* scores, float* out) {                                                     \
        const float scale = 1.f / std::sqrt(float(hd));                                                        \
        float top = -INFINITY;                                                                                 \
        for (int64_t s = 0; s <= last; ++s) {                                                                  \
            scores[s] = dot_##NAME(q, k + s * hd, hd) * scale;                                                 \
            top = std::max(top, scores[s]);                                                                    \
        }                                                                                                      \
        float total = 0.f;                                                                                     \
        for (int64_t s = 0; s <= last; ++s) total += scores[s] = std::exp(scores[s] - top);                    \
        for (int64_t j = 0; j < hd; ++j) out[j] = 0.f;                                                         \
        for (int64_t s = 0; s <= last; ++s) {                                                                  \
            const float p = scores[s] / total;                                                                 \
            for (int64_t j = 0; j < hd; ++j) out[j] += p * v[s * hd + j];                                      \
        }                                                                                                      \
    }                                                                                                          \
    /* y[r, j] = silu(gu[r, j]) * gu[r, f + j] */                                                              \
    TARGET void swiglu_##NAME(const float* gu, float* y, int64_t rows, int64_t f) {                            \
        for (int64_t r = 0; r < rows; ++r)                                                                     \
            for (int64_t j = 0; j < f; ++j) {                                                                  \
                const float g = gu[r * 2 * f + j];                                                             \
                y[r * f + j] = g / (1.f + std::exp(-g)) * gu[r * 2 * f + f + j];                               \
            }                                                                                                  \
    }

SLM_LOOPS(plain, )
SLM_LOOPS(avx2, __attribute__((target("avx2,fma,f16c"))))
SLM_LOOPS(avx512, __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))))

struct Loops {
    void (*rmsnorm)(const float*, const float*, float*, int64_t, int64_t, float);
    void (*rope)(float*, int64_t, int64_t, const float*, const float*);
    void (*attend)(const float*, const float*, const float*, int64_t, int64_t, float*, float*);
    void (*swiglu)(const float*, float*, int64_t, int64_t);
};

Loops loops_for(Isa isa) {
    if (family(isa) == Family::avx512) return {rmsnorm_avx512, rope_avx512, attend_avx512, swiglu_avx512};
    if (family(isa) == Family::plain) return {rmsnorm_plain, rope_plain, attend_plain, swiglu_plain};
    return {rmsnorm_avx2, rope_avx2, attend_avx2, swiglu_avx2};
}

// --- linear layers --------------------------------------------------------------------------------------------
// One matmul weight: dense fp32 [N, K]; or int4 (qs, d, m) / int8 (q, s) blocks, with, where the model made
// it, their fp32 dequantization for many rows (a GEMM beats the kernels from dense_min_rows rows).
struct Linear {
    at::Tensor a, b, c, dense;
    int64_t N = 0, K = 0;

    explicit Linear(const std::vector<at::Tensor>& t) : a(t.at(0)), b(t.at(1)), c(t.at(2)), dense(t.at(3)) {
        if (a.scalar_type() == at::kByte) { N = a.size(0); K = a.size(1) * 2; }
        else { N = a.size(0); K = a.size(1); }
        TORCH_CHECK(a.is_contiguous() && a.device().is_cpu(), "weights must be contiguous CPU tensors");
    }

    // y[:, offset:offset + N] of a [M, ldy] buffer = x [M, K] @ W.T
    void apply(const at::Tensor& x, float* y, int64_t ldy, Isa isa, int64_t dense_min_rows) const {
        const int64_t M = x.size(0);
        const bool quantized = a.scalar_type() != at::kFloat;
        if (!quantized || (M >= dense_min_rows && dense.defined() && dense.numel())) {
            const at::Tensor out = at::linear(x, quantized ? dense : a);
            const float* src = out.data_ptr<float>();
            for (int64_t r = 0; r < M; ++r) std::copy(src + r * N, src + (r + 1) * N, y + r * ldy);
        } else if (a.scalar_type() == at::kByte) {
            q4_matmul(x.data_ptr<float>(), M, K, a.data_ptr<uint8_t>(), b.data_ptr<float>(), c.data_ptr<float>(), N,
                      y, ldy, isa);
        } else {
            q8_matmul(x.data_ptr<float>(), M, K, a.data_ptr<int8_t>(), b.data_ptr<float>(), b.size(1), N, y, ldy,
                      isa);
        }
    }

    // Rows `ids` of W, dequantized (the embedding lookup of a tied, quantized head).
    void rows(const int64_t* ids, int64_t n, float* out) const {
        for (int64_t i = 0; i < n; ++i) {
            float* o = out + i * K;
            if (a.scalar_type() == at::kFloat) {
                std::copy(a.data_ptr<float>() + ids[i] * K, a.data_ptr<float>() + (ids[i] + 1) * K, o);
            } else if (a.scalar_type() == at::kByte) {
                const int64_t G = K / 32;
                const uint8_t* q = a.data_ptr<uint8_t>() + ids[i] * K / 2;
                const float *d = b.data_ptr<float>() + ids[i] * G, *m = c.data_ptr<float>() + ids[i] * G;
                for (int64_t g = 0; g < G; ++g)
                    for (int j = 0; j < 16; ++j) {
                        o[g * 32 + j] = d[g] * float(q[g * 16 + j] & 15) + m[g];
                        o[g * 32 + j + 16] = d[g] * float(q[g * 16 + j] >> 4) + m[g];
                    }
            } else {
                const int64_t groups = b.size(1), group = K / groups;
                const int8_t* q = a.data_ptr<int8_t>() + ids[i] * K;
                const float* s = b.data_ptr<float>() + ids[i] * groups;
                for (int64_t j = 0; j < K; ++j) o[j] = s[j / group] * float(q[j]);
            }
        }
    }
};

// Linears applied to the same input, their outputs side by side (q, k, v; or gate, up).
struct Projections {
    std::vector<Linear> parts;
    int64_t N = 0;

    Projections(const std::vector<std::vector<at::Tensor>>& specs) {
        for (const auto& spec : specs) { parts.emplace_back(spec); N += parts.back().N; }
    }

    at::Tensor apply(const at::Tensor& x, Isa isa, int64_t dense_min_rows) const {
        at::Tensor y = at::empty({x.size(0), N}, x.options());
        int64_t offset = 0;
        for (const Linear& part : parts) {
            part.apply(x, y.data_ptr<float>() + offset, N, isa, dense_min_rows);
            offset += part.N;
        }
        return y;
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
        for (size_t l = 0; l < norms.size(); ++l) {
            const auto& p = projections[l];
            layers.push_back({norms[l][0], norms[l][1], Projections(p.at(0)), Projections(p.at(1)),
                              Projections(p.at(2)), Projections(p.at(3))});
        }
    }

    // The logits (len(logits_at), vocab) of one step: token i is ids[i] at slot positions[i] of cache row
    // rows[i], attending over that row's slots 0 .. positions[i] (its own included, just written).
    at::Tensor forward(const at::Tensor& ids, const at::Tensor& rows, const at::Tensor& positions,
                       const at::Tensor& logits_at, const std::vector<at::Tensor>& k_cache,
                       const std::vector<at::Tensor>& v_cache, const std::string& isa_name,
                       int64_t dense_min_rows) const {
        const Isa isa = parse_isa(isa_name);
        const Loops loop = loops_for(isa);
        const int64_t N = ids.size(0), D = embed.K, S = k_cache.at(0).size(2);
        const int64_t* row = rows.data_ptr<int64_t>();
        const int64_t* pos = positions.data_ptr<int64_t>();
        for (int64_t i = 0; i < N; ++i)
            TORCH_CHECK(pos[i] >= 0 && pos[i] < S && row[i] >= 0 && row[i] < k_cache[0].size(0),
                        "token ", i, " is outside the KV cache");
        const auto f32 = at::TensorOptions().dtype(at::kFloat);
        at::Tensor x = at::empty({N, D}, f32), h = at::empty({N, D}, f32);
        embed.rows(ids.data_ptr<int64_t>(), N, x.data_ptr<float>());
        at::Tensor attn = at::empty({N, H * hd}, f32);
        const int64_t group = H / Hkv;
        for (size_t l = 0; l < layers.size(); ++l) {
            const Layer& layer = layers[l];
            loop.rmsnorm(x.data_ptr<float>(), layer.input_norm.data_ptr<float>(), h.data_ptr<float>(), N, D, eps);
            at::Tensor qkv = layer.qkv.apply(h, isa, dense_min_rows);  // [N, (H + 2 Hkv) hd]
            float* qkvp = qkv.data_ptr<float>();
            const int64_t width = (H + 2 * Hkv) * hd;
            float* kc = k_cache[l].data_ptr<float>();
            float* vc = v_cache[l].data_ptr<float>();
            for (int64_t i = 0; i < N; ++i) {  // RoPE on q and k, then k and v into the cache
                float* t = qkvp + i * width;
                const float *c = cos.data_ptr<float>() + pos[i] * hd, *s = sin.data_ptr<float>() + pos[i] * hd;
                loop.rope(t, H + Hkv, hd, c, s);
                for (int64_t g = 0; g < Hkv; ++g) {
                    const int64_t slot = ((row[i] * Hkv + g) * S + pos[i]) * hd;
                    std::copy(t + (H + g) * hd, t + (H + g + 1) * hd, kc + slot);
                    std::copy(t + (H + Hkv + g) * hd, t + (H + Hkv + g + 1) * hd, vc + slot);
                }
            }
            float* out = attn.data_ptr<float>();
            at::parallel_for(0, N * H, 1, [&](int64_t w0, int64_t w1) {
                std::vector<float> scores(S);
                for (int64_t w = w0; w < w1; ++w) {
                    const int64_t i = w / H, head = w % H, g = head / group;
                    const int64_t base = (row[i] * Hkv + g) * S * hd;
                    loop.attend(qkvp + i * width + head * hd, kc + base, vc + base, pos[i], hd, scores.data(),
                                out + i * H * hd + head * hd);
                }
            });
            at::Tensor o = layer.o.apply(attn, isa, dense_min_rows);
            x.add_(o);
            loop.rmsnorm(x.data_ptr<float>(), layer.post_norm.data_ptr<float>(), h.data_ptr<float>(), N, D, eps);
            at::Tensor gu = layer.gate_up.apply(h, isa, dense_min_rows);
            at::Tensor act = at::empty({N, gu.size(1) / 2}, f32);
            loop.swiglu(gu.data_ptr<float>(), act.data_ptr<float>(), N, act.size(1));
            x.add_(layer.down.apply(act, isa, dense_min_rows));
        }
        at::Tensor last = x.index_select(0, logits_at).contiguous();
        at::Tensor normed = at::empty_like(last);
        loop.rmsnorm(last.data_ptr<float>(), norm.data_ptr<float>(), normed.data_ptr<float>(), last.size(0), D, eps);
        return head.apply(normed, isa, dense_min_rows);
    }

    bool has_dense() const {
        for (const Layer& layer : layers)
            for (const Linear& part : layer.qkv.parts)
                if (part.dense.defined() && part.dense.numel()) return true;
        return false;
    }

  private:
    int64_t H, Hkv, hd;
    float eps;
    at::Tensor cos, sin;
    Linear embed;
    std::vector<Layer> layers;
    at::Tensor norm;
    Projections head;
};

}  // namespace slm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
    module.def("isas", &slm::isas, "the instruction sets this CPU can run, best first");
    pybind11::class_<slm::Model>(module, "Model")
        .def(pybind11::init<int64_t, int64_t, int64_t, double, at::Tensor, at::Tensor, std::vector<at::Tensor>,
                            std::vector<std::vector<at::Tensor>>,
                            std::vector<std::vector<std::vector<std::vector<at::Tensor>>>>, at::Tensor,
                            std::vector<std::vector<at::Tensor>>>())
        .def("forward", &slm::Model::forward, pybind11::call_guard<pybind11::gil_scoped_release>())
        .def("has_dense", &slm::Model::has_dense);
}
