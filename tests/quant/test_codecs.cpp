// SPDX-License-Identifier: Apache-2.0
// Codec-level tests: analytic round-trip bounds, bit packing, FP8 conversions.
#include <cmath>
#include <cstring>
#include <vector>

#include <kvc/quant/fp8.hpp>
#include <kvc/quant/int8.hpp>
#include <kvc/quant/kivi.hpp>

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

template <int Bits>
void check_packing() {
  std::mt19937 rng(Bits);
  std::vector<unsigned> codes(128);
  std::vector<std::uint8_t> c8(128);
  for (int i = 0; i < 128; ++i) c8[i] = static_cast<std::uint8_t>(codes[i] = rng() % (1u << Bits));
  std::vector<std::uint8_t> packed(128 * Bits / 8);
  detail::pack_codes<Bits>(c8.data(), 128, packed.data());
  REQUIRE(packed == plain_pack(codes, Bits));
  for (int i = 0; i < 128; ++i) REQUIRE(detail::unpack_code<Bits>(packed.data(), i) == codes[i]);
}

/// Per-token codecs: every element within scale/2 of its group (scale read back from the record).
template <int Bits, scheme S, int Group>
void check_token_bound(int D) {
  using impl = detail::token_affine<Bits, S, Group>;
  const int g = Group == 0 ? D : Group;
  for (std::uint32_t seed = 0; seed < 50; ++seed) {
    auto x = qtest::randn(D, seed, seed % 2 ? 1.0f : 40.0f);
    if (seed % 5 == 0) x[seed % D] = 300.0f;  // an outlier
    if (seed == 3) std::fill(x.begin(), x.end(), 1.25f);  // a constant row
    std::vector<std::byte> rec(impl::record_bytes(D));
    impl::encode(x.data(), D, rec.data());
    std::vector<float> y(D);
    impl::decode(rec.data(), D, y.data());
    const half* sc = impl::scales(rec.data(), D);
    for (int d = 0; d < D; ++d) {
      half s;
      std::memcpy(&s, sc + d / g, 2);
      INFO("bits " << Bits << " d " << d << " x " << x[d] << " y " << y[d] << " scale " << float(s));
      REQUIRE(std::fabs(x[d] - y[d]) <= float(s) * 0.5f * (1 + 1e-5f) + 1e-6f * std::fabs(x[d]));
    }
  }
}

template <int Bits>
void check_channel_bound(int D) {
  using impl = detail::channel_affine<Bits, 32>;
  for (std::uint32_t seed = 0; seed < 20; ++seed) {
    auto x = qtest::keylike(32, 1, D, seed);
    std::vector<std::byte> rec(impl::record_bytes(D));
    impl::encode(x.data(), D, rec.data());
    std::vector<float> y(32 * D);
    impl::decode(rec.data(), D, y.data());
    const half* sc = impl::scales(rec.data(), D);
    for (int t = 0; t < 32; ++t)
      for (int d = 0; d < D; ++d) {
        half s;
        std::memcpy(&s, sc + d, 2);
        const float e = std::fabs(x[t * D + d] - y[t * D + d]);
        REQUIRE(e <= float(s) * 0.5f * (1 + 1e-5f) + 1e-6f * std::fabs(x[t * D + d]));
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

TEST_CASE("bit packing matches a plainly written packer", "[quant][codec]") {
  check_packing<2>();
  check_packing<4>();
  check_packing<8>();
  static_assert(sizeof(packed_block<2, 128>) == 32, "block sizes are checked at compile time");
}

TEST_CASE("integer codecs round trip within scale/2", "[quant][codec]") {
  check_token_bound<8, scheme::symmetric, 0>(128);
  check_token_bound<8, scheme::asymmetric, 0>(64);
  check_token_bound<4, scheme::asymmetric, 0>(128);
  check_token_bound<4, scheme::symmetric, 0>(64);
  check_token_bound<2, scheme::asymmetric, 0>(128);
  check_token_bound<2, scheme::asymmetric, 32>(128);  // KIVI values
  check_token_bound<4, scheme::asymmetric, 32>(64);
  check_channel_bound<2>(128);  // KIVI keys
  check_channel_bound<4>(64);
  check_channel_bound<8>(128);
}

TEST_CASE("record sizes are what the layout says", "[quant][codec]") {
  CHECK(int8{}.record_bytes(role::key, 128) == 128 + 2);
  CHECK(int4{}.record_bytes(role::key, 128) == 64 + 4);
  CHECK(kivi<2>{}.record_bytes(role::key, 128) == 32 * 32 + 128 * 4);  // 32 tokens, per-channel scale+zero
  CHECK(kivi<2>{}.record_bytes(role::value, 128) == 32 + 4 * 4);       // 4 groups of 32 channels
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
  // Compile-time: kivi<3>, kivi<2, 32, 100>, intn<5> do not compile (static_assert names the fix).
}
