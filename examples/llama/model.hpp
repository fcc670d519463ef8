// SPDX-License-Identifier: Apache-2.0
/// \file model.hpp
/// The Llama forward pass (RMSNorm, RoPE, grouped-query attention, SwiGLU, tied or untied
/// output) on weights read from a GGUF file. The engine owns the weights and every activation;
/// the only thing it gives away is K and V, handed to a `kv_store` one layer at a time. That is
/// the boundary an engine keeps when it adopts kvc: projections and RoPE stay in the engine,
/// storage and attention over the stored tokens move to the cache.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "gguf.hpp"
#include "kv_backend.hpp"
#include "quants.hpp"

namespace llama {

using matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using vector_f = Eigen::VectorXf;

/// Hyper-parameters, all read from the file's metadata.
struct hparams {
    std::string arch;
    int n_vocab = 0, n_ctx_train = 0, n_embd = 0, n_ff = 0, n_layer = 0, n_head = 0, n_head_kv = 0;
    int head_dim = 0, rope_dims = 0;
    float rope_theta = 10000.0f, rms_eps = 1e-5f;
    bool tied_output = false;
    std::string weight_types;  ///< e.g. "Q4_1 x210, F32 x61, Q8_0 x1"
};

struct layer_weights {
    vector_f attn_norm, ffn_norm;
    matrix wq, wk, wv, wo;      ///< [out][in]
    matrix w_gate, w_up, w_down;
};

/// Per-sequence engine state: the KV store plus what the engine itself tracks.
struct session {
    std::unique_ptr<kv_store> kv;
    int n_past = 0;  ///< absolute position of the next token (never shrinks under eviction)
    /// Optional record of the last `query_window` rotated queries per layer
    /// ([layer] → rows of [n_head*head_dim]); query-observing evictors (SnapKV and kin) read it.
    int query_window = 0;
    std::vector<matrix> recent_q;
};

/// Wall-clock counters, so that tokens/s can be reported beside quality.
struct timings {
    double prefill_s = 0, decode_s = 0;
    long prefill_tokens = 0, decode_tokens = 0;
};

/// Threads Eigen may use for the matrix products (needs OpenMP; otherwise a no-op).
inline void set_threads(int n) { Eigen::setNbThreads(n > 0 ? n : 1); }

/// Reads and checks the hyper-parameters (metadata and the embedding's shape) without loading any
/// weight. Every count is range-checked before it becomes an int: a file saying block_count =
/// 2^32 + 1 must be refused, not read as 1 layer.
inline hparams read_hparams(const gguf_file& f) {
    hparams hp;
    hp.arch = f.get_string("general.architecture");
    if (hp.arch != "llama")
        throw gguf_error("model: architecture '" + hp.arch + "' is not supported (this example runs 'llama')");
    const std::string a = hp.arch + ".";
    constexpr int64_t int_max = std::numeric_limits<int>::max();
    hp.n_embd = static_cast<int>(f.get_int_in(a + "embedding_length", 1, int_max));
    hp.n_ff = static_cast<int>(f.get_int_in(a + "feed_forward_length", 1, int_max));
    hp.n_layer = static_cast<int>(f.get_int_in(a + "block_count", 1, int_max));
    hp.n_head = static_cast<int>(f.get_int_in(a + "attention.head_count", 1, int_max));
    hp.n_head_kv = static_cast<int>(f.get_int_in(a + "attention.head_count_kv", 1, int_max, hp.n_head));
    hp.n_ctx_train = static_cast<int>(f.get_int_in(a + "context_length", 0, int_max, 0));
    // double -> float is undefined outside float's range; NaN would poison every activation.
    const auto positive_float = [&](const std::string& key, double fallback) {
        const double x = f.get_float(key, fallback);
        if (!(x > 0 && x <= static_cast<double>(std::numeric_limits<float>::max())))
            throw gguf_error("model: metadata key '" + key + "' = " + std::to_string(x) +
                             ", expected a finite float > 0 in " + f.path());
        return static_cast<float>(x);
    };
    hp.rope_theta = positive_float(a + "rope.freq_base", 10000.0);
    hp.rms_eps = positive_float(a + "attention.layer_norm_rms_epsilon", 1e-5);
    if (hp.n_embd % hp.n_head != 0)
        throw gguf_error("model: embedding_length " + std::to_string(hp.n_embd) + " is not divisible by head_count " + std::to_string(hp.n_head));
    if (hp.n_head % hp.n_head_kv != 0)
        throw gguf_error("model: head_count " + std::to_string(hp.n_head) + " is not a multiple of head_count_kv " + std::to_string(hp.n_head_kv));
    hp.head_dim = hp.n_embd / hp.n_head;
    hp.rope_dims = static_cast<int>(f.get_int_in(a + "rope.dimension_count", 0, hp.head_dim, hp.head_dim));
    if (hp.rope_dims % 2)
        throw gguf_error("model: rope.dimension_count " + std::to_string(hp.rope_dims) + " is invalid for head_dim " + std::to_string(hp.head_dim) + ", expected an even count");
    if (f.has("llama.rope.scaling.type") && f.get_string("llama.rope.scaling.type") != "none")
        throw gguf_error("model: RoPE scaling '" + f.get_string("llama.rope.scaling.type") + "' is not implemented");

    std::map<std::string, int> type_count;
    for (const gguf_tensor& t : f.tensors()) type_count[type_name(t.type)]++;
    for (auto& [name, c] : type_count) hp.weight_types += (hp.weight_types.empty() ? "" : ", ") + name + " x" + std::to_string(c);

    const gguf_tensor* emb = f.find_tensor("token_embd.weight");
    if (!emb) throw gguf_error("model: tensor 'token_embd.weight' is missing in " + f.path());
    if (emb->dims.size() != 2 || emb->dims[0] != static_cast<uint64_t>(hp.n_embd) ||
        emb->dims[1] > static_cast<uint64_t>(int_max))
        throw gguf_error("model: token_embd.weight has shape " + emb->shape() + ", expected [" + std::to_string(hp.n_embd) +
                         ", n_vocab] with n_vocab <= " + std::to_string(int_max));
    hp.n_vocab = static_cast<int>(emb->dims[1]);
    // Each layer has nine tensors; refusing here keeps a hostile block_count from sizing
    // layers_ before the first missing tensor is noticed.
    if (static_cast<uint64_t>(hp.n_layer) > f.tensors().size() / 9)
        throw gguf_error("model: " + a + "block_count = " + std::to_string(hp.n_layer) + ", expected at most " +
                         std::to_string(f.tensors().size() / 9) + " (nine tensors per layer; the file holds " +
                         std::to_string(f.tensors().size()) + ") in " + f.path());
    hp.tied_output = f.find_tensor("output.weight") == nullptr;
    return hp;
}

class model {
public:
    explicit model(const gguf_file& f) { load(f); }

