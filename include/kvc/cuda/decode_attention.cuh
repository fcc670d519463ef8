// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// CUDA decode attention over full-precision (fp32, fp16, bf16) paged caches on the device:
///  - kvc's per-stream pages (`decode_attention_streams`, and `decode_attention(heads, ...)` for a
///    kvc::stream_heads / kvc::same_heads of device views, picked by the views' device accessor);
///  - vLLM block tables (`decode_attention_vllm`, NHD or HND blocks);
///  - FlashInfer CSR page tables (`decode_attention_flashinfer`, combined or separate K/V pools).
/// All share one kernel (decode_kernel.cuh): split-K with an exact merge, GQA, ragged batches,
/// optional lse, probs and group_probs (same meaning as kvc::cpu::decode_attention, per sequence
/// rows laid out one after another).

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <kvc/attention/split_plan.hpp>
#include <kvc/cuda/common.cuh>
#include <kvc/cuda/decode_kernel.cuh>
#include <kvc/types.hpp>
#include <kvc/view/accessor.hpp>
#include <kvc/view/heads.hpp>
#include <kvc/view/layout_paged.hpp>

KVC_BEGIN_NAMESPACE
namespace cuda {
namespace detail {

/// 8 elements of T from raw bits to float.
template <class T>
__device__ __forceinline__ void raw_to_float(const raw_slice& r, float (&x)[vec]) {
  if constexpr (std::is_same<T, float>::value) {
    const float* f = reinterpret_cast<const float*>(&r);
#pragma unroll
    for (int i = 0; i < vec; ++i) x[i] = f[i];
  } else {
    const std::uint16_t* h = reinterpret_cast<const std::uint16_t*>(&r.a);
#pragma unroll
    for (int i = 0; i < vec; ++i) x[i] = static_cast<float>(T::from_bits(h[i]));
  }
}

/// Loads 8 elements of T at p (16-byte aligned: checked by the launchers).
template <class T>
__device__ __forceinline__ raw_slice load_row_slice(const T* p) {
  raw_slice r;
  r.a = __ldg(reinterpret_cast<const uint4*>(p));
  if constexpr (sizeof(T) == 4) r.b = __ldg(reinterpret_cast<const uint4*>(p) + 1);
  else r.b = make_uint4(0, 0, 0, 0);
  return r;
}

/// Full-precision paged source. Table `tables[id]` serves stream s with id = s (per-stream
/// tables, head index 0: kvc's store) or id = s / hkv (per-sequence tables, head s % hkv: engines).
template <class T>
struct paged_source {
  const T* k;
  const T* v;
  splitk::paged_rows rows;
  const std::int32_t* const* tables;
  std::int32_t hkv;
  bool per_stream;

