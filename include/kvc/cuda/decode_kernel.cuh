// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// The split-K decode-attention kernel, generic over a *source* (how a K or V row slice is
/// loaded and converted to float), and the launch machinery shared by the full-precision paged
/// source (decode_attention.cuh) and the quantized source (quant_attention.cuh).
///
/// Thread layout (head_dim D, VEC = 8 elements per lane): a *row* is D / 8 consecutive lanes that
/// together hold one token's D elements, so fp16/bf16 rows are read with one 128-bit load per
/// lane; a warp holds 32 / (D / 8) rows, a block 4 warps. Each row walks its own tokens (t0 + row,
/// + R, ...; R rows per block), U tokens per step whose K and V loads are all issued before any is
/// used, and keeps the online-softmax state (m, l, o) of the G query heads of its work item: the
/// group's heads share every read of K and V. Rows merge their states with warp shuffles, warps
/// through shared memory, and the block writes either the output (one split) or a partial state
/// (several splits, merged by merge_kernel). All merges use kvc::splitk's state functions, which
/// the CPU test suite checks against a double reference.

#include <cmath>
#include <cstdint>
#include <cstring>

#include <kvc/attention/split_plan.hpp>
#include <kvc/cuda/common.cuh>

KVC_BEGIN_NAMESPACE
namespace cuda {
namespace detail {

inline constexpr int vec = 8;         ///< elements of a row per lane
inline constexpr int block_warps = 4;  ///< warps per block (128 threads)
inline constexpr int block_threads = 32 * block_warps;

/// Raw bits of one lane's slice of a row, loaded before conversion so that a step's loads are in
/// flight together. 32 bytes covers 8 floats; narrower sources leave `b` unused (the compiler
/// drops it).
struct raw_slice {
  uint4 a;
  uint4 b;
};

/// Loads n bytes (1, 2, 4, 8 or 16) at p into the low bytes of r, with one vector load when p is
/// aligned to n and byte loads otherwise (quantized records need not be 8-byte aligned: an int8
/// record of D = 128 is 130 bytes).
template <int N>
__device__ __forceinline__ void load_bytes(const std::byte* p, uint4& r) {
  static_assert(N == 1 || N == 2 || N == 4 || N == 8 || N == 16, "load_bytes: N must be 1, 2, 4, 8 or 16");
  const auto addr = reinterpret_cast<std::uintptr_t>(p);
  if constexpr (N == 16) {
    if (addr % 16 == 0) {
      r = __ldg(reinterpret_cast<const uint4*>(p));
      return;
    }
  } else if constexpr (N == 8) {
    if (addr % 8 == 0) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
      r.x = v.x, r.y = v.y;
      return;
    }
  } else if constexpr (N == 4) {
    if (addr % 4 == 0) {
      r.x = __ldg(reinterpret_cast<const unsigned*>(p));
      return;
    }
  } else if constexpr (N == 2) {
    if (addr % 2 == 0) {
      r.x = __ldg(reinterpret_cast<const unsigned short*>(p));
      return;
    }
  }
  unsigned char b[16] = {};
  const unsigned char* q = reinterpret_cast<const unsigned char*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) b[i] = __ldg(q + i);
  r = make_uint4(0, 0, 0, 0);
  memcpy(&r, b, N);
}

/// Unnormalised Walsh-Hadamard transform of rows x[0..n)[D] in shared memory by the whole block:
/// the same pairing and stage order as kvc::quant::detail::fwht, so results are bit-identical.
template <int D>
__device__ __forceinline__ void block_fwht(float* x, int n) {
  for (int h = 1; h < D; h *= 2) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < n * D / 2; idx += blockDim.x) {
      const int r = idx / (D / 2), j = idx % (D / 2);
      const int i = (j / h) * 2 * h + (j % h);
      float* y = x + r * D;
      const float a = y[i], b = y[i + h];
      y[i] = a + b;
      y[i + h] = a - b;
    }
  }
  __syncthreads();
}

/// Per-launch arguments of the decode kernel besides the source.
struct decode_args {
  const splitk::work_item* items;
  const float* q;         ///< [rows][D], rows = streams * G
  float scale;
  std::int32_t G;         ///< query heads per stream
  float* out;             ///< [rows][D]
  float* lse;             ///< [rows] (never null: the launcher passes scratch when the caller does not ask)
  float* raw;             ///< [rows][raw_stride] raw scores for the probability outputs, or null
  std::int32_t raw_stride;
  float* part_o;          ///< [partials][max_group_block][D]
  splitk::softmax_state* part_s;  ///< [partials][max_group_block]
};

