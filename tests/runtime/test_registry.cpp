// SPDX-License-Identifier: Apache-2.0
/// The run-time registries: every eviction policy and every quantized storage a spec can name
/// builds, reads its parameters into the scorer/codec it claims, runs, and rejects bad input with
/// a message naming the argument, the value and what was expected.
#include <cmath>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <kvc/runtime/evictor_registry.hpp>
#include <kvc/runtime/make_cache.hpp>
#include <kvc/store/kv_cache.hpp>

#include "kvc_catch.hpp"

namespace {

namespace ev = kvc::evict;
using kvc::runtime::evictor_context;
using kvc::runtime::make_evictor;

constexpr int L = 2, H = 2, HQ = 4, D = 16, N = 48;

kvc::cache_config small_config() {
  kvc::cache_config c;
  c.num_layers = L;
  c.num_kv_heads = H;
  c.head_dim = D;
  c.page_size = 4;
  c.max_pages = 512;
  return c;
}

struct fixture {
  kvc::rope rotary{[] {
    kvc::rope_config r;
    r.head_dim = D;
    r.theta = 10000.0f;
    return r;
  }()};
  std::vector<float> k, v, q;  // [N][H][D], [N][H][D], [N][HQ][D]
  fixture() {
    std::mt19937 rng(11);
    std::normal_distribution<float> nd;
    k.resize(static_cast<std::size_t>(N) * H * D);
    v.resize(k.size());
    q.resize(static_cast<std::size_t>(N) * HQ * D);
    for (auto& x : k) x = nd(rng);
    for (auto& x : v) x = nd(rng);
    for (auto& x : q) x = nd(rng);
  }
  evictor_context ctx() const {
    evictor_context c;
    c.num_layers = L;
    c.num_q_heads = HQ;
    c.rotary = &rotary;
    return c;
  }
  void fill(kvc::kv_cache<float>& c, kvc::seq_id s) const {
    for (int l = 0; l < L; ++l) c.append(s, l, k.data(), v.data(), N);
  }
};

/// The spec used to build each registered name; wrappers get an inner policy.
std::string spec_for(const std::string& name, const std::string& budget) {
  if (name == "vnorm") return "vnorm(knorm," + budget + ")";
  if (name == "simlayerkv") return "simlayerkv(" + budget + ",lazy_threshold=0.5,n_recent=8)";
  return name + "(" + budget + ")";
}

/// Runs one evictor after prefill on a fresh cache, feeding what it observes. Returns the cache.
void run_after_prefill(const fixture& fx, const kvc::runtime::evictor& e, kvc::kv_cache<float>& c, kvc::seq_id s) {
  ev::compressor<ev::any_scorer> comp = e.compressor();
  ev::attention_observer obs_att(e.observer);
  ev::query_stats_accumulator acc(HQ, D);
  acc.add(fx.q.data(), N);  // stands in for pre-RoPE queries
  ev::query_window w;
  const int wn = e.window < 0 ? N : std::min(e.window, N);
  w.q = fx.q.data() + static_cast<std::size_t>(N - wn) * HQ * D;
  w.n = wn;
  w.num_q_heads = HQ;
  w.head_dim = D;
  if (e.what() == ev::observes::attention)
    for (int l = 0; l < L; ++l) obs_att.observe_window(c, s, l, w);
  if (e.cake) {
    auto opt = e;
    opt.options.alloc = kvc::runtime::cake_allocator(e, c, s, [&](int) { return w; });
    comp = opt.compressor();
  }
  for (int l = 0; l < L; ++l) {
    ev::observations o;
    o.window = &w;
    o.attention = &obs_att;
    ev::query_stats st = acc.view(&fx.rotary);
    o.stats = &st;
    comp.after_prefill(c, s, l, o);
  }
}

}  // namespace

