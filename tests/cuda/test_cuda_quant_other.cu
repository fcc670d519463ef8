// SPDX-License-Identifier: Apache-2.0
// Fused dequantization in the CUDA decode kernel, the other device codecs: fp8 (E4M3 per token),
// KIVI (per-channel 4-bit keys, per-token 2-bit values, residual window), and Hadamard-rotated
// int4 (query rotated in the kernel, rotated values rotated back per split; with pre-RoPE keys,
// each key rotated back and RoPE'd in the kernel). Against the CPU quantized kernel on the same
// cache; see quant_test_body.cuh.
#include "quant_test_body.cuh"

int main() {
  namespace q = kvc::quant;
  if (!kvc_gpu_test::require_device("test_cuda_quant_other")) return kvc_gpu_test::skip_code;
  kvc_test::rng g(6102);
  kvc::cuda::workspace ws;
  kvc_gpu_test::sweep<q::fp8_e4m3_per_token, q::fp8_e4m3_per_token>(g, "fp8", ws);
  kvc_gpu_test::sweep<q::kivi<4>, q::kivi<2>>(g, "kivi K4V2", ws, 32);
  kvc_gpu_test::sweep<q::rotated<q::int4>, q::rotated<q::int4>>(g, "rotated int4", ws);
  return kvc_gpu_test::finish("test_cuda_quant_other");
}
