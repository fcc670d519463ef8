// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// CUDA decode attention over a low-rank projected cache (kvc::lowrank::projected_cache, Loki,
/// Singhania et al. 2024; Eigen Attention, Saxena et al. 2024): the device twin of
/// kvc::cpu::projected_decode_attention (kvc/cpu/projected_attention.hpp), reading the
/// coefficient pages in place. Per step and query head, as the CPU r-space path:
///
///   q'_g  = scale · U_kᵀ q_g                     block prologue, r_k x D FMAs
///   s_t   = q'_g · c_k[t]                         per token, r_k FMAs
///   p     = softmax(s)  (online, exact merge per tile);  a_g = Σ_t p_t c_v[t]   r_v FMAs
///   out_g = U_v a_g / Σp + μ_v                    block epilogue, D x r_v FMAs
///   lse_g = log Σ_t e^(s_t) + scale · q_g·μ_k      the constant the r-space scores drop, added back
///
/// Status: **compile-only**. Written and built with nvcc 13 for sm_90 on a machine without a
/// GPU (none was lent to the session that wrote it); tests/cuda/test_cuda_projected.cu checks it
/// against a dense double reference and has never run. Treat its first GPU run as its first test.
///
/// Why one block per (sequence, kv head, block of <= 8 query heads) with a token-tile loop, not
/// the split-K decode kernel of decode_kernel.cuh: that kernel's row layout is D / 8 lanes of 8
/// elements, so it needs the row width (here r, or half the split row) to be 64, 128 or 256, and
/// r = D/8..D/2 is mostly not. This kernel stages a tile of TT whole coefficient rows into shared
/// memory (one coalesced read of each row, shared by the block's query heads: GQA reads a kv
/// head's rows once per 8 query heads, as the fp16 kernel does) and indexes the row through one
/// formula, z[i] = i < hw ? K-half[i] : V-half[i - hw], which covers both layouts of
/// projected_cache.hpp: equal ranks (K row = c_k, V row = c_v) and two ranks (the split row
/// [c_k | c_v | pad]). No split over tokens: a single long sequence runs on num_kv_heads blocks
/// and leaves most SMs idle; correctness first, nobody could run it here.
///
/// Pre-RoPE keys (projected_config::pre_rope) are attended as the CPU general path does: per
/// token the block rebuilds k̂_t = R(p_t)(U_k c_k[t] + μ_k) into shared memory (r_k·D FMAs shared
/// by the group, the angle p_t·inv_freq in double as kvc::rope), and scores it against the
/// unprojected query: RoPE does not commute with U_k, so there is no r-space shortcut for them.
///
/// Refused (kvc::error naming the argument): probs / group_probs (no probability outputs; the
/// CPU kernel has them), a row that does not fit the 48 KiB of static-limit shared memory even at
/// one token per tile (head_dim above ~256 at full rank), and the shape errors the CPU entry
/// point refuses. Not refused: a sequence whose kv heads are all empty (the batch kernel writes
/// zeros and lse = -inf, as the other CUDA kernels; the CPU entry point throws). opt.split_tokens
/// and opt.ws are ignored (no split-K, no workspace: the call allocates nothing and is
/// asynchronous on opt.stream). q is device memory and is not checked for finiteness.
///
/// Not included by the umbrella <kvc/cuda.cuh>: through lowrank/pca.hpp it brings Eigen into the
/// TU, which every other CUDA user would then parse. Include this header by name.

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <kvc/attention/rope.hpp>
#include <kvc/attention/split_plan.hpp>
#include <kvc/cuda/common.cuh>
#include <kvc/cuda/decode_kernel.cuh>
#include <kvc/store/projected_cache.hpp>
#include <kvc/types.hpp>

