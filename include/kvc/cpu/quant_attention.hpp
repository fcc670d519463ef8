// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// CPU decode attention over a kvc::quant_cache, with dequantization fused into the kernel. With
/// AVX2+FMA+F16C, per-token integer codecs (intn, KIVI values), KIVI keys and FP8 are read as codes
/// (quant_kernels.hpp: scores s (q . c) + z sum(q), values sum (p s) c + sum p z, for G <= 4 query
/// heads per kv head, at the float width of the build: head_dim a multiple of 16 with AVX2, of 32
/// with AVX-512); other codecs, pre-RoPE keys and larger groups
/// decode a tile (64 tokens) at a time into L1-resident scratch, so full precision K/V never exists
/// for more than one tile. quant_attention_options::int8_query scores per-token integer keys with
/// integer dot products (approximate, bounded in the tests). Same semantics as kvc::cpu::decode_attention
/// (kvc::decode_options: scale, pool + split-K with an exact merge, lse, probs, group_probs; GQA,
/// where the query heads of a group read each K/V page once).
///
/// Codecs that rotate (rotated<Q>) get the query rotated once and the output rotated back; pre-RoPE
/// keys are rotated to their positions per tile. Integer codes are unpacked with AVX2 when the
/// compiler targets it (codec.hpp), then consumed by register-blocked FMA loops (quant_kernels.hpp).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <new>
#include <memory>
#include <type_traits>
#include <vector>

#include <kvc/attention/options.hpp>
#include <kvc/cpu/quant_int_kernels.hpp>
#include <kvc/cpu/quant_kernels.hpp>
#include <kvc/cpu/simd.hpp>
#include <kvc/cpu/softmax_merge.hpp>
#include <kvc/error.hpp>
#include <kvc/parallel/thread_pool.hpp>
#include <kvc/store/quant_cache.hpp>
#include <kvc/view/heads.hpp>

KVC_BEGIN_NAMESPACE
namespace cpu {
KVC_BEGIN_ISA_NAMESPACE  // compiled per ISA: docs/isa.md

/// Options of the quantized kernels beyond kvc::decode_options.
struct quant_attention_options {
  /// Per-token integer keys (intn<2|4|8>, whole-head scale) are scored with integer dot products
  /// against a query quantized once per call (int8 for 2/4-bit keys, int16 for 8-bit keys). Not
  /// exact: the query's rounding (|q - q^| <= max|q| / 254 per element for int8) adds to the
  /// score error; test_quant_attention bounds the output against the dense reference. Off: exact
  /// float math on the codes (within float rounding of "dequantize, then reference").
  bool int8_query = false;
  /// Per-token integer values (intn<2|4|8>, whole-head scale; head_dim * bits a multiple of 256)
  /// are accumulated in integers: per 64-token tile and query head, probability x value scale is
  /// rounded to 8 bits (7 for 8-bit values) relative to the tile's largest, and multiplied with
  /// the codes by _mm256_maddubs_epi16 (quant_int_kernels.hpp). Not exact: each output element
  /// moves by at most sum_t (f/2) |c_t - centre| / sum_t p_t with f = the tile's largest weight / 255
  /// (127 for 8-bit values); test_quant_attention bounds it against the dense reference. Needs
  /// AVX2; elsewhere, and for other codecs, the exact path runs.
  bool int8_probs = false;

