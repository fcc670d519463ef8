// SPDX-License-Identifier: Apache-2.0
// Merging stages by spec (runtime/merge_registry.hpp): cam(...), d2o(...), kvmerger(...) parsed
// with every bad argument named; the merged cache behind any_cache; runtime::merger applying
// each policy. The methods themselves are checked against double references in tests/merge/;
// here the run-time path must do exactly what the direct calls do on a twin cache (same data,
// same calls), attend with the log-weights (a dense double reference), and refuse what it
// cannot do without changing anything.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <kvc/cpu/prefill_attention.hpp>
#include <kvc/evict/h2o.hpp>
#include <kvc/runtime/merge_registry.hpp>
#include <kvc/runtime/make_cache.hpp>
#include <kvc/runtime/minicache_storage.hpp>

#include "cache_builders.hpp"
#include "fast_require.hpp"
#include "kvc_catch.hpp"
#include "random.hpp"
#include "../merge/merge_test_util.hpp"  // require_error

// Storage headers register nothing by being included (runtime/make_cache.hpp): the storages this
// file builds by spec are registered here, in its own ISA configuration, before any test runs.
[[maybe_unused]] static const bool storages_registered = (kvc::runtime::register_minicache_storage(), true);

namespace {

using kvc::runtime::make_merge_policy;
using kvc::runtime::merge_policy;
using kvc::runtime::parse_spec;

merge_policy policy(const std::string& spec) { return make_merge_policy(parse_spec(spec).at(0)); }

using kvc_test::require_error;

/// Everything one layer holds, read through any_cache: keys, values, positions per head.
std::vector<std::vector<float>> layer_state(const kvc::runtime::any_cache& c, kvc::seq_id s, int layer) {
  const int H = c.config().num_kv_heads, D = c.config().head_dim;
  std::vector<std::vector<float>> st;
  for (int h = 0; h < H; ++h) {
    const int n = c.length(s, layer, h);
    std::vector<float> k(std::size_t(n) * D), v(k.size());
    c.gather(s, layer, h, k.data(), v.data());
    st.push_back(k);
    st.push_back(v);
    std::vector<float> p(c.positions(s, layer, h), c.positions(s, layer, h) + n);
    st.push_back(p);
  }
  return st;
}

}  // namespace

TEST_CASE("merging specs: defaults, arguments and errors that name the value", "[runtime][merge]") {
  const merge_policy cam = policy("cam");
  REQUIRE(cam.which == merge_policy::method::cam);
  REQUIRE(cam.cam.merge_span == kvc::merge::cam_options{}.merge_span);
  REQUIRE(policy("cam(span=7)").cam.merge_span == 7);
  const merge_policy d2o = policy("d2o(beta=0.25)");
  REQUIRE(d2o.which == merge_policy::method::d2o);
  REQUIRE(d2o.d2o.beta == 0.25f);
  REQUIRE(policy("d2o").d2o.beta == kvc::merge::d2o_options{}.beta);
  const merge_policy kvm = policy("kvmerger(eps=0.5,sigma=2)");
  REQUIRE(kvm.which == merge_policy::method::kvmerger);
  REQUIRE(kvm.kvmerger.threshold == 0.5f);
  REQUIRE(kvm.kvmerger.sigma == 2.0f);
  REQUIRE(kvm.text == "kvmerger(eps=0.5,sigma=2)");
  REQUIRE(policy("d2o").d2o.carry_mass);
  REQUIRE_FALSE(policy("d2o(mass=0)").d2o.carry_mass);
  REQUIRE(policy("kvmerger").kvmerger.carry_mass);
  REQUIRE_FALSE(policy("kvmerger(mass=0,eps=0.9)").kvmerger.carry_mass);
  REQUIRE(kvc::runtime::is_merger("d2o"));
  REQUIRE_FALSE(kvc::runtime::is_merger("snapkv"));

  require_error([] { policy("cam(span=0)"); }, "'cam': span = 0, expected >= 1");
  require_error([] { policy("cam(span=2.5)"); }, "span = 2.5, expected an integer");
  require_error([] { policy("cam(spam=3)"); }, "'cam' has no argument 'spam' (in \"cam(spam=3)\"); did you mean 'span'?");
  require_error([] { policy("d2o(beta=1)"); }, "'d2o': beta = 1, expected 0 <= beta < 1");
  require_error([] { policy("d2o(beta=-0.1)"); }, "beta = -0.1");
  require_error([] { policy("kvmerger(eps=1.5)"); }, "'kvmerger': eps = 1.5, expected a cosine-similarity threshold in [-1, 1]");
  require_error([] { policy("kvmerger(sigma=0)"); }, "'kvmerger': sigma = 0, expected a kernel width > 0");
  require_error([] { policy("kvmerger(eps=x)"); }, "eps = x, expected a number");
  require_error([] { policy("kvmerger(mass=2)"); }, "'kvmerger': mass = 2, expected 1 (a merged token carries");
  require_error([] { policy("cam(mass=0)"); }, "'cam' has no argument 'mass'");
  require_error([] { policy("cma"); }, "unknown merging policy 'cma' in \"cma\"; did you mean 'cam'?; expected one of: cam, d2o, kvmerger");
  require_error([] { kvc::runtime::make_merged_cache("fp8", kvc_test::cache_shape(1, 1, 8, 4, 16)); },
                "storage 'fp8' cannot hold merged tokens; expected fp16, fp32, int8, int4 or kivi(bits=2|4)");
  require_error([] { kvc::runtime::make_merged_cache("kivi(bits=3)", kvc_test::cache_shape(1, 1, 32, 32, 16)); },
                "'kivi(bits=3)': bits = 3, expected 2 or 4");
  require_error([] { kvc::runtime::make_merged_cache("int8(pre_rope=1)", kvc_test::cache_shape(1, 1, 8, 4, 16)); },
                "pre_rope = 1, expected the model's RoPE");
  require_error([] { kvc::runtime::make_merged_cache("int4(fast=1)", kvc_test::cache_shape(1, 1, 8, 4, 16)); },
                "fast = 1 with head_dim = 8");
}

