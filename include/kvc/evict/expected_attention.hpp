// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Expected attention: from the mean μ and covariance Σ of pre-RoPE queries, averaged over the RoPE
/// rotations of the next `n_future_positions` positions (R̄ = mean_p R(p); μ ← R̄μ,
/// Σ ← R̄ΣR̄ᵀ), the expected attention of a future query to key k is
/// softmax_j(k_j·μ/√d + k_jᵀΣk_j/(2d)); GQA-aggregated and multiplied by ‖v_j‖₂ (`use_vnorm`,
/// as (s + epsilon)·‖v‖). Sinks are kept. kvpress `ExpectedAttentionPress` defaults.
/// `query_stats_accumulator` builds the statistics from pre-RoPE queries (prefill and decode).
///
/// Two choices about the first tokens, both options (kvpress makes the other choice in each):
///  - `sinks_in_softmax` (default true): the n_sink protected tokens take part in each query
///    head's softmax. kvpress drops them first, so the other tokens' probabilities share the whole
///    mass. Within one query head the ranking is the same either way; the GQA mean over the group
///    weights the heads differently, so kept sets can differ. kvpress parity: false.
///  - `query_stats_accumulator(..., skip_first)` (default 0): the first queries added are left
///    out of the mean and covariance. kvpress leaves out the first n_sink = 4 prompt positions as
///    outliers. kvpress parity: skip_first = n_sink.
/// \par Reference
/// Devoto et al., "Expected Attention: KV Cache Compression by Estimating Attention from Future Queries Distribution", arXiv:2510.00636.

#include <algorithm>
#include <cmath>
#include <vector>

#include <Eigen/Core>

#include <kvc/attention/rope.hpp>
#include <kvc/evict/core.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

/// Running mean and covariance (population, 1/n) of pre-RoPE queries per query head.
class query_stats_accumulator {
 public:
  /// skip_first: how many of the first queries added to leave out (kvpress leaves out the first
  /// n_sink = 4 prompt positions, whose queries are outliers); they still count as seen().
  query_stats_accumulator(std::int32_t num_q_heads, std::int32_t head_dim, bool covariance = true,
                          std::int64_t skip_first = 0)
      : H_(num_q_heads), D_(head_dim), cov_on_(covariance), skip_(skip_first) {
    KVC_EXPECTS(num_q_heads > 0 && head_dim > 0, "kvc::evict::query_stats_accumulator: num_q_heads/head_dim = ",
                num_q_heads, "/", head_dim, ", expected > 0");
    KVC_EXPECTS(skip_first >= 0, "kvc::evict::query_stats_accumulator: skip_first = ", skip_first, ", expected >= 0");
    sum_.assign(static_cast<std::size_t>(H_) * D_, 0.0);
    if (cov_on_) outer_.assign(static_cast<std::size_t>(H_) * D_ * D_, 0.0);
  }
  /// Adds n queries [n][num_q_heads][head_dim], before RoPE.
  void add(const float* q, std::int32_t n) {
    KVC_EXPECTS(n >= 0 && (q != nullptr || n == 0), "kvc::evict::query_stats_accumulator::add: q/n = ",
                static_cast<const void*>(q), "/", n, ", expected n >= 0 queries");
    const std::int64_t skip = std::min<std::int64_t>(n, std::max<std::int64_t>(0, skip_ - seen_));
    seen_ += n;
    for (std::int32_t i = static_cast<std::int32_t>(skip); i < n; ++i)
      for (std::int32_t h = 0; h < H_; ++h) {
        const float* x = q + (static_cast<std::size_t>(i) * H_ + h) * D_;
        double* s = sum_.data() + static_cast<std::size_t>(h) * D_;
        for (std::int32_t d = 0; d < D_; ++d) s[d] += x[d];
        if (cov_on_) {
          double* o = outer_.data() + static_cast<std::size_t>(h) * D_ * D_;
          for (std::int32_t a = 0; a < D_; ++a)
            for (std::int32_t b = 0; b < D_; ++b) o[static_cast<std::size_t>(a) * D_ + b] += double(x[a]) * x[b];
        }
      }
    count_ += n - skip;
  }
  /// Queries in the statistics (added minus skipped).
  std::int64_t count() const noexcept { return count_; }
  /// Queries added, the skipped ones included.
  std::int64_t seen() const noexcept { return seen_; }
  /// Statistics for scoring; the returned view points into this accumulator.
  query_stats view(const rope* rotary, std::int32_t next_position = -1) {
    KVC_EXPECTS(count_ > 0, "kvc::evict::query_stats_accumulator::view: count = 0 (", seen_,
                " added, skip_first = ", skip_, "), expected at least one query in the statistics");
    mean_.resize(sum_.size());
    for (std::size_t i = 0; i < sum_.size(); ++i) mean_[i] = static_cast<float>(sum_[i] / count_);
    if (cov_on_) {
      cov_.resize(outer_.size());
      for (std::int32_t h = 0; h < H_; ++h)
        for (std::int32_t a = 0; a < D_; ++a)
          for (std::int32_t b = 0; b < D_; ++b) {
            const std::size_t i = (static_cast<std::size_t>(h) * D_ + a) * D_ + b;
            const double ma = sum_[static_cast<std::size_t>(h) * D_ + a] / count_, mb = sum_[static_cast<std::size_t>(h) * D_ + b] / count_;
            cov_[i] = static_cast<float>(outer_[i] / count_ - ma * mb);
          }
    }
    return {mean_.data(), cov_on_ ? cov_.data() : nullptr, H_, D_, next_position, rotary};
  }

