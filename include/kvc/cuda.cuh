// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// kvc's CUDA backend in one include, for .cu files compiled by nvcc and linked with the
/// kvc::cuda CMake target: decode attention over device caches (full precision and quantized),
/// append, encode and compaction kernels, and the backend that kvc::decode_attention picks for
/// views with a kvc::device_accessor.

#if !defined(__CUDACC__)
#error "<kvc/cuda.cuh> is a CUDA header: include it only from .cu files compiled by nvcc and link the kvc::cuda CMake target (configure kvc with -DKVC_ENABLE_CUDA=ON). Host-only code uses kvc::cpu::decode_attention from <kvc/cpu/decode_attention.hpp>."
#endif

#include <kvc/cuda/append.cuh>
#include <kvc/cuda/backend.cuh>
#include <kvc/cuda/common.cuh>
#include <kvc/cuda/decode_attention.cuh>
#include <kvc/cuda/quant_attention.cuh>
