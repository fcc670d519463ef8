// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Building blocks of the quantized decode attention: online-softmax state and the float row
/// kernels that consume one decoded tile.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <kvc/cpu/simd.hpp>
#include <kvc/cpu/softmax_merge.hpp>
#include <kvc/quant/fp8.hpp>
#include <kvc/quant/int8.hpp>
#include <kvc/quant/kivi.hpp>
#include <kvc/quant/nuq.hpp>
#include <kvc/store/quant_cache.hpp>

KVC_BEGIN_NAMESPACE
namespace cpu {
KVC_BEGIN_ISA_NAMESPACE  // compiled per ISA: docs/isa.md
namespace qdetail {

inline constexpr std::int32_t max_group = 8;

struct partial {
  float m[max_group];
  float l[max_group];
  float* acc;  // [G][D]
};

/// s[g * stride] = q_g . row for G heads.
template <class Arch, std::int32_t G>
KVC_FORCEINLINE void dot_rows(const float* q, const float* row, std::int32_t D, float* s, std::int32_t stride) noexcept {
  constexpr std::int32_t W = static_cast<std::int32_t>(fbatch<Arch>::size);
  fbatch<Arch> acc[G];
  for (std::int32_t g = 0; g < G; ++g) acc[g] = fbatch<Arch>(0.0f);
  std::int32_t d = 0;
  for (; d + W <= D; d += W) {
    const auto k = fbatch<Arch>::load_unaligned(row + d);
    for (std::int32_t g = 0; g < G; ++g) acc[g] = xsimd::fma(fbatch<Arch>::load_unaligned(q + g * D + d), k, acc[g]);
  }
  for (std::int32_t g = 0; g < G; ++g) {
    float r = cpu::reduce_add<Arch>(acc[g]);
    for (std::int32_t e = d; e < D; ++e) r += q[g * D + e] * row[e];
    s[g * stride] = r;
  }
}

/// acc[g][:] += sum_i p[g * pstride + i] * rows[i][:] for tn rows, accumulators kept in registers.
template <class Arch, std::int32_t G>
KVC_FORCEINLINE void accumulate_rows(const float* p, std::int32_t pstride, const float* rows, std::int32_t tn,
                                     std::int32_t D, float* acc) noexcept {
  constexpr std::int32_t W = static_cast<std::int32_t>(fbatch<Arch>::size);
  std::int32_t d = 0;
  for (; d + W <= D; d += W) {
    fbatch<Arch> a[G];
    for (std::int32_t g = 0; g < G; ++g) a[g] = fbatch<Arch>::load_unaligned(acc + g * D + d);
    for (std::int32_t i = 0; i < tn; ++i) {
      const auto v = fbatch<Arch>::load_unaligned(rows + static_cast<std::size_t>(i) * D + d);
      for (std::int32_t g = 0; g < G; ++g) a[g] = xsimd::fma(fbatch<Arch>(p[g * pstride + i]), v, a[g]);
    }
    for (std::int32_t g = 0; g < G; ++g) a[g].store_unaligned(acc + g * D + d);
  }
  for (; d < D; ++d)
    for (std::int32_t g = 0; g < G; ++g) {
      float a = acc[g * D + d];
      for (std::int32_t i = 0; i < tn; ++i) a += p[g * pstride + i] * rows[static_cast<std::size_t>(i) * D + d];
      acc[g * D + d] = a;
    }
}

/// Online-softmax update of G heads with tn scores s[g * stride + i]; leaves exp(s - m) in s.
template <class Arch, std::int32_t G>
KVC_FORCEINLINE void softmax_update(float* s, std::int32_t stride, std::int32_t tn, std::int32_t D, partial& st,
                                    float* raw, std::int32_t raw_stride, std::int32_t t_abs) noexcept {
  for (std::int32_t g = 0; g < G; ++g) {
    float* sg = s + g * stride;
    if (raw) std::copy(sg, sg + tn, raw + static_cast<std::size_t>(g) * raw_stride + t_abs);
    cpu::detail::softmax_tile<Arch>(sg, tn, st.m[g], st.l[g], st.acc + g * D, D);
  }
}

/// A byte range (the next tile's key or value records) prefetched a slice at a time: slice i of n
/// prefetches its share of the range's cache lines, so the lines arrive spread over the current
/// tile's work. In one burst per tile the prefetch instructions themselves stalled, the line fill
/// buffers full (perf, fp8 and kivi4 32x8x128 ctx:32768: 25-30% of attend_tiles on the loop).
struct prefetch_slices {
  std::uintptr_t first = 0;  ///< first cache line
  std::int32_t lines = 0, per = 0;
  prefetch_slices() = default;
  prefetch_slices(const std::byte* p, std::size_t len, std::int32_t n) noexcept {
    if (!p || len == 0 || n <= 0) return;
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    first = a & ~static_cast<std::uintptr_t>(63);
    lines = static_cast<std::int32_t>(((a + len - 1) & ~static_cast<std::uintptr_t>(63)) - first) / 64 + 1;
    per = (lines + n - 1) / n;
  }
  /// Slice i; every line once over i = 0 .. n - 1.
  KVC_FORCEINLINE void operator()(std::int32_t i) const noexcept {
    for (std::int32_t l = i * per, e = std::min(lines, l + per); l < e; ++l)
      prefetch_read(reinterpret_cast<const void*>(first + 64 * static_cast<std::uintptr_t>(l)));
  }
  /// The whole range at once.
  KVC_FORCEINLINE void all() const noexcept {
    for (std::int32_t l = 0; l < lines; ++l) prefetch_read(reinterpret_cast<const void*>(first + 64 * static_cast<std::uintptr_t>(l)));
  }
};

inline constexpr std::int32_t tile_tokens = 64;

/// Per-task scratch. w/bias/qf/rows serve the fused code kernels below.
struct scratch {
  std::vector<float> k, v, s, tmp, w, bias, qf, ks, kz, gs, gz;
  std::vector<const std::uint8_t*> rows;
  scratch(std::int32_t D, std::int32_t tile) {
    k.resize(static_cast<std::size_t>(tile) * D);
    v.resize(static_cast<std::size_t>(tile) * D);
    s.resize(static_cast<std::size_t>(max_group) * tile);
    tmp.resize(static_cast<std::size_t>(D));
    // value weights p * scale per (channel group, head, token): at most D / 8 groups
    w.resize(static_cast<std::size_t>(D / 8 + 1) * max_group * tile);
    bias.resize(static_cast<std::size_t>(D / 8 + 1) * max_group);
    // value scales and zeros per (channel group, token), whole 8-token gathers
    gs.resize(static_cast<std::size_t>(D / 8 + 1) * (tile + 8));
    gz.resize(gs.size());
    qf.resize(static_cast<std::size_t>(max_group) * D + max_group);
    rows.resize(static_cast<std::size_t>(tile));
    ks.resize(static_cast<std::size_t>(tile));
    kz.resize(static_cast<std::size_t>(tile));
  }
};

// ---- fused kernels on the stored codes (AVX2 + FMA + F16C) ------------------------------------
//
// Instead of decoding a tile to float and running float attention on it, these read the codes of
// a tile directly:
//   score_t = q . (s_t c_t + z_t) = s_t (q . c_t) + z_t sum(q)        (per-token keys)
//   score_t = (q * s) . c_t + q . z                                     (per-channel KIVI keys)
//   acc    += sum_t p_t (s_t c_t + z_t) = sum_t (p_t s_t) c_t + sum_t p_t z_t   (per-token values)
// Every product is the same real number as in "decode, then float attention"; only the float
// rounding order differs (the tests hold them to 1e-5 of a dense double reference).

/// What the fused kernels know about a codec for one role: kind 0 = not fused (decode path),
/// 1 = per-token affine (codes, scale and zero per channel group), 2 = per-channel affine (KIVI
/// keys), 3 = FP8 with a per-token or per-tensor scale.
template <class Q, quant::role R>
struct fused_codec {
  static constexpr int kind = 0, bits = 8, group = 0;
};
/// kind 1 for a record format: per-token affine codes (intn, and the values of kivi and nuq).
template <class Impl>
struct fused_token_affine;
template <int B, quant::scheme S, int Gp>
struct fused_token_affine<quant::detail::token_affine<B, S, Gp>> {
  static constexpr int kind = 1, bits = B, group = Gp;
  static constexpr quant::scheme sch = S;
  using impl = quant::detail::token_affine<B, S, Gp>;
};
template <int B, quant::scheme S, int Gp, quant::role R>
struct fused_codec<quant::intn<B, S, Gp>, R> : fused_token_affine<quant::detail::token_affine<B, S, Gp>> {};
/// The KIVI layout (kivi, nuq: quant::detail::grouped_key_codec) stores values per token; nuq's
/// keys (a codebook per record) take the decode path.
template <int B, int Gk, int Res>
struct fused_codec<quant::kivi<B, Gk, Res>, quant::role::value>
    : fused_token_affine<typename quant::kivi<B, Gk, Res>::value_impl> {};
template <int B, int Gk, int Res>
struct fused_codec<quant::nuq<B, Gk, Res>, quant::role::value>
    : fused_token_affine<typename quant::nuq<B, Gk, Res>::value_impl> {};
template <int B, int Gk, int Res>
struct fused_codec<quant::kivi<B, Gk, Res>, quant::role::key> {
  static constexpr int kind = 2, bits = B, group = Gk;
  using impl = quant::detail::channel_affine<B, Gk>;
};
template <class F, quant::fp8_scaling Sc, quant::role R>
struct fused_codec<quant::fp8<F, Sc>, R> {
  static constexpr int kind = 3, bits = 8, group = 0;
  using format = F;
};

/// Channels a code loader yields per call: two float batches of Arch. The fused kernels run at
/// the float width of Arch: 8 (AVX2) or 16 (AVX-512, where fp16 decode already ran 16 wide while
/// these stayed 8 wide: BM_quant_paired 32x8x128 ctx:32768 one thread, Intel AVX-512 VM 2026-12,
/// speedup_vs_fp16 int8 0.81 -> 0.99, fp8 0.78 -> 0.90, int4 0.82 -> 1.06; bench/results/quant.md).
template <class Arch>
inline constexpr std::int32_t code_step = 2 * static_cast<std::int32_t>(fbatch<Arch>::size);

#if KVC_QUANT_AVX2
inline constexpr bool fused_available = true;

/// Whether the fused kernels have loaders at the float width of Arch.
template <class Arch>
inline constexpr bool fused_width_ok = fbatch<Arch>::size == 8
#if defined(__AVX512F__)
                                       || fbatch<Arch>::size == 16
#endif
    ;

/// 16 8-bit codes of a row from channel d as centred signed bytes c - 128.
KVC_FORCEINLINE __m128i centred_bytes16(const std::uint8_t* row, std::int32_t d) noexcept {
  return _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + d)), _mm_set1_epi8(-128));
}

