// SPDX-License-Identifier: Apache-2.0
// Merged tokens: kvc/store/merged_cache.hpp (merge_layer, log-weights) and
// kvc/cpu/merged_attention.hpp (decode attention with the log-weight on every logit), share_layer.
// Everything is checked against plain double-precision code written here: a dense two-pass softmax
// over the gathered rows with the log-weights as a bias, merged rows as weighted means of the rows
// gathered before the merge. Nothing of the kernel (tiles, online softmax, SIMD tails) or of
// merge_layer's planning is reused.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include <kvc/attention.hpp>
#include <kvc/attention/reference.hpp>
#include <kvc/cpu/decode_attention.hpp>
#include <kvc/cpu/merged_attention.hpp>
#include <kvc/cpu/prefill_attention.hpp>
#include <kvc/parallel/thread_pool.hpp>
#include <kvc/store/merged_cache.hpp>

#include "cache_builders.hpp"
#include "cache_checks.hpp"
#include "fast_require.hpp"
#include "isa_check.hpp"
#include "kvc_catch.hpp"
#include "merge_test_util.hpp"
#include "random.hpp"

namespace {

using kvc::merge::mean_weights;
using kvc::merge::merge_group;
using kvc::merge::merged_cache;

using kvc_test::copy_stream;
using kvc_test::stream_copy;

/// Dense decode attention in double: logit_t = scale q·k_t + bias_t (bias may be empty: 0).
/// Returns out [D]; lse and the probabilities [n] through the pointers.
std::vector<double> dense_attention(const float* q, const std::vector<float>& k, const std::vector<float>& v,
                                    const std::vector<float>& bias, std::int32_t n, std::int32_t D, double scale,
                                    double* lse = nullptr, std::vector<double>* probs = nullptr) {
  std::vector<double> s(static_cast<std::size_t>(n)), out(static_cast<std::size_t>(D), 0.0);
  double mx = -std::numeric_limits<double>::infinity();
  for (std::int32_t t = 0; t < n; ++t) {
    double dot = 0;
    for (std::int32_t d = 0; d < D; ++d) dot += double{q[d]} * k[static_cast<std::size_t>(t) * D + d];
    s[static_cast<std::size_t>(t)] = scale * dot + (bias.empty() ? 0.0 : double{bias[static_cast<std::size_t>(t)]});
    mx = std::max(mx, s[static_cast<std::size_t>(t)]);
  }
  double z = 0;
  for (std::int32_t t = 0; t < n; ++t) z += std::exp(s[static_cast<std::size_t>(t)] - mx);
  if (probs) probs->assign(static_cast<std::size_t>(n), 0.0);
  for (std::int32_t t = 0; t < n; ++t) {
    const double p = std::exp(s[static_cast<std::size_t>(t)] - mx) / z;
    for (std::int32_t d = 0; d < D; ++d) out[static_cast<std::size_t>(d)] += p * v[static_cast<std::size_t>(t) * D + d];
    if (probs) (*probs)[static_cast<std::size_t>(t)] = p;
  }
  if (lse) *lse = n > 0 ? mx + std::log(z) : -std::numeric_limits<double>::infinity();
  return out;
}

template <class T>
void fill(merged_cache<T>& c, kvc::seq_id s, std::int32_t layer, std::int32_t n, kvc_test::rng& r) {
  const auto& cfg = c.config();
  const auto k = r.normals(static_cast<std::size_t>(n) * cfg.num_kv_heads * cfg.head_dim);
  const auto v = r.normals(k.size());
  c.append(s, layer, k.data(), v.data(), n);
}

/// Random disjoint groups over a stream of length L: about `frac` of the tokens in groups of 2..6,
/// random weights in [0, 2) with some exact zeros (never all zero), the target a random member.
std::vector<merge_group> random_groups(std::int32_t L, double frac, kvc_test::rng& r) {
  std::vector<merge_group> gs;
  auto perm = r.permutation(L);
  std::size_t at = 0;
  const std::size_t use = static_cast<std::size_t>(frac * L);
  while (at + 2 <= use) {
    const std::size_t m = std::min<std::size_t>(static_cast<std::size_t>(r.integer(2, 6)), use - at);
    merge_group g;
    for (std::size_t i = 0; i < m; ++i) {
      g.members.push_back(perm[at + i]);
      g.weights.push_back(r.coin(0.15) ? 0.0f : r.uniform(0.05f, 2.0f));
    }
    g.weights[static_cast<std::size_t>(r.integer(0, static_cast<std::int32_t>(m) - 1))] = r.uniform(0.5f, 1.5f);
    g.target = g.members[static_cast<std::size_t>(r.integer(0, static_cast<std::int32_t>(m) - 1))];
    gs.push_back(g);
    at += m;
  }
  return gs;
}

double tol_of(bool half_pages) { return half_pages ? 1.0 / 1024 : 2e-7; }

/// The merge in double, from the copies taken before: the kept indices, rows, log-weights and
/// positions one head must hold afterwards.
stream_copy expected_merge(const stream_copy& b, const std::vector<merge_group>& gs, std::int32_t D, mean_weights mode) {
  std::vector<int> dropped(static_cast<std::size_t>(b.n), 0);
  std::map<std::int32_t, const merge_group*> by_target;
  for (const auto& g : gs) {
    for (std::int32_t m : g.members)
      if (m != g.target) dropped[static_cast<std::size_t>(m)] = 1;
    by_target[g.target] = &g;
  }
  stream_copy e;
  for (std::int32_t t = 0; t < b.n; ++t) {
    if (dropped[static_cast<std::size_t>(t)]) continue;
    ++e.n;
    e.pos.push_back(b.pos[static_cast<std::size_t>(t)]);
    auto it = by_target.find(t);
    if (it == by_target.end()) {
      e.lw.push_back(b.lw[static_cast<std::size_t>(t)]);
      for (std::int32_t d = 0; d < D; ++d) {
        e.k.push_back(b.k[static_cast<std::size_t>(t) * D + d]);
        e.v.push_back(b.v[static_cast<std::size_t>(t) * D + d]);
      }
      continue;
    }
    const merge_group& g = *it->second;
    double mass = 0, asum = 0;
    std::vector<double> k(static_cast<std::size_t>(D), 0.0), v(k.size(), 0.0);
    for (std::size_t i = 0; i < g.members.size(); ++i) {
      const std::size_t m = static_cast<std::size_t>(g.members[i]);
      const double mult = std::exp(double{b.lw[m]});
      const double a = mode == mean_weights::mass ? g.weights[i] * mult : double{g.weights[i]};
      mass += g.weights[i] * mult;
      asum += a;
      for (std::int32_t d = 0; d < D; ++d) {
        k[static_cast<std::size_t>(d)] += a * b.k[m * D + static_cast<std::size_t>(d)];
        v[static_cast<std::size_t>(d)] += a * b.v[m * D + static_cast<std::size_t>(d)];
      }
    }
    e.lw.push_back(static_cast<float>(std::log(mass)));
    for (std::int32_t d = 0; d < D; ++d) {
      e.k.push_back(static_cast<float>(k[static_cast<std::size_t>(d)] / asum));
      e.v.push_back(static_cast<float>(v[static_cast<std::size_t>(d)] / asum));
    }
  }
  return e;
}

/// Runs the kernel and checks every query head against dense_attention over the stream copies;
/// a random choice of probability outputs (none, probs, group_probs, both) is checked with it,
/// entries past each head's length left as they were.
template <class T>
void check_attention(const merged_cache<T>& c, kvc::seq_id s, std::int32_t layer, std::int32_t Hq, kvc_test::rng& r,
                     kvc::thread_pool* pool = nullptr) {
  const auto& cfg = c.config();
  const std::int32_t D = cfg.head_dim, G = Hq / cfg.num_kv_heads;
  const auto q = r.normals(static_cast<std::size_t>(Hq) * D, 1.5f);
  std::vector<float> out(q.size()), lse(static_cast<std::size_t>(Hq));
  kvc::decode_options o;
  o.lse = lse.data();
  o.pool = pool;
  const int want = r.integer(0, 3);  // bit 0: probs, bit 1: group_probs
  std::int32_t longest = 0;
  for (std::int32_t h = 0; h < cfg.num_kv_heads; ++h) longest = std::max(longest, c.length(s, layer, h));
  o.probs_stride = want ? longest + r.integer(0, 5) : 0;
  constexpr float sentinel = -7.25f;
  std::vector<float> probs(static_cast<std::size_t>(Hq) * static_cast<std::size_t>(o.probs_stride), sentinel);
  std::vector<float> gprobs(static_cast<std::size_t>(cfg.num_kv_heads) * static_cast<std::size_t>(o.probs_stride),
                            sentinel);
  if (want & 1) o.probs = probs.data();
  if (want & 2) o.group_probs = gprobs.data();
  INFO("probability outputs " << want << ", stride " << o.probs_stride);
  kvc::cpu::merged_decode_attention(c, s, layer, q.data(), Hq, out.data(), o);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  for (std::int32_t h = 0; h < cfg.num_kv_heads; ++h) {
    const stream_copy st = copy_stream(c, s, layer, h);
    double vmax = 1;
    for (float x : st.v) vmax = std::max(vmax, std::fabs(double{x}));
    std::vector<double> gsum(static_cast<std::size_t>(st.n), 0.0);
    for (std::int32_t g = 0; g < G; ++g) {
      const std::int32_t qh = h * G + g;
      double ref_lse = 0;
      std::vector<double> ref_p;
      const auto ref = dense_attention(q.data() + static_cast<std::size_t>(qh) * D, st.k, st.v, st.lw, st.n, D, scale,
                                       &ref_lse, &ref_p);
      for (std::int32_t t = 0; t < st.n; ++t) gsum[static_cast<std::size_t>(t)] += ref_p[static_cast<std::size_t>(t)];
      if (want & 1)
        for (std::int32_t t = 0; t < o.probs_stride; ++t) {
          const float got = probs[static_cast<std::size_t>(qh) * o.probs_stride + t];
          if (t >= st.n)
            KVC_REQUIRE(got == sentinel, "probs of q head " << qh << " written past the head's " << st.n << " tokens, at " << t);
          else
            KVC_REQUIRE(std::fabs(got - ref_p[static_cast<std::size_t>(t)]) <= 2e-5 * ref_p[static_cast<std::size_t>(t)] + 1e-7,
                        "probs of q head " << qh << " token " << t << ": " << got << " vs " << ref_p[static_cast<std::size_t>(t)]);
        }
      for (std::int32_t d = 0; d < D; ++d)
        KVC_REQUIRE(std::fabs(out[static_cast<std::size_t>(qh) * D + d] - ref[static_cast<std::size_t>(d)]) <= 2e-5 * vmax,
                    "kv head " << h << " q head " << qh << " d " << d << ": " << out[static_cast<std::size_t>(qh) * D + d]
                               << " vs " << ref[static_cast<std::size_t>(d)]);
      if (st.n == 0)
        REQUIRE(std::isinf(lse[static_cast<std::size_t>(qh)]));
      else
        KVC_REQUIRE(std::fabs(lse[static_cast<std::size_t>(qh)] - ref_lse) <= 2e-5 * (1 + std::fabs(ref_lse)),
                    "lse of q head " << qh);
    }
    if (want & 2)
      for (std::int32_t t = 0; t < o.probs_stride; ++t) {
        const float got = gprobs[static_cast<std::size_t>(h) * o.probs_stride + t];
        if (t >= st.n)
          KVC_REQUIRE(got == sentinel, "group_probs of kv head " << h << " written past its " << st.n << " tokens, at " << t);
        else
          KVC_REQUIRE(std::fabs(got - gsum[static_cast<std::size_t>(t)]) <= 2e-5 * gsum[static_cast<std::size_t>(t)] + 1e-7 * G,
                      "group_probs of kv head " << h << " token " << t << ": " << got << " vs " << gsum[static_cast<std::size_t>(t)]);
      }
  }
}

template <class T>
void kernel_and_merge_trials(std::uint64_t salt) {
  const bool fp16 = std::is_same<T, kvc::half>::value;
  const std::int32_t dims[] = {1, 3, 4, 7, 8, 15, 16, 17, 24, 31, 33, 48, 64, 80, 96, 128};
  for (int trial = 0; trial < 40; ++trial) {
    kvc_test::rng r(salt + static_cast<std::uint64_t>(trial));
    const std::int32_t Hkv = r.integer(1, 3), D = dims[r.integer(0, 15)], P = 1 << r.integer(0, 5);
    const std::int32_t G = trial % 7 == 6 ? r.integer(9, 12) : r.integer(1, 8);
    merged_cache<T> c(kvc_test::cache_shape(2, Hkv, D, P, 4096));
    const kvc::seq_id s = c.add_sequence();
    const std::int32_t layer = r.integer(0, 1);
    fill(c, s, layer, r.integer(1, 150), r);
    INFO("trial " << trial << (fp16 ? " fp16" : " fp32") << " Hkv=" << Hkv << " D=" << D << " P=" << P << " G=" << G
                  << " " << kvc_test::simd_path());
    // No merge yet: every log-weight 0, and the kernel is plain decode attention.
    for (std::int32_t h = 0; h < Hkv; ++h)
      for (float w : c.log_weights(s, layer, h)) REQUIRE(w == 0.0f);
    check_attention(c, s, layer, Hkv * G, r);
    {
      const auto q = r.normals(static_cast<std::size_t>(Hkv * G) * D);
      std::vector<float> a(q.size()), b(q.size());
      kvc::cpu::merged_decode_attention(c, s, layer, q.data(), Hkv * G, a.data());
      kvc::cpu::decode_attention(c.cache(), s, layer, q.data(), Hkv * G, b.data());
      for (std::size_t i = 0; i < a.size(); ++i) KVC_REQUIRE(std::fabs(a[i] - b[i]) <= 1e-5f * (1 + std::fabs(b[i])), i);
    }
    // Two rounds of random merges (the second merges already-merged tokens: log-weights != 0).
    for (int round = 0; round < 2; ++round) {
      const mean_weights mode = r.coin() ? mean_weights::mass : mean_weights::given;
      std::vector<std::vector<merge_group>> groups(static_cast<std::size_t>(Hkv));
      std::vector<stream_copy> before;
      for (std::int32_t h = 0; h < Hkv; ++h) {
        before.push_back(copy_stream(c, s, layer, h));
        groups[static_cast<std::size_t>(h)] = random_groups(c.length(s, layer, h), r.uniform(0.0f, 0.9f), r);
      }
      const std::size_t bytes0 = c.bytes_in_use();
      c.merge_layer(s, layer, groups, mode);
      INFO("round " << round << " mode " << (mode == mean_weights::mass ? "mass" : "given"));
      std::int64_t tokens = 0;
      for (std::int32_t h = 0; h < Hkv; ++h) {
        const stream_copy e = expected_merge(before[static_cast<std::size_t>(h)], groups[static_cast<std::size_t>(h)], D, mode);
        const stream_copy got = copy_stream(c, s, layer, h);
        tokens += got.n;
        REQUIRE(got.n == e.n);
        REQUIRE(got.pos == e.pos);
        for (std::size_t i = 0; i < e.lw.size(); ++i)
          KVC_REQUIRE(std::fabs(got.lw[i] - e.lw[i]) <= 1e-5 * (1 + std::fabs(e.lw[i])), "lw " << i);
        const double tol = tol_of(fp16);
        for (std::size_t i = 0; i < e.k.size(); ++i) {
          KVC_REQUIRE(std::fabs(got.k[i] - e.k[i]) <= tol * (std::fabs(e.k[i]) + 1e-3), "k " << i << ": " << got.k[i] << " vs " << e.k[i]);
          KVC_REQUIRE(std::fabs(got.v[i] - e.v[i]) <= tol * (std::fabs(e.v[i]) + 1e-3), "v " << i);
        }
      }
      // Accounting: pages never grow, and the cache's figures are the pool's.
      REQUIRE(c.bytes_in_use() <= bytes0);
      REQUIRE(c.bytes_in_use() == static_cast<std::size_t>(c.cache().pool().pages_in_use()) * c.cache().pool().page_bytes());
      REQUIRE(c.metadata_bytes() == c.cache().metadata_bytes() + 4 * static_cast<std::size_t>(tokens));
      check_attention(c, s, layer, Hkv * G, r);
    }
  }
}

/// Appends, to every kv head of one layer, `n` random tokens with `copies` identical copies of
/// one random token inserted at random places; returns the copies' indices (the same in every head).
template <class T>
std::vector<std::int32_t> fill_with_copies(merged_cache<T>& c, kvc::seq_id s, std::int32_t layer, std::int32_t n,
                                           std::int32_t copies, kvc_test::rng& r) {
  const auto& cfg = c.config();
  const std::int32_t H = cfg.num_kv_heads, D = cfg.head_dim, L = n + copies;
  auto k = r.normals(static_cast<std::size_t>(L) * H * D), v = r.normals(k.size());
  const auto at = r.subset(L, copies);
  for (std::int32_t i : at)
    for (std::size_t j = 0; j < static_cast<std::size_t>(H) * D; ++j) {
      k[static_cast<std::size_t>(i) * H * D + j] = k[static_cast<std::size_t>(at[0]) * H * D + j];
      v[static_cast<std::size_t>(i) * H * D + j] = v[static_cast<std::size_t>(at[0]) * H * D + j];
    }
  c.append(s, layer, k.data(), v.data(), L);
  return at;
}

template <class T>
void identical_trials(std::uint64_t salt) {
  for (int trial = 0; trial < 24; ++trial) {
    kvc_test::rng r(salt + static_cast<std::uint64_t>(trial));
    const std::int32_t H = r.integer(1, 2), D = r.integer(1, 70), P = 1 << r.integer(0, 4), G = r.integer(1, 8);
    const std::int32_t copies = r.integer(2, 9);
    merged_cache<T> c(kvc_test::cache_shape(1, H, D, P, 4096));
    const kvc::seq_id s = c.add_sequence();
    const auto at = fill_with_copies(c, s, 0, r.integer(0, 60), copies, r);
    INFO("trial " << trial << " H=" << H << " D=" << D << " P=" << P << " G=" << G << " copies=" << copies);
    const auto q = r.normals(static_cast<std::size_t>(H * G) * D, 2.0f);
    std::vector<float> a(q.size()), b(q.size()), la(static_cast<std::size_t>(H * G)), lb(la.size());
    kvc::decode_options o;
    o.lse = la.data();
    kvc::cpu::merged_decode_attention(c, s, 0, q.data(), H * G, a.data(), o);
    // The store read through its views and log-weights (merged_cache::layer), by the double
    // reference, before and after the merge.
    typename merged_cache<T>::layer_buffer buf;
    std::vector<float> ra(q.size()), rb(q.size());
    kvc::reference::decode_attention(c.layer(s, 0, buf), q.data(), H * G, ra.data());
    // The direct check of the kernel: with one copy's log-weight raised to log k by hand in the
    // reference and the other copies absent, the dense output equals the unmerged one.
    const stream_copy full = copy_stream(c, s, 0, 0);
    // Merge the copies, in two steps when there are enough of them: mass mode makes the steps
    // equal to one merge.
    std::vector<std::vector<merge_group>> groups(static_cast<std::size_t>(H));
    const std::size_t split = copies >= 4 ? 2 : at.size();
    for (std::int32_t h = 0; h < H; ++h) {
      merge_group g;
      g.target = at[0];
      for (std::size_t i = 0; i < split; ++i) g.members.push_back(at[i]), g.weights.push_back(1.0f);
      groups[static_cast<std::size_t>(h)] = {g};
    }
    c.merge_layer(s, 0, groups);
    if (split < at.size()) {
      // After the first merge the indices above at[1] moved down by one (at[1] was dropped).
      for (std::int32_t h = 0; h < H; ++h) {
        merge_group g;
        g.target = at[0];
        g.members.push_back(at[0]);
        g.weights.push_back(1.0f);
        for (std::size_t i = split; i < at.size(); ++i) g.members.push_back(at[i] - 1), g.weights.push_back(1.0f);
        groups[static_cast<std::size_t>(h)] = {g};
      }
      c.merge_layer(s, 0, groups);
    }
    for (std::int32_t h = 0; h < H; ++h) {
      REQUIRE(c.length(s, 0, h) == full.n - copies + 1);
      KVC_REQUIRE(std::fabs(c.log_weights(s, 0, h)[static_cast<std::size_t>(at[0])] - std::log(static_cast<float>(copies))) <= 1e-6f,
                  "head " << h);
    }
    o.lse = lb.data();
    kvc::cpu::merged_decode_attention(c, s, 0, q.data(), H * G, b.data(), o);
    kvc::reference::decode_attention(c.layer(s, 0, buf), q.data(), H * G, rb.data());
    std::vector<float> via_layer(q.size());  // the heads name their store: the merged kernel runs
    kvc::cpu::decode_attention(c.layer(s, 0, buf), q.data(), H * G, via_layer.data());
    KVC_REQUIRE(via_layer == b, "decode_attention(merged layer) differs from merged_decode_attention");
    kvc::decode_attention(c.layer(s, 0, buf), q.data(), H * G, via_layer.data());  // the front door
    KVC_REQUIRE(via_layer == b, "kvc::decode_attention(merged layer) differs from merged_decode_attention");
    double vmax = 1;
    for (float x : full.v) vmax = std::max(vmax, std::fabs(double{x}));
    for (std::size_t i = 0; i < a.size(); ++i) {
      KVC_REQUIRE(std::fabs(ra[i] - a[i]) <= 4e-6 * vmax, "reference before the merge, out " << i);
      KVC_REQUIRE(std::fabs(rb[i] - ra[i]) <= 4e-6 * vmax, "reference after the merge, out " << i);
    }
    for (std::size_t i = 0; i < a.size(); ++i)
      KVC_REQUIRE(std::fabs(a[i] - b[i]) <= 4e-6 * vmax, "out " << i << ": " << a[i] << " vs " << b[i]);
    for (std::size_t i = 0; i < la.size(); ++i) KVC_REQUIRE(std::fabs(la[i] - lb[i]) <= 4e-6f * (1 + std::fabs(la[i])), i);
    // The merged rows are the copy's rows exactly (a mean of equal values), in fp16 too.
    const stream_copy merged = copy_stream(c, s, 0, 0);
    for (std::int32_t d = 0; d < D; ++d) {
      REQUIRE(merged.k[static_cast<std::size_t>(at[0]) * D + d] == full.k[static_cast<std::size_t>(at[0]) * D + d]);
      REQUIRE(merged.v[static_cast<std::size_t>(at[0]) * D + d] == full.v[static_cast<std::size_t>(at[0]) * D + d]);
    }
    // Direct: the dense reference over the merged stream (bias log k on one copy) equals the one
    // over the k copies without bias, and the kernel matches it.
    for (std::int32_t g = 0; g < G; ++g) {
      const auto r1 = dense_attention(q.data() + static_cast<std::size_t>(g) * D, full.k, full.v, {}, full.n, D,
                                      1.0 / std::sqrt(static_cast<double>(D)));
      for (std::int32_t d = 0; d < D; ++d)
        KVC_REQUIRE(std::fabs(b[static_cast<std::size_t>(g) * D + d] - r1[static_cast<std::size_t>(d)]) <= 2e-5 * vmax,
                    "q head " << g << " d " << d);
    }
  }
}

}  // namespace

