// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// The low-rank stage of `compose::stack` (kvc/compose/stack.hpp): `projecting<pca>`.
///
///   using S = kvc::compose::stack<kvc::compose::evicting<kvc::evict::snapkv>,
///                                 kvc::compose::projecting<kvc::compose::pca>,
///                                 kvc::compose::full_precision<kvc::half>>;
///   // S::store_type is lowrank::projected_cache<half>: each token's r_k key and r_v value
///   // coefficients in fp16 pages. SnapKV scores the rows the bases rebuild (U c + μ) and keeps
///   // its tokens' coefficients; decode attends in coefficient space (cpu/projected_attention.hpp).
///
/// A header of its own because PCA's fit (Eigen's symmetric eigensolver, kvc/lowrank/pca.hpp) and
/// the projected kernel cost a TU ~13 s of CPU at -O2 (GCC 12): a stack that does not project
/// should not pay for them (stack.hpp alone parses in ~3 s).

#include <cstdint>
#include <type_traits>
#include <utility>

#include <kvc/attention/options.hpp>
#include <kvc/compose/stack.hpp>
#include <kvc/cpu/projected_attention.hpp>
#include <kvc/isa.hpp>
#include <kvc/store/projected_cache.hpp>
#include <kvc/store/quant_cache.hpp>

KVC_BEGIN_NAMESPACE
namespace compose {
// Per ISA (docs/isa.md, rule 4): decode_attention calls the projected kernel.
KVC_BEGIN_ISA_NAMESPACE

/// Low-rank projection by PCA (kvc/lowrank/pca.hpp): the first append of each layer (the
/// prompt, or its first chunk: at least max(rank, value_rank) tokens) fits every kv head's key and
/// value bases, all heads or none (projected_cache::fit_layer); every token is stored as its
/// coefficients in them. Keys are projected as appended (post-RoPE). Loki and Eigen Attention fit
/// such bases offline on calibration text; fitting them on the prompt needs none (ShadowKV's
/// choice, for pre-RoPE keys).
struct pca {
  std::int32_t rank = 32;       ///< r_k, key coefficients per token (a quarter of head_dim 128)
  std::int32_t value_rank = 0;  ///< r_v, value coefficients per token; 0 means rank
  bool center = false;          ///< subtract the fitted mean first (fit_basis); off, as Loki
  std::int32_t sinks = 0;       ///< the first `sinks` tokens of the fitting append rebuilt exactly
};

/// Low-rank projection by Method (pca): the pages hold coefficients instead of channels.
template <class Method>
struct projecting {
  static_assert(std::is_same<Method, pca>::value,
                "kvc::compose::projecting<Method>: Method must be kvc::compose::pca (the low-rank method with a "
                "compile-time store)");
  Method method{};

  /// The store of coefficients in pages of T.
  template <class T>
  using store_type = lowrank::projected_cache<T>;

  /// The store for the stack's shape (its quantized-store fields do not apply).
  template <class Store>
  Store make_store(const quant_cache_config& cfg) const {
    return Store(lowrank::projected_shape(cfg, method.rank, method.value_rank));
  }
  /// A layer's first append: fits its bases from the tokens, then append() stores them; all or
  /// nothing (projected_cache::fit_layer_then).
  template <class Store, class Append>
  void fit(Store& st, std::int32_t layer, const float* k, const float* v, std::int32_t n, const char* who,
           Append&& append) const {
    st.fit_layer_then(layer, k, v, n, method.center, method.sinks, who, append);
  }
  /// Decode attention in coefficient space.
  template <class Store>
  void decode_attention(const Store& st, seq_id s, std::int32_t layer, const float* q, std::int32_t num_q_heads,
                        float* out, const decode_options& opt) const {
    cpu::projected_decode_attention(st, s, layer, q, num_q_heads, out, opt);
  }
};

KVC_END_ISA_NAMESPACE
}  // namespace compose
KVC_END_NAMESPACE
