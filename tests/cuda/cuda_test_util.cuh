// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// Small harness of the GPU tests (nvcc-compiled, no Catch2): a failure counter with context,
/// skipping (exit code 77, CTest's SKIP_RETURN_CODE) when no device is present, NaN-poisoned
/// device outputs so unwritten elements fail, and a device copy of a host kv_cache layer.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <kvc/cuda.cuh>
#include <kvc/store/kv_cache.hpp>

#include "random.hpp"

namespace kvc_gpu_test {

inline int failures = 0;
inline int checks = 0;

#define GPU_CHECK(cond, ...)                                                  \
  do {                                                                        \
    ++::kvc_gpu_test::checks;                                                 \
    if (!(cond)) {                                                            \
      if (++::kvc_gpu_test::failures <= 20) {                                 \
        std::printf("FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond);         \
        std::printf(__VA_ARGS__);                                             \
        std::printf("\n");                                                    \
      }                                                                       \
    }                                                                         \
  } while (0)

/// Exit code for "skipped" (CTest SKIP_RETURN_CODE).
inline constexpr int skip_code = 77;

/// Returns false (after printing why) when there is no usable device.
inline bool require_device(const char* test) {
  std::string why;
  if (!kvc::cuda::device_available(&why)) {
    std::printf("%s: SKIPPED: no CUDA device (%s); run on a GPU machine with ctest -L gpu\n", test, why.c_str());
    return false;
  }
  cudaDeviceProp p{};
  int dev = 0;
  cudaGetDevice(&dev);
  cudaGetDeviceProperties(&p, dev);
  std::printf("%s: device %d: %s (sm_%d%d, %d SMs)\n", test, dev, p.name, p.major, p.minor, p.multiProcessorCount);
  return true;
}

inline int finish(const char* test) {
  std::printf("%s: %d checks, %d failed\n", test, checks, failures);
  return failures == 0 ? 0 : 1;
}

/// A device array initialised from host data, or poisoned with NaN (all bits set).
template <class T>
kvc::cuda::device_buffer<T> to_device(const std::vector<T>& v) {
  kvc::cuda::device_buffer<T> b(v.size());
  b.upload(v);
  return b;
}
inline kvc::cuda::device_buffer<float> poisoned(std::size_t n) {
  kvc::cuda::device_buffer<float> b(n ? n : 1);
  KVC_CUDA_CHECK(cudaMemset(b.data(), 0xff, (n ? n : 1) * sizeof(float)));
  return b;
}

/// |a - b| <= tol, with NaN failing.
inline bool close(double a, double b, double tol) { return std::fabs(a - b) <= tol; }

/// Device copy of a host kv_cache: the whole arena up to the highest page used, and one device
/// page table per stream of the given sequences and layer (stream = seq index * H + head).
template <class T>
struct device_kv_layer {
  kvc::cuda::device_buffer<std::byte> pool;
  kvc::cuda::device_buffer<std::int32_t> tables;
  std::vector<const std::int32_t*> table_ptrs;
  std::vector<std::int32_t> lengths;
  std::int64_t page_stride = 0;

  device_kv_layer(const kvc::kv_cache<T>& c, const std::vector<kvc::seq_id>& seqs, std::int32_t layer) {
    const std::int32_t H = c.config().num_kv_heads;
    std::vector<std::int32_t> all;
    std::vector<std::size_t> off;
    std::int32_t maxp = 0;
    for (auto s : seqs)
      for (std::int32_t h = 0; h < H; ++h) {
        const auto& p = c.pages(s, layer, h);
        off.push_back(all.size());
        all.insert(all.end(), p.begin(), p.end());
        for (auto x : p) maxp = std::max(maxp, x + 1);
        lengths.push_back(c.length(s, layer, h));
      }
    pool.upload(c.pool().base(), static_cast<std::size_t>(std::max(maxp, 1)) * c.pool().page_bytes());
    tables.upload(all.empty() ? std::vector<std::int32_t>{0} : all);
    for (auto o : off) table_ptrs.push_back(tables.data() + o);
    page_stride = static_cast<std::int64_t>(c.pool().page_bytes() / sizeof(T));
  }
  const T* base() const { return reinterpret_cast<const T*>(pool.data()); }
};

}  // namespace kvc_gpu_test
