// SPDX-License-Identifier: Apache-2.0
// Codec-level tests: analytic round-trip bounds, bit packing, FP8 conversions.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <kvc/quant/fp8.hpp>
#include <kvc/quant/int8.hpp>
#include <kvc/quant/kivi.hpp>

#include "float_formats.hpp"
#include "isa_check.hpp"
#include "kvc_catch.hpp"
#include "quant_test_util.hpp"

using namespace kvc::quant;
using kvc::half;

namespace {

/// A plainly written packer: bit offset i*b, LSB first.
std::vector<std::uint8_t> plain_pack(const std::vector<unsigned>& codes, int bits) {
  std::vector<std::uint8_t> out(codes.size() * bits / 8, 0);
  for (std::size_t i = 0; i < codes.size(); ++i)
    for (int b = 0; b < bits; ++b)
      if ((codes[i] >> b) & 1u) {
        const std::size_t bit = i * bits + b;
        out[bit / 8] = static_cast<std::uint8_t>(out[bit / 8] | (1u << (bit % 8)));
      }
  return out;
}

/// A plainly written 3-bit packer for the documented planes: per 16 codes, 48 bits; code k's low
/// two bits at bits 2k and 2k+1, its third bit at bit 32 + k.
std::vector<std::uint8_t> plain_pack3(const std::vector<unsigned>& codes) {
  std::vector<std::uint8_t> out(codes.size() * 3 / 8, 0);
  const auto set = [&](std::size_t bit) { out[bit / 8] = static_cast<std::uint8_t>(out[bit / 8] | (1u << (bit % 8))); };
  for (std::size_t i = 0; i < codes.size(); ++i) {
    const std::size_t base = i / 16 * 48, k = i % 16;
    if (codes[i] & 1u) set(base + 2 * k);
    if (codes[i] & 2u) set(base + 2 * k + 1);
    if (codes[i] & 4u) set(base + 32 + k);
  }
  return out;
}

template <int Bits>
void check_packing() {
  std::mt19937 rng(Bits);
  std::vector<unsigned> codes(128);
  std::vector<std::uint8_t> c8(128);
  for (int i = 0; i < 128; ++i) c8[i] = static_cast<std::uint8_t>(codes[i] = rng() % (1u << Bits));
  std::vector<std::uint8_t> packed(128 * Bits / 8);
  detail::pack_codes<Bits>(c8.data(), 128, packed.data());
  REQUIRE(packed == (Bits == 3 ? plain_pack3(codes) : plain_pack(codes, Bits)));
  for (int i = 0; i < 128; ++i) REQUIRE(detail::unpack_code<Bits>(packed.data(), i) == codes[i]);
  // or_code into a zeroed row, element by element in a shuffled order, writes the same bytes
  std::vector<int> order(128);
  for (int i = 0; i < 128; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<std::uint8_t> ored(packed.size(), 0);
  for (int i : order) detail::or_code<Bits>(ored.data(), i, codes[i]);
  REQUIRE(ored == packed);
  // the row decoders (SIMD blocks of 16 on AVX2 hosts, then the scalar tail) against the codes
  for (int n : {16, 40, 48, 120, 128}) {
    std::vector<float> out(n);
    detail::decode_affine_row<Bits>(packed.data(), n, 0.5f, -1.0f, out.data());
    for (int i = 0; i < n; ++i) REQUIRE(out[i] == 0.5f * float(codes[i]) - 1.0f);
  }
}

// ---- the affine parameters, from the documented definition (codec.hpp) ----
// symmetric:  scale = max|x| / (2^(b-1) - 1), rounded up to binary16, no zero point stored
// asymmetric: zero = min rounded down to binary16, scale = (max - zero) / (2^b - 1) rounded up
// The binary16 values come from the independent model of float_formats.hpp, not kvc::half. The
// round-trip bound |x - x^| <= scale / 2 alone cannot catch an oversized scale (it only gets
// looser), so the scale and the zero are pinned to the tightest binary16 on the right side.

std::uint16_t bits_at(const half* p, int i) {
  std::uint16_t b;
  std::memcpy(&b, p + i, 2);
  return b;
}
double h16(std::uint16_t b) { return kvc_test::binary16.decode(b); }
/// The binary16 value just below / just above code b (signed zeros step to the smallest
/// subnormal of the other sign).
double h16_below(std::uint16_t b) {
  if ((b & 0x7fffu) == 0) return -h16(0x0001);
  return (b & 0x8000u) ? h16(static_cast<std::uint16_t>(b + 1)) : h16(static_cast<std::uint16_t>(b - 1));
}
double h16_above(std::uint16_t b) {
  if ((b & 0x7fffu) == 0) return h16(0x0001);
  return (b & 0x8000u) ? h16(static_cast<std::uint16_t>(b - 1)) : h16(static_cast<std::uint16_t>(b + 1));
}
/// The codec divides in float: one float rounding (2^-24 relative) may land its quotient on either
/// side of the exact one, so "the smallest binary16 >= want" is checked with that much slack.
constexpr double div_slack = 1.0 / (1 << 23);

/// Scale code b is the smallest binary16 >= want (want >= 0, exact).
void require_scale_up(std::uint16_t b, double want, const std::string& what) {
  INFO(what << ": stored scale " << h16(b) << " (bits " << b << "), independent value " << want
            << ", next binary16 below " << h16_below(b));
  REQUIRE(h16(b) >= want * (1 - div_slack));
  REQUIRE(h16_below(b) < want * (1 + div_slack));
}
/// Zero code b is the largest binary16 <= lo.
void require_zero_down(std::uint16_t b, double lo, const std::string& what) {
  INFO(what << ": stored zero " << h16(b) << " (bits " << b << "), min " << lo << ", next binary16 above " << h16_above(b));
  REQUIRE(h16(b) <= lo);
  REQUIRE(h16_above(b) > lo);
}

/// The affine parameters of values x[0], x[stride], ... x[(n-1)*stride], checked against the
/// stored scale (and zero) codes; returns the scale's value.
template <int Bits, scheme S>
double require_affine_params(const float* x, int n, int stride, std::uint16_t scale_bits, const half* zero,
                             const std::string& what) {
  double lo = x[0], hi = x[0], amax = 0;
  for (int i = 0; i < n; ++i) {
    const double v = x[i * stride];
    lo = std::min(lo, v), hi = std::max(hi, v), amax = std::max(amax, std::fabs(v));
  }
  if constexpr (S == scheme::symmetric) {
    require_scale_up(scale_bits, amax / ((1 << (Bits - 1)) - 1), what);
  } else {
    const std::uint16_t zb = bits_at(zero, 0);
    require_zero_down(zb, lo, what);
    require_scale_up(scale_bits, (hi - h16(zb)) / ((1 << Bits) - 1), what);
  }
  return h16(scale_bits);
}

/// Per-token codecs: scale (and zero) of every group from the definition, then every element
/// within scale/2 of its group.
template <int Bits, scheme S, int Group>
void check_token_bound(int D) {
  using impl = detail::token_affine<Bits, S, Group>;
  const int g = Group == 0 ? D : Group;
  for (std::uint32_t seed = 0; seed < 50; ++seed) {
    auto x = qtest::randn(D, seed, seed % 2 ? 1.0f : 40.0f);
    if (seed % 5 == 0) x[seed % D] = 300.0f;  // an outlier
    if (seed == 3) std::fill(x.begin(), x.end(), 1.25f);  // a constant row
    if (seed == 7) std::fill(x.begin(), x.end(), -3.0e-3f);  // a constant negative row (zero below min)
    std::vector<std::byte> rec(impl::record_bytes(D));
    impl::encode(x.data(), D, rec.data());
    std::vector<float> y(D);
    impl::decode(rec.data(), D, y.data());
    const half* sc = impl::scales(rec.data(), D);
    std::vector<double> scale(static_cast<std::size_t>(D / g));
    for (int j = 0; j < D / g; ++j) {
      const half* z = nullptr;
      if constexpr (S == scheme::asymmetric) z = impl::zeros(rec.data(), D) + j;
      scale[static_cast<std::size_t>(j)] = require_affine_params<Bits, S>(
          x.data() + j * g, g, 1, bits_at(sc, j), z,
          "bits " + std::to_string(Bits) + " seed " + std::to_string(seed) + " group " + std::to_string(j));
    }
    for (int d = 0; d < D; ++d) {
      const double s = scale[static_cast<std::size_t>(d / g)];
      INFO("bits " << Bits << " d " << d << " x " << x[d] << " y " << y[d] << " scale " << s);
      REQUIRE(std::fabs(x[d] - y[d]) <= s * 0.5 * (1 + 1e-5) + 1e-6 * std::fabs(x[d]));
    }
  }
}

template <int Bits, int G = 32>
void check_channel_bound(int D) {
  using impl = detail::channel_affine<Bits, G>;
  for (std::uint32_t seed = 0; seed < 20; ++seed) {
    auto x = qtest::keylike(G, 1, D, seed);
    if (seed == 4)
      for (int t = 0; t < G; ++t) x[static_cast<std::size_t>(t) * D + 5] = 0.75f;  // a constant channel
    std::vector<std::byte> rec(impl::record_bytes(D));
    impl::encode(x.data(), D, rec.data());
    std::vector<float> y(static_cast<std::size_t>(G) * D);
    impl::decode(rec.data(), D, y.data());
    const half* sc = impl::scales(rec.data(), D);
    const half* zr = impl::zeros(rec.data(), D);
    for (int d = 0; d < D; ++d) {
      const double s = require_affine_params<Bits, scheme::asymmetric>(
          x.data() + d, G, D, bits_at(sc, d), zr + d,
          "kivi keys bits " + std::to_string(Bits) + " seed " + std::to_string(seed) + " channel " + std::to_string(d));
      for (int t = 0; t < G; ++t) {
        const double e = std::fabs(x[t * D + d] - y[t * D + d]);
        REQUIRE(e <= s * 0.5 * (1 + 1e-5) + 1e-6 * std::fabs(x[t * D + d]));
      }
    }
  }
}

/// Reference FP8 decode written from the OCP spec.
float ref_fp8(std::uint8_t c, int E, int M, bool has_inf) {
  const int bias = (1 << (E - 1)) - 1;
  const int sign = c >> 7, e = (c >> M) & ((1 << E) - 1), m = c & ((1 << M) - 1);
  float v;
  if (has_inf && e == (1 << E) - 1) v = m ? NAN : INFINITY;
  else if (!has_inf && e == (1 << E) - 1 && m == (1 << M) - 1) v = NAN;
  else if (e == 0) v = std::ldexp(float(m), 1 - bias - M);
  else v = std::ldexp(1.0f + float(m) / (1 << M), e - bias);
  return sign ? -v : v;
}

template <class F>
void check_fp8(int E, int M, bool has_inf) {
  std::vector<float> vals;
  for (int c = 0; c < 256; ++c) {
    const float r = ref_fp8(static_cast<std::uint8_t>(c), E, M, has_inf);
    const float got = float(F::from_bits(static_cast<std::uint8_t>(c)));
    if (std::isnan(r)) {
      REQUIRE(std::isnan(got));
      REQUIRE(std::isnan(float(F(r))));
      continue;
    }
    REQUIRE(std::memcmp(&r, &got, 4) == 0);  // bit exact, signed zeros included
    if (std::isinf(r)) continue;
    REQUIRE(F(r).bits == c);  // every finite code round-trips
    if (c < 128) vals.push_back(r);
  }
  // Round to nearest even at every midpoint between neighbouring finite positive codes.
  std::sort(vals.begin(), vals.end());
  for (std::size_t i = 0; i + 1 < vals.size(); ++i) {
    const float mid = 0.5f * (vals[i] + vals[i + 1]);
    const std::uint8_t lo = F(vals[i]).bits, hi = F(vals[i + 1]).bits;
    REQUIRE(F(mid).bits == ((lo & 1) ? hi : lo));
    REQUIRE(F(-mid).bits == (((lo & 1) ? hi : lo) | 0x80));
    REQUIRE(F(std::nextafter(mid, 0.0f)).bits == lo);
    REQUIRE(F(std::nextafter(mid, 1e9f)).bits == hi);
  }
  // Saturation.
  REQUIRE(float(F(1e30f)) == F::max_finite);
  REQUIRE(float(F(-1e30f)) == -F::max_finite);
  REQUIRE(float(F(INFINITY)) == F::max_finite);
}

}  // namespace

TEST_CASE("the SIMD path under test", "[quant][codec][isa]") {
  WARN("codecs: " << kvc_test::simd_path());
  if (kvc_test::expect_avx2()) REQUIRE(KVC_QUANT_AVX2 == 1);  // the encode_avx2 encoders are the ones checked
}

TEST_CASE("bit packing matches a plainly written packer", "[quant][codec]") {
  check_packing<2>();
  check_packing<3>();
  check_packing<4>();
  check_packing<8>();
  static_assert(sizeof(packed_block<2, 128>) == 32, "block sizes are checked at compile time");
}

TEST_CASE("integer codecs: scale and zero from the definition, round trip within scale/2", "[quant][codec]") {
  check_token_bound<8, scheme::symmetric, 0>(128);
  check_token_bound<8, scheme::asymmetric, 0>(64);
  check_token_bound<4, scheme::asymmetric, 0>(128);
  check_token_bound<4, scheme::symmetric, 0>(64);
  check_token_bound<2, scheme::asymmetric, 0>(128);
  check_token_bound<2, scheme::asymmetric, 32>(128);  // KIVI values
  check_token_bound<4, scheme::asymmetric, 32>(64);
  check_token_bound<3, scheme::asymmetric, 32>(128);  // 3-bit KIVI values
  check_token_bound<3, scheme::asymmetric, 16>(48);
  check_token_bound<3, scheme::asymmetric, 0>(80);
  check_channel_bound<2>(128);  // KIVI keys
  check_channel_bound<4>(64);
  check_channel_bound<8>(128);
  check_channel_bound<3>(64);
  check_channel_bound<3, 64>(48);
}

TEST_CASE("record sizes are what the layout says", "[quant][codec]") {
  CHECK(int8{}.record_bytes(role::key, 128) == 128 + 2);
  CHECK(int4{}.record_bytes(role::key, 128) == 64 + 4);
  CHECK(kivi<2>{}.record_bytes(role::key, 128) == 32 * 32 + 128 * 4);  // 32 tokens, per-channel scale+zero
  CHECK(kivi<2>{}.record_bytes(role::value, 128) == 32 + 4 * 4);       // 4 groups of 32 channels
  CHECK(kivi<3>{}.record_bytes(role::key, 64) == 32 * 24 + 64 * 4);     // 3 bits: 6 bytes per 16 codes
  CHECK((kivi<3, 64>{}.record_bytes(role::value, 128)) == 48 + 2 * 4);
  CHECK(fp8<>{}.record_bytes(role::value, 128) == 128 + 4);
  CHECK((fp8<kvc::fp8_e4m3, fp8_scaling::per_tensor>{}.record_bytes(role::value, 128)) == 128);
}

TEST_CASE("FP8 conversions are bit exact on all 256 codes", "[quant][codec][fp8]") {
  check_fp8<kvc::fp8_e4m3>(4, 3, false);
  check_fp8<kvc::fp8_e5m2>(5, 2, true);
}

TEST_CASE("FP8 codecs: per-token scale and vLLM per-tensor scale", "[quant][codec][fp8]") {
  const int D = 64;
  auto x = qtest::randn(D, 3, 5.0f);
  std::vector<std::byte> rec(fp8<>{}.record_bytes(role::key, D));
  std::vector<float> y(D);
  fp8<> pt;
  pt.encode<role::key>(x.data(), D, rec.data());
  pt.decode<role::key>(rec.data(), D, y.data());
  float amax = 0;
  for (float v : x) amax = std::max(amax, std::fabs(v));
  // The stored float scale is max|x| / max_finite (448 for E4M3, from the independent format
  // model), up to the one rounding of the float division.
  {
    const double want = double(amax) / kvc_test::fp8_e4m3.decode(kvc_test::fp8_e4m3.max_finite_code());
    float stored;
    std::memcpy(&stored, rec.data() + D, sizeof stored);
    INFO("fp8 per-token scale " << stored << " want " << want);
    REQUIRE(std::fabs(stored - want) <= want * 0x1p-24);
  }
  for (int d = 0; d < D; ++d) REQUIRE(std::fabs(x[d] - y[d]) <= std::fabs(x[d]) / 16 + amax / 448 / 512);
  // per tensor: code = fp8(x / k_scale), value = code * k_scale (vLLM)
  fp8<kvc::fp8_e4m3, fp8_scaling::per_tensor> tensor(0.5f, 2.0f);
  std::vector<std::byte> r2(D);
  tensor.encode<role::key>(x.data(), D, r2.data());
  for (int d = 0; d < D; ++d) REQUIRE(std::uint8_t(r2[d]) == kvc::fp8_e4m3(x[d] / 0.5f).bits);
  tensor.decode<role::key>(r2.data(), D, y.data());
  for (int d = 0; d < D; ++d) REQUIRE(y[d] == float(kvc::fp8_e4m3(x[d] / 0.5f)) * 0.5f);
  tensor.encode<role::value>(x.data(), D, r2.data());
  for (int d = 0; d < D; ++d) REQUIRE(std::uint8_t(r2[d]) == kvc::fp8_e4m3(x[d] / 2.0f).bits);
  tensor.k_scale = 0.0f;
  REQUIRE_THROWS_AS(tensor.check(D), kvc::error);
}

TEST_CASE("bad codec configurations fail with a clear kvc::error", "[quant][codec]") {
  kivi<2> k;
  k.residual_tokens = 100;
  REQUIRE_THROWS_WITH(k.check(128), Catch::Contains("residual = 100") && Catch::Contains("multiple of the group size 32"));
  REQUIRE_THROWS_WITH(kivi<2>{}.check(48), Catch::Contains("head_dim = 48"));
  REQUIRE_THROWS_AS(int2{}.check(6), kvc::error);
  REQUIRE_THROWS_WITH(kivi<3>{}.check(40), Catch::Contains("head_dim = 40") && Catch::Contains("multiple of 16"));
  // Compile-time: kivi<5>, kivi<3, 24>, kivi<2, 32, 100>, intn<3>, intn<5> do not compile (static_assert names the fix).
}
