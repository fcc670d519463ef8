// SPDX-License-Identifier: Apache-2.0
// Numeric conversions (half, bfloat16, fp8 e4m3/e5m2) against the independent models in
// support/float_formats.hpp: every code decoded, every decoded value encoded back, every exact
// halfway point between neighbouring codes (and its float neighbours), random floats of every
// binade, subnormals, inf, NaN and overflow.

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <kvc/types.hpp>

#include "float_formats.hpp"
#include "fast_require.hpp"
#include "kvc_catch.hpp"
#include "random.hpp"

namespace {

using kvc_test::float_format;

std::uint32_t fbits(float f) { return kvc::detail::bit_cast<std::uint32_t>(f); }
float bfloat(std::uint32_t u) { return kvc::detail::bit_cast<float>(u); }

/// Floats worth encoding for a format: every code's value, every midpoint between neighbouring
/// codes and the floats just below and above it, the same negated, specials, and random floats.
std::vector<float> probe_floats(const float_format& f, std::uint64_t salt, int randoms) {
  std::vector<float> xs;
  const std::uint32_t top = f.ieee ? f.max_finite_code() + 1u : f.max_finite_code();
  for (std::uint32_t c = 0; c <= top; ++c) {
    const double v = f.rounding_value(c);
    if (std::isfinite(v) && std::fabs(v) <= std::numeric_limits<float>::max()) xs.push_back(static_cast<float>(v));
    if (c < top) {
      const double mid = (f.rounding_value(c) + f.rounding_value(c + 1)) / 2;
      if (mid > std::numeric_limits<float>::max()) continue;
      const float m = static_cast<float>(mid);
      KVC_REQUIRE(static_cast<double>(m) == mid, mid);  // every midpoint is exact in float
      xs.push_back(m);
      xs.push_back(std::nextafter(m, 0.0f));
      xs.push_back(std::nextafter(m, std::numeric_limits<float>::infinity()));
    }
  }
  const float specials[] = {0.0f, std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::min(),
                            std::numeric_limits<float>::max(), std::numeric_limits<float>::infinity(),
                            65504.0f, 65519.996f, 65520.0f, 65536.0f, 448.0f, 464.0f, 480.0f, 57344.0f,
                            61440.0f, 1e30f, 1e-30f, 1e-45f};
  for (float s : specials) xs.push_back(s);
  kvc_test::rng r(salt);
  for (int i = 0; i < randoms; ++i) {
    std::uint32_t u = r.bits32() & 0x7fffffffu;
    if ((u & 0x7f800000u) == 0x7f800000u) continue;  // NaN/inf are tested on their own
    xs.push_back(bfloat(u));
    // Floats near the format's range are the interesting ones: 2^[-30, 20).
    xs.push_back(std::ldexp(r.uniform(1.0f, 2.0f), r.integer(-30, 19)));
  }
  const std::size_t n = xs.size();
  for (std::size_t i = 0; i < n; ++i) xs.push_back(-xs[i]);
  return xs;
}

std::uint32_t expected_code(const float_format& f, float x, bool saturate) {
  // One cached encoder per (format, saturate); same rule as float_format::encode_nearest.
  static const kvc_test::nearest_encoder h(kvc_test::binary16, false), b(kvc_test::bfloat16, false),
      e4(kvc_test::fp8_e4m3, true), e5(kvc_test::fp8_e5m2, true);
  const kvc_test::nearest_encoder* e = f.E == 5 && f.M == 10 ? &h : f.E == 8 ? &b : f.E == 4 ? &e4 : &e5;
  REQUIRE((f.E == 8 || saturate == (f.M < 10)));
  return (*e)(static_cast<double>(x));
}

const float nans[] = {bfloat(0x7fc00000u), bfloat(0x7f800001u), bfloat(0x7fa00000u), bfloat(0xffc00000u),
                      bfloat(0xff800001u), bfloat(0x7fffffffu), bfloat(0x7f802000u)};

}  // namespace