    const hparams& hp() const { return hp_; }
    /// One layer's weights (W_k, W_v: [n_head_kv · head_dim][n_embd] row-major, k = W_k x).
    const layer_weights& weights(int layer) const { return layers_.at(static_cast<std::size_t>(layer)); }
    kv_shape shape() const {
        return {hp_.n_layer, hp_.n_head_kv, hp_.n_head, hp_.head_dim, hp_.rope_theta, hp_.rope_dims};
    }
    timings& stats() { return stats_; }

    /// A fresh session whose KV lives in `kv`.
    session new_session(std::unique_ptr<kv_store> kv, int query_window = 0) const {
        session s;
        s.kv = std::move(kv);
        s.query_window = std::max(query_window, s.kv->query_window());
        if (s.query_window > 0) s.recent_q.assign(static_cast<std::size_t>(hp_.n_layer), matrix());
        return s;
    }

    /// Runs `n` tokens through the model, appending their K/V to the session, and returns the
    /// logits of the last `n_logits` tokens ([n_logits][n_vocab]). Tokens are processed in
    /// chunks of at most `chunk` so that activations stay small during a long prefill.
    matrix forward(session& s, const int32_t* tokens, int n, int n_logits = 1, int chunk = 256) {
        if (n <= 0) throw std::invalid_argument("forward: no tokens");
        n_logits = std::min(n_logits, n);
        matrix out(n_logits, hp_.n_vocab);
        const auto t0 = std::chrono::steady_clock::now();
        for (int start = 0; start < n; start += chunk) {
            const int m = std::min(chunk, n - start);
            const int first_logit = std::max(0, (n - n_logits) - start);  // within this chunk
            matrix lg = forward_chunk(s, tokens + start, m, first_logit);
            if (first_logit < m) out.middleRows(start + first_logit - (n - n_logits), m - first_logit) = lg;
        }
        const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (n == 1) {
            stats_.decode_s += dt;
            stats_.decode_tokens += 1;
        } else {
            stats_.prefill_s += dt;
            stats_.prefill_tokens += n;
        }
        return out;
    }

private:
    static void rms_norm(matrix& x, const vector_f& w, float eps) {
        for (Eigen::Index r = 0; r < x.rows(); ++r) {
            const float ms = x.row(r).squaredNorm() / static_cast<float>(x.cols());
            x.row(r) = x.row(r).cwiseProduct(w.transpose()) * (1.0f / std::sqrt(ms + eps));
        }
    }