TEST_CASE("merged_decode_attention and merge_layer against double references", "[merge]") {
  kernel_and_merge_trials<float>(9100);
  kernel_and_merge_trials<kvc::half>(9200);
}

TEST_CASE("merged_decode_attention spreads kv heads over a pool", "[merge]") {
  kvc::thread_pool pool(3);
  kvc_test::rng r(9250);
  merged_cache<float> c(kvc_test::cache_shape(1, 4, 40, 8, 1024));
  const kvc::seq_id s = c.add_sequence();
  fill(c, s, 0, 77, r);
  std::vector<std::vector<merge_group>> groups;
  for (std::int32_t h = 0; h < 4; ++h) groups.push_back(random_groups(77, 0.5, r));
  c.merge_layer(s, 0, groups);
  check_attention(c, s, 0, 8, r, &pool);
}

TEST_CASE("merging k identical tokens leaves attention unchanged", "[merge]") {
  identical_trials<float>(9300);
  identical_trials<kvc::half>(9400);
}

static_assert(kvc::has_log_weights_v<merged_cache<float>::layer_view>, "a merged layer carries its log-weights");
static_assert(!kvc::has_log_weights_v<kvc::kv_cache<float>::layer_view>, "a plain layer carries none");

TEST_CASE("merging near-identical tokens changes attention within the derived bound", "[merge]") {
  // A group of m tokens k_i = k0 + e_i, v_i = v0 + f_i merged with weights 1 (all log-weights 0)
  // is, by the identical-token invariance, the same as m copies of (k̄, v̄) (the means). So the
  // merge replaces, for each member, (k_i, v_i) by (k̄, v̄) and leaves every other token:
  //  - its logit moves by |scale q·(k̄ - k_i)| <= scale |q|₂ max_i |k̄ - k_i|₂ =: δ;
  //  - so every probability changes by a factor in [e^{-2δ}, e^{2δ}] (numerator by e^{±δ},
  //    normaliser by e^{±δ}), Σ_t |p'_t - p_t| <= e^{2δ} - 1;
  //  - per channel d: o'_d - o_d = Σ p'_t (v'_td - v_td) + Σ (p'_t - p_t)(v_td - c) for any c
  //    (Σ p' = Σ p = 1); with c the midrange of channel d over the original values,
  //    |o'_d - o_d| <= max_i |v̄_d - v_id| + (e^{2δ} - 1) · R_d / 2, R_d the range of channel d.
  // Checked with a float-rounding slack; and the bound is not vacuous: dropping the members
  // without the log-weight (plain eviction of m-1 of them) breaks it in most trials.
  int broken_without_lw = 0;
  const int trials = 40;
  for (int trial = 0; trial < trials; ++trial) {
    kvc_test::rng r(9500 + static_cast<std::uint64_t>(trial));
    const std::int32_t D = r.integer(2, 64), P = 1 << r.integer(0, 4), m = r.integer(2, 12);
    const float eps = r.uniform(1e-4f, 0.05f);
    merged_cache<float> c(kvc_test::cache_shape(1, 1, D, P, 1024));
    const kvc::seq_id s = c.add_sequence();
    const std::int32_t n = r.integer(0, 40), L = n + m;
    auto k = r.normals(static_cast<std::size_t>(L) * D), v = r.normals(k.size());
    const auto at = r.subset(L, m);
    for (std::int32_t i : at)
      for (std::int32_t d = 0; d < D; ++d) {
        k[static_cast<std::size_t>(i) * D + d] = k[static_cast<std::size_t>(at[0]) * D + d] + eps * r.uniform();
        v[static_cast<std::size_t>(i) * D + d] = v[static_cast<std::size_t>(at[0]) * D + d] + eps * r.uniform();
      }
    c.append(s, 0, k.data(), v.data(), L);
    // Odd trials point q at the group (logit about 3 above the rest): the group then holds most
    // of the mass, where a wrong or missing log-weight shows most.
    auto q = r.normals(static_cast<std::size_t>(D), 2.0f);
    if (trial % 2) {
      double kn = 0;
      for (std::int32_t d = 0; d < D; ++d) kn += double{k[static_cast<std::size_t>(at[0]) * D + d]} * k[static_cast<std::size_t>(at[0]) * D + d];
      for (std::int32_t d = 0; d < D; ++d)
        q[static_cast<std::size_t>(d)] = 0.3f * q[static_cast<std::size_t>(d)] +
                                         static_cast<float>(3.0 * std::sqrt(double(D)) * k[static_cast<std::size_t>(at[0]) * D + d] / kn);
    }
    std::vector<float> a(static_cast<std::size_t>(D)), b(a.size());
    kvc::cpu::merged_decode_attention(c, s, 0, q.data(), 1, a.data());
    const stream_copy st = copy_stream(c, s, 0, 0);
    merge_group g;
    g.target = at[0];
    g.members = at;
    g.weights.assign(at.size(), 1.0f);
    c.merge_layer(s, 0, {{g}});
    kvc::cpu::merged_decode_attention(c, s, 0, q.data(), 1, b.data());
    // The bound, in double, from the rows before the merge.
    const double scale = 1.0 / std::sqrt(static_cast<double>(D));
    std::vector<double> kbar(static_cast<std::size_t>(D), 0.0), vbar(kbar.size(), 0.0);
    for (std::int32_t i : at)
      for (std::int32_t d = 0; d < D; ++d) {
        kbar[static_cast<std::size_t>(d)] += st.k[static_cast<std::size_t>(i) * D + d] / m;
        vbar[static_cast<std::size_t>(d)] += st.v[static_cast<std::size_t>(i) * D + d] / m;
      }
    double qn = 0, kdev = 0;
    for (std::int32_t d = 0; d < D; ++d) qn += double{q[static_cast<std::size_t>(d)]} * q[static_cast<std::size_t>(d)];
    for (std::int32_t i : at) {
      double e2 = 0;
      for (std::int32_t d = 0; d < D; ++d) {
        const double e = kbar[static_cast<std::size_t>(d)] - st.k[static_cast<std::size_t>(i) * D + d];
        e2 += e * e;
      }
      kdev = std::max(kdev, std::sqrt(e2));
    }
    const double delta = scale * std::sqrt(qn) * kdev;
    // Without the log-weight: the merged token as one plain token (what eviction of m-1 copies
    // with mean rows would give).
    const stream_copy after = copy_stream(c, s, 0, 0);
    const auto no_lw = dense_attention(q.data(), after.k, after.v, {}, after.n, D, scale);
    bool broken = false;
    for (std::int32_t d = 0; d < D; ++d) {
      double vdev = 0, lo = 1e300, hi = -1e300, vmax = 1;
      for (std::int32_t i : at)
        vdev = std::max(vdev, std::fabs(vbar[static_cast<std::size_t>(d)] - st.v[static_cast<std::size_t>(i) * D + d]));
      for (std::int32_t t = 0; t < L; ++t) {
        const double x = st.v[static_cast<std::size_t>(t) * D + d];
        lo = std::min(lo, x), hi = std::max(hi, x), vmax = std::max(vmax, std::fabs(x));
      }
      const double bound = vdev + (std::exp(2 * delta) - 1) * (hi - lo) / 2 + 4e-6 * vmax;
      KVC_REQUIRE(std::fabs(double{b[static_cast<std::size_t>(d)]} - a[static_cast<std::size_t>(d)]) <= bound,
                  "trial " << trial << " d " << d << " m " << m << " eps " << eps << ": |Δ| = "
                           << std::fabs(double{b[static_cast<std::size_t>(d)]} - a[static_cast<std::size_t>(d)]) << " > " << bound);
      broken = broken || std::fabs(no_lw[static_cast<std::size_t>(d)] - a[static_cast<std::size_t>(d)]) > bound;
    }
    broken_without_lw += broken ? 1 : 0;
  }
  INFO(broken_without_lw << " of " << trials << " trials broken without the log-weight");
  REQUIRE(broken_without_lw >= trials / 3);
}

