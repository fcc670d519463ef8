// SPDX-License-Identifier: Apache-2.0
// The AVX2 FP8 encoder against the scalar one, bit for bit, and both against a rounding reference
// written from the OCP spec in double precision (nearest code, ties to the even code, finite values
// beyond the largest code and infinities saturate, NaN stays NaN, the sign of zero kept).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <kvc/quant/fp8.hpp>

#include "kvc_catch.hpp"

namespace {

using namespace kvc::quant;

/// The OCP value of a non-NaN, non-infinite code, from the spec: (-1)^s 2^(e - bias) (1 + m / 2^M),
/// or m 2^(1 - bias - M) for e = 0.
double ocp_value(int code, int E, int M) {
  const int bias = (1 << (E - 1)) - 1;
  const int e = (code >> M) & ((1 << E) - 1), m = code & ((1 << M) - 1);
  const double v = e == 0 ? std::ldexp(double(m), 1 - bias - M) : std::ldexp(1.0 + double(m) / (1 << M), e - bias);
  return (code & 0x80) ? -v : v;
}

/// Rounding reference for one format: the finite non-negative codes in value order.
struct ref_format {
  int E, M;
  std::uint8_t max_code, nan_code;
  std::vector<double> vals;  ///< vals[c] for codes 0..max_code (increasing)

  ref_format(int e, int m, std::uint8_t maxc, std::uint8_t nanc) : E(e), M(m), max_code(maxc), nan_code(nanc) {
    for (int c = 0; c <= maxc; ++c) vals.push_back(ocp_value(c, E, M));
    for (std::size_t i = 1; i < vals.size(); ++i) REQUIRE(vals[i] > vals[i - 1]);
  }