    /// Rotates adjacent pairs (x[2i], x[2i+1]) of every head by pos·θ_i — GGUF's Llama layout
    /// (the converter permutes Q/K rows so that this equals the Hugging Face "rotate half").
    void rope(float* x, int n_heads, int pos) const {
        const int hd = hp_.head_dim;
        for (int i = 0; i < hp_.rope_dims / 2; ++i) {
            const double a = static_cast<double>(pos) * inv_freq_[static_cast<std::size_t>(i)];
            const float c = static_cast<float>(std::cos(a)), sn = static_cast<float>(std::sin(a));
            for (int h = 0; h < n_heads; ++h) {
                float* p = x + static_cast<std::size_t>(h) * hd + 2 * i;
                const float x0 = p[0], x1 = p[1];
                p[0] = x0 * c - x1 * sn;
                p[1] = x0 * sn + x1 * c;
            }
        }
    }

    matrix forward_chunk(session& s, const int32_t* tokens, int n, int first_logit) {
        const int d = hp_.n_embd, hd = hp_.head_dim;
        matrix x(n, d);
        for (int t = 0; t < n; ++t) {
            const int32_t id = tokens[t];
            if (id < 0 || id >= hp_.n_vocab) throw std::out_of_range("forward: token id " + std::to_string(id) + " outside the vocabulary");
            x.row(t) = tok_embd_.row(id);
        }
        std::vector<int32_t> pos(static_cast<std::size_t>(n));
        for (int t = 0; t < n; ++t) pos[static_cast<std::size_t>(t)] = s.n_past + t;

        matrix h, q, k, v, att(n, hp_.n_head * hd), g, u;
        for (int l = 0; l < hp_.n_layer; ++l) {
            const layer_weights& w = layers_[static_cast<std::size_t>(l)];
            h = x;
            rms_norm(h, w.attn_norm, hp_.rms_eps);
            q.noalias() = h * w.wq.transpose();
            k.noalias() = h * w.wk.transpose();
            v.noalias() = h * w.wv.transpose();
            if (s.kv->wants_queries()) s.kv->observe_queries(l, q.data(), n);  // pre-RoPE query statistics
            const bool pre_rope_keys = s.kv->wants_pre_rope_keys();
            for (int t = 0; t < n; ++t) {
                rope(q.row(t).data(), hp_.n_head, pos[static_cast<std::size_t>(t)]);
                if (!pre_rope_keys) rope(k.row(t).data(), hp_.n_head_kv, pos[static_cast<std::size_t>(t)]);
            }
            if (n > 1 && s.kv->attends_chunks()) {
                // Runs of the chunk at once (the store masks by position, kvc::prefill_attention),
                // each as long as the store shows it what token by token would (chunk_run).
                for (int t0 = 0; t0 < n;) {
                    const int r = s.kv->chunk_run(l, n - t0);
                    s.kv->append(l, k.row(t0).data(), v.row(t0).data(), r, &pos[static_cast<std::size_t>(t0)]);
                    s.kv->attend_chunk(l, q.row(t0).data(), r, &pos[static_cast<std::size_t>(t0)], att.row(t0).data());
                    t0 += r;
                }
            } else {
                // Causal attention through the store: token t sees the past and tokens ≤ t of
                // this chunk because it is appended just before it attends.
                for (int t = 0; t < n; ++t) {
                    s.kv->append(l, k.row(t).data(), v.row(t).data(), 1, &pos[static_cast<std::size_t>(t)]);
                    s.kv->attend(l, q.row(t).data(), att.row(t).data());
                }
            }
            if (s.query_window > 0) remember_queries(s, l, q);
            x.noalias() += att * w.wo.transpose();

            h = x;
            rms_norm(h, w.ffn_norm, hp_.rms_eps);
            g.noalias() = h * w.w_gate.transpose();
            u.noalias() = h * w.w_up.transpose();
            g = g.unaryExpr([](float z) { return z / (1.0f + std::exp(-z)); }).cwiseProduct(u);
            x.noalias() += g * w.w_down.transpose();
        }
        s.n_past += n;
        if (first_logit >= n) return matrix();
        matrix xl = x.bottomRows(n - first_logit);
        rms_norm(xl, out_norm_, hp_.rms_eps);
        return xl * output().transpose();
    }