/// The decode kernel. GMAX >= the work item's gn (1, 4 or 8): the query registers are sized for
/// GMAX heads and heads >= gn are masked. Three group sizes, not eight, keep the instantiations
/// per source at 9 (3 head dims x 3): a group of 2 or 3 runs the 4-head kernel and wastes
/// registers, not bandwidth (nvcc spends ~3 s per instantiation on the dev VM).
template <class Src, int D, int GMAX>
__global__ void __launch_bounds__(block_threads) decode_kernel(const Src src, const decode_args a) {
  static_assert(D % (vec * 8) == 0 && D >= 64 && D <= 256, "decode_kernel: D must be 64, 128 or 256");
  constexpr int BDX = D / vec;         // lanes per row
  constexpr int RW = 32 / BDX;         // rows per warp
  constexpr int R = block_warps * RW;  // rows per block
  constexpr int U = GMAX >= 8 ? 2 : 4; // tokens per row per step (register budget: q and o are GMAX x 8)

  __shared__ float sq[GMAX * D];                       // scaled queries of this item (model or stored domain)
  __shared__ float so[block_warps * GMAX * D];         // per-warp accumulators, then the block's
  __shared__ splitk::softmax_state ss[block_warps * GMAX];

  const splitk::work_item it = a.items[blockIdx.x];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int lx = lane % BDX, row = warp * RW + lane / BDX, d0 = lx * vec;
  const int gn = it.gn;
  const long long qrow0 = static_cast<long long>(it.stream) * a.G + it.g0;

  for (int i = tid; i < GMAX * D; i += block_threads) {
    const int g = i / D;
    sq[i] = g < gn ? a.q[(qrow0 + g) * D + i % D] * a.scale : 0.0f;
  }
  __syncthreads();
  const auto ctx = src.begin(it);
  if (src.query_to_stored(ctx)) {
    src.to_stored_block(sq, gn);  // block-wide: every thread calls it
  }
  float qr[GMAX][vec];
#pragma unroll
  for (int g = 0; g < GMAX; ++g)
#pragma unroll
    for (int i = 0; i < vec; ++i) qr[g][i] = sq[g * D + d0 + i];

  splitk::softmax_state st[GMAX];
  float o[GMAX][vec];
#pragma unroll
  for (int g = 0; g < GMAX; ++g)
#pragma unroll
    for (int i = 0; i < vec; ++i) o[g][i] = 0.0f;

  // No double buffering of the next step's loads: tried on an H200 (fp16, D 128, G 4), it took
  // the kernel from 128 to 168 registers (3 blocks per SM instead of 4) and from 1.40 to 0.95 TB/s
  // (32k tokens, batch 16; measured before half's device decode lost its per-element NaN test).
  for (int base = it.t0; base < it.t1; base += R * U) {
    raw_slice kr[U], vr[U];
    int tt[U];
    bool valid[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int t = base + u * R + row;
      valid[u] = t < it.t1;
      tt[u] = valid[u] ? t : it.t0;  // a real token, so the load is in bounds; masked below
      kr[u] = src.load_k(ctx, tt[u], d0);
      vr[u] = src.load_v(ctx, tt[u], d0);
    }
    float s[GMAX][U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kx[vec];
      src.cvt_k(ctx, kr[u], tt[u], d0, kx);  // convergent: may shuffle within the row (RoPE, rotation)
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        float acc = 0.0f;
#pragma unroll
        for (int i = 0; i < vec; ++i) acc = fmaf(qr[g][i], kx[i], acc);
        s[g][u] = acc;
      }
    }
#pragma unroll
    for (int g = 0; g < GMAX; ++g)
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int off = BDX / 2; off > 0; off /= 2) s[g][u] += __shfl_xor_sync(0xffffffffu, s[g][u], off);
        if (!valid[u] || g >= gn) s[g][u] = -INFINITY;
      }
    if (a.raw && lx == 0) {
#pragma unroll
      for (int g = 0; g < GMAX; ++g)
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (g < gn && valid[u]) a.raw[(qrow0 + g) * a.raw_stride + tt[u]] = s[g][u];
    }
    float p[GMAX][U];
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      const float corr = splitk::push_scores(st[g], s[g], U, p[g]);
#pragma unroll
      for (int i = 0; i < vec; ++i) o[g][i] *= corr;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vx[vec];
      src.cvt_v(ctx, vr[u], tt[u], d0, vx);
#pragma unroll
      for (int g = 0; g < GMAX; ++g)
