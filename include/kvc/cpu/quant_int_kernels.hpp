// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Integer value accumulation of the quantized decode attention
/// (kvc::cpu::quant_attention_options::int8_probs): the approximate fast path for per-token
/// integer value codes (intn<2|4|8>, whole-head scale).
///
/// Per tile of up to 64 tokens and per query head, the weights w_t = p_t s_t (probability times the
/// token's value scale, >= 0) are rounded to unsigned integers relative to the tile's largest,
/// w_t ~ f wq_t with f = max_t w_t / L (L = 255, or 127 for 8-bit codes), and
///   sum_t p_t v_t[d] = sum_t w_t c_t[d] + sum_t p_t z_t  ~  f sum_t wq_t c_t[d] + sum_t p_t z_t,
/// the first sum in integers: the codes of 4 tokens are interleaved per channel (a 4x4 byte
/// transpose of the packed rows, then shift-and-mask), so _mm256_maddubs_epi16 (u8 weights x s8
/// codes) adds two tokens per 16-bit lane and _mm256_madd_epi16 with ones the other two, the
/// AVX2 spelling of VNNI's vpdpbusd. The zero-point term is kept in float, exactly. The error of
/// each output element is at most sum over tiles of (f / 2) sum_t |c_t[d]| / sum_t p_t
/// (test_quant_attention checks it against a double-precision reference).
///
/// The integer accumulators are in a permuted channel order (the order the transpose leaves
/// them in); kernels keep a permuted float accumulator for the whole range and put it back in
/// channel order once, at the end (int_value_perm).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <kvc/cpu/quant_kernels.hpp>

