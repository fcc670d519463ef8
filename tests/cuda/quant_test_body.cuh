// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// Body of the quantized GPU tests: a host kvc::quant_cache<KQ, VQ> filled with random tokens
/// (ragged heads, a batch of sequences, optional sinks and pre-RoPE keys), mirrored on the device,
/// and kvc::cuda::decode_attention_quant compared with kvc::cpu::decode_attention on the same
/// cache (the CPU quantized kernel decodes the same codes).
///
/// Tolerance: both sides decode identical codes to float (up to the fused multiply-add of
/// s * c + z, 1 ulp) and attend in float, so the CPU kernel's own test tolerance applies:
/// |out - cpu| <= 5e-5 * max|V^| and |lse - cpu| <= 5e-5 * max(1, |lse|). Pre-RoPE keys add the
/// device's float sincos of a double-reduced angle (~1e-7 relative on keys): same bound.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <kvc/cpu/quant_attention.hpp>
#include <kvc/cuda.cuh>
#include <kvc/store/quant_cache.hpp>

#include "cuda_test_util.cuh"

namespace kvc_gpu_test {

template <class KQ, class VQ>
void test_quant(kvc_test::rng& g, const char* name, std::int32_t D, std::int32_t P, std::int32_t hkv, std::int32_t G,
                std::int32_t B, std::int32_t sinks, bool pre_rope, std::int32_t split, kvc::cuda::workspace& ws) {
  kvc::quant_cache_config cfg;
  cfg.num_layers = 1;
  cfg.num_kv_heads = hkv;
  cfg.head_dim = D;
  cfg.page_size = P;
  cfg.max_pages = 1 << 14;
  cfg.sink_tokens = sinks;
  cfg.pre_rope = pre_rope;
  cfg.rope.head_dim = D;
  kvc::quant_cache<KQ, VQ> c(cfg);
  std::vector<kvc::seq_id> seqs;
  for (std::int32_t b = 0; b < B; ++b) {
    seqs.push_back(c.add_sequence());
    const std::int32_t n = g.coin(0.1) ? g.integer(0, 1) : g.integer(2, 3000);
    const auto k = g.normals(static_cast<std::size_t>(n) * hkv * D), v = g.normals(static_cast<std::size_t>(n) * hkv * D);
    // Two appends: a prefill and a few decode tokens, so residual windows are partly full.
    const std::int32_t n1 = n > 5 ? n - g.integer(1, 5) : n;
    c.append(seqs.back(), 0, k.data(), v.data(), n1);
    if (n > n1)
      c.append(seqs.back(), 0, k.data() + static_cast<std::size_t>(n1) * hkv * D,
               v.data() + static_cast<std::size_t>(n1) * hkv * D, n - n1);
  }
  kvc::cuda::device_quant_layer<KQ, VQ, kvc::half> dl(c, seqs, 0);
  const std::int32_t S = B * hkv, rows = S * G, hq = hkv * G;
  const auto q = g.normals(static_cast<std::size_t>(rows) * D);
  auto dq = to_device(q);
  auto dout = poisoned(static_cast<std::size_t>(rows) * D);
  auto dlse = poisoned(static_cast<std::size_t>(rows));
  kvc::cuda::device_decode_options o;
  o.lse = dlse.data();
  o.split_tokens = split;
  o.ws = &ws;
  kvc::cuda::decode_attention_quant(dl.desc(), dq.data(), hq, dout.data(), o);
  KVC_CUDA_CHECK(cudaDeviceSynchronize());
  const auto out = dout.download(static_cast<std::size_t>(rows) * D);
  const auto lse = dlse.download(static_cast<std::size_t>(rows));
  std::vector<float> ref(static_cast<std::size_t>(hq) * D), rl(static_cast<std::size_t>(hq));
  for (std::int32_t b = 0; b < B; ++b) {
    kvc::decode_options co;
    co.lse = rl.data();
    // The CPU kernel refuses a layer with no token in any head (nothing to attend to); the device
    // kernel, serving a whole batch, writes such a stream's empty-attention result instead: output
    // 0 and lse -inf, as kvc::reference does.
    bool any = false;
    for (std::int32_t h = 0; h < hkv; ++h) any = any || c.length(seqs[b], 0, h) > 0;
    if (any) {
      kvc::cpu::decode_attention(c, seqs[b], 0, q.data() + static_cast<std::size_t>(b) * hq * D, hq, ref.data(), co);
    } else {
      std::fill(ref.begin(), ref.end(), 0.0f);
      std::fill(rl.begin(), rl.end(), -INFINITY);
    }
    for (std::int32_t h = 0; h < hkv; ++h) {
      const std::int32_t n = c.length(seqs[b], 0, h);
      std::vector<float> vv(static_cast<std::size_t>(std::max(n, 1)) * D);
      c.gather(seqs[b], 0, h, nullptr, vv.data());
      double vmax = 1e-30;
      for (std::int32_t i = 0; i < n * D; ++i) vmax = std::max(vmax, std::fabs(double(vv[i])));
      for (std::int32_t gg = 0; gg < G; ++gg) {
        const std::int32_t qh = h * G + gg;
        const std::size_t row = static_cast<std::size_t>(b) * hq + qh;
        for (std::int32_t d = 0; d < D; ++d)
          GPU_CHECK(close(out[row * D + d], ref[static_cast<std::size_t>(qh) * D + d], 5e-5 * vmax),
                    "%s D=%d P=%d G=%d sinks=%d pre_rope=%d: out seq %d qh %d d %d: got %g want %g (n = %d)", name, D, P,
                    G, sinks, int(pre_rope), b, qh, d, out[row * D + d], ref[static_cast<std::size_t>(qh) * D + d], n);
        const float want = rl[qh];
        GPU_CHECK(want == -INFINITY ? lse[row] == -INFINITY : close(lse[row], want, 5e-5 * std::max(1.0, std::fabs(double(want)))),
                  "%s D=%d: lse seq %d qh %d: got %g want %g", name, D, b, qh, lse[row], want);
      }
    }
  }
}

/// The sweep every codec runs: head dims, page sizes (multiples of the codec's unit), GQA, sinks,
/// pre-RoPE keys, forced and automatic splits.
template <class KQ, class VQ>
void sweep(kvc_test::rng& g, const char* name, kvc::cuda::workspace& ws, std::int32_t min_page = 16) {
  for (std::int32_t D : {64, 128, 256})
    for (std::int32_t P : {min_page, 64})
      for (std::int32_t G : {1, 4, 8, 12}) {
        const std::int32_t sinks = g.coin(0.3) ? 4 : 0;
        const bool pre_rope = g.coin(0.3);
        test_quant<KQ, VQ>(g, name, D, P, g.integer(1, 3), G, g.integer(1, 4), sinks, pre_rope,
                           g.coin() ? 0 : g.integer(1, 400), ws);
      }
}

}  // namespace kvc_gpu_test