  /// Both approximations: the fastest quantized decode (what bench_quant's "+iq+ip" runs).
  static quant_attention_options fast() noexcept { return {true, true}; }
};

namespace qdetail {

/// The key and value records of the n quantized tokens from stream position t (one page), as
/// ranges to prefetch (prefetch_slices) while the current tile is computed: without a prefetch
/// the first read of each record's scale stalled on memory (perf, int2 32x8x128 ctx:32768: 10% of
/// attend_int on one vcvtph2ps; int8, exact path: 28% of fused_scores).
struct tile_prefetch {
  prefetch_slices k, v;
  /// Slice i of both ranges.
  KVC_FORCEINLINE void operator()(std::int32_t i) const noexcept {
    k(i);
    v(i);
  }
};
template <class KQ, class VQ, class SV>
KVC_FORCEINLINE tile_prefetch next_tile_records(const KQ& kq, const VQ& vq, const SV& sv, std::int32_t P, std::int32_t t,
                                                std::int32_t n, std::int32_t D, std::int32_t slices) noexcept {
  using quant::role;
  const std::int32_t j0 = t - sv.n_sink, js = j0 % P;
  const std::byte* np = sv.quant_base + static_cast<std::size_t>(sv.pages[j0 / P]) * sv.page_bytes;
  const std::size_t rbk = kq.record_bytes(role::key, D), rbv = vq.record_bytes(role::value, D);
  const std::int32_t uk = KQ::tokens_per_record(role::key);
  const std::size_t kb0 = rbk * static_cast<std::size_t>(js / uk), kb1 = rbk * static_cast<std::size_t>((js + n + uk - 1) / uk);
  return {prefetch_slices(np + kb0, kb1 - kb0, slices),
          prefetch_slices(np + sv.v_offset + rbv * static_cast<std::size_t>(js), rbv * static_cast<std::size_t>(n), slices)};
}

/// The codec half of the decode-then-attend path: the K rows (when need_k: no fused kernel scored
/// them) and V rows (when need_v) of tokens [t, t + tn) of one region, decoded into kb and vb in
/// the domain the scores and the accumulator use. Out of line and free of G on purpose: it runs
/// once per 64-token tile, and inlined into attend_tiles (instantiated for every cache type x
/// G = 1..8) it made attend_tiles 29% of the code of test_quant_attention's ASan build with
/// -mavx2 (5.4 of 18.6 MB) and 24% of the -mavx2 -O3 registration TU's (GCC 12, nm, 2026-12-05).
template <class Cache>
KVC_NOINLINE void decode_tile(const Cache& c, const typename Cache::stream_view& sv, std::int32_t t, std::int32_t tn,
                              bool quantized, bool need_k, bool need_v, const tile_prefetch& nx, std::int32_t D,
                              float* kb, float* vb, float* tmp) {
  using quant::role;
  const auto& kq = c.key_quantizer();
  const auto& vq = c.value_quantizer();
  const rope* rp = c.pre_rope();
  if (quantized) {
    const std::int32_t P = c.config().page_size;
    const std::int32_t i0 = t - sv.n_sink, slot0 = i0 % P;
    const std::byte* page = sv.quant_base + static_cast<std::size_t>(sv.pages[i0 / P]) * sv.page_bytes;
    if (need_k) {
      nx.k.all();
      quant::decode_rows<role::key>(kq, page, D, slot0, slot0 + tn, kb, tmp);
      if (rp) {
        for (std::int32_t i = 0; i < tn; ++i) kq.to_model(kb + static_cast<std::size_t>(i) * D, D);
        rp->apply_rows(kb, tn, static_cast<std::size_t>(D), sv.positions + t);
      }
    }
    if (need_v) {
      nx.v.all();
      quant::decode_rows<role::value>(vq, page + sv.v_offset, D, slot0, slot0 + tn, vb, tmp);
    }
    return;
  }
  const bool sink = t < sv.n_sink;
  const auto* ksrc = sink ? sv.sink_k + static_cast<std::size_t>(t) * D
                          : sv.res_k + static_cast<std::size_t>(t - sv.n_sink - sv.n_quant) * D;
  const auto* vsrc = sink ? sv.sink_v + static_cast<std::size_t>(t) * D
                          : sv.res_v + static_cast<std::size_t>(t - sv.n_sink - sv.n_quant) * D;
  for (std::size_t j = 0; j < static_cast<std::size_t>(tn) * D; ++j) {
    kb[j] = static_cast<float>(ksrc[j]);
    vb[j] = static_cast<float>(vsrc[j]);
  }
  if (rp) rp->apply_rows(kb, tn, static_cast<std::size_t>(D), sv.positions + t);
  if constexpr (std::decay_t<decltype(vq)>::rotates)
    for (std::int32_t i = 0; i < tn; ++i) vq.to_stored(vb + static_cast<std::size_t>(i) * D, D);
}

/// Merged tokens (kvc/store/merged_cache.hpp over a quant_cache): each logit of the tile raised
/// by its token's log-weight lw[i], so a token standing for m gets their mass. One add per score.
template <std::int32_t G>
inline void add_log_weights(float* s, std::int32_t stride, const float* lw, std::int32_t tn) noexcept {
  for (std::int32_t g = 0; g < G; ++g)
    for (std::int32_t i = 0; i < tn; ++i) s[g * stride + i] += lw[i];
}

/// The G half, free of the codec: scores of tn decoded key rows (when score: no fused kernel wrote
/// them) and the online-softmax update, which leaves the tile's weights in s. Out of line for the
/// reason decode_tile is.
template <class Arch, std::int32_t G>
KVC_NOINLINE void tile_softmax(const float* q, const float* kb, bool score, std::int32_t tn, std::int32_t D, float* s,
                               std::int32_t stride, partial& st, float* raw, std::int32_t raw_stride, std::int32_t t,
                               const float* lw) {
  if (score)
    for (std::int32_t i = 0; i < tn; ++i) dot_rows<Arch, G>(q, kb + static_cast<std::size_t>(i) * D, D, s + i, stride);
  if (lw) add_log_weights<G>(s, stride, lw + t, tn);
  softmax_update<Arch, G>(s, stride, tn, D, st, raw, raw_stride, t);
}

/// The G half of the values: acc += the tile's weights times tn decoded value rows.
template <class Arch, std::int32_t G>
KVC_NOINLINE void tile_values(const float* p, std::int32_t stride, const float* vb, std::int32_t tn, std::int32_t D,
                              float* acc) {
  accumulate_rows<Arch, G>(p, stride, vb, tn, D, acc);
}

/// Generic tile path: decode K and V rows of [t0, t1) and attend. q_model: scaled queries in the
/// model domain; q_stored: rotated into the key codec's stored domain (same pointer when the codec
/// does not rotate). The accumulator is in the value codec's stored domain.
template <class Arch, std::int32_t G, class Cache>
void attend_tiles(const Cache& c, const typename Cache::stream_view& sv, std::int32_t t0, std::int32_t t1,
                  const float* q_model, const float* q_stored, std::int32_t D, partial& st, float* raw,
                  std::int32_t raw_stride, scratch& sc, bool int8_query, const float* lw) {
  using quant::role;
  const auto& kq = c.key_quantizer();
  const auto& vq = c.value_quantizer();
  const std::int32_t P = c.config().page_size;
  const rope* rp = c.pre_rope();
  const std::int32_t TT = static_cast<std::int32_t>(sc.s.size()) / max_group;
  using KQ = std::decay_t<decltype(kq)>;
  using VQ = std::decay_t<decltype(vq)>;
  const bool fused_k = fused_ok<Arch, KQ, role::key, G>(D);
  const bool fused_v = fused_ok<Arch, VQ, role::value, G>(D);
  const bool int_k = int8_query && intdot_ok<KQ, G>(D) && !rp;
  // KIVI key records (whole groups of tokens) are prefetched by slices of the value pass: by
  // slices of the score pass kivi2 ran at 0.88x, in one burst kivi4 at 0.95x of this
  // (BM_quant_paired 32x8x128 ctx:32768 one thread, 2026-12)
  const bool k_in_values = fused_codec<KQ, role::key>::kind == 2 && !rp && fused_k && fused_v;
  std::unique_ptr<int_query> iq;
  if constexpr (intdot_possible<KQ, G>) {
    if (int_k) {
      iq = std::make_unique<int_query>();
      quantize_query<fused_codec<KQ, role::key>::bits>(q_stored, G, D, *iq);
    }
  }
  std::int32_t t = t0;
  while (t < t1) {
    // one tile inside one region (and one page for quantized tokens)
    std::int32_t e;
    bool quantized = false;
    if (t < sv.n_sink) {
      e = std::min(t1, sv.n_sink);
    } else if (t < sv.n_sink + sv.n_quant) {
      const std::int32_t i = t - sv.n_sink;
      e = std::min({t1, sv.n_sink + sv.n_quant, sv.n_sink + (i / TT + 1) * TT, sv.n_sink + (i / P + 1) * P});
      quantized = true;
    } else {
      e = t1;
    }
    e = std::min(e, t + TT);
    const std::int32_t tn = e - t;
    // The next quantized tile's records: a slice per token inside the fused kernels, in one
    // burst before the decode-then-attend ones.
    const std::int32_t pf_n = quantized && e < std::min(t1, sv.n_sink + sv.n_quant)
                                  ? std::min({std::min(t1, sv.n_sink + sv.n_quant) - e, TT, P - (e - sv.n_sink) % P})
                                  : 0;
    const tile_prefetch nx = pf_n > 0 ? next_tile_records(kq, vq, sv, P, e, pf_n, D, tn) : tile_prefetch{};
    float* kb = sc.k.data();
    float* vb = sc.v.data();
    float* s = sc.s.data();
    bool k_done = false, v_fused = false;
    const std::byte* vpart = nullptr;
    std::int32_t vslot0 = 0;
    if (quantized) {
      const std::int32_t i0 = t - sv.n_sink, slot0 = i0 % P;
      const std::byte* page = sv.quant_base + static_cast<std::size_t>(sv.pages[i0 / P]) * sv.page_bytes;
      // `if constexpr`: a kernel that cannot run for this codec, G and Arch is not instantiated.
      if constexpr (intdot_possible<KQ, G>) {
        if (int_k) {
          nx.k.all();
          intdot_scores<G>(kq, page, D, slot0, tn, *iq, s, TT, sc);
          k_done = true;
        }
      }
      if constexpr (fused_possible<Arch, KQ, role::key, G>) {
        if (!k_done && !rp && fused_k) {
          fused_scores<Arch, G>(kq, page, D, slot0, tn, q_stored, s, TT, sc, k_in_values ? prefetch_slices{} : nx.k);
          k_done = true;
        }
      }
      if (fused_v) {
        v_fused = true;
        vpart = page + sv.v_offset;
        vslot0 = slot0;
      }
    }
    if (!k_done || !v_fused) decode_tile(c, sv, t, tn, quantized, !k_done, !v_fused, nx, D, kb, vb, sc.tmp.data());
    tile_softmax<Arch, G>(quantized && !rp ? q_stored : q_model, kb, !k_done, tn, D, s, TT, st, raw, raw_stride, t, lw);
    if constexpr (fused_possible<Arch, VQ, role::value, G>) {
      if (v_fused) fused_values<Arch, G>(vq, vpart, D, vslot0, tn, s, TT, st.acc, sc, nx.v, k_in_values ? nx.k : prefetch_slices{});
      else tile_values<Arch, G>(s, TT, vb, tn, D, st.acc);
    } else {
      (void)v_fused, (void)vpart, (void)vslot0;
      tile_values<Arch, G>(s, TT, vb, tn, D, st.acc);
    }
    t = e;
  }
}

#if KVC_QUANT_AVX2
/// Quantized tokens [a, b) with integer value accumulation (quant_attention_options::int8_probs)
/// and keys scored by integer dots (iq non-null) or the exact fused kernel; the range gets its
/// own softmax state, merged exactly into st at the end.
template <class Arch, std::int32_t G, class Cache>
void attend_int(const Cache& c, const typename Cache::stream_view& sv, std::int32_t a, std::int32_t b,
                const float* q_stored, std::int32_t D, partial& st, float* raw, std::int32_t raw_stride, scratch& sc,
                const int_query* iq, const float* lw) {
  using quant::role;
  const auto& kq = c.key_quantizer();
  const auto& vq = c.value_quantizer();
  using VQ = std::decay_t<decltype(vq)>;
  using FV = fused_codec<VQ, role::value>;
  using VI = typename FV::impl;
  constexpr int VB = FV::bits;
  const std::int32_t P = c.config().page_size;
  const std::int32_t TT = tile_tokens;
  const std::size_t rbv = vq.record_bytes(role::value, D), rbk = kq.record_bytes(role::key, D);
  std::vector<float> accp(static_cast<std::size_t>(G) * D, 0.0f), vs(TT + 8, 0.0f), vz(TT + 8, 0.0f);
  KVC_ASSERT(sc.s.size() >= static_cast<std::size_t>(max_group) * TT && sc.ks.size() >= static_cast<std::size_t>(TT));
  std::vector<std::int32_t> perm(static_cast<std::size_t>(D));
  std::vector<std::uint8_t> wq(static_cast<std::size_t>(G) * (TT + 8));
  std::vector<const std::uint8_t*> vrows(static_cast<std::size_t>(TT) + 4);
  int_value_perm<VB>(D, perm.data());
  struct free_aligned {
    void operator()(void* p) const noexcept { std::free(p); }
  };
  const std::size_t cbytes = int_value_buf_bytes(D, TT);
  std::unique_ptr<void, free_aligned> cbuf(std::aligned_alloc(32, cbytes));
  if (!cbuf) throw std::bad_alloc();
  float m[G], l[G], bias[G], f[G];
  alignas(32) float dots[max_group * (tile_tokens + 8)];
  using KQ = std::decay_t<decltype(kq)>;
  for (std::int32_t g = 0; g < G; ++g) m[g] = -INFINITY, l[g] = 0.0f, bias[g] = 0.0f;
  float* s = sc.s.data();
  const std::int32_t sst = static_cast<std::int32_t>(sc.s.size()) / max_group;
  for (std::int32_t t = a; t < b;) {
    const std::int32_t i0 = t - sv.n_sink, slot0 = i0 % P;
    const std::int32_t e = std::min({b, t + TT, t + P - slot0});
    const std::int32_t tn = e - t;
    const std::byte* page = sv.quant_base + static_cast<std::size_t>(sv.pages[i0 / P]) * sv.page_bytes;
    // The next tile's records in four slices between the stages of this one. In one burst at the
    // tile's start the prefetches stalled on full fill buffers and the value scale gather then
    // waited on memory (perf: a gather at 17% of attend_int); sliced, BM_quant_paired 32x8x128
    // ctx:32768 one thread, AMD EPYC AVX-512 build, 2026-12: int8+iq+ip 0.94 -> 1.49x fp16,
    // int4+iq+ip 1.58 -> 2.02x, int2+iq+ip 2.17 -> 2.37x (bench/results/quant.md).
    const tile_prefetch nx = e < b ? next_tile_records(kq, vq, sv, P, e, std::min({b - e, TT, P - (e - sv.n_sink) % P}), D, 4)
                                   : tile_prefetch{};
    nx(0);
    if constexpr (fused_codec<KQ, role::key>::kind == 1) {
      if (iq) {
        using FK = fused_codec<KQ, role::key>;
        int_scores<FK::bits, G, FK::sch, FK::impl::has_zero>(page + rbk * static_cast<std::size_t>(slot0), rbk,
                                                             FK::impl::code_bytes(D), tn, *iq, D, s, sst,
                                                             sc.ks.data(), sc.kz.data(), dots);
      }
    }
    if constexpr (fused_possible<Arch, KQ, role::key, G>) {
      if (!iq) fused_scores<Arch, G>(kq, page, D, slot0, tn, q_stored, s, sst, sc);
    } else {
      KVC_ASSERT(iq);  // attend_generic: integer keys or the fused kernel
    }
    nx(1);
    const std::byte* vpart = page + sv.v_offset + rbv * static_cast<std::size_t>(slot0);
    for (std::int32_t i = 0; i < tn; ++i)
      vrows[static_cast<std::size_t>(i)] = reinterpret_cast<const std::uint8_t*>(vpart + rbv * static_cast<std::size_t>(i));
    float* vsp = vs.data();
    float* vzp = vz.data();
    if constexpr (VI::has_zero) gather_half_pairs(vpart, rbv, VI::code_bytes(D), tn, vsp, vzp);
    else gather_half_pairs(vpart, rbv, VI::code_bytes(D) - 2, tn, vzp, vsp);
    {
      // effective zero of the centred codes: affine_zero + scale * centre (symmetric codes have no
      // stored zero: affine_zero = -2^(b-1) scale)
      const __m256 zc = _mm256_set1_ps(static_cast<float>(value_centre<VB>) -
                                       (VI::has_zero ? 0.0f : static_cast<float>(1 << (VB - 1))));
      for (std::int32_t i = 0; i < tn; i += 8) {
        const __m256 sv8 = _mm256_loadu_ps(vsp + i);
        const __m256 z8 = VI::has_zero ? _mm256_loadu_ps(vzp + i) : _mm256_setzero_ps();
        _mm256_storeu_ps(vzp + i, _mm256_fmadd_ps(sv8, zc, z8));
      }
      for (std::int32_t i = tn; i < (tn + 7) / 8 * 8; ++i) vsp[i] = vzp[i] = 0.0f;
    }
    const std::int32_t tn4 = (tn + 3) / 4 * 4;
    for (std::int32_t i = tn; i < tn4; ++i) vrows[static_cast<std::size_t>(i)] = vrows[0];
    const std::int32_t tn8 = (tn + 7) / 8 * 8;
    nx(2);
    if (lw) add_log_weights<G>(s, sst, lw + t, tn);
    for (std::int32_t g = 0; g < G; ++g) {
      float* sg = s + g * sst;
      if (raw) std::copy(sg, sg + tn, raw + static_cast<std::size_t>(g) * raw_stride + t);
      for (std::int32_t i = tn; i < tn8; ++i) sg[i] = -INFINITY;  // padding lanes: exp -> 0
      __m256 mv = _mm256_set1_ps(-INFINITY);
      for (std::int32_t i = 0; i < tn8; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(sg + i));
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, mv);
      float mt = lanes[0];
      for (int j = 1; j < 8; ++j) mt = std::max(mt, lanes[j]);
      if (mt > m[g]) {
        const float corr = std::exp(m[g] - mt);  // 0 on the first tile
        l[g] *= corr;
        bias[g] *= corr;
        float* ap = accp.data() + static_cast<std::size_t>(g) * D;
        for (std::int32_t d = 0; d < D; ++d) ap[d] *= corr;
        m[g] = mt;
      }
      const __m256 mm = _mm256_set1_ps(m[g]);
      __m256 ls = _mm256_setzero_ps(), bs = _mm256_setzero_ps();
      for (std::int32_t i = 0; i < tn8; i += 8) {
        const __m256 p8 = exp_nonpos(_mm256_sub_ps(_mm256_loadu_ps(sg + i), mm));
        _mm256_storeu_ps(sg + i, p8);
        ls = _mm256_add_ps(ls, p8);
        bs = _mm256_fmadd_ps(p8, _mm256_loadu_ps(vzp + i), bs);
      }
      _mm256_store_ps(lanes, ls);
      for (float x : lanes) l[g] += x;
      _mm256_store_ps(lanes, bs);
      for (float x : lanes) bias[g] += x;
    }
    nx(3);
    quantize_weights<VB, G>(s, sst, vs.data(), tn, wq.data(), TT + 8, f);
    int_values<VB, G>(vrows.data(), tn4 / 4, wq.data(), TT + 8, f, D, accp.data(), static_cast<__m256i*>(cbuf.get()));
    t = e;
  }
  // exact merge of the range's state into st
  for (std::int32_t g = 0; g < G; ++g) {
    if (m[g] == -INFINITY) continue;
    const float M = std::max(st.m[g], m[g]);
    const float wa = std::exp(st.m[g] - M), wb = std::exp(m[g] - M);
    float* o = st.acc + static_cast<std::size_t>(g) * D;
    const float* ap = accp.data() + static_cast<std::size_t>(g) * D;
    for (std::int32_t d = 0; d < D; ++d) o[d] *= wa;
    for (std::int32_t i = 0; i < D; ++i) o[perm[static_cast<std::size_t>(i)]] += wb * (ap[i] + bias[g]);
    st.l[g] = st.l[g] * wa + l[g] * wb;
    st.m[g] = M;
  }
}
#endif

/// Tokens [t0, t1) of one stream: the quantized part through attend_int when int8_probs asks for
/// it and the codecs allow it, everything else through attend_tiles.
template <class Arch, std::int32_t G, class Cache>
void attend_generic(const Cache& c, const typename Cache::stream_view& sv, std::int32_t t0, std::int32_t t1,
                    const float* q_model, const float* q_stored, std::int32_t D, partial& st, float* raw,
                    std::int32_t raw_stride, scratch& sc, const quant_attention_options& qo, const float* lw) {
#if KVC_QUANT_AVX2
  using KQ = std::decay_t<decltype(c.key_quantizer())>;
  using VQ = std::decay_t<decltype(c.value_quantizer())>;
  // G <= 4 at compile time too: attend_int is not instantiated for groups it never runs.
  constexpr bool can_int = (intdot_possible<KQ, G> || fused_possible<Arch, KQ, quant::role::key, G>) &&
                          fused_codec<VQ, quant::role::value>::kind == 1 && fused_codec<VQ, quant::role::value>::group == 0;
  if constexpr (can_int) {
  const std::int32_t qa = std::max(t0, sv.n_sink), qb = std::min(t1, sv.n_sink + sv.n_quant);
  const bool kfast = intdot_ok<KQ, G>(D) || fused_ok<Arch, KQ, quant::role::key, G>(D);
  if (qo.int8_probs && qa < qb && !c.pre_rope() && G <= 4 && intval_ok<VQ>(D) && kfast &&
      static_cast<std::int32_t>(sc.s.size()) / max_group == tile_tokens) {
    if (t0 < qa) attend_tiles<Arch, G>(c, sv, t0, qa, q_model, q_stored, D, st, raw, raw_stride, sc, false, lw);
    std::unique_ptr<int_query> iq;
    if constexpr (intdot_possible<KQ, G>) {
      if (qo.int8_query && intdot_ok<KQ, G>(D)) {
        iq = std::make_unique<int_query>();
        quantize_query<fused_codec<KQ, quant::role::key>::bits>(q_stored, G, D, *iq);
      }
    }
    if (iq || fused_ok<Arch, KQ, quant::role::key, G>(D)) {
      attend_int<Arch, G>(c, sv, qa, qb, q_stored, D, st, raw, raw_stride, sc, iq.get(), lw);
    } else {
      attend_tiles<Arch, G>(c, sv, qa, qb, q_model, q_stored, D, st, raw, raw_stride, sc, false, lw);
    }
    if (qb < t1) attend_tiles<Arch, G>(c, sv, qb, t1, q_model, q_stored, D, st, raw, raw_stride, sc, false, lw);
    return;
  }
  }
#endif
  attend_tiles<Arch, G>(c, sv, t0, t1, q_model, q_stored, D, st, raw, raw_stride, sc, qo.int8_query, lw);
}

/// decode_attention below, each kv head h's logits raised by lw[h][t] when lw is not null.
template <class Arch, class KQ, class VQ, class Fp>
void decode_attention_lw(const quant_cache<KQ, VQ, Fp>& cache, seq_id seq, std::int32_t layer, const float* q,
                         std::int32_t num_q_heads, float* out, const decode_options& opt,
                         const quant_attention_options& qopt, const float* const* lw) {
  using Cache = quant_cache<KQ, VQ, Fp>;
  const std::int32_t hkv = cache.config().num_kv_heads, D = cache.config().head_dim;
  // Checked here, not by cache.view(), so that the message names this call and its argument.
  constexpr const char* who = "kvc::cpu::decode_attention";
  KVC_EXPECTS_IN(who, cache.contains(seq), "seq = ", seq, " is not a live sequence of this cache, expected one of its ",
                 cache.num_sequences(), " live sequence ids (from add_sequence/fork, not removed)");
  KVC_EXPECTS_IN(who, layer >= 0 && layer < cache.config().num_layers, "layer = ", layer, ", expected 0..",
                 cache.config().num_layers - 1);
  KVC_EXPECTS_IN(who, num_q_heads > 0 && num_q_heads % hkv == 0, "num_q_heads = ", num_q_heads,
                 ", expected a positive multiple of num_kv_heads = ", hkv);
  KVC_EXPECTS_IN(who, q != nullptr && out != nullptr, "q or out is null");
  for (std::int32_t i = 0; i < num_q_heads * D; ++i)
    KVC_EXPECTS_IN(who, std::isfinite(q[i]), "q[", i, "] = ", q[i], ", expected a finite query");
  const std::int32_t G = num_q_heads / hkv;
  std::vector<typename Cache::stream_view> views;
  views.reserve(static_cast<std::size_t>(hkv));
  std::int32_t longest = 0;
  std::int64_t total = 0;
  for (std::int32_t h = 0; h < hkv; ++h) {
    views.push_back(cache.view(seq, layer, h));
    longest = std::max(longest, views.back().length());
    total += views.back().length();
  }
  // An empty head (all its tokens evicted) attends to nothing and gives zeros; a layer with no
  // token in any head means this step's K/V were never appended: an error, not zeros.
  KVC_EXPECTS_IN(who, total > 0, "seq = ", seq, ", layer = ", layer,
                 " holds 0 tokens in all its kv heads, expected at least one token to attend to (append this "
                 "step's K/V to the layer before attending)");
  const bool want_probs = opt.probs || opt.group_probs;
  KVC_EXPECTS_IN(who, !want_probs || opt.probs_stride >= longest, "probs_stride = ", opt.probs_stride,
                 ", expected >= the longest stream (", longest, " tokens)");
  const float scale = opt.scale != 0.0f ? opt.scale : 1.0f / std::sqrt(static_cast<float>(D));

  // Scaled queries in the model domain and in the key codec's stored domain.
  std::vector<float> qm(static_cast<std::size_t>(num_q_heads) * D);
  for (std::size_t i = 0; i < qm.size(); ++i) qm[i] = q[i] * scale;
  std::vector<float> qst;
  const float* q_stored = qm.data();
  if constexpr (KQ::rotates) {
    qst = qm;
    for (std::int32_t h = 0; h < num_q_heads; ++h) cache.key_quantizer().to_stored(qst.data() + static_cast<std::size_t>(h) * D, D);
    q_stored = qst.data();
  }
  std::vector<float> raw;
  float* raw_base = nullptr;
  std::int32_t raw_stride = 0;
  if (want_probs) {
    if (opt.probs) {
      raw_base = opt.probs;
      raw_stride = opt.probs_stride;
    } else {
      raw.resize(static_cast<std::size_t>(num_q_heads) * longest);
      raw_base = raw.data();
      raw_stride = longest;
    }
  }

  const std::int32_t TT = std::max<std::int32_t>(qdetail::tile_tokens, cache.encoding_unit());
  const std::int32_t threads = opt.pool ? opt.pool->size() : 1;
  std::int32_t chunk = opt.split_tokens;
  if (chunk <= 0)
    chunk = threads == 1 ? std::numeric_limits<std::int32_t>::max()
                         : static_cast<std::int32_t>(std::max<std::int64_t>(512, (total + 4 * threads - 1) / (4 * threads)));
  if (chunk != std::numeric_limits<std::int32_t>::max()) chunk = (chunk + TT - 1) / TT * TT;
  struct task {
    std::int32_t h, g0, gn, t0, t1;
  };
  std::vector<task> tasks;
  for (std::int32_t h = 0; h < hkv; ++h) {
    const std::int32_t n = views[static_cast<std::size_t>(h)].length();
    for (std::int32_t g0 = 0; g0 < G; g0 += qdetail::max_group) {
      const std::int32_t gn = std::min(qdetail::max_group, G - g0);
      if (n == 0) tasks.push_back({h, g0, gn, 0, 0});
      for (std::int32_t t0 = 0; t0 < n; t0 += chunk)
        tasks.push_back({h, g0, gn, t0, static_cast<std::int32_t>(std::min<std::int64_t>(n, std::int64_t{t0} + chunk))});
    }
  }
  const std::size_t nt = tasks.size();
  std::vector<float> accs(nt * qdetail::max_group * static_cast<std::size_t>(D), 0.0f);
  std::vector<qdetail::partial> parts(nt);
  auto run = [&](std::int32_t i) {
    const task& tk = tasks[static_cast<std::size_t>(i)];
    qdetail::partial& st = parts[static_cast<std::size_t>(i)];
    st.acc = accs.data() + static_cast<std::size_t>(i) * qdetail::max_group * D;
    for (std::int32_t g = 0; g < qdetail::max_group; ++g) {
      st.m[g] = -INFINITY;
      st.l[g] = 0.0f;
    }
    if (tk.t1 <= tk.t0) return;
    qdetail::scratch sc(D, TT);
    const std::int32_t qh0 = tk.h * G + tk.g0;
    const float* qmh = qm.data() + static_cast<std::size_t>(qh0) * D;
    const float* qsh = q_stored + static_cast<std::size_t>(qh0) * D;
    float* rawh = raw_base ? raw_base + static_cast<std::size_t>(qh0) * raw_stride : nullptr;
    const auto& sv = views[static_cast<std::size_t>(tk.h)];
    switch (tk.gn) {
#define KVC_CASE(N)                                                                                             \
  case N:                                                                                                       \
    qdetail::attend_generic<Arch, N>(cache, sv, tk.t0, tk.t1, qmh, qsh, D, st, rawh, raw_stride, sc, qopt,     \
                                     lw ? lw[tk.h] : nullptr);                                                  \
    break;
      KVC_CASE(1) KVC_CASE(2) KVC_CASE(3) KVC_CASE(4) KVC_CASE(5) KVC_CASE(6) KVC_CASE(7) KVC_CASE(8)
#undef KVC_CASE
      default: KVC_ASSERT(false);
    }
  };
  if (opt.pool && nt > 1) opt.pool->parallel_for(static_cast<std::int32_t>(nt), run);
  else
    for (std::size_t i = 0; i < nt; ++i) run(static_cast<std::int32_t>(i));

  // Exact merge of the partial states of each (head, group block), in token order.
  std::vector<float> lse(static_cast<std::size_t>(num_q_heads), -INFINITY);
  detail::merge_partials(tasks, parts, G, D, out, lse, [&](float* o) {
    if constexpr (VQ::rotates) cache.value_quantizer().to_model(o, D);
  });
  if (opt.lse) std::copy(lse.begin(), lse.end(), opt.lse);
  if (want_probs) detail::finalize_probs<Arch>(hkv, G, [&](std::int32_t h) { return views[static_cast<std::size_t>(h)].length(); }, raw_base, raw_stride, lse, opt);
}
}  // namespace qdetail