KVC_BEGIN_NAMESPACE
namespace cpu {
KVC_BEGIN_ISA_NAMESPACE  // compiled per ISA: docs/isa.md
namespace qdetail {

#if KVC_QUANT_AVX2

/// Whether the integer value path takes value codec Q: per-token integer codes with one scale
/// per token and head, rows a whole number of 32-byte blocks.
template <class Q>
constexpr bool intval_ok(std::int32_t D) noexcept {
  using F = fused_codec<Q, quant::role::value>;
  if constexpr (F::kind != 1 || F::group != 0) return false;
  else return D * F::bits / 8 % 32 == 0 && D <= 1024;
}

/// Largest rounded weight: 255 for 2- and 4-bit codes; 127 for 8-bit codes, whose centred values
/// reach -128, so that one maddubs (two products) stays below 2^15.
template <int Bits>
inline constexpr int weight_max = Bits == 8 ? 127 : 255;
/// 4-token groups summed in 16-bit lanes before widening: floor(32767 / (2 * L * max|code|)):
/// 2-bit codes 0..3 (uncentred): 21, use 16 (a whole 64-token tile); 4-bit centred -8..7: 8;
/// 8-bit centred: 1 (accumulated in 32 bits directly).
template <int Bits>
inline constexpr int groups_per_flush = Bits == 2 ? 16 : Bits == 4 ? 8 : 1;
/// Value subtracted from the codes before the products (centred codes halve the rounding error
/// term for 4 and 8 bits and keep 16-bit sums in range); 2-bit codes stay unsigned.
template <int Bits>
inline constexpr int value_centre = Bits == 2 ? 0 : 1 << (Bits - 1);

/// perm[i] = the channel that position i of the permuted accumulator holds.
template <int Bits>
inline void int_value_perm(std::int32_t D, std::int32_t* perm) noexcept {
  constexpr int per = 8 / Bits;
  const std::int32_t nblk = D * Bits / 8 / 32;
  for (std::int32_t b = 0; b < nblk; ++b)
    for (int k = 0; k < 4; ++k)
      for (int m = 0; m < per; ++m)
        for (int i = 0; i < 8; ++i) {
          const int byte = (i / 4) * 16 + k * 4 + i % 4;
          perm[b * 32 * per + (k * per + m) * 8 + i] = b * 32 * per + byte * per + m;
        }
}

/// Interleaved code vectors of a tile: D / 8 vectors of 32 bytes per 4-token group.
inline constexpr std::size_t int_value_buf_bytes(std::int32_t D, std::int32_t tile) noexcept {
  return static_cast<std::size_t>(D / 8) * 32 * static_cast<std::size_t>((tile + 3) / 4);
}

/// accp[g][perm] += f[g] * sum_t wq[g][t] * (c_t - centre) for the 4 * ngroups rows (rows past the
/// tile point at a valid row and have weight 0). wq: [G][wstride] bytes; buf: int_value_buf_bytes,
/// 32-byte aligned. The codes of each 4-token group are transposed and unpacked once into buf
/// (the first version redid it for each register block of accumulators: 75 instead of 51
/// instructions a token, by count, for int2 G=4 D=128), then every head's maddubs reads them.
template <int Bits, std::int32_t G>
inline void int_values(const std::uint8_t* const* rows, std::int32_t ngroups, const std::uint8_t* wq,
                       std::int32_t wstride, const float* f, std::int32_t D, float* accp, __m256i* buf) noexcept {
  constexpr int per = 8 / Bits;
  /// Code vectors per register block: G x M accumulators <= 8 registers.
  constexpr int M = G == 1 || G == 2 ? 4 : 2;
  constexpr int FL = groups_per_flush<Bits>;
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << Bits) - 1));
  const __m256i centre = _mm256_set1_epi8(static_cast<char>(value_centre<Bits>));
  const __m256i ones = _mm256_set1_epi16(1);
  const std::int32_t nblk = D * Bits / 8 / 32, nvec = D / 8;
  for (std::int32_t j = 0; j < ngroups; ++j) {
    const std::uint8_t* const* r = rows + 4 * j;
    __m256i* out = buf + static_cast<std::size_t>(j) * nvec;
    for (std::int32_t b = 0; b < nblk; ++b) {
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r[0] + b * 32));
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r[1] + b * 32));
      const __m256i x2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r[2] + b * 32));
      const __m256i x3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r[3] + b * 32));
      const __m256i a0 = _mm256_unpacklo_epi8(x0, x1), a1 = _mm256_unpackhi_epi8(x0, x1);
      const __m256i c0 = _mm256_unpacklo_epi8(x2, x3), c1 = _mm256_unpackhi_epi8(x2, x3);
      const __m256i y[4] = {_mm256_unpacklo_epi16(a0, c0), _mm256_unpackhi_epi16(a0, c0),
                            _mm256_unpacklo_epi16(a1, c1), _mm256_unpackhi_epi16(a1, c1)};
      for (int k = 0; k < 4; ++k)
        for (int m = 0; m < per; ++m) {
          __m256i cm;
          if constexpr (Bits == 8) {
            cm = _mm256_xor_si256(y[k], centre);  // c - 128 as s8
          } else {
            cm = _mm256_and_si256(_mm256_srli_epi16(y[k], m * Bits), mask);
            if constexpr (value_centre<Bits> != 0) cm = _mm256_sub_epi8(cm, centre);
          }
          _mm256_store_si256(out + (b * 4 + k) * per + m, cm);
        }
    }
  }
  __m256 fv[G];
  for (std::int32_t g = 0; g < G; ++g) fv[g] = _mm256_set1_ps(f[g]);
  for (std::int32_t v0 = 0; v0 < nvec; v0 += M) {
    __m256i acc[G][M];
    auto flush = [&]() {
      for (std::int32_t g = 0; g < G; ++g)
        for (int mm = 0; mm < M; ++mm) {
          const __m256i s32 = Bits == 8 ? acc[g][mm] : _mm256_madd_epi16(acc[g][mm], ones);
          float* a = accp + static_cast<std::size_t>(g) * D + (v0 + mm) * 8;
          _mm256_storeu_ps(a, _mm256_fmadd_ps(fv[g], _mm256_cvtepi32_ps(s32), _mm256_loadu_ps(a)));
          acc[g][mm] = _mm256_setzero_si256();
        }
    };
    for (std::int32_t g = 0; g < G; ++g)
      for (int mm = 0; mm < M; ++mm) acc[g][mm] = _mm256_setzero_si256();
    for (std::int32_t j = 0; j < ngroups; ++j) {
      const __m256i* cv = buf + static_cast<std::size_t>(j) * nvec + v0;
      for (std::int32_t g = 0; g < G; ++g) {
        std::int32_t w4;
        std::memcpy(&w4, wq + static_cast<std::size_t>(g) * wstride + 4 * j, 4);
        const __m256i wv = _mm256_set1_epi32(w4);
        for (int mm = 0; mm < M; ++mm) {
          const __m256i p = _mm256_maddubs_epi16(wv, _mm256_load_si256(cv + mm));
          if constexpr (Bits == 8) acc[g][mm] = _mm256_add_epi32(acc[g][mm], _mm256_madd_epi16(p, ones));
          else acc[g][mm] = _mm256_add_epi16(acc[g][mm], p);
        }
      }
      if constexpr (FL > 1)
        if ((j + 1) % FL == 0 && j + 1 < ngroups) flush();
    }
    flush();
  }
}

