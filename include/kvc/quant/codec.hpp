// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Shared machinery of kvc's KV quantizers.
///
/// A quantizer (a *codec*) encodes one **record** of a stream: `tokens_per_record(role)` tokens x
/// head_dim values of K or of V, into `record_bytes(role, head_dim)` bytes. Pages of a
/// kvc::quant_cache hold `page_size / tokens_per_record` records for K followed by those for V.
/// Per-token codecs have one token per record (compaction moves records); per-channel codecs
/// (KIVI keys) have G tokens per record (compaction re-encodes changed records).
///
/// Integer codes are *affine*: x^ = scale * c + zero with unsigned codes c in [0, 2^b - 1]
/// (symmetric schemes store zero = -2^(b-1) * scale implicitly). Codes of 1, 2, 4 and 8 bits are
/// bit-packed LSB first: element i lives in byte (i*b)/8 at bit (i*b)%8, which on a little-endian
/// machine is the order of KIVI's int32 packing. 3-bit codes are packed in blocks of 16 codes in 6
/// bytes: bytes 0-3 hold the low two bits of each code (the 2-bit packing), bytes 4-5 the third bit
/// (the 1-bit packing). Why planes: no code straddles a byte, and the SIMD loaders read a block as
/// the 2-bit loader does plus one 16-bit word (interleaved 3-bit codes cross bytes 3 times in 8).
/// Scales and zero points are stored as binary16, rounded *outwards* (scale up, zero down) so that
/// every element keeps the analytic bound |x - x^| <= scale / 2.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <kvc/error.hpp>
#include <kvc/isa.hpp>
#include <kvc/numeric/half.hpp>

#if (defined(__AVX2__) && defined(__F16C__) && !defined(__CUDA_ARCH__)) || KVC_X86_DISPATCH
#include <immintrin.h>
#endif

