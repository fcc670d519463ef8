// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Device kernels that write the cache: appending new tokens into pages, encoding quantized
/// records with the codecs' own KVC_HOST_DEVICE encoders, and compacting streams after an
/// eviction selection. Page allocation and the per-stream bookkeeping (lengths, positions, which
/// residual tokens are due for encoding) stay on the host, as in kvc's store: these kernels only
/// move and encode bytes at addresses the host planned.

#include <cstdint>
#include <type_traits>
#include <vector>

#include <kvc/attention/split_plan.hpp>
#include <kvc/cuda/common.cuh>
#include <kvc/cuda/quant_codecs.cuh>
#include <kvc/types.hpp>

KVC_BEGIN_NAMESPACE
namespace cuda {
namespace detail {

/// Token i of head h goes to row start[stream] + i of stream = seq_stream0 + h's table.
template <class T, class In>
__global__ void append_kernel(T* k_base, T* v_base, splitk::paged_rows rows, const std::int32_t* const* tables,
                              const std::int32_t* start, bool per_stream, std::int32_t H, std::int32_t D, const In* k,
                              const In* v, std::int32_t n) {
  const int i = blockIdx.x / H, h = blockIdx.x % H;
  if (i >= n) return;
  const std::int32_t* table = per_stream ? tables[h] : tables[0];
  const int hi = per_stream ? 0 : h;
  const long long off = rows.offset(table, start[h] + i, hi);
  const long long src = (static_cast<long long>(i) * H + h) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    if constexpr (std::is_same<T, In>::value) {
      k_base[off + d] = k[src + d];
      v_base[off + d] = v[src + d];
    } else {
      k_base[off + d] = T(static_cast<float>(k[src + d]));
      v_base[off + d] = T(static_cast<float>(v[src + d]));
    }
  }
}

/// Device encoders: the codecs' own KVC_HOST_DEVICE encode functions.
template <class Q, quant::role R>
struct device_encoder;
template <int Bits, quant::scheme S, int Group, quant::role R>
struct device_encoder<quant::intn<Bits, S, Group>, R> {
  __device__ static void encode(const quant::intn<Bits, S, Group>&, const float* x, int D, std::byte* rec) {
    quant::intn<Bits, S, Group>::impl::encode(x, D, rec);
  }
};
template <int Bits, int G, int Res>
struct device_encoder<quant::kivi<Bits, G, Res>, quant::role::key> {
  __device__ static void encode(const quant::kivi<Bits, G, Res>&, const float* x, int D, std::byte* rec) {
    quant::kivi<Bits, G, Res>::key_impl::encode(x, D, rec);
  }
};
template <int Bits, int G, int Res>
struct device_encoder<quant::kivi<Bits, G, Res>, quant::role::value> {
  __device__ static void encode(const quant::kivi<Bits, G, Res>&, const float* x, int D, std::byte* rec) {
    quant::kivi<Bits, G, Res>::value_impl::encode(x, D, rec);
  }
};
template <class F, quant::fp8_scaling S, quant::role R>
struct device_encoder<quant::fp8<F, S>, R> {
  __device__ static void encode(const quant::fp8<F, S>& q, const float* x, int D, std::byte* rec) {
    q.template encode<R>(x, D, rec);
  }
};
/// rotated<Q>: to_stored (signs, fwht, 1/sqrt(D): the codec's HD pieces) then Q's encoder.
inline constexpr int max_rotated_record_floats = 4096;
template <class Inner, bool RS, quant::role R>
struct device_encoder<quant::rotated<Inner, RS>, R> {
  __device__ static void encode(const quant::rotated<Inner, RS>& q, const float* x, int D, std::byte* rec) {
    const int u = Inner::tokens_per_record(R);
    float tmp[max_rotated_record_floats];
    for (int i = 0; i < u * D; ++i) tmp[i] = x[i];
    const float n = 1.0f / sqrtf(static_cast<float>(D));
    for (int t = 0; t < u; ++t) {
      float* y = tmp + t * D;
      if (RS)
        for (int d = 0; d < D; ++d) y[d] *= quant::detail::channel_sign(q.seed, d);
      quant::detail::fwht(y, D);
      for (int d = 0; d < D; ++d) y[d] *= n;
    }
    device_encoder<Inner, R>::encode(q.q, tmp, D, rec);
  }
};

/// One thread per record: rec[j] <- encode(src[j] .. + tokens_per_record * D).
template <class Q, quant::role R>
__global__ void encode_kernel(const Q q, const float* const* src, std::byte* const* dst, std::int32_t jobs,
                              std::int32_t D) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j < jobs) device_encoder<Q, R>::encode(q, src[j], D, dst[j]);
}