TEST_CASE("every registered eviction policy builds from its name and compresses a cache", "[runtime][evict]") {
  const fixture fx;
  const std::set<std::string> expected = {
      "a2sf",   "cake",     "chunkkv",      "curdkv",        "expected_attention", "finch",
      "h2o",    "keydiff",  "knorm",        "lagkv",         "leverage",           "noncausal_attention",
      "pyramidkv", "qfilters", "random",    "rkv",           "scissorhands",       "simlayerkv",
      "snapkv", "streaming_llm", "tova",    "vnorm"};
  std::set<std::string> names;
  for (const auto& kv : kvc::runtime::evictor_registry()) names.insert(kv.first);
  CHECK(names == expected);
  for (const std::string& name : names) {
    for (const char* budget : {"ratio=0.5", "tokens=20"}) {
      const std::string spec = spec_for(name, budget);
      INFO(spec);
      const kvc::runtime::evictor e = make_evictor(spec, fx.ctx());
      CHECK(e.scorer);
      kvc::kv_cache<float> c(small_config());
      const auto s = c.add_sequence();
      fx.fill(c, s);
      const std::size_t before = c.bytes_in_use();
      REQUIRE_NOTHROW(run_after_prefill(fx, e, c, s));
      const int keep = std::string(budget) == "tokens=20" ? 20 : N / 2;
      for (int l = 0; l < L; ++l)
        for (int h = 0; h < H; ++h) {
          const int n = c.length(s, l, h);
          if (name == "pyramidkv" || name == "cake") CHECK(n <= N);     // layer schedules move budget
          else if (name == "simlayerkv") CHECK((n == N || n <= 4 + 8));  // whole layer or initial+recent
          else CHECK(n == keep);
        }
      if (name != "simlayerkv" && name != "pyramidkv" && name != "cake") CHECK(c.bytes_in_use() < before);
    }
  }
}

TEST_CASE("spec parameters reach the scorer: scores equal the directly built scorer's", "[runtime][evict]") {
  const fixture fx;
  kvc::kv_cache<float> c(small_config());
  const auto s = c.add_sequence();
  fx.fill(c, s);
  ev::gathered_layer g;
  ev::gather_layer(c, s, 1, HQ, ev::reads_keys | ev::reads_values, g);
  ev::query_window w{fx.q.data() + static_cast<std::size_t>(N - 8) * HQ * D, nullptr, 8, HQ, D};
  ev::observations o;
  o.window = &w;
  auto same = [&](const std::string& spec, const auto& direct) {
    INFO(spec);
    const kvc::runtime::evictor e = make_evictor(spec, fx.ctx());
    ev::layer_scores a, b;
    e.scorer.score(g.in, o, a);
    direct.score(g.in, o, b);
    CHECK(a == b);
    CHECK(e.scorer.protect().sinks == direct.protect().sinks);
    CHECK(e.scorer.protect().recent == direct.protect().recent);
  };
  ev::snapkv_params sp;
  sp.window = 8;
  sp.kernel = 3;
  sp.pool = ev::pooling::max;
  sp.agg = ev::group_agg::max;
  sp.sinks = 2;
  same("snapkv(ratio=0.5,window=8,kernel=3,pool=max,agg=max,sinks=2)", ev::snapkv(sp));
  ev::knorm_params kp;
  kp.protect = {1, 3};
  same("knorm(ratio=0.5,sinks=1,recent=3)", ev::knorm(kp));
  ev::lagkv_params lp;
  lp.lag = 8;
  lp.sinks = 2;
  lp.cross_scoring = true;
  same("lagkv(ratio=0.5,lag=8,sinks=2,cross_scoring=1)", ev::lagkv(lp));
  ev::curdkv_params cp;
  cp.window = 5;
  cp.sinks = 1;
  same("curdkv(ratio=0.5,window=5,sinks=1)", ev::curdkv(cp));
  ev::leverage_params vp;
  vp.sketch_dimension = 8;
  vp.seed = 3;
  vp.rotary = &fx.rotary;
  same("leverage(ratio=0.5,sketch_dimension=8,seed=3)", ev::leverage(vp));
  vp.rotary = nullptr;
  same("leverage(ratio=0.5,sketch_dimension=8,seed=3,unrotate=0)", ev::leverage(vp));
  ev::noncausal_attention_params np;
  np.chunk = 16;
  np.pool_kernel = 5;
  ev::query_window all{fx.q.data(), nullptr, N, HQ, D};
  o.window = &all;
  same("noncausal_attention(ratio=0.5,chunk=16,pool_kernel=5)", ev::noncausal_attention(np));
  // kvpress's choices, switched on by name: h2o's normalised sum, expected attention without sinks
  ev::attention_observer ob(make_evictor("h2o(ratio=0.5,normalize=1)", fx.ctx()).observer);
  ob.observe_window(c, s, 1, w);
  o.attention = &ob;
  ev::h2o_params hp;
  hp.recent = 2;
  hp.sinks = 1;
  hp.normalize = true;
  same("h2o(ratio=0.5,recent=2,sinks=1,normalize=1)", ev::h2o(hp));
  ev::query_stats_accumulator acc(HQ, D, true, 4);
  acc.add(fx.q.data(), N);
  const ev::query_stats qs = acc.view(&fx.rotary);
  o.stats = &qs;
  ev::expected_attention_params ep;
  ep.n_sink = 3;
  ep.sinks_in_softmax = false;
  same("expected_attention(ratio=0.5,n_sink=3,sinks_in_softmax=0)", ev::expected_attention(ep));
  // vnorm(knorm): knorm's score times ‖v‖₁, against evict::vnorm<knorm> built directly
  same("vnorm(knorm(sinks=2),ratio=0.5,epsilon=0.5)",
       ev::vnorm<ev::knorm>(ev::vnorm_params{0.5f, nullptr, 0}, ev::knorm(ev::knorm_params{{2, 0}})));
  same("rkv(knorm,ratio=0.5,lambda=0.3)", ev::rkv<ev::knorm>(ev::rkv_params{0.3f}, ev::knorm{}));
  // qfilters fitted from the window: the filter of each kv-head is fit_qfilters' on those queries
  {
    const kvc::runtime::evictor e = make_evictor("qfilters(ratio=0.5,sinks=0)", fx.ctx());
    CHECK(e.window == -1);
    ev::layer_scores a;
    e.scorer.score(g.in, o, a);
    const std::vector<float> f = ev::fit_qfilters(all.q, N, HQ, H, D);
    for (int h = 0; h < H; ++h)
      for (int t = 0; t < N; ++t) {
        double ref = 0;
        for (int d = 0; d < D; ++d)
          ref += double(g.in.heads[h].k[static_cast<std::size_t>(t) * D + d]) * f[static_cast<std::size_t>(h) * D + d];
        CHECK(a[h][t] == Approx(ref).margin(1e-5));
      }
  }
}

