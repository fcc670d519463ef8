// SPDX-License-Identifier: Apache-2.0
// The KVC_HOST_DEVICE conversions give the same bits on the device as on the host, for every
// fp16 and fp8 code and a sweep of floats. Runs only on a GPU machine (label gpu).
#include <cstdio>
#include <cstdint>
#include <vector>

#include <cuda_runtime.h>

#include <kvc/types.hpp>

__global__ void decode_all(float* h16, float* e4, float* e5) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < 65536) h16[i] = float(kvc::half::from_bits(static_cast<std::uint16_t>(i)));
  if (i < 256) {
    e4[i] = float(kvc::fp8_e4m3::from_bits(static_cast<std::uint8_t>(i)));
    e5[i] = float(kvc::fp8_e5m2::from_bits(static_cast<std::uint8_t>(i)));
  }
}

__global__ void encode_all(const float* x, int n, std::uint16_t* h, std::uint16_t* b, std::uint8_t* e4,
                           std::uint8_t* e5) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    h[i] = kvc::half(x[i]).bits;
    b[i] = kvc::bfloat16(x[i]).bits;
    e4[i] = kvc::fp8_e4m3(x[i]).bits;
    e5[i] = kvc::fp8_e5m2(x[i]).bits;
  }
}

static bool same(float a, float b) { return (a != a && b != b) || kvc::detail::float_bits(a) == kvc::detail::float_bits(b); }

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("test_cuda_numeric: SKIPPED: no CUDA device; run on a GPU machine with ctest -L gpu\n");
    return 77;  // CTest SKIP_RETURN_CODE
  }
  float *h16, *e4, *e5;
  if (cudaMallocManaged(&h16, 65536 * sizeof(float)) != cudaSuccess) {
    std::printf("cudaMallocManaged failed\n");
    return 1;
  }
  cudaMallocManaged(&e4, 256 * sizeof(float));
  cudaMallocManaged(&e5, 256 * sizeof(float));
  decode_all<<<256, 256>>>(h16, e4, e5);
  cudaDeviceSynchronize();
  int bad = 0;
  for (int i = 0; i < 65536; ++i) bad += !same(h16[i], kvc::detail::half_bits_to_float_portable(static_cast<std::uint16_t>(i)));
  for (int i = 0; i < 256; ++i) {
    bad += !same(e4[i], float(kvc::fp8_e4m3::from_bits(static_cast<std::uint8_t>(i))));
    bad += !same(e5[i], float(kvc::fp8_e5m2::from_bits(static_cast<std::uint8_t>(i))));
  }
  const int n = 1 << 20;
  float* x;
  std::uint16_t *h, *b;
  std::uint8_t *q4, *q5;
  cudaMallocManaged(&x, n * sizeof(float));
  cudaMallocManaged(&h, n * 2);
  cudaMallocManaged(&b, n * 2);
  cudaMallocManaged(&q4, n);
  cudaMallocManaged(&q5, n);
  std::uint32_t s = 12345;
  for (int i = 0; i < n; ++i) {
    s = s * 1664525u + 1013904223u;
    x[i] = kvc::detail::bits_float((s & 0x8fffffffu) | ((s >> 3) & 0x70000000u) >> 1);
  }
  encode_all<<<(n + 255) / 256, 256>>>(x, n, h, b, q4, q5);
  cudaDeviceSynchronize();
  for (int i = 0; i < n; ++i) {
    bad += h[i] != kvc::detail::float_to_half_bits_portable(x[i]);
    bad += b[i] != kvc::bfloat16(x[i]).bits;
    bad += q4[i] != kvc::fp8_e4m3(x[i]).bits;
    bad += q5[i] != kvc::fp8_e5m2(x[i]).bits;
  }
  std::printf("%d mismatches between device and host conversions\n", bad);
  std::printf("%d passed, %d failed\n", bad == 0 ? 1 : 0, bad == 0 ? 0 : 1);
  return bad == 0 ? 0 : 1;
}