  std::uint8_t encode(float y) const {
    const std::uint8_t sign = std::signbit(y) ? 0x80 : 0x00;
    if (std::isnan(y)) return sign | nan_code;
    const double a = std::fabs(double(y));
    if (a >= vals.back()) return sign | max_code;  // saturating: nothing beyond the largest code
    // vals[i] <= a < vals[i + 1]; the midpoint of two codes is exact in double, so is the comparison
    const std::size_t i = static_cast<std::size_t>(std::upper_bound(vals.begin(), vals.end(), a) - vals.begin()) - 1;
    const double mid = 0.5 * (vals[i] + vals[i + 1]);
    std::size_t c = a < mid ? i : a > mid ? i + 1 : (i % 2 == 0 ? i : i + 1);
    return static_cast<std::uint8_t>(sign | c);
  }
};

template <class F>
ref_format ref_for() {
  if constexpr (std::is_same<F, kvc::fp8_e4m3>::value) return ref_format(4, 3, 0x7e, 0x7f);
  else return ref_format(5, 2, 0x7b, 0x7e);
}

/// Values that probe every rounding case at scale 1: each finite code, the midpoints between
/// neighbours (exact ties), one float either side of them, half the smallest subnormal (a tie with
/// zero), values beyond the largest code, infinities, NaN, signed zeros and float subnormals.
std::vector<float> special_values(const ref_format& r) {
  std::vector<float> v;
  for (std::size_t i = 0; i < r.vals.size(); ++i) {
    const float a = static_cast<float>(r.vals[i]);
    v.push_back(a);
    const double next = i + 1 < r.vals.size() ? r.vals[i + 1] : 2.0 * r.vals[i] - r.vals[i - 1];  // the next code up
    const float mid = static_cast<float>(0.5 * (r.vals[i] + next));
    REQUIRE(double(mid) == 0.5 * (r.vals[i] + next));
    v.push_back(mid);
    v.push_back(std::nextafter(mid, 0.0f));
    v.push_back(std::nextafter(mid, INFINITY));
  }
  const float tiny = static_cast<float>(r.vals[1]);
  for (float t : {0.5f * tiny, std::nextafter(0.5f * tiny, 0.0f), std::nextafter(0.5f * tiny, 1.0f), 0.25f * tiny,
                  1.5f * tiny, 2.5f * tiny, 1e-30f, std::numeric_limits<float>::denorm_min(),
                  std::numeric_limits<float>::min(), 0.0f})
    v.push_back(t);
  const float mx = static_cast<float>(r.vals.back());
  for (float t : {std::nextafter(mx, INFINITY), 1.0625f * mx, 1.125f * mx, 1.2f * mx, 2.0f * mx, 65536.0f, 1e6f, 3e38f,
                  std::numeric_limits<float>::max(), INFINITY, std::numeric_limits<float>::quiet_NaN()})
    v.push_back(t);
  const std::size_t n = v.size();
  for (std::size_t i = 0; i < n; ++i) v.push_back(-v[i]);
  return v;
}

/// A row of D values: log-uniform magnitudes over ~2^-40..2^1 times `mag`, random signs, and some
/// special values scaled by `mag` (a power of two, so scaled ties stay ties).
std::vector<float> make_row(int D, std::mt19937& rng, float mag, const std::vector<float>& specials, double p_special) {
  std::uniform_real_distribution<float> lg(-40.0f, 1.0f);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<float> x(static_cast<std::size_t>(D));
  for (auto& v : x) {
    if (u(rng) < p_special) {
      v = specials[rng() % specials.size()] * mag;
    } else {
      v = std::exp2(lg(rng)) * mag;
      if (rng() & 1) v = -v;
    }
  }
  return x;
}

/// Expected record from the reference: scale = max|x| / max_finite in float (NaNs skipped), code =
/// ref(x * (1 / scale)).
template <class Q>
std::vector<std::uint8_t> expected_record(const Q& q, role R, const float* x, int D, const ref_format& rf) {
  using F = typename Q::format;
  std::vector<std::uint8_t> rec(q.record_bytes(R, D));
  float s;
  if (Q::per_tensor) {
    s = R == role::key ? q.k_scale : q.v_scale;
  } else {
    float amax = 0.0f;
    for (int d = 0; d < D; ++d)
      if (!std::isnan(x[d])) amax = std::max(amax, std::fabs(x[d]));
    s = amax / F::max_finite;
    // The scale after the D codes. Byte by byte through at(): GCC 12 -O2 saw `rec.data() + D` as a
    // possibly negative offset and refused the memcpy (-Wstringop-overflow, a false positive).
    unsigned char sb[4];
    std::memcpy(sb, &s, 4);
    for (std::size_t i = 0; i < 4; ++i) rec.at(static_cast<std::size_t>(D) + i) = sb[i];
  }
  const float inv = s > 0.0f ? 1.0f / s : 0.0f;
  for (int d = 0; d < D; ++d) rec[static_cast<std::size_t>(d)] = rf.encode(x[d] * inv);
  return rec;
}

std::string hexbyte(unsigned b) {
  const char* h = "0123456789abcdef";
  return std::string("0x") + h[(b >> 4) & 15] + h[b & 15];
}

template <role R, class Q>
void check_row(const Q& q, const std::vector<float>& x, const ref_format& rf) {
  const int D = static_cast<int>(x.size());
  const std::size_t rb = q.record_bytes(R, D);
  std::vector<std::byte> a(rb + 8, std::byte{0xa5}), b(rb + 8, std::byte{0x5a});
  q.template encode<R>(x.data(), D, a.data());  // the AVX2 encoder where compiled for it
  q.template encode_scalar<R>(x.data(), D, b.data());
  const auto want = expected_record(q, R, x.data(), D, rf);
  for (std::size_t i = 0; i < rb; ++i) {
    if (std::uint8_t(a[i]) != std::uint8_t(b[i]) || std::uint8_t(a[i]) != want[i]) {
      const float xi = i < std::size_t(D) ? x[i] : 0.0f;
      INFO(Q::name() << (R == role::key ? " key" : " value") << " D = " << D << " byte " << i << " x = " << xi
                     << ": encode " << hexbyte(unsigned(a[i])) << ", encode_scalar " << hexbyte(unsigned(b[i]))
                     << ", reference " << hexbyte(want[i]));
      REQUIRE(false);
    }
  }
  for (std::size_t i = rb; i < rb + 8; ++i) REQUIRE(std::uint8_t(a[i]) == 0xa5);  // nothing written past the record
}

/// Every head_dim 1..72 (every tail length of the 8-wide loop) and larger ones up to 4096.
std::vector<int> head_dims() {
  std::vector<int> ds;
  for (int d = 1; d <= 72; ++d) ds.push_back(d);
  for (int d : {96, 100, 127, 128, 129, 200, 255, 256, 257, 1000, 1024, 4096}) ds.push_back(d);
  return ds;
}

template <class F>
void check_per_token() {
  const ref_format rf = ref_for<F>();
  const auto sp = special_values(rf);
  std::mt19937 rng(11);
  fp8<F> q;
  for (int D : head_dims())
    for (int rep = 0; rep < 12; ++rep) {
      // magnitudes from 2^-60 to 2^60 (powers of two: specials scaled by them keep their ties)
      const float mag = std::ldexp(1.0f, static_cast<int>(rng() % 121) - 60);
      const double p_special = rep % 4 == 0 ? 0.0 : rep % 4 == 1 ? 0.1 : rep % 4 == 2 ? 0.5 : 1.0;
      auto x = make_row(D, rng, mag, sp, p_special);
      // a row whose maximum is max_finite * mag gives scale = mag exactly, so the scaled specials
      // hit exact ties after the division
      if (rep % 3 == 0) x[rng() % x.size()] = (rng() & 1 ? -1.0f : 1.0f) * F::max_finite * mag;
      check_row<role::key>(q, x, rf);
      check_row<role::value>(q, x, rf);
    }
  // all zeros (scale 0), all NaN, one infinity (scale inf: inv = 0), signed zeros
  for (int D : {1, 7, 8, 9, 64, 128}) {
    check_row<role::key>(q, std::vector<float>(static_cast<std::size_t>(D), 0.0f), rf);
    check_row<role::key>(q, std::vector<float>(static_cast<std::size_t>(D), -0.0f), rf);
    check_row<role::key>(q, std::vector<float>(static_cast<std::size_t>(D), NAN), rf);
    std::vector<float> x(static_cast<std::size_t>(D), 1.0f);
    x[0] = -2.0f;
    x.back() = INFINITY;
    check_row<role::value>(q, x, rf);
    x.back() = NAN;
    check_row<role::value>(q, x, rf);
  }
}

template <class F>
void check_per_tensor() {
  const ref_format rf = ref_for<F>();
  const auto sp = special_values(rf);
  std::mt19937 rng(12);
  // power-of-two scales keep ties exact; 3 and 0.7 make x * (1/scale) inexact
  const float scales[][2] = {{1.0f, 1.0f}, {0.5f, 2.0f}, {3.0f, 0.7f}, {1.0f / 1024, 4096.0f}, {1e-3f, 1e4f}};
  for (const auto& ks : scales) {
    fp8<F, fp8_scaling::per_tensor> q(ks[0], ks[1]);
    q.check(8);
    for (int D : head_dims())
      for (int rep = 0; rep < 6; ++rep) {
        const double p_special = rep % 3 == 0 ? 0.2 : rep % 3 == 1 ? 0.6 : 1.0;
        // specials times the key scale reach the exact ties of x / k_scale
        const float mag = rep < 3 ? ks[0] : std::ldexp(1.0f, static_cast<int>(rng() % 41) - 20);
        const auto x = make_row(D, rng, mag, sp, p_special);
        check_row<role::key>(q, x, rf);
        check_row<role::value>(q, x, rf);
      }
  }
}

/// Format(f) 8 lanes at a time against the scalar conversion on a grid of float bit patterns:
/// every 251st pattern, and for every sign and exponent, all 256 values of the top 8 mantissa bits
/// times low bits that make exact ties and their neighbours at every rounding position.
template <class F>
void check_lanes() {
#if KVC_QUANT_AVX2
  std::vector<std::uint32_t> pats;
  for (std::uint64_t b = 0; b <= 0xffffffffull; b += 251) pats.push_back(static_cast<std::uint32_t>(b));
  const std::uint32_t lows[] = {0, 1, 0x3fff, 0x4000, 0x4001, 0x7fff};
  for (std::uint32_t se = 0; se < 512; ++se)
    for (std::uint32_t hi = 0; hi < 256; ++hi)
      for (std::uint32_t lo : lows) pats.push_back(se << 23 | hi << 15 | lo);
  while (pats.size() % 8) pats.push_back(0x7f800000u);
  std::size_t bad = 0;
  for (std::size_t i = 0; i < pats.size(); i += 8) {
    float f[8];
    std::memcpy(f, pats.data() + i, sizeof f);
    alignas(16) std::uint8_t got[16];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(got), kvc::quant::detail::to_fp8_avx2<F>(_mm256_loadu_ps(f)));
    for (int j = 0; j < 8; ++j)
      if (got[j] != F(f[j]).bits && bad++ < 5) {
        INFO("bits " << pats[i + std::size_t(j)] << ": to_fp8_avx2 " << hexbyte(got[j]) << ", scalar "
                     << hexbyte(F(f[j]).bits));
        CHECK(false);
      }
  }
  REQUIRE(bad == 0);
#else
  WARN("built without AVX2+F16C: only the scalar encoder is checked");
#endif
}

}  // namespace