TEST_CASE("merge_layer validates every argument and leaves the cache unchanged", "[merge][strong]") {
  kvc_test::rng r(9600);
  merged_cache<kvc::half> c(kvc_test::cache_shape(2, 2, 12, 4, 1024));
  const kvc::seq_id s = c.add_sequence();
  fill(c, s, 0, 30, r);
  fill(c, s, 1, 30, r);
  c.merge_layer(s, 1, {random_groups(30, 0.6, r), random_groups(30, 0.6, r)});  // nonzero log-weights
  auto state = [&] { return kvc_test::full_state(c, {s}); };
  const auto before = state();
  auto group = [](std::int32_t target, std::vector<std::int32_t> members, std::vector<float> w) {
    merge_group g;
    g.target = target;
    g.members = std::move(members);
    g.weights = std::move(w);
    return g;
  };
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const merge_group ok = group(3, {3, 4}, {1, 1});
  struct bad_case {
    std::vector<std::vector<merge_group>> groups;
    std::string expect;
  };
  const std::vector<bad_case> cases = {
      {{{ok}}, "groups.size() = 1, expected num_kv_heads = 2"},
      {{{ok}, {group(30, {30}, {1})}}, "groups[1][0].target = 30, expected 0..29"},
      {{{ok}, {group(-1, {-1}, {1})}}, "groups[1][0].target = -1"},
      {{{ok}, {group(2, {2, 31}, {1, 1})}}, "groups[1][0].members[1] = 31, expected 0..29"},
      {{{ok, group(4, {4, 5}, {1, 1})}, {}}, "groups[0][1].members[0] = 4 is already a member"},
      {{{group(5, {5, 5}, {1, 1})}, {}}, "groups[0][0].members[1] = 5 is already a member"},
      {{{ok}, {group(2, {2, 3}, {1, -0.5f})}}, "groups[1][0].weights[1] = -0.5, expected a finite weight >= 0"},
      {{{ok}, {group(2, {2, 3}, {nan, 1})}}, "groups[1][0].weights[0] = nan"},
      {{{ok}, {group(2, {2, 3}, {1, inf})}}, "groups[1][0].weights[1] = inf"},
      {{{ok}, {group(2, {2, 3}, {0, 0})}}, "groups[1][0].weights sum to 0, expected a positive sum"},
      {{{ok}, {group(2, {1, 3}, {1, 1})}}, "groups[1][0].target = 2 is not among its members"},
      {{{ok}, {group(2, {2, 3}, {1})}}, "groups[1][0].weights.size() = 1, expected members.size() = 2"},
  };
  for (const auto& bc : cases) {
    INFO("expect: " << bc.expect);
    bool threw = false;
    try {
      c.merge_layer(s, 0, bc.groups);
    } catch (const kvc::error& e) {
      threw = true;
      const std::string what = e.what();
      INFO("what: " << what);
      REQUIRE(what.find("kvc::merge::merged_cache::merge_layer") != std::string::npos);
      REQUIRE(what.find(bc.expect) != std::string::npos);
    }
    REQUIRE(threw);
    REQUIRE(state() == before);
  }
  REQUIRE_THROWS_AS(c.merge_layer(s, 2, {{}, {}}), kvc::error);
  REQUIRE_THROWS_AS(c.merge_layer(s + 7, 0, {{}, {}}), kvc::error);
  REQUIRE_THROWS_AS(c.merge_layer(s, 0, {{group(0, {0, 1}, {1, 1})}, {group(3, {3}, {1}), group(3, {3}, {1})}}), kvc::error);
  REQUIRE(state() == before);
}