/// code_step<Arch> codes of a row from channel d, as *centred* floats c - 2^(Bits-1): the zero
/// point moves to z + s 2^(Bits-1) (the middle of the row's range, 0 for symmetric codes), so the
/// two terms of s (q . c) + z' sum(q) do not cancel (uncentred codes cost 1.2e-5 of the 1e-5 budget
/// in test_quant_attention; centred they are below it).
template <int Bits, class Arch>
struct int_loader {
  using B = fbatch<Arch>;
  KVC_FORCEINLINE void operator()(const std::uint8_t* row, std::int32_t d, B& a, B& b) const noexcept {
    if constexpr (Bits == 8 && B::size == 8) {
      const __m128i c = centred_bytes16(row, d);
      a = B(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c)));
      b = B(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(c, 8))));
    } else if constexpr (Bits == 3 && B::size == 8) {
      // one block of 16 (d % 16 == 0): the 2-bit plane as for 2 bits, the bit plane shifted in
      // at bit 2 of each lane
      const std::uint8_t* p = row + d / 16 * 6;
      std::uint32_t w, h = 0;
      std::memcpy(&w, p, 4);
      std::memcpy(&h, p + 4, 2);
      const __m256i W = _mm256_set1_epi32(static_cast<int>(w)), H = _mm256_set1_epi32(static_cast<int>(h << 2));
      const __m256i three = _mm256_set1_epi32(3), four = _mm256_set1_epi32(4);
      const __m256i lo_a = _mm256_and_si256(_mm256_srlv_epi32(W, _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)), three);
      const __m256i lo_b = _mm256_and_si256(_mm256_srlv_epi32(W, _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30)), three);
      const __m256i hi_a = _mm256_and_si256(_mm256_srlv_epi32(H, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), four);
      const __m256i hi_b = _mm256_and_si256(_mm256_srlv_epi32(H, _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15)), four);
      a = B(lanes_to_float(_mm256_or_si256(lo_a, hi_a)));
      b = B(lanes_to_float(_mm256_or_si256(lo_b, hi_b)));
    } else if constexpr (B::size == 8) {
      // 2 and 4 bits: each lane shifts its own code down from a broadcast 32-bit word (one
      // variable shift, mask, centre and convert per 8 codes; the byte unpacking it replaces
      // took 11 operations per 16 two-bit codes).
      const std::uint8_t* p = row + d * Bits / 8;
      std::uint32_t w0, w1;
      std::memcpy(&w0, p, 4);
      if constexpr (Bits == 2) w1 = w0;
      else std::memcpy(&w1, p + 4, 4);
      const __m256i sa = Bits == 2 ? _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)
                                   : _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
      const __m256i sb = Bits == 2 ? _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30) : sa;
      a = B(lanes_to_float(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w0)), sa)));
      b = B(lanes_to_float(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w1)), sb)));
    }