TEST_CASE("evictors report what the caller must feed, wrappers that of their inner policy", "[runtime][evict]") {
  const fixture fx;
  auto what = [&](const std::string& spec) { return make_evictor(spec, fx.ctx()).what(); };
  CHECK(what("vnorm(tova,ratio=0.5)") == ev::observes::attention);
  CHECK(what("vnorm(knorm,ratio=0.5)") == ev::observes::nothing);
  CHECK(what("chunkkv(ratio=0.5)") == ev::observes::query_window);  // default inner: snapkv
  CHECK(what("rkv(h2o,ratio=0.5)") == ev::observes::attention);
  CHECK(what("expected_attention(ratio=0.5)") == ev::observes::query_stats);
  CHECK(what("finch(ratio=0.5)") == ev::observes::query_window);
  CHECK(make_evictor("snapkv(ratio=0.5,window=32)", fx.ctx()).window == 32);
  CHECK(make_evictor("chunkkv(snapkv(window=16),ratio=0.5)", fx.ctx()).window == 16);
  CHECK(make_evictor("noncausal_attention(ratio=0.5)", fx.ctx()).window == -1);
  CHECK(make_evictor("qfilters(ratio=0.5,calibration=12)", fx.ctx()).window == 12);
  CHECK(make_evictor("knorm(ratio=0.5)", fx.ctx()).window == 0);
  CHECK(make_evictor("a2sf(ratio=0.5,forgetting=0.5)", fx.ctx()).observer.forgetting == 0.5f);
  // the per-token count costs a pass per step: only h2o's normalised sum turns it on
  CHECK(make_evictor("h2o(ratio=0.5,normalize=1)", fx.ctx()).observer.track_count);
  CHECK_FALSE(make_evictor("h2o(ratio=0.5)", fx.ctx()).observer.track_count);
  CHECK_FALSE(make_evictor("tova(ratio=0.5)", fx.ctx()).observer.track_count);
  CHECK(make_evictor("cake(ratio=0.5)", fx.ctx()).cake.has_value());
  CHECK(make_evictor("pyramidkv(ratio=0.5)", fx.ctx()).options.alloc->type == kvc::allocator::kind::pyramid);
  CHECK(make_evictor("knorm(ratio=0.5,alloc=ada,alpha_safeguard=0.3)", fx.ctx()).options.alloc->alpha_safeguard == 0.3);
  CHECK(make_evictor("knorm(tokens=7,interval=4,slack=2)", fx.ctx()).options.interval == 4);
  CHECK(make_evictor("knorm(ratio=0.25)", fx.ctx()).options.target.value == 0.25);
  CHECK(make_evictor("knorm(ratio=0.25)", fx.ctx()).options.num_q_heads == HQ);
}