TEST_CASE("fp8 rounding reference agrees with kvc's scalar conversion on probe values", "[quant][fp8]") {
  // The reference must itself be right for the comparisons below to mean anything.
  const ref_format e4 = ref_for<kvc::fp8_e4m3>(), e5 = ref_for<kvc::fp8_e5m2>();
  for (float v : special_values(e4)) REQUIRE(e4.encode(v) == kvc::fp8_e4m3(v).bits);
  for (float v : special_values(e5)) REQUIRE(e5.encode(v) == kvc::fp8_e5m2(v).bits);
  REQUIRE(e4.encode(464.0f) == 0x7e);   // tie between 448 and the would-be 480: saturates
  REQUIRE(e4.encode(-0.0f) == 0x80);
  REQUIRE(e5.encode(61440.0f) == 0x7b);  // rounds to infinity without saturation
  REQUIRE(e4.encode(std::ldexp(1.0f, -10)) == 0x00);  // half the smallest subnormal 2^-9: tie to 0
  REQUIRE(e4.encode(std::ldexp(3.0f, -10)) == 0x02);  // 1.5 units: tie to 2
}

TEST_CASE("fp8 to_fp8_avx2 matches Format(float) bit for bit over float bit patterns", "[quant][fp8]") {
  check_lanes<kvc::fp8_e4m3>();
  check_lanes<kvc::fp8_e5m2>();
}

TEST_CASE("fp8 AVX2 encoder matches the scalar encoder and the reference: per-token-head scale", "[quant][fp8]") {
#if !KVC_QUANT_AVX2
  WARN("built without AVX2+F16C: encode() is the scalar encoder here");
#endif
  check_per_token<kvc::fp8_e4m3>();
  check_per_token<kvc::fp8_e5m2>();
}

TEST_CASE("fp8 AVX2 encoder matches the scalar encoder and the reference: per-tensor scale", "[quant][fp8]") {
  check_per_tensor<kvc::fp8_e4m3>();
  check_per_tensor<kvc::fp8_e5m2>();
}