#if defined(__AVX512F__)
    else if constexpr (Bits == 8) {
      a = B(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(centred_bytes16(row, d))));
      b = B(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(centred_bytes16(row, d + 16))));
    } else if constexpr (Bits == 3) {
      // two blocks of 16 (d % 32 == 0), one per batch
      a = B(lanes_to_float(block3(row + d / 16 * 6)));
      b = B(lanes_to_float(block3(row + d / 16 * 6 + 6)));
    } else if constexpr (Bits == 2) {
      const std::uint8_t* p = row + d / 4;
      std::uint32_t w0, w1;
      std::memcpy(&w0, p, 4);
      std::memcpy(&w1, p + 4, 4);
      const __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
      a = B(lanes_to_float(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(w0)), sh)));
      b = B(lanes_to_float(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(w1)), sh)));
    } else {
      // 4 bits: 32 codes are 4 words; lanes 0-7 of a take word 0, 8-15 word 1 (b: words 2, 3)
      const __m512i w = _mm512_zextsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + d / 2)));
      const __m512i sh = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
      const __m512i ia = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
      const __m512i ib = _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
      a = B(lanes_to_float(_mm512_srlv_epi32(_mm512_permutexvar_epi32(ia, w), sh)));
      b = B(lanes_to_float(_mm512_srlv_epi32(_mm512_permutexvar_epi32(ib, w), sh)));
    }
#endif
  }

 private:
  /// The low Bits bits of each lane, centred, as float.
  static KVC_FORCEINLINE __m256 lanes_to_float(__m256i x) noexcept {
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(x, _mm256_set1_epi32((1 << Bits) - 1)),
                                               _mm256_set1_epi32(1 << (Bits - 1))));
  }
#if defined(__AVX512F__)
  /// The 16 codes of one 3-bit block, one per lane (uncentred).
  static KVC_FORCEINLINE __m512i block3(const std::uint8_t* p) noexcept {
    std::uint32_t w, h = 0;
    std::memcpy(&w, p, 4);
    std::memcpy(&h, p + 4, 2);
    const __m512i lo = _mm512_and_si512(
        _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(w)),
                          _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)),
        _mm512_set1_epi32(3));
    const __m512i hi = _mm512_and_si512(
        _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(h << 2)),
                          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)),
        _mm512_set1_epi32(4));
    return _mm512_or_si512(lo, hi);
  }
  static KVC_FORCEINLINE __m512 lanes_to_float(__m512i x) noexcept {
    return _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(x, _mm512_set1_epi32((1 << Bits) - 1)),
                                               _mm512_set1_epi32(1 << (Bits - 1))));
  }
#endif
};
/// The two binary16 words at byte `off` of n records `rb` bytes apart, as floats: lo[i] (first
/// word: the scale) and hi[i] (second: the zero point). One 32-bit gather per 8 tokens; the scalar
/// loop it replaces was the hottest spot of the integer path (perf, int2 32x8x128 ctx:32768).
inline void gather_half_pairs(const std::byte* base, std::size_t rb, std::size_t off, std::int32_t n, float* lo,
                              float* hi) noexcept {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i m16 = _mm256_set1_epi32(0xffff);
  for (std::int32_t i = 0; i < n; i += 8) {
    // lanes past n read the last record again (never past the part)
    const __m256i t = _mm256_min_epi32(_mm256_add_epi32(_mm256_set1_epi32(i), lane), _mm256_set1_epi32(n - 1));
    const __m256i idx = _mm256_add_epi32(_mm256_mullo_epi32(t, _mm256_set1_epi32(static_cast<int>(rb))),
                                         _mm256_set1_epi32(static_cast<int>(off)));
    const __m256i w = _mm256_i32gather_epi32(reinterpret_cast<const int*>(base), idx, 1);
    const __m256i l = _mm256_and_si256(w, m16), h = _mm256_srli_epi32(w, 16);
    _mm256_storeu_ps(lo + i, _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(l), _mm256_extracti128_si256(l, 1))));
    _mm256_storeu_ps(hi + i, _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1))));
  }
}

/// n consecutive binary16 words from byte `off` of each of the tn records `rb` bytes apart, as
/// floats out[k * ostride + i] (word k of record i), by pairs of words; an odd last word pairs
/// with the word before it (off >= 2: the record's codes come first), never past the record, and
/// that word lands in row n, so out holds n + 1 rows when n is odd.
inline void gather_record_halves(const std::byte* base, std::size_t rb, std::size_t off, std::int32_t n,
                                 std::int32_t tn, float* out, std::size_t ostride) noexcept {
  std::int32_t k = 0;
  for (; k + 2 <= n; k += 2)
    gather_half_pairs(base, rb, off + 2 * static_cast<std::size_t>(k), tn, out + k * ostride, out + (k + 1) * ostride);
  if (k < n) {
    float* junk = out + (k + 1) * ostride;  // row n
    gather_half_pairs(base, rb, off + 2 * static_cast<std::size_t>(k) - 2, tn, junk, out + k * ostride);
  }
}