#pragma unroll
        for (int i = 0; i < vec; ++i) o[g][i] = fmaf(p[g][u], vx[i], o[g][i]);
    }
  }

  // Rows of a warp: merge by shuffles (lane l and lane l ^ off hold the same d0 of two rows).
#pragma unroll
  for (int off = BDX; off < 32; off *= 2) {
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      splitk::softmax_state other;
      other.m = __shfl_xor_sync(0xffffffffu, st[g].m, off);
      other.l = __shfl_xor_sync(0xffffffffu, st[g].l, off);
      const splitk::merge_weights w = splitk::merge_states(st[g], other, st[g]);
#pragma unroll
      for (int i = 0; i < vec; ++i) {
        const float oo = __shfl_xor_sync(0xffffffffu, o[g][i], off);
        o[g][i] = w.wa * o[g][i] + w.wb * oo;
      }
    }
  }
  if (lane < BDX) {
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      if (lx == 0) ss[warp * GMAX + g] = st[g];
#pragma unroll
      for (int i = 0; i < vec; ++i) so[(warp * GMAX + g) * D + d0 + i] = o[g][i];
    }
  }
  __syncthreads();
  // Warps: thread (g, d) merges the block_warps states of its element into so[g][d] (warp 0's).
  for (int idx = tid; idx < GMAX * D; idx += block_threads) {
    const int g = idx / D, d = idx % D;
    splitk::softmax_state acc;
    float O = 0.0f;
    for (int w = 0; w < block_warps; ++w) {
      const splitk::merge_weights mw = splitk::merge_states(acc, ss[w * GMAX + g], acc);
      O = O * mw.wa + so[(w * GMAX + g) * D + d] * mw.wb;
    }
    so[g * D + d] = O;  // only this thread reads or writes element (g, d) of every warp
  }
  if (src.value_to_model(ctx)) src.to_model_block(so, gn);  // block-wide, linear in o
  __syncthreads();
  for (int idx = tid; idx < gn * D; idx += block_threads) {
    const int g = idx / D, d = idx % D;
    splitk::softmax_state acc;
    for (int w = 0; w < block_warps; ++w) splitk::merge_states(acc, ss[w * GMAX + g], acc);
    const float O = so[g * D + d];
    if (it.part < 0) {
      a.out[(qrow0 + g) * D + d] = acc.l > 0.0f ? O / acc.l : 0.0f;
      if (d == 0) a.lse[qrow0 + g] = splitk::state_lse(acc);
    } else {
      const long long pi = static_cast<long long>(it.part) * splitk::max_group_block + g;
      a.part_o[pi * D + d] = O;
      if (d == 0) a.part_s[pi] = acc;
    }
  }
}

/// One block per merge job: out = sum_k w_k o_k / sum_k w_k l_k over the job's partial states.
__global__ void merge_kernel(const splitk::merge_job* jobs, std::int32_t G, std::int32_t D, const float* part_o,
                             const splitk::softmax_state* part_s, float* out, float* lse) {
  const splitk::merge_job j = jobs[blockIdx.x];
  const long long qrow0 = static_cast<long long>(j.stream) * G + j.g0;
  for (int idx = threadIdx.x; idx < j.gn * D; idx += blockDim.x) {
    const int g = idx / D, d = idx % D;
    splitk::softmax_state acc;
    float O = 0.0f;
    for (int k = 0; k < j.count; ++k) {
      const long long pi = static_cast<long long>(j.first + k) * splitk::max_group_block + g;
      const splitk::merge_weights w = splitk::merge_states(acc, part_s[pi], acc);
      O = O * w.wa + part_o[pi * D + d] * w.wb;
    }
    out[(qrow0 + g) * D + d] = acc.l > 0.0f ? O / acc.l : 0.0f;
    if (d == 0) lse[qrow0 + g] = splitk::state_lse(acc);
  }
}

/// raw scores -> probabilities (p = e^(s - lse)) and their sum over each group, for token t of
/// stream s: one thread per (stream, token).
__global__ void probs_kernel(const std::int32_t* lengths, std::int32_t streams, std::int32_t G, std::int32_t longest,
                             const float* raw, std::int32_t raw_stride, const float* lse, float* probs,
                             float* group_probs, std::int32_t probs_stride) {
  const long long n = static_cast<long long>(streams) * longest;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int s = static_cast<int>(i / longest), t = static_cast<int>(i % longest);
    if (t >= lengths[s]) continue;
    float sum = 0.0f;
    for (int g = 0; g < G; ++g) {
      const long long r = static_cast<long long>(s) * G + g;
      const float p = splitk::exp_or_zero(raw[r * raw_stride + t] - lse[r]);
      if (probs) probs[r * probs_stride + t] = p;
      sum += p;
    }
    if (group_probs) group_probs[static_cast<long long>(s) * probs_stride + t] = sum;
  }
}

}  // namespace detail