namespace {

/// One compression step of layer 0 by both paths: random scores and kept sets, the merger on the
/// run-time cache, the policy's direct call on the twin; then the same rows, log-weights and bytes.
template <class Twin>
void merge_step(kvc::runtime::merger& m, kvc::runtime::any_cache& rc, kvc::seq_id s, Twin& twin, kvc::seq_id st,
                kvc::merge::d2o_threshold& tau, kvc_test::rng& r) {
  const int H = rc.config().num_kv_heads, D = rc.config().head_dim;
  std::vector<std::vector<float>> scores;
  std::vector<std::vector<std::int32_t>> kept;
  for (int h = 0; h < H; ++h) {
    const int L = rc.length(s, 0, h);
    std::vector<float> sc(static_cast<std::size_t>(L));
    for (auto& x : sc) x = r.uniform(0.0f, 1.0f);
    scores.push_back(sc);
    auto kh = r.subset(L, r.integer(1, L));
    std::sort(kh.begin(), kh.end());
    kept.push_back(kh);
  }
  m.apply(rc, s, 0, scores, kept);
  const merge_policy& p = m.policy();
  if (p.which == merge_policy::method::cam) kvc::merge::cam_merge_layer(twin, st, 0, scores, kept, p.cam);
  else if (p.which == merge_policy::method::d2o) kvc::merge::d2o_merge_layer(twin, st, 0, kept, tau, p.d2o);
  else kvc::merge::kvmerger_evict_layer(twin, st, 0, scores, kept, p.kvmerger);
  for (int h = 0; h < H; ++h) {
    REQUIRE(rc.length(s, 0, h) == static_cast<int>(kept[std::size_t(h)].size()));
    REQUIRE(*rc.log_weights(s, 0, h) == twin.log_weights(st, 0, h));
    std::vector<float> ka(std::size_t(twin.length(st, 0, h)) * D), va(ka.size()), kb(ka.size()), vb(ka.size());
    rc.gather(s, 0, h, ka.data(), va.data());
    twin.cache().gather(st, 0, h, kb.data(), vb.data());
    REQUIRE(ka == kb);
    REQUIRE(va == vb);
  }
  REQUIRE(rc.bytes_in_use() == twin.bytes_in_use());
}

/// The run-time path (spec, merged_cache_adapter, merger) against direct calls on a twin
/// merged_cache holding the same tokens, for one policy, over two compression steps of layer 0
/// (so D2O's threshold must be carried), then attention against the twin's kernels.
template <class T>
void twin_trial(const std::string& spec, const std::string& storage, std::uint64_t seed) {
  kvc_test::rng r(seed);
  const int H = r.integer(1, 3), D = r.integer(4, 40), P = 1 << r.integer(1, 4), G = r.integer(1, 4);
  const kvc::cache_config cfg = kvc_test::cache_shape(2, H, D, P, 2048);
  auto rc = kvc::runtime::make_merged_cache(storage, cfg);
  REQUIRE(rc->name() == storage);
  kvc::merge::merged_cache<T> twin(cfg);
  const kvc::seq_id s = rc->add_sequence(), st = twin.add_sequence();
  kvc::runtime::merger m(policy(spec));
  kvc::merge::d2o_threshold tau;
  INFO(spec << " " << storage << " seed " << seed << " H=" << H << " D=" << D << " P=" << P);
  for (int step = 0; step < 2; ++step) {
    const int n = r.integer(8, 70);
    // Keys in runs of near copies, so that D2O and KVMerger find something to merge.
    std::vector<float> k(std::size_t(n) * H * D);
    const auto v = r.normals(k.size());
    std::vector<float> base = r.normals(std::size_t(H) * D);
    for (int t = 0; t < n; ++t) {
      if (r.coin(0.3)) base = r.normals(std::size_t(H) * D);
      for (std::size_t i = 0; i < base.size(); ++i) k[std::size_t(t) * H * D + i] = base[i] + 0.2f * r.normal();
    }
    rc->append(s, 0, k.data(), v.data(), n);
    twin.append(st, 0, k.data(), v.data(), n);
    merge_step(m, *rc, s, twin, st, tau, r);
  }
  // Decode and prefill attention through any_cache: the log-weights count (twin's kernels).
  const auto q = r.normals(std::size_t(H) * G * D);
  std::vector<float> a(q.size()), b(q.size());
  rc->attention(s, 0, q.data(), H * G, a.data());
  kvc::cpu::merged_decode_attention(twin, st, 0, q.data(), H * G, b.data());
  REQUIRE(a == b);
  const std::int32_t qp[2] = {3, 1000};
  const auto q2 = r.normals(2 * std::size_t(H) * G * D);
  std::vector<float> a2(q2.size()), b2(q2.size());
  REQUIRE(rc->has_prefill_attention());
  rc->prefill_attention(s, 0, q2.data(), 2, qp, H * G, a2.data());
  kvc::cpu::merged_prefill_attention(twin, st, 0, q2.data(), 2, qp, H * G, b2.data());
  REQUIRE(a2 == b2);
  // Something was merged: a log-weight moved off 0 (CaM changes values only; mass=0 keeps them).
  bool moved = false;
  for (int h = 0; h < H; ++h)
    for (float w : twin.log_weights(st, 0, h)) moved |= std::fabs(w) > 1e-4f;  // mass=0: 0 to rounding
  const merge_policy& p = m.policy();
  const bool mass = p.which == merge_policy::method::d2o ? p.d2o.carry_mass
                    : p.which == merge_policy::method::kvmerger ? p.kvmerger.carry_mass
                                                                : false;
  REQUIRE(moved == mass);
}

/// The same over codes: make_merged_cache("int8" | "kivi(...)") and a merging stage against a
/// twin basic_merged_cache<quant_cache<Q, Q>> built with the storage's own configuration.
template <class Q>
void quant_twin_trial(const std::string& spec, const std::string& storage, Q q, std::int32_t dmul, std::uint64_t seed) {
  kvc_test::rng r(seed);
  const int H = r.integer(1, 3), D = dmul * r.integer(1, 3), P = 1 << r.integer(1, 5), G = r.integer(1, 4);
  const kvc::cache_config cfg = kvc_test::cache_shape(1, H, D, P, 2048);
  auto rc = kvc::runtime::make_merged_cache(storage, cfg);
  REQUIRE(rc->name() == storage);
  REQUIRE(rc->holds_log_weights());
  REQUIRE(rc->has_prefill_attention());  // cpu::prefill_attention over the codes, log-weights as bias
  kvc::merge::basic_merged_cache<kvc::quant_cache<Q, Q>> twin(kvc::runtime::detail::quant_config<Q, Q>(cfg, {}), q, q);
  const kvc::seq_id s = rc->add_sequence(), st = twin.add_sequence();
  kvc::runtime::merger m(policy(spec));
  kvc::merge::d2o_threshold tau;
  INFO(spec << " " << storage << " seed " << seed << " H=" << H << " D=" << D << " P=" << P);
  for (int step = 0; step < 2; ++step) {
    const int n = r.integer(8, 90);
    const auto k = r.normals(std::size_t(n) * H * D), v = r.normals(k.size());
    rc->append(s, 0, k.data(), v.data(), n);
    twin.append(st, 0, k.data(), v.data(), n);
    merge_step(m, *rc, s, twin, st, tau, r);
  }
  const auto qv = r.normals(std::size_t(H) * G * D);
  std::vector<float> a(qv.size()), b(qv.size());
  rc->attention(s, 0, qv.data(), H * G, a.data());
  kvc::cpu::merged_decode_attention(twin, st, 0, qv.data(), H * G, b.data());
  REQUIRE(a == b);
  // Prefill through the storage is the blocked kernel on the twin (test_merge_quant checks it
  // against the dense reference).
  const int nq = r.integer(1, 6);
  const auto qp = r.normals(std::size_t(nq) * H * G * D);
  std::vector<std::int32_t> pos(static_cast<std::size_t>(nq));
  for (auto& p : pos) p = r.integer(0, twin.cache().seen(st, 0) - 1);
  std::vector<float> pa(qp.size()), pb(qp.size());
  rc->prefill_attention(s, 0, qp.data(), nq, pos.data(), H * G, pa.data(), {});
  kvc::cpu::prefill_attention(twin, st, 0, qp.data(), nq, pos.data(), H * G, pb.data());
  REQUIRE(pa == pb);
}

}  // namespace