TEST_CASE("the float-format model agrees with known values", "[numeric]") {
  // The cached encoder and the direct search agree.
  kvc_test::rng r(0);
  const kvc_test::nearest_encoder e5(kvc_test::fp8_e5m2, true), h(kvc_test::binary16, false);
  for (int i = 0; i < 2000; ++i) {
    const double x = std::ldexp(r.uniform(-2.0f, 2.0f), r.integer(-26, 17));
    KVC_REQUIRE(e5(x) == kvc_test::fp8_e5m2.encode_nearest(x, true), x);
    KVC_REQUIRE(h(x) == kvc_test::binary16.encode_nearest(x, false), x);
  }
  // A sanity check of the model itself from published constants (IEEE 754, OCP FP8 v1.0).
  REQUIRE(kvc_test::binary16.decode(0x7bffu) == 65504.0);
  REQUIRE(kvc_test::binary16.decode(0x0001u) == std::ldexp(1.0, -24));
  REQUIRE(kvc_test::binary16.decode(0x3c00u) == 1.0);
  REQUIRE(kvc_test::bfloat16.decode(0x3f80u) == 1.0);
  REQUIRE(kvc_test::fp8_e4m3.decode(0x7eu) == 448.0);
  REQUIRE(kvc_test::fp8_e4m3.decode(0x01u) == std::ldexp(1.0, -9));
  REQUIRE(kvc_test::fp8_e5m2.decode(0x7bu) == 57344.0);
  REQUIRE(kvc_test::fp8_e5m2.decode(0x01u) == std::ldexp(1.0, -16));
  REQUIRE(std::isnan(kvc_test::fp8_e4m3.decode(0xffu)));
  REQUIRE(std::isinf(kvc_test::fp8_e5m2.decode(0x7cu)));
}

TEST_CASE("half: every one of the 65536 codes decodes exactly", "[numeric][half]") {
  for (std::uint32_t c = 0; c < 65536u; ++c) {
    const auto h = static_cast<std::uint16_t>(c);
    const double want = kvc_test::binary16.decode(c);
    const float portable = kvc::detail::half_bits_to_float_portable(h);
    const float dflt = static_cast<float>(kvc::half::from_bits(h));
    if (std::isnan(want)) {
      // NaN: quiet, sign and payload kept (the high mantissa bits), as x86 F16C does.
      const std::uint32_t want_bits = ((c & 0x8000u) << 16) | 0x7fc00000u | ((c & 0x3ffu) << 13);
      KVC_REQUIRE(fbits(portable) == want_bits, "code 0x" << std::hex << c);
      KVC_REQUIRE(fbits(dflt) == want_bits, "code 0x" << std::hex << c);
    } else {
      KVC_REQUIRE(static_cast<double>(portable) == want, "code 0x" << std::hex << c);
      KVC_REQUIRE(std::signbit(portable) == std::signbit(want), "code 0x" << std::hex << c);
      KVC_REQUIRE(fbits(dflt) == fbits(portable), "code 0x" << std::hex << c);
    }
  }
}

TEST_CASE("half: every decoded value encodes back to its code", "[numeric][half]") {
  for (std::uint32_t c = 0; c < 65536u; ++c) {
    const auto h = static_cast<std::uint16_t>(c);
    const float x = static_cast<float>(kvc_test::binary16.decode(c));
    if (kvc_test::binary16.is_nan(c)) {
      const float xn = kvc::detail::half_bits_to_float_portable(h);
      const std::uint16_t back = kvc::detail::float_to_half_bits_portable(xn);
      KVC_REQUIRE(back == (c | 0x200u), "code 0x" << std::hex << c);  // quietened, payload kept
      KVC_REQUIRE(kvc::detail::float_to_half_bits(xn) == back, "code 0x" << std::hex << c);
    } else {
      KVC_REQUIRE(kvc::detail::float_to_half_bits_portable(x) == h, "code 0x" << std::hex << c);
      KVC_REQUIRE(kvc::detail::float_to_half_bits(x) == h, "code 0x" << std::hex << c);
      KVC_REQUIRE(kvc::half(x).bits == h, "code 0x" << std::hex << c);
    }
  }
}