TEST_CASE("merge_layer on a forked sequence with the pool exhausted changes nothing", "[merge][strong]") {
  for (int trial = 0; trial < 6; ++trial) {
    kvc_test::rng r(9700 + static_cast<std::uint64_t>(trial));
    const std::int32_t H = r.integer(1, 3), P = 4, D = r.integer(1, 20), L = r.integer(9, 40);
    const std::int32_t pages = H * ((L + P - 1) / P);
    // Exactly the pages the prompt needs: any copy of a shared page fails.
    merged_cache<float> c(kvc_test::cache_shape(1, H, D, P, pages));
    const kvc::seq_id a = c.add_sequence();
    fill(c, a, 0, L, r);
    const kvc::seq_id b = c.fork(a);
    std::vector<std::vector<merge_group>> groups;
    for (std::int32_t h = 0; h < H; ++h) {
      merge_group g;  // merges tokens 0 and 1: page 0 changes, so it must be copied
      g.target = 0;
      g.members = {0, 1};
      g.weights = {1.0f, r.uniform(0.1f, 2.0f)};
      groups.push_back({g});
    }
    auto state = [&] { return kvc_test::full_state(c, {a, b}); };
    const auto before = state();
    const kvc::seq_id target = trial % 2 ? a : b;
    REQUIRE_THROWS_AS(c.merge_layer(target, 0, groups), kvc::out_of_memory);
    REQUIRE(state() == before);
    REQUIRE(c.cache().pool().pages_in_use() == pages);
    // With the sibling gone the pages are no longer shared: the merge writes in place.
    const kvc::seq_id other = target == a ? b : a;
    const stream_copy sib = copy_stream(c, other, 0, 0);
    c.remove_sequence(other);
    c.merge_layer(target, 0, groups);
    REQUIRE(c.length(target, 0, 0) == L - 1);
    REQUIRE(c.bytes_in_use() <= static_cast<std::size_t>(pages) * c.cache().pool().page_bytes());
    REQUIRE(c.log_weights(target, 0, 0)[0] == Approx(std::log(1.0 + groups[0][0].weights[1])).epsilon(1e-6));
    (void)sib;
  }
}