TEST_CASE("runtime::merger over codes: make_merged_cache(int8 | kivi) does what the direct calls do", "[runtime][merge]") {
  for (std::uint64_t seed = 0; seed < 4; ++seed) {
    quant_twin_trial("d2o", "int8", kvc::quant::int8{}, 8, 600 + seed);
    quant_twin_trial("cam(span=4)", "int8", kvc::quant::int8{}, 8, 700 + seed);
    quant_twin_trial("d2o(beta=0.3)", "kivi(bits=4,residual=32)", kvc::quant::kivi<4>(32), 32, 800 + seed);
  }
}

TEST_CASE("runtime::merger does what the direct merge calls do, through any_cache", "[runtime][merge]") {
  for (std::uint64_t seed = 0; seed < 6; ++seed) {
    twin_trial<kvc::half>("cam(span=4)", "fp16", 100 + seed);
    twin_trial<kvc::half>("d2o", "fp16", 200 + seed);
    twin_trial<float>("kvmerger(eps=0.5)", "fp32", 300 + seed);
    twin_trial<float>("d2o(beta=0.3)", "fp32", 400 + seed);
    twin_trial<kvc::half>("kvmerger(eps=0.6,mass=0)", "fp16", 500 + seed);
  }
}

TEST_CASE("runtime::merger refuses what it cannot do and changes nothing", "[runtime][merge][strong]") {
  kvc_test::rng r(77);
  const kvc::cache_config cfg = kvc_test::cache_shape(1, 2, 8, 4, 256);
  const auto k = r.normals(20 * 2 * 8), v = r.normals(k.size());
  // A cache without log-weights.
  auto plain = kvc::runtime::make_cache("fp16", cfg);
  const kvc::seq_id s = plain->add_sequence();
  plain->append(s, 0, k.data(), v.data(), 20);
  const auto before = layer_state(*plain, s, 0);
  const std::vector<std::vector<float>> scores(2, std::vector<float>(20, 0.5f));
  const std::vector<std::vector<std::int32_t>> kept(2, std::vector<std::int32_t>{0, 5, 19});
  kvc::runtime::merger d2o(policy("d2o"));
  require_error([&] { d2o.apply(*plain, s, 0, scores, kept); },
                "kvc::runtime::merger::apply: cache 'fp16' for 'd2o' holds no log-weights; expected a cache from make_merged_cache");
  REQUIRE(layer_state(*plain, s, 0) == before);
  // CaM with scores that are not attention.
  auto merged = kvc::runtime::make_merged_cache("fp16", cfg);
  const kvc::seq_id t = merged->add_sequence();
  merged->append(t, 0, k.data(), v.data(), 20);
  const auto mbefore = layer_state(*merged, t, 0);
  auto neg = scores;
  neg[1][7] = -0.25f;
  kvc::runtime::merger cam(policy("cam"));
  require_error([&] { cam.apply(*merged, t, 0, neg, kept); },
                "'cam': scores[1][7] = -0.25, expected finite attention scores >= 0");
  REQUIRE(layer_state(*merged, t, 0) == mbefore);
  // A bad kept set is named by the method; the threshold of D2O does not move on failure.
  auto bad = kept;
  bad[0] = {5, 2};
  require_error([&] { d2o.apply(*merged, t, 0, scores, bad); }, "kept[0][1] = 2 after 5, expected strictly increasing");
  REQUIRE(layer_state(*merged, t, 0) == mbefore);
  // A merged token may hold members from any position: a merged cache cannot rewind.
  REQUIRE_FALSE(merged->can_rewind());
  require_error([&] { merged->rewind(t, 0, 10); }, "storage 'fp16' cannot rewind (layer 0 to n = 10)");
  REQUIRE(layer_state(*merged, t, 0) == mbefore);
  REQUIRE(merged->seen(t, 0) == 20);
  // keep() on one head through any_cache keeps the others whole.
  merged->keep(t, 0, 1, kept[1].data(), 3);
  REQUIRE(merged->length(t, 0, 0) == 20);
  REQUIRE(merged->length(t, 0, 1) == 3);
  require_error([&] { merged->keep(t, 0, 2, kept[1].data(), 3); }, "head = 2, expected 0..1");
}