template <int Bits>
inline constexpr float code_mid = static_cast<float>(1 << (Bits - 1));

/// FP8 codes in the high byte of binary16 lanes (h) -> the binary16 patterns of their values
/// divided by fp8_unit<F> (exact): the shifted byte is E5M2 itself; E4M3 gets its exponent moved
/// down one bit (value / 256, subnormals included). The NaN codes (never produced by the
/// saturating encoder from finite input) would read as 480.
template <class F>
KVC_FORCEINLINE __m128i fp8_as_half(__m128i h) noexcept {
  if constexpr (std::is_same<F, fp8_e4m3>::value)
    return _mm_and_si128(_mm_srai_epi16(h, 1), _mm_set1_epi16(static_cast<short>(0xBFFF)));
  else
    return h;
}
template <class F>
KVC_FORCEINLINE __m256i fp8_as_half(__m256i h) noexcept {
  if constexpr (std::is_same<F, fp8_e4m3>::value)
    return _mm256_and_si256(_mm256_srai_epi16(h, 1), _mm256_set1_epi16(static_cast<short>(0xBFFF)));
  else
    return h;
}

/// code_step<Arch> FP8 codes of a row from channel d as floats / fp8_unit<F>, through F16C.
template <class F, class Arch>
struct fp8_loader {
  using B = fbatch<Arch>;
  KVC_FORCEINLINE void operator()(const std::uint8_t* row, std::int32_t d, B& a, B& b) const noexcept {
    if constexpr (B::size == 8) {
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + d));
      a = B(_mm256_cvtph_ps(fp8_as_half<F>(_mm_unpacklo_epi8(_mm_setzero_si128(), c))));
      b = B(_mm256_cvtph_ps(fp8_as_half<F>(_mm_unpackhi_epi8(_mm_setzero_si128(), c))));
    }
#if defined(__AVX512F__)
    else if constexpr (B::size == 16) {
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + d));
      // bytes 0-15 and 16-31 each into the high byte of 16 binary16 lanes
      const __m256i lo = _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(c)), 8);
      const __m256i hi = _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(c, 1)), 8);
      a = B(_mm512_cvtph_ps(fp8_as_half<F>(lo)));
      b = B(_mm512_cvtph_ps(fp8_as_half<F>(hi)));
    }
#endif
  }
};
template <class F>
inline constexpr float fp8_unit = std::is_same<F, fp8_e4m3>::value ? 256.0f : 1.0f;

KVC_FORCEINLINE float h2f(const half* p) noexcept {
  std::uint16_t b;
  std::memcpy(&b, p, 2);
  return _cvtsh_ss(b);
}

/// Tokens per pass of code_dots for G heads: T * G accumulators at most one batch's width (one
/// transposed add reduces them), at most 8 tokens (their code batches stay in registers). AVX2:
/// 8 / G, the register count of decode_attention's acc_regs, not a sweep.
template <class Arch, std::int32_t G>
inline constexpr std::int32_t code_tokens = std::min<std::int32_t>(8, static_cast<std::int32_t>(fbatch<Arch>::size) / G);

/// dots[t * G + g] = q_g . codes(rows[t]) for T tokens and G heads in one pass over D
/// (T * G <= the batch width; D a multiple of code_step<Arch>).
template <class Arch, std::int32_t G, std::int32_t T, class L>
KVC_FORCEINLINE void code_dots(const float* q, std::int32_t D, const std::uint8_t* const* rows, float* dots,
                               L load) noexcept {
  using B = fbatch<Arch>;
  constexpr std::int32_t W = static_cast<std::int32_t>(B::size);
  static_assert(T * G <= W, "code_dots: at most one batch of accumulators");
  B acc[W];
  for (std::int32_t j = 0; j < W; ++j) acc[j] = B(0.0f);
  for (std::int32_t d = 0; d < D; d += 2 * W) {
    B k0[T], k1[T];
    for (std::int32_t t = 0; t < T; ++t) load(rows[t], d, k0[t], k1[t]);
    for (std::int32_t g = 0; g < G; ++g) {
      const B q0 = B::load_unaligned(q + g * D + d), q1 = B::load_unaligned(q + g * D + d + W);
      for (std::int32_t t = 0; t < T; ++t) {
        acc[t * G + g] = xsimd::fma(q0, k0[t], acc[t * G + g]);
        acc[t * G + g] = xsimd::fma(q1, k1[t], acc[t * G + g]);
      }
    }
  }
  if constexpr (T * G == W) {
    haddp<Arch>(acc).store_unaligned(dots);
  } else {
    alignas(64) float r[W];
    haddp<Arch>(acc).store_aligned(r);
    for (std::int32_t j = 0; j < T * G; ++j) dots[j] = r[j];
  }
}

