// SPDX-License-Identifier: Apache-2.0
// The ISA rule (docs/isa.md) in one program: isa_tu_avx2.cpp is built with -mavx2 -mfma -mf16c and
// isa_tu_base.cpp without; both run the same kernels and codecs on the same caches (built here,
// in a third TU: kv_cache and quant_cache are one type in all three). Each TU must report its own
// ISA (kvc::cpu::isa_name() lives in the ISA namespace), both must agree with a double reference,
// and the ISA-neutral code (codecs, half conversions) must give the same bits in both. The two TUs
// are built with -fno-inline, so every call goes through the symbol the linker kept: without
// the ISA namespaces one TU would run the other's body (and report the other's ISA).
// The second half does the same through kvc::runtime (make_cache, any_cache::attention,
// make_evictor), kvc::decode_attention on views (kvc/attention.hpp) and R-KV's scorer: the
// runtime's adapters and registries live in the ISA namespace too, so a cache built in a TU is of
// a type named after that TU's ISA, and runs that TU's kernels wherever it is called from.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include <kvc/cpu/simd.hpp>
#include <kvc/runtime/any_cache.hpp>

#include "float_formats.hpp"
#include "isa_shared.hpp"
#include "kvc_catch.hpp"
#include "random.hpp"

namespace {

/// softmax(q.k / sqrt(D)) v in double over rows read back from the cache (gather), per q-head.
template <class Cache, class Seq>
std::vector<double> reference(const Cache& c, Seq s, const std::vector<float>& q, std::int32_t hq) {
  const std::int32_t H = c.config().num_kv_heads, D = c.config().head_dim, G = hq / H;
  std::vector<double> out(static_cast<std::size_t>(hq) * D, 0.0);
  for (std::int32_t h = 0; h < H; ++h) {
    const std::int32_t n = c.length(s, 0, h);
    std::vector<float> k(static_cast<std::size_t>(n) * D), v(k.size());
    c.gather(s, 0, h, k.data(), v.data());
    for (std::int32_t g = 0; g < G; ++g) {
      const float* qh = q.data() + static_cast<std::size_t>(h * G + g) * D;
      std::vector<double> sc(static_cast<std::size_t>(n));
      double mx = -1e300, sum = 0;
      for (std::int32_t t = 0; t < n; ++t) {
        double a = 0;
        for (std::int32_t d = 0; d < D; ++d) a += double(qh[d]) * k[static_cast<std::size_t>(t) * D + d];
        sc[static_cast<std::size_t>(t)] = a / std::sqrt(double(D));
        mx = std::max(mx, sc[static_cast<std::size_t>(t)]);
      }
      for (double x : sc) sum += std::exp(x - mx);
      for (std::int32_t t = 0; t < n; ++t)
        for (std::int32_t d = 0; d < D; ++d)
          out[static_cast<std::size_t>(h * G + g) * D + d] +=
              std::exp(sc[static_cast<std::size_t>(t)] - mx) / sum * v[static_cast<std::size_t>(t) * D + d];
    }
  }
  return out;
}

void check_close(const std::vector<float>& got, const std::vector<double>& ref) {
  REQUIRE(got.size() == ref.size());
  for (std::size_t i = 0; i < ref.size(); ++i) {
    INFO("element " << i);
    REQUIRE(std::abs(got[i] - ref[i]) <= 2e-5 * (1.0 + std::abs(ref[i])));
  }
}

/// R-KV's score with lambda = 0, in double: -softmax_t((k^_t . sum_i k^_i - 1) / (n - 1)).
std::vector<std::vector<double>> rkv_reference(const kvc::kv_cache<kvc::half>& c, kvc::seq_id s) {
  const std::int32_t H = c.config().num_kv_heads, D = c.config().head_dim;
  std::vector<std::vector<double>> out(static_cast<std::size_t>(H));
  for (std::int32_t h = 0; h < H; ++h) {
    const std::int32_t n = c.length(s, 0, h);
    std::vector<float> k(static_cast<std::size_t>(n) * D);
    c.gather(s, 0, h, k.data(), nullptr);
    std::vector<double> kh(k.size()), sum(static_cast<std::size_t>(D), 0.0), red(static_cast<std::size_t>(n));
    for (std::int32_t t = 0; t < n; ++t) {
      double nn = 0;
      for (std::int32_t d = 0; d < D; ++d) nn += double(k[static_cast<std::size_t>(t) * D + d]) * k[static_cast<std::size_t>(t) * D + d];
      for (std::int32_t d = 0; d < D; ++d) {
        kh[static_cast<std::size_t>(t) * D + d] = k[static_cast<std::size_t>(t) * D + d] / std::sqrt(nn);
        sum[static_cast<std::size_t>(d)] += kh[static_cast<std::size_t>(t) * D + d];
      }
    }
    double mx = -1e300, z = 0;
    for (std::int32_t t = 0; t < n; ++t) {
      double dot = 0;
      for (std::int32_t d = 0; d < D; ++d) dot += kh[static_cast<std::size_t>(t) * D + d] * sum[static_cast<std::size_t>(d)];
      red[static_cast<std::size_t>(t)] = (dot - 1.0) / (n - 1);
      mx = std::max(mx, red[static_cast<std::size_t>(t)]);
    }
    for (double x : red) z += std::exp(x - mx);
    for (double x : red) out[static_cast<std::size_t>(h)].push_back(-std::exp(x - mx) / z);
  }
  return out;
}

bool cpu_runs_avx2_tu() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

}  // namespace