TEST_CASE("merged_cache keep_layer, fork and append keep the log-weights with their tokens", "[merge]") {
  kvc_test::rng r(9800);
  merged_cache<float> c(kvc_test::cache_shape(1, 2, 8, 4, 1024));
  const kvc::seq_id s = c.add_sequence();
  fill(c, s, 0, 20, r);
  c.merge_layer(s, 0, {random_groups(20, 0.8, r), random_groups(20, 0.8, r)});
  const kvc::seq_id f = c.fork(s);
  for (std::int32_t h = 0; h < 2; ++h) REQUIRE(c.log_weights(f, 0, h) == c.log_weights(s, 0, h));
  std::vector<std::vector<std::int32_t>> kept(2);
  std::vector<std::vector<float>> want(2);
  for (std::int32_t h = 0; h < 2; ++h) {
    const auto& w = c.log_weights(s, 0, h);
    for (std::int32_t t = 0; t < c.length(s, 0, h); ++t)
      if (r.coin()) kept[static_cast<std::size_t>(h)].push_back(t), want[static_cast<std::size_t>(h)].push_back(w[static_cast<std::size_t>(t)]);
  }
  const auto fork_lw = c.log_weights(f, 0, 1);
  c.keep_layer(s, 0, kept);
  for (std::int32_t h = 0; h < 2; ++h) REQUIRE(c.log_weights(s, 0, h) == want[static_cast<std::size_t>(h)]);
  REQUIRE(c.log_weights(f, 0, 1) == fork_lw);
  // A bad keep changes nothing.
  auto bad = kept;
  bad[1].push_back(1000);
  REQUIRE_THROWS_AS(c.keep_layer(s, 0, bad), kvc::error);
  for (std::int32_t h = 0; h < 2; ++h) REQUIRE(c.log_weights(s, 0, h) == want[static_cast<std::size_t>(h)]);
  fill(c, s, 0, 3, r);
  for (std::int32_t h = 0; h < 2; ++h) {
    const auto& w = c.log_weights(s, 0, h);
    REQUIRE(static_cast<std::int32_t>(w.size()) == c.length(s, 0, h));
    for (std::size_t i = w.size() - 3; i < w.size(); ++i) REQUIRE(w[i] == 0.0f);
  }
  REQUIRE(c.metadata_bytes() == c.cache().metadata_bytes() + 4 * static_cast<std::size_t>(c.cache().tokens_held()));
  c.remove_sequence(f);
  REQUIRE_THROWS_AS(c.log_weights(f, 0, 0), kvc::error);
}