/// Scores of tn tokens (rows[i], per-token scale sc[i] and zero zc[i]) for G heads:
/// s[g * stride + i] = sc[i] * (q_g . c_i) + zc[i] * qsum[g].
/// pf(i) runs once per token i (prefetch_slices of the next tile).
template <class Arch, std::int32_t G, class L, class PF>
KVC_FORCEINLINE void score_codes(const float* q, const float* qsum, std::int32_t D, const std::uint8_t* const* rows,
                                 const float* sc, const float* zc, std::int32_t tn, float* s, std::int32_t stride,
                                 L load, const PF& pf) noexcept {
  constexpr std::int32_t T = code_tokens<Arch, G>;
  float dots[fbatch<Arch>::size];
  std::int32_t i = 0;
  if constexpr (fbatch<Arch>::size == 8 && G == 4 && T == 2) {
    // 8 tokens at a time: the dots token-major (whole vector stores), then a 4 x 8 transpose in
    // registers and the scales as vectors. Per token, scalar scaling and stores to four heads were
    // about a tenth of fused_scores (int2 32x8x128, AMD EPYC AVX2 build, perf 2026-12).
    alignas(32) float tm[32];
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (; i + 8 <= tn; i += 8) {
      for (std::int32_t t = 0; t < 8; t += 2) {
        pf(i + t);
        pf(i + t + 1);
        code_dots<Arch, G, 2>(q, D, rows + i + t, tm + 4 * t, load);
      }
      // rows r0..r3: tokens (0,1) (2,3) (4,5) (6,7) x 4 heads; per 128-bit lane a 4 x 4 transpose
      // leaves head g with tokens (0,2,4,6 | 1,3,5,7), put in order by one permute
      const __m256 r0 = _mm256_load_ps(tm), r1 = _mm256_load_ps(tm + 8);
      const __m256 r2 = _mm256_load_ps(tm + 16), r3 = _mm256_load_ps(tm + 24);
      const __m256 u0 = _mm256_unpacklo_ps(r0, r1), u1 = _mm256_unpackhi_ps(r0, r1);
      const __m256 u2 = _mm256_unpacklo_ps(r2, r3), u3 = _mm256_unpackhi_ps(r2, r3);
      const __m256 d[4] = {_mm256_permutevar8x32_ps(_mm256_shuffle_ps(u0, u2, 0x44), order),
                           _mm256_permutevar8x32_ps(_mm256_shuffle_ps(u0, u2, 0xEE), order),
                           _mm256_permutevar8x32_ps(_mm256_shuffle_ps(u1, u3, 0x44), order),
                           _mm256_permutevar8x32_ps(_mm256_shuffle_ps(u1, u3, 0xEE), order)};
      const __m256 sv = _mm256_loadu_ps(sc + i), zv = _mm256_loadu_ps(zc + i);
      for (std::int32_t g = 0; g < 4; ++g)
        _mm256_storeu_ps(s + g * stride + i, _mm256_fmadd_ps(sv, d[g], _mm256_mul_ps(zv, _mm256_set1_ps(qsum[g]))));
    }
  }
  for (; i + T <= tn; i += T) {
    for (std::int32_t t = 0; t < T; ++t) pf(i + t);
    code_dots<Arch, G, T>(q, D, rows + i, dots, load);
    for (std::int32_t t = 0; t < T; ++t)
      for (std::int32_t g = 0; g < G; ++g) s[g * stride + i + t] = sc[i + t] * dots[t * G + g] + zc[i + t] * qsum[g];
  }
  for (; i < tn; ++i) {
    pf(i);
    code_dots<Arch, G, 1>(q, D, rows + i, dots, load);
    for (std::int32_t g = 0; g < G; ++g) s[g * stride + i] = sc[i] * dots[g] + zc[i] * qsum[g];
  }
}

/// acc[g][:] += sum_i w[(j(d) * G + g) * wstride + i] * codes(rows[i])[:] with j(d) = d / grp,
/// code_step<Arch> channels at a time with the 2G accumulators in registers over the tile's rows.
/// pf(i) runs once per row i in the first pass, pf2(i) in the second (the first when there is one
/// pass): with both in the first pass, kivi8's key groups and value records together stalled the
/// code loads on full fill buffers (BM_quant_paired kivi8 32x8x128 ctx:32768 one thread, AMD EPYC
/// 2026-12: 0.79 -> 0.96x fp16 AVX-512 build, 0.73 -> 0.86x AVX2 build).
template <class Arch, std::int32_t G, class L>
KVC_FORCEINLINE void accumulate_codes(const float* w, std::int32_t wstride, std::int32_t grp,
                                      const std::uint8_t* const* rows, std::int32_t tn, std::int32_t D, float* acc,
                                      L load, const prefetch_slices& pf, const prefetch_slices& pf2) noexcept {
  using B = fbatch<Arch>;
  constexpr std::int32_t W = static_cast<std::int32_t>(B::size);
  const std::int32_t d2 = D > 2 * W ? 2 * W : 0;
  for (std::int32_t d = 0; d < D; d += 2 * W) {
    const float* w0 = w + static_cast<std::size_t>(d / grp) * G * wstride;
    const float* w1 = w + static_cast<std::size_t>((d + W) / grp) * G * wstride;
    B a0[G], a1[G];
    for (std::int32_t g = 0; g < G; ++g) {
      a0[g] = B::load_unaligned(acc + g * D + d);
      a1[g] = B::load_unaligned(acc + g * D + d + W);
    }
    for (std::int32_t i = 0; i < tn; ++i) {
      if (d == 0) pf(i);
      if (d == d2) pf2(i);
      B v0, v1;
      load(rows[i], d, v0, v1);
      for (std::int32_t g = 0; g < G; ++g) {
        a0[g] = xsimd::fma(B(w0[g * wstride + i]), v0, a0[g]);
        a1[g] = xsimd::fma(B(w1[g * wstride + i]), v1, a1[g]);
      }
    }
    for (std::int32_t g = 0; g < G; ++g) {
      a0[g].store_unaligned(acc + g * D + d);
      a1[g].store_unaligned(acc + g * D + d + W);
    }
  }
}

template <class Arch, class Q, quant::role R>
KVC_FORCEINLINE auto loader_for() noexcept {
  using F = fused_codec<Q, R>;
  if constexpr (F::kind == 3) return fp8_loader<typename F::format, Arch>{};
  else return int_loader<F::bits, Arch>{};
}

/// Whether the fused kernels can take the keys (or values) of Q for G heads at the float width of
/// Arch for some head_dim: the callers test it with `if constexpr`, so that a kernel that can never
/// run is not instantiated (attend_tiles for 17 codec pairs x G = 1..8 was 35% of a registration
/// TU's code, most of it the G > 4 fused kernels behind a run-time false).
template <class Arch, class Q, quant::role R, std::int32_t G>
inline constexpr bool fused_possible = fused_codec<Q, R>::kind != 0 && G <= 4 && fused_width_ok<Arch> &&
                                       !(R == quant::role::key && fused_codec<Q, R>::kind == 1 &&
                                         fused_codec<Q, R>::group != 0);  // grouped per-token keys

/// Whether the fused kernels take the keys (or values) of Q for G heads and head_dim D at the
/// float width of Arch.
template <class Arch, class Q, quant::role R, std::int32_t G>
constexpr bool fused_ok(std::int32_t D) noexcept {
  using F = fused_codec<Q, R>;
  constexpr std::int32_t W = static_cast<std::int32_t>(fbatch<Arch>::size);
  if constexpr (!fused_possible<Arch, Q, R, G>) return false;
  else return D % (2 * W) == 0 && (F::group == 0 || F::group % W == 0);
}

