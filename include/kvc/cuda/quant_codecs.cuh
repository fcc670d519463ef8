// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Device-side readers of the quantizers' packed records, one lane's 8 elements at a time. The
/// bit layout is the codecs' own: codes come out through kvc::quant::detail::unpack_code, zero
/// points through affine_zero, fp8 through the Format's from_bits and fp8<>::row_scale, rotations
/// through channel_sign, all KVC_HOST_DEVICE functions of <kvc/quant/>. What a record contains
/// where (code bytes, group size, record size) is asked of the codec on the host (its
/// record_bytes, code_bytes, group) and passed to the kernel in a `qlayout`, so a change of the
/// codecs' record layout reaches the kernels without edits here.
///
/// Supported: intn<2|4|8, any scheme, any group> (int8/int4/int2), kivi<2|4|8> (per-channel keys,
/// per-token values; kivi<3>'s planar blocks of 16 codes have no reader yet), fp8<e4m3|e5m2, per-token|per-tensor>, and rotated<any of these>. Other
/// codecs (gear, outliers, mixed precision) have no device reader yet: using them is a compile
/// error naming the codec.

#include <cstdint>
#include <type_traits>

#include <kvc/cuda/common.cuh>
#include <kvc/cuda/decode_kernel.cuh>
#include <kvc/numeric/bits.hpp>
#include <kvc/quant/codec.hpp>
#include <kvc/quant/fp8.hpp>
#include <kvc/quant/int8.hpp>
#include <kvc/quant/kivi.hpp>
#include <kvc/quant/rotated.hpp>
#include <kvc/types.hpp>