namespace {

/// merged_prefill_attention (blocked: cpu::prefill_attention's blocked kernel on the store's rows
/// with the log-weights as bias) against the dense causal reference: query i sees, in each kv
/// head, the stored tokens whose position is <= q_positions[i], each logit raised by its log-weight.
template <class T>
void prefill_trials(std::uint64_t salt, kvc::thread_pool* pool, bool blocked = false) {
  for (int trial = 0; trial < 30; ++trial) {
    kvc_test::rng r(salt + static_cast<std::uint64_t>(trial));
    const std::int32_t H = r.integer(1, 3), D = r.integer(1, 70), P = 1 << r.integer(0, 4), G = r.integer(1, 11);
    merged_cache<T> c(kvc_test::cache_shape(2, H, D, P, 4096));
    const kvc::seq_id s = c.add_sequence();
    const std::int32_t layer = r.integer(0, 1);
    const std::int32_t n0 = r.integer(1, 90);
    fill(c, s, layer, n0, r);
    std::vector<std::vector<merge_group>> groups;
    for (std::int32_t h = 0; h < H; ++h) groups.push_back(random_groups(n0, r.uniform(0.0f, 0.8f), r));
    c.merge_layer(s, layer, groups);  // log-weights != 0 and gaps in the positions
    const std::int32_t m = r.integer(1, 20);
    fill(c, s, layer, m, r);  // the chunk: positions n0 .. n0 + m - 1
    // The chunk's own positions, and some anywhere (before every token, between, beyond).
    const std::int32_t nq = r.integer(1, 24);
    std::vector<std::int32_t> qp(static_cast<std::size_t>(nq));
    for (auto& p : qp) p = r.coin(0.6) ? n0 + r.integer(0, m - 1) : r.integer(-2, n0 + m + 2);
    const auto q = r.normals(static_cast<std::size_t>(nq) * H * G * D, 1.5f);
    std::vector<float> out(q.size(), 7.0f), lse(static_cast<std::size_t>(nq) * H * G, 7.0f);
    kvc::decode_options o;
    o.lse = lse.data();
    o.pool = pool;
    if (r.coin(0.3)) o.scale = r.uniform(0.05f, 0.5f);
    if (blocked) kvc::cpu::prefill_attention(c, s, layer, q.data(), nq, qp.data(), H * G, out.data(), o);
    else kvc::cpu::merged_prefill_attention(c, s, layer, q.data(), nq, qp.data(), H * G, out.data(), o);
    const double scale = o.scale != 0.0f ? o.scale : 1.0 / std::sqrt(static_cast<double>(D));
    INFO("trial " << trial << " H=" << H << " D=" << D << " P=" << P << " G=" << G << " n0=" << n0 << " m=" << m);
    for (std::int32_t h = 0; h < H; ++h) {
      const stream_copy st = copy_stream(c, s, layer, h);
      double vmax = 1;
      for (float x : st.v) vmax = std::max(vmax, std::fabs(double{x}));
      for (std::int32_t i = 0; i < nq; ++i) {
        stream_copy vis;  // the visible tokens, in any order (the softmax does not care)
        for (std::int32_t t = 0; t < st.n; ++t) {
          if (st.pos[static_cast<std::size_t>(t)] > qp[static_cast<std::size_t>(i)]) continue;
          ++vis.n;
          vis.lw.push_back(st.lw[static_cast<std::size_t>(t)]);
          for (std::int32_t d = 0; d < D; ++d) {
            vis.k.push_back(st.k[static_cast<std::size_t>(t) * D + d]);
            vis.v.push_back(st.v[static_cast<std::size_t>(t) * D + d]);
          }
        }
        for (std::int32_t g = 0; g < G; ++g) {
          const std::size_t row = (static_cast<std::size_t>(i) * H + static_cast<std::size_t>(h)) * G + static_cast<std::size_t>(g);
          double ref_lse = 0;
          const auto ref = dense_attention(q.data() + row * D, vis.k, vis.v, vis.lw, vis.n, D, scale, &ref_lse);
          for (std::int32_t d = 0; d < D; ++d)
            KVC_REQUIRE(std::fabs(out[row * D + d] - ref[static_cast<std::size_t>(d)]) <= 2e-5 * vmax,
                        "query " << i << " (position " << qp[static_cast<std::size_t>(i)] << ") head " << h * G + g
                                 << " d " << d << ": " << out[row * D + d] << " vs " << ref[static_cast<std::size_t>(d)]);
          if (vis.n == 0) KVC_REQUIRE((std::isinf(lse[row]) && lse[row] < 0), "lse of an empty row " << lse[row]);
          else KVC_REQUIRE(std::fabs(lse[row] - ref_lse) <= 2e-5 * (1 + std::fabs(ref_lse)), "lse row " << row);
        }
      }
    }
  }
}

}  // namespace