TEST_CASE("malformed evictor specs name the argument, the value and what was expected", "[runtime][evict]") {
  const fixture fx;
  struct bad {
    const char* spec;
    std::vector<const char*> fragments;
  };
  const bad cases[] = {
      {"snapk(ratio=0.5)", {"unknown eviction policy 'snapk'", "expected one of", "snapkv"}},
      {"snapkv(ratio=1.5)", {"ratio = 1.5", "[0, 1)"}},
      {"snapkv(ratio=-0.1)", {"ratio = -0.1", "[0, 1)"}},
      {"snapkv(tokens=-3)", {"tokens = -3", ">= 0"}},
      {"snapkv(tokens=2.5)", {"tokens = 2.5", "integer"}},
      {"snapkv(window=8)", {"needs a budget", "ratio="}},
      {"snapkv(ratio=0.5,tokens=3)", {"ratio and tokens both given"}},
      {"snapkv(ratio=0.5,windw=8)", {"no argument 'windw'", "ratio or tokens", "window, kernel, pool, agg, sinks"}},
      {"snapkv(ratio=0.5,window=0)", {"window = 0", ">= 1"}},
      {"snapkv(ratio=0.5,pool=median)", {"pool = median", "avg or max"}},
      {"snapkv(ratio=0.5,agg=sum)", {"agg = sum", "mean or max"}},
      {"snapkv(ratio=0.5,window=x)", {"window = x", "a number"}},
      {"knorm(ratio=0.5,alloc=fancy)", {"alloc = fancy", "uniform, ada or pyramid"}},
      {"knorm(ratio=0.5,alpha_safeguard=0.3)", {"alpha_safeguard = 0.3", "alloc=ada"}},
      {"knorm(ratio=0.5,alloc=ada,alpha_safeguard=2)", {"alpha_safeguard = 2", "[0, 1]"}},
      {"knorm(ratio=0.5,interval=0)", {"interval = 0", ">= 1"}},
      {"knorm(ratio=0.5,sinks=-1)", {"sinks = -1", ">= 0"}},
      {"tova(ratio=0.5,share_heads=2)", {"share_heads = 2", "0 or 1"}},
      {"scissorhands(ratio=0.5,history=65)", {"history = 65", "1..64"}},
      {"a2sf(ratio=0.5,forgetting=1)", {"forgetting = 1", "(0, 1)"}},
      {"lagkv(ratio=0.5,lag=1)", {"lag = 1", ">= 2"}},
      {"simlayerkv(ratio=0.5,lazy_threshold=2)", {"lazy_threshold = 2", "[0, 1]"}},
      {"expected_attention(ratio=0.5,use_vnorm=yes)", {"use_vnorm = yes", "a number"}},
      {"rkv(knorm,ratio=0.5,lambda=2)", {"lambda = 2", "[0, 1]"}},
      {"vnorm(ratio=0.5)", {"needs a nested policy", "vnorm(tova)"}},
      {"vnorm(knrm,ratio=0.5)", {"unknown eviction policy 'knrm'"}},
      {"chunkkv(snapkv(windw=3),ratio=0.5)", {"'snapkv' has no argument 'windw'"}},
      {"cake(ratio=0.5,alloc=ada)", {"alloc = ada", "cake allocates"}},
      {"cake(ratio=0.5,tau1=0)", {"tau1 = 0", "> 0"}},
      {"snapkv(ratio=0.5)+kivi", {"expected exactly one eviction stage"}},
      // A misspelt budget is an unknown key with the valid keys, not "needs a budget" (issue 16).
      {"snapkv(rato=0.5)", {"kvc::runtime::make_evictor: 'snapkv' has no argument 'rato'", "did you mean 'ratio'?",
                            "ratio or tokens", "window, kernel, pool, agg, sinks"}},
      {"snapkvv(ratio=0.5)", {"unknown eviction policy 'snapkvv'", "did you mean 'snapkv'?"}},
      {"snapkv(ratio=0.5,sinks=1e10)", {"sinks = 1e10", "expected an integer in [-2147483648, 2147483647]"}},
      {"snapkv(tokens=3e9)", {"tokens = 3e9", "expected an integer in"}},
      {"snapkv(ratio=0.5,window=nan)", {"window = nan", "expected a number"}},
      {"vnorm(tova,knorm,ratio=0.5)", {"'vnorm' takes no nested policy, found 'knorm'"}},
  };
  for (const bad& b : cases) {
    INFO(b.spec);
    try {
      make_evictor(b.spec, fx.ctx());
      FAIL("no error");
    } catch (const kvc::error& e) {
      const std::string msg = e.what();
      INFO(msg);
      for (const char* f : b.fragments) CHECK(msg.find(f) != std::string::npos);
    }
  }
  evictor_context no_rope = fx.ctx();
  no_rope.rotary = nullptr;
  REQUIRE_THROWS_WITH(make_evictor("leverage(ratio=0.5,unrotate=1)", no_rope),
                      Catch::Contains("unrotate = 1") && Catch::Contains("no RoPE"));
  CHECK_NOTHROW(make_evictor("leverage(ratio=0.5)", no_rope));  // defaults to the stored keys
}

