// SPDX-License-Identifier: Apache-2.0
// The CUDA cache-writing kernels against the host store and codecs:
//  - append_streams writes new tokens into device pages bit-identically to kv_cache::append
//    (fp16 and bf16 pages, float input; rows not written stay as they were);
//  - encode_records (the codecs' KVC_HOST_DEVICE encoders on the device) gives the host encoder's
//    records (>= 99% byte-identical: nvcc may fuse a multiply-add that the host rounds twice, so
//    a code at a rounding tie can differ by one) and never a larger error than the host's;
//  - compact_streams applies an eviction selection in place, bit-identically to kv_cache::keep_layer,
//    for fp16 pages and for per-token quantized records.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <kvc/cuda.cuh>
#include <kvc/store/kv_cache.hpp>
#include <kvc/store/quant_cache.hpp>

#include "cuda_test_util.cuh"

using namespace kvc_gpu_test;

namespace {

template <class T>
void test_append(kvc_test::rng& g, std::int32_t D, std::int32_t P) {
  kvc::cache_config cfg;
  cfg.num_kv_heads = 3;
  cfg.head_dim = D;
  cfg.page_size = P;
  cfg.max_pages = 4096;
  kvc::kv_cache<T> c(cfg);
  const auto s = c.add_sequence();
  const std::int32_t n0 = g.integer(0, 100), n1 = g.integer(1, 40), H = 3;
  const auto k = g.normals(static_cast<std::size_t>(n0 + n1) * H * D), v = g.normals(static_cast<std::size_t>(n0 + n1) * H * D);
  c.append(s, 0, k.data(), v.data(), n0);
  c.append(s, 0, k.data() + static_cast<std::size_t>(n0) * H * D, v.data() + static_cast<std::size_t>(n0) * H * D, n1);
  device_kv_layer<T> dl(c, {s}, 0);  // final tables; the pool image still has the new rows: poison them
  const auto rows = kvc::splitk::store_rows(P, D, dl.page_stride);
  std::vector<T> img(dl.pool.capacity() / sizeof(T));
  std::memcpy(img.data(), c.pool().base(), img.size() * sizeof(T));
  for (std::int32_t h = 0; h < H; ++h)
    for (std::int32_t t = n0; t < n0 + n1; ++t) {
      const auto off = rows.offset(c.pages(s, 0, h).data(), t, 0);
      for (std::int32_t d = 0; d < D; ++d) {
        img[off + d] = T::from_bits(0xffff);
        img[off + static_cast<std::int64_t>(P) * D + d] = T::from_bits(0xffff);
      }
    }
  KVC_CUDA_CHECK(cudaMemcpy(dl.pool.data(), img.data(), img.size() * sizeof(T), cudaMemcpyHostToDevice));
  auto dk = to_device(std::vector<float>(k.begin() + static_cast<std::ptrdiff_t>(n0) * H * D, k.end()));
  auto dv = to_device(std::vector<float>(v.begin() + static_cast<std::ptrdiff_t>(n0) * H * D, v.end()));
  kvc::cuda::append_streams(reinterpret_cast<T*>(dl.pool.data()), dl.page_stride, P, dl.table_ptrs,
                            std::vector<std::int32_t>(H, n0), D, dk.data(), dv.data(), n1);
  const auto got = dl.pool.download(dl.pool.capacity());
  GPU_CHECK(std::memcmp(got.data(), c.pool().base(), got.size()) == 0, "append D=%d P=%d n0=%d n1=%d: pages differ", D,
            P, n0, n1);
}

/// Encodes `records` random records on host and device and compares.
template <kvc::quant::role R, class Q>
void test_encode(kvc_test::rng& g, const char* name, const Q& q, std::int32_t D, std::int32_t records) {
  const std::int32_t u = Q::tokens_per_record(R);
  const std::size_t rb = q.record_bytes(R, D);
  std::vector<float> x(static_cast<std::size_t>(records) * u * D);
  for (auto& e : x) e = g.normal() * (g.coin(0.02) ? 8.0f : 1.0f);
  for (auto& e : x) e = static_cast<float>(kvc::half(e));  // the caches round through fp16 first
  std::vector<std::byte> host(static_cast<std::size_t>(records) * rb);
  for (std::int32_t r = 0; r < records; ++r)
    q.template encode<R>(x.data() + static_cast<std::size_t>(r) * u * D, D, host.data() + r * rb);
  auto dx = to_device(x);
  kvc::cuda::device_buffer<std::byte> dr(host.size());
  KVC_CUDA_CHECK(cudaMemset(dr.data(), 0xff, host.size()));
  std::vector<const float*> src;
  std::vector<std::byte*> dst;
  for (std::int32_t r = 0; r < records; ++r) {
    src.push_back(dx.data() + static_cast<std::size_t>(r) * u * D);
    dst.push_back(dr.data() + r * rb);
  }
  kvc::cuda::encode_records<R>(q, D, src, dst);
  const auto dev = dr.download(host.size());
  std::int32_t same = 0;
  std::vector<float> a(static_cast<std::size_t>(u) * D), b(static_cast<std::size_t>(u) * D);
  for (std::int32_t r = 0; r < records; ++r) {
    same += std::memcmp(dev.data() + r * rb, host.data() + r * rb, rb) == 0;
    q.template decode<R>(host.data() + r * rb, D, a.data());
    q.template decode<R>(dev.data() + r * rb, D, b.data());
    double eh = 0, ed = 0;
    // Errors in the stored domain: rotate the input the way the codec does.
    std::vector<float> xs(x.begin() + static_cast<std::ptrdiff_t>(r) * u * D, x.begin() + static_cast<std::ptrdiff_t>(r + 1) * u * D);
    if constexpr (Q::rotates)
      for (std::int32_t t = 0; t < u; ++t) q.to_stored(xs.data() + static_cast<std::size_t>(t) * D, D);
    for (std::size_t i = 0; i < xs.size(); ++i) {
      eh = std::max(eh, std::fabs(double(xs[i]) - a[i]));
      ed = std::max(ed, std::fabs(double(xs[i]) - b[i]));
    }
    GPU_CHECK(ed <= 1.01 * eh + 1e-6, "%s D=%d record %d: device error %g > host error %g", name, D, r, ed, eh);
  }
  GPU_CHECK(same >= records * 99 / 100, "%s D=%d: %d of %d records byte-identical", name, D, same, records);
}

void test_compact(kvc_test::rng& g, std::int32_t D, std::int32_t P) {
  kvc::cache_config cfg;
  cfg.num_kv_heads = 4;
  cfg.head_dim = D;
  cfg.page_size = P;
  cfg.max_pages = 4096;
  kvc::kv_cache<kvc::half> c(cfg);
  const auto s = c.add_sequence();
  const std::int32_t n = g.integer(1, 600), H = 4;
  const auto k = g.normals(static_cast<std::size_t>(n) * H * D), v = g.normals(static_cast<std::size_t>(n) * H * D);
  c.append(s, 0, k.data(), v.data(), n);
  device_kv_layer<kvc::half> dl(c, {s}, 0);
  std::vector<std::vector<std::int32_t>> kept(static_cast<std::size_t>(H));
  for (auto& kh : kept)
    for (std::int32_t t = 0; t < n; ++t)
      if (g.coin(0.4)) kh.push_back(t);
  kvc::cuda::record_pages pg;
  pg.base = dl.pool.data();
  pg.page_bytes = dl.page_stride * 2;
  pg.k_offset = 0;
  pg.v_offset = static_cast<long long>(P) * D * 2;
  pg.rb_k = pg.rb_v = D * 2;
  pg.page_size = P;
  kvc::cuda::compact_streams(pg, dl.table_ptrs, dl.table_ptrs, dl.lengths, kept);
  c.keep_layer(s, 0, kept);
  const auto got = dl.pool.download(dl.pool.capacity());
  const auto rows = kvc::splitk::store_rows(P, D, dl.page_stride);
  for (std::int32_t h = 0; h < H; ++h) {
    const auto kv = c.keys(s, 0, h);
    const auto vv = c.values(s, 0, h);
    const std::int32_t* table = c.pages(s, 0, h).data();
    for (std::int32_t t = 0; t < c.length(s, 0, h); ++t) {
      const auto off = rows.offset(table, t, 0);
      const auto* dk = reinterpret_cast<const kvc::half*>(got.data()) + off;
      const auto* dv = dk + static_cast<std::int64_t>(P) * D;
      bool ok = true;
      for (std::int32_t d = 0; d < D; ++d) ok = ok && dk[d].bits == kv(t, 0, d).bits && dv[d].bits == vv(t, 0, d).bits;
      GPU_CHECK(ok, "compact D=%d P=%d head %d token %d differs from kv_cache::keep_layer", D, P, h, t);
    }
  }
}

}  // namespace

int main() {
  if (!require_device("test_cuda_append")) return skip_code;
  kvc_test::rng g(6201);
  for (std::int32_t D : {64, 128, 256})
    for (std::int32_t P : {1, 16, 64}) {
      test_append<kvc::half>(g, D, P);
      test_append<kvc::bfloat16>(g, D, P);
      test_compact(g, D, P);
    }
  namespace q = kvc::quant;
  using kvc::quant::role;
  for (std::int32_t D : {64, 128, 256}) {
    test_encode<role::key>(g, "int8", q::int8{}, D, 500);
    test_encode<role::value>(g, "int4", q::int4{}, D, 500);
    test_encode<role::value>(g, "int2", q::int2{}, D, 500);
    test_encode<role::key>(g, "fp8", q::fp8_e4m3_per_token{}, D, 500);
    test_encode<role::key>(g, "kivi2 keys", q::kivi<2>{}, D, 100);
    test_encode<role::value>(g, "kivi2 values", q::kivi<2>{}, D, 500);
    test_encode<role::value>(g, "rotated int4", q::rotated<q::int4>{}, D, 300);
  }
  return finish("test_cuda_append");
}
