// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// CUDA decode attention over quantized streams with fused dequantization: the same split-K
/// kernel as the full-precision path (decode_kernel.cuh), reading each stream's three segments
/// (full-precision sinks, quantized pages, full-precision residual window: the layout of
/// kvc::quant_cache) with the codec readers of quant_codecs.cuh. No work item crosses a segment,
/// so each item reads one kind of row:
///  - Hadamard-rotated key codecs: the item scores quantized keys against H q (rotated once per
///    block in shared memory), sinks and residual against q;
///  - rotated value codecs: a quantized item's accumulator is rotated back (H is linear) before
///    it is written, so every partial state is in the model domain and merges exactly;
///  - pre-RoPE keys: each key is decoded (and rotated back, for rotated codecs) and RoPE is
///    applied in the kernel at the token's stored position, as kvc::cpu does.
///
/// `device_quant_layer` mirrors one layer of a host kvc::quant_cache for a batch of sequences on
/// the device (what tests, benchmarks and host-offloaded caches need); engines that keep their
/// quantized pages on the device fill a `quant_layer_desc` directly.

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <kvc/attention/rope.hpp>
#include <kvc/attention/split_plan.hpp>
#include <kvc/cuda/common.cuh>
#include <kvc/cuda/decode_kernel.cuh>
#include <kvc/cuda/quant_codecs.cuh>
#include <kvc/store/quant_cache.hpp>

KVC_BEGIN_NAMESPACE
namespace cuda {

/// One stream on the device: [n_sink sink rows][n_quant quantized tokens in `pages`][n_res rows].
template <class Fp>
struct quant_stream_desc {
  const std::int32_t* pages = nullptr;      ///< quant page ids (device)
  const Fp* sink_k = nullptr;               ///< [n_sink][D] (device)
  const Fp* sink_v = nullptr;
  const Fp* res_k = nullptr;                ///< [n_res][D] (device)
  const Fp* res_v = nullptr;
  const std::int32_t* positions = nullptr;  ///< [length] (device; read only for pre-RoPE keys)
  std::int32_t n_sink = 0, n_quant = 0, n_res = 0;
};

namespace detail {

template <class KQ, class VQ, class Fp>
struct quant_source {
  using KC = device_codec<KQ, quant::role::key>;
  using VC = device_codec<VQ, quant::role::value>;
  const std::byte* qbase;
  long long page_bytes;
  long long v_offset;
  std::int32_t shift;  ///< log2(page_size)
  std::int32_t D;
  qlayout kl, vl;
  const quant_stream_desc<Fp>* streams;
  // pre-RoPE keys
  bool pre_rope;
  bool interleaved;
  std::int32_t rot;  ///< rotary dims
  const double* inv_freq;

  struct ctx_t {
    quant_stream_desc<Fp> s;
    int seg;  ///< 0 sinks, 1 quantized, 2 residual
  };
  __device__ ctx_t begin(const splitk::work_item& it) const { return {streams[it.stream], it.seg}; }
  __device__ bool query_to_stored(const ctx_t& c) const { return KC::rotates && c.seg == 1 && !pre_rope; }
  __device__ bool value_to_model(const ctx_t& c) const { return VC::rotates && c.seg == 1; }
  template <int DD>
  __device__ void to_stored_block_d(float* x, int gn) const {
    rows_to_stored<DD>(x, gn, key_signs(), kl.seed);
  }
  __device__ void to_stored_block(float* x, int gn) const {
    if (D == 64) to_stored_block_d<64>(x, gn);
    else if (D == 128) to_stored_block_d<128>(x, gn);
    else to_stored_block_d<256>(x, gn);
  }
  __device__ void to_model_block(float* y, int gn) const {
    if (D == 64) rows_to_model<64>(y, gn, value_signs(), vl.seed);
    else if (D == 128) rows_to_model<128>(y, gn, value_signs(), vl.seed);
    else rows_to_model<256>(y, gn, value_signs(), vl.seed);
  }
  __device__ static constexpr bool key_signs() { return random_signs_v<KQ, quant::role::key>; }
  __device__ static constexpr bool value_signs() { return random_signs_v<VQ, quant::role::value>; }