KVC_BEGIN_NAMESPACE
namespace cuda {
namespace detail {

/// Record geometry of one codec and role, from the codec's host functions.
struct qlayout {
  std::int32_t rb = 0;          ///< bytes per record
  std::int32_t upr = 1;         ///< tokens per record
  std::int32_t code_bytes = 0;  ///< bytes of codes before the scales
  std::int32_t row_bytes = 0;   ///< per-channel records: code bytes of one token
  std::int32_t group = 0;       ///< per-token records: channels per scale
  std::int32_t ngroups = 0;
  std::int32_t D = 0;
  float k_scale = 1.0f, v_scale = 1.0f;  ///< fp8 per-tensor scales
  std::uint32_t seed = 0;                ///< rotated: the sign seed
};

/// 8 codes of Bits bits in the low bytes of w -> floats, through the codec's unpack_code.
template <int Bits>
__device__ __forceinline__ void unpack8(const uint4& w, float (&c)[vec]) {
  const std::uint8_t* b = reinterpret_cast<const std::uint8_t*>(&w);
#pragma unroll
  for (int i = 0; i < vec; ++i) c[i] = static_cast<float>(quant::detail::unpack_code<Bits>(b, i));
}

__device__ __forceinline__ float half_at(unsigned bits) {
  return static_cast<float>(half::from_bits(static_cast<std::uint16_t>(bits & 0xffffu)));
}

/// Per-token affine records [codes D*b/8][scale half x ng][zero half x ng when asymmetric].
template <int Bits, quant::scheme S>
struct token_affine_reader {
  static constexpr bool has_zero = S == quant::scheme::asymmetric;
  __device__ static raw_slice load(const qlayout& L, const std::byte* part, int slot, int d0) {
    const std::byte* rec = part + static_cast<long long>(L.rb) * slot;
    raw_slice r;
    load_bytes<Bits>(rec + d0 * Bits / 8, r.a);
    const int g = d0 / L.group;
    load_bytes<2>(rec + L.code_bytes + 2 * g, r.b);
    if constexpr (has_zero) {
      uint4 z;
      load_bytes<2>(rec + L.code_bytes + 2 * L.ngroups + 2 * g, z);
      r.b.y = z.x;
    }
    return r;
  }
  __device__ static void cvt(const qlayout&, const raw_slice& r, const std::byte*, int, int, float (&x)[vec]) {
    const float s = half_at(r.b.x);
    const float z = quant::detail::affine_zero<Bits, S>(s, has_zero ? half_at(r.b.y) : 0.0f);
    float c[vec];
    unpack8<Bits>(r.a, c);
#pragma unroll
    for (int i = 0; i < vec; ++i) x[i] = s * c[i] + z;
  }
};

/// Per-channel records over G tokens [G rows of D*b/8 codes][scale half x D][zero half x D]
/// (KIVI keys). The scales and zeros are shared by the G tokens of a record, so they are read at
/// conversion time (L1 hits after the record's first token).
template <int Bits, int G>
struct channel_affine_reader {
  __device__ static raw_slice load(const qlayout& L, const std::byte* part, int slot, int d0) {
    const std::byte* rec = part + static_cast<long long>(L.rb) * (slot / G);
    raw_slice r;
    load_bytes<Bits>(rec + static_cast<long long>(L.row_bytes) * (slot % G) + d0 * Bits / 8, r.a);
    r.b = make_uint4(0, 0, 0, 0);
    return r;
  }
  __device__ static void cvt(const qlayout& L, const raw_slice& r, const std::byte* part, int slot, int d0,
                             float (&x)[vec]) {
    const std::byte* rec = part + static_cast<long long>(L.rb) * (slot / G);
    uint4 sw, zw;
    load_bytes<16>(rec + L.code_bytes + 2 * d0, sw);
    load_bytes<16>(rec + L.code_bytes + 2 * L.D + 2 * d0, zw);
    const std::uint16_t* sh = reinterpret_cast<const std::uint16_t*>(&sw);
    const std::uint16_t* zh = reinterpret_cast<const std::uint16_t*>(&zw);
    float c[vec];
    unpack8<Bits>(r.a, c);
#pragma unroll
    for (int i = 0; i < vec; ++i) x[i] = half_at(sh[i]) * c[i] + half_at(zh[i]);
  }
};

/// fp8 records [D codes][float scale when per token]; the scale comes from fp8<>::row_scale.
template <class Format, quant::fp8_scaling Scaling, quant::role R>
struct fp8_reader {
  using codec = quant::fp8<Format, Scaling>;
  __device__ static raw_slice load(const qlayout& L, const std::byte* part, int slot, int d0) {
    raw_slice r;
    load_bytes<8>(part + static_cast<long long>(L.rb) * slot + d0, r.a);
    r.b = make_uint4(0, 0, 0, 0);
    return r;
  }
  __device__ static void cvt(const qlayout& L, const raw_slice& r, const std::byte* part, int slot, int,
                             float (&x)[vec]) {
    codec q;
    q.k_scale = L.k_scale;
    q.v_scale = L.v_scale;
    const float s = q.template row_scale<R>(part + static_cast<long long>(L.rb) * slot, L.D);
    const std::uint8_t* b = reinterpret_cast<const std::uint8_t*>(&r.a);
#pragma unroll
    for (int i = 0; i < vec; ++i) x[i] = static_cast<float>(Format::from_bits(b[i])) * s;
  }
};

/// Maps a codec type and role to its reader and record geometry. The primary template is the
/// "no device reader" error.
template <class Q, quant::role R, class = void>
struct device_codec {
  static_assert(sizeof(Q) == 0,
                "kvc::cuda: this quantizer has no device reader (supported: intn, kivi, fp8 and rotated<...> of "
                "them); decode it with kvc::cpu::decode_attention");
};

template <int Bits, quant::scheme S, int Group, quant::role R>
struct device_codec<quant::intn<Bits, S, Group>, R> {
  using Q = quant::intn<Bits, S, Group>;
  using reader = token_affine_reader<Bits, S>;
  static constexpr bool rotates = false;
  static qlayout layout(const Q& q, int D) {
    qlayout L;
    L.rb = static_cast<std::int32_t>(q.record_bytes(R, D));
    L.code_bytes = static_cast<std::int32_t>(Q::impl::code_bytes(D));
    L.group = Q::impl::group(D);
    L.ngroups = Q::impl::groups(D);
    L.D = D;
    return L;
  }
  static bool fits(int D) { return (Group == 0 || Group % vec == 0) && D % vec == 0; }
};

template <int Bits, int G, int Res>
struct device_codec<quant::kivi<Bits, G, Res>, quant::role::key> {
  static_assert(Bits != 3, "kvc::cuda: kivi<3> has no device reader yet (its codes are packed in blocks of 16, "
                           "the readers take 8 codes at a time), so neither attention nor append on the GPU; "
                           "use kivi<2|4|8> there");
  using Q = quant::kivi<Bits, G, Res>;
  using reader = channel_affine_reader<Bits, G>;
  static constexpr bool rotates = false;
  static qlayout layout(const Q& q, int D) {
    qlayout L;
    L.rb = static_cast<std::int32_t>(q.record_bytes(quant::role::key, D));
    L.upr = G;
    L.code_bytes = static_cast<std::int32_t>(Q::key_impl::code_bytes(D));
    L.row_bytes = static_cast<std::int32_t>(Q::key_impl::row_bytes(D));
    L.D = D;
    return L;
  }
  static bool fits(int D) { return D % vec == 0; }
};

template <int Bits, int G, int Res>
struct device_codec<quant::kivi<Bits, G, Res>, quant::role::value> {
  static_assert(Bits != 3, "kvc::cuda: kivi<3> has no device reader yet (its codes are packed in blocks of 16, "
                           "the readers take 8 codes at a time), so neither attention nor append on the GPU; "
                           "use kivi<2|4|8> there");
  using Q = quant::kivi<Bits, G, Res>;
  using reader = token_affine_reader<Bits, quant::scheme::asymmetric>;
  static constexpr bool rotates = false;
  static qlayout layout(const Q& q, int D) {
    qlayout L;
    L.rb = static_cast<std::int32_t>(q.record_bytes(quant::role::value, D));
    L.code_bytes = static_cast<std::int32_t>(Q::value_impl::code_bytes(D));
    L.group = Q::value_impl::group(D);
    L.ngroups = Q::value_impl::groups(D);
    L.D = D;
    return L;
  }
  static bool fits(int D) { return G % vec == 0 && D % vec == 0; }
};

template <class Format, quant::fp8_scaling Scaling, quant::role R>
struct device_codec<quant::fp8<Format, Scaling>, R> {
  using Q = quant::fp8<Format, Scaling>;
  using reader = fp8_reader<Format, Scaling, R>;
  static constexpr bool rotates = false;
  static qlayout layout(const Q& q, int D) {
    qlayout L;
    L.rb = static_cast<std::int32_t>(q.record_bytes(R, D));
    L.k_scale = q.k_scale;
    L.v_scale = q.v_scale;
    L.D = D;
    return L;
  }
  static bool fits(int D) { return D % vec == 0; }
};

template <class Inner, bool RandomSigns, quant::role R>
struct device_codec<quant::rotated<Inner, RandomSigns>, R> : device_codec<Inner, R> {
  using Q = quant::rotated<Inner, RandomSigns>;
  static constexpr bool rotates = true;
  static constexpr bool random_signs = RandomSigns;
  static qlayout layout(const Q& q, int D) {
    qlayout L = device_codec<Inner, R>::layout(q.q, D);
    L.seed = q.seed;
    return L;
  }
};

template <class Q, quant::role R>
inline constexpr bool random_signs_v = [] {
  if constexpr (device_codec<Q, R>::rotates) return device_codec<Q, R>::random_signs;
  else return false;
}();

/// x <- H (s . x) / sqrt(D) on gn rows of D in shared memory (rotated<>::to_stored).
template <int D>
__device__ void rows_to_stored(float* x, int gn, bool signs, std::uint32_t seed) {
  if (signs)
    for (int i = threadIdx.x; i < gn * D; i += blockDim.x) x[i] *= quant::detail::channel_sign(seed, i % D);
  block_fwht<D>(x, gn);
  const float n = 1.0f / sqrtf(static_cast<float>(D));
  for (int i = threadIdx.x; i < gn * D; i += blockDim.x) x[i] *= n;
  __syncthreads();
}

/// y <- s . (H y) / sqrt(D) on gn rows in shared memory (rotated<>::to_model).
template <int D>
__device__ void rows_to_model(float* y, int gn, bool signs, std::uint32_t seed) {
  block_fwht<D>(y, gn);
  const float n = 1.0f / sqrtf(static_cast<float>(D));
  for (int i = threadIdx.x; i < gn * D; i += blockDim.x)
    y[i] *= n * (signs ? quant::detail::channel_sign(seed, i % D) : 1.0f);
  __syncthreads();
}

/// One row's to_model when its D elements are spread over D / 8 consecutive lanes, 8 each: the
/// in-lane stages first, then the cross-lane ones by shuffles (same stage order as fwht).
__device__ __forceinline__ void row_to_model(float (&x)[vec], int D, int lx, bool signs, std::uint32_t seed) {
#pragma unroll
  for (int h = 1; h < vec; h *= 2)
#pragma unroll
    for (int i = 0; i < vec; ++i)
      if ((i & h) == 0) {
        const float a = x[i], b = x[i + h];
        x[i] = a + b;
        x[i + h] = a - b;
      }
  for (int h = vec; h < D; h *= 2) {
    const int lanes = h / vec;
#pragma unroll
    for (int i = 0; i < vec; ++i) {
      const float other = __shfl_xor_sync(0xffffffffu, x[i], lanes);
      x[i] = (lx & lanes) ? other - x[i] : x[i] + other;
    }
  }
  const float n = 1.0f / sqrtf(static_cast<float>(D));
#pragma unroll
  for (int i = 0; i < vec; ++i) x[i] *= n * (signs ? quant::detail::channel_sign(seed, lx * vec + i) : 1.0f);
}

}  // namespace detail
}  // namespace cuda
KVC_END_NAMESPACE
