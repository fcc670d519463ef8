// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Rotary position embedding: rotate-half (Llama, GPT-NeoX) and interleaved (GPT-J) pairings,
/// base theta, linear and Llama-3 frequency scaling, and re-rotation of stored keys by a position
/// delta (R(p + delta) = R(delta) R(p)), which is what moving kept tokens to new positions needs.
/// \par Reference
/// Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", arXiv:2104.09864.

#include <cmath>
#include <cstdint>
#include <vector>

#include <kvc/error.hpp>

KVC_BEGIN_NAMESPACE

enum class rope_style {
  rotate_half,  ///< pairs (i, i + rot/2): Llama, Mistral, Qwen, GPT-NeoX
  interleaved,  ///< pairs (2i, 2i + 1): GPT-J, the original RoFormer
};

struct rope_scaling {
  enum class kind { none, linear, llama3 };
  kind type = kind::none;
  float factor = 1.0f;                    ///< linear and llama3: context extension factor
  float low_freq_factor = 1.0f;           ///< llama3 (Llama 3.1 ships 1)
  float high_freq_factor = 4.0f;          ///< llama3 (Llama 3.1 ships 4)
  std::int32_t original_max_position = 8192;  ///< llama3 (Llama 3.1 ships 8192)
};

struct rope_config {
  std::int32_t head_dim = 128;
  std::int32_t rotary_dim = 0;  ///< 0: the whole head; else the leading rotary_dim channels
  float theta = 10000.0f;
  rope_style style = rope_style::rotate_half;
  rope_scaling scaling{};
};

class rope {
 public:
  explicit rope(const rope_config& c) : cfg_(c) {
    if (cfg_.rotary_dim == 0) cfg_.rotary_dim = cfg_.head_dim;
    KVC_EXPECTS(cfg_.head_dim > 0, "head_dim = ", cfg_.head_dim, ", expected > 0");
    KVC_EXPECTS(cfg_.rotary_dim > 0 && cfg_.rotary_dim <= cfg_.head_dim && cfg_.rotary_dim % 2 == 0,
                "rotary_dim = ", cfg_.rotary_dim, ", expected an even number in 2..head_dim (", cfg_.head_dim, ")");
    KVC_EXPECTS(cfg_.theta > 0.0f && std::isfinite(cfg_.theta), "theta = ", cfg_.theta, ", expected finite > 0");
    const auto& s = cfg_.scaling;
    KVC_EXPECTS(s.type == rope_scaling::kind::none || (s.factor > 0.0f && std::isfinite(s.factor)),
                "scaling.factor = ", s.factor, ", expected finite > 0");
    KVC_EXPECTS(s.type != rope_scaling::kind::llama3 || s.high_freq_factor > s.low_freq_factor,
                "scaling.high_freq_factor = ", s.high_freq_factor, ", expected > low_freq_factor = ",
                s.low_freq_factor);
    const std::int32_t half = cfg_.rotary_dim / 2;
    inv_freq_.resize(static_cast<std::size_t>(half));
    const double pi = 3.14159265358979323846;
    for (std::int32_t i = 0; i < half; ++i) {
      double f = std::pow(static_cast<double>(cfg_.theta), -2.0 * i / cfg_.rotary_dim);
      if (s.type == rope_scaling::kind::linear) {
        f /= s.factor;
      } else if (s.type == rope_scaling::kind::llama3) {
        const double wavelen = 2.0 * pi / f;
        const double low_wavelen = s.original_max_position / s.low_freq_factor;
        const double high_wavelen = s.original_max_position / s.high_freq_factor;
        if (wavelen > low_wavelen) {
          f /= s.factor;
        } else if (wavelen >= high_wavelen) {
          const double smooth = (s.original_max_position / wavelen - s.low_freq_factor) /
                                (s.high_freq_factor - s.low_freq_factor);
          f = (1.0 - smooth) * f / s.factor + smooth * f;
        }
      }
      inv_freq_[static_cast<std::size_t>(i)] = f;
      cos1_.push_back(std::cos(f));
      sin1_.push_back(std::sin(f));
    }
  }

  const rope_config& config() const noexcept { return cfg_; }
  /// Angular frequency of pair i (after scaling).
  double inv_freq(std::int32_t i) const noexcept { return inv_freq_[static_cast<std::size_t>(i)]; }

