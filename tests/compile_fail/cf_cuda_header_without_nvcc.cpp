// SPDX-License-Identifier: Apache-2.0
// The CUDA headers refuse a host compiler with a message that says what to do.
#ifdef KVC_SHOULD_FAIL
#include <kvc/cuda.cuh>
#endif
void cf_cuda_header_without_nvcc() {}