  __device__ const std::byte* part(const ctx_t& c, int i) const {
    return qbase + static_cast<long long>(c.s.pages[i >> shift]) * page_bytes;
  }
  __device__ raw_slice load_k(const ctx_t& c, int t, int d0) const {
    if (c.seg == 0) return load_row_slice(c.s.sink_k + static_cast<long long>(t) * D + d0);
    if (c.seg == 2) return load_row_slice(c.s.res_k + static_cast<long long>(t - c.s.n_sink - c.s.n_quant) * D + d0);
    const int i = t - c.s.n_sink;
    return KC::reader::load(kl, part(c, i), i & ((1 << shift) - 1), d0);
  }
  __device__ raw_slice load_v(const ctx_t& c, int t, int d0) const {
    if (c.seg == 0) return load_row_slice(c.s.sink_v + static_cast<long long>(t) * D + d0);
    if (c.seg == 2) return load_row_slice(c.s.res_v + static_cast<long long>(t - c.s.n_sink - c.s.n_quant) * D + d0);
    const int i = t - c.s.n_sink;
    return VC::reader::load(vl, part(c, i) + v_offset, i & ((1 << shift) - 1), d0);
  }
  __device__ void cvt_k(const ctx_t& c, const raw_slice& r, int t, int d0, float (&x)[vec]) const {
    if (c.seg != 1) {
      raw_to_float<Fp>(r, x);
    } else {
      const int i = t - c.s.n_sink;
      KC::reader::cvt(kl, r, part(c, i), i & ((1 << shift) - 1), d0, x);
    }
    if (pre_rope) {  // uniform over the block: every lane of the warp shuffles
      const int lx = d0 / vec;
      if (KC::rotates && c.seg == 1) row_to_model(x, D, lx, key_signs(), kl.seed);
      apply_rope(x, d0, c.s.positions[t]);
    }
  }
  __device__ void cvt_v(const ctx_t& c, const raw_slice& r, int t, int d0, float (&x)[vec]) const {
    if (c.seg != 1) {
      raw_to_float<Fp>(r, x);
    } else {
      const int i = t - c.s.n_sink;
      VC::reader::cvt(vl, r, part(c, i) + v_offset, i & ((1 << shift) - 1), d0, x);
    }
  }