TEST_CASE("minicache by spec: merges once through cross_layer_merge, saves pool bytes, refuses eviction", "[runtime][merge]") {
  kvc_test::rng r(88);
  const kvc::cache_config cfg = kvc_test::cache_shape(4, 2, 16, 4, 512);
  auto c = kvc::runtime::make_cache("minicache(gamma=1)", cfg);
  REQUIRE(c->name() == "minicache(gamma=1)");
  const kvc::seq_id s = c->add_sequence();
  for (int l = 0; l < 4; ++l) {
    const auto k = r.normals(32 * 2 * 16), v = r.normals(k.size());
    c->append(s, l, k.data(), v.data(), 32);
  }
  const std::size_t before = c->bytes_in_use();
  kvc::merge::minicache_report rep;
  REQUIRE(kvc::runtime::cross_layer_merge(*c, s, &rep));
  REQUIRE(rep.merged == 2 * 32);  // pair (2, 3), both heads, gamma = 1: every token
  REQUIRE(c->bytes_in_use() < before);
  REQUIRE(c->length(s, 3, 1) == 32);
  const std::int32_t* p = c->positions(s, 3, 1);
  for (int t = 0; t < 32; ++t) REQUIRE(p[t] == t);
  const std::vector<std::int32_t> kept{0, 1};
  require_error([&] { c->keep(s, 2, 0, kept.data(), 2); }, "cannot evict");
  require_error([&] { c->fork(s); }, "cannot share pages between sequences");
  require_error([&] { kvc::runtime::make_cache("minicache(t=2)", cfg); }, "'minicache': t = 2, expected a SLERP weight in [0, 1]");
  require_error([&] { kvc::runtime::make_cache("minicache(start=9)", cfg); }, "'minicache': start = 9");
  require_error([&] { kvc::runtime::make_cache("minicache(gama=1)", cfg); }, "did you mean 'gamma'?");
  auto plain = kvc::runtime::make_cache("fp16", cfg);
  const kvc::seq_id t = plain->add_sequence();
  REQUIRE_FALSE(kvc::runtime::cross_layer_merge(*plain, t));
}