TEST_CASE("every quantized storage a spec can name builds, attends over what it stores and reports bytes",
          "[runtime][quant]") {
  // head_dim 32 for KIVI's groups of 32; 64 for the storages that take groups of 64 (3 and 4 bits, a 3-bit side)
  // (kivi<3, 64>'s check asks head_dim to be a multiple of 64). fp32 first: the bytes reference.
  const std::vector<const char*> specs32 = {"fp32",
                                            "fp16",
                                            "bf16",
                                            "int8",
                                            "int8(scheme=asym)",
                                            "int4",
                                            "int2",
                                            "int4(sinks=4)",
                                            "fp8",
                                            "fp8(format=e5m2)",
                                            "kivi(bits=2,residual=32)",
                                            "kivi(bits=4,residual=32)",
                                            "kivi(bits=8,residual=32)",
                                            "kivi(kbits=4,vbits=2,residual=32)",
                                            "kivi(kbits=2,vbits=4,residual=32)",
                                            "kivi(bits=3,residual=32)",
                                            "nuq(bits=2,residual=32)",
                                            "nuq(bits=3,residual=32,sinks=2)",
                                            "rotated(bits=2)",
                                            "rotated(bits=4)",
                                            "outliers(bits=2)",
                                            "outliers(bits=4,fraction=0.05)",
                                            "gear(bits=4)",
                                            "gear(bits=2,rank=2,outliers=0.01)"};
  const std::vector<const char*> specs64 = {
      "fp32", "kivi(bits=3,group=64,residual=0)", "kivi(kbits=3,vbits=4,group=64,residual=0)",
      "kivi(kbits=4,vbits=3,group=64,residual=0,sinks=2)", "nuq(bits=3,group=64,residual=0)",
      "kivi(bits=4,group=64,residual=0)", "kivi(bits=4,group=64,residual=0,sinks=4)"};
  for (const int DQ : {32, 64}) {
    kvc::cache_config cfg = small_config();
    cfg.head_dim = DQ;
    cfg.max_pages = 256;
    const int n = 80;  // beyond KIVI's residual window (32 below) plus a group: some tokens are encoded
    std::mt19937 rng(5);
    std::normal_distribution<float> nd;
    std::vector<float> k(static_cast<std::size_t>(n) * H * DQ), v(k.size()), q(HQ * DQ), o(q.size());
    for (auto& x : k) x = nd(rng);
    for (auto& x : v) x = nd(rng);
    for (auto& x : q) x = nd(rng) * 0.25f;
    std::size_t fp32_bytes = 0;
    for (const char* spec : DQ == 32 ? specs32 : specs64) {
      INFO(spec);
      auto c = kvc::runtime::make_cache(spec, cfg);
      const auto s = c->add_sequence();
      c->append(s, 0, k.data(), v.data(), n);
      CHECK(c->length(s, 0, 1) == n);
      const std::size_t bytes = c->bytes_in_use();
      if (std::string(spec) == "fp32")
        fp32_bytes = bytes;
      else
        CHECK(bytes < fp32_bytes);
      c->attention(s, 0, q.data(), HQ, o.data());
      // Against a double computation over the rows the cache says it holds (gather).
      std::vector<float> kd(static_cast<std::size_t>(n) * DQ), vd(kd.size());
      for (int h = 0; h < H; ++h) {
        c->gather(s, 0, h, kd.data(), vd.data());
        for (int g = 0; g < HQ / H; ++g) {
          const int qh = h * (HQ / H) + g;
          std::vector<double> sc(n);
          double mx = -1e300, sum = 0;
          for (int t = 0; t < n; ++t) {
            double a = 0;
            for (int d = 0; d < DQ; ++d) a += double(q[qh * DQ + d]) * kd[static_cast<std::size_t>(t) * DQ + d];
            mx = std::max(mx, sc[t] = a / std::sqrt(double(DQ)));
          }
          for (int t = 0; t < n; ++t) sum += std::exp(sc[t] - mx);
          for (int d = 0; d < DQ; ++d) {
            double a = 0;
            for (int t = 0; t < n; ++t) a += std::exp(sc[t] - mx) / sum * vd[static_cast<std::size_t>(t) * DQ + d];
            CHECK(std::abs(o[qh * DQ + d] - a) <= 2e-3 * (1 + std::abs(a)));
          }
        }
      }
    }
  }
  kvc::cache_config cfg = small_config();
  cfg.head_dim = 32;
  cfg.max_pages = 256;
  struct bad {
    const char* spec;
    const char* a;
    const char* b;
  };
  const bad cases[] = {
      {"kivi(bits=5)", "kbits = 5, vbits = 5", "2/2, 3/3, 4/4, 8/8"},
      {"kivi(bits=3,group=128)", "group = 128", "64 with bits = 3"},
      {"kivi(bits=3,group=64,residual=32)", "residual = 32", "multiple of the group size 64"},
      {"kivi(kbits=8,vbits=2)", "kbits = 8, vbits = 2", "4/2, 2/4, or 3/4 and 4/3 with group = 64"},
      {"kivi(kbits=3,vbits=4)", "kbits = 3, vbits = 4, group = 32", "3/4 and 4/3 with group = 64"},
      {"kivi(kbits=4,vbits=2,group=64)", "group = 64", "64 with bits = 3, bits = 4 or a 3-bit side"},
      {"kivi(bits=4,group=128)", "group = 128", "64 with bits = 3, bits = 4"},
      {"kivi(bits=4,group=64,residual=32)", "residual = 32", "multiple of the group size 64"},
      {"kivi(group=64)", "group = 64", "expected 32"},
      {"nuq(bits=4)", "bits = 4", "2 or 3"},
      {"nuq(bits=2,group=64)", "group = 64", "64 with bits = 3"},
      {"nuq(bits=3,group=64,residual=32)", "residual = 32", "multiple of the group size 64"},
      {"nuq(kbits=2)", "'nuq' has no argument 'kbits'", "bits, group, residual"},
      {"fp8(format=e3m4)", "format = e3m4", "e4m3 or e5m2"},
      {"int8(scheme=nf)", "scheme = nf", "sym or asym"},
      {"rotated(bits=8)", "bits = 8", "2 or 4"},
      {"outliers(bits=3)", "bits = 3", "2 or 4"},
      {"gear(bits=8)", "bits = 8", "2 or 4"},
      {"int4(bits=4)", "no argument 'bits'", "sinks"},
      {"int3", "unknown storage 'int3'", "expected one of"},
      {"kivi(bitz=2)", "kvc::runtime::make_cache: 'kivi' has no argument 'bitz'", "did you mean 'bits'?"},
      {"kivi(bits=1e10)", "bits = 1e10", "expected an integer in [-2147483648, 2147483647]"},
  };
  for (const bad& b : cases) {
    INFO(b.spec);
    REQUIRE_THROWS_WITH(kvc::runtime::make_cache(b.spec, cfg), Catch::Contains(b.a) && Catch::Contains(b.b));
  }
}