/// Record compaction, phase 1: copy the kept records of every stream into scratch.
struct compact_geom {
  std::byte* base;
  long long page_stride;  ///< bytes
  long long part_off[2];  ///< K and V parts inside a page, bytes
  std::int32_t rb[2];     ///< record bytes of K and V
  std::int32_t shift;     ///< log2(records per page)
};
__device__ __forceinline__ std::byte* record_at(const compact_geom& g, const std::int32_t* table, int t, int part) {
  return g.base + static_cast<long long>(table[t >> g.shift]) * g.page_stride + g.part_off[part] +
         static_cast<long long>(g.rb[part]) * (t & ((1 << g.shift) - 1));
}
/// Job j = kept token j of the flattened selection: stream[j], source index src_t[j], new index dst_t[j].
__global__ void compact_gather(compact_geom g, const std::int32_t* const* tables, const std::int32_t* stream,
                               const std::int32_t* src_t, std::int32_t jobs, std::byte* scratch) {
  const int j = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (j >= jobs) return;
  const long long rec = g.rb[0] + g.rb[1];
  for (int part = 0; part < 2; ++part) {
    const std::byte* s = record_at(g, tables[stream[j]], src_t[j], part);
    std::byte* d = scratch + rec * j + (part ? g.rb[0] : 0);
    for (int b = lane; b < g.rb[part]; b += 32) d[b] = s[b];
  }
}
/// Phase 2: write the records back at their new indices (in place is safe: phase 1 read all).
__global__ void compact_scatter(compact_geom g, const std::int32_t* const* tables, const std::int32_t* stream,
                                const std::int32_t* dst_t, std::int32_t jobs, const std::byte* scratch) {
  const int j = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (j >= jobs) return;
  const long long rec = g.rb[0] + g.rb[1];
  for (int part = 0; part < 2; ++part) {
    std::byte* d = record_at(g, tables[stream[j]], dst_t[j], part);
    const std::byte* s = scratch + rec * j + (part ? g.rb[0] : 0);
    for (int b = lane; b < g.rb[part]; b += 32) d[b] = s[b];
  }
}

}  // namespace detail

/// Appends n tokens to H streams of kvc's store on the device: token i of head h becomes row
/// start[h] + i of stream h (pages `tables[h]`, already allocated by the host for those rows).
/// \param pool        device page pool, pages [K: P x D][V: P x D] of T, page_stride in elements
/// \param k,v         [n][H][D] device rows, float or T
template <class T, class In>
void append_streams(T* pool, std::int64_t page_stride, std::int32_t page_size,
                    const std::vector<const std::int32_t*>& tables, const std::vector<std::int32_t>& start,
                    std::int32_t D, const In* k, const In* v, std::int32_t n, cudaStream_t stream = nullptr) {
  static_assert(std::is_same<T, float>::value || std::is_same<T, half>::value || std::is_same<T, bfloat16>::value,
                "kvc::cuda::append_streams: T must be float, kvc::half or kvc::bfloat16");
  static_assert(std::is_same<In, float>::value || std::is_same<In, T>::value,
                "kvc::cuda::append_streams: K/V input must be float or the cache's element type");
  KVC_EXPECTS(tables.size() == start.size() && !tables.empty(), "tables.size() = ", tables.size(),
              ", start.size() = ", start.size(), ", expected equal and > 0 (one per head)");
  KVC_EXPECTS(n >= 0, "n = ", n, ", expected >= 0 tokens");
  if (n == 0) return;
  KVC_EXPECTS(k != nullptr && v != nullptr && pool != nullptr, "pool, k or v is null with n = ", n);
  for (std::size_t h = 0; h < start.size(); ++h)
    KVC_EXPECTS(start[h] >= 0 && tables[h] != nullptr, "start[", h, "] = ", start[h], " or tables[", h,
                "] null; expected a start >= 0 and a table");
  const splitk::paged_rows rows = splitk::store_rows(page_size, D, page_stride);
  const std::int32_t H = static_cast<std::int32_t>(tables.size());
  device_buffer<const std::int32_t*> dt;
  device_buffer<std::int32_t> ds;
  dt.upload(tables, stream);
  ds.upload(start, stream);
  detail::append_kernel<T, In><<<static_cast<unsigned>(n) * H, 128, 0, stream>>>(
      pool, pool + static_cast<std::int64_t>(page_size) * D, rows, dt.data(), ds.data(), true, H, D, k, v, n);
  KVC_CUDA_CHECK(cudaGetLastError());
  KVC_CUDA_CHECK(cudaStreamSynchronize(stream));
}