namespace {

/// H2O's decode loop with a merging stage, through any_cache, for `steps` steps of layer 0:
/// append, attend with group_probs (the merged kernel's), observe, and when decode_step_budget
/// says the step is due, merger::compress. Each compression is checked against what it is made
/// of, run here on a twin cache and a copy of the observer: compressor::plan's selection and
/// scores, merger::apply, attention_observer::keep_layer. The schedule is checked against its
/// rule (every `interval` steps, or the longest stream over budget + slack; never when every
/// stream fits the budget), counted here.
void h2o_decode_trial(const std::string& merge_spec, kvc::budget target_budget, std::int32_t interval,
                      std::int32_t slack, std::int32_t recent, std::int32_t sinks, std::uint64_t seed) {
  kvc_test::rng r(seed);
  const int H = r.integer(1, 3), D = r.integer(4, 24), P = 1 << r.integer(1, 4), G = r.integer(1, 3);
  const kvc::cache_config cfg = kvc_test::cache_shape(1, H, D, P, 4096);
  kvc::evict::compressor_options co;
  co.target = target_budget;
  co.interval = interval;
  co.slack = slack;
  co.num_q_heads = H * G;
  kvc::evict::h2o_params hp;
  hp.recent = recent;
  hp.sinks = sinks;
  const kvc::evict::compressor<kvc::evict::h2o> comp0(kvc::evict::h2o(hp), co);
  auto comp = comp0;
  kvc::evict::attention_observer obs;
  auto rc = kvc::runtime::make_merged_cache("fp32", cfg);
  auto twin = kvc::runtime::make_merged_cache("fp32", cfg);
  const kvc::seq_id s = rc->add_sequence(), st = twin->add_sequence();
  kvc::runtime::merger m(policy(merge_spec)), m2(policy(merge_spec));
  INFO(merge_spec << " after h2o, interval " << interval << ", slack " << slack << ", seed " << seed << " H=" << H << " D=" << D << " P=" << P << " G=" << G);
  int compressions = 0;
  for (int step = 1; step <= 90; ++step) {
    // Keys near a few directions, so that D2O and KVMerger find similar tokens.
    const auto k = r.normals(std::size_t(H) * D), v = r.normals(k.size());
    const std::int32_t pos = step - 1;
    rc->append(s, 0, k.data(), v.data(), 1, &pos);
    twin->append(st, 0, k.data(), v.data(), 1, &pos);
    std::int32_t longest = 0;
    for (int h = 0; h < H; ++h) longest = std::max(longest, rc->length(s, 0, h));
    const auto q = r.normals(std::size_t(H) * G * D);
    std::vector<float> out(q.size()), gp(std::size_t(H) * longest, 0.0f);
    kvc::decode_options o;
    o.group_probs = gp.data();
    o.probs_stride = longest;
    rc->attention(s, 0, q.data(), H * G, out.data(), o);
    for (int h = 0; h < H; ++h) {  // a distribution over each head's tokens, G query heads summed
      double sum = 0;
      for (int t = 0; t < rc->length(s, 0, h); ++t) sum += gp[std::size_t(h) * longest + t];
      KVC_REQUIRE(std::fabs(sum - G) <= 1e-4 * G, "step " << step << " head " << h << " group_probs sum " << sum);
    }
    obs.observe_group(kvc::runtime::any_cache_view{rc.get()}, s, 0, gp.data(), longest, G);
    kvc::runtime::any_cache_view view{rc.get()};
    const kvc::budget target = comp.seen_budget(view, s, 0);
    const bool due = (step % interval == 0 || longest > target.value + slack) && longest > target.value;
    // What compress must do, planned before it runs (plan is const and reads what compress reads).
    kvc::evict::observations ob;
    ob.attention = &obs;
    kvc::evict::layer_scores sc;
    const kvc::evict::layer_selection sel = comp.plan(view, s, 0, ob, target, &sc);
    kvc::evict::attention_observer expect_obs = obs;
    const std::optional<kvc::budget> b = comp.decode_step_budget(view, s, 0);
    KVC_REQUIRE(b.has_value() == due, "step " << step << ": due " << due << ", longest " << longest << ", target " << target.value);
    if (!b) continue;
    REQUIRE(b->value == target.value);
    ++compressions;
    const std::size_t pages_before = rc->bytes_in_use();
    const kvc::evict::compress_report rep = m.compress(comp, *rc, s, 0, ob, *b);
    m2.apply(*twin, st, 0, sc, sel);
    expect_obs.keep_layer(s, 0, sel);
    REQUIRE(rep.compressed);
    REQUIRE(layer_state(*rc, s, 0) == layer_state(*twin, st, 0));
    REQUIRE(rc->bytes_in_use() == twin->bytes_in_use());
    REQUIRE(rc->bytes_in_use() <= pages_before);
    std::int64_t held = 0;
    for (int h = 0; h < H; ++h) {
      held += rc->length(s, 0, h);
      REQUIRE(rc->length(s, 0, h) == static_cast<int>(sel[std::size_t(h)].size()));
      const auto* a = obs.find(s, 0, h);
      const auto* e = expect_obs.find(s, 0, h);
      REQUIRE(a != nullptr);
      REQUIRE(a->sum == e->sum);  // the observer follows the kept tokens
      REQUIRE(a->sum.size() == static_cast<std::size_t>(rc->length(s, 0, h)));
    }
    REQUIRE(rep.tokens_after == held);
  }
  REQUIRE(compressions > 0);
}

}  // namespace