    void remember_queries(session& s, int layer, const matrix& q) const {
        matrix& r = s.recent_q[static_cast<std::size_t>(layer)];
        const Eigen::Index w = s.query_window;
        matrix all(std::min<Eigen::Index>(w, r.rows() + q.rows()), q.cols());
        const Eigen::Index from_new = std::min<Eigen::Index>(q.rows(), all.rows());
        const Eigen::Index from_old = all.rows() - from_new;
        if (from_old > 0) all.topRows(from_old) = r.bottomRows(from_old);
        all.bottomRows(from_new) = q.bottomRows(from_new);
        r.swap(all);
    }

    const matrix& output() const { return hp_.tied_output ? tok_embd_ : output_; }

    static matrix load_matrix(const gguf_file& f, const std::string& name, uint64_t in, uint64_t out) {
        const gguf_tensor& t = f.tensor(name, {in, out});
        matrix m(static_cast<Eigen::Index>(out), static_cast<Eigen::Index>(in));
        dequantize_tensor(t, m.data());
        return m;
    }
    static vector_f load_vector(const gguf_file& f, const std::string& name, uint64_t n) {
        const gguf_tensor& t = f.tensor(name, {n});
        vector_f v(static_cast<Eigen::Index>(n));
        dequantize_tensor(t, v.data());
        return v;
    }

    void load(const gguf_file& f) {
        hp_ = read_hparams(f);
        const uint64_t d = static_cast<uint64_t>(hp_.n_embd), ff = static_cast<uint64_t>(hp_.n_ff);
        const uint64_t dkv = static_cast<uint64_t>(hp_.n_head_kv) * static_cast<uint64_t>(hp_.head_dim);
        tok_embd_ = load_matrix(f, "token_embd.weight", d, static_cast<uint64_t>(hp_.n_vocab));
        out_norm_ = load_vector(f, "output_norm.weight", d);
        if (!hp_.tied_output) output_ = load_matrix(f, "output.weight", d, static_cast<uint64_t>(hp_.n_vocab));
        layers_.resize(static_cast<std::size_t>(hp_.n_layer));
        for (int l = 0; l < hp_.n_layer; ++l) {
            const std::string p = "blk." + std::to_string(l) + ".";
            layer_weights& w = layers_[static_cast<std::size_t>(l)];
            w.attn_norm = load_vector(f, p + "attn_norm.weight", d);
            w.ffn_norm = load_vector(f, p + "ffn_norm.weight", d);
            w.wq = load_matrix(f, p + "attn_q.weight", d, d);
            w.wk = load_matrix(f, p + "attn_k.weight", d, dkv);
            w.wv = load_matrix(f, p + "attn_v.weight", d, dkv);
            w.wo = load_matrix(f, p + "attn_output.weight", d, d);
            w.w_gate = load_matrix(f, p + "ffn_gate.weight", d, ff);
            w.w_up = load_matrix(f, p + "ffn_up.weight", d, ff);
            w.w_down = load_matrix(f, p + "ffn_down.weight", ff, d);
        }
        inv_freq_.resize(static_cast<std::size_t>(hp_.rope_dims / 2));
        for (int i = 0; i < hp_.rope_dims / 2; ++i)
            inv_freq_[static_cast<std::size_t>(i)] = std::pow(static_cast<double>(hp_.rope_theta), -2.0 * i / hp_.rope_dims);
    }

    hparams hp_;
    matrix tok_embd_, output_;
    vector_f out_norm_;
    std::vector<layer_weights> layers_;
    std::vector<double> inv_freq_;
    timings stats_;
};

}  // namespace llama
