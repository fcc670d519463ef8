// SPDX-License-Identifier: Apache-2.0
// kvc::cuda decode attention over full-precision paged caches against kvc::reference (double, on
// the host views of the same data): kvc's per-stream pages (fp32/fp16/bf16), vLLM NHD/HND blocks,
// FlashInfer's combined CSR pool, and device views through kvc::decode_attention (compile-time
// backend selection). head_dim {64, 128, 256}, page size {1, 16, 64}, GQA {1, 2, 4, 8, 12},
// ragged batches with empty and one-token streams, forced and automatic split-K, with every
// output (out, lse, probs, group_probs) poisoned with NaN before the call.
//
// Tolerance: as the CPU kernel's tests (tests/core/test_attention.cpp): the kernel works in float
// on values exactly representable in float, so |out - ref| <= 2e-5 * max|V| of the stream,
// |lse - ref| <= 2e-5 * max(1, |ref|), probabilities within 2e-5 * p + 1e-7.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <kvc/attention.hpp>
#include <kvc/attention/reference.hpp>
#include <kvc/cuda.cuh>
#include <kvc/store/kv_cache.hpp>
#include <kvc/view/engine.hpp>
#include <kvc/view/heads.hpp>

#include "cuda_test_util.cuh"

using namespace kvc_gpu_test;