KVC_BEGIN_NAMESPACE
namespace quant {

/// Which of K or V a codec encodes; a codec may treat them differently (KIVI).
enum class role { key, value };

/// Integer quantization scheme.
enum class scheme {
  symmetric,   ///< zero point 0: x^ = scale * (c - 2^(b-1)), scale = max|x| / (2^(b-1) - 1)
  asymmetric,  ///< min/max: scale = (max - min) / (2^b - 1), zero = min
};

/// A bit-packed block of N codes of Bits bits (its size is checked at compile time, so host and
/// device agree on it).
template <int Bits, int N>
struct packed_block {
  static_assert(Bits == 1 || Bits == 2 || Bits == 3 || Bits == 4 || Bits == 8,
                "kvc::quant::packed_block: Bits must be 1, 2, 3, 4 or 8");
  static_assert(N > 0 && (N * Bits) % 8 == 0, "kvc::quant::packed_block: N * Bits must fill whole bytes");
  static_assert(Bits != 3 || N % 16 == 0, "kvc::quant::packed_block: 3-bit codes come in blocks of 16 (6 bytes)");
  static constexpr int bits = Bits;
  static constexpr int size = N;
  std::uint8_t bytes[N * Bits / 8];
};
static_assert(sizeof(packed_block<2, 32>) == 8, "32 two-bit codes are 8 bytes");
static_assert(sizeof(packed_block<4, 32>) == 16, "32 four-bit codes are 16 bytes");
static_assert(sizeof(packed_block<8, 32>) == 32, "32 eight-bit codes are 32 bytes");
static_assert(sizeof(packed_block<3, 32>) == 12, "32 three-bit codes are 2 blocks of 6 bytes");

namespace detail {

/// Whether codes of Bits bits are packed as described above; 3-bit rows need whole blocks of 16.
template <int Bits>
inline constexpr bool packable_bits = Bits == 2 || Bits == 3 || Bits == 4 || Bits == 8;
/// Codes per packing unit: a row or group of codes must hold a whole number of them.
template <int Bits>
inline constexpr int pack_unit = Bits == 3 ? 16 : 8 / Bits;

/// Packs n codes (each < 2^Bits) LSB first. n * Bits must be a multiple of 8 (of 48 for 3 bits:
/// whole blocks of 16).
template <int Bits>
KVC_HOST_DEVICE void pack_codes(const std::uint8_t* codes, int n, std::uint8_t* out) noexcept {
  if constexpr (Bits == 8) {
    for (int i = 0; i < n; ++i) out[i] = codes[i];
  } else if constexpr (Bits == 3) {
    for (int j = 0; j < n / 16; ++j) {
      const std::uint8_t* c = codes + 16 * j;
      std::uint8_t* o = out + 6 * j;
      for (int k = 0; k < 4; ++k)
        o[k] = static_cast<std::uint8_t>((c[4 * k] & 3u) | (c[4 * k + 1] & 3u) << 2 | (c[4 * k + 2] & 3u) << 4 |
                                         (c[4 * k + 3] & 3u) << 6);
      for (int k = 0; k < 2; ++k) {
        unsigned b = 0;
        for (int i = 0; i < 8; ++i) b |= (static_cast<unsigned>(c[8 * k + i]) >> 2 & 1u) << i;
        o[4 + k] = static_cast<std::uint8_t>(b);
      }
    }
  } else {
    constexpr int per = 8 / Bits;
    for (int j = 0; j < n / per; ++j) {
      unsigned b = 0;
      for (int k = 0; k < per; ++k) b |= static_cast<unsigned>(codes[j * per + k]) << (k * Bits);
      out[j] = static_cast<std::uint8_t>(b);
    }
  }
}

template <int Bits>
KVC_HOST_DEVICE unsigned unpack_code(const std::uint8_t* in, int i) noexcept {
  if constexpr (Bits == 8) {
    return in[i];
  } else if constexpr (Bits == 3) {
    const std::uint8_t* b = in + i / 16 * 6;
    const int k = i % 16;
    return (static_cast<unsigned>(b[k / 4]) >> (k % 4 * 2) & 3u) | (static_cast<unsigned>(b[4 + k / 8]) >> (k % 8) & 1u) << 2;
  } else {
    constexpr int per = 8 / Bits;
    return (static_cast<unsigned>(in[i / per]) >> ((i % per) * Bits)) & ((1u << Bits) - 1u);
  }
}

/// ORs code c (< 2^Bits) into element i of a packed row whose bytes start zeroed.
template <int Bits>
KVC_HOST_DEVICE void or_code(std::uint8_t* out, int i, unsigned c) noexcept {
  if constexpr (Bits == 3) {
    std::uint8_t* b = out + i / 16 * 6;
    const int k = i % 16;
    b[k / 4] = static_cast<std::uint8_t>(b[k / 4] | (c & 3u) << (k % 4 * 2));
    b[4 + k / 8] = static_cast<std::uint8_t>(b[4 + k / 8] | (c >> 2 & 1u) << (k % 8));
  } else {
    constexpr int per = 8 / Bits;
    out[i / per] = static_cast<std::uint8_t>(out[i / per] | c << ((i % per) * Bits));
  }
}

/// Smallest binary16 >= x (x finite, >= 0).
KVC_HOST_DEVICE half half_up(float x) noexcept {
  half h(x);
  if (static_cast<float>(h) < x) h.bits = static_cast<std::uint16_t>(h.bits + 1);
  return h;
}
/// Largest binary16 <= x (x finite).
KVC_HOST_DEVICE half half_down(float x) noexcept {
  half h(x);
  if (static_cast<float>(h) > x) {
    if (h.bits & 0x8000u) h.bits = static_cast<std::uint16_t>(h.bits + 1);  // more negative
    else if (h.bits == 0) h.bits = 0x8001u;                                   // -smallest subnormal
    else h.bits = static_cast<std::uint16_t>(h.bits - 1);
  }
  return h;
}

KVC_HOST_DEVICE float round_half_away(float v) noexcept { return std::floor(v + 0.5f); }

/// Affine parameters of n values read with a stride, rounded outwards to binary16.
template <int Bits, scheme S>
KVC_HOST_DEVICE void affine_fit(const float* x, int n, int stride, half& scale, half& zero) noexcept {
  constexpr float qmax = static_cast<float>((1 << Bits) - 1);
  if constexpr (S == scheme::symmetric) {
    float amax = 0.0f;
    for (int i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i * stride]));
    constexpr float half_range = static_cast<float>((1 << (Bits - 1)) - 1);
    scale = half_up(amax / half_range);
    zero = half(0.0f);
  } else {
    float lo = x[0], hi = x[0];
    for (int i = 1; i < n; ++i) {
      lo = std::min(lo, x[i * stride]);
      hi = std::max(hi, x[i * stride]);
    }
    zero = half_down(lo);
    scale = half_up((hi - static_cast<float>(zero)) / qmax);
  }
}

/// Effective zero point used by decode (symmetric codes are offset by 2^(b-1)).
template <int Bits, scheme S>
KVC_HOST_DEVICE float affine_zero(float scale, float zero) noexcept {
  if constexpr (S == scheme::symmetric) return -static_cast<float>(1 << (Bits - 1)) * scale;
  else return zero;
}

template <int Bits, scheme S>
KVC_HOST_DEVICE std::uint8_t affine_code(float x, float inv_scale, float zero_eff) noexcept {
  constexpr float qmax = static_cast<float>((1 << Bits) - 1);
  constexpr float qmin = S == scheme::symmetric ? 1.0f : 0.0f;
  float c = round_half_away((x - zero_eff) * inv_scale);
  c = std::min(std::max(c, qmin), qmax);
  return static_cast<std::uint8_t>(c);
}

// ---- vectorised row decoders (AVX2 + F16C on the host; scalar elsewhere) ----
//
// The codecs below are types shared by every TU (quant_cache's template arguments), so their
// members must have one body whatever the TU's -m flags (docs/isa.md): their AVX2 paths are
// KVC_TARGET_AVX2 functions chosen at run time. KVC_QUANT_AVX2 says whether *this TU* targets
// AVX2 + F16C; only ISA-namespaced code (the kernels of <kvc/cpu/>) may test it.