  /// Rotates x[head_dim] in place to position pos. Angles are computed in double so that large
  /// positions keep their precision.
  template <class T>
  void apply(T* x, double pos) const noexcept {
    const std::int32_t half = cfg_.rotary_dim / 2;
    for (std::int32_t i = 0; i < half; ++i) {
      const double a = pos * inv_freq_[static_cast<std::size_t>(i)];
      const double c = std::cos(a), s = std::sin(a);
      const std::int32_t i0 = cfg_.style == rope_style::rotate_half ? i : 2 * i;
      const std::int32_t i1 = cfg_.style == rope_style::rotate_half ? i + half : 2 * i + 1;
      const double x0 = static_cast<float>(x[i0]), x1 = static_cast<float>(x[i1]);
      x[i0] = T(static_cast<float>(x0 * c - x1 * s));
      x[i1] = T(static_cast<float>(x0 * s + x1 * c));
    }
  }

  /// Rows at many positions: f(t, i, cos, sin) for row t < n at position pos[t] and pair i (in
  /// order: t, then i). Consecutive positions (a run of kept tokens) step by the pair's rotation
  /// in double, (cos, sin) at p + 1 from (cos, sin) at p, instead of a cos and a sin per pair and
  /// row; every 256 rows, and at any gap, the angle is computed afresh, so the recurrence's
  /// round-off (about 1e-16 per step) never reaches float's. Why: pre-RoPE keys are rotated at
  /// every decode step, and a cos and sin in double per pair and token made 2-bit pre-RoPE KIVI
  /// decode at 5.4 tokens/s against ~20 for the other rows at 4k (docs/results.md).
  template <class F>
  void for_each_angle(const std::int32_t* pos, std::int32_t n, F&& f) const {
    const std::int32_t half = cfg_.rotary_dim / 2;
    constexpr std::int32_t max_half = 512;  // head_dim <= 1024 (every store checks it)
    double c[max_half], sn[max_half];
    for (std::int32_t t = 0; t < n; ++t) {
      const bool step = t > 0 && t % 256 != 0 && pos[t] == static_cast<std::int64_t>(pos[t - 1]) + 1 && half <= max_half;
      for (std::int32_t i = 0; i < half; ++i) {
        const std::size_t k = static_cast<std::size_t>(i);
        double ci, si;
        if (step) {
          ci = c[k] * cos1_[k] - sn[k] * sin1_[k];
          si = sn[k] * cos1_[k] + c[k] * sin1_[k];
        } else {
          const double a = static_cast<double>(pos[t]) * inv_freq_[k];
          ci = std::cos(a);
          si = std::sin(a);
        }
        if (i < max_half) c[k] = ci, sn[k] = si;
        f(t, i, ci, si);
      }
    }
  }

  /// Rotates rows x + t * stride (t < n) in place to positions pos[t]: apply() for each row, with
  /// the angles of for_each_angle.
  template <class T>
  void apply_rows(T* x, std::int32_t n, std::size_t stride, const std::int32_t* pos) const {
    const std::int32_t half = cfg_.rotary_dim / 2;
    const bool rh = cfg_.style == rope_style::rotate_half;
    for_each_angle(pos, n, [&](std::int32_t t, std::int32_t i, double c, double s) {
      T* r = x + static_cast<std::size_t>(t) * stride;
      const std::int32_t i0 = rh ? i : 2 * i, i1 = rh ? i + half : 2 * i + 1;
      const double x0 = static_cast<float>(r[i0]), x1 = static_cast<float>(r[i1]);
      r[i0] = T(static_cast<float>(x0 * c - x1 * s));
      r[i1] = T(static_cast<float>(x0 * s + x1 * c));
    });
  }

  /// Applies RoPE to n heads laid out contiguously, [n][head_dim].
  template <class T>
  void apply_heads(T* x, std::int32_t n, double pos) const noexcept {
    for (std::int32_t h = 0; h < n; ++h) apply(x + static_cast<std::size_t>(h) * cfg_.head_dim, pos);
  }

  /// Moves a key rotated for position p to position p + delta (delta may be negative).
  template <class T>
  void rerotate(T* x, double delta) const noexcept { apply(x, delta); }

 private:
  rope_config cfg_;
  std::vector<double> inv_freq_;
  std::vector<double> cos1_, sin1_;  ///< cos and sin of each pair's angle per position step
};

KVC_END_NAMESPACE