TEST_CASE("half: encoding rounds to nearest even, overflows to inf, keeps NaN", "[numeric][half]") {
  const auto xs = probe_floats(kvc_test::binary16, 1, 20000);
  for (float x : xs) {
    const std::uint32_t want = expected_code(kvc_test::binary16, x, false);
    KVC_REQUIRE(kvc::detail::float_to_half_bits_portable(x) == want, "x = " << x << " (bits 0x" << std::hex << fbits(x) << ")");
    KVC_REQUIRE(kvc::detail::float_to_half_bits(x) == want, "x = " << x << " (bits 0x" << std::hex << fbits(x) << ")");
  }
  REQUIRE(kvc::detail::float_to_half_bits_portable(65504.0f) == 0x7bffu);
  REQUIRE(kvc::detail::float_to_half_bits_portable(std::nextafter(65520.0f, 0.0f)) == 0x7bffu);
  REQUIRE(kvc::detail::float_to_half_bits_portable(65520.0f) == 0x7c00u);
  REQUIRE(kvc::detail::float_to_half_bits_portable(-65520.0f) == 0xfc00u);
  for (float n : nans) {
    for (auto enc : {kvc::detail::float_to_half_bits_portable(n), kvc::detail::float_to_half_bits(n)}) {
      KVC_REQUIRE(kvc_test::binary16.is_nan(enc), "NaN bits 0x" << std::hex << fbits(n) << " -> 0x" << enc);
      KVC_REQUIRE((enc & 0x200u) != 0, "NaN -> 0x" << std::hex << enc);  // quiet
      KVC_REQUIRE((enc & 0x8000u) == ((fbits(n) >> 16) & 0x8000u), "NaN bits 0x" << std::hex << fbits(n) << " -> 0x" << enc);
    }
  }
}

TEST_CASE("bfloat16: every code decodes exactly and encodes back", "[numeric][bf16]") {
  for (std::uint32_t c = 0; c < 65536u; ++c) {
    const auto b = static_cast<std::uint16_t>(c);
    const double want = kvc_test::bfloat16.decode(c);
    const float got = static_cast<float>(kvc::bfloat16::from_bits(b));
    if (std::isnan(want)) {
      KVC_REQUIRE(std::isnan(got), "code 0x" << std::hex << c);
      const std::uint16_t back = kvc::detail::float_to_bf16_bits(got);
      KVC_REQUIRE(kvc_test::bfloat16.is_nan(back), "code 0x" << std::hex << c);
      KVC_REQUIRE((back & 0x40u) != 0, "code 0x" << std::hex << c);
      KVC_REQUIRE((back & 0x8000u) == (c & 0x8000u), "code 0x" << std::hex << c);
    } else {
      KVC_REQUIRE(static_cast<double>(got) == want, "code 0x" << std::hex << c);
      KVC_REQUIRE(std::signbit(got) == std::signbit(want), "code 0x" << std::hex << c);
      KVC_REQUIRE(kvc::bfloat16(got).bits == b, "code 0x" << std::hex << c);
    }
  }
}

TEST_CASE("bfloat16: ties to even, subnormals, overflow to inf, NaN made quiet", "[numeric][bf16]") {
  const auto xs = probe_floats(kvc_test::bfloat16, 2, 20000);
  for (float x : xs) {
    KVC_REQUIRE(kvc::detail::float_to_bf16_bits(x) == expected_code(kvc_test::bfloat16, x, false), "x = " << x << " (bits 0x" << std::hex << fbits(x) << ")");
  }
  REQUIRE(kvc::detail::float_to_bf16_bits(std::numeric_limits<float>::max()) == 0x7f80u);
  REQUIRE(kvc::detail::float_to_bf16_bits(-std::numeric_limits<float>::infinity()) == 0xff80u);
  REQUIRE(kvc::detail::float_to_bf16_bits(bfloat(0x3f808000u)) == 0x3f80u);  // tie, even stays
  REQUIRE(kvc::detail::float_to_bf16_bits(bfloat(0x3f818000u)) == 0x3f82u);  // tie, odd rounds up
  for (float n : nans) {
    const std::uint16_t enc = kvc::detail::float_to_bf16_bits(n);
    KVC_REQUIRE(kvc_test::bfloat16.is_nan(enc), "NaN bits 0x" << std::hex << fbits(n) << " -> 0x" << enc);
    KVC_REQUIRE((enc & 0x40u) != 0, "NaN bits 0x" << std::hex << fbits(n) << " -> 0x" << enc);
    KVC_REQUIRE((enc & 0x8000u) == ((fbits(n) >> 16) & 0x8000u), "NaN bits 0x" << std::hex << fbits(n) << " -> 0x" << enc);
  }
}