 private:
  std::int32_t H_, D_;
  bool cov_on_;
  std::int64_t skip_, count_ = 0, seen_ = 0;
  std::vector<double> sum_, outer_;
  std::vector<float> mean_, cov_;
};

struct expected_attention_params {
  std::int32_t n_future_positions = 512;
  std::int32_t n_sink = 4;
  bool use_covariance = true;
  bool use_vnorm = true;
  float epsilon = 0.0f;
  group_agg agg = group_agg::mean;
  /// The n_sink protected tokens join each query head's softmax (see the file comment); with false
  /// they are left out of it and score above every other token, as kvpress's do.
  bool sinks_in_softmax = true;
};

struct expected_attention {
  using params_type = expected_attention_params;
  using observation_type = query_stats;
  static constexpr unsigned reads = reads_keys | reads_values;
  static constexpr const char* name = "expected_attention";
  params_type p;
  expected_attention() = default;
  explicit expected_attention(const params_type& params) : p(params) {
    KVC_EXPECTS(p.n_future_positions >= 1, "n_future_positions = ", p.n_future_positions, ", expected >= 1");
    KVC_EXPECTS(p.n_sink >= 0, "n_sink = ", p.n_sink, ", expected >= 0");
    KVC_EXPECTS(p.epsilon >= 0, "epsilon = ", p.epsilon, ", expected >= 0");
  }
  protection protect() const { return {p.n_sink, 0}; }

  /// R̄ = mean over positions p0..p0+n-1 of the RoPE rotation, as a dense matrix.
  static Eigen::MatrixXd mean_rotation(const rope& r, std::int32_t p0, std::int32_t n) {
    const auto& c = r.config();
    const std::int32_t D = c.head_dim, half = c.rotary_dim / 2;
    Eigen::MatrixXd R = Eigen::MatrixXd::Identity(D, D);
    for (std::int32_t i = 0; i < half; ++i) {
      double cs = 0, sn = 0;
      for (std::int32_t k = 0; k < n; ++k) {
        const double a = (static_cast<double>(p0) + k) * r.inv_freq(i);
        cs += std::cos(a);
        sn += std::sin(a);
      }
      cs /= n;
      sn /= n;
      const std::int32_t i0 = c.style == rope_style::rotate_half ? i : 2 * i;
      const std::int32_t i1 = c.style == rope_style::rotate_half ? i + half : 2 * i + 1;
      R(i0, i0) = cs;
      R(i0, i1) = -sn;
      R(i1, i0) = sn;
      R(i1, i1) = cs;
    }
    return R;
  }