KVC_BEGIN_NAMESPACE
namespace cuda {

/// One layer of a batch of projected streams on the device (stream s = seq * num_kv_heads + h, as
/// the other CUDA kernels). The coefficient pages are a kv_cache<T> pool's: page p at
/// `pool + p * page_stride` elements, [K half: P x hw][V half: P x hw] with hw = row width / 2 =
/// ceil((r_k + r_v) / 2). device_projected_layer fills this from a host cache; an engine that
/// keeps the pages on the device fills it directly.
template <class T>
struct projected_layer_desc {
  const T* pool = nullptr;             ///< device coefficient pages
  long long page_stride = 0;           ///< elements from one page to the next (>= 2 * page_size * hw)
  std::int32_t page_size = 0;          ///< tokens per page, a power of two
  std::int32_t head_dim = 0;           ///< D of the model's keys and values
  std::int32_t key_rank = 0;           ///< r_k
  std::int32_t value_rank = 0;         ///< r_v
  std::int32_t num_kv_heads = 0;
  const float* key_basis = nullptr;    ///< device [num_kv_heads][r_k][D] (row j = direction j)
  const float* key_mean = nullptr;     ///< device [num_kv_heads][D], or null: no head centered
  const float* value_basis = nullptr;  ///< device [num_kv_heads][r_v][D]
  const float* value_mean = nullptr;   ///< device [num_kv_heads][D], or null
  const std::int32_t* const* tables = nullptr;     ///< device [streams] of device page tables
  const std::int32_t* const* positions = nullptr;  ///< device [streams] of device positions (pre-RoPE keys only)
  const std::int32_t* lengths = nullptr;           ///< device [streams] tokens per stream
  std::vector<std::int32_t> host_lengths;          ///< the same on the host (grid size and checks)
  const rope* pre_rope = nullptr;      ///< non-null: keys were appended before RoPE
  const double* inv_freq = nullptr;    ///< device [rotary_dim / 2] with pre_rope
};

namespace detail {

inline constexpr int proj_threads = 128;   ///< 4 warps
inline constexpr int proj_max_group = 8;   ///< query heads per block (larger groups: several blocks)
inline constexpr std::size_t proj_smem_limit = 48 * 1024;  ///< no cudaFuncSetAttribute opt-in needed

/// Kernel arguments: the descriptor's pointers, the shapes, and the float offsets of the block's
/// shared-memory arrays (computed once on the host by proj_layout).
template <class T>
struct projected_args {
  const T* pool;
  long long page_stride;
  std::int32_t P, shift, D, rk, rv, hw, hkv, G, chunks;
  std::int32_t TT, zs_stride, ks_stride;  ///< tokens per tile; row strides of the staged rows and rebuilt keys
  std::int32_t off_acc, off_zs, off_ks, off_ps, off_m;  ///< float offsets into shared memory
  const float* uk;
  const float* muk;
  const float* uv;
  const float* muv;
  const std::int32_t* const* tables;
  const std::int32_t* const* positions;
  const std::int32_t* lengths;
  const float* q;
  float* out;
  float* lse;
  float scale;
  bool pre_rope, interleaved;
  std::int32_t rot;
  const double* inv_freq;
};

/// Shared memory of one block, in floats: query rows [8][QW] (QW = D for pre-RoPE keys, else r_k),
/// accumulators [8][r_v], staged rows [TT][2hw + 1], rebuilt keys [TT][D + 1] (pre-RoPE only),
/// scores / probabilities [8][TT], then m, l, correction and q·μ_k [8] each. The +1 row strides
/// make the score loop, whose neighbouring threads read neighbouring tokens at one coefficient,
/// free of bank conflicts. Returns the bytes; fills a's offsets.
template <class T>
std::size_t proj_layout(projected_args<T>& a, std::int32_t TT) {
  constexpr std::int32_t MG = proj_max_group;
  const std::int32_t qw = a.pre_rope ? a.D : a.rk;
  a.TT = TT;
  a.zs_stride = 2 * a.hw + 1;
  a.ks_stride = a.D + 1;
  a.off_acc = MG * qw;
  a.off_zs = a.off_acc + MG * a.rv;
  a.off_ks = a.off_zs + TT * a.zs_stride;
  a.off_ps = a.off_ks + (a.pre_rope ? TT * a.ks_stride : 0);
  a.off_m = a.off_ps + MG * TT;
  return static_cast<std::size_t>(a.off_m + 4 * MG) * sizeof(float);
}

__device__ __forceinline__ float proj_warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}
__device__ __forceinline__ double proj_warp_sum(double x) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}
__device__ __forceinline__ float proj_warp_max(float x) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