  struct ctx_t {
    const std::int32_t* table;
    std::int32_t h;
  };
  __device__ ctx_t begin(const splitk::work_item& it) const {
    return per_stream ? ctx_t{tables[it.stream], 0} : ctx_t{tables[it.stream / hkv], it.stream % hkv};
  }
  __device__ bool query_to_stored(const ctx_t&) const { return false; }
  __device__ bool value_to_model(const ctx_t&) const { return false; }
  __device__ void to_stored_block(float*, int) const {}
  __device__ void to_model_block(float*, int) const {}
  __device__ raw_slice load_k(const ctx_t& c, int t, int d0) const {
    return load_row_slice(k + rows.offset(c.table, t, c.h) + d0);
  }
  __device__ raw_slice load_v(const ctx_t& c, int t, int d0) const {
    return load_row_slice(v + rows.offset(c.table, t, c.h) + d0);
  }
  __device__ void cvt_k(const ctx_t&, const raw_slice& r, int, int, float (&x)[vec]) const { raw_to_float<T>(r, x); }
  __device__ void cvt_v(const ctx_t&, const raw_slice& r, int, int, float (&x)[vec]) const { raw_to_float<T>(r, x); }
};

template <class T>
inline constexpr bool is_device_float_v =
    std::is_same<T, float>::value || std::is_same<T, half>::value || std::is_same<T, bfloat16>::value;

/// Checks shared by the full-precision entry points.
template <class T>
void check_paged(const T* k, const T* v, const splitk::paged_rows& rows, std::int32_t D, const char* who) {
  KVC_EXPECTS(k != nullptr && v != nullptr, who, ": k or v cache pointer is null");
  KVC_EXPECTS(aligned(k, 16) && aligned(v, 16), who, ": k/v base pointers must be 16-byte aligned (128-bit loads)");
  KVC_EXPECTS(rows.page_stride % vec == 0 && rows.token_stride % vec == 0 && rows.head_stride % vec == 0, who,
              ": page_stride = ", rows.page_stride, ", token_stride = ", rows.token_stride, ", head_stride = ",
              rows.head_stride, ", expected multiples of 8 elements (128-bit loads)");
  KVC_EXPECTS(supported_head_dim(D), who, ": head_dim = ", D, ", expected 64, 128 or 256");
}

/// Uploads the per-table device pointers and launches. `tables` is a host array of device
/// pointers.
template <class T>
void run_paged(const T* k, const T* v, const splitk::paged_rows& rows, const std::vector<const std::int32_t*>& tables,
               bool per_stream, const std::vector<std::int32_t>& lengths, std::int32_t hkv, std::int32_t G,
               std::int32_t D, const float* q, float* out, const device_decode_options& opt, const char* who) {
  check_paged(k, v, rows, D, who);
  for (std::size_t i = 0; i < lengths.size(); ++i)
    KVC_EXPECTS(lengths[i] == 0 || tables[per_stream ? i : i / static_cast<std::size_t>(hkv)] != nullptr, who,
                ": the page table of stream ", i, " is null with ", lengths[i], " tokens");
  // The table pointers go to the workspace (pageable copies are staged before cudaMemcpyAsync
  // returns, so the host vector may die); a temporary workspace is synchronised before it is freed.
  workspace local;
  workspace& ws = opt.ws ? *opt.ws : local;
  if (!(opt.ws && ws.tables_key == tables)) {  // layers sharing page tables (engines) upload them once
    ws.tables.upload(tables, opt.stream);
    ws.tables_key = tables;
  }
  paged_source<T> src{k, v, rows, ws.tables.data(), hkv, per_stream};
  device_decode_options o = opt;
  o.ws = &ws;
  launch_decode(src, lengths.data(), static_cast<std::int32_t>(lengths.size()), G, D, q, out, o);
  if (!opt.ws) KVC_CUDA_CHECK(cudaStreamSynchronize(opt.stream));
}

}  // namespace detail

/// Decode attention over kvc-store streams in device memory: stream s = seq * num_kv_heads + head
/// (one layer) has `lengths[s]` tokens in pages `tables[s]` (a device array), each page
/// [K: P x D][V: P x D] of T at `pool + page * page_stride` (page_stride in elements).
/// \param q    [streams * G][D] device queries (RoPE applied), G = num_q_heads / num_kv_heads
/// \param out  [streams * G][D] device output
template <class T>
void decode_attention_streams(const T* pool, std::int64_t page_stride, std::int32_t page_size,
                              const std::vector<const std::int32_t*>& tables, const std::vector<std::int32_t>& lengths,
                              std::int32_t G, std::int32_t D, const float* q, float* out,
                              const device_decode_options& opt = {}) {
  static_assert(detail::is_device_float_v<T>, "kvc::cuda::decode_attention_streams: T must be float, kvc::half or kvc::bfloat16");
  KVC_EXPECTS(tables.size() == lengths.size(), "tables.size() = ", tables.size(), ", expected lengths.size() = ",
              lengths.size());
  KVC_EXPECTS(G >= 1, "G = ", G, ", expected >= 1 query heads per kv head");
  const splitk::paged_rows rows = splitk::store_rows(page_size, D, page_stride);
  detail::run_paged(pool, pool + static_cast<std::int64_t>(page_size) * D, rows, tables, true, lengths, 1, G, D, q, out,
                    opt, "kvc::cuda::decode_attention_streams");
}

/// vLLM block layout: K and V caches [num_blocks][block_size][hkv][D] (NHD) or
/// [num_blocks][hkv][block_size][D] (HND), block_tables [batch][max_blocks] on the device,
/// seq_lens [batch] on the host (the split-K plan needs them).
template <page_order Order = page_order::nhd, class T>
void decode_attention_vllm(const T* k_cache, const T* v_cache, const std::int32_t* block_tables,
                           std::int32_t max_blocks, const std::vector<std::int32_t>& seq_lens, std::int32_t block_size,
                           std::int32_t hkv, std::int32_t D, const float* q, std::int32_t num_q_heads, float* out,
                           const device_decode_options& opt = {}) {
  static_assert(Order != page_order::hdn, "kvc::cuda::decode_attention_vllm: vLLM blocks are NHD or HND");
  static_assert(detail::is_device_float_v<T>, "kvc::cuda::decode_attention_vllm: T must be float, kvc::half or kvc::bfloat16");
  KVC_EXPECTS(hkv > 0 && num_q_heads > 0 && num_q_heads % hkv == 0, "num_q_heads = ", num_q_heads,
              ", expected a positive multiple of num_kv_heads = ", hkv);
  const splitk::paged_rows rows =
      splitk::engine_rows(Order == page_order::hnd, block_size, hkv, D, std::int64_t{block_size} * hkv * D);
  std::vector<const std::int32_t*> tables(seq_lens.size());
  std::vector<std::int32_t> lengths(seq_lens.size() * hkv);
  for (std::size_t b = 0; b < seq_lens.size(); ++b) {
    KVC_EXPECTS(seq_lens[b] >= 0 && seq_lens[b] <= std::int64_t{max_blocks} * block_size, "seq_lens[", b, "] = ",
                seq_lens[b], ", expected 0..max_blocks * block_size = ", std::int64_t{max_blocks} * block_size);
    tables[b] = block_tables + b * static_cast<std::size_t>(max_blocks);
    for (std::int32_t h = 0; h < hkv; ++h) lengths[b * hkv + h] = seq_lens[b];
  }
  detail::run_paged(k_cache, v_cache, rows, tables, false, lengths, hkv, num_q_heads / hkv, D, q, out, opt,
                    "kvc::cuda::decode_attention_vllm");
}

/// FlashInfer CSR layout: sequence b holds pages indices[indptr[b] .. indptr[b+1]) (indices on the
/// device; indptr and last_page_len on the host, as FlashInfer's plan step has them), its last
/// page last_page_len[b] tokens. K of page p at pool + p * page_stride, V at + v_offset
/// (combined [pages][2][P][H][D]: page_stride = 2 P H D, v_offset = P H D).
template <page_order Order = page_order::nhd, class T>
void decode_attention_flashinfer(const T* pool, const std::vector<std::int32_t>& indptr, const std::int32_t* indices,
                                 const std::vector<std::int32_t>& last_page_len, std::int32_t page_size,
                                 std::int32_t hkv, std::int32_t D, std::int64_t page_stride, std::int64_t v_offset,
                                 const float* q, std::int32_t num_q_heads, float* out,
                                 const device_decode_options& opt = {}) {
  static_assert(Order != page_order::hdn, "kvc::cuda::decode_attention_flashinfer: pages are NHD or HND");
  static_assert(detail::is_device_float_v<T>, "kvc::cuda::decode_attention_flashinfer: T must be float, kvc::half or kvc::bfloat16");
  KVC_EXPECTS(!indptr.empty() && last_page_len.size() + 1 == indptr.size(), "indptr.size() = ", indptr.size(),
              ", last_page_len.size() = ", last_page_len.size(), ", expected batch + 1 and batch");
  KVC_EXPECTS(hkv > 0 && num_q_heads > 0 && num_q_heads % hkv == 0, "num_q_heads = ", num_q_heads,
              ", expected a positive multiple of num_kv_heads = ", hkv);
  const splitk::paged_rows rows = splitk::engine_rows(Order == page_order::hnd, page_size, hkv, D, page_stride);
  const std::size_t B = last_page_len.size();
  std::vector<const std::int32_t*> tables(B);
  std::vector<std::int32_t> lengths(B * hkv);
  for (std::size_t b = 0; b < B; ++b) {
    const std::int32_t n = indptr[b + 1] - indptr[b];
    KVC_EXPECTS(n >= 0, "indptr[", b + 1, "] = ", indptr[b + 1], " < indptr[", b, "] = ", indptr[b]);
    KVC_EXPECTS(n == 0 || (last_page_len[b] >= 1 && last_page_len[b] <= page_size), "last_page_len[", b, "] = ",
                last_page_len[b], ", expected 1..", page_size);
    tables[b] = indices + indptr[b];
    for (std::int32_t h = 0; h < hkv; ++h) lengths[b * hkv + h] = n == 0 ? 0 : (n - 1) * page_size + last_page_len[b];
  }
  detail::run_paged(pool, pool + v_offset, rows, tables, false, lengths, hkv, num_q_heads / hkv, D, q, out, opt,
                    "kvc::cuda::decode_attention_flashinfer");
}

namespace detail {
template <class View>
inline constexpr bool is_device_view_v = std::is_same<typename View::memory_space, device_memory>::value;

/// The pieces of a device paged view: base pointer, paged_rows, table, token count.
template <class View>
splitk::paged_rows view_rows(const View& v, std::int32_t heads) {
  using M = typename View::mapping_type;
  static_assert(M::dim_contiguous, "kvc::cuda::decode_attention: HDN pages keep the token axis innermost; the CUDA "
                                   "kernel reads rows (use NHD or HND pages)");
  const auto& m = v.mapping();
  return splitk::engine_rows(M::order == page_order::hnd, static_cast<std::int32_t>(m.page_size()), heads,
                             static_cast<std::int32_t>(v.extent(2)), m.page_stride());
}
}  // namespace detail

/// Decode attention for one sequence from device views, the CUDA counterpart of
/// kvc::cpu::decode_attention(heads, ...): `heads` is a kvc::stream_heads or kvc::same_heads whose
/// K/V views are paged views with a kvc::device_accessor (device pages, device page tables).
/// q, out and the option pointers are device memory.
template <class Heads>
void decode_attention(const Heads& heads, const float* q, std::int32_t num_q_heads, float* out,
                      const device_decode_options& opt = {}) {
  using KView = std::decay_t<decltype(heads.keys(0))>;
  using VView = std::decay_t<decltype(heads.values(0))>;
  static_assert(detail::is_device_view_v<KView> && detail::is_device_view_v<VView>,
                "kvc::cuda::decode_attention: these views live in host memory; use kvc::cpu::decode_attention "
                "(or wrap device pointers in kvc::device_accessor)");
  static_assert(std::is_same<KView, VView>::value, "kvc::cuda::decode_attention: K and V views must have one type");
  static_assert(!has_log_weights_v<Heads>,
                "kvc::cuda::decode_attention: these heads carry per-token log-weights (a merged cache's layer); "
                "this kernel would ignore them");
  using T = std::remove_cv_t<typename KView::element_type>;
  static_assert(detail::is_device_float_v<T> && is_plain_accessor_v<typename KView::accessor_type>,
                "kvc::cuda::decode_attention: device views must hold float, kvc::half or kvc::bfloat16 read plainly; "
                "quantized device caches use kvc::cuda::decode_attention_quant");
  const std::int32_t hkv = heads.num_kv_heads(), D = heads.head_dim();
  KVC_EXPECTS(hkv > 0 && num_q_heads > 0 && num_q_heads % hkv == 0, "num_q_heads = ", num_q_heads,
              ", expected a positive multiple of num_kv_heads = ", hkv);
  // Every head must share one K base, one V base and one rows description (true of kvc's store
  // and of one engine view); heads differ only by table and length.
  const KView& k0 = heads.keys(0);
  const VView& v0 = heads.values(0);
  const std::int32_t in_view_heads = static_cast<std::int32_t>(k0.extent(1));
  const splitk::paged_rows rows = detail::view_rows(k0, in_view_heads);
  std::vector<const std::int32_t*> tables(static_cast<std::size_t>(hkv));
  std::vector<std::int32_t> lengths(static_cast<std::size_t>(hkv));
  const T* kb = k0.data_handle() + k0.mapping().page_offset();
  const T* vb = v0.data_handle() + v0.mapping().page_offset();
  for (std::int32_t h = 0; h < hkv; ++h) {
    const KView& kh = heads.keys(h);
    const VView& vh = heads.values(h);
    KVC_EXPECTS(kh.extent(0) == vh.extent(0), "head ", h, ": ", kh.extent(0), " keys but ", vh.extent(0), " values");
    KVC_EXPECTS(kh.extent(2) == D && vh.extent(2) == D, "head ", h, ": view head_dim differs from head_dim = ", D);
    KVC_EXPECTS(kh.data_handle() + kh.mapping().page_offset() == kb &&
                    vh.data_handle() + vh.mapping().page_offset() == vb && kh.mapping().page_stride() == rows.page_stride &&
                    kh.mapping().page_table() == vh.mapping().page_table(),
                "head ", h, ": the CUDA kernel needs every head in one page pool with one page table for K and V");
    tables[static_cast<std::size_t>(h)] = kh.mapping().page_table();
    lengths[static_cast<std::size_t>(h)] = static_cast<std::int32_t>(kh.extent(0));
  }
  // same_heads: one table for all heads, head index h; stream_heads: table per head, index 0.
  // Modelled as per-stream tables with the head folded into the base pointer is not possible
  // (one base), so per-stream tables with head stride apply to stream_heads, whose views have
  // one head.
  const bool per_stream = in_view_heads == 1;
  if (!per_stream)
    KVC_EXPECTS(in_view_heads == hkv, "same_heads view has ", in_view_heads, " heads, expected num_kv_heads = ", hkv);
  std::vector<const std::int32_t*> t = per_stream ? tables : std::vector<const std::int32_t*>{tables[0]};
  detail::run_paged(kb, vb, rows, t, per_stream, lengths, hkv, num_q_heads / hkv, D, q, out, opt,
                    "kvc::cuda::decode_attention");
}

}  // namespace cuda
KVC_END_NAMESPACE