namespace {

constexpr double tol = 2e-5;

/// Device outputs of one call, poisoned, and the options pointing at them.
struct dev_out {
  kvc::cuda::device_buffer<float> out, lse, probs, gp;
  std::int32_t rows, streams, D, stride;
  dev_out(std::int32_t rows_, std::int32_t streams_, std::int32_t D_, std::int32_t stride_)
      : out(poisoned(static_cast<std::size_t>(rows_) * D_)), lse(poisoned(static_cast<std::size_t>(rows_))),
        probs(poisoned(static_cast<std::size_t>(rows_) * std::max(stride_, 1))),
        gp(poisoned(static_cast<std::size_t>(streams_) * std::max(stride_, 1))), rows(rows_), streams(streams_), D(D_),
        stride(stride_) {}
  kvc::cuda::device_decode_options options(std::int32_t split, bool probs_too, kvc::cuda::workspace* ws) {
    kvc::cuda::device_decode_options o;
    o.split_tokens = split;
    o.lse = lse.data();
    o.ws = ws;
    if (probs_too) {
      o.probs = probs.data();
      o.group_probs = gp.data();
      o.probs_stride = stride;
    }
    return o;
  }
};

/// Host results of kvc::reference for the whole batch, rows in stream order.
struct host_ref {
  std::vector<float> out, lse, probs, gp;
};

/// Compares the device outputs with the reference. len[s] and vmax[s] per stream.
void compare(dev_out& d, const host_ref& r, const std::vector<std::int32_t>& len, const std::vector<double>& vmax,
             std::int32_t G, bool probs_too, const char* what) {
  KVC_CUDA_CHECK(cudaDeviceSynchronize());
  const auto out = d.out.download(static_cast<std::size_t>(d.rows) * d.D);
  const auto lse = d.lse.download(static_cast<std::size_t>(d.rows));
  for (std::int32_t row = 0; row < d.rows; ++row) {
    const std::int32_t s = row / G;
    for (std::int32_t k = 0; k < d.D; ++k) {
      const std::size_t i = static_cast<std::size_t>(row) * d.D + k;
      GPU_CHECK(close(out[i], r.out[i], tol * std::max(vmax[s], 1e-30)), "%s: out row %d d %d: got %g want %g (n = %d)",
                what, row, k, out[i], r.out[i], len[s]);
    }
    const float want = r.lse[row];
    GPU_CHECK(want == -INFINITY ? lse[row] == -INFINITY : close(lse[row], want, tol * std::max(1.0, std::fabs(double(want)))),
              "%s: lse row %d: got %g want %g", what, row, lse[row], want);
  }
  if (!probs_too) return;
  const auto probs = d.probs.download(static_cast<std::size_t>(d.rows) * d.stride);
  const auto gp = d.gp.download(static_cast<std::size_t>(d.streams) * d.stride);
  for (std::int32_t row = 0; row < d.rows; ++row)
    for (std::int32_t t = 0; t < len[row / G]; ++t) {
      const std::size_t i = static_cast<std::size_t>(row) * d.stride + t;
      GPU_CHECK(close(probs[i], r.probs[i], tol * r.probs[i] + 1e-7), "%s: probs row %d t %d: got %g want %g", what,
                row, t, probs[i], r.probs[i]);
    }
  for (std::int32_t s = 0; s < d.streams; ++s)
    for (std::int32_t t = 0; t < len[s]; ++t) {
      const std::size_t i = static_cast<std::size_t>(s) * d.stride + t;
      GPU_CHECK(close(gp[i], r.gp[i], tol * G * r.gp[i] + 1e-7 * G), "%s: group_probs stream %d t %d: got %g want %g",
                what, s, t, gp[i], r.gp[i]);
    }
}

/// Reference over a batch: heads_of(b) gives sequence b's Heads (host views).
template <class HeadsOf>
host_ref reference_batch(HeadsOf&& heads_of, std::int32_t B, std::int32_t hkv, std::int32_t G, std::int32_t D,
                         const std::vector<float>& q, std::int32_t stride, bool probs_too) {
  host_ref r;
  const std::int32_t hq = hkv * G;
  r.out.resize(static_cast<std::size_t>(B) * hq * D);
  r.lse.resize(static_cast<std::size_t>(B) * hq);
  r.probs.assign(static_cast<std::size_t>(B) * hq * std::max(stride, 1), 0.0f);
  r.gp.assign(static_cast<std::size_t>(B) * hkv * std::max(stride, 1), 0.0f);
  for (std::int32_t b = 0; b < B; ++b) {
    kvc::decode_options o;
    o.lse = r.lse.data() + static_cast<std::size_t>(b) * hq;
    if (probs_too) {
      o.probs = r.probs.data() + static_cast<std::size_t>(b) * hq * stride;
      o.group_probs = r.gp.data() + static_cast<std::size_t>(b) * hkv * stride;
      o.probs_stride = stride;
    }
    kvc::reference::decode_attention(heads_of(b), q.data() + static_cast<std::size_t>(b) * hq * D, hq,
                                     r.out.data() + static_cast<std::size_t>(b) * hq * D, o);
  }
  return r;
}

template <class T>
void test_store(kvc_test::rng& g, std::int32_t D, std::int32_t P, std::int32_t hkv, std::int32_t G, std::int32_t B,
                std::int32_t max_len, std::int32_t split, bool probs_too, kvc::cuda::workspace& ws) {
  kvc::cache_config cfg;
  cfg.num_layers = 1;
  cfg.num_kv_heads = hkv;
  cfg.head_dim = D;
  cfg.page_size = P;
  cfg.max_pages = 1 << 15;
  kvc::kv_cache<T> c(cfg);
  std::vector<kvc::seq_id> seqs;
  for (std::int32_t b = 0; b < B; ++b) {
    seqs.push_back(c.add_sequence());
    const std::int32_t n = g.coin(0.15) ? g.integer(0, 1) : g.integer(2, max_len);
    const auto k = g.normals(static_cast<std::size_t>(n) * hkv * D), v = g.normals(static_cast<std::size_t>(n) * hkv * D);
    c.append(seqs.back(), 0, k.data(), v.data(), n);
    // Ragged heads: evict a random subset of some heads' tokens on the host first.
    if (n > 2 && g.coin(0.5)) {
      std::vector<std::vector<std::int32_t>> kept(static_cast<std::size_t>(hkv));
      for (auto& kh : kept)
        for (std::int32_t t = 0; t < n; ++t)
          if (g.coin(0.6)) kh.push_back(t);
      c.keep_layer(seqs.back(), 0, kept);
    }
  }
  device_kv_layer<T> dl(c, seqs, 0);
  const std::int32_t S = B * hkv, rows = S * G;
  const auto q = g.normals(static_cast<std::size_t>(rows) * D);
  auto dq = to_device(q);
  const std::int32_t longest = dl.lengths.empty() ? 0 : *std::max_element(dl.lengths.begin(), dl.lengths.end());
  dev_out d(rows, S, D, longest + 3);
  kvc::cuda::decode_attention_streams(dl.base(), dl.page_stride, P, dl.table_ptrs, dl.lengths, G, D, dq.data(),
                                      d.out.data(), d.options(split, probs_too, &ws));
  std::vector<std::vector<typename kvc::kv_cache<T>::view_type>> bufs(static_cast<std::size_t>(B));
  const host_ref r = reference_batch([&](std::int32_t b) { return c.layer(seqs[b], 0, bufs[b]); }, B, hkv, G, D, q,
                                     longest + 3, probs_too);
  std::vector<double> vmax(static_cast<std::size_t>(S), 0.0);
  std::vector<float> vv(static_cast<std::size_t>(std::max(longest, 1)) * D);
  for (std::int32_t s = 0; s < S; ++s) {
    c.gather(seqs[s / hkv], 0, s % hkv, nullptr, vv.data());
    for (std::int32_t i = 0; i < dl.lengths[s] * D; ++i) vmax[s] = std::max(vmax[s], std::fabs(double(vv[i])));
  }
  char what[160];
  std::snprintf(what, sizeof what, "store T=%d B D=%d P=%d hkv=%d G=%d B=%d split=%d", int(sizeof(T)), D, P, hkv, G,
                B, split);
  compare(d, r, dl.lengths, vmax, G, probs_too, what);
}

/// vLLM block arrays (NHD and HND) and FlashInfer's combined pool, fp16.
template <kvc::page_order Order>
void test_engines(kvc_test::rng& g, std::int32_t D, std::int32_t P, std::int32_t hkv, std::int32_t G, std::int32_t B,
                  kvc::cuda::workspace& ws) {
  using kvc::half;
  std::vector<std::int32_t> lens(static_cast<std::size_t>(B));
  for (auto& n : lens) n = g.coin(0.1) ? 0 : g.integer(1, 2500);
  const std::int32_t max_blocks = (*std::max_element(lens.begin(), lens.end()) + P - 1) / P + 1;
  const std::int32_t nblocks = B * max_blocks + 3;
  const std::size_t blk = static_cast<std::size_t>(P) * hkv * D;
  std::vector<half> kc(nblocks * blk), vc(nblocks * blk);
  for (auto& x : kc) x = half(g.normal());
  for (auto& x : vc) x = half(g.normal());
  // Block ids: a random permutation, so tables jump around the pool.
  std::vector<std::int32_t> perm(static_cast<std::size_t>(nblocks));
  for (std::int32_t i = 0; i < nblocks; ++i) perm[i] = i;
  for (std::int32_t i = nblocks - 1; i > 0; --i) std::swap(perm[i], perm[g.integer(0, i)]);
  std::vector<std::int32_t> bt(static_cast<std::size_t>(B) * max_blocks);
  for (std::size_t i = 0; i < bt.size(); ++i) bt[i] = perm[i];
  auto dk = to_device(kc);
  auto dv = to_device(vc);
  auto dbt = to_device(bt);
  const std::int32_t rows = B * hkv * G;
  const auto q = g.normals(static_cast<std::size_t>(rows) * D);
  auto dq = to_device(q);
  dev_out d(rows, B * hkv, D, 2600);
  auto opt = d.options(g.coin() ? 0 : 97, true, &ws);
  kvc::cuda::decode_attention_vllm<Order>(dk.data(), dv.data(), dbt.data(), max_blocks, lens, P, hkv, D, dq.data(),
                                          rows / B, d.out.data(), opt);
  const host_ref r = reference_batch(
      [&](std::int32_t b) {
        return kvc::make_same_heads(
            kvc::vllm_block_view<Order>(static_cast<const half*>(kc.data()), bt.data() + b * max_blocks, lens[b], P, hkv, D),
            kvc::vllm_block_view<Order>(static_cast<const half*>(vc.data()), bt.data() + b * max_blocks, lens[b], P, hkv, D));
      },
      B, hkv, G, D, q, 2600, true);
  std::vector<std::int32_t> slen(static_cast<std::size_t>(B) * hkv);
  for (std::int32_t s = 0; s < B * hkv; ++s) slen[s] = lens[s / hkv];
  const std::vector<double> vmax(slen.size(), 6.0);  // normals: |v| < 6 with overwhelming probability
  compare(d, r, slen, vmax, G, true, Order == kvc::page_order::nhd ? "vllm NHD" : "vllm HND");

  // FlashInfer: the same data as one combined pool [blocks][2][P][H][D] with CSR tables.
  std::vector<half> pool(nblocks * 2 * blk);
  for (std::int32_t b = 0; b < nblocks; ++b) {
    std::copy(kc.begin() + b * blk, kc.begin() + (b + 1) * blk, pool.begin() + 2 * b * blk);
    std::copy(vc.begin() + b * blk, vc.begin() + (b + 1) * blk, pool.begin() + (2 * b + 1) * blk);
  }
  std::vector<std::int32_t> indptr{0}, indices, last;
  for (std::int32_t b = 0; b < B; ++b) {
    const std::int32_t np = (lens[b] + P - 1) / P;
    for (std::int32_t i = 0; i < np; ++i) indices.push_back(bt[b * max_blocks + i]);
    indptr.push_back(static_cast<std::int32_t>(indices.size()));
    last.push_back(np ? lens[b] - (np - 1) * P : 0);
  }
  if (indices.empty()) indices.push_back(0);
  auto dpool = to_device(pool);
  auto dind = to_device(indices);
  dev_out d2(rows, B * hkv, D, 2600);
  kvc::cuda::decode_attention_flashinfer<Order>(dpool.data(), indptr, dind.data(), last, P, hkv, D,
                                                static_cast<std::int64_t>(2 * blk), static_cast<std::int64_t>(blk),
                                                dq.data(), rows / B, d2.out.data(), d2.options(0, true, &ws));
  compare(d2, r, slen, vmax, G, true, "flashinfer combined");
}

/// Device views picked by their accessor: kvc::decode_attention on same_heads of device vLLM views.
void test_dispatch(kvc_test::rng& g, kvc::cuda::workspace& ws) {
  using kvc::half;
  const std::int32_t D = 128, P = 16, hkv = 2, G = 4, n = 777;
  const std::int32_t np = (n + P - 1) / P;
  const std::size_t blk = static_cast<std::size_t>(P) * hkv * D;
  std::vector<half> kc(np * blk), vc(np * blk);
  for (auto& x : kc) x = half(g.normal());
  for (auto& x : vc) x = half(g.normal());
  std::vector<std::int32_t> table(static_cast<std::size_t>(np));
  for (std::int32_t i = 0; i < np; ++i) table[i] = np - 1 - i;
  auto dk = to_device(kc);
  auto dv = to_device(vc);
  auto dt = to_device(table);
  using A = kvc::device_accessor<kvc::default_accessor<const half>>;
  using V = kvc::kv_view<const half, kvc::kv_dextents<>, kvc::layout_paged<kvc::page_order::nhd>, A>;
  using M = V::mapping_type;
  const V k(dk.data(), M(kvc::kv_dextents<>(n, hkv, D), dt.data(), P));
  const V v(dv.data(), M(kvc::kv_dextents<>(n, hkv, D), dt.data(), P));
  const auto q = g.normals(static_cast<std::size_t>(hkv) * G * D);
  auto dq = to_device(q);
  dev_out d(hkv * G, hkv, D, n);
  kvc::decode_attention(kvc::make_same_heads(k, v), dq.data(), hkv * G, d.out.data(), d.options(0, false, &ws));
  const host_ref r = reference_batch(
      [&](std::int32_t) {
        return kvc::make_same_heads(kvc::vllm_block_view(static_cast<const half*>(kc.data()), table.data(), n, P, hkv, D),
                                    kvc::vllm_block_view(static_cast<const half*>(vc.data()), table.data(), n, P, hkv, D));
      },
      1, hkv, G, D, q, n, false);
  compare(d, r, std::vector<std::int32_t>(hkv, n), std::vector<double>(hkv, 6.0), G, false, "dispatch device views");
}

}  // namespace