/// Encodes records on the device with codec q: record j <- encode(src[j][0 .. u*D)), u the codec's
/// tokens per record for role R. src and dst are host vectors of device pointers (the host plans
/// which residual tokens are due, as kvc::quant_cache does). The bytes equal the host encoder's
/// up to the contraction of a*b+c into one rounding by nvcc (ties of the code rounding may land
/// one code apart; both satisfy the codec's |x - x^| <= scale / 2).
template <quant::role R, class Q>
void encode_records(const Q& q, std::int32_t D, const std::vector<const float*>& src, const std::vector<std::byte*>& dst,
                    cudaStream_t stream = nullptr) {
  KVC_EXPECTS(src.size() == dst.size(), "src.size() = ", src.size(), ", expected dst.size() = ", dst.size());
  q.check(D);
  if constexpr (detail::device_codec<Q, R>::rotates)
    KVC_EXPECTS(Q::tokens_per_record(R) * D <= detail::max_rotated_record_floats, "rotated record of ",
                Q::tokens_per_record(R), " x ", D, " floats, expected <= ", detail::max_rotated_record_floats,
                " for the device encoder");
  if (src.empty()) return;
  device_buffer<const float*> ds;
  device_buffer<std::byte*> dd;
  ds.upload(src, stream);
  dd.upload(dst, stream);
  const std::int32_t jobs = static_cast<std::int32_t>(src.size());
  detail::encode_kernel<Q, R><<<(jobs + 63) / 64, 64, 0, stream>>>(q, ds.data(), dd.data(), jobs, D);
  KVC_CUDA_CHECK(cudaGetLastError());
  KVC_CUDA_CHECK(cudaStreamSynchronize(stream));
}

/// Pages of per-token records: kvc's store (records = rows of D elements of T: rb = D * sizeof(T),
/// V part at P * D * sizeof(T)) or a quant_cache's quantized pages with per-token codecs (rb =
/// record_bytes, V part at its v_offset).
struct record_pages {
  std::byte* base = nullptr;
  long long page_bytes = 0;
  long long k_offset = 0, v_offset = 0;
  std::int32_t rb_k = 0, rb_v = 0;
  std::int32_t page_size = 0;  ///< records per page (a power of two)
};

