// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `kvc::decode_attention(heads, q, num_q_heads, out, opt)`: the backend is picked at compile time
/// from the memory space of the views' accessor. Host views run kvc::cpu::decode_attention, the
/// kernel of the TU's ISA: kvc::decode_attention lives in the ISA namespace (docs/isa.md), so
/// callers write kvc::decode_attention and each TU gets its own. Device views
/// (kvc::device_accessor) run kvc::cuda::decode_attention, which exists only in .cu files that
/// include <kvc/cuda.cuh> (it specialises `decode_backend<device_memory>`); without it, a device
/// view is a compile error that says so.
/// `kvc::prefill_attention(cache, seq, layer, q, num_queries, q_positions, num_q_heads, out, opt)`:
/// causal attention of a chunk of queries against one layer of a host cache, per ISA likewise.
/// There is no device backend for it.
///
/// A top-level header, not attention/: attention/ holds what every backend builds on (options,
/// RoPE, the split plan, the double reference), so it sits below cpu/ and cuda/, while this front
/// door sits above the CPU kernels it calls (tests/headers/check_include_layers.cmake).

#include <cstdint>
#include <type_traits>

#include <kvc/attention/options.hpp>
#include <kvc/cpu/decode_attention.hpp>
#include <kvc/cpu/prefill_attention.hpp>
#include <kvc/isa.hpp>
#include <kvc/view/accessor.hpp>
#include <kvc/view/heads.hpp>

KVC_BEGIN_NAMESPACE

template <class T>
inline constexpr bool dependent_false_v = false;

/// The decode backend of a memory space other than host memory (host views go to the CPU kernel
/// of the caller's ISA, in decode_attention below). Device memory: defined by <kvc/cuda/backend.cuh>.
template <class MemorySpace>
struct decode_backend {
  template <class Heads, class Options>
  static void run(const Heads&, const float*, std::int32_t, float*, const Options&) {
    static_assert(dependent_false_v<Heads>,
                  "kvc::decode_attention: these views live in device memory; include <kvc/cuda.cuh> in a .cu file "
                  "compiled by nvcc and link kvc::cuda (CMake: -DKVC_ENABLE_CUDA=ON, target_link_libraries(... "
                  "kvc::cuda))");
  }
};

// ---- per ISA (docs/isa.md): the host branch runs this TU's CPU kernel ----
KVC_BEGIN_ISA_NAMESPACE

/// Decode attention for one sequence and one layer on the backend of the views' memory space.
/// Options: kvc::decode_options for host views, kvc::cuda::device_decode_options for device views.
/// A store's layer (`store.layer(seq, layer, buf)`, a store_layer) runs that store's own kernel,
/// which reads its encoding directly: the header of the kernel adds the overload of this function
/// for its store (cpu/quant_attention.hpp, cpu/mixed_precision_attention.hpp,
/// cpu/projected_attention.hpp, cpu/merged_attention.hpp). This template takes views of
/// every other kind: kv_cache's, an engine's, decoded rows.
template <class Heads, class Options = decode_options>
void decode_attention(const Heads& heads, const float* q, std::int32_t num_q_heads, float* out,
                      const Options& opt = Options{}) {
  static_assert(!is_store_layer_v<Heads>,
                "kvc::decode_attention: these heads are a store's layer (store.layer(...)) whose kernel is not "
                "included; include the header of the store's kernel: quant_cache <kvc/cpu/quant_attention.hpp>, "
                "mixed_precision_cache <kvc/cpu/mixed_precision_attention.hpp>, lowrank::projected_cache "
                "<kvc/cpu/projected_attention.hpp>, merge::merged_cache <kvc/cpu/merged_attention.hpp>");
  using space = typename std::decay_t<decltype(heads.keys(0))>::memory_space;
  if constexpr (std::is_same<space, host_memory>::value) cpu::decode_attention(heads, q, num_q_heads, out, opt);
  else decode_backend<space>::run(heads, q, num_q_heads, out, opt);
}

/// Causal prefill attention for one sequence and one layer (kvc::cpu::prefill_attention: shapes,
/// options and errors).
template <class Cache, class Seq>
void prefill_attention(const Cache& cache, Seq seq, std::int32_t layer, const float* q, std::int32_t num_queries,
                       const std::int32_t* q_positions, std::int32_t num_q_heads, float* out,
                       const decode_options& opt = {}) {
  cpu::prefill_attention(cache, seq, layer, q, num_queries, q_positions, num_q_heads, out, opt);
}

KVC_END_ISA_NAMESPACE

KVC_END_NAMESPACE