#if defined(__AVX2__) && defined(__F16C__) && !defined(__CUDA_ARCH__)
#define KVC_QUANT_AVX2 1
#else
#define KVC_QUANT_AVX2 0
#endif

#if KVC_X86_DISPATCH
/// 16 codes of Bits bits starting at byte `in` -> 16 bytes.
template <int Bits>
KVC_TARGET_AVX2 inline __m128i unpack16(const std::uint8_t* in) noexcept {
  if constexpr (Bits == 8) {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(in));
  } else if constexpr (Bits == 3) {
    // the 2-bit plane, then bit k of the 16-bit plane word spread to byte k as 4 or 0
    std::uint16_t h;
    std::memcpy(&h, in + 4, 2);
    const __m128i sel = _mm_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128);
    const __m128i hb = _mm_shuffle_epi8(_mm_cvtsi32_si128(h), _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1));
    const __m128i hi = _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(hb, sel), sel), _mm_set1_epi8(4));
    return _mm_or_si128(unpack16<2>(in), hi);
  } else if constexpr (Bits == 4) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(in));
    const __m128i m = _mm_set1_epi8(0x0f);
    return _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
  } else {
    std::int32_t w;
    std::memcpy(&w, in, 4);
    const __m128i b = _mm_cvtsi32_si128(w);
    const __m128i m = _mm_set1_epi8(0x03);
    const __m128i p0 = _mm_and_si128(b, m), p1 = _mm_and_si128(_mm_srli_epi16(b, 2), m);
    const __m128i p2 = _mm_and_si128(_mm_srli_epi16(b, 4), m), p3 = _mm_and_si128(_mm_srli_epi16(b, 6), m);
    return _mm_unpacklo_epi16(_mm_unpacklo_epi8(p0, p1), _mm_unpacklo_epi8(p2, p3));
  }
}

/// decode_affine_row's first n - n % 16 values; returns how many it did.
template <int Bits>
KVC_TARGET_AVX2 inline int decode_affine_row_avx2(const std::uint8_t* codes, int n, float s, float z, float* out) noexcept {
  int i = 0;
  const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
  for (; i + 16 <= n; i += 16) {
    const __m128i c = unpack16<Bits>(codes + i * Bits / 8);
    const __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c));
    const __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8)));
    _mm256_storeu_ps(out + i, _mm256_fmadd_ps(f0, vs, vz));
    _mm256_storeu_ps(out + i + 8, _mm256_fmadd_ps(f1, vs, vz));
  }
  return i;
}

/// decode_affine_row_pc's first n - n % 16 values; returns how many it did.
template <int Bits>
KVC_TARGET_AVX2 inline int decode_affine_row_pc_avx2(const std::uint8_t* codes, int n, const half* s, const half* z,
                                                     float* out) noexcept {
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m128i c = unpack16<Bits>(codes + i * Bits / 8);
    const __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c));
    const __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8)));
    const __m256 s0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    const __m256 s1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 8)));
    const __m256 z0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z + i)));
    const __m256 z1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z + i + 8)));
    _mm256_storeu_ps(out + i, _mm256_fmadd_ps(f0, s0, z0));
    _mm256_storeu_ps(out + i + 8, _mm256_fmadd_ps(f1, s1, z1));
  }
  return i;
}
#endif  // KVC_X86_DISPATCH

/// out[i] = s * code_i + z for n codes (any n; SIMD for multiples of 16).
template <int Bits>
inline void decode_affine_row(const std::uint8_t* codes, int n, float s, float z, float* out) noexcept {
  int i = 0;
#if KVC_X86_DISPATCH
  if (kvc::detail::cpu_has_avx2_fma_f16c()) i = decode_affine_row_avx2<Bits>(codes, n, s, z, out);
#endif
  for (; i < n; ++i) out[i] = s * static_cast<float>(unpack_code<Bits>(codes, i)) + z;
}

/// out[d] = s[d] * code_d + z[d] (per-channel scales and zeros stored as binary16).
template <int Bits>
inline void decode_affine_row_pc(const std::uint8_t* codes, int n, const half* s, const half* z, float* out) noexcept {
  int i = 0;
#if KVC_X86_DISPATCH
  if (kvc::detail::cpu_has_avx2_fma_f16c()) i = decode_affine_row_pc_avx2<Bits>(codes, n, s, z, out);
#endif
  for (; i < n; ++i) {
    half sh, zh;
    std::memcpy(&sh, s + i, 2);
    std::memcpy(&zh, z + i, 2);
    out[i] = static_cast<float>(sh) * static_cast<float>(unpack_code<Bits>(codes, i)) + static_cast<float>(zh);
  }
}

// ---- per-token affine records: [codes D*b/8][scale half x ng][zero half x ng (asymmetric)] ----

