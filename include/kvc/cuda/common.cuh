// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// What every kvc CUDA header needs: the nvcc guard, error checking that throws kvc::error with
/// the CUDA message, a small RAII device buffer, a reusable workspace, and the device's SM count
/// for the split-K planner.

#if !defined(__CUDACC__)
#error "kvc/cuda/*.cuh are CUDA headers: include them only from .cu files compiled by nvcc and link the kvc::cuda CMake target (configure kvc with -DKVC_ENABLE_CUDA=ON). Host-only code uses kvc::cpu::decode_attention from <kvc/cpu/decode_attention.hpp>."
#endif

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include <cuda_runtime.h>

#include <kvc/config.hpp>
#include <kvc/error.hpp>

KVC_BEGIN_NAMESPACE
namespace cuda {

/// Throws kvc::error naming the call and CUDA's message when e is not cudaSuccess.
inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    kvc::detail::fail(kvc::detail::concat("kvc::cuda: ", what, " failed: ", cudaGetErrorName(e), " (",
                                          cudaGetErrorString(e), ")"));
}
#define KVC_CUDA_CHECK(expr) ::kvc::cuda::check((expr), #expr)

/// Whether a CUDA device can be used: false when the driver is missing or no device is present
/// (the GPU tests skip with a message then).
inline bool device_available(std::string* why = nullptr) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    if (why) *why = e != cudaSuccess ? cudaGetErrorString(e) : "cudaGetDeviceCount returned 0 devices";
    (void)cudaGetLastError();  // clear the sticky error of a failed query
    return false;
  }
  return true;
}

/// Owning device allocation of n elements of T (uninitialised). Move-only.
template <class T>
class device_buffer {
  static_assert(std::is_trivially_copyable<T>::value, "kvc::cuda::device_buffer<T>: T must be trivially copyable");

 public:
  device_buffer() = default;
  explicit device_buffer(std::size_t n) { resize(n); }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  device_buffer(device_buffer&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr, o.n_ = 0; }
  device_buffer& operator=(device_buffer&& o) noexcept {
    if (this != &o) {
      reset();
      p_ = o.p_, n_ = o.n_;
      o.p_ = nullptr, o.n_ = 0;
    }
    return *this;
  }
  ~device_buffer() { reset(); }

  /// Reallocates when n exceeds the capacity (contents are not kept).
  void reserve(std::size_t n) {
    if (n <= n_) return;
    reset();
    if (n == 0) return;
    KVC_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p_), n * sizeof(T)));
    n_ = n;
  }
  void resize(std::size_t n) { reserve(n); }
  void reset() noexcept {
    if (p_) cudaFree(p_);
    p_ = nullptr, n_ = 0;
  }
  T* data() const noexcept { return p_; }
  std::size_t capacity() const noexcept { return n_; }

  /// Copies n host elements in (asynchronously on `stream`; pageable memory makes it synchronous
  /// with respect to the host buffer, which may be reused at once).
  void upload(const T* host, std::size_t n, cudaStream_t stream = nullptr) {
    reserve(n);
    if (n) KVC_CUDA_CHECK(cudaMemcpyAsync(p_, host, n * sizeof(T), cudaMemcpyHostToDevice, stream));
  }
  void upload(const std::vector<T>& v, cudaStream_t stream = nullptr) { upload(v.data(), v.size(), stream); }
  std::vector<T> download(std::size_t n, cudaStream_t stream = nullptr) const {
    std::vector<T> v(n);
    if (n) {
      KVC_CUDA_CHECK(cudaMemcpyAsync(v.data(), p_, n * sizeof(T), cudaMemcpyDeviceToHost, stream));
      KVC_CUDA_CHECK(cudaStreamSynchronize(stream));
    }
    return v;
  }

 private:
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

/// Device memory a decode step needs besides its inputs and outputs (work items, merge jobs,
/// per-stream tables and lengths, partial states, scratch lse). Keep one per CUDA stream and
/// reuse it: it only grows, so steady-state decode does no cudaMalloc.
struct workspace {
  device_buffer<std::byte> bytes;
  device_buffer<const std::int32_t*> tables;  ///< per-table page-table pointers of the paged paths
  std::vector<std::byte> staging;  ///< host image of the small per-call arrays, uploaded at once
  /// What the device copy of the plan was made from: a call whose inputs match (every layer of a
  /// decode step has the same lengths) skips planning and the upload.
  std::vector<std::int32_t> plan_key;
  std::vector<const std::int32_t*> tables_key;
  bool plan_valid = false;

  /// Lays out `count` arrays of the given byte sizes (each 256-byte aligned) and returns their
  /// offsets; the caller fills staging[0 .. host_bytes) and calls commit for the uploaded prefix.
  template <std::size_t N>
  std::size_t layout(const std::size_t (&sizes)[N], std::size_t (&offsets)[N]) {
    std::size_t off = 0;
    for (std::size_t i = 0; i < N; ++i) {
      offsets[i] = off;
      off += (sizes[i] + 255) / 256 * 256;
    }
    return off;
  }
};

/// SMs of the current device (cached per device ordinal).
inline int sm_count() {
  int dev = 0;
  KVC_CUDA_CHECK(cudaGetDevice(&dev));
  static int cache[64] = {};
  if (dev < 64 && cache[dev]) return cache[dev];
  int n = 0;
  KVC_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  if (dev < 64) cache[dev] = n;
  return n;
}

namespace detail {
/// Whether p is aligned to `a` bytes.
inline bool aligned(const void* p, std::size_t a) noexcept { return reinterpret_cast<std::uintptr_t>(p) % a == 0; }
}  // namespace detail

}  // namespace cuda
KVC_END_NAMESPACE