  void score(const layer_input& in, const observations& obs, layer_scores& out) const {
    const query_stats& qs = detail::need_stats(obs, name);
    KVC_EXPECTS(qs.rotary != nullptr, name, ": query_stats.rotary = null, expected the model's rope");
    KVC_EXPECTS(qs.mean != nullptr, name, ": query_stats.mean = null");
    KVC_EXPECTS(qs.num_q_heads == in.num_q_heads && qs.head_dim == in.head_dim, name, ": query_stats shape ",
                qs.num_q_heads, "x", qs.head_dim, ", expected ", in.num_q_heads, "x", in.head_dim);
    KVC_EXPECTS(qs.rotary->config().head_dim == in.head_dim, name, ": rope head_dim = ", qs.rotary->config().head_dim,
                ", expected ", in.head_dim);
    KVC_EXPECTS(!p.use_covariance || qs.cov != nullptr, name,
                ": use_covariance = true but query_stats.cov = null; expected a covariance or use_covariance = false");
    shape_scores(in, out);
    const std::int32_t D = in.head_dim, G = in.group();
    const std::int32_t p0 = qs.next_position >= 0 ? qs.next_position : in.seen;
    const Eigen::MatrixXd R = mean_rotation(*qs.rotary, p0, p.n_future_positions);
    using RowMatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    const float inv_sqrt_d = 1.0f / std::sqrt(static_cast<float>(D));
    std::vector<float> perq;
    for (std::int32_t h = 0; h < in.num_kv_heads; ++h) {
      const head_input& hi = in.heads[static_cast<std::size_t>(h)];
      const std::int32_t n = hi.n;
      if (n == 0) continue;
      Eigen::Map<const RowMatF> K(hi.k, n, D);
      perq.assign(static_cast<std::size_t>(G) * n, 0.0f);
      const std::int32_t s0 = p.sinks_in_softmax ? 0 : std::min(p.n_sink, n);  // tokens left out of the softmax
      for (std::int32_t g = 0; g < G; ++g) {
        const std::int32_t qh = h * G + g;
        Eigen::VectorXd mu = Eigen::Map<const Eigen::VectorXf>(qs.mean + static_cast<std::size_t>(qh) * D, D).cast<double>();
        const Eigen::VectorXf mur = (R * mu).cast<float>();
        Eigen::VectorXf logit = (K * mur) * inv_sqrt_d;
        if (p.use_covariance) {
          Eigen::MatrixXd S = Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(
                                  qs.cov + static_cast<std::size_t>(qh) * D * D, D, D)
                                  .cast<double>();
          const Eigen::MatrixXf Sr = (R * S * R.transpose()).cast<float>();
          const RowMatF KS = K * Sr;
          logit += (KS.cwiseProduct(K).rowwise().sum()) / (2.0f * static_cast<float>(D));
        }
        float* dst = perq.data() + static_cast<std::size_t>(g) * n;
        for (std::int32_t t = s0; t < n; ++t) dst[t] = logit[t];
        detail::softmax_inplace(dst + s0, n - s0);
      }
      auto& o = out[static_cast<std::size_t>(h)];
      aggregate_group(perq.data(), G, n, static_cast<std::size_t>(n), p.agg, o.data());
      if (p.use_vnorm)
        for (std::int32_t t = 0; t < n; ++t)
          o[static_cast<std::size_t>(t)] = (o[static_cast<std::size_t>(t)] + p.epsilon) *
                                           detail::l2(hi.v + static_cast<std::size_t>(t) * D, D);
      if (s0 > 0) {  // left out of the softmax: above every scored token (they are protected anyway)
        float top = 0.0f;
        for (std::int32_t t = s0; t < n; ++t) top = std::max(top, o[static_cast<std::size_t>(t)]);
        for (std::int32_t t = 0; t < s0; ++t) o[static_cast<std::size_t>(t)] = top + 1.0f;
      }
    }
  }
};

}  // namespace evict
KVC_END_NAMESPACE
