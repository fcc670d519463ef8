// SPDX-License-Identifier: Apache-2.0
// Policies composed at compile time: eviction (SnapKV), merging (D2O), low-rank projection (PCA)
// and quantization (KIVI-4) as types over one paged store, built up one stage at a time. Each
// stack takes the same prompt, compresses it after prefill, appends a decode token and runs decode
// attention; the program prints the page-pool bytes after each stage and how far each stack's
// attention output moves from the uncompressed fp16 cache's. Two chains: fp16 -> KIVI-4 -> SnapKV
// -> D2O, and fp16 -> PCA -> SnapKV. They do not join yet: a projection over KIVI-4 coefficient
// pages is a run-time storage only (`snapkv(...)+pca(...,coef=kivi(bits=4))`), and merging over
// projected pages does not exist (kvc/compose/stack.hpp).
#include <cmath>
#include <cstdio>
#include <random>
#include <type_traits>
#include <vector>

#include <kvc/compose/projecting.hpp>
#include <kvc/compose/stack.hpp>
#include <kvc/evict/snapkv.hpp>
#include <kvc/quant/kivi.hpp>

namespace cs = kvc::compose;
using kivi4 = kvc::quant::kivi<4>;

using fp16_pages = cs::stack<cs::full_precision<kvc::half>>;
using quantized = cs::stack<cs::encoding<kivi4>>;
using evicted = cs::stack<cs::evicting<kvc::evict::snapkv>, cs::encoding<kivi4>>;
using merged = cs::stack<cs::evicting<kvc::evict::snapkv>, cs::merging<cs::d2o>, cs::encoding<kivi4>>;
using projected = cs::stack<cs::projecting<cs::pca>, cs::full_precision<kvc::half>>;
using projected_evicted = cs::stack<cs::evicting<kvc::evict::snapkv>, cs::projecting<cs::pca>, cs::full_precision<kvc::half>>;
// The stack is a type: its store is KIVI-4 pages under the merged tokens' log-weights.
static_assert(std::is_same<merged::store_type, kvc::merge::basic_merged_cache<kvc::quant_cache<kivi4, kivi4>>>::value,
              "eviction -> merging -> quantization is one store");

