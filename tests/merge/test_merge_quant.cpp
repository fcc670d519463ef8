// SPDX-License-Identifier: Apache-2.0
/// \file
/// Merging over encoded pages (issues 11 and 13): quant_cache::keep_layer_rewrite, the merge
/// primitive on codes, and merge::basic_merged_cache over a quant_cache with its kernel
/// (cpu/merged_quant_attention.hpp), against double references and against the same merges on
/// float pages holding the same decoded rows.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <kvc/attention/reference.hpp>
#include <kvc/cpu/merged_attention.hpp>
#include <kvc/cpu/merged_quant_attention.hpp>
#include <kvc/cpu/prefill_attention.hpp>
#include <kvc/merge/cam.hpp>
#include <kvc/merge/d2o.hpp>
#include <kvc/quant/fp8.hpp>
#include <kvc/quant/int8.hpp>
#include <kvc/quant/kivi.hpp>
#include <kvc/store/merged_cache.hpp>
#include <kvc/store/quant_cache.hpp>

#include "cache_builders.hpp"
#include "dense_reference.hpp"
#include "kvc_catch.hpp"
#include "merge_test_util.hpp"
#include "random.hpp"

namespace {

using kvc::merge::basic_merged_cache;
using kvc::merge::merge_group;
using kvc_test::rng;

/// A one-layer quant_cache shape (kvc_test::cache_shape, as a quant_cache_config) with sinks.
kvc::quant_cache_config qshape(std::int32_t H, std::int32_t D, std::int32_t P, std::int32_t sinks, std::int32_t pages = 512) {
  auto c = kvc_test::shape_as<kvc::quant_cache_config>(kvc_test::cache_shape(1, H, D, P, pages));
  c.max_fp_pages = 64;
  c.sink_tokens = sinks;
  return c;
}

/// One stream decoded (keys as stored: before RoPE in a pre-RoPE cache) into [n][D] rows.
template <class C>
void decoded(const C& c, kvc::seq_id s, std::int32_t l, std::int32_t h, std::vector<float>& k, std::vector<float>& v) {
  const std::int32_t D = c.config().head_dim, n = c.length(s, l, h);
  k.assign(static_cast<std::size_t>(n) * D, 0.0f);
  v.assign(k.size(), 0.0f);
  const auto sv = c.view(s, l, h);
  for (std::int32_t t = 0; t < n; ++t) {
    c.template decode_unroped<kvc::quant::role::key>(sv, t, k.data() + static_cast<std::size_t>(t) * D);
    c.template decode_unroped<kvc::quant::role::value>(sv, t, v.data() + static_cast<std::size_t>(t) * D);
  }
}

double max_abs_diff(const float* a, const float* b, std::int32_t n) {
  double e = 0;
  for (std::int32_t i = 0; i < n; ++i) e = std::max(e, std::fabs(static_cast<double>(a[i]) - b[i]));
  return e;
}

/// keep_layer_rewrite on codec pair (KQ, VQ) against keep_layer on a twin cache:
///  - rows that are not rewritten read as the twin's, bit for bit where their encoding unit holds
///    one token (u == 1), within one step of the unit's grid where it holds several (a KIVI key
///    group re-encoded around a new row);
///  - rewritten rows read as the rows fn wrote, within the codec's own round-trip error on this
///    data (measured on the twin: 3x its largest error, and fp16's rounding in the windows);
///  - positions and pool bytes are the twin's: a rewrite takes no page on an unshared stream.
template <class KQ, class VQ>
void rewrite_trials(std::uint64_t salt, KQ kq, VQ vq, std::int32_t dmul) {
  for (int trial = 0; trial < 16; ++trial) {
    rng r(salt + static_cast<std::uint64_t>(trial));
    const std::int32_t H = r.integer(1, 3), D = dmul * r.integer(1, 4), P = 1 << r.integer(4, 5);
    const std::int32_t sinks = r.coin() ? r.integer(1, 4) : 0, L = r.integer(1, 160);
    INFO("trial " << trial << " H=" << H << " D=" << D << " P=" << P << " sinks=" << sinks << " L=" << L);
    kvc::quant_cache<KQ, VQ> a(qshape(H, D, P, sinks), kq, vq), b(qshape(H, D, P, sinks), kq, vq);
    const kvc::seq_id sa = a.add_sequence(), sb = b.add_sequence();
    const auto k = r.normals(static_cast<std::size_t>(L) * H * D), v = r.normals(k.size());
    // In chunks, so that units and windows are filled the way a prefill and decode fill them.
    for (std::int32_t t = 0; t < L;) {
      const std::int32_t n = std::min(L - t, r.integer(1, 40));
      const std::size_t o = static_cast<std::size_t>(t) * H * D;
      a.append(sa, 0, k.data() + o, v.data() + o, n);
      b.append(sb, 0, k.data() + o, v.data() + o, n);
      t += n;
    }
    // The codec's round-trip error on this data (sinks and window rows are fp16: 2^-11 relative).
    double err_k = 0, err_v = 0, vmax = 0;
    for (std::int32_t h = 0; h < H; ++h) {
      std::vector<float> dk, dv;
      decoded(b, sb, 0, h, dk, dv);
      for (std::int32_t t = 0; t < L; ++t) {
        const std::size_t src = (static_cast<std::size_t>(t) * H + h) * D, dst = static_cast<std::size_t>(t) * D;
        err_k = std::max(err_k, max_abs_diff(dk.data() + dst, k.data() + src, D));
        err_v = std::max(err_v, max_abs_diff(dv.data() + dst, v.data() + src, D));
      }
    }
    for (float x : k) vmax = std::max(vmax, static_cast<double>(std::fabs(x)));
    for (float x : v) vmax = std::max(vmax, static_cast<double>(std::fabs(x)));
    const double tol_k = 3 * err_k + 2e-3 * vmax, tol_v = 3 * err_v + 2e-3 * vmax;
    // Kept sets and rewritten rows, per head.
    std::vector<std::vector<std::int32_t>> kept(static_cast<std::size_t>(H)), rows(kept.size());
    std::vector<std::vector<float>> nk(kept.size()), nv(kept.size());
    std::vector<std::vector<float>> before_k(kept.size()), before_v(kept.size());
    for (std::int32_t h = 0; h < H; ++h) {
      auto& kh = kept[static_cast<std::size_t>(h)];
      kh = r.coin(0.3) ? r.subset(L, L) : r.subset(L, r.integer(0, L));  // all: rewrites alone, nothing moves
      std::sort(kh.begin(), kh.end());
      auto& rh = rows[static_cast<std::size_t>(h)];
      for (std::int32_t i = 0; i < static_cast<std::int32_t>(kh.size()); ++i)
        if (r.coin(0.3)) rh.push_back(i);
      nk[static_cast<std::size_t>(h)] = r.normals(rh.size() * static_cast<std::size_t>(D));
      nv[static_cast<std::size_t>(h)] = r.normals(rh.size() * static_cast<std::size_t>(D));
      decoded(a, sa, 0, h, before_k[static_cast<std::size_t>(h)], before_v[static_cast<std::size_t>(h)]);
    }
    // A fork shares every page: the rewrite must copy what it writes, never write through.
    const bool forked = r.coin();
    const kvc::seq_id fa = forked ? a.fork(sa) : sa;
    std::int32_t calls = 0;
    a.keep_layer_rewrite(sa, 0, kept, [&](std::int32_t h, std::int32_t i, float* kr, float* vr) {
      // fn sees the row as stored before the call
      const std::int32_t t = kept[static_cast<std::size_t>(h)][static_cast<std::size_t>(i)];
      const auto& bk = before_k[static_cast<std::size_t>(h)];
      KVC_REQUIRE(max_abs_diff(kr, bk.data() + static_cast<std::size_t>(t) * D, D) == 0.0, "head " << h << " i " << i);
      const auto& rh = rows[static_cast<std::size_t>(h)];
      const std::size_t x = static_cast<std::size_t>(std::lower_bound(rh.begin(), rh.end(), i) - rh.begin());
      std::copy_n(nk[static_cast<std::size_t>(h)].data() + x * D, D, kr);
      std::copy_n(nv[static_cast<std::size_t>(h)].data() + x * D, D, vr);
      ++calls;
    }, &rows);
    b.keep_layer(sb, 0, kept);
    std::size_t expected_calls = 0;
    for (const auto& rh : rows) expected_calls += rh.size();
    REQUIRE(static_cast<std::size_t>(calls) == expected_calls);
    if (forked) {
      for (std::int32_t h = 0; h < H; ++h) {
        std::vector<float> fk, fv;
        decoded(a, fa, 0, h, fk, fv);
        const bool same = fk == before_k[static_cast<std::size_t>(h)] && fv == before_v[static_cast<std::size_t>(h)];
        KVC_REQUIRE(same, "the fork's head " << h << " changed");
      }
      a.remove_sequence(fa);
    }
    REQUIRE(a.bytes_in_use() == b.bytes_in_use());
    for (std::int32_t h = 0; h < H; ++h) {
      const auto& kh = kept[static_cast<std::size_t>(h)];
      const std::int32_t n = static_cast<std::int32_t>(kh.size());
      REQUIRE(a.length(sa, 0, h) == n);
      REQUIRE(std::equal(a.positions(sa, 0, h), a.positions(sa, 0, h) + n, b.positions(sb, 0, h)));
      std::vector<float> ak, av, bk, bv;
      decoded(a, sa, 0, h, ak, av);
      decoded(b, sb, 0, h, bk, bv);
      const auto& rh = rows[static_cast<std::size_t>(h)];
      const auto reg = a.regions(sa, 0, h);
      for (std::int32_t i = 0, x = 0; i < n; ++i) {
        const std::size_t o = static_cast<std::size_t>(i) * D;
        const bool rewritten = x < static_cast<std::int32_t>(rh.size()) && rh[static_cast<std::size_t>(x)] == i;
        const bool quantized = i >= reg.sink && i < reg.sink + reg.quantized;
        INFO("head " << h << " kept index " << i << (rewritten ? " (rewritten)" : "") << (quantized ? " (encoded)" : ""));
        if (rewritten) {
          const std::size_t ro = static_cast<std::size_t>(x) * D;
          KVC_REQUIRE(max_abs_diff(ak.data() + o, nk[static_cast<std::size_t>(h)].data() + ro, D) <= tol_k, "key");
          KVC_REQUIRE(max_abs_diff(av.data() + o, nv[static_cast<std::size_t>(h)].data() + ro, D) <= tol_v, "value");
          ++x;
          continue;
        }
        // A row sharing an encoding unit with a rewritten one was encoded again: within one
        // step of the unit's grid (the codec's error bound, twice).
        const bool k_exact = !quantized || KQ::tokens_per_record(kvc::quant::role::key) == 1;
        const bool v_exact = !quantized || VQ::tokens_per_record(kvc::quant::role::value) == 1;
        if (k_exact) KVC_REQUIRE(max_abs_diff(ak.data() + o, bk.data() + o, D) == 0.0, "key");
        else KVC_REQUIRE(max_abs_diff(ak.data() + o, bk.data() + o, D) <= 2 * tol_k, "key");
        if (v_exact) KVC_REQUIRE(max_abs_diff(av.data() + o, bv.data() + o, D) == 0.0, "value");
        else KVC_REQUIRE(max_abs_diff(av.data() + o, bv.data() + o, D) <= 2 * tol_v, "value");
      }
    }
  }
}

TEST_CASE("quant_cache::keep_layer_rewrite stores the rewritten rows and leaves the others as keep_layer does", "[merge][quant]") {
  rewrite_trials(11000, kvc::quant::int8{}, kvc::quant::int8{}, 8);
  rewrite_trials(11100, kvc::quant::int4{}, kvc::quant::int8{}, 8);
  rewrite_trials(11200, kvc::quant::kivi<4, 16, 32>(32), kvc::quant::kivi<4, 16, 32>(32), 16);
  rewrite_trials(11300, kvc::quant::fp8_e4m3_per_token{}, kvc::quant::fp8_e4m3_per_token{}, 8);
}

TEST_CASE("quant_cache::keep_layer_rewrite: refused calls and failures leave the cache as it was", "[merge][quant]") {
  using C = kvc::quant_cache<kvc::quant::kivi<4, 16, 32>, kvc::quant::kivi<4, 16, 32>>;
  const kvc::quant::kivi<4, 16, 32> q(32);
  rng r(11400);
  const std::int32_t H = 2, D = 32, P = 16, L = 100;
  C c(qshape(H, D, P, 2), q, q);
  const kvc::seq_id s = c.add_sequence();
  const auto k = r.normals(static_cast<std::size_t>(L) * H * D), v = r.normals(k.size());
  c.append(s, 0, k.data(), v.data(), L);
  const kvc::seq_id f = c.fork(s);
  auto state = [&] {
    std::vector<std::vector<float>> out;
    for (kvc::seq_id q2 : {s, f})
      for (std::int32_t h = 0; h < H; ++h) {
        std::vector<float> dk, dv;
        decoded(c, q2, 0, h, dk, dv);
        out.push_back(dk);
        out.push_back(dv);
        out.emplace_back(c.positions(q2, 0, h), c.positions(q2, 0, h) + c.length(q2, 0, h));
      }
    out.push_back({static_cast<float>(c.bytes_in_use())});
    return out;
  };
  const auto before = state();
  std::vector<std::vector<std::int32_t>> kept(H), rows(H);
  for (std::int32_t h = 0; h < H; ++h) {
    for (std::int32_t t = 0; t < L; t += 2) kept[static_cast<std::size_t>(h)].push_back(t);
    rows[static_cast<std::size_t>(h)] = {0, 5, 20, 49};  // a sink, encoded tokens, the window
  }
  auto set = [](std::int32_t, std::int32_t, float* kr, float* vr) { kr[0] = 1.0f, vr[0] = -1.0f; };
  for (std::int64_t n = 0;; ++n) {  // the n-th page allocation fails: the fork's copies cannot all be made
    kvc::testing::allocation_fault fault{n};
    bool threw = false;
    {
      kvc::testing::scoped_allocation_fault on(fault);
      try {
        c.keep_layer_rewrite(s, 0, kept, set, &rows);
      } catch (const kvc::out_of_memory&) {
        threw = true;
      }
    }
    REQUIRE(threw);  // every copy-on-write page is taken in one call, which fails at n = 0
    REQUIRE(state() == before);
    if (fault.calls <= n + 1) break;
  }
  auto bad = rows;
  bad[1] = {3, 3};
  kvc_test::require_error([&] { c.keep_layer_rewrite(f, 0, kept, set, &bad); }, "rows[1][1] = 3 after 3");
  bad[1] = {50};
  kvc_test::require_error([&] { c.keep_layer_rewrite(f, 0, kept, set, &bad); }, "rows[1][0] = 50");
  kvc_test::require_error(
      [&] {
        c.keep_layer_rewrite(f, 0, kept, [](std::int32_t, std::int32_t i, float*, float* vr) { if (i == 20) vr[3] = NAN; }, &rows);
      },
      "value channel 3");
  kvc_test::require_error(
      [&] {
        c.keep_layer_rewrite(f, 0, kept, [](std::int32_t h, std::int32_t i, float*, float*) {
          if (h == 1 && i == 49) throw kvc::error("the caller's fn failed");
        }, &rows);
      },
      "the caller's fn failed");
  REQUIRE(state() == before);
  // Without the sibling the pages are the stream's own: the same call succeeds in place.
  c.remove_sequence(s);
  const std::size_t bytes = c.bytes_in_use();
  c.keep_layer_rewrite(f, 0, kept, set, &rows);
  REQUIRE(c.bytes_in_use() <= bytes);
  std::vector<float> dk, dv;
  decoded(c, f, 0, 1, dk, dv);
  REQUIRE(std::fabs(dk[static_cast<std::size_t>(20) * D] - 1.0f) <= 0.2f);
  REQUIRE(dv[static_cast<std::size_t>(49) * D] == -1.0f);  // the window stores it in fp16, exactly
}

/// Appends n random tokens with `copies` identical copies of one inserted at random places (the
/// same indices in every kv head); returns the copies' indices.
template <class C>
std::vector<std::int32_t> fill_copies(C& c, kvc::seq_id s, std::int32_t n, std::int32_t copies, rng& r) {
  const std::int32_t H = c.config().num_kv_heads, D = c.config().head_dim, L = n + copies;
  auto k = r.normals(static_cast<std::size_t>(L) * H * D), v = r.normals(k.size());
  auto at = r.subset(L, copies);
  std::sort(at.begin(), at.end());
  for (std::int32_t i : at)
    for (std::size_t j = 0; j < static_cast<std::size_t>(H) * D; ++j) {
      k[static_cast<std::size_t>(i) * H * D + j] = k[static_cast<std::size_t>(at[0]) * H * D + j];
      v[static_cast<std::size_t>(i) * H * D + j] = v[static_cast<std::size_t>(at[0]) * H * D + j];
    }
  c.append(s, 0, k.data(), v.data(), L);
  return at;
}

/// One group per kv head: the copies at `at` merged into the first, weights 1.
std::vector<std::vector<merge_group>> all_copies(std::int32_t H, const std::vector<std::int32_t>& at) {
  merge_group g;
  g.target = at[0];
  for (std::int32_t t : at) g.members.push_back(t), g.weights.push_back(1.0f);
  return std::vector<std::vector<merge_group>>(static_cast<std::size_t>(H), std::vector<merge_group>{g});
}

/// merged_decode_attention over encoded pages: against the double reference reading the same
/// store through its decoded views and log-weights (basic_merged_cache::layer), before and after
/// merging identical copies; with per-token codecs (one token per record, so a merge re-encodes
/// nothing else) the output after the merge equals the output before it.
template <class KQ, class VQ>
void identical_quant_trials(std::uint64_t salt, KQ kq, VQ vq, std::int32_t dmul, bool per_token) {
  using C = basic_merged_cache<kvc::quant_cache<KQ, VQ>>;
  for (int trial = 0; trial < 12; ++trial) {
    rng r(salt + static_cast<std::uint64_t>(trial));
    const std::int32_t H = r.integer(1, 2), D = dmul * r.integer(1, 4), P = 1 << r.integer(4, 5), G = r.integer(1, 8);
    const std::int32_t copies = r.integer(2, 9), sinks = r.coin() ? r.integer(1, 4) : 0;
    INFO("trial " << trial << " H=" << H << " D=" << D << " P=" << P << " G=" << G << " copies=" << copies
                  << " sinks=" << sinks);
    C c(qshape(H, D, P, sinks), kq, vq);
    const kvc::seq_id s = c.add_sequence();
    const auto at = fill_copies(c, s, r.integer(0, 150), copies, r);
    const auto q = r.normals(static_cast<std::size_t>(H * G) * D, 2.0f);
    std::vector<float> a(q.size()), b(q.size()), ra(q.size()), rb(q.size()), via(q.size());
    typename C::layer_buffer buf;
    kvc::cpu::merged_decode_attention(c, s, 0, q.data(), H * G, a.data());
    kvc::reference::decode_attention(c.layer(s, 0, buf), q.data(), H * G, ra.data());
    std::vector<float> plain(q.size());  // every log-weight 0: the quantized kernel on the store alone
    kvc::cpu::decode_attention(c.cache(), s, 0, q.data(), H * G, plain.data());
    REQUIRE(plain == a);
    c.merge_layer(s, 0, all_copies(H, at));
    for (std::int32_t h = 0; h < H; ++h)
      REQUIRE(std::fabs(c.log_weights(s, 0, h)[static_cast<std::size_t>(at[0])] - std::log(static_cast<float>(copies))) <= 1e-6f);
    kvc::decode_options o;
    std::vector<float> probs(static_cast<std::size_t>(H * G) * 512, -1.0f);
    o.probs = probs.data();
    o.probs_stride = 512;
    kvc::cpu::merged_decode_attention(c, s, 0, q.data(), H * G, b.data(), o);
    kvc::reference::decode_attention(c.layer(s, 0, buf), q.data(), H * G, rb.data());
    kvc::decode_attention(c.layer(s, 0, buf), q.data(), H * G, via.data());  // the front door: the same kernel
    REQUIRE(via == b);
    double vmax = 1;
    for (std::size_t i = 0; i < a.size(); ++i) {
      KVC_REQUIRE(std::fabs(ra[i] - a[i]) <= 2e-5 * vmax, "kernel vs reference before the merge, out " << i);
      KVC_REQUIRE(std::fabs(rb[i] - b[i]) <= 2e-5 * vmax, "kernel vs reference after the merge, out " << i);
      // The merged row is the copies' decoded row encoded again: its scale and zero round to
      // fp16 once more (2^-11 relative of the row's range), nothing else changes.
      if (per_token) KVC_REQUIRE(std::fabs(a[i] - b[i]) <= 2e-3 * vmax, "before vs after the merge, out " << i);
    }
    // The probabilities: each head's sum to 1, the merged token's is its copies' mass.
    for (std::int32_t qh = 0; qh < H * G; ++qh) {
      const std::int32_t n = c.length(s, 0, qh / G);
      double sum = 0;
      for (std::int32_t t = 0; t < n; ++t) sum += probs[static_cast<std::size_t>(qh) * 512 + static_cast<std::size_t>(t)];
      KVC_REQUIRE(std::fabs(sum - 1) <= 1e-5, "q head " << qh);
    }
  }
}

/// cpu::prefill_attention over a merged cache of codes: each query attends the tokens of its kv
/// head at positions <= its own, each logit raised by the token's log-weight; against the dense
/// double reference over the decoded rows, the log-weights and the positions (written from the
/// formula: tests/support/dense_reference.hpp), before and after merging identical copies (whose
/// merged token then carries log k: the bias is not trivial). Whether k merged copies attend as
/// the k did is decode's check above; in prefill a query early in the prompt sees a handful of
/// tokens, so the merged row's second rounding (up to a code step) shows unbounded by dilution.
template <class KQ, class VQ>
void prefill_quant_trials(std::uint64_t salt, KQ kq, VQ vq, std::int32_t dmul) {
  using C = basic_merged_cache<kvc::quant_cache<KQ, VQ>>;
  for (int trial = 0; trial < 8; ++trial) {
    rng r(salt + static_cast<std::uint64_t>(trial));
    const std::int32_t H = r.integer(1, 2), D = dmul * r.integer(1, 4), P = 1 << r.integer(4, 5), G = r.integer(1, 8);
    const std::int32_t copies = r.integer(2, 9), sinks = r.coin() ? r.integer(1, 4) : 0, nq = r.integer(1, 40);
    INFO("trial " << trial << " H=" << H << " D=" << D << " P=" << P << " G=" << G << " copies=" << copies
                  << " sinks=" << sinks << " nq=" << nq);
    C c(qshape(H, D, P, sinks), kq, vq);
    const kvc::seq_id s = c.add_sequence();
    const auto at = fill_copies(c, s, r.integer(0, 150), copies, r);
    const std::int32_t L = c.cache().seen(s, 0);
    // The scored chunk: nq tokens appended after the prompt; its queries at their own positions,
    // and as many more at random earlier positions (masks that cut the prompt).
    const auto kc = r.normals(static_cast<std::size_t>(nq) * H * D), vc = r.normals(kc.size());
    c.append(s, 0, kc.data(), vc.data(), nq);
    const std::int32_t Q = 2 * nq, QH = H * G;
    std::vector<std::int32_t> qp(static_cast<std::size_t>(Q));
    for (std::int32_t i = 0; i < nq; ++i) qp[static_cast<std::size_t>(i)] = L + i, qp[static_cast<std::size_t>(nq + i)] = r.integer(0, L + nq - 1);
    const auto q = r.normals(static_cast<std::size_t>(Q) * QH * D, 2.0f);
    auto check = [&](std::vector<float>& out) {
      out.assign(q.size(), 0.0f);
      std::vector<float> lse(static_cast<std::size_t>(Q) * QH);
      kvc::decode_options o;
      o.lse = lse.data();
      kvc::cpu::prefill_attention(c, s, 0, q.data(), Q, qp.data(), QH, out.data(), o);
      std::vector<std::vector<float>> kd(static_cast<std::size_t>(H)), vd(kd.size());
      for (std::int32_t h = 0; h < H; ++h) decoded(c.cache(), s, 0, h, kd[static_cast<std::size_t>(h)], vd[static_cast<std::size_t>(h)]);
      for (std::int32_t i = 0; i < Q; ++i) {
        std::vector<kvc_test::dense_head> heads(static_cast<std::size_t>(H));
        for (std::int32_t h = 0; h < H; ++h) {
          const std::int32_t n = c.length(s, 0, h);
          const std::int32_t* pos = c.cache().positions(s, 0, h);
          const auto& lw = c.log_weights(s, 0, h);
          auto& dh = heads[static_cast<std::size_t>(h)];
          for (std::int32_t t = 0; t < n; ++t) {
            if (pos[t] > qp[static_cast<std::size_t>(i)]) continue;
            ++dh.n;
            dh.bias.push_back(lw[static_cast<std::size_t>(t)]);
            for (std::int32_t d = 0; d < D; ++d) {
              dh.k.push_back(kd[static_cast<std::size_t>(h)][static_cast<std::size_t>(t) * D + d]);
              dh.v.push_back(vd[static_cast<std::size_t>(h)][static_cast<std::size_t>(t) * D + d]);
            }
          }
        }
        const auto ref = kvc_test::dense_decode_attention(heads, D, q.data() + static_cast<std::size_t>(i) * QH * D, QH,
                                                          1.0 / std::sqrt(static_cast<double>(D)));
        for (std::int32_t j = 0; j < QH * D; ++j)
          KVC_REQUIRE(std::fabs(out[static_cast<std::size_t>(i) * QH * D + j] - ref.out[static_cast<std::size_t>(j)]) <= 2e-5 * (1 + std::fabs(ref.out[static_cast<std::size_t>(j)])),
                      "query " << i << " (position " << qp[static_cast<std::size_t>(i)] << ") out " << j);
        for (std::int32_t g = 0; g < QH; ++g)
          KVC_REQUIRE(std::fabs(lse[static_cast<std::size_t>(i) * QH + g] - ref.lse[static_cast<std::size_t>(g)]) <= 2e-5 * (1 + std::fabs(ref.lse[static_cast<std::size_t>(g)])),
                      "query " << i << " lse " << g);
      }
    };
    std::vector<float> before, after;
    check(before);
    c.merge_layer(s, 0, all_copies(H, at));
    for (std::int32_t h = 0; h < H; ++h)
      REQUIRE(std::fabs(c.log_weights(s, 0, h)[static_cast<std::size_t>(at[0])] - std::log(static_cast<float>(copies))) <= 1e-6f);
    check(after);
  }
}

TEST_CASE("prefill attention over merged encoded pages adds the log-weights", "[merge][quant]") {
  prefill_quant_trials(12500, kvc::quant::int8{}, kvc::quant::int8{}, 8);
  prefill_quant_trials(12600, kvc::quant::int4{}, kvc::quant::int4{}, 8);
  prefill_quant_trials(12700, kvc::quant::kivi<4, 16, 32>(32), kvc::quant::kivi<4, 16, 32>(32), 16);
  prefill_quant_trials(12800, kvc::quant::fp8_e4m3_per_token{}, kvc::quant::int8{}, 8);
}

TEST_CASE("merged tokens in encoded pages: the kernel adds the log-weights, k identical tokens merge into one", "[merge][quant]") {
  identical_quant_trials(11500, kvc::quant::int8{}, kvc::quant::int8{}, 8, true);
  identical_quant_trials(11600, kvc::quant::int4{}, kvc::quant::int4{}, 8, true);
  identical_quant_trials(11700, kvc::quant::kivi<4, 16, 32>(32), kvc::quant::kivi<4, 16, 32>(32), 16, false);
  identical_quant_trials(11800, kvc::quant::fp8_e4m3_per_token{}, kvc::quant::int8{}, 8, true);
}

/// The quantized kernel's integer fast paths (int8_query, int8_probs: AVX2 builds) score and
/// weigh tokens in their own code, so the log-weights must reach them too: merged copies against
/// the double reference over the same store, within the paths' documented rounding.
TEST_CASE("merged tokens in encoded pages: the integer fast paths add the log-weights too", "[merge][quant]") {
  using Q = kvc::quant::int8;
  using C = basic_merged_cache<kvc::quant_cache<Q, Q>>;
  for (int trial = 0; trial < 6; ++trial) {
    rng r(12100 + static_cast<std::uint64_t>(trial));
    const std::int32_t H = r.integer(1, 2), D = 64, G = r.integer(1, 4), copies = r.integer(8, 40);
    INFO("trial " << trial << " H=" << H << " G=" << G << " copies=" << copies);
    C c(qshape(H, D, 32, 0), Q{}, Q{});
    const kvc::seq_id s = c.add_sequence();
    const auto at = fill_copies(c, s, r.integer(100, 300), copies, r);
    c.merge_layer(s, 0, all_copies(H, at));
    // Queries aligned with the copies' key, so the merged token's mass decides the output.
    std::vector<float> q(static_cast<std::size_t>(H * G) * D);
    for (std::int32_t qh = 0; qh < H * G; ++qh) {
      std::vector<float> kk(static_cast<std::size_t>(c.length(s, 0, qh / G)) * D);
      c.cache().gather(s, 0, qh / G, kk.data());
      for (std::int32_t d = 0; d < D; ++d)
        q[static_cast<std::size_t>(qh) * D + d] = 0.3f * kk[static_cast<std::size_t>(at[0]) * D + d] + r.normal(0.5f);
    }
    std::vector<float> ref(q.size()), fast(q.size()), exact(q.size());
    typename C::layer_buffer buf;
    kvc::reference::decode_attention(c.layer(s, 0, buf), q.data(), H * G, ref.data());
    kvc::cpu::quant_attention_options qo;
    qo.int8_query = qo.int8_probs = true;
    kvc::cpu::merged_decode_attention(c, s, 0, q.data(), H * G, exact.data());
    kvc::cpu::merged_decode_attention(c, s, 0, q.data(), H * G, fast.data(), {}, qo);
    for (std::size_t i = 0; i < q.size(); ++i) {
      KVC_REQUIRE(std::fabs(exact[i] - ref[i]) <= 2e-5, "exact path, out " << i);
      KVC_REQUIRE(std::fabs(fast[i] - ref[i]) <= 3e-2, "integer paths, out " << i);
    }
  }
}

/// CaM and D2O over encoded pages against the same steps over float pages that hold the encoded
/// store's decoded rows: the same kept tokens and log-weights, rows within the codec's rounding
/// of the float store's (the merged mean encoded once more), attention within that too.
TEST_CASE("CaM and D2O over encoded pages match their steps over float pages of the decoded rows", "[merge][quant]") {
  using Q = kvc::quant::int8;
  using C = basic_merged_cache<kvc::quant_cache<Q, Q>>;
  for (int trial = 0; trial < 10; ++trial) {
    rng r(11900 + static_cast<std::uint64_t>(trial));
    const std::int32_t H = r.integer(1, 3), D = 8 * r.integer(1, 8), P = 1 << r.integer(4, 5), L = r.integer(8, 200);
    INFO("trial " << trial << " H=" << H << " D=" << D << " P=" << P << " L=" << L);
    C cq(qshape(H, D, P, 0), Q{}, Q{});
    kvc::merge::merged_cache<float> cf(kvc_test::cache_shape(1, H, D, P, 4096));
    const kvc::seq_id sq = cq.add_sequence(), sf = cf.add_sequence();
    const auto k = r.normals(static_cast<std::size_t>(L) * H * D), v = r.normals(k.size());
    cq.append(sq, 0, k.data(), v.data(), L);
    // The float store gets the decoded rows, head by head in the append layout.
    std::vector<float> dk(k.size()), dv(k.size());
    for (std::int32_t h = 0; h < H; ++h) {
      std::vector<float> hk, hv;
      decoded(cq.cache(), sq, 0, h, hk, hv);
      for (std::int32_t t = 0; t < L; ++t)
        for (std::int32_t d = 0; d < D; ++d) {
          dk[(static_cast<std::size_t>(t) * H + h) * D + d] = hk[static_cast<std::size_t>(t) * D + d];
          dv[(static_cast<std::size_t>(t) * H + h) * D + d] = hv[static_cast<std::size_t>(t) * D + d];
        }
    }
    cf.append(sf, 0, dk.data(), dv.data(), L);
    std::vector<std::vector<std::int32_t>> kept(static_cast<std::size_t>(H));
    std::vector<std::vector<float>> scores(static_cast<std::size_t>(H));
    for (std::int32_t h = 0; h < H; ++h) {
      kept[static_cast<std::size_t>(h)] = r.subset(L, r.integer(1, L));
      std::sort(kept[static_cast<std::size_t>(h)].begin(), kept[static_cast<std::size_t>(h)].end());
      for (std::int32_t t = 0; t < L; ++t) scores[static_cast<std::size_t>(h)].push_back(r.uniform(0.0f, 1.0f));
    }
    if (trial % 2 == 0) {
      kvc::merge::cam_merge_layer(cq, sq, 0, scores, kept);
      kvc::merge::cam_merge_layer(cf, sf, 0, scores, kept);
    } else {
      kvc::merge::d2o_threshold tq, tf;
      kvc::merge::d2o_merge_layer(cq, sq, 0, kept, tq);
      kvc::merge::d2o_merge_layer(cf, sf, 0, kept, tf);
    }
    for (std::int32_t h = 0; h < H; ++h) {
      const std::int32_t n = cf.length(sf, 0, h);
      REQUIRE(cq.length(sq, 0, h) == n);
      REQUIRE(cq.log_weights(sq, 0, h) == cf.log_weights(sf, 0, h));
      REQUIRE(std::equal(cq.cache().positions(sq, 0, h), cq.cache().positions(sq, 0, h) + n, cf.cache().positions(sf, 0, h)));
      std::vector<float> qk, qv, fk(static_cast<std::size_t>(n) * D), fv(fk.size());
      decoded(cq.cache(), sq, 0, h, qk, qv);
      cf.cache().gather(sf, 0, h, fk.data(), fv.data());
      for (std::int32_t t = 0; t < n; ++t) {
        const std::size_t o = static_cast<std::size_t>(t) * D;
        // int8 symmetric per token: half a step of the row's largest magnitude, 1/254 of it
        double mk = 0, mv = 0;
        for (std::int32_t d = 0; d < D; ++d) {
          mk = std::max(mk, std::fabs(static_cast<double>(fk[o + d])));
          mv = std::max(mv, std::fabs(static_cast<double>(fv[o + d])));
        }
        KVC_REQUIRE(max_abs_diff(qk.data() + o, fk.data() + o, D) <= mk / 254 * 1.01 + 1e-6, "head " << h << " token " << t);
        KVC_REQUIRE(max_abs_diff(qv.data() + o, fv.data() + o, D) <= mv / 254 * 1.01 + 1e-6, "head " << h << " token " << t);
      }
    }
    const std::int32_t G = r.integer(1, 4);
    const auto q = r.normals(static_cast<std::size_t>(H * G) * D);
    std::vector<float> oq(q.size()), of(q.size());
    bool any = false;
    for (std::int32_t h = 0; h < H; ++h) any = any || cf.length(sf, 0, h) > 0;
    if (!any) continue;
    kvc::cpu::merged_decode_attention(cq, sq, 0, q.data(), H * G, oq.data());
    kvc::cpu::merged_decode_attention(cf, sf, 0, q.data(), H * G, of.data());
    for (std::size_t i = 0; i < oq.size(); ++i) KVC_REQUIRE(std::fabs(oq[i] - of[i]) <= 0.05, "out " << i);
  }
}

}  // namespace