TEST_CASE("merger::compress on H2O's decode-time schedule: plan, merge, the observer follows", "[runtime][merge]") {
  for (std::uint64_t seed = 0; seed < 4; ++seed) {
    h2o_decode_trial("d2o", kvc::budget::tokens(24), 1, 0, 4, 2, 600 + seed);
    h2o_decode_trial("cam(span=4)", kvc::budget::ratio(0.5), 5, 3, 2, 1, 700 + seed);
    h2o_decode_trial("kvmerger(eps=0.1)", kvc::budget::ratio(0.3), 3, 0, 2, 0, 800 + seed);
  }
}

TEST_CASE("merger::fork gives a fork its source's D2O thresholds and refuses a bad fork", "[runtime][merge]") {
  // The same merges on a and on its fork b, step after step, with the thresholds copied; b2
  // without them (a fresh threshold, which merges its first step's token whatever its
  // similarity) merges differently.
  int differs_without = 0;
  for (std::uint64_t seed = 0; seed < 6; ++seed) {
    kvc_test::rng r(900 + seed);
    const int H = 2, D = 12;
    const kvc::cache_config cfg = kvc_test::cache_shape(1, H, D, 4, 4096);
    auto c = kvc::runtime::make_merged_cache("fp32", cfg);
    kvc::runtime::merger m(policy("d2o(beta=0.3)"));
    const kvc::seq_id a = c->add_sequence();
    const std::vector<float> base = r.normals(std::size_t(H) * D);
    float noise = 0.05f;  // near copies of one key: D2O's threshold climbs close to 1
    auto step = [&](const std::vector<kvc::seq_id>& seqs, std::vector<kvc::runtime::merger*> ms) {
      std::vector<float> k(base.size());
      for (std::size_t i = 0; i < k.size(); ++i) k[i] = base[i] + noise * r.normal();
      const auto v = r.normals(k.size());
      const int L = c->length(seqs[0], 0, 0) + 1;
      std::vector<std::vector<float>> scores(H, std::vector<float>(std::size_t(L)));
      for (auto& row : scores)
        for (auto& x : row) x = r.uniform(0.0f, 1.0f);
      std::vector<std::vector<std::int32_t>> kept(H);
      for (auto& kh : kept) kh = L > 10 ? r.subset(L, 10) : r.subset(L, L);
      for (std::size_t i = 0; i < seqs.size(); ++i) {
        c->append(seqs[i], 0, k.data(), v.data(), 1);
        ms[i]->apply(*c, seqs[i], 0, scores, kept);
      }
    };
    for (int t = 0; t < 25; ++t) step({a}, {&m});
    const kvc::seq_id b = c->fork(a), b2 = c->fork(a);
    m.fork(a, b);
    kvc::runtime::merger fresh = m;
    fresh.remove_sequence(b2);  // b2: the fork without its source's thresholds
    noise = 0.6f;  // less similar tokens than before the fork: the carried threshold drops some of them
    for (int t = 0; t < 25; ++t) step({a, b, b2}, {&m, &m, &fresh});
    REQUIRE(layer_state(*c, a, 0) == layer_state(*c, b, 0));
    differs_without += layer_state(*c, a, 0) != layer_state(*c, b2, 0);
    require_error([&] { m.fork(a, b); }, "kvc::runtime::merger::fork: to = " + std::to_string(b) +
                                             ", expected a sequence with no merging state yet");
    require_error([&] { m.fork(a, a); }, "from = to = " + std::to_string(a));
  }
  REQUIRE(differs_without > 0);
}