/// Scores s[g * stride + i] of tokens [slot0, slot0 + tn) of a page's key part, from the codes.
template <class Arch, std::int32_t G, class Q>
void fused_scores(const Q& kq, const std::byte* part, std::int32_t D, std::int32_t slot0, std::int32_t tn,
                  const float* q, float* s, std::int32_t stride, scratch& sc, const prefetch_slices& pf = {}) {
  using F = fused_codec<Q, quant::role::key>;
  const std::size_t rb = kq.record_bytes(quant::role::key, D);
  const auto load = loader_for<Arch, Q, quant::role::key>();
  float qsum[G];
  const std::uint8_t** rows = sc.rows.data();
  if constexpr (F::kind == 2) {
    using impl = typename F::impl;
    constexpr std::int32_t U = F::group;
    for (std::int32_t i = 0; i < tn;) {
      const std::int32_t r = (slot0 + i) / U, r0 = r * U, e = std::min(tn, r0 + U - slot0);
      const std::byte* rec = part + rb * static_cast<std::size_t>(r);
      const half* hs = impl::scales(rec, D);
      const half* hz = impl::zeros(rec, D);
      float* qf = sc.qf.data();
      for (std::int32_t g = 0; g < G; ++g) {
        __m256 b = _mm256_setzero_ps();
        for (std::int32_t d = 0; d < D; d += 8) {
          const __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(hs + d)));
          const __m256 zv = _mm256_fmadd_ps(sv, _mm256_set1_ps(code_mid<F::bits>),
                                            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(hz + d))));
          const __m256 qv = _mm256_loadu_ps(q + g * D + d);
          _mm256_storeu_ps(qf + g * D + d, _mm256_mul_ps(qv, sv));
          b = _mm256_fmadd_ps(qv, zv, b);
        }
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps(b, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        qsum[g] = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
      }
      for (std::int32_t t = i; t < e; ++t) {
        rows[t - i] = reinterpret_cast<const std::uint8_t*>(rec) + impl::row_bytes(D) * static_cast<std::size_t>(slot0 + t - r0);
        sc.ks[t - i] = 1.0f;
        sc.kz[t - i] = 1.0f;
      }
      score_codes<Arch, G>(qf, qsum, D, rows, sc.ks.data(), sc.kz.data(), e - i, s + i, stride, load,
                           [&pf, i](std::int32_t t) { pf(i + t); });
      i = e;
    }
  } else {
    // sum(q) of each head, for the zero term: two batch chains (D % 2W == 0, fused_ok). As one
    // scalar chain of G * D dependent adds per tile it was 13% of fused_scores (int2 32x8x128,
    // AMD EPYC AVX2 build, perf 2026-12).
    using B = fbatch<Arch>;
    constexpr std::int32_t W = static_cast<std::int32_t>(B::size);
    for (std::int32_t g = 0; g < G; ++g) {
      B a0(0.0f), a1(0.0f);
      for (std::int32_t d = 0; d < D; d += 2 * W) {
        a0 += B::load_unaligned(q + g * D + d);
        a1 += B::load_unaligned(q + g * D + d + W);
      }
      qsum[g] = reduce_add<Arch>(a0 + a1);
    }
    for (std::int32_t i = 0; i < tn; ++i)
      rows[i] = reinterpret_cast<const std::uint8_t*>(part + rb * static_cast<std::size_t>(slot0 + i));
    if constexpr (F::kind == 3) {
      for (std::int32_t i = 0; i < tn; ++i) {
        sc.ks[i] = kq.template row_scale<quant::role::key>(reinterpret_cast<const std::byte*>(rows[i]), D) *
                   fp8_unit<typename F::format>;
        sc.kz[i] = 0.0f;
      }
    } else {
      // scale and zero of every token by 8-token gathers; z' = affine_zero + s * mid is
      // z + s 2^(b-1) for asymmetric codes and exactly 0 for symmetric ones
      using impl = typename F::impl;
      const std::byte* first = part + rb * static_cast<std::size_t>(slot0);
      float* ks = sc.ks.data();
      float* kz = sc.kz.data();
      if constexpr (impl::has_zero) gather_half_pairs(first, rb, impl::code_bytes(D), tn, ks, kz);
      else gather_half_pairs(first, rb, impl::code_bytes(D) - 2, tn, kz, ks);  // [last code bytes][scale]
      for (std::int32_t i = 0; i < tn; ++i) kz[i] = impl::has_zero ? ks[i] * code_mid<F::bits> + kz[i] : 0.0f;
    }
    score_codes<Arch, G>(q, qsum, D, rows, sc.ks.data(), sc.kz.data(), tn, s, stride, load, pf);
  }
}