/// Per-token affine quantization of one head row in groups of Group channels (0: the whole row).
template <int Bits, scheme S, int Group>
struct token_affine {
  static_assert(packable_bits<Bits>,
                "kvc::quant: integer codecs support 2, 3, 4 or 8 bits (use fp8<> for 8-bit floats)");
  static_assert(Bits != 3 || Group % 16 == 0, "kvc::quant: 3-bit groups must be a multiple of 16 channels (whole 6-byte blocks)");
  static constexpr bool has_zero = S == scheme::asymmetric;
  KVC_HOST_DEVICE static int group(int D) noexcept { return Group == 0 ? D : Group; }
  KVC_HOST_DEVICE static int groups(int D) noexcept { return D / group(D); }
  KVC_HOST_DEVICE static std::size_t code_bytes(int D) noexcept { return static_cast<std::size_t>(D) * Bits / 8; }
  KVC_HOST_DEVICE static std::size_t record_bytes(int D) noexcept {
    return code_bytes(D) + static_cast<std::size_t>(groups(D)) * 2 * (has_zero ? 2 : 1);
  }
  static void check(int D, const char* who) {
    KVC_EXPECTS(D > 0, who, ": head_dim = ", D, ", expected > 0");
    KVC_EXPECTS(D % pack_unit<Bits> == 0, who, ": head_dim = ", D, ", expected a multiple of ", pack_unit<Bits>,
                " for ", Bits, "-bit packing");
    KVC_EXPECTS(D <= 1024 && D / (Group == 0 ? D : Group) <= 64, who, ": head_dim = ", D,
                ", expected <= 1024 and at most 64 groups per row");
    KVC_EXPECTS(D % group(D) == 0, who, ": head_dim = ", D, ", expected a multiple of the group size ", Group);
  }
  KVC_HOST_DEVICE static half* scales(std::byte* rec, int D) noexcept { return reinterpret_cast<half*>(rec + code_bytes(D)); }
  KVC_HOST_DEVICE static const half* scales(const std::byte* rec, int D) noexcept {
    return reinterpret_cast<const half*>(rec + code_bytes(D));
  }
  KVC_HOST_DEVICE static const half* zeros(const std::byte* rec, int D) noexcept { return scales(rec, D) + groups(D); }

  KVC_HOST_DEVICE static void encode(const float* x, int D, std::byte* rec) noexcept {
#if KVC_X86_DISPATCH
    if (group(D) % 8 == 0 && kvc::detail::cpu_has_avx2_fma_f16c()) return encode_avx2(x, D, rec);
#endif
    const int g = group(D), ng = groups(D);
    std::uint8_t codes[1024];
    std::uint8_t* out = reinterpret_cast<std::uint8_t*>(rec);
    half sh[64], zh[64];
    for (int j = 0; j < ng; ++j) {
      affine_fit<Bits, S>(x + j * g, g, 1, sh[j], zh[j]);
      const float s = static_cast<float>(sh[j]);
      const float z = affine_zero<Bits, S>(s, static_cast<float>(zh[j]));
      const float inv = s > 0.0f ? 1.0f / s : 0.0f;
      for (int i = 0; i < g; ++i) codes[j * g + i] = s > 0.0f ? affine_code<Bits, S>(x[j * g + i], inv, z)
                                                              : static_cast<std::uint8_t>(S == scheme::symmetric ? (1 << (Bits - 1)) : 0);
    }
    pack_codes<Bits>(codes, D, out);
    std::memcpy(rec + code_bytes(D), sh, static_cast<std::size_t>(ng) * 2);
    if constexpr (has_zero) std::memcpy(rec + code_bytes(D) + static_cast<std::size_t>(ng) * 2, zh, static_cast<std::size_t>(ng) * 2);
  }

#if KVC_X86_DISPATCH
  /// encode() 8 channels at a time on the host (same fit, same codes up to the compiler's
  /// contraction of the scalar (x - z) * inv + 0.5 into an FMA, which can move an exact tie by
  /// one code; both satisfy |x - x^| <= scale / 2). Same layout. The scalar encoder ran append at
  /// 0.28 GB/s of fp16 input (BM_quant_append int2 32x8x128).
  KVC_TARGET_AVX2 static void encode_avx2(const float* x, int D, std::byte* rec) noexcept {
    const int g = group(D), ng = groups(D);
    alignas(32) std::uint8_t codes[1024];
    half sh[64], zh[64];
    constexpr float qmax = static_cast<float>((1 << Bits) - 1);
    constexpr float qmin = S == scheme::symmetric ? 1.0f : 0.0f;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int j = 0; j < ng; ++j) {
      const float* xj = x + j * g;
      __m256 lo = _mm256_loadu_ps(xj), hi = S == scheme::symmetric ? _mm256_and_ps(lo, absmask) : lo;
      for (int i = 8; i < g; i += 8) {
        const __m256 v = _mm256_loadu_ps(xj + i);
        if constexpr (S == scheme::symmetric) {
          hi = _mm256_max_ps(hi, _mm256_and_ps(v, absmask));
        } else {
          lo = _mm256_min_ps(lo, v);
          hi = _mm256_max_ps(hi, v);
        }
      }
      alignas(32) float l8[8], h8[8];
      _mm256_store_ps(l8, lo);
      _mm256_store_ps(h8, hi);
      float lmin = l8[0], hmax = h8[0];
      for (int i = 1; i < 8; ++i) lmin = std::min(lmin, l8[i]), hmax = std::max(hmax, h8[i]);
      if constexpr (S == scheme::symmetric) {
        constexpr float half_range = static_cast<float>((1 << (Bits - 1)) - 1);
        sh[j] = half_up(hmax / half_range);
        zh[j] = half(0.0f);
      } else {
        zh[j] = half_down(lmin);
        sh[j] = half_up((hmax - static_cast<float>(zh[j])) / qmax);
      }
      const float sc = static_cast<float>(sh[j]);
      const float z = affine_zero<Bits, S>(sc, static_cast<float>(zh[j]));
      if (!(sc > 0.0f)) {
        std::memset(codes + j * g, S == scheme::symmetric ? (1 << (Bits - 1)) : 0, static_cast<std::size_t>(g));
        continue;
      }
      const __m256 inv = _mm256_set1_ps(1.0f / sc), zv = _mm256_set1_ps(z), hv = _mm256_set1_ps(0.5f);
      const __m256 lo_c = _mm256_set1_ps(qmin), hi_c = _mm256_set1_ps(qmax);
      for (int i = 0; i < g; i += 8) {
        __m256 c = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xj + i), zv), inv), hv));
        c = _mm256_min_ps(_mm256_max_ps(c, lo_c), hi_c);
        const __m256i ci = _mm256_cvtps_epi32(c);
        const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(ci), _mm256_extracti128_si256(ci, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + j * g + i), _mm_packus_epi16(w, w));
      }
    }
    pack_codes<Bits>(codes, D, reinterpret_cast<std::uint8_t*>(rec));
    std::memcpy(rec + code_bytes(D), sh, static_cast<std::size_t>(ng) * 2);
    if constexpr (has_zero) std::memcpy(rec + code_bytes(D) + static_cast<std::size_t>(ng) * 2, zh, static_cast<std::size_t>(ng) * 2);
  }