namespace {
template <class F8>
void check_fp8(const float_format& f, std::uint64_t salt) {
  // Every code decodes exactly.
  for (std::uint32_t c = 0; c < 256u; ++c) {
    const double want = f.decode(c);
    const float got = static_cast<float>(F8::from_bits(static_cast<std::uint8_t>(c)));
    if (std::isnan(want)) {
      KVC_REQUIRE(std::isnan(got), "code 0x" << std::hex << c);
    } else {
      KVC_REQUIRE(static_cast<double>(got) == want, "code 0x" << std::hex << c);
      KVC_REQUIRE(std::signbit(got) == std::signbit(want), "code 0x" << std::hex << c);
      if (!std::isinf(want)) REQUIRE(F8(got).bits == c);
    }
  }
  // Encoding is the nearest finite code (exhaustive search), ties to even, saturating.
  const auto xs = probe_floats(f, salt, 20000);
  for (float x : xs) {
    KVC_REQUIRE(F8(x).bits == expected_code(f, x, true), "x = " << x << " (bits 0x" << std::hex << fbits(x) << ")");
  }
  const float maxv = static_cast<float>(f.decode(f.max_finite_code()));
  REQUIRE(F8(std::numeric_limits<float>::infinity()).bits == f.max_finite_code());
  REQUIRE(F8(-std::numeric_limits<float>::infinity()).bits == (f.max_finite_code() | 0x80u));
  REQUIRE(F8(1e30f).bits == f.max_finite_code());
  REQUIRE(F8(-2 * maxv).bits == (f.max_finite_code() | 0x80u));
  REQUIRE(static_cast<float>(F8(3 * maxv)) == maxv);
  for (float n : nans) {
    const F8 e(n);
    KVC_REQUIRE(f.is_nan(e.bits), "NaN bits 0x" << std::hex << fbits(n) << " -> 0x" << unsigned(e.bits));
    KVC_REQUIRE(std::isnan(static_cast<float>(e)), "NaN bits 0x" << std::hex << fbits(n) << " -> 0x" << unsigned(e.bits));
  }
}
}  // namespace

TEST_CASE("fp8 e4m3: all 256 codes, nearest-even encoding, saturation to 448, NaN", "[numeric][fp8]") {
  REQUIRE(kvc::fp8_e4m3::max_finite == 448.0f);
  check_fp8<kvc::fp8_e4m3>(kvc_test::fp8_e4m3, 3);
}

TEST_CASE("fp8 e5m2: all 256 codes, nearest-even encoding, saturation to 57344, NaN", "[numeric][fp8]") {
  REQUIRE(kvc::fp8_e5m2::max_finite == 57344.0f);
  check_fp8<kvc::fp8_e5m2>(kvc_test::fp8_e5m2, 4);
}

TEST_CASE("to_float/from_float and type names agree with the storage types", "[numeric]") {
  kvc_test::rng r(5);
  for (int i = 0; i < 1000; ++i) {
    const float x = r.normal(100.0f);
    REQUIRE(kvc::to_float(kvc::from_float<kvc::half>(x)) == static_cast<float>(kvc::half(x)));
    REQUIRE(kvc::to_float(kvc::from_float<kvc::bfloat16>(x)) == static_cast<float>(kvc::bfloat16(x)));
    REQUIRE(kvc::to_float(kvc::from_float<float>(x)) == x);
  }
  REQUIRE(std::string(kvc::type_name<kvc::half>()) == "fp16");
  REQUIRE(std::string(kvc::type_name<kvc::bfloat16>()) == "bf16");
  REQUIRE(std::string(kvc::type_name<kvc::fp8_e4m3>()) == "fp8e4m3");
  STATIC_REQUIRE(kvc::is_storage_float_v<kvc::half>);
  STATIC_REQUIRE(!kvc::is_storage_float_v<kvc::fp8_e4m3>);
  STATIC_REQUIRE(!kvc::is_storage_float_v<int>);
}

TEST_CASE("the default half path is the one this build expects", "[numeric][half]") {
#if defined(KVC_TEST_EXPECT_F16C)
  REQUIRE(KVC_HAS_F16C == 1);
#else
  SUCCEED("default path: " << (KVC_HAS_F16C ? "F16C" : "portable"));
#endif
}