/// Options of the CUDA decode kernels (the CPU decode_options without the thread pool, plus the
/// CUDA stream and a reusable workspace). Every pointer is device memory.
struct device_decode_options {
  float scale = 0.0f;            ///< softmax scale; 0 means 1/sqrt(head_dim)
  std::int32_t split_tokens = 0; ///< split-K chunk in tokens; 0 lets the planner choose
  float* lse = nullptr;          ///< [rows] log-sum-exp of the scaled scores
  float* probs = nullptr;        ///< [rows][probs_stride]
  float* group_probs = nullptr;  ///< [streams][probs_stride]
  std::int32_t probs_stride = 0; ///< >= the longest stream; required with probs or group_probs
  cudaStream_t stream = nullptr;
  workspace* ws = nullptr;       ///< null: a temporary one (allocates on every call)
};

namespace detail {

/// Head dims with compiled kernels.
inline bool supported_head_dim(int D) noexcept { return D == 64 || D == 128 || D == 256; }

/// Plans, uploads and launches one decode step of `streams` streams whose lengths (and, for
/// quantized sources, segment lengths) the host knows. Src must be trivially copyable (it is a
/// kernel argument). `q`, `out` and the option pointers are device memory.
template <class Src>
void launch_decode(const Src& src, const std::int32_t* lengths, std::int32_t streams, std::int32_t G, std::int32_t D,
                   const float* q, float* out, const device_decode_options& opt,
                   const std::int32_t* seg_lengths = nullptr, std::int32_t num_segs = 1) {
  KVC_EXPECTS(supported_head_dim(D), "head_dim = ", D, ", expected 64, 128 or 256 (the compiled CUDA kernels)");
  KVC_EXPECTS(q != nullptr && out != nullptr, "q or out is null");
  std::int32_t longest = 0;
  for (std::int32_t s = 0; s < streams; ++s) longest = lengths[s] > longest ? lengths[s] : longest;
  const bool want_probs = opt.probs || opt.group_probs;
  KVC_EXPECTS(!want_probs || opt.probs_stride >= longest, "probs_stride = ", opt.probs_stride,
              ", expected >= the longest stream (", longest, " tokens)");
  splitk::split_params sp;
  sp.num_sms = sm_count();
  sp.blocks_per_sm = 4;  // 128-thread blocks, <= 48 KiB static shared memory: 4 fit an SM by shared memory
  sp.chunk_override = opt.split_tokens;

  workspace local;
  workspace& ws = opt.ws ? *opt.ws : local;
  // The plan depends on (streams, G, D, chunk override, want_probs, lse given, lengths, segments):
  // the same for every layer of a decode step, so later layers reuse the uploaded plan.
  std::vector<std::int32_t> key{streams, G, D, sp.chunk_override, want_probs ? 1 : 0, opt.lse ? 1 : 0,
                                opt.probs ? 1 : 0, num_segs, seg_lengths ? 1 : 0, sp.num_sms};
  key.insert(key.end(), lengths, lengths + streams);
  if (seg_lengths) key.insert(key.end(), seg_lengths, seg_lengths + static_cast<std::size_t>(streams) * num_segs);
  const std::int64_t rows = std::int64_t{streams} * G;
  struct counts {
    std::size_t items, merges;
    std::int32_t partials;
  };
  std::size_t off[7];
  counts cnt{};
  if (ws.plan_valid && ws.plan_key == key) {
    std::memcpy(&cnt, ws.staging.data() + ws.staging.size() - sizeof(counts), sizeof(counts));
    std::memcpy(off, ws.staging.data() + ws.staging.size() - sizeof(counts) - sizeof(off), sizeof(off));
  } else {
    ws.plan_valid = false;
    const splitk::split_plan plan = splitk::plan_splits(lengths, streams, G, sp, seg_lengths, num_segs);
    cnt = {plan.items.size(), plan.merges.size(), plan.num_partials};
    const std::size_t sizes[7] = {
        plan.items.size() * sizeof(splitk::work_item), plan.merges.size() * sizeof(splitk::merge_job),
        static_cast<std::size_t>(streams) * sizeof(std::int32_t),
        static_cast<std::size_t>(plan.num_partials) * splitk::max_group_block * sizeof(splitk::softmax_state),
        static_cast<std::size_t>(plan.num_partials) * splitk::max_group_block * D * sizeof(float),
        opt.lse ? 0 : static_cast<std::size_t>(rows) * sizeof(float),
        want_probs && !opt.probs ? static_cast<std::size_t>(rows) * longest * sizeof(float) : 0};
    const std::size_t total = ws.layout(sizes, off);
    ws.bytes.reserve(total);
    const std::size_t host_bytes = off[3];  // items, merges and lengths are uploaded
    // staging = [uploaded prefix][offsets][counts]: the tail lets a reusing call find the layout.
    ws.staging.assign(host_bytes + sizeof(off) + sizeof(counts), std::byte{0});
    if (sizes[0]) std::memcpy(ws.staging.data() + off[0], plan.items.data(), sizes[0]);
    if (sizes[1]) std::memcpy(ws.staging.data() + off[1], plan.merges.data(), sizes[1]);
    if (sizes[2]) std::memcpy(ws.staging.data() + off[2], lengths, sizes[2]);
    std::memcpy(ws.staging.data() + host_bytes, off, sizeof(off));
    std::memcpy(ws.staging.data() + host_bytes + sizeof(off), &cnt, sizeof(counts));
    if (host_bytes)
      KVC_CUDA_CHECK(cudaMemcpyAsync(ws.bytes.data(), ws.staging.data(), host_bytes, cudaMemcpyHostToDevice, opt.stream));
    ws.plan_key = std::move(key);
    ws.plan_valid = opt.ws != nullptr;
  }
  std::byte* base = ws.bytes.data();

  decode_args a;
  a.items = reinterpret_cast<const splitk::work_item*>(base + off[0]);
  a.q = q;
  a.scale = opt.scale != 0.0f ? opt.scale : 1.0f / std::sqrt(static_cast<float>(D));
  a.G = G;
  a.out = out;
  a.lse = opt.lse ? opt.lse : reinterpret_cast<float*>(base + off[5]);
  a.raw = want_probs ? (opt.probs ? opt.probs : reinterpret_cast<float*>(base + off[6])) : nullptr;
  a.raw_stride = opt.probs ? opt.probs_stride : longest;
  a.part_s = reinterpret_cast<splitk::softmax_state*>(base + off[3]);
  a.part_o = reinterpret_cast<float*>(base + off[4]);

  if (cnt.items) {
    const int gmax_needed = G >= splitk::max_group_block ? splitk::max_group_block : G;
    const unsigned grid = static_cast<unsigned>(cnt.items);
#define KVC_LAUNCH_D(DD)                                                                                    \
  if (gmax_needed <= 1) decode_kernel<Src, DD, 1><<<grid, block_threads, 0, opt.stream>>>(src, a);        \
  else if (gmax_needed <= 4) decode_kernel<Src, DD, 4><<<grid, block_threads, 0, opt.stream>>>(src, a);   \
  else decode_kernel<Src, DD, 8><<<grid, block_threads, 0, opt.stream>>>(src, a);
    if (D == 64) {
      KVC_LAUNCH_D(64)
    } else if (D == 128) {
      KVC_LAUNCH_D(128)
    } else {
      KVC_LAUNCH_D(256)
    }
#undef KVC_LAUNCH_D
    KVC_CUDA_CHECK(cudaGetLastError());
  }
  if (cnt.merges) {
    merge_kernel<<<static_cast<unsigned>(cnt.merges), 256, 0, opt.stream>>>(
        reinterpret_cast<const splitk::merge_job*>(base + off[1]), G, D, a.part_o, a.part_s, out, a.lse);
    KVC_CUDA_CHECK(cudaGetLastError());
  }
  if (want_probs && longest > 0) {
    const long long n = static_cast<long long>(streams) * longest;
    const unsigned blocks = static_cast<unsigned>(n / 256 + 1 < 65535 ? n / 256 + 1 : 65535);
    probs_kernel<<<blocks, 256, 0, opt.stream>>>(reinterpret_cast<const std::int32_t*>(base + off[2]), streams, G,
                                                 longest, a.raw, a.raw_stride, a.lse, opt.probs, opt.group_probs,
                                                 opt.probs_stride);
    KVC_CUDA_CHECK(cudaGetLastError());
  }
  if (!opt.ws) KVC_CUDA_CHECK(cudaStreamSynchronize(opt.stream));  // the local workspace dies here
}

}  // namespace detail
}  // namespace cuda
KVC_END_NAMESPACE