#endif

  static void decode(const std::byte* rec, int D, float* out) noexcept {
    const int g = group(D), ng = groups(D);
    const std::uint8_t* c = reinterpret_cast<const std::uint8_t*>(rec);
    half sh[64], zh[64];
    std::memcpy(sh, rec + code_bytes(D), static_cast<std::size_t>(ng) * 2);
    if constexpr (has_zero) std::memcpy(zh, rec + code_bytes(D) + static_cast<std::size_t>(ng) * 2, static_cast<std::size_t>(ng) * 2);
    for (int j = 0; j < ng; ++j) {
      const float s = static_cast<float>(sh[j]);
      const float z = affine_zero<Bits, S>(s, has_zero ? static_cast<float>(zh[j]) : 0.0f);
      decode_affine_row<Bits>(c + static_cast<std::size_t>(j) * g * Bits / 8, g, s, z, out + static_cast<std::size_t>(j) * g);
    }
  }
};

// ---- per-channel affine records over G tokens: [G rows of D*b/8 codes][scale half x D][zero half x D] ----

/// Per-channel asymmetric quantization of G tokens (KIVI keys): channel d of the G tokens shares
/// one scale and zero point.
template <int Bits, int G>
struct channel_affine {
  static_assert(packable_bits<Bits>, "kvc::quant: integer codecs support 2, 3, 4 or 8 bits");
  static_assert(G >= 2, "kvc::quant: per-channel groups need at least 2 tokens (KIVI buffers a whole group)");
  KVC_HOST_DEVICE static std::size_t row_bytes(int D) noexcept { return static_cast<std::size_t>(D) * Bits / 8; }
  KVC_HOST_DEVICE static std::size_t code_bytes(int D) noexcept { return row_bytes(D) * G; }
  KVC_HOST_DEVICE static std::size_t record_bytes(int D) noexcept { return code_bytes(D) + static_cast<std::size_t>(D) * 4; }
  static void check(int D, const char* who) {
    KVC_EXPECTS(D > 0, who, ": head_dim = ", D, ", expected > 0");
    KVC_EXPECTS(D % pack_unit<Bits> == 0, who, ": head_dim = ", D, ", expected a multiple of ", pack_unit<Bits>,
                " for ", Bits, "-bit packing");
    KVC_EXPECTS(D <= 1024, who, ": head_dim = ", D, ", expected <= 1024");
  }
  KVC_HOST_DEVICE static const half* scales(const std::byte* rec, int D) noexcept {
    return reinterpret_cast<const half*>(rec + code_bytes(D));
  }
  KVC_HOST_DEVICE static const half* zeros(const std::byte* rec, int D) noexcept { return scales(rec, D) + D; }