constexpr std::int32_t H = 2, hq = 4, D = 64, n = 100, window_n = 8;

struct fixture {
  kvc_test::rng r{7};
  kvc::cache_config cfg;
  std::unique_ptr<kvc::kv_cache<kvc::half>> fp16;
  std::unique_ptr<kvc::quant_cache<kvc::quant::int4>> int4;
  isa_inputs in;
  fixture() {
    cfg.num_layers = 1;
    cfg.num_kv_heads = H;
    cfg.head_dim = D;
    cfg.page_size = 16;
    cfg.max_pages = 256;
    fp16 = std::make_unique<kvc::kv_cache<kvc::half>>(cfg);
    kvc::quant_cache_config qcfg;
    static_cast<kvc::cache_config&>(qcfg) = cfg;
    int4 = std::make_unique<kvc::quant_cache<kvc::quant::int4>>(qcfg);
    in.k = r.normals(static_cast<std::size_t>(n) * H * D);
    in.v = r.normals(in.k.size());
    in.fp16 = fp16.get();
    in.seq = fp16->add_sequence();
    fp16->append(in.seq, 0, in.k.data(), in.v.data(), n);
    in.int4 = int4.get();
    in.qseq = int4->add_sequence();
    int4->append(in.qseq, 0, in.k.data(), in.v.data(), n);
    in.num_q_heads = hq;
    in.q = r.normals(static_cast<std::size_t>(hq) * D);
    in.row = r.normals(D, 3.0f);
    in.row[5] = 70000.0f;   // overflows binary16
    in.row[6] = 3e-8f;      // binary16 subnormal range
    in.row[7] = 0.000244140625f + 1e-12f;
    in.cfg = cfg;
    in.n = n;
    in.window_n = window_n;
    in.window = r.normals(static_cast<std::size_t>(window_n) * hq * D);
  }
  /// The probes this CPU can run: the baseline TU always, the AVX2 TU where the CPU has AVX2.
  std::vector<probe_result> run() const {
    std::vector<probe_result> runs;
    runs.push_back(probe_base(in));
    if (cpu_runs_avx2_tu()) runs.push_back(probe_avx2(in));
    else WARN("this CPU has no AVX2+FMA+F16C: the AVX2 TU is linked but not run");
    return runs;
  }
};