TEST_CASE("pre-RoPE key storages take the caller's RoPE and hand back rotated keys", "[runtime][quant]") {
  const kvc::cache_config cfg = small_config();
  REQUIRE_THROWS_WITH(kvc::runtime::make_cache("int8(pre_rope=1)", cfg),
                      Catch::Contains("pre_rope = 1") && Catch::Contains("storage_options::rope"));
  kvc::rope_config rc;
  rc.head_dim = D;
  rc.theta = 10000.0f;
  kvc::runtime::storage_options so;
  so.rope = &rc;
  REQUIRE_THROWS_WITH(kvc::runtime::make_cache("kivi(pre_rope=2)", cfg, so),
                      Catch::Contains("pre_rope = 2") && Catch::Contains("0 or 1"));
  CHECK_FALSE(kvc::runtime::make_cache("fp16", cfg, so)->pre_rope_keys());
  CHECK_FALSE(kvc::runtime::make_cache("int8", cfg, so)->pre_rope_keys());
  const kvc::rope r(rc);
  for (const char* spec : {"int8(pre_rope=1)", "fp8(pre_rope=1)"}) {
    INFO(spec);
    auto c = kvc::runtime::make_cache(spec, cfg, so);
    CHECK(c->pre_rope_keys());
    const int n = 40;
    std::mt19937 rng(2);
    std::normal_distribution<float> nd;
    std::vector<float> k(static_cast<std::size_t>(n) * H * D), v(k.size());
    for (auto& x : k) x = nd(rng);
    for (auto& x : v) x = nd(rng);
    std::vector<std::int32_t> pos(n);
    for (int t = 0; t < n; ++t) pos[t] = 100 + 3 * t;
    const auto s = c->add_sequence();
    c->append(s, 0, k.data(), v.data(), n, pos.data());
    std::vector<float> kd(static_cast<std::size_t>(n) * D);
    c->gather(s, 0, 1, kd.data(), nullptr);
    for (int t = 0; t < n; ++t) {
      std::vector<float> ref(k.begin() + (static_cast<std::ptrdiff_t>(t) * H + 1) * D,
                             k.begin() + (static_cast<std::ptrdiff_t>(t) * H + 2) * D);
      // The codec's own bound on the un-rotated row, then RoPE mixes two elements per output:
      // int8 per token: amax/254 per element; fp8 e4m3 (3 mantissa bits): 2^-4 of each element,
      // at most 2^-4 amax. Both grow by sqrt(2) through the rotation; 1e-3 covers fp16 rounding.
      float amax = 0.0f;
      for (int d = 0; d < D; ++d) amax = std::max(amax, std::fabs(k[(static_cast<std::size_t>(t) * H + 1) * D + d]));
      const double step = std::string(spec).rfind("fp8", 0) == 0 ? amax / 16.0 : amax / 254.0;
      const double tol = std::sqrt(2.0) * step + 1e-3;
      r.apply(ref.data(), pos[t]);  // independent: kvc::rope on the original (un-rotated) key
      for (int d = 0; d < D; ++d) CHECK(kd[static_cast<std::size_t>(t) * D + d] == Approx(ref[d]).margin(tol));
    }
  }
}