  /// x: [G][D]
  KVC_HOST_DEVICE static void encode(const float* x, int D, std::byte* rec) noexcept {
#if KVC_X86_DISPATCH
    if (D % 8 == 0 && kvc::detail::cpu_has_avx2_fma_f16c()) return encode_avx2(x, D, rec);
#endif
    std::uint8_t* codes = reinterpret_cast<std::uint8_t*>(rec);
    for (std::size_t b = 0; b < code_bytes(D); ++b) codes[b] = 0;
    for (int d = 0; d < D; ++d) encode_channel(x, D, d, rec);
  }

  /// Channel d of encode(): its min/max grid and its G codes (the code bytes start zeroed).
  KVC_HOST_DEVICE static void encode_channel(const float* x, int D, int d, std::byte* rec) noexcept {
    std::uint8_t* codes = reinterpret_cast<std::uint8_t*>(rec);
    half* sh = reinterpret_cast<half*>(rec + code_bytes(D));
    half* zh = sh + D;
    half s, z;
    affine_fit<Bits, scheme::asymmetric>(x + d, G, D, s, z);
    std::memcpy(sh + d, &s, 2);
    std::memcpy(zh + d, &z, 2);
    const float sf = static_cast<float>(s), zf = static_cast<float>(z);
    const float inv = sf > 0.0f ? 1.0f / sf : 0.0f;
    for (int t = 0; t < G; ++t) {
      const unsigned c = sf > 0.0f ? affine_code<Bits, scheme::asymmetric>(x[t * D + d], inv, zf) : 0u;
      or_code<Bits>(codes + row_bytes(D) * t, d, c);
    }
  }

#if KVC_X86_DISPATCH
  /// encode() 8 channels at a time on the host: the min/max over the G tokens and the codes are
  /// vector ops across channels; the binary16 rounding of each channel's scale and zero stays the
  /// scalar half_up/half_down. Same layout, same codes (up to FMA contraction of the scalar
  /// expression at exact ties, as token_affine::encode_avx2).
  KVC_TARGET_AVX2 static void encode_avx2(const float* x, int D, std::byte* rec) noexcept {
    alignas(32) std::uint8_t codes[G][1024];
    half* sh = reinterpret_cast<half*>(rec + code_bytes(D));
    half* zh = sh + D;
    constexpr float qmax = static_cast<float>((1 << Bits) - 1);
    for (int d = 0; d < D; d += 8) {
      __m256 lo = _mm256_loadu_ps(x + d), hi = lo;
      for (int t = 1; t < G; ++t) {
        const __m256 v = _mm256_loadu_ps(x + static_cast<std::size_t>(t) * D + d);
        lo = _mm256_min_ps(lo, v);
        hi = _mm256_max_ps(hi, v);
      }
      alignas(32) float l8[8], h8[8], s8[8], z8[8], i8[8];
      _mm256_store_ps(l8, lo);
      _mm256_store_ps(h8, hi);
      for (int e = 0; e < 8; ++e) {
        const half z = half_down(l8[e]);
        const half sc = half_up((h8[e] - static_cast<float>(z)) / qmax);
        std::memcpy(sh + d + e, &sc, 2);
        std::memcpy(zh + d + e, &z, 2);
        s8[e] = static_cast<float>(sc);
        z8[e] = static_cast<float>(z);
        i8[e] = s8[e] > 0.0f ? 1.0f / s8[e] : 0.0f;  // scale 0: every code 0
      }
      const __m256 zv = _mm256_load_ps(z8), inv = _mm256_load_ps(i8), hv = _mm256_set1_ps(0.5f);
      const __m256 hi_c = _mm256_set1_ps(qmax);
      for (int t = 0; t < G; ++t) {
        const __m256 v = _mm256_loadu_ps(x + static_cast<std::size_t>(t) * D + d);
        __m256 c = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(v, zv), inv), hv));
        c = _mm256_min_ps(_mm256_max_ps(c, _mm256_setzero_ps()), hi_c);
        c = _mm256_and_ps(c, _mm256_cmp_ps(inv, _mm256_setzero_ps(), _CMP_GT_OQ));
        const __m256i ci = _mm256_cvtps_epi32(c);
        const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(ci), _mm256_extracti128_si256(ci, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(&codes[t][d]), _mm_packus_epi16(w, w));
      }
    }
    for (int t = 0; t < G; ++t) pack_codes<Bits>(codes[t], D, reinterpret_cast<std::uint8_t*>(rec) + row_bytes(D) * t);
  }
