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
#include <kvc/quant/quant_cache.hpp>

KVC_BEGIN_NAMESPACE
namespace cpu {
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
    float mt = sg[0];
    for (std::int32_t i = 1; i < tn; ++i) mt = std::max(mt, sg[i]);
    const float m_new = std::max(st.m[g], mt);
    if (m_new > st.m[g]) {
      const float corr = std::exp(st.m[g] - m_new);
      st.l[g] *= corr;
      float* a = st.acc + g * D;
      for (std::int32_t d = 0; d < D; ++d) a[d] *= corr;
      st.m[g] = m_new;
    }
    for (std::int32_t i = 0; i < tn; ++i) sg[i] -= m_new;
    exp_inplace<Arch>(sg, tn);
    float l = 0.0f;
    for (std::int32_t i = 0; i < tn; ++i) l += sg[i];
    st.l[g] += l;
  }
}

inline constexpr std::int32_t tile_tokens = 64;

/// Per-task scratch.
struct scratch {
  std::vector<float> k, v, s, tmp;
  scratch(std::int32_t D, std::int32_t tile) {
    k.resize(static_cast<std::size_t>(tile) * D);
    v.resize(static_cast<std::size_t>(tile) * D);
    s.resize(static_cast<std::size_t>(max_group) * tile);
    tmp.resize(static_cast<std::size_t>(D));
  }
};

}  // namespace qdetail

}  // namespace cpu
KVC_END_NAMESPACE