/// The projected decode kernel: block = (stream, block of <= 8 query heads). Every loop below is
/// block-strided over a flat index and every phase ends with __syncthreads, so the kernel holds
/// for any TT, D and ranks the host layout admits; the per-phase comments name the CPU line each
/// one mirrors (kvc/cpu/projected_attention.hpp).
template <class T>
__global__ void __launch_bounds__(proj_threads) projected_decode_kernel(const projected_args<T> a) {
  extern __shared__ float smem[];
  constexpr int MG = proj_max_group;
  const int stream = static_cast<int>(blockIdx.x) / a.chunks, chunk = static_cast<int>(blockIdx.x) % a.chunks;
  const int g0 = chunk * MG;
  const int gn = a.G - g0 < MG ? a.G - g0 : MG;
  const int h = stream % a.hkv;
  const int n = a.lengths[stream];
  const int D = a.D, rk = a.rk, rv = a.rv, hw = a.hw, W = 2 * hw, TT = a.TT, ZS = a.zs_stride, KS = a.ks_stride;
  const int qw = a.pre_rope ? D : rk;
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32, warp = tid / 32;
  const int nthreads = static_cast<int>(blockDim.x), nwarps = nthreads / 32;
  const long long row0 = static_cast<long long>(stream) * a.G + g0;  // the block's first query row

  float* qs = smem;               // [MG][qw]
  float* acc = smem + a.off_acc;  // [MG][rv]: Σ p c_v, unnormalised
  float* zs = smem + a.off_zs;    // [TT][ZS]: the tile's rows z = [K half | V half]
  float* ks = smem + a.off_ks;    // [TT][KS]: rebuilt, rotated keys (pre-RoPE)
  float* ps = smem + a.off_ps;    // [MG][TT]: scores, then probabilities
  float* ms = smem + a.off_m;     // [MG] running max
  float* ls = ms + MG;            // [MG] running Σ e^(s - m)
  float* cs = ls + MG;            // [MG] this tile's correction e^(m_old - m_new)
  float* qm = cs + MG;            // [MG] q·μ_k (post-RoPE keys: the lse's missing constant)

  const float* q = a.q + row0 * D;
  const float* uk = a.uk + static_cast<long long>(h) * rk * D;
  const float* muk = a.muk ? a.muk + static_cast<long long>(h) * D : nullptr;
  if (a.pre_rope) {
    // Scores against rebuilt keys use the query as given (CPU: scale * dot(q, key)).
    for (int i = tid; i < gn * D; i += nthreads) qs[(i / D) * qw + i % D] = q[i] * a.scale;
  } else {
    // q' = scale · U_kᵀ q (CPU: project_queries, then qp *= scale): a warp per (head, direction),
    // lanes over D, so U_k's rows are read coalesced.
    for (int p = warp; p < gn * rk; p += nwarps) {
      const int g = p / rk, j = p % rk;
      float s = 0.0f;
      for (int d = lane; d < D; d += 32) s = fmaf(uk[static_cast<long long>(j) * D + d], q[static_cast<long long>(g) * D + d], s);
      s = proj_warp_sum(s);
      if (lane == 0) qs[g * qw + j] = s * a.scale;
    }
  }
  // q·μ_k in double, as the CPU's lse correction (0 for pre-RoPE keys, whose scores include it).
  for (int g = warp; g < gn; g += nwarps) {
    double s = 0.0;
    if (muk && !a.pre_rope)
      for (int d = lane; d < D; d += 32) s += static_cast<double>(q[static_cast<long long>(g) * D + d]) * muk[d];
    s = proj_warp_sum(s);
    if (lane == 0) qm[g] = static_cast<float>(s);
  }
  for (int i = tid; i < gn * rv; i += nthreads) acc[i] = 0.0f;
  for (int g = tid; g < gn; g += nthreads) {
    ms[g] = -INFINITY;
    ls[g] = 0.0f;
    cs[g] = 1.0f;
  }
  __syncthreads();

  const std::int32_t* table = a.tables[stream];
  const std::int32_t* pos = a.pre_rope ? a.positions[stream] : nullptr;
  for (int t0 = 0; t0 < n; t0 += TT) {
    const int nt = n - t0 < TT ? n - t0 : TT;  // valid tokens of this tile, >= 1
    // 1. Stage rows: token t's K half at page + (t % P) * hw, its V half at page + (P + t % P) * hw
    //    (CPU: attend_head_general's row lambda). Rows past nt are zeroed, never read as NaN.
    for (int i = tid; i < TT * W; i += nthreads) {
      const int tt = i / W, e = i % W;
      float x = 0.0f;
      if (tt < nt) {
        const int t = t0 + tt, slot = t & (a.P - 1);
        const T* page = a.pool + static_cast<long long>(table[t >> a.shift]) * a.page_stride;
        x = e < hw ? static_cast<float>(page[static_cast<long long>(slot) * hw + e])
                   : static_cast<float>(page[static_cast<long long>(a.P + slot) * hw + (e - hw)]);
      }
      zs[tt * ZS + e] = x;
    }
    __syncthreads();
    if (a.pre_rope) {
      // 2a. k̂ = U_k c_k + μ_k (CPU: back_project with bk), thread per (token, channel).
      for (int i = tid; i < nt * D; i += nthreads) {
        const int tt = i / D, d = i % D;
        float x = muk ? muk[d] : 0.0f;
        for (int j = 0; j < rk; ++j) x = fmaf(zs[tt * ZS + j], uk[static_cast<long long>(j) * D + d], x);
        ks[tt * KS + d] = x;
      }
      __syncthreads();
      // 2b. R(p_t) k̂ (CPU: rotate, kvc::rope's pairing): one thread owns a pair, so in place.
      const int half = a.rot / 2;
      for (int i = tid; i < nt * half; i += nthreads) {
        const int tt = i / half, k = i % half;
        const int i0 = a.interleaved ? 2 * k : k, i1 = a.interleaved ? 2 * k + 1 : k + half;
        double sn, cn;
        sincos(static_cast<double>(pos[t0 + tt]) * a.inv_freq[k], &sn, &cn);
        const float c = static_cast<float>(cn), s = static_cast<float>(sn);
        float* x = ks + tt * KS;
        const float x0 = x[i0], x1 = x[i1];
        x[i0] = x0 * c - x1 * s;
        x[i1] = x0 * s + x1 * c;
      }
      __syncthreads();
    }
    // 3. Scores, thread per (head, token): q'·c_k (c_k = z[0, r_k)) or, pre-RoPE, q·k̂.
    for (int i = tid; i < gn * TT; i += nthreads) {
      const int g = i / TT, tt = i % TT;
      float s = -INFINITY;
      if (tt < nt) {
        float x = 0.0f;
        if (a.pre_rope)
          for (int d = 0; d < D; ++d) x = fmaf(qs[g * qw + d], ks[tt * KS + d], x);
        else
          for (int j = 0; j < rk; ++j) x = fmaf(qs[g * qw + j], zs[tt * ZS + j], x);
        s = x;
      }
      ps[g * TT + tt] = s;
    }
    __syncthreads();
    // 4. Online softmax over the tile, a warp per head: m_new = max(m, max s), p = e^(s - m_new),
    //    l = l·e^(m - m_new) + Σ p (kvc::splitk's update, written out for a shared-memory tile).
    for (int g = warp; g < gn; g += nwarps) {
      const float m_old = ms[g];
      float mx = -INFINITY;
      for (int tt = lane; tt < nt; tt += 32) mx = fmaxf(mx, ps[g * TT + tt]);
      const float m_new = fmaxf(m_old, proj_warp_max(mx));
      float sum = 0.0f;
      for (int tt = lane; tt < TT; tt += 32) {
        const float p = tt < nt && m_new != -INFINITY ? splitk::exp_or_zero(ps[g * TT + tt] - m_new) : 0.0f;
        ps[g * TT + tt] = p;
        sum += p;
      }
      sum = proj_warp_sum(sum);
      __syncwarp();
      if (lane == 0) {
        const float corr = m_new == -INFINITY ? 1.0f : splitk::exp_or_zero(m_old - m_new);
        cs[g] = corr;
        ls[g] = ls[g] * corr + sum;
        ms[g] = m_new;
      }
    }
    __syncthreads();
    // 5. a = a·corr + Σ_t p_t c_v[t] (c_v = z[r_k, r_k + r_v)), thread per (head, value coefficient).
    for (int i = tid; i < gn * rv; i += nthreads) {
      const int g = i / rv, j = i % rv;
      float x = acc[i] * cs[g];
      for (int tt = 0; tt < nt; ++tt) x = fmaf(ps[g * TT + tt], zs[tt * ZS + rk + j], x);
      acc[i] = x;
    }
    __syncthreads();  // the next tile overwrites zs and ps
  }

  // 6. out = U_v (a / l) + μ_v, thread per (head, channel) so U_v's rows are read coalesced; an
  //    empty stream gives zeros, not μ_v (CPU: the fill after back_project_all), and lse = -inf.
  const float* uv = a.uv + static_cast<long long>(h) * rv * D;
  const float* muv = a.muv ? a.muv + static_cast<long long>(h) * D : nullptr;
  for (int i = tid; i < gn * D; i += nthreads) {
    const int g = i / D, d = i % D;
    const float l = ls[g];
    float o = 0.0f;
    if (l > 0.0f) {
      float x = 0.0f;
      for (int j = 0; j < rv; ++j) x = fmaf(acc[g * rv + j], uv[static_cast<long long>(j) * D + d], x);
      o = x / l + (muv ? muv[d] : 0.0f);
    }
    a.out[(row0 + g) * D + d] = o;
  }
  if (a.lse)
    for (int g = tid; g < gn; g += nthreads)
      a.lse[row0 + g] = ls[g] > 0.0f ? ms[g] + logf(ls[g]) + a.scale * qm[g] : -INFINITY;
}

}  // namespace detail

