// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Random eviction, the baseline every paper compares against: a uniform score per token from a
/// counter-based generator seeded by (seed, sequence, layer, head, position), so a run is
/// reproducible and a token keeps its score across repeated compressions.
/// \par Reference
/// Devoto et al., "Expected Attention: KV Cache Compression by Estimating Attention from Future Queries Distribution", arXiv:2510.00636 (kvpress RandomPress).

#include <cstdint>

#include <kvc/evict/core.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

struct random_params {
  std::uint64_t seed = 0;
  protection protect{0, 0};
};

struct random {
  using params_type = random_params;
  using observation_type = no_observation;
  static constexpr unsigned reads = reads_nothing;
  static constexpr const char* name = "random";
  params_type p;
  random() = default;
  explicit random(const params_type& params) : p(params) {}
  protection protect() const { return p.protect; }

  static std::uint64_t mix(std::uint64_t x) noexcept {  // splitmix64 finaliser
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
  }
  void score(const layer_input& in, const observations&, layer_scores& out) const {
    shape_scores(in, out);
    for (std::int32_t h = 0; h < in.num_kv_heads; ++h) {
      const head_input& hi = in.heads[static_cast<std::size_t>(h)];
      const std::uint64_t base =
          mix(p.seed ^ mix(static_cast<std::uint64_t>(in.seq) * 1000003u + static_cast<std::uint64_t>(in.layer) * 8191u +
                           static_cast<std::uint64_t>(h)));
      for (std::int32_t t = 0; t < hi.n; ++t)
        out[static_cast<std::size_t>(h)][static_cast<std::size_t>(t)] =
            static_cast<float>(mix(base ^ static_cast<std::uint64_t>(hi.positions[t])) >> 40) * (1.0f / 16777216.0f);
    }
  }
};

}  // namespace evict
KVC_END_NAMESPACE
