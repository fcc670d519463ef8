// SPDX-License-Identifier: Apache-2.0
// Fused dequantization in the CUDA decode kernel, integer per-token codecs: int8 (symmetric),
// int4 and int2 (asymmetric), K and V, against the CPU quantized kernel on the same cache. See
// quant_test_body.cuh for the sweep and the tolerance.
#include "quant_test_body.cuh"

int main() {
  namespace q = kvc::quant;
  if (!kvc_gpu_test::require_device("test_cuda_quant_int")) return kvc_gpu_test::skip_code;
  kvc_test::rng g(6101);
  kvc::cuda::workspace ws;
  kvc_gpu_test::sweep<q::int8, q::int8>(g, "int8", ws);
  kvc_gpu_test::sweep<q::int4, q::int4>(g, "int4", ws);
  kvc_gpu_test::sweep<q::int2, q::int2>(g, "int2", ws);
  return kvc_gpu_test::finish("test_cuda_quant_int");
}
