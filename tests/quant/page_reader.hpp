// SPDX-License-Identifier: Apache-2.0
#pragma once
// An independent dequantizer of quant_cache pages, written from the documented record formats
// (codec.hpp, fp8.hpp, kivi.hpp, nuq.hpp): codes, binary16 scales and zero points, FP8 codes and float
// scales are read straight from the page bytes, in double, with the float-format models of
// float_formats.hpp. Nothing of the codecs' decode (nor gather(), which calls it) is used, so a
// decoding bug shared by gather, the views and the fused kernels shows up as a mismatch.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <kvc/quant/fp8.hpp>
#include <kvc/quant/int8.hpp>
#include <kvc/quant/kivi.hpp>
#include <kvc/quant/nuq.hpp>
#include <kvc/store/quant_cache.hpp>

#include "dense_reference.hpp"
#include "float_formats.hpp"
#include "kvc_catch.hpp"

namespace qpages {

/// binary16 at p (any alignment), from the independent model.
inline double h16_at(const std::byte* p) {
  std::uint16_t b;
  std::memcpy(&b, p, 2);
  return kvc_test::binary16.decode(b);
}
inline unsigned bit_at(const std::byte* p, std::size_t bit) {
  return (std::to_integer<unsigned>(p[bit / 8]) >> (bit % 8)) & 1u;
}
/// Code i of a bit-packed run, LSB first: element i occupies bits [i*b, i*b + b) of the run. 3-bit
/// runs are blocks of 48 bits per 16 codes (codec.hpp): code k of a block has its low two bits at
/// bits 2k, 2k+1 and its third bit at bit 32 + k.
inline unsigned code_at(const std::byte* codes, int i, int bits) {
  if (bits == 3) {
    const std::byte* blk = codes + static_cast<std::size_t>(i / 16) * 6;
    const std::size_t k = static_cast<std::size_t>(i % 16);
    return bit_at(blk, 2 * k) | bit_at(blk, 2 * k + 1) << 1 | bit_at(blk, 32 + k) << 2;
  }
  unsigned c = 0;
  for (int b = 0; b < bits; ++b) {
    const std::size_t bit = static_cast<std::size_t>(i) * bits + b;
    c |= ((std::to_integer<unsigned>(codes[bit / 8]) >> (bit % 8)) & 1u) << b;
  }
  return c;
}
/// Per-token affine record: [D*b/8 codes][scale binary16 x groups][zero binary16 x groups, when
/// asymmetric]; x = scale * c + zero, symmetric zero = -2^(b-1) * scale.
inline std::size_t token_affine_bytes(int D, int bits, bool asym, int group) {
  return static_cast<std::size_t>(D) * bits / 8 + static_cast<std::size_t>(D / group) * 2 * (asym ? 2 : 1);
}
inline void token_affine_read(const std::byte* rec, int D, int bits, bool asym, int group, double* out) {
  const std::byte* sc = rec + static_cast<std::size_t>(D) * bits / 8;
  const std::byte* zr = sc + 2 * static_cast<std::size_t>(D / group);
  for (int d = 0; d < D; ++d) {
    const int j = d / group;
    const double s = h16_at(sc + 2 * j), z = asym ? h16_at(zr + 2 * j) : -double(1 << (bits - 1)) * s;
    out[d] = s * code_at(rec, d, bits) + z;
  }
}
/// KIVI key record of G tokens: [G rows of D*b/8 codes][scale binary16 x D][zero binary16 x D].
inline std::size_t channel_affine_bytes(int D, int bits, int G) {
  return static_cast<std::size_t>(G) * D * bits / 8 + static_cast<std::size_t>(D) * 4;
}
inline void channel_affine_read(const std::byte* rec, int D, int bits, int G, int row, double* out) {
  const std::byte* codes = rec + static_cast<std::size_t>(row) * D * bits / 8;
  const std::byte* sc = rec + static_cast<std::size_t>(G) * D * bits / 8;
  for (int d = 0; d < D; ++d) out[d] = h16_at(sc + 2 * d) * code_at(codes, d, bits) + h16_at(sc + 2 * (D + d));
}

/// How a codec lays out its records: tokens per record, bytes per record, and token i of a record.
template <class Q>
struct layout;
template <int B, kvc::quant::scheme S, int Gr>
struct layout<kvc::quant::intn<B, S, Gr>> {
  static int tokens(kvc::quant::role) { return 1; }
  static std::size_t bytes(kvc::quant::role, int D) {
    return token_affine_bytes(D, B, S == kvc::quant::scheme::asymmetric, Gr ? Gr : D);
  }
  static void read(const kvc::quant::intn<B, S, Gr>&, kvc::quant::role, const std::byte* rec, int D, int, double* out) {
    token_affine_read(rec, D, B, S == kvc::quant::scheme::asymmetric, Gr ? Gr : D, out);
  }
};
template <int B, int G, int R>
struct layout<kvc::quant::kivi<B, G, R>> {
  static int tokens(kvc::quant::role r) { return r == kvc::quant::role::key ? G : 1; }
  static std::size_t bytes(kvc::quant::role r, int D) {
    return r == kvc::quant::role::key ? channel_affine_bytes(D, B, G) : token_affine_bytes(D, B, true, G);
  }
  static void read(const kvc::quant::kivi<B, G, R>&, kvc::quant::role r, const std::byte* rec, int D, int i, double* out) {
    if (r == kvc::quant::role::key) channel_affine_read(rec, D, B, G, i, out);
    else token_affine_read(rec, D, B, true, G, out);
  }
};
/// nuq key record of G tokens: [G rows of D*b/8 codes][range binary16 x D][minimum binary16 x D]
/// [2^b level bytes]; x = minimum + range * level[c] / 255. Values as KIVI's.
inline std::size_t channel_nuq_bytes(int D, int bits, int G) {
  return channel_affine_bytes(D, bits, G) + (std::size_t(1) << bits);
}
inline void channel_nuq_read(const std::byte* rec, int D, int bits, int G, int row, double* out) {
  const std::byte* codes = rec + static_cast<std::size_t>(row) * D * bits / 8;
  const std::byte* rg = rec + static_cast<std::size_t>(G) * D * bits / 8;
  const std::byte* lv = rg + static_cast<std::size_t>(D) * 4;
  for (int d = 0; d < D; ++d)
    out[d] = h16_at(rg + 2 * (D + d)) + h16_at(rg + 2 * d) * std::to_integer<unsigned>(lv[code_at(codes, d, bits)]) / 255.0;
}
template <int B, int G, int R>
struct layout<kvc::quant::nuq<B, G, R>> {
  static int tokens(kvc::quant::role r) { return r == kvc::quant::role::key ? G : 1; }
  static std::size_t bytes(kvc::quant::role r, int D) {
    return r == kvc::quant::role::key ? channel_nuq_bytes(D, B, G) : token_affine_bytes(D, B, true, G);
  }
  static void read(const kvc::quant::nuq<B, G, R>&, kvc::quant::role r, const std::byte* rec, int D, int i, double* out) {
    if (r == kvc::quant::role::key) channel_nuq_read(rec, D, B, G, i, out);
    else token_affine_read(rec, D, B, true, G, out);
  }
};
/// FP8: [D codes][float scale] per token and head, or [D codes] times the per-tensor k/v scale.
template <class F, kvc::quant::fp8_scaling Sc>
struct layout<kvc::quant::fp8<F, Sc>> {
  static constexpr bool per_tensor = Sc == kvc::quant::fp8_scaling::per_tensor;
  static int tokens(kvc::quant::role) { return 1; }
  static std::size_t bytes(kvc::quant::role, int D) { return static_cast<std::size_t>(D) + (per_tensor ? 0 : 4); }
  static void read(const kvc::quant::fp8<F, Sc>& q, kvc::quant::role r, const std::byte* rec, int D, int, double* out) {
    const kvc_test::float_format& fmt = std::is_same<F, kvc::fp8_e4m3>::value ? kvc_test::fp8_e4m3 : kvc_test::fp8_e5m2;
    float s;
    if (per_tensor) s = r == kvc::quant::role::key ? q.k_scale : q.v_scale;
    else std::memcpy(&s, rec + D, 4);
    for (int d = 0; d < D; ++d) out[d] = fmt.decode(std::to_integer<unsigned>(rec[d])) * double(s);
  }
};

/// A full-precision row (sink or residual tokens) of Fp elements.
template <class Fp>
void fp_read(const Fp* row, int D, double* out) {
  for (int d = 0; d < D; ++d) {
    if constexpr (std::is_same<Fp, kvc::half>::value) {
      std::uint16_t b;
      std::memcpy(&b, row + d, 2);
      out[d] = kvc_test::binary16.decode(b);
    } else {
      out[d] = double(row[d]);
    }
  }
}

/// Every kv head of one layer of a sequence, dequantized in double from the pages: sink tokens,
/// then the quantized ones (token i in page i / P, slot i % P; a page holds P / tokens_per_record
/// key records, then as many value records), then the residual window.
template <class KQ, class VQ, class Fp>
std::vector<kvc_test::dense_head> read_pages(const kvc::quant_cache<KQ, VQ, Fp>& cache, kvc::seq_id s, int layer) {
  using kvc::quant::role;
  const int D = cache.config().head_dim, P = cache.config().page_size, H = cache.config().num_kv_heads;
  const int uk = layout<KQ>::tokens(role::key), uv = layout<VQ>::tokens(role::value);
  const std::size_t rbk = layout<KQ>::bytes(role::key, D), rbv = layout<VQ>::bytes(role::value, D);
  const std::size_t v_off = rbk * static_cast<std::size_t>(P / uk);
  std::vector<kvc_test::dense_head> heads(static_cast<std::size_t>(H));
  for (int h = 0; h < H; ++h) {
    const auto sv = cache.view(s, layer, h);
    REQUIRE(sv.v_offset == v_off);  // the documented page layout
    REQUIRE(sv.page_bytes >= v_off + rbv * static_cast<std::size_t>(P / uv));
    auto& dh = heads[static_cast<std::size_t>(h)];
    dh.n = sv.length();
    dh.k.resize(static_cast<std::size_t>(dh.n) * D);
    dh.v.resize(dh.k.size());
    for (int t = 0; t < dh.n; ++t) {
      double* k = dh.k.data() + static_cast<std::size_t>(t) * D;
      double* v = dh.v.data() + static_cast<std::size_t>(t) * D;
      if (t < sv.n_sink) {
        fp_read(sv.sink_k + static_cast<std::size_t>(t) * D, D, k);
        fp_read(sv.sink_v + static_cast<std::size_t>(t) * D, D, v);
      } else if (t < sv.n_sink + sv.n_quant) {
        const int i = t - sv.n_sink, slot = i % P;
        const std::byte* page = sv.quant_base + static_cast<std::size_t>(sv.pages[i / P]) * sv.page_bytes;
        layout<KQ>::read(cache.key_quantizer(), role::key, page + rbk * static_cast<std::size_t>(slot / uk), D, slot % uk, k);
        layout<VQ>::read(cache.value_quantizer(), role::value, page + v_off + rbv * static_cast<std::size_t>(slot / uv), D,
                         slot % uv, v);
      } else {
        const std::size_t r = static_cast<std::size_t>(t - sv.n_sink - sv.n_quant) * D;
        fp_read(sv.res_k + r, D, k);
        fp_read(sv.res_v + r, D, v);
      }
    }
  }
  return heads;
}

/// Query heads, kv heads and head_dim of a test cache.
struct shape {
  int hq, hkv, D;
};

inline kvc::quant_cache_config cache_config(const shape& sh, int page_size, int layers, int sinks = 0) {
  kvc::quant_cache_config c;
  c.num_layers = layers;
  c.num_kv_heads = sh.hkv;
  c.head_dim = sh.D;
  c.page_size = page_size;
  c.max_pages = 4096;
  c.max_fp_pages = 64;
  c.sink_tokens = sinks;
  return c;
}

}  // namespace qpages