/// acc[g][:] += sum_i p[g * stride + i] * value_i for tokens [slot0, slot0 + tn) of a page's value
/// part, from the codes.
template <class Arch, std::int32_t G, class Q>
void fused_values(const Q& vq, const std::byte* part, std::int32_t D, std::int32_t slot0, std::int32_t tn,
                  const float* p, std::int32_t stride, float* acc, scratch& sc, const prefetch_slices& pf = {},
                  const prefetch_slices& pf2 = {}) {
  using F = fused_codec<Q, quant::role::value>;
  const std::size_t rb = vq.record_bytes(quant::role::value, D);
  const auto load = loader_for<Arch, Q, quant::role::value>();
  const std::int32_t grp = F::group == 0 ? D : F::group, ng = D / grp;
  const std::uint8_t** rows = sc.rows.data();
  float* w = sc.w.data();
  float* bias = sc.bias.data();
  for (std::int32_t i = 0; i < tn; ++i)
    rows[i] = reinterpret_cast<const std::uint8_t*>(part + rb * static_cast<std::size_t>(slot0 + i));
  if constexpr (F::kind == 3) {
    for (std::int32_t i = 0; i < tn; ++i) {
      const float sv = vq.template row_scale<quant::role::value>(reinterpret_cast<const std::byte*>(rows[i]), D) *
                       fp8_unit<typename F::format>;
      for (std::int32_t g = 0; g < G; ++g) w[g * stride + i] = p[g * stride + i] * sv;
    }
  } else {
    // The tile's scales and zeros gathered per channel group (gs[j][i], gz[j][i]), then the
    // weights p s and the bias sum p z' whole batches of tokens at a time. Per token and group
    // in scalar code this was as many operations as the value FMAs themselves (perf, kivi4
    // 32x8x128: a quarter of attend_tiles).
    using impl = typename F::impl;
    using B = fbatch<Arch>;
    constexpr std::int32_t W = static_cast<std::int32_t>(B::size);
    const std::size_t gst = sc.gs.size() / static_cast<std::size_t>(D / 8 + 1);
    float* gs = sc.gs.data();
    float* gz = sc.gz.data();
    const std::byte* first = part + rb * static_cast<std::size_t>(slot0);
    gather_record_halves(first, rb, impl::code_bytes(D), ng, tn, gs, gst);
    if constexpr (impl::has_zero) gather_record_halves(first, rb, impl::code_bytes(D) + 2 * static_cast<std::size_t>(ng), ng, tn, gz, gst);
    const std::int32_t whole = tn / W * W;
    for (std::int32_t j = 0; j < ng; ++j) {
      const float* sj = gs + j * gst;
      const float* zj = gz + j * gst;
      for (std::int32_t g = 0; g < G; ++g) {
        const float* pg = p + g * stride;
        float* wg = w + (j * G + g) * stride;
        B bsum(0.0f);
        std::int32_t i = 0;
        for (; i < whole; i += W) {
          const B pv = B::load_unaligned(pg + i), sv = B::load_unaligned(sj + i);
          (pv * sv).store_unaligned(wg + i);
          // z' = affine_zero + s * mid: z + s 2^(b-1) asymmetric, 0 symmetric (exactly)
          if constexpr (impl::has_zero) bsum = xsimd::fma(pv, xsimd::fma(sv, B(code_mid<F::bits>), B::load_unaligned(zj + i)), bsum);
        }
        float b = reduce_add<Arch>(bsum);
        for (; i < tn; ++i) {
          wg[i] = pg[i] * sj[i];
          if constexpr (impl::has_zero) b += pg[i] * (sj[i] * code_mid<F::bits> + zj[i]);
        }
        bias[g * ng + j] = impl::has_zero ? b : 0.0f;
      }
    }
  }
  accumulate_codes<Arch, G>(w, stride, grp, rows, tn, D, acc, load, pf, pf2);
  if constexpr (F::kind != 3) {
    if constexpr (F::impl::has_zero)
      for (std::int32_t g = 0; g < G; ++g)
        for (std::int32_t j = 0; j < ng; ++j) {
          const __m256 b = _mm256_set1_ps(bias[g * ng + j]);
          float* a = acc + g * D + j * grp;
          for (std::int32_t d = 0; d < grp; d += 8) _mm256_storeu_ps(a + d, _mm256_add_ps(_mm256_loadu_ps(a + d), b));
        }
  }
}

// ---- integer q . k (quant_attention_options::int8_query) ----------------------------------------
//
// Per-token integer keys (intn, one scale and zero per token and head) against a query quantized
// once per call: q_g ~ qs_g * qi_g with qi_g int8 (2-bit and 4-bit keys, _mm256_maddubs_epi16 of
// u8 codes x s8 query; no saturation: 2 * 15 * 127 < 2^15) or int16 (8-bit keys, _mm256_madd_epi16
// of u8 codes x s16 query, 15-bit query: 8 * 2 * 255 * 32767 * D/128 < 2^31 for D <= 1024). The
// integer sums are exact; score = s_t qs_g sum(c qi) + z_t sum(q). The query is stored in the
// order the codes unpack in: for 4-bit, each 32-byte block holds 64 channels, low nibbles = even
// channels, high nibbles = odd; for 2-bit each 32-byte block holds 128 channels, crumb k of byte j
// = channel 4j + k.

/// Whether the integer path can take keys of Q for G heads for some head_dim (as fused_possible).
template <class Q, std::int32_t G>
inline constexpr bool intdot_possible =
    fused_codec<Q, quant::role::key>::kind == 1 && fused_codec<Q, quant::role::key>::group == 0 && G <= 4;

/// Whether the integer path takes keys of Q (otherwise the exact float path runs).
template <class Q, std::int32_t G>
constexpr bool intdot_ok(std::int32_t D) noexcept {
  using F = fused_codec<Q, quant::role::key>;
  if constexpr (!intdot_possible<Q, G>) return false;
  else return F::bits == 8 ? D % 16 == 0 : F::bits == 4 ? D % 64 == 0 : D % 128 == 0;
}

/// Quantized query of G heads: qi (int8, or int16 for 8-bit keys) in unpack order, qs, qsum.
struct int_query {
  alignas(32) std::int8_t q8[max_group * 1024];
  alignas(32) std::int16_t q16[max_group * 1024];
  float qs[max_group], qsum[max_group];
};

template <int Bits>
inline void quantize_query(const float* q, std::int32_t G, std::int32_t D, int_query& iq) noexcept {
  for (std::int32_t g = 0; g < G; ++g) {
    const float* qg = q + g * D;
    float amax = 0.0f, sum = 0.0f;
    for (std::int32_t d = 0; d < D; ++d) {
      amax = std::max(amax, std::fabs(qg[d]));
      sum += qg[d];
    }
    const float lim = Bits == 8 ? 32767.0f : 127.0f;
    const float qs = amax > 0.0f ? amax / lim : 1.0f, inv = 1.0f / qs;
    iq.qs[g] = qs;
    iq.qsum[g] = sum;
    for (std::int32_t d = 0; d < D; ++d) {
      const float r = std::min(lim, std::max(-lim, std::nearbyint(qg[d] * inv)));
      std::int32_t pos = d;
      if constexpr (Bits == 4) pos = d / 64 * 64 + (d % 2) * 32 + (d % 64) / 2;
      if constexpr (Bits == 2) pos = d / 128 * 128 + (d % 4) * 32 + (d % 128) / 4;
      if constexpr (Bits == 8) iq.q16[g * D + pos] = static_cast<std::int16_t>(r);
      else iq.q8[g * D + pos] = static_cast<std::int8_t>(r);
    }
  }
}