namespace {

constexpr int tokens = 2048, kv_heads = 8, q_heads = 32, head_dim = 128, window = 32;

struct prompt {
  std::vector<float> k, v, q_window, k1, v1, q1;  // the prompt, SnapKV's window, one decode step
};

struct outcome {
  std::size_t bytes_prefill = 0, bytes_compressed = 0;
  int tokens_per_head = 0;
  int merged = 0;  ///< tokens of kv head 0 standing for several (log-weight > 0)
  std::size_t bases = 0;  ///< host bytes of a projection's bases (not pages)
  std::vector<float> out;
};

template <class Stack>
outcome run(Stack& st, const prompt& p) {
  outcome o;
  const kvc::seq_id s = st.add_sequence();
  const std::size_t row = static_cast<std::size_t>(kv_heads) * head_dim;
  for (int t = 0; t < tokens; t += 512) st.append(s, 0, p.k.data() + t * row, p.v.data() + t * row, 512);
  o.bytes_prefill = st.bytes_in_use();
  kvc::evict::query_window w{p.q_window.data(), nullptr, window, q_heads, head_dim};
  kvc::evict::observations obs;
  obs.window = &w;
  st.compress(s, 0, obs);
  o.bytes_compressed = st.bytes_in_use();
  st.append(s, 0, p.k1.data(), p.v1.data(), 1);
  o.tokens_per_head = st.store().length(s, 0, 0);
  o.out.resize(p.q1.size());
  st.decode_attention(s, 0, p.q1.data(), q_heads, o.out.data());
  if constexpr (Stack::merges)
    for (float w : st.store().log_weights(s, 0, 0)) o.merged += w > 0.0f;
  if constexpr (Stack::projects) o.bases = st.store().metadata_bytes();
  st.remove_sequence(s);  // the pages go back to the pool (the table printed the bytes before)
  if (st.bytes_in_use() != 0) o.bytes_compressed = 0;  // a leak fails the check below
  return o;
}

double rel_error(const std::vector<float>& a, const std::vector<float>& ref) {
  double e = 0, r = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    e += (static_cast<double>(a[i]) - ref[i]) * (static_cast<double>(a[i]) - ref[i]);
    r += static_cast<double>(ref[i]) * ref[i];
  }
  return std::sqrt(e / r);
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  auto fill = [&](std::size_t n) {
    std::vector<float> x(n);
    for (auto& e : x) e = normal(rng);
    return x;
  };
  // Queries near a few prompt keys, as attention in a model concentrates: what SnapKV keeps and
  // D2O merges into then matters to the output.
  auto concentrate = [&](prompt& p) {
    for (int h = 0; h < q_heads; ++h)
      for (int d = 0; d < head_dim; ++d) {
        const std::size_t src = (static_cast<std::size_t>(97 * (h + 1) % tokens) * kv_heads + h / (q_heads / kv_heads)) * head_dim;
        p.q1[static_cast<std::size_t>(h) * head_dim + d] += 2.0f * p.k[src + d];
        for (int i = 0; i < window; ++i)
          p.q_window[(static_cast<std::size_t>(i) * q_heads + h) * head_dim + d] += 2.0f * p.k[src + d];
      }
  };
  // The first prompt: keys and values of independent normal channels.
  prompt p;
  p.k = fill(static_cast<std::size_t>(tokens) * kv_heads * head_dim);
  p.v = fill(p.k.size());
  p.q_window = fill(static_cast<std::size_t>(window) * q_heads * head_dim);
  p.k1 = fill(static_cast<std::size_t>(kv_heads) * head_dim);
  p.v1 = fill(p.k1.size());
  p.q1 = fill(static_cast<std::size_t>(q_heads) * head_dim);
  concentrate(p);
  // The second: keys and values whose energy lies along a few directions per head, as a model's
  // do (on SmolLM2-135M 95% of the pre-RoPE keys' energy is in 16 of 64 directions,
  // docs/lowrank-spectrum.png): direction j of head h, a random normal vector, has standard
  // deviation 4 exp(-j / 12), so rows have about the first prompt's norm. Independent normal
  // channels have no low-rank structure: a projection to a quarter of them keeps a quarter of
  // the energy, so the projecting chain runs on this prompt, with its own fp16 row.
  auto structured = [&](int n) {
    std::vector<float> x(static_cast<std::size_t>(n) * kv_heads * head_dim, 0.0f);
    for (int h = 0; h < kv_heads; ++h) {
      const std::vector<float> dir = fill(static_cast<std::size_t>(head_dim) * head_dim);
      for (int t = 0; t < n; ++t)
        for (int j = 0; j < head_dim; ++j) {
          const float a = 4.0f * std::exp(-j / 12.0f) * normal(rng) / std::sqrt(float(head_dim));
          float* row = x.data() + (static_cast<std::size_t>(t) * kv_heads + h) * head_dim;
          for (int d = 0; d < head_dim; ++d) row[d] += a * dir[static_cast<std::size_t>(j) * head_dim + d];
        }
    }
    return x;
  };
  prompt p2;
  const std::size_t row = static_cast<std::size_t>(kv_heads) * head_dim;
  for (std::vector<float>* x : {&p2.k, &p2.v}) {
    std::vector<float> all = structured(tokens + 1);  // the prompt, then the decode token
    std::vector<float>& one = x == &p2.k ? p2.k1 : p2.v1;
    one.assign(all.end() - static_cast<std::ptrdiff_t>(row), all.end());
    all.resize(all.size() - row);
    *x = std::move(all);
  }
  p2.q_window = fill(static_cast<std::size_t>(window) * q_heads * head_dim);
  p2.q1 = fill(static_cast<std::size_t>(q_heads) * head_dim);
  concentrate(p2);