int main() {
  if (!require_device("test_cuda_decode")) return skip_code;
  kvc_test::rng g(6001);
  kvc::cuda::workspace ws;
  for (std::int32_t D : {64, 128, 256})
    for (std::int32_t P : {1, 16, 64})
      for (std::int32_t G : {1, 2, 4, 8, 12}) {
        const std::int32_t hkv = g.integer(1, 4), B = g.integer(1, 5);
        const std::int32_t split = g.coin() ? 0 : g.integer(1, 300);
        test_store<kvc::half>(g, D, P, hkv, G, B, P == 1 ? 300 : 3000, split, g.coin(0.7), ws);
      }
  for (std::int32_t D : {64, 128, 256}) {
    test_store<float>(g, D, 16, 2, 4, 3, 2000, 0, true, ws);
    test_store<kvc::bfloat16>(g, D, 16, 2, 8, 3, 2000, 123, true, ws);
    // Batch 1 and one long stream: the automatic plan splits it across the SMs.
    test_store<kvc::half>(g, D, 16, 1, 8, 1, 40000, 0, true, ws);
  }
  for (std::int32_t D : {64, 128, 256}) {
    test_engines<kvc::page_order::nhd>(g, D, 16, 2, 4, 4, ws);
    test_engines<kvc::page_order::hnd>(g, D, 32, 3, 2, 3, ws);
  }
  test_dispatch(g, ws);
  return finish("test_cuda_decode");
}