TEST_CASE("merged_prefill_attention against the dense causal reference", "[merge]") {
  prefill_trials<float>(9700, nullptr);
  prefill_trials<kvc::half>(9800, nullptr);
  kvc::thread_pool pool(3);
  prefill_trials<float>(9900, &pool);
}

TEST_CASE("cpu::prefill_attention over a merged cache adds the log-weights", "[merge]") {
  prefill_trials<float>(9950, nullptr, true);
  prefill_trials<kvc::half>(9960, nullptr, true);
  kvc::thread_pool pool(3);
  prefill_trials<float>(9970, &pool, true);
}

TEST_CASE("merged_decode_attention's probability outputs need a stride that holds the longest stream", "[merge]") {
  kvc_test::rng r(9940);
  merged_cache<float> c(kvc_test::cache_shape(1, 2, 16, 4, 256));
  const kvc::seq_id s = c.add_sequence();
  fill(c, s, 0, 10, r);
  const auto q = r.normals(4 * 16);
  std::vector<float> out(q.size(), 7.0f), probs(4 * 10, 7.0f);
  kvc::decode_options o;
  o.probs = probs.data();
  o.probs_stride = 9;
  kvc_test::require_error([&] { kvc::cpu::merged_decode_attention(c, s, 0, q.data(), 4, out.data(), o); },
                          "probs_stride = 9, expected >= the longest stream (10 tokens)");
  for (float x : out) REQUIRE(x == 7.0f);
  for (float x : probs) REQUIRE(x == 7.0f);
  o.probs_stride = 10;
  kvc::cpu::merged_decode_attention(c, s, 0, q.data(), 4, out.data(), o);
  for (std::int32_t qh = 0; qh < 4; ++qh) {  // each row is a distribution
    double sum = 0;
    for (std::int32_t t = 0; t < 10; ++t) sum += probs[static_cast<std::size_t>(qh) * 10 + t];
    KVC_REQUIRE(std::fabs(sum - 1.0) <= 1e-5, "q head " << qh << " sums to " << sum);
  }
}

