// SPDX-License-Identifier: Apache-2.0
// Compile-time properties: views, mappings, accessors and storage types are trivially copyable
// (so they can be passed to kernels by value, also to CUDA), static extents cost no storage, and
// the plain/contiguous traits the CPU kernel dispatches on are what they should be.
#include <type_traits>

#include <kvc/kvc.hpp>

namespace {
using E = kvc::kv_dextents<>;
using S = kvc::kv_extents<8, 128>;

template <class T>
constexpr bool tc = std::is_trivially_copyable<T>::value;

template <class L>
constexpr bool view_ok() {
  using V = kvc::kv_view<const float, E, L>;
  using VS = kvc::kv_view<kvc::half, S, L>;
  using VD = kvc::kv_view<const float, E, L, kvc::device_accessor<kvc::default_accessor<const float>>>;
  return tc<V> && tc<VS> && tc<VD> && tc<typename V::mapping_type> && tc<typename VS::mapping_type> &&
         std::is_default_constructible<V>::value;
}
}  // namespace

static_assert(view_ok<kvc::layout_nhd>(), "dense NHD views must be trivially copyable");
static_assert(view_ok<kvc::layout_hnd>(), "dense HND views must be trivially copyable");
static_assert(view_ok<kvc::layout_paged<kvc::page_order::nhd>>(), "paged views must be trivially copyable");
static_assert(view_ok<kvc::layout_paged<kvc::page_order::hnd, 16>>(), "paged views must be trivially copyable");
static_assert(view_ok<kvc::layout_paged<kvc::page_order::hdn, 64>>(), "paged views must be trivially copyable");
static_assert(view_ok<kvc::layout_sink_window>(), "sink-window views must be trivially copyable");
static_assert(tc<kvc::default_accessor<float>> && tc<kvc::device_accessor<kvc::default_accessor<float>>>,
              "accessors must be trivially copyable");
static_assert(std::is_empty<kvc::default_accessor<float>>::value, "the plain accessor carries no state");
static_assert(tc<E> && tc<S> && tc<kvc::row_run<std::int32_t>>, "extents and runs must be trivially copyable");
static_assert(sizeof(kvc::extents<std::int32_t, 4, 8, 16>) == sizeof(std::int32_t), "all-static extents hold no data");
static_assert(sizeof(S) == sizeof(std::int32_t), "one dynamic extent: one index");
static_assert(sizeof(E) == 3 * sizeof(std::int32_t), "three dynamic extents: three indices");
static_assert(tc<kvc::stream_heads<kvc::paged_view<const float>>> &&
                  tc<kvc::same_heads<kvc::kv_view<const float, E, kvc::layout_nhd>>>,
              "head adaptors must be trivially copyable");
static_assert(tc<kvc::half> && tc<kvc::bfloat16> && tc<kvc::fp8_e4m3> && tc<kvc::fp8_e5m2>,
              "storage types must be trivially copyable");
static_assert(std::is_trivial<kvc::half>::value && sizeof(kvc::half) == 2 && alignof(kvc::half) == 2,
              "half is a trivial 2-byte type");
static_assert(kvc::is_plain_accessor_v<kvc::default_accessor<float>>, "default_accessor reads plain rows");
static_assert(kvc::layout_paged<kvc::page_order::nhd>::mapping<E>::dim_contiguous &&
                  kvc::layout_paged<kvc::page_order::hnd>::mapping<E>::dim_contiguous &&
                  !kvc::layout_paged<kvc::page_order::hdn>::mapping<E>::dim_contiguous,
              "only HDN pages scatter a row's dims");
static_assert(std::is_base_of<std::invalid_argument, kvc::error>::value &&
                  std::is_base_of<kvc::error, kvc::out_of_memory>::value,
              "kvc::error is an invalid_argument; out_of_memory is a kvc::error");
static_assert(std::is_same<typename kvc::kv_cache<float>::view_type::memory_space, kvc::host_memory>::value,
              "the cache lives in host memory");
static_assert(KVC_VERSION == KVC_VERSION_MAJOR * 10000 + KVC_VERSION_MINOR * 100 + KVC_VERSION_PATCH, "version");
