// SPDX-License-Identifier: Apache-2.0
// Policies composed at compile time: eviction (SnapKV), merging (D2O) and quantization (KIVI-4)
// as one type over one paged store, built up one stage at a time. Each stack takes the same
// prompt, compresses it after prefill, appends a decode token and runs decode attention; the
// program prints the page-pool bytes after each stage and how far each stack's attention output
// moves from the uncompressed fp16 cache's. Low-rank projection is not a compile-time stage yet
// (kvc/compose/stack.hpp says why); it composes at run time: `snapkv(...)+pca(...,coef=int8)`.
#include <cmath>
#include <cstdio>
#include <random>
#include <type_traits>
#include <vector>

#include <kvc/compose/stack.hpp>
#include <kvc/evict/snapkv.hpp>
#include <kvc/quant/kivi.hpp>

namespace cs = kvc::compose;
using kivi4 = kvc::quant::kivi<4>;

using fp16_pages = cs::stack<cs::full_precision<kvc::half>>;
using quantized = cs::stack<cs::encoding<kivi4>>;
using evicted = cs::stack<cs::evicting<kvc::evict::snapkv>, cs::encoding<kivi4>>;
using merged = cs::stack<cs::evicting<kvc::evict::snapkv>, cs::merging<cs::d2o>, cs::encoding<kivi4>>;
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
  prompt p;
  p.k = fill(static_cast<std::size_t>(tokens) * kv_heads * head_dim);
  p.v = fill(p.k.size());
  p.q_window = fill(static_cast<std::size_t>(window) * q_heads * head_dim);
  p.k1 = fill(static_cast<std::size_t>(kv_heads) * head_dim);
  p.v1 = fill(p.k1.size());
  p.q1 = fill(static_cast<std::size_t>(q_heads) * head_dim);
  // Queries near a few prompt keys, as attention in a model concentrates: what SnapKV keeps and
  // D2O merges into then matters to the output.
  for (int h = 0; h < q_heads; ++h)
    for (int d = 0; d < head_dim; ++d) {
      const std::size_t src = (static_cast<std::size_t>(97 * (h + 1) % tokens) * kv_heads + h / (q_heads / kv_heads)) * head_dim;
      p.q1[static_cast<std::size_t>(h) * head_dim + d] += 2.0f * p.k[src + d];
      for (int i = 0; i < window; ++i)
        p.q_window[(static_cast<std::size_t>(i) * q_heads + h) * head_dim + d] += 2.0f * p.k[src + d];
    }

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
  const outcome o[] = {run(s0, p), run(s1, p), run(s2, p), run(s3, p)};
  const char* names[] = {"fp16 pages (kv_cache<half>)", "+ KIVI-4 pages (quant_cache)", "+ SnapKV, keep half",
                         "+ D2O merges the evicted"};

  std::printf("%d prompt tokens, %d kv heads x %d, %d query heads; one layer\n\n", tokens, kv_heads, head_dim, q_heads);
  std::printf("%-32s %14s %16s %12s %14s\n", "stack", "bytes prefill", "bytes compressed", "tokens/head",
              "err vs fp16");
  for (int i = 0; i < 4; ++i)
    std::printf("%-32s %14zu %16zu %12d %14.4f\n", names[i], o[i].bytes_prefill, o[i].bytes_compressed,
                o[i].tokens_per_head, i == 0 ? 0.0 : rel_error(o[i].out, o[0].out));
  const int m = o[3].merged;
  std::printf("\nmerged tokens (log-weight > 0) in head 0 of the last stack: %d\n", m);
  // What the example shows must hold: each stage holds fewer bytes than the one before, except
  // merging, which keeps eviction's tokens (the same bytes) and folds the dropped ones into them;
  // and removing the sequence gave every page back (run() zeroes the figure otherwise).
  const bool falls = o[1].bytes_compressed < o[0].bytes_compressed && o[2].bytes_compressed < o[1].bytes_compressed &&
                     o[3].bytes_compressed == o[2].bytes_compressed && m > 0;
  if (!falls) std::printf("unexpected: the bytes do not fall stage by stage\n");
  return falls ? 0 : 1;
}