#endif

  /// encode() for tokens that were decoded from records of this codec (the survivors of a keep
  /// compacted into new groups, a partial group completed by append). Every channel gets a dyadic
  /// grid, scale 2^e and zero m 2^e, with the smallest e whose 2^Bits codes span the group, so a
  /// value already on a grid of step 2^e or finer is stored exactly. Why: encode() fits a new
  /// min/max grid to the survivors at every compaction, and decode-time eviction compacts the
  /// groups after each evicted token at every step, so a surviving key was rounded again at each
  /// one. The 1,024 surviving keys of a 2,048-token KIVI-4 stream (D = 64, 16-token chunks, half
  /// evicted at random after each chunk: tests/quant/test_requant.cpp) ended with 4.1x the rms
  /// error of one encoding. With dyadic grids a key is rounded again only when its group needs a
  /// coarser grid than any it sat on, at most once per doubling of the step: 2.0x, most of it the
  /// first repack's coarser step. Rounding error <= scale / 2, as encode().
  static void repack(const float* x, int D, std::byte* rec) noexcept {
    std::uint8_t* codes = reinterpret_cast<std::uint8_t*>(rec);
    for (std::size_t b = 0; b < code_bytes(D); ++b) codes[b] = 0;
    half* sh = reinterpret_cast<half*>(rec + code_bytes(D));
    half* zh = sh + D;
    for (int d = 0; d < D; ++d) {
      double lo = x[d], hi = x[d];
      for (int t = 1; t < G; ++t) {
        lo = std::min(lo, static_cast<double>(x[t * D + d]));
        hi = std::max(hi, static_cast<double>(x[t * D + d]));
      }
      std::int32_t e = 0;
      double m = 0;
      if (!dyadic_grid(lo, hi, e, m)) {  // past binary16's steps (a 2-bit range over ~98,000) or not finite: encode's grid
        encode_channel(x, D, d, rec);
        continue;
      }
      const double step = std::ldexp(1.0, e);
      const half s(static_cast<float>(step)), z(static_cast<float>(m * step));
      std::memcpy(sh + d, &s, 2);
      std::memcpy(zh + d, &z, 2);
      for (int t = 0; t < G; ++t) {
        const double c = std::nearbyint(static_cast<double>(x[t * D + d]) / step) - m;
        const unsigned ci = static_cast<unsigned>(std::min(std::max(c, 0.0), static_cast<double>((1 << Bits) - 1)));
        or_code<Bits>(codes + row_bytes(D) * t, d, ci);
      }
    }
  }

  /// The smallest step 2^e (binary16: e >= -24) and an integer m such that lo and hi round to
  /// codes 0..2^Bits-1 of the grid m 2^e + c 2^e, with m 2^e and 2^e exact in binary16; false
  /// when no step up to 2^15 (binary16's largest power of two) spans them.
  static bool dyadic_grid(double lo, double hi, std::int32_t& e, double& m) noexcept {
    constexpr double qmax = (1 << Bits) - 1;
    if (!std::isfinite(lo) || !std::isfinite(hi)) return false;  // NaN/Inf (check_finite off): encode's handling
    e = -24;
    if (hi > lo) e = std::max(e, static_cast<std::int32_t>(std::ceil(std::log2((hi - lo) / qmax))) - 1);
    for (; e <= 15; ++e) {
      const double step = std::ldexp(1.0, e);
      const double a = std::nearbyint(lo / step), b = std::nearbyint(hi / step);
      if (b - a > qmax) continue;
      // m in [b - qmax, a] with m 2^e exact in binary16: a with its low bits cleared, fewest first.
      for (int k = 0; k < 64; ++k) {
        const double q = std::ldexp(1.0, k), mk = std::floor(a / q) * q;
        if (mk < b - qmax) break;
        const double zv = mk * step;
        if (std::fabs(zv) <= 65504.0 && static_cast<double>(static_cast<float>(half(static_cast<float>(zv)))) == zv) {
          m = mk;
          return true;
        }
      }
    }
    return false;
  }

  /// Token i of the record into out[D].
  static void decode_token(const std::byte* rec, int D, int i, float* out) noexcept {
    decode_affine_row_pc<Bits>(reinterpret_cast<const std::uint8_t*>(rec) + row_bytes(D) * i, D, scales(rec, D),
                               zeros(rec, D), out);
  }

  static void decode(const std::byte* rec, int D, float* out) noexcept {
    for (int t = 0; t < G; ++t) decode_token(rec, D, t, out + static_cast<std::size_t>(t) * D);
  }
};

}  // namespace detail

// ---- codec traits ------------------------------------------------------------------------

namespace detail {
template <class Q, class = void>
struct has_codec_interface : std::false_type {};
template <class Q>
struct has_codec_interface<
    Q, std::void_t<decltype(Q::tokens_per_record(role::key)),
                   decltype(std::declval<const Q&>().record_bytes(role::key, 0)),
                   decltype(std::declval<const Q&>().template encode<role::key>(nullptr, 0, nullptr)),
                   decltype(std::declval<const Q&>().template decode<role::key>(nullptr, 0, nullptr)),
                   decltype(std::declval<const Q&>().template decode_token<role::key>(nullptr, 0, 0, nullptr)),
                   decltype(std::declval<const Q&>().check(0)), decltype(std::declval<const Q&>().residual()),
                   decltype(Q::rotates)>> : std::true_type {};
}  // namespace detail