  kvc::quant_cache_config cfg;
  cfg.num_layers = 1;
  cfg.num_kv_heads = kv_heads;
  cfg.head_dim = head_dim;
  cfg.page_size = 32;  // whole KIVI key groups of 32 tokens
  cfg.max_pages = 4096;
  kvc::evict::compressor_options keep_half;
  keep_half.target = kvc::budget::ratio(0.5);
  keep_half.num_q_heads = q_heads;
  kvc::evict::snapkv snap;
  kvc::evict::snapkv_params sp;
  sp.window = window;
  snap = kvc::evict::snapkv(sp);

  fp16_pages s0(cfg);
  quantized s1(cfg, cs::encoding<kivi4>{});
  evicted s2(cfg, cs::evicting<kvc::evict::snapkv>{snap, keep_half}, cs::encoding<kivi4>{});
  merged s3(cfg, cs::evicting<kvc::evict::snapkv>{snap, keep_half}, cs::merging<cs::d2o>{}, cs::encoding<kivi4>{});
  kvc::compose::pca quarter;  // rank 32 of 128 for keys and for values: a quarter of the channels
  quarter.rank = head_dim / 4;
  projected s4(cfg, cs::projecting<cs::pca>{quarter}, cs::full_precision<kvc::half>{});
  projected_evicted s5(cfg, cs::evicting<kvc::evict::snapkv>{snap, keep_half}, cs::projecting<cs::pca>{quarter},
                       cs::full_precision<kvc::half>{});
  fp16_pages s0b(cfg);
  const outcome o[] = {run(s0, p), run(s1, p), run(s2, p), run(s3, p), run(s0b, p2), run(s4, p2), run(s5, p2)};
  const char* names[] = {"fp16 pages (kv_cache<half>)", "+ KIVI-4 pages (quant_cache)", "+ SnapKV, keep half",
                         "+ D2O merges the evicted", "fp16 pages (kv_cache<half>)", "+ PCA, rank 32 of 128",
                         "+ SnapKV, keep half"};

  std::printf("%d prompt tokens, %d kv heads x %d, %d query heads; one layer\n", tokens, kv_heads, head_dim, q_heads);
  for (int i = 0; i < 7; ++i) {
    if (i == 0 || i == 4) {
      std::printf("\n%s\n", i == 0 ? "independent normal channels: eviction -> merging -> quantization"
                                    : "a few directions per head: eviction -> low-rank projection");
      std::printf("%-32s %14s %16s %12s %14s\n", "stack", "bytes prefill", "bytes compressed", "tokens/head",
                  "err vs fp16");
    }
    const outcome& base = o[i < 4 ? 0 : 4];
    std::printf("%-32s %14zu %16zu %12d %14.4f\n", names[i], o[i].bytes_prefill, o[i].bytes_compressed,
                o[i].tokens_per_head, i == 0 || i == 4 ? 0.0 : rel_error(o[i].out, base.out));
  }
  const int m = o[3].merged;
  std::printf("\nmerged tokens (log-weight > 0) in head 0 of the D2O stack: %d\n", m);
  std::printf("PCA bases and page tables (host memory, not pages): %zu bytes\n", o[5].bases);
  // What the example shows must hold: each stage holds fewer bytes than the one before, except
  // merging, which keeps eviction's tokens (the same bytes) and folds the dropped ones into them;
  // and removing the sequence gave every page back (run() zeroes the figure otherwise).
  const bool falls = o[1].bytes_compressed < o[0].bytes_compressed && o[2].bytes_compressed < o[1].bytes_compressed &&
                     o[3].bytes_compressed == o[2].bytes_compressed && m > 0 &&
                     o[5].bytes_compressed < o[4].bytes_compressed && o[6].bytes_compressed < o[5].bytes_compressed;
  if (!falls) std::printf("unexpected: the bytes do not fall stage by stage\n");
  return falls ? 0 : 1;
}