/// Integer dots of T tokens x G heads as floats: dots[t * G + g] = sum_d c_td qi_gd. Tokens
/// outer, heads inner, so only one token's code vectors are live next to the T * G accumulators
/// (codes of all T tokens at once spilled the accumulators to the stack: perf, int2 G=4), and the
/// lanes are reduced in integers (one conversion instead of eight).
template <int Bits, std::int32_t G, std::int32_t T>
KVC_FORCEINLINE void int_dots(const int_query& iq, std::int32_t D, const std::uint8_t* const* rows, float* dots) noexcept {
  __m256i acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_si256();
  if constexpr (Bits == 8) {
    for (std::int32_t d = 0; d < D; d += 16)
      for (std::int32_t t = 0; t < T; ++t) {
        const __m256i c = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[t] + d)));
        for (std::int32_t g = 0; g < G; ++g)
          acc[t * G + g] = _mm256_add_epi32(
              acc[t * G + g], _mm256_madd_epi16(c, _mm256_load_si256(reinterpret_cast<const __m256i*>(iq.q16 + g * D + d))));
      }
  } else {
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i m = _mm256_set1_epi8(Bits == 4 ? 0x0f : 0x03);
    constexpr std::int32_t per = Bits == 4 ? 64 : 128;  // channels per 32-byte block
    constexpr int nv = 8 / Bits;                         // code vectors per block
    for (std::int32_t d = 0; d < D; d += per)
      for (std::int32_t t = 0; t < T; ++t) {
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[t] + d * Bits / 8));
        __m256i c[nv];
        for (int k = 0; k < nv; ++k) c[k] = _mm256_and_si256(k == 0 ? b : _mm256_srli_epi16(b, k * Bits), m);
        for (std::int32_t g = 0; g < G; ++g) {
          const __m256i* qv = reinterpret_cast<const __m256i*>(iq.q8 + g * D + d);
          __m256i s16 = _mm256_maddubs_epi16(c[0], _mm256_load_si256(qv));
          for (int k = 1; k < nv; ++k) s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(c[k], _mm256_load_si256(qv + k)));
          acc[t * G + g] = _mm256_add_epi32(acc[t * G + g], _mm256_madd_epi16(s16, ones));
        }
      }
  }
  const __m256i h01 = _mm256_hadd_epi32(acc[0], acc[1]), h23 = _mm256_hadd_epi32(acc[2], acc[3]);
  const __m256i h45 = _mm256_hadd_epi32(acc[4], acc[5]), h67 = _mm256_hadd_epi32(acc[6], acc[7]);
  const __m256i a = _mm256_hadd_epi32(h01, h23), b = _mm256_hadd_epi32(h45, h67);
  const __m256i sum = _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
  alignas(32) float r[8];
  _mm256_store_ps(r, _mm256_cvtepi32_ps(sum));
  for (std::int32_t j = 0; j < T * G; ++j) dots[j] = r[j];
}

/// Scores from the integer dots: s[g * stride + i] = s_i qs_g dot + z_i qsum_g.
template <std::int32_t G, class Q>
void intdot_scores(const Q& kq, const std::byte* part, std::int32_t D, std::int32_t slot0, std::int32_t tn,
                   const int_query& iq, float* s, std::int32_t stride, scratch& sc) {
  using F = fused_codec<Q, quant::role::key>;
  if constexpr (F::kind == 1) {
  using impl = typename F::impl;
  const std::size_t rb = kq.record_bytes(quant::role::key, D);
  const std::uint8_t** rows = sc.rows.data();
  for (std::int32_t i = 0; i < tn; ++i) {
    const std::byte* rec = part + rb * static_cast<std::size_t>(slot0 + i);
    rows[i] = reinterpret_cast<const std::uint8_t*>(rec);
    const float sv = h2f(impl::scales(rec, D));
    sc.ks[i] = sv;
    sc.kz[i] = quant::detail::affine_zero<F::bits, F::sch>(sv, impl::has_zero ? h2f(impl::zeros(rec, D)) : 0.0f);
  }
  constexpr std::int32_t T = 8 / G;
  float dots[8];
  std::int32_t i = 0;
  for (; i + T <= tn; i += T) {
    int_dots<F::bits, G, T>(iq, D, rows + i, dots);
    for (std::int32_t t = 0; t < T; ++t)
      for (std::int32_t g = 0; g < G; ++g)
        s[g * stride + i + t] = sc.ks[i + t] * iq.qs[g] * dots[t * G + g] + sc.kz[i + t] * iq.qsum[g];
  }
  for (; i < tn; ++i) {
    int_dots<F::bits, G, 1>(iq, D, rows + i, dots);
    for (std::int32_t g = 0; g < G; ++g) s[g * stride + i] = sc.ks[i] * iq.qs[g] * dots[g] + sc.kz[i] * iq.qsum[g];
  }
  } else {
    (void)kq, (void)part, (void)D, (void)slot0, (void)tn, (void)iq, (void)s, (void)stride, (void)sc;
  }
}
#else
inline constexpr bool fused_available = false;
struct int_query {};
template <class Q, std::int32_t G>
inline constexpr bool intdot_possible = false;
template <class Q, std::int32_t G>
constexpr bool intdot_ok(std::int32_t) noexcept { return false; }
template <int Bits>
inline void quantize_query(const float*, std::int32_t, std::int32_t, int_query&) noexcept {}
template <std::int32_t G, class Q>
void intdot_scores(const Q&, const std::byte*, std::int32_t, std::int32_t, std::int32_t, const int_query&, float*,
                   std::int32_t, scratch&) {}
template <class Arch, class Q, quant::role R, std::int32_t G>
inline constexpr bool fused_possible = false;
template <class Arch, class Q, quant::role R, std::int32_t G>
constexpr bool fused_ok(std::int32_t) noexcept { return false; }
template <class Arch, std::int32_t G, class Q>
void fused_scores(const Q&, const std::byte*, std::int32_t, std::int32_t, std::int32_t, const float*, float*, std::int32_t, scratch&,
                  const prefetch_slices& = {}) {}
template <class Arch, std::int32_t G, class Q>
void fused_values(const Q&, const std::byte*, std::int32_t, std::int32_t, std::int32_t, const float*, std::int32_t, float*, scratch&,
                  const prefetch_slices& = {}, const prefetch_slices& = {}) {}
#endif

}  // namespace qdetail

KVC_END_ISA_NAMESPACE
}  // namespace cpu
KVC_END_NAMESPACE