TEST_CASE("merged_prefill_attention rejects bad arguments and writes nothing", "[merge]") {
  kvc_test::rng r(9950);
  merged_cache<float> c(kvc_test::cache_shape(1, 2, 16, 4, 256));
  const kvc::seq_id s = c.add_sequence();
  fill(c, s, 0, 10, r);
  const auto q = r.normals(4 * 16);
  std::vector<float> out(q.size(), 7.0f);
  const std::int32_t qp[1] = {9};
  auto untouched = [&] {
    for (float x : out) REQUIRE(x == 7.0f);
  };
  using kvc_test::require_error;
  require_error([&] { kvc::cpu::merged_prefill_attention(c, s, 0, q.data(), 1, nullptr, 4, out.data()); }, "q_positions is null");
  require_error([&] { kvc::cpu::merged_prefill_attention(c, s, 0, q.data(), 0, qp, 4, out.data()); }, "num_queries = 0");
  require_error([&] { kvc::cpu::merged_prefill_attention(c, s, 0, q.data(), 1, qp, 3, out.data()); }, "num_q_heads = 3");
  require_error([&] { kvc::cpu::merged_prefill_attention(c, s, 1, q.data(), 1, qp, 4, out.data()); }, "layer = 1");
  std::vector<float> probs(64);
  kvc::decode_options o;
  o.group_probs = probs.data();
  require_error([&] { kvc::cpu::merged_prefill_attention(c, s, 0, q.data(), 1, qp, 4, out.data(), o); }, "group_probs");
  auto bad = q;
  bad[5] = std::numeric_limits<float>::quiet_NaN();
  require_error([&] { kvc::cpu::merged_prefill_attention(c, s, 0, bad.data(), 1, qp, 4, out.data()); }, "expected a finite query");
  // Positions that do not ascend in stream order: a query's visible tokens are not a prefix.
  const auto k = r.normals(2 * 16), v = r.normals(k.size());
  const std::int32_t back[1] = {3};
  c.append(s, 0, k.data(), v.data(), 1, back);
  require_error([&] { kvc::cpu::merged_prefill_attention(c, s, 0, q.data(), 1, qp, 4, out.data()); },
                "expected positions ascending in stream order");
  untouched();
}

namespace {

bool same_stream(const stream_copy& a, const stream_copy& b) {
  return a.n == b.n && a.k == b.k && a.v == b.v && a.lw == b.lw && a.pos == b.pos;
}

/// share_layer on a merged cache: the sharer holds the source's merged rows *and* log-weights bit
/// for bit (so its attention gives each merged token its members' mass: the double reference with
/// the log-weights as bias), a merge on the sharer copies the shared pages and leaves the source
/// as it was, and the merge matches the double merge of the shared rows.
template <class T>
void share_trials(std::uint64_t salt) {
  const bool fp16 = std::is_same<T, kvc::half>::value;
  for (int trial = 0; trial < 12; ++trial) {
    kvc_test::rng r(salt + static_cast<std::uint64_t>(trial));
    const std::int32_t H = r.integer(1, 3), D = r.integer(1, 70), P = 1 << r.integer(0, 4), G = r.integer(1, 4);
    INFO("trial " << trial << (fp16 ? " fp16" : " fp32") << " H=" << H << " D=" << D << " P=" << P << " G=" << G);
    merged_cache<T> c(kvc_test::cache_shape(3, H, D, P, 4096));
    const kvc::seq_id s = c.add_sequence();
    for (std::int32_t l = 0; l < 3; ++l) fill(c, s, l, r.integer(2, 120), r);
    auto merge_random = [&](std::int32_t layer) {
      std::vector<std::vector<merge_group>> groups(static_cast<std::size_t>(H));
      for (std::int32_t h = 0; h < H; ++h)
        groups[static_cast<std::size_t>(h)] = random_groups(c.length(s, layer, h), r.uniform(0.2f, 0.9f), r);
      c.merge_layer(s, layer, groups, mean_weights::mass);
      return groups;
    };
    merge_random(0);
    merge_random(0);  // merged tokens merged again: log-weights of several members
    std::vector<stream_copy> src;
    for (std::int32_t h = 0; h < H; ++h) src.push_back(copy_stream(c, s, 0, h));
    const std::size_t total = c.bytes_in_use(), own1 = c.bytes_in_use(1);
    c.share_layer(s, 1, 0);
    REQUIRE(c.bytes_in_use() == total - own1);
    REQUIRE(c.cache().seen(s, 1) == c.cache().seen(s, 0));
    for (std::int32_t h = 0; h < H; ++h) REQUIRE(same_stream(copy_stream(c, s, 1, h), src[static_cast<std::size_t>(h)]));
    check_attention(c, s, 1, H * G, r);
    // A merge on the sharer: its rows as the double merge of the shared rows; the source unchanged.
    const auto groups = merge_random(1);
    for (std::int32_t h = 0; h < H; ++h) {
      REQUIRE(same_stream(copy_stream(c, s, 0, h), src[static_cast<std::size_t>(h)]));
      const stream_copy e = expected_merge(src[static_cast<std::size_t>(h)], groups[static_cast<std::size_t>(h)], D,
                                           mean_weights::mass);
      const stream_copy got = copy_stream(c, s, 1, h);
      REQUIRE(got.pos == e.pos);
      for (std::size_t i = 0; i < e.lw.size(); ++i)
        KVC_REQUIRE(std::fabs(got.lw[i] - e.lw[i]) <= 1e-5 * (1 + std::fabs(e.lw[i])), "lw " << i);
      for (std::size_t i = 0; i < e.k.size(); ++i) {
        KVC_REQUIRE(std::fabs(got.k[i] - e.k[i]) <= tol_of(fp16) * (std::fabs(e.k[i]) + 1e-3), "k " << i);
        KVC_REQUIRE(std::fabs(got.v[i] - e.v[i]) <= tol_of(fp16) * (std::fabs(e.v[i]) + 1e-3), "v " << i);
      }
    }
    check_attention(c, s, 0, H * G, r);
    check_attention(c, s, 1, H * G, r);
    // Bytes: the distinct pages the page tables hold (sharing counted once), read from the tables.
    std::set<kvc::page_id> held;
    for (std::int32_t l = 0; l < 3; ++l)
      for (std::int32_t h = 0; h < H; ++h)
        for (kvc::page_id p : c.cache().pages(s, l, h)) held.insert(p);
    REQUIRE(c.bytes_in_use() == held.size() * c.cache().pool().page_bytes());
    // Refused calls name the argument and change nothing.
    const stream_copy one = copy_stream(c, s, 2, 0);
    REQUIRE_THROWS_WITH(c.share_layer(s, 2, 2), Catch::Contains("kvc::merge::merged_cache::share_layer: from = 2 = layer"));
    REQUIRE_THROWS_WITH(c.share_layer(s, 2, 3), Catch::Contains("from = 3, expected 0..2"));
    REQUIRE_THROWS_WITH(c.share_layer(99, 2, 0), Catch::Contains("unknown sequence id 99"));
    REQUIRE(same_stream(copy_stream(c, s, 2, 0), one));
    c.remove_sequence(s);
    REQUIRE(c.bytes_in_use() == 0);
  }
}

}  // namespace

TEST_CASE("share_layer gives a layer another layer's merged tokens with their log-weights", "[merge][share]") {
  share_trials<float>(7100);
  share_trials<kvc::half>(7200);
}