  /// cos/sin of pos * inv_freq[k]: the angle in double (as kvc::rope), reduced to [-pi, pi] in
  /// double, then sincosf, so large positions keep their precision.
  __device__ static void angle(double pos, double f, float& c, float& s) {
    const double a = pos * f;
    const double two_pi = 6.283185307179586476925286766559;
    const double r = a - two_pi * rint(a / two_pi);
    sincosf(static_cast<float>(r), &s, &c);
  }
  __device__ void apply_rope(float (&x)[vec], int d0, int pos) const {
    if (interleaved) {
#pragma unroll
      for (int i = 0; i < vec; i += 2) {
        const int d = d0 + i;
        if (d >= rot) continue;
        float c, s;
        angle(pos, inv_freq[d / 2], c, s);
        const float x0 = x[i], x1 = x[i + 1];
        x[i] = x0 * c - x1 * s;
        x[i + 1] = x0 * s + x1 * c;
      }
    } else {
      const int half = rot / 2, delta = half / vec;  // half is a multiple of 8: checked on the host
      const int lane = threadIdx.x % 32;
      const int src = d0 < half ? lane + delta : d0 < rot ? lane - delta : lane;
#pragma unroll
      for (int i = 0; i < vec; ++i) {
        const float other = __shfl_sync(0xffffffffu, x[i], src);
        const int d = d0 + i;
        if (d < half) {
          float c, s;
          angle(pos, inv_freq[d], c, s);
          x[i] = x[i] * c - other * s;
        } else if (d < rot) {
          float c, s;
          angle(pos, inv_freq[d - half], c, s);
          x[i] = other * s + x[i] * c;
        }
      }
    }
  }
};

}  // namespace detail

/// One layer of a batch of quantized streams resident on the device (stream s = seq * hkv + h).
template <class KQ, class VQ, class Fp = half>
struct quant_layer_desc {
  const std::byte* quant_base = nullptr;  ///< device quant page pool
  long long page_bytes = 0;               ///< quant page stride in bytes
  long long v_offset = 0;                 ///< V records' offset inside a page
  std::int32_t page_size = 0;
  std::int32_t head_dim = 0;
  std::int32_t num_kv_heads = 0;
  KQ kq{};
  VQ vq{};
  const quant_stream_desc<Fp>* streams = nullptr;  ///< [streams] on the device
  std::vector<quant_stream_desc<Fp>> host_streams;  ///< the same, on the host (lengths for the plan)
  const rope* pre_rope = nullptr;                   ///< non-null: keys are stored before RoPE
  const double* inv_freq = nullptr;                 ///< device [rotary_dim / 2] when pre_rope
};

/// Decode attention over a quantized layer on the device.
/// \param q    [streams * G][D] device queries (model domain, RoPE applied)
/// \param out  [streams * G][D] device output (model domain)
template <class KQ, class VQ, class Fp>
void decode_attention_quant(const quant_layer_desc<KQ, VQ, Fp>& L, const float* q, std::int32_t num_q_heads,
                            float* out, const device_decode_options& opt = {}) {
  using KC = detail::device_codec<KQ, quant::role::key>;
  using VC = detail::device_codec<VQ, quant::role::value>;
  const std::int32_t D = L.head_dim, hkv = L.num_kv_heads;
  KVC_EXPECTS(detail::supported_head_dim(D), "head_dim = ", D, ", expected 64, 128 or 256");
  KVC_EXPECTS(KC::fits(D) && VC::fits(D), "head_dim = ", D, ": the codecs' groups must be multiples of 8 channels");
  KVC_EXPECTS(hkv > 0 && num_q_heads > 0 && num_q_heads % hkv == 0, "num_q_heads = ", num_q_heads,
              ", expected a positive multiple of num_kv_heads = ", hkv);
  KVC_EXPECTS(L.host_streams.size() % static_cast<std::size_t>(hkv) == 0, "streams = ", L.host_streams.size(),
              ", expected a multiple of num_kv_heads = ", hkv);
  KVC_EXPECTS(L.streams != nullptr || L.host_streams.empty(), "quant_layer_desc.streams is null");
  detail::quant_source<KQ, VQ, Fp> src;
  src.qbase = L.quant_base;
  src.page_bytes = L.page_bytes;
  src.v_offset = L.v_offset;
  src.shift = splitk::page_shift(L.page_size, "kvc::cuda::decode_attention_quant");
  src.D = D;
  src.kl = KC::layout(L.kq, D);
  src.vl = VC::layout(L.vq, D);
  src.streams = L.streams;
  src.pre_rope = L.pre_rope != nullptr;
  src.interleaved = false;
  src.rot = D;
  src.inv_freq = L.inv_freq;
  if (L.pre_rope) {
    const rope_config& rc = L.pre_rope->config();
    src.interleaved = rc.style == rope_style::interleaved;
    src.rot = rc.rotary_dim;
    KVC_EXPECTS(L.inv_freq != nullptr, "quant_layer_desc.inv_freq is null with pre-RoPE keys");
    KVC_EXPECTS(src.interleaved || (rc.rotary_dim / 2) % detail::vec == 0, "rotary_dim = ", rc.rotary_dim,
                ", expected a multiple of 16 for rotate-half RoPE in the CUDA kernel");
  }
  const std::size_t n = L.host_streams.size();
  std::vector<std::int32_t> lengths(n), segs(3 * n);
  for (std::size_t s = 0; s < n; ++s) {
    const auto& st = L.host_streams[s];
    segs[3 * s] = st.n_sink, segs[3 * s + 1] = st.n_quant, segs[3 * s + 2] = st.n_res;
    lengths[s] = st.n_sink + st.n_quant + st.n_res;
  }
  detail::launch_decode(src, lengths.data(), static_cast<std::int32_t>(n), num_q_heads / hkv, D, q, out, opt,
                        segs.data(), 3);
}

/// A device copy of one layer of a host kvc::quant_cache for a batch of sequences: the three page
/// pools (up to the highest page any listed stream uses), every stream's page table and positions,
/// and the RoPE frequencies for pre-RoPE keys. Build it after the host cache changes; `desc()`
/// feeds decode_attention_quant.
template <class KQ, class VQ, class Fp>
class device_quant_layer {
 public:
  device_quant_layer(const quant_cache<KQ, VQ, Fp>& c, const std::vector<seq_id>& seqs, std::int32_t layer,
                     cudaStream_t stream = nullptr) {
    const auto& cfg = c.config();
    const std::int32_t H = cfg.num_kv_heads, D = cfg.head_dim;
    desc_.page_size = cfg.page_size;
    desc_.head_dim = D;
    desc_.num_kv_heads = H;
    desc_.kq = c.key_quantizer();
    desc_.vq = c.value_quantizer();
    std::vector<quant_stream_view<Fp>> views;
    std::int32_t max_page = -1;
    for (seq_id s : seqs)
      for (std::int32_t h = 0; h < H; ++h) {
        views.push_back(c.view(s, layer, h));
        const auto& v = views.back();
        for (std::int32_t p = 0; p < (v.n_quant + cfg.page_size - 1) / cfg.page_size; ++p)
          max_page = v.pages[p] > max_page ? v.pages[p] : max_page;
      }
    const auto& qp = c.quant_pool();
    desc_.page_bytes = static_cast<long long>(qp.page_bytes());
    desc_.v_offset = views.empty() ? 0 : static_cast<long long>(views[0].v_offset);
    qpool_.upload(qp.base(), static_cast<std::size_t>(max_page + 1) * qp.page_bytes(), stream);
    desc_.quant_base = qpool_.data();
    const std::byte* rbase = c.residual_pool() ? c.residual_pool()->base() : nullptr;
    const std::byte* sbase = c.sink_pool() ? c.sink_pool()->base() : nullptr;
    if (rbase) rpool_.upload(rbase, c.residual_pool()->page_bytes() * static_cast<std::size_t>(c.residual_pool()->capacity()), stream);
    if (sbase) spool_.upload(sbase, c.sink_pool()->page_bytes() * static_cast<std::size_t>(c.sink_pool()->capacity()), stream);
    // Page tables and positions, one device array each, streams pointing into them.
    std::vector<std::int32_t> tables, positions;
    std::vector<std::size_t> toff, poff;
    for (const auto& v : views) {
      toff.push_back(tables.size());
      tables.insert(tables.end(), v.pages, v.pages + (v.n_quant + cfg.page_size - 1) / cfg.page_size);
      poff.push_back(positions.size());
      positions.insert(positions.end(), v.positions, v.positions + v.length());
    }
    tables_.upload(tables, stream);
    positions_.upload(positions, stream);
    auto move = [](const Fp* p, const std::byte* hb, const device_buffer<std::byte>& db) -> const Fp* {
      if (!p) return nullptr;
      return reinterpret_cast<const Fp*>(db.data() + (reinterpret_cast<const std::byte*>(p) - hb));
    };
    for (std::size_t i = 0; i < views.size(); ++i) {
      const auto& v = views[i];
      quant_stream_desc<Fp> d;
      d.pages = tables_.data() + toff[i];
      d.sink_k = move(v.sink_k, sbase, spool_);
      d.sink_v = move(v.sink_v, sbase, spool_);
      d.res_k = move(v.res_k, rbase, rpool_);
      d.res_v = move(v.res_v, rbase, rpool_);
      d.positions = positions_.data() + poff[i];
      d.n_sink = v.n_sink, d.n_quant = v.n_quant, d.n_res = v.n_res;
      desc_.host_streams.push_back(d);
    }
    streams_.upload(desc_.host_streams, stream);
    desc_.streams = streams_.data();
    if (const rope* rp = c.pre_rope()) {
      std::vector<double> f(static_cast<std::size_t>(rp->config().rotary_dim / 2));
      for (std::size_t i = 0; i < f.size(); ++i) f[i] = rp->inv_freq(static_cast<std::int32_t>(i));
      inv_freq_.upload(f, stream);
      desc_.pre_rope = rp;
      desc_.inv_freq = inv_freq_.data();
    }
    KVC_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  const quant_layer_desc<KQ, VQ, Fp>& desc() const noexcept { return desc_; }

 private:
  device_buffer<std::byte> qpool_, rpool_, spool_;
  device_buffer<std::int32_t> tables_, positions_;
  device_buffer<quant_stream_desc<Fp>> streams_;
  device_buffer<double> inv_freq_;
  quant_layer_desc<KQ, VQ, Fp> desc_;
};

}  // namespace cuda
KVC_END_NAMESPACE
