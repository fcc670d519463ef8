// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// StreamingLLM as a layout: `sink` attention-sink slots followed by a ring of `window` slots.
/// The logical view shows the sinks, then the most recent tokens in order, with no copies when
/// the ring wraps (the idea of TensorRT-LLM's cyclic KV cache).
/// \par Reference
/// Xiao et al., "Efficient Streaming Language Models with Attention Sinks", arXiv:2309.17453.

#include <kvc/config.hpp>
#include <kvc/view/layout_common.hpp>

KVC_BEGIN_NAMESPACE

/// Physical storage: [sink + window slots][head][dim]. Token g (0-based, in arrival order) lives
/// in slot g if g < sink, else in slot sink + (g - sink) % window.
struct layout_sink_window {
  template <class Extents>
  class mapping {
    static_assert(Extents::rank() == 3, "kvc::layout_sink_window: KV views are rank 3 (token, head, dim)");

   public:
    using extents_type = Extents;
    using index_type = typename Extents::index_type;
    using size_type = typename Extents::size_type;
    using rank_type = typename Extents::rank_type;
    using offset_type = ::kvc::offset_type;
    using layout_type = layout_sink_window;
    static constexpr bool dim_contiguous = true;

    mapping() = default;
    /// \param e     (visible tokens = min(seen, sink + window), heads, dim)
    /// \param sink  number of sink slots
    /// \param window ring slots, > 0
    /// \param seen  tokens written so far in arrival order
    KVC_HOST_DEVICE constexpr mapping(const Extents& e, index_type sink, index_type window, index_type seen) noexcept
        : ext_(e), sink_(sink), window_(window), seen_(seen) {}

    KVC_HOST_DEVICE constexpr const extents_type& extents() const noexcept { return ext_; }
    KVC_HOST_DEVICE constexpr index_type sink() const noexcept { return sink_; }
    KVC_HOST_DEVICE constexpr index_type window() const noexcept { return window_; }
    KVC_HOST_DEVICE constexpr index_type seen() const noexcept { return seen_; }

    /// Arrival index of the t-th visible token (what RoPE positions are derived from).
    KVC_HOST_DEVICE constexpr index_type arrival(index_type t) const noexcept {
      return t < sink_ ? t : seen_ - (ext_.extent(0) - t);
    }
    KVC_HOST_DEVICE constexpr index_type slot(index_type t) const noexcept {
      if (t < sink_) return t;
      return sink_ + (arrival(t) - sink_) % window_;
    }
    KVC_HOST_DEVICE constexpr offset_type operator()(index_type t, index_type h, index_type d) const noexcept {
      return (offset_type{slot(t)} * ext_.extent(1) + h) * ext_.extent(2) + d;
    }
    /// Runs stop at the end of the sinks and where the ring wraps.
    KVC_HOST_DEVICE constexpr row_run<index_type> run(index_type t, index_type h) const noexcept {
      const index_type s = slot(t);
      index_type len = t < sink_ ? sink_ - t : sink_ + window_ - s;
      if (len > ext_.extent(0) - t) len = ext_.extent(0) - t;
      return {(offset_type{s} * ext_.extent(1) + h) * ext_.extent(2), len, ext_.extent(1) * ext_.extent(2)};
    }
    KVC_HOST_DEVICE constexpr offset_type required_span_size() const noexcept {
      return (offset_type{sink_} + window_) * ext_.extent(1) * ext_.extent(2);
    }
    static constexpr bool is_always_unique() noexcept { return true; }
    static constexpr bool is_always_exhaustive() noexcept { return false; }
    static constexpr bool is_always_strided() noexcept { return false; }
    static constexpr bool is_unique() noexcept { return true; }
    static constexpr bool is_exhaustive() noexcept { return false; }
    static constexpr bool is_strided() noexcept { return false; }
    KVC_HOST_DEVICE friend constexpr bool operator==(const mapping& a, const mapping& b) noexcept {
      return a.ext_ == b.ext_ && a.sink_ == b.sink_ && a.window_ == b.window_ && a.seen_ == b.seen_;
    }

   private:
    Extents ext_{};
    index_type sink_ = 0, window_ = 1, seen_ = 0;
  };
};

KVC_END_NAMESPACE