/// Decode attention over a projected layer on the device: one query token per query head of every
/// stream of `L`, same contract as kvc::cpu::projected_decode_attention per sequence (GQA when
/// num_q_heads is a multiple of num_kv_heads; opt.scale 0 means 1/sqrt(head_dim) of the original
/// head_dim; opt.lse is the log-sum-exp over the reconstructed keys, scale · q·μ_k included).
/// \param q    [streams * G][D] device queries, post-RoPE (pre-RoPE keys are rotated to meet them)
/// \param out  [streams * G][D] device output
template <class T>
void decode_attention_projected(const projected_layer_desc<T>& L, const float* q, std::int32_t num_q_heads, float* out,
                                const device_decode_options& opt = {}) {
  static_assert(std::is_same<T, float>::value || std::is_same<T, half>::value,
                "kvc::cuda::decode_attention_projected: T must be float or kvc::half (projected_cache's coefficients)");
  constexpr const char* who = "kvc::cuda::decode_attention_projected";
  const std::int32_t hkv = L.num_kv_heads, D = L.head_dim, rk = L.key_rank, rv = L.value_rank;
  KVC_EXPECTS_IN(who, hkv > 0, "projected_layer_desc.num_kv_heads = ", hkv, ", expected > 0");
  KVC_EXPECTS_IN(who, num_q_heads > 0 && num_q_heads % hkv == 0, "num_q_heads = ", num_q_heads,
                 ", expected a positive multiple of num_kv_heads = ", hkv);
  KVC_EXPECTS_IN(who, q != nullptr && out != nullptr, "q or out is null");
  KVC_EXPECTS_IN(who, D > 0, "projected_layer_desc.head_dim = ", D, ", expected > 0");
  KVC_EXPECTS_IN(who, rk >= 1 && rk <= D, "projected_layer_desc.key_rank = ", rk, ", expected 1..", D, " (head_dim)");
  KVC_EXPECTS_IN(who, rv >= 1 && rv <= D, "projected_layer_desc.value_rank = ", rv, ", expected 1..", D, " (head_dim)");
  KVC_EXPECTS_IN(who, opt.probs == nullptr && opt.group_probs == nullptr,
                 "opt.probs or opt.group_probs is set, expected null: the projected CUDA kernel has no probability "
                 "outputs (kvc::cpu::projected_decode_attention has them)");
  const std::size_t streams = L.host_lengths.size();
  KVC_EXPECTS_IN(who, streams % static_cast<std::size_t>(hkv) == 0, "projected_layer_desc.host_lengths.size() = ",
                 streams, ", expected a multiple of num_kv_heads = ", hkv, " (stream = seq * num_kv_heads + head)");
  const std::int32_t shift = splitk::page_shift(L.page_size, who);
  const std::int32_t hw = (rk + rv + 1) / 2;
  KVC_EXPECTS_IN(who, L.page_stride >= 2LL * L.page_size * hw, "projected_layer_desc.page_stride = ", L.page_stride,
                 ", expected >= 2 * page_size * row half = ", 2LL * L.page_size * hw,
                 " elements (a page holds page_size K halves and V halves)");
  bool any = false;
  for (std::size_t s = 0; s < streams; ++s) {
    KVC_EXPECTS_IN(who, L.host_lengths[s] >= 0, "projected_layer_desc.host_lengths[", s, "] = ", L.host_lengths[s],
                   ", expected >= 0 tokens");
    any = any || L.host_lengths[s] > 0;
  }
  if (streams == 0) return;
  KVC_EXPECTS_IN(who, L.lengths != nullptr && L.tables != nullptr, "projected_layer_desc.lengths or .tables is null with ",
                 streams, " streams");
  KVC_EXPECTS_IN(who, L.key_basis != nullptr && L.value_basis != nullptr,
                 "projected_layer_desc.key_basis or .value_basis is null, expected [num_kv_heads][rank][head_dim] floats");
  KVC_EXPECTS_IN(who, !any || L.pool != nullptr, "projected_layer_desc.pool is null with tokens to read");
  detail::projected_args<T> a{};
  a.pre_rope = L.pre_rope != nullptr;
  a.interleaved = false;
  a.rot = 0;
  if (L.pre_rope) {
    const rope_config& rc = L.pre_rope->config();
    KVC_EXPECTS_IN(who, rc.head_dim == D, "pre_rope->config().head_dim = ", rc.head_dim, ", expected head_dim = ", D);
    KVC_EXPECTS_IN(who, L.inv_freq != nullptr && L.positions != nullptr,
                   "projected_layer_desc.inv_freq or .positions is null with pre-RoPE keys (each key is rotated to its "
                   "stored position)");
    a.interleaved = rc.style == rope_style::interleaved;
    a.rot = rc.rotary_dim;
  }
  a.pool = L.pool;
  a.page_stride = L.page_stride;
  a.P = L.page_size;
  a.shift = shift;
  a.D = D;
  a.rk = rk;
  a.rv = rv;
  a.hw = hw;
  a.hkv = hkv;
  a.G = num_q_heads / hkv;
  a.chunks = (a.G + detail::proj_max_group - 1) / detail::proj_max_group;
  a.uk = L.key_basis;
  a.muk = L.key_mean;
  a.uv = L.value_basis;
  a.muv = L.value_mean;
  a.tables = L.tables;
  a.positions = L.positions;
  a.lengths = L.lengths;
  a.q = q;
  a.out = out;
  a.lse = opt.lse;
  a.scale = opt.scale != 0.0f ? opt.scale : 1.0f / std::sqrt(static_cast<float>(D));
  a.inv_freq = L.inv_freq;
  // The widest tile that fits: 32 tokens for the usual rows, fewer for wide rows at large D.
  std::size_t bytes = 0;
  std::int32_t TT = 32;
  for (; TT >= 1; TT /= 2) {
    bytes = detail::proj_layout(a, TT);
    if (bytes <= detail::proj_smem_limit) break;
  }
  KVC_EXPECTS_IN(who, TT >= 1, "head_dim = ", D, ", key_rank = ", rk, ", value_rank = ", rv, ": one token's row needs ",
                 bytes, " bytes of shared memory, expected <= ", detail::proj_smem_limit,
                 " (the projected CUDA kernel's limit; head_dim <= 256 always fits)");
  const long long blocks = static_cast<long long>(streams) * a.chunks;
  KVC_EXPECTS_IN(who, blocks <= 0x7fffffffLL, "streams x query-head blocks = ", blocks, ", expected <= 2^31 - 1");
  detail::projected_decode_kernel<T><<<static_cast<unsigned>(blocks), detail::proj_threads, bytes, opt.stream>>>(a);
  KVC_CUDA_CHECK(cudaGetLastError());
}