/// Whether Q provides the codec interface quant_cache and the attention kernels use.
template <class Q>
inline constexpr bool is_codec_v = detail::has_codec_interface<Q>::value;

namespace detail {
template <class Q, class = void>
struct has_repack : std::false_type {};
template <class Q>
struct has_repack<Q, std::void_t<decltype(std::declval<const Q&>().template repack<role::key>(nullptr, 0, nullptr))>>
    : std::true_type {};
}  // namespace detail

/// Whether Q re-encodes decoded tokens with its own `repack<R>` (stable under repeated
/// compaction) rather than `encode<R>`; quant_cache uses it wherever it encodes tokens it decoded.
template <class Q>
inline constexpr bool has_repack_v = detail::has_repack<Q>::value;

/// Encodes one record of tokens decoded from records of Q: Q's repack where it has one.
template <role R, class Q>
void reencode(const Q& q, const float* x, int D, std::byte* rec) noexcept {
  if constexpr (has_repack_v<Q>) q.template repack<R>(x, D, rec);
  else q.template encode<R>(x, D, rec);
}

/// Decodes tokens [i0, i1) of a page part (records of Q for role R) into out[(i1-i0)][D].
/// `tmp` must hold tokens_per_record * D floats when Q has more than one token per record.
template <role R, class Q>
void decode_rows(const Q& q, const std::byte* part, int D, int i0, int i1, float* out, float* tmp) {
  const int u = Q::tokens_per_record(R);
  const std::size_t rb = q.record_bytes(R, D);
  if (u == 1) {
    for (int i = i0; i < i1; ++i)
      q.template decode<R>(part + rb * static_cast<std::size_t>(i), D, out + static_cast<std::size_t>(i - i0) * D);
    return;
  }
  int i = i0;
  while (i < i1) {
    const int r = i / u, r0 = r * u, r1 = r0 + u;
    const std::byte* rec = part + rb * static_cast<std::size_t>(r);
    if (i == r0 && i1 >= r1) {
      q.template decode<R>(rec, D, out + static_cast<std::size_t>(i - i0) * D);
      i = r1;
    } else {
      const int e = std::min(i1, r1);
      for (; i < e; ++i) q.template decode_token<R>(rec, D, i - r0, out + static_cast<std::size_t>(i - i0) * D);
    }
  }
  (void)tmp;
}

}  // namespace quant
KVC_END_NAMESPACE

KVC_BEGIN_NAMESPACE
namespace quant {

/// Defaults shared by codecs: no residual window, no rotation, nothing to check.
struct codec_base {
  static constexpr bool rotates = false;
  std::int32_t residual() const noexcept { return 0; }
  void check(int) const {}
  /// Maps a model-domain row (a query, for keys) into the stored domain; identity unless rotated.
  void to_stored(float*, int) const noexcept {}
  /// Maps a stored-domain row (a decoded key or value, an attention output) back to the model domain.
  void to_model(float*, int) const noexcept {}
};

namespace detail {

/// The codec interface of KIVI's layout, whatever the key format: keys per channel in records of
/// Group tokens (KeyImpl), values per token (ValueImpl), the newest residual_tokens tokens kept in
/// full precision. kivi (uniform key levels) and nuq (fitted key levels) derive from it and add
/// their checks' name and what else is theirs.
template <class KeyImpl, class ValueImpl, int Group, int Residual>
struct grouped_key_codec : codec_base {
  using key_impl = KeyImpl;
  using value_impl = ValueImpl;
  static constexpr int group_size = Group;

  std::int32_t residual_tokens = Residual;

  static constexpr int tokens_per_record(role r) noexcept { return r == role::key ? Group : 1; }
  std::size_t record_bytes(role r, int D) const noexcept {
    return r == role::key ? key_impl::record_bytes(D) : value_impl::record_bytes(D);
  }
  std::int32_t residual() const noexcept { return residual_tokens; }
  template <role R>
  void encode(const float* x, int D, std::byte* rec) const noexcept {
    if constexpr (R == role::key) key_impl::encode(x, D, rec);
    else value_impl::encode(x, D, rec);
  }
  template <role R>
  void decode(const std::byte* rec, int D, float* out) const noexcept {
    if constexpr (R == role::key) key_impl::decode(rec, D, out);
    else value_impl::decode(rec, D, out);
  }
  template <role R>
  void decode_token(const std::byte* rec, int D, int i, float* out) const noexcept {
    if constexpr (R == role::key) key_impl::decode_token(rec, D, i, out);
    else value_impl::decode(rec, D, out);
  }

 protected:
  /// The residual window and both formats' head_dim rules, named as `who`.
  void check_as(int D, const char* who) const {
    KVC_EXPECTS(residual_tokens >= 0 && residual_tokens % Group == 0, who, ": residual = ", residual_tokens,
                ", expected a non-negative multiple of the group size ", Group);
    key_impl::check(D, who);
    value_impl::check(D, who);
  }
};

}  // namespace detail

}  // namespace quant
KVC_END_NAMESPACE