/// Decode attention for one sequence and one layer of a quant_cache.
/// \param q    [num_q_heads][head_dim] queries (RoPE applied; pre-RoPE caches rotate the keys)
/// \param out  [num_q_heads][head_dim]
template <class Arch = default_arch, class KQ, class VQ, class Fp>
void decode_attention(const quant_cache<KQ, VQ, Fp>& cache, seq_id seq, std::int32_t layer, const float* q,
                      std::int32_t num_q_heads, float* out, const decode_options& opt = {},
                      const quant_attention_options& qopt = {}) {
  qdetail::decode_attention_lw<Arch>(cache, seq, layer, q, num_q_heads, out, opt, qopt, nullptr);
}

/// Decode attention over a quant_cache layer read through its views (quant_cache::layer, the
/// encodings as accessors): the kernel specialises on the store the views come from and reads the
/// codes directly, as decode_attention(cache, seq, layer, ...) does, instead of decoding rows.
template <class Arch = default_arch, class KQ, class VQ, class Fp, class Heads>
void decode_attention(const store_layer<quant_cache<KQ, VQ, Fp>, Heads>& heads, const float* q,
                      std::int32_t num_q_heads, float* out, const decode_options& opt = {},
                      const quant_attention_options& qopt = {}) {
  decode_attention<Arch>(*heads.store, heads.seq, heads.layer, q, num_q_heads, out, opt, qopt);
}

KVC_END_ISA_NAMESPACE
}  // namespace cpu

KVC_BEGIN_ISA_NAMESPACE
/// kvc::decode_attention (kvc/attention.hpp) on a quant_cache layer: the quantized kernel above,
/// which reads the codes.
template <class KQ, class VQ, class Fp, class Heads>
void decode_attention(const store_layer<quant_cache<KQ, VQ, Fp>, Heads>& heads, const float* q,
                      std::int32_t num_q_heads, float* out, const decode_options& opt = {}) {
  cpu::decode_attention(heads, q, num_q_heads, out, opt);
}
KVC_END_ISA_NAMESPACE
KVC_END_NAMESPACE