TEST_CASE("two TUs with different -m flags each run their own ISA's kernels, both correct", "[isa]") {
  const fixture f;
  const isa_inputs& in = f.in;
  const auto& fp16 = *f.fp16;
  const auto& int4 = *f.int4;
  const auto ref16 = reference(fp16, in.seq, in.q, hq);
  const auto ref4 = reference(int4, in.qseq, in.q, hq);

  const std::vector<probe_result> runs = f.run();
  CHECK(runs[0].isa == kvc::cpu::isa_name());  // this TU has the base flags too
  CHECK(runs[0].isa.find("avx2") == std::string::npos);
  if (runs.size() == 2) CHECK(runs[1].isa == "isa_avx2_fma_f16c");
  for (const auto& p : runs) {
    INFO("TU " << p.isa);
    CHECK(p.runtime_avx2 == runs[0].runtime_avx2);  // ISA-neutral code chooses at run time
    check_close(p.attn_fp16, ref16);
    check_close(p.attn_int4, ref4);
    check_close(p.attn_view, ref16);  // kvc::decode_attention on the fp16 cache's views
    // Half conversions, bulk and scalar, against the independent binary16 model.
    for (std::size_t i = 0; i < in.row.size(); ++i) {
      const auto want = kvc_test::binary16.encode_nearest(in.row[i], false);
      INFO("row[" << i << "] = " << in.row[i]);
      CHECK(p.half_bits[i] == want);
      CHECK(p.half_bits_scalar[i] == want);
    }
    // The int4 codec's bound: |x - x^| <= scale / 2, scale = (max - min) / 15 rounded up to binary16.
    std::vector<float> row(in.row.begin(), in.row.end());
    const auto mm = std::minmax_element(row.begin(), row.end());
    const double bound = (double(*mm.second) - *mm.first) / 15.0 * 0.5 * 1.002 + 1e-6 * std::abs(*mm.first);
    for (std::size_t i = 0; i < row.size(); ++i) CHECK(std::abs(p.codec_roundtrip[i] - row[i]) <= bound);
  }
  if (runs.size() == 2) {  // one body for the ISA-neutral codec: the same record bit for bit
    CHECK(runs[0].codec_record == runs[1].codec_record);
    CHECK(runs[0].isa != runs[1].isa);
  }
}

TEST_CASE("kvc::runtime from two TUs: each builds its own ISA's adapters, attention and evictors correct",
          "[isa][runtime]") {
  const fixture f;
  const isa_inputs& in = f.in;
  const std::vector<probe_result> runs = f.run();
  const auto rkv_ref = rkv_reference(*f.fp16, in.seq);
  for (const auto& p : runs) {
    INFO("TU " << p.isa);
    REQUIRE(p.runtime.size() == std::size(isa_storage_specs) + 1);
    for (const runtime_run& run : p.runtime) {
      INFO("spec " << run.spec << ", type " << run.type);
      // The cache's dynamic type is the adapter of the TU that built it: its mangled name carries
      // that TU's ISA namespace (kvc::runtime::isa_...::cache_adapter<...>, mikv_cache<...>).
      CHECK(run.type.find(p.isa) != std::string::npos);
      for (const auto& other : runs)
        if (other.isa != p.isa) CHECK(run.type.find(other.isa) == std::string::npos);
      // Attention through any_cache against the double reference over what the cache holds.
      const auto ref = reference(*run.cache, run.seq, in.q, hq);
      check_close(run.attn, ref);
      // Called from this (baseline) TU, the cache still runs its own adapter: the same result.
      std::vector<float> again(run.attn.size());
      run.cache->attention(run.seq, 0, in.q.data(), hq, again.data());
      check_close(again, ref);
    }
    // The evictor (ratio 0.5) kept half of every stream, the same tokens in both TUs.
    REQUIRE(p.kept.size() == static_cast<std::size_t>(H));
    for (const auto& k : p.kept) CHECK(k.size() == static_cast<std::size_t>(n / 2));
    CHECK(p.kept == runs[0].kept);
    // R-KV's redundancy against the double reference; ISA-neutral, so the same bits in both TUs.
    REQUIRE(p.rkv_scores.size() == rkv_ref.size());
    for (std::size_t h = 0; h < rkv_ref.size(); ++h) {
      REQUIRE(p.rkv_scores[h].size() == rkv_ref[h].size());
      for (std::size_t t = 0; t < rkv_ref[h].size(); ++t) {
        INFO("rkv head " << h << " token " << t);
        CHECK(std::abs(p.rkv_scores[h][t] - rkv_ref[h][t]) <= 1e-6 + 1e-4 * std::abs(rkv_ref[h][t]));
      }
    }
    CHECK(p.rkv_scores == runs[0].rkv_scores);
  }
}