/// A device copy of one layer of a host lowrank::projected_cache for a batch of sequences: the
/// coefficient pages (up to the highest page a listed stream uses), every stream's page table,
/// length and positions, the layer's bases and means, and the RoPE frequencies for pre-RoPE keys.
/// Build it after the host cache changes (it is a snapshot); `desc()` feeds
/// decode_attention_projected. The checks are those of cpu::projected_decode_attention that
/// concern the cache (a live sequence, a layer in range, a basis for every kv head).
template <class T>
class device_projected_layer {
 public:
  device_projected_layer(const lowrank::projected_cache<T>& c, const std::vector<seq_id>& seqs, std::int32_t layer,
                         cudaStream_t stream = nullptr) {
    constexpr const char* who = "kvc::cuda::device_projected_layer";
    const auto& cfg = c.config();
    const std::int32_t H = cfg.num_kv_heads, D = cfg.head_dim, rk = c.key_rank(), rv = c.value_rank();
    KVC_EXPECTS_IN(who, layer >= 0 && layer < cfg.num_layers, "layer = ", layer, ", expected 0..", cfg.num_layers - 1);
    for (std::size_t i = 0; i < seqs.size(); ++i)
      KVC_EXPECTS_IN(who, c.contains(seqs[i]), "seqs[", i, "] = ", seqs[i],
                     " is not a live sequence of this cache, expected one of its ", c.num_sequences(),
                     " live sequence ids");
    for (std::int32_t h = 0; h < H; ++h)
      KVC_EXPECTS_IN(who, c.has_basis(layer, h), "layer ", layer, " head ", h,
                     " has no basis, expected projected_cache::set_basis before attending");
    const auto& coef = c.coefficients();
    const page_pool& pool = coef.pool();
    KVC_EXPECTS_IN(who, pool.page_bytes() % sizeof(T) == 0, "the coefficient pool's page_bytes = ", pool.page_bytes(),
                   ", expected a multiple of the coefficient size ", sizeof(T));
    desc_.page_stride = static_cast<long long>(pool.page_bytes() / sizeof(T));
    desc_.page_size = coef.config().page_size;
    desc_.head_dim = D;
    desc_.key_rank = rk;
    desc_.value_rank = rv;
    desc_.num_kv_heads = H;

    std::vector<std::int32_t> tables, positions;
    std::vector<std::size_t> toff, poff;
    std::int32_t max_page = -1;
    for (seq_id s : seqs)
      for (std::int32_t h = 0; h < H; ++h) {
        const auto& pages = coef.pages(s, layer, h);
        const std::int32_t n = coef.length(s, layer, h);
        toff.push_back(tables.size());
        for (const auto p : pages) {
          tables.push_back(static_cast<std::int32_t>(p));
          max_page = static_cast<std::int32_t>(p) > max_page ? static_cast<std::int32_t>(p) : max_page;
        }
        poff.push_back(positions.size());
        const std::int32_t* ps = coef.positions(s, layer, h);
        if (n > 0) positions.insert(positions.end(), ps, ps + n);
        desc_.host_lengths.push_back(n);
      }
    if (max_page >= 0) pool_.upload(pool.base(), static_cast<std::size_t>(max_page + 1) * pool.page_bytes(), stream);
    desc_.pool = reinterpret_cast<const T*>(pool_.data());
    // Empty arrays still get one element, so every stream's pointer is a valid device address.
    if (tables.empty()) tables.push_back(0);
    if (positions.empty()) positions.push_back(0);
    tables_.upload(tables, stream);
    positions_.upload(positions, stream);
    std::vector<const std::int32_t*> tp, pp;
    for (std::size_t i = 0; i < toff.size(); ++i) {
      tp.push_back(tables_.data() + toff[i]);
      pp.push_back(positions_.data() + poff[i]);
    }
    if (!tp.empty()) {
      table_ptrs_.upload(tp, stream);
      position_ptrs_.upload(pp, stream);
      lengths_.upload(desc_.host_lengths, stream);
    }
    desc_.tables = table_ptrs_.data();
    desc_.positions = position_ptrs_.data();
    desc_.lengths = lengths_.data();

    // Bases [H][r][D]; means [H][D] when any head is centered (zeros for the others: adding 0 and
    // q·0 is what an uncentered head means).
    std::vector<float> uk, uv, mk, mv;
    bool ck = false, cv = false;
    for (std::int32_t h = 0; h < H; ++h) {
      ck = ck || c.key_basis(layer, h).centered();
      cv = cv || c.value_basis(layer, h).centered();
    }
    for (std::int32_t h = 0; h < H; ++h) {
      const lowrank::basis& bk = c.key_basis(layer, h);
      const lowrank::basis& bv = c.value_basis(layer, h);
      uk.insert(uk.end(), bk.u.begin(), bk.u.end());
      uv.insert(uv.end(), bv.u.begin(), bv.u.end());
      if (ck) {
        if (bk.centered()) mk.insert(mk.end(), bk.mean.begin(), bk.mean.end());
        else mk.insert(mk.end(), static_cast<std::size_t>(D), 0.0f);
      }
      if (cv) {
        if (bv.centered()) mv.insert(mv.end(), bv.mean.begin(), bv.mean.end());
        else mv.insert(mv.end(), static_cast<std::size_t>(D), 0.0f);
      }
    }
    key_basis_.upload(uk, stream);
    value_basis_.upload(uv, stream);
    desc_.key_basis = key_basis_.data();
    desc_.value_basis = value_basis_.data();
    if (ck) {
      key_mean_.upload(mk, stream);
      desc_.key_mean = key_mean_.data();
    }
    if (cv) {
      value_mean_.upload(mv, stream);
      desc_.value_mean = value_mean_.data();
    }
    if (const rope* rp = c.key_rope()) {
      std::vector<double> f(static_cast<std::size_t>(rp->config().rotary_dim / 2));
      for (std::size_t i = 0; i < f.size(); ++i) f[i] = rp->inv_freq(static_cast<std::int32_t>(i));
      inv_freq_.upload(f, stream);
      desc_.pre_rope = rp;  // the host cache's rope: the cache must outlive this copy's desc()
      desc_.inv_freq = inv_freq_.data();
    }
    KVC_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  const projected_layer_desc<T>& desc() const noexcept { return desc_; }

 private:
  device_buffer<std::byte> pool_;
  device_buffer<std::int32_t> tables_, positions_, lengths_;
  device_buffer<const std::int32_t*> table_ptrs_, position_ptrs_;
  device_buffer<float> key_basis_, value_basis_, key_mean_, value_mean_;
  device_buffer<double> inv_freq_;
  projected_layer_desc<T> desc_;
};

}  // namespace cuda
KVC_END_NAMESPACE