/// Rounds the weights w[g][i] = p[g * pstride + i] * vs[i] of tn tokens to bytes relative to their
/// maximum: wq[g][i] (zero from tn up to a multiple of 4), f[g] = max / L.
template <int Bits, std::int32_t G>
inline void quantize_weights(const float* p, std::int32_t pstride, const float* vs, std::int32_t tn, std::uint8_t* wq,
                             std::int32_t wstride, float* f) noexcept {
  constexpr float L = static_cast<float>(weight_max<Bits>);
  alignas(32) float w[tile_tokens + 8];
  for (std::int32_t g = 0; g < G; ++g) {
    const float* pg = p + static_cast<std::size_t>(g) * pstride;
    __m256 mx = _mm256_setzero_ps();
    std::int32_t i = 0;
    for (; i + 8 <= tn; i += 8) {
      const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(pg + i), _mm256_loadu_ps(vs + i));
      _mm256_store_ps(w + i, x);
      mx = _mm256_max_ps(mx, x);
    }
    float m = 0.0f;
    for (; i < tn; ++i) {
      w[i] = pg[i] * vs[i];
      m = std::max(m, w[i]);
    }
    for (; i < (tn + 7) / 8 * 8; ++i) w[i] = 0.0f;
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, mx);
    for (float x : lanes) m = std::max(m, x);
    std::uint8_t* out = wq + static_cast<std::size_t>(g) * wstride;
    f[g] = m / L;
    const __m256 inv = _mm256_set1_ps(m > 0.0f ? L / m : 0.0f);
    for (i = 0; i < tn; i += 8) {
      // round to nearest (MXCSR default), w * L / max <= L up to one ulp: clamp through the packs
      const __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(w + i), inv));
      const __m128i r16 = _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
      __m128i r8 = _mm_packus_epi16(r16, r16);
      if constexpr (Bits == 8) r8 = _mm_min_epu8(r8, _mm_set1_epi8(127));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), r8);
    }
    for (i = tn; i < (tn + 3) / 4 * 4; ++i) out[i] = 0;
  }
}

/// exp(x) for x <= 0 (scores minus their running maximum), 8 lanes: 2^n 2^f with n = round(x
/// log2 e) and a degree-6 polynomial for e^r, |r| <= ln2 / 2 (relative error < 2e-7, against
/// xsimd::exp's special-value handling this path does not need); x < -87 gives 0.
KVC_FORCEINLINE __m256 exp_nonpos(__m256 x) noexcept {
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), live);
}

/// Integer key scores of tn tokens whose records start at `part` (rb bytes each, one token per
/// record: intn with a whole-head scale): s[g * stride + i] = ks_i qs_g (c_i . qi_g) + kz_i sum(q_g).
/// ks/kz/dots: scratch of >= tn + 8 floats, dots >= G * (tn + 8).
template <int Bits, std::int32_t G, quant::scheme Sch, bool HasZero>
inline void int_scores(const std::byte* part, std::size_t rb, std::size_t code_bytes, std::int32_t tn,
                       const int_query& iq, std::int32_t D, float* s, std::int32_t stride, float* ks, float* kz,
                       float* dots) noexcept {
  constexpr std::int32_t T = 8 / G;
  const std::uint8_t* rows[T];
  float r[8];
  std::int32_t i = 0;
  for (; i + T <= tn; i += T) {
    for (std::int32_t t = 0; t < T; ++t) rows[t] = reinterpret_cast<const std::uint8_t*>(part + rb * static_cast<std::size_t>(i + t));
    int_dots<Bits, G, T>(iq, D, rows, r);
    for (std::int32_t t = 0; t < T; ++t)
      for (std::int32_t g = 0; g < G; ++g) dots[g * stride + i + t] = r[t * G + g];
  }
  for (; i < tn; ++i) {
    rows[0] = reinterpret_cast<const std::uint8_t*>(part + rb * static_cast<std::size_t>(i));
    int_dots<Bits, G, 1>(iq, D, rows, r);
    for (std::int32_t g = 0; g < G; ++g) dots[g * stride + i] = r[g];
  }
  if constexpr (HasZero) gather_half_pairs(part, rb, code_bytes, tn, ks, kz);
  else gather_half_pairs(part, rb, code_bytes - 2, tn, kz, ks);  // [last code bytes][scale]: never past the record
  for (i = 0; i < tn; i += 8) {
    const __m256 sv = _mm256_loadu_ps(ks + i);
    // symmetric codes: zero = -2^(b-1) scale (quant::detail::affine_zero)
    const __m256 zv = HasZero ? _mm256_loadu_ps(kz + i) : _mm256_mul_ps(sv, _mm256_set1_ps(-static_cast<float>(1 << (Bits - 1))));
    for (std::int32_t g = 0; g < G; ++g) {
      const __m256 d = _mm256_loadu_ps(dots + g * stride + i);
      _mm256_storeu_ps(s + g * stride + i, _mm256_fmadd_ps(_mm256_mul_ps(sv, _mm256_set1_ps(iq.qs[g])), d,
                                                           _mm256_mul_ps(zv, _mm256_set1_ps(iq.qsum[g]))));
    }
  }
  (void)Sch;
}

#else
template <class Q>
constexpr bool intval_ok(std::int32_t) noexcept { return false; }
#endif

}  // namespace qdetail
KVC_END_ISA_NAMESPACE
}  // namespace cpu
KVC_END_NAMESPACE
