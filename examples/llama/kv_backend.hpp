// SPDX-License-Identifier: Apache-2.0
/// \file kv_backend.hpp
/// The one seam between the engine and KV storage. The engine owns weights and activations
/// and hands each layer's freshly projected, RoPE'd keys and values to a `kv_store`; the store
/// owns them from then on and answers attention queries against whatever it kept. Two stores
/// implement it: `dense_kv` (plain float arrays, the reference the engine was validated with)
/// and `kvc_kv` in kvc_backend.hpp (kvc's paged, compressible cache). An engine developer who
/// copies this example keeps this interface and swaps the implementation.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace llama {

/// Shape of the KV data a model produces; everything a store needs to size itself.
struct kv_shape {
    int num_layers = 0;
    int num_kv_heads = 0;
    int num_q_heads = 0;
    int head_dim = 0;
    /// RoPE as the engine applies it (adjacent pairs (2i, 2i+1), GGUF's Llama layout): policies
    /// that reason about positions (expected attention, leverage) need it.
    float rope_theta = 10000.0f;
    int rope_dims = 0;  ///< rotated channels; 0: head_dim
};

/// KV storage for one sequence.
class kv_store {
public:
    virtual ~kv_store() = default;

    /// Takes ownership of `n` tokens of one layer. `k` and `v` are [n][num_kv_heads][head_dim],
    /// keys already rotated; `positions` are the tokens' absolute positions.
    virtual void append(int layer, const float* k, const float* v, int n, const int32_t* positions) = 0;

    /// Attention of one query token over everything stored for `layer`:
    /// `q` is [num_q_heads][head_dim] (rotated), `out` receives [num_q_heads][head_dim].
    virtual void attend(int layer, const float* q, float* out) = 0;

    /// Whether a prefill chunk may be attended in one call (attend_chunk) instead of token by token:
    /// the engine then appends the chunk's K/V at once and attends all its queries together.
    virtual bool attends_chunks() const { return false; }
    /// How many of the next `limit` tokens of `layer` may be appended and attended as one chunk
    /// with what token-by-token prefill would give (kvc's chunk_tokens: a KIVI or GEAR residual
    /// window re-encodes every group of tokens, so its runs end there). At least 1.
    virtual int chunk_run(int /*layer*/, int limit) const { return limit < 1 ? limit : 1; }
    /// Causal attention of the `n` query tokens just appended to `layer`: `q` is
    /// [n][num_q_heads][head_dim] (rotated), `out` receives the same shape; query i attends to the
    /// stored tokens whose position is <= positions[i]. Only called where attends_chunks() is true.
    virtual void attend_chunk(int /*layer*/, const float* /*q*/, int /*n*/, const int32_t* /*positions*/, float* /*out*/) {
        throw std::logic_error("kv_store::attend_chunk: this store attends token by token (attends_chunks() is false)");
    }

    /// Tokens kept by one (layer, kv head) stream; compression makes these differ.
    virtual int length(int layer, int kv_head) const = 0;

    /// Bytes the store holds for this sequence's K and V (including padding the layout needs).
    virtual std::size_t bytes_in_use() const = 0;

    /// A short human-readable description ("dense f32", "kvc half page=16", ...).
    virtual std::string describe() const = 0;

    /// Whether the store wants the model's queries of each layer *before* RoPE (a policy that
    /// estimates future attention from query statistics asks for them). The engine still owns
    /// the activations: it hands them over, like K and V, and the store keeps only statistics.
    virtual bool wants_queries() const { return false; }
    /// Whether the store keeps keys before RoPE (KVQuant's pre-RoPE key quantization): the
    /// engine then appends un-rotated keys with their positions and the store rotates them.
    virtual bool wants_pre_rope_keys() const { return false; }
    /// `q` is [n][num_q_heads][head_dim], before RoPE, for tokens just appended to `layer`.
    virtual void observe_queries(int /*layer*/, const float* /*q*/, int /*n*/) {}
    /// Rotated queries per layer the store asks the engine to remember (ThinK's observation
    /// window): the session keeps at least this many in recent_q.
    virtual int query_window() const { return 0; }
};

/// Reference store: contiguous float arrays per layer, no compression. Attention is computed
/// in float with a max-subtracted softmax, the textbook way, so that it can serve as
/// ground truth for kvc's kernels on a real model.
class dense_kv final : public kv_store {
public:
    explicit dense_kv(const kv_shape& s) : s_(s), k_(static_cast<std::size_t>(s.num_layers)), v_(k_.size()) {
        if (s.num_kv_heads <= 0 || s.num_q_heads % s.num_kv_heads != 0)
            throw std::invalid_argument("dense_kv: num_q_heads must be a positive multiple of num_kv_heads");
    }

    void append(int layer, const float* k, const float* v, int n, const int32_t*) override {
        const std::size_t row = static_cast<std::size_t>(s_.num_kv_heads) * s_.head_dim;
        auto& K = k_.at(static_cast<std::size_t>(layer));
        auto& V = v_.at(static_cast<std::size_t>(layer));
        K.insert(K.end(), k, k + row * n);
        V.insert(V.end(), v, v + row * n);
    }

    void attend(int layer, const float* q, float* out) override {
        const auto& K = k_.at(static_cast<std::size_t>(layer));
        const auto& V = v_.at(static_cast<std::size_t>(layer));
        const int hd = s_.head_dim, nkv = s_.num_kv_heads, group = s_.num_q_heads / nkv;
        const std::size_t row = static_cast<std::size_t>(nkv) * hd;
        const std::size_t n = K.size() / row;
        const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
        scores_.resize(n);
        for (int h = 0; h < s_.num_q_heads; ++h) {
            const int g = h / group;
            const float* qh = q + static_cast<std::size_t>(h) * hd;
            float mx = -std::numeric_limits<float>::infinity();
            for (std::size_t t = 0; t < n; ++t) {
                const float* kt = K.data() + t * row + static_cast<std::size_t>(g) * hd;
                float dot = 0;
                for (int d = 0; d < hd; ++d) dot += qh[d] * kt[d];
                scores_[t] = dot * scale;
                mx = std::max(mx, scores_[t]);
            }
            float sum = 0;
            for (std::size_t t = 0; t < n; ++t) sum += (scores_[t] = std::exp(scores_[t] - mx));
            float* oh = out + static_cast<std::size_t>(h) * hd;
            std::fill(oh, oh + hd, 0.0f);
            for (std::size_t t = 0; t < n; ++t) {
                const float p = scores_[t] / sum;
                const float* vt = V.data() + t * row + static_cast<std::size_t>(g) * hd;
                for (int d = 0; d < hd; ++d) oh[d] += p * vt[d];
            }
        }
    }

    int length(int layer, int) const override {
        return static_cast<int>(k_.at(static_cast<std::size_t>(layer)).size() /
                                (static_cast<std::size_t>(s_.num_kv_heads) * s_.head_dim));
    }

    std::size_t bytes_in_use() const override {
        std::size_t b = 0;
        for (std::size_t l = 0; l < k_.size(); ++l) b += (k_[l].size() + v_[l].size()) * sizeof(float);
        return b;
    }

    std::string describe() const override { return "dense f32"; }

private:
    kv_shape s_;
    std::vector<std::vector<float>> k_, v_;
    std::vector<float> scores_;
};

}  // namespace llama