/// Applies an eviction selection on the device: stream s keeps tokens kept[s] (strictly
/// increasing indices < lengths[s]) as its tokens 0..kept[s].size(). In place (dst_tables ==
/// src_tables) is safe: every kept record is read before any is written. The host then frees the
/// pages past the new length, as kv_cache::keep does.
inline void compact_streams(const record_pages& pg, const std::vector<const std::int32_t*>& src_tables,
                            const std::vector<const std::int32_t*>& dst_tables, const std::vector<std::int32_t>& lengths,
                            const std::vector<std::vector<std::int32_t>>& kept, cudaStream_t stream = nullptr) {
  const std::size_t S = lengths.size();
  KVC_EXPECTS(src_tables.size() == S && dst_tables.size() == S && kept.size() == S, "src_tables, dst_tables and kept "
              "have ", src_tables.size(), ", ", dst_tables.size(), ", ", kept.size(), " entries, expected lengths.size() = ", S);
  KVC_EXPECTS(pg.base != nullptr && pg.rb_k > 0 && pg.rb_v > 0, "record_pages: base null or record bytes <= 0");
  std::vector<std::int32_t> stream_of, src_t, dst_t;
  for (std::size_t s = 0; s < S; ++s) {
    const auto& ks = kept[s];
    for (std::size_t i = 0; i < ks.size(); ++i) {
      if (ks[i] < 0 || ks[i] >= lengths[s])
        kvc::detail::fail(kvc::detail::concat("kvc::cuda::compact_streams: stream ", s, ": kept[", i, "] = ", ks[i],
                                              ", expected 0..", lengths[s] - 1, " (the stream's length is ", lengths[s], ")"));
      if (i > 0 && ks[i] <= ks[i - 1])
        kvc::detail::fail(kvc::detail::concat("kvc::cuda::compact_streams: stream ", s, ": kept[", i, "] = ", ks[i],
                                              " after ", ks[i - 1], ", expected strictly increasing indices"));
      stream_of.push_back(static_cast<std::int32_t>(s));
      src_t.push_back(ks[i]);
      dst_t.push_back(static_cast<std::int32_t>(i));
    }
  }
  if (stream_of.empty()) return;
  detail::compact_geom g;
  g.base = pg.base;
  g.page_stride = pg.page_bytes;
  g.part_off[0] = pg.k_offset;
  g.part_off[1] = pg.v_offset;
  g.rb[0] = pg.rb_k;
  g.rb[1] = pg.rb_v;
  g.shift = splitk::page_shift(pg.page_size, "kvc::cuda::compact_streams");
  const std::int32_t jobs = static_cast<std::int32_t>(stream_of.size());
  device_buffer<const std::int32_t*> ts, td;
  device_buffer<std::int32_t> dso, dsrc, ddst;
  device_buffer<std::byte> scratch(static_cast<std::size_t>(jobs) * (pg.rb_k + pg.rb_v));
  ts.upload(src_tables, stream);
  td.upload(dst_tables, stream);
  dso.upload(stream_of, stream);
  dsrc.upload(src_t, stream);
  ddst.upload(dst_t, stream);
  const unsigned blocks = static_cast<unsigned>((jobs + 7) / 8);  // 8 warps per block, a warp per record pair
  detail::compact_gather<<<blocks, 256, 0, stream>>>(g, ts.data(), dso.data(), dsrc.data(), jobs, scratch.data());
  KVC_CUDA_CHECK(cudaGetLastError());
  detail::compact_scatter<<<blocks, 256, 0, stream>>>(g, td.data(), dso.data(), ddst.data(), jobs, scratch.data());
  KVC_CUDA_CHECK(cudaGetLastError());
  KVC_CUDA_CHECK(cudaStreamSynchronize(stream));
}

/// record_pages of a quant_cache-style quantized page pool on the device, for per-token codecs
/// only: per-channel records (KIVI keys: several tokens per record) change when their members do
/// and are re-encoded on compaction, which kvc::quant_cache::keep does on the host.
template <class KQ, class VQ>
record_pages quant_record_pages(std::byte* base, long long page_bytes, long long v_offset, std::int32_t page_size,
                                const KQ& kq, const VQ& vq, std::int32_t D) {
  static_assert(KQ::tokens_per_record(quant::role::key) == 1 && VQ::tokens_per_record(quant::role::value) == 1,
                "kvc::cuda::quant_record_pages: per-channel records (KIVI keys) are re-encoded on compaction; "
                "compact them on the host with kvc::quant_cache::keep");
  record_pages p;
  p.base = base;
  p.page_bytes = page_bytes;
  p.k_offset = 0;
  p.v_offset = v_offset;
  p.rb_k = static_cast<std::int32_t>(kq.record_bytes(quant::role::key, D));
  p.rb_v = static_cast<std::int32_t>(vq.record_bytes(quant::role::value, D));
  p.page_size = page_size;
  return p;
}

}  // namespace cuda
KVC_END_NAMESPACE
