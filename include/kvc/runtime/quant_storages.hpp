// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Registers the quantized storages with the runtime builder, so specs can name them:
///
///   int8 | int8(scheme=asym) | int4 | int2                 per token and head
///   int8(fast=1) | int4(fast=1) | int2(fast=1)            + the approximate integer decode path,
///                                                         cpu::quant_attention_options::fast()
///                                                         (head_dim a multiple of 256 / bits)
///   fp8(format=e4m3|e5m2)                                 per token-head scale
///   kivi(bits=2|3|4|8, kbits=, vbits=, residual=128)      KIVI, group 32; K4V2/K2V4 via kbits/vbits;
///                                                         K3V4/K4V3 with group=64 (the 3-bit side);
///   kivi(bits=3, group=64)                                3-bit KIVI over groups of 64 (3.5 bits per element
///                                                         with the scales; 4.6x fewer than fp16 before
///                                                         the fp16 residual window)
///   kivi(bits=4, group=64)                                4-bit KIVI over groups of 64 (4.5 bits per element,
///                                                         3.6x fewer than fp16 before the window)
///   nuq(bits=2|3, group=32|64, residual=128)              KVQuant's non-uniform key levels, fitted per
///                                                         key group, on KIVI's layout (values as KIVI's);
///                                                         group 64 with bits = 3 only
///   rotated(bits=2|4)                                     Hadamard-rotated int2/int4
///   outliers(bits=2|4, fraction=0.01)                     KVQuant dense-and-sparse int2/int4
///   gear(bits=4|2, rank=4, outliers=0.02)                 GEAR, records of 32 tokens
///   every one also takes sinks=N (first N tokens kept in fp16) and pre_rope=1 (KVQuant's
///   pre-RoPE keys; needs storage_options::rope, and the caller appends un-rotated keys), and
///   fast=0 (the default: exact attention); fast=1 is refused where fast() would not apply: other
///   codecs, pre_rope=1, or a head_dim the integer kernels do not take
///   mikv(hbits=8|4, lbits=4|2, high_ratio=0.2, recent_ratio=0.5, sinks=, pre_rope=)   MiKV mixed
///   precision, registered by runtime/mikv_storage.hpp (high_ratio: the fraction kept high; no fast=)
///
/// Each combination is one template instantiation, so the set is finite; the library itself
/// takes any combination at compile time (kvc::quant_cache<KQ, VQ>).
///
/// The builders and the registration are per ISA (docs/isa.md): register_quant_storages() (end of
/// this header) registers the storages in the registry of the calling TU's ISA configuration
/// (runtime/make_cache.hpp). Including the header registers nothing.

#include <memory>
#include <numeric>
#include <string>

#include <kvc/cpu/quant_attention.hpp>
#include <kvc/quant/fp8.hpp>
#include <kvc/quant/gear.hpp>
#include <kvc/quant/int8.hpp>
#include <kvc/quant/kivi.hpp>
#include <kvc/quant/nuq.hpp>
#include <kvc/quant/outliers.hpp>
#include <kvc/quant/rotated.hpp>
#include <kvc/runtime/make_cache.hpp>
#include <kvc/store/quant_cache.hpp>

KVC_BEGIN_NAMESPACE
namespace runtime {
namespace detail {

/// The harness's page size is rounded up to a multiple of the codecs' encoding unit (KIVI keys and
/// GEAR records hold 32 tokens), keeping the same pool bytes; config() reports what was used.
/// The arguments every quantized storage takes: sinks=N (first N tokens kept in fp16),
/// pre_rope=0|1 (keys stored before RoPE, rotated on the fly with the caller's RoPE) and fast=0|1
/// (attention through cpu::quant_attention_options::fast()).
struct quant_extras {
  int sinks = 0;
  bool pre_rope = false;
  bool fast = false;
  rope_config rope{};
};

/// `fast_bits`: the bit width of a per-token integer codec with one scale per token and head (the
/// codecs fast() reads as integers), 0 for the others. fast=1 is refused wherever fast() would
/// silently run the exact path instead (attend_generic's and intdot_ok's conditions), so a spec
/// that asks for the fast path gets it: pre-RoPE keys are rotated per tile and take the exact
/// path, and the integer kernels take rows of whole 32-byte blocks (head_dim * bits a multiple of
/// 256). Groups of more than 4 query heads per kv head still run exact; the group is only known
/// at the call.
inline quant_extras read_extras(spec_args& a, const storage_options& o, int fast_bits = 0) {
  quant_extras x;
  x.sinks = a.integer("sinks", 0);
  if (x.sinks < 0)
    kvc::detail::fail(kvc::detail::concat("kvc::runtime::make_cache: '", a.stage().text, "': sinks = ", x.sinks, ", expected >= 0"));
  const int pr = a.integer("pre_rope", 0);
  if (pr != 0 && pr != 1)
    kvc::detail::fail(kvc::detail::concat("kvc::runtime::make_cache: '", a.stage().text, "': pre_rope = ", pr, ", expected 0 or 1"));
  if (pr == 1 && !o.rope)
    kvc::detail::fail(kvc::detail::concat("kvc::runtime::make_cache: '", a.stage().text,
                                          "': pre_rope = 1, expected the model's RoPE in storage_options::rope"));
  x.pre_rope = pr == 1;
  if (x.pre_rope) x.rope = *o.rope;
  const int fast = a.integer("fast", 0);
  const auto bad_fast = [&](const char* expected) {
    kvc::detail::fail(kvc::detail::concat("kvc::runtime::make_cache: '", a.stage().text, "': fast = ", fast, ", expected ", expected));
  };
  if (fast_bits == 0 && fast != 0)
    bad_fast("0: the integer decode path (cpu::quant_attention_options::fast()) reads only int8, int4 and int2");
  if (fast != 0 && fast != 1) bad_fast("0 (exact attention) or 1 (cpu::quant_attention_options::fast())");
  x.fast = fast == 1;
  return x;
}

/// The checks of fast=1 that need the cache's shape (see read_extras).
inline void check_fast(const spec_stage& st, const quant_extras& x, int fast_bits, const cache_config& c) {
  if (!x.fast) return;
  if (x.pre_rope)
    kvc::detail::fail(kvc::detail::concat("kvc::runtime::make_cache: '", st.text,
                                          "': fast = 1 with pre_rope = 1, expected fast = 0: pre-RoPE keys are "
                                          "rotated per tile and take the exact path"));
  const int block = 256 / fast_bits;
  if (c.head_dim % block != 0)
    kvc::detail::fail(kvc::detail::concat("kvc::runtime::make_cache: '", st.text, "': fast = 1 with head_dim = ", c.head_dim,
                                          ", expected head_dim a multiple of ", block, " for ", fast_bits,
                                          "-bit codes (the integer kernels read rows of whole 32-byte blocks)"));
}

[[noreturn]] inline void unsupported(const spec_stage& st, const std::string& what, const std::string& expected) {
  kvc::detail::fail(kvc::detail::concat("kvc::runtime::make_cache: '", st.text, "': ", what, ", expected ", expected));
}

template <class KQ, class VQ>
quant_cache_config quant_config(const cache_config& c, const quant_extras& x) {
  quant_cache_config q;
  static_cast<cache_config&>(q) = c;
  const int unit = std::lcm(KQ::tokens_per_record(quant::role::key), VQ::tokens_per_record(quant::role::value));
  const std::int32_t old_page = q.page_size;
  while (q.page_size % unit != 0) q.page_size *= 2;  // a power of two times two stays one
  q.max_pages = static_cast<std::int32_t>(static_cast<std::int64_t>(q.max_pages) * old_page / q.page_size + 1);
  q.sink_tokens = x.sinks;
  q.pre_rope = x.pre_rope;
  q.rope = x.rope;
  q.max_fp_pages = c.max_pages;  // at most one residual and one sink page per stream
  return q;
}

// ---- per ISA (docs/isa.md): the attention functors call the kernels, the builders make adapters ----
KVC_BEGIN_ISA_NAMESPACE

/// Binds to the quant_cache overload of decode_attention, declared above (see cpu_attention).
/// cache_adapter constructs its Attend per call, so the options are part of the type.
template <bool Fast>
struct quant_attention_with {
  template <class Cache>
  void operator()(const Cache& c, seq_id s, std::int32_t layer, const float* q, std::int32_t num_q_heads, float* out,
                  const decode_options& opt) const {
    kvc::cpu::decode_attention(c, s, layer, q, num_q_heads, out, opt,
                               Fast ? kvc::cpu::quant_attention_options::fast() : kvc::cpu::quant_attention_options{});
  }
};
using quant_attention = quant_attention_with<false>;

template <class KQ, class VQ, class Attend = quant_attention>
std::unique_ptr<any_cache> make_quant(const std::string& name, const cache_config& c, const quant_extras& x,
                                      KQ kq = KQ{}, VQ vq = VQ{}) {
  return std::make_unique<cache_adapter<quant_cache<KQ, VQ>, Attend>>(name, quant_config<KQ, VQ>(c, x), kq, vq);
}

/// A per-token integer storage, with the fast attention when fast=1 asked for it.
template <class Q>
std::unique_ptr<any_cache> make_int_quant(const spec_stage& st, const cache_config& c, const quant_extras& x) {
  check_fast(st, x, Q::bits, c);
  if (x.fast) return make_quant<Q, Q, quant_attention_with<true>>(st.text, c, x);
  return make_quant<Q, Q>(st.text, c, x);
}

KVC_END_ISA_NAMESPACE
}  // namespace detail

KVC_BEGIN_ISA_NAMESPACE
/// Only `int8` (scheme=sym|asym, fast=): 2 cache types (see register_quant_storages).
template <class Deferred = void>
void register_int8_storage() {
  using namespace detail;  // the builders' helpers
  auto& r = registered_storages();
  r["int8"] = [](const spec_stage& st, const cache_config& c, const storage_options& o) -> std::unique_ptr<any_cache> {
    spec_args a(st, "kvc::runtime::make_cache");
    const std::string sch = a.word("scheme", "sym");
    const quant_extras x = read_extras(a, o, 8);
    a.finish("scheme, sinks, pre_rope, fast");
    if (sch == "sym") return make_int_quant<quant::int8>(st, c, x);
    if (sch == "asym") return make_int_quant<quant::int8_asym>(st, c, x);
    unsupported(st, "scheme = " + sch, "sym or asym");
  };
}

/// Only `int4` (see register_quant_storages).
template <class Deferred = void>
void register_int4_storage() {
  using namespace detail;  // the builders' helpers
  auto& r = registered_storages();
  r["int4"] = [](const spec_stage& st, const cache_config& c, const storage_options& o) -> std::unique_ptr<any_cache> {
    spec_args a(st, "kvc::runtime::make_cache");
    const quant_extras x = read_extras(a, o, 4);
    a.finish("sinks, pre_rope, fast");
    return make_int_quant<quant::int4>(st, c, x);
  };
}

/// Only `int2` (see register_quant_storages).
template <class Deferred = void>
void register_int2_storage() {
  using namespace detail;  // the builders' helpers
  auto& r = registered_storages();
  r["int2"] = [](const spec_stage& st, const cache_config& c, const storage_options& o) -> std::unique_ptr<any_cache> {
    spec_args a(st, "kvc::runtime::make_cache");
    const quant_extras x = read_extras(a, o, 2);
    a.finish("sinks, pre_rope, fast");
    return make_int_quant<quant::int2>(st, c, x);
  };
}

/// Only `fp8` (format=e4m3|e5m2): 2 cache types (see register_quant_storages).
template <class Deferred = void>
void register_fp8_storage() {
  using namespace detail;  // the builders' helpers
  auto& r = registered_storages();
  r["fp8"] = [](const spec_stage& st, const cache_config& c, const storage_options& o) -> std::unique_ptr<any_cache> {
    spec_args a(st, "kvc::runtime::make_cache");
    const std::string f = a.word("format", "e4m3");
    const quant_extras x = read_extras(a, o);
    a.finish("format, sinks, pre_rope, fast");
    if (f == "e4m3") return make_quant<quant::fp8<fp8_e4m3>, quant::fp8<fp8_e4m3>>(st.text, c, x);
    if (f == "e5m2") return make_quant<quant::fp8<fp8_e5m2>, quant::fp8<fp8_e5m2>>(st.text, c, x);
    unsupported(st, "format = " + f, "e4m3 or e5m2");
  };
}

/// Only `kivi`: 10 cache types (bits 2/2, 3/3, 4/4, 8/8, 4/2, 2/4; 3/3 and 4/4 also with group 64;
/// 3/4 and 4/3 with group 64 on the 3-bit side) (see
/// register_quant_storages).
template <class Deferred = void>
void register_kivi_storage() {
  using namespace detail;  // the builders' helpers
  auto& r = registered_storages();
  r["kivi"] = [](const spec_stage& st, const cache_config& c, const storage_options& o) -> std::unique_ptr<any_cache> {
    spec_args a(st, "kvc::runtime::make_cache");
    const int bits = a.integer("bits", 2);
    const int kb = a.integer("kbits", bits), vb = a.integer("vbits", bits);
    const int group = a.integer("group", 32);
    const int res = a.integer("residual", 128);
    const quant_extras x = read_extras(a, o);
    a.finish("bits, kbits, vbits, group, residual, sinks, pre_rope, fast");
    const bool three = kb == 3 && vb == 3;
    // group = 64 applies to 3/3, 4/4 and the 3-bit side of 3/4 and 4/3. Groups of 64 are what makes
    // 3 bits pay (3.5 bits per element with the binary16 scale and zero); 4/4 over 64 is 4.5 bits
    // instead of 5: at 4k no perplexity cost measured, but 4 of the 21 needles groups of 32 find
    // are lost (docs/results.md, "4-bit KIVI in groups of 64").
    const bool four64 = kb == 4 && vb == 4 && group == 64;
    if (group != 32 && !(group == 64 && (kb == 3 || vb == 3)) && !four64)
      unsupported(st, "group = " + std::to_string(group),
                  "32, or 64 with bits = 3, bits = 4 or a 3-bit side (other groups: kvc::quant::kivi<Bits, Group> in C++)");
    auto mk = [&](auto kq, auto vq) -> std::unique_ptr<any_cache> {
      kq.residual_tokens = res;
      vq.residual_tokens = res;
      return make_quant<decltype(kq), decltype(vq)>(st.text, c, x, kq, vq);
    };
    if (kb == 2 && vb == 2) return mk(quant::kivi<2>{}, quant::kivi<2>{});
    if (three && group == 64) return mk(quant::kivi<3, 64>{}, quant::kivi<3, 64>{});
    if (three) return mk(quant::kivi<3>{}, quant::kivi<3>{});
    if (four64) return mk(quant::kivi<4, 64>{}, quant::kivi<4, 64>{});
    if (kb == 4 && vb == 4) return mk(quant::kivi<4>{}, quant::kivi<4>{});
    if (kb == 8 && vb == 8) return mk(quant::kivi<8>{}, quant::kivi<8>{});
    if (kb == 4 && vb == 2) return mk(quant::kivi<4>{}, quant::kivi<2>{});
    if (kb == 2 && vb == 4) return mk(quant::kivi<2>{}, quant::kivi<4>{});
    // K3V4 and K4V3 tell keys from values at 3 bits (docs/results.md, "What the early needles
    // need"); the 3-bit side takes group = 64, the 4-bit side keeps 32.
    if (kb == 3 && vb == 4 && group == 64) return mk(quant::kivi<3, 64>{}, quant::kivi<4>{});
    if (kb == 4 && vb == 3 && group == 64) return mk(quant::kivi<4>{}, quant::kivi<3, 64>{});
    unsupported(st, "kbits = " + std::to_string(kb) + ", vbits = " + std::to_string(vb) +
                        (kb + vb == 7 ? ", group = " + std::to_string(group) : std::string()),
                "2/2, 3/3, 4/4, 8/8, 4/2, 2/4, or 3/4 and 4/3 with group = 64 (any pair: "
                "kvc::quant_cache<kivi<K>, kivi<V>> in C++)");
  };
}

/// Only `nuq` (bits=2|3, group=32|64, residual=): 3 cache types (2 bits over groups of 32, 3 bits
/// over groups of 32 or 64) (see register_quant_storages).
template <class Deferred = void>
void register_nuq_storage() {
  using namespace detail;  // the builders' helpers
  auto& r = registered_storages();
  r["nuq"] = [](const spec_stage& st, const cache_config& c, const storage_options& o) -> std::unique_ptr<any_cache> {
    spec_args a(st, "kvc::runtime::make_cache");
    const int bits = a.integer("bits", 3);
    const int group = a.integer("group", 32);
    const int res = a.integer("residual", 128);
    const quant_extras x = read_extras(a, o);
    a.finish("bits, group, residual, sinks, pre_rope, fast");
    auto mk = [&](auto q) -> std::unique_ptr<any_cache> {
      q.residual_tokens = res;
      return make_quant<decltype(q), decltype(q)>(st.text, c, x, q, q);
    };
    if (bits != 2 && bits != 3) unsupported(st, "bits = " + std::to_string(bits), "2 or 3 (other widths: kvc::quant::nuq<Bits, Group> in C++)");
    if (group != 32 && !(bits == 3 && group == 64))
      unsupported(st, "group = " + std::to_string(group), "32, or 64 with bits = 3 (other groups: kvc::quant::nuq<Bits, Group> in C++)");
    if (bits == 2) return mk(quant::nuq<2>{});
    if (group == 64) return mk(quant::nuq<3, 64>{});
    return mk(quant::nuq<3>{});
  };
}

/// Only `rotated` (bits=2|4): 2 cache types (see register_quant_storages).
template <class Deferred = void>
void register_rotated_storage() {
  using namespace detail;  // the builders' helpers
  auto& r = registered_storages();
  r["rotated"] = [](const spec_stage& st, const cache_config& c, const storage_options& o) -> std::unique_ptr<any_cache> {
    spec_args a(st, "kvc::runtime::make_cache");
    const int bits = a.integer("bits", 2);
    const quant_extras x = read_extras(a, o);
    a.finish("bits, sinks, pre_rope, fast");
    if (bits == 2) return make_quant<quant::rotated<quant::int2>, quant::rotated<quant::int2>>(st.text, c, x);
    if (bits == 4) return make_quant<quant::rotated<quant::int4>, quant::rotated<quant::int4>>(st.text, c, x);
    unsupported(st, "bits = " + std::to_string(bits), "2 or 4");
  };
}

/// Only `outliers` (bits=2|4): 2 cache types (see register_quant_storages).
template <class Deferred = void>
void register_outliers_storage() {
  using namespace detail;  // the builders' helpers
  auto& r = registered_storages();
  r["outliers"] = [](const spec_stage& st, const cache_config& c, const storage_options& o) -> std::unique_ptr<any_cache> {
    spec_args a(st, "kvc::runtime::make_cache");
    const int bits = a.integer("bits", 2);
    const float frac = static_cast<float>(a.number("fraction", 0.01));
    const quant_extras x = read_extras(a, o);
    a.finish("bits, fraction, sinks, pre_rope, fast");
    if (bits == 2)
      return make_quant<quant::outliers<quant::int2>, quant::outliers<quant::int2>>(
          st.text, c, x, quant::outliers<quant::int2>(frac), quant::outliers<quant::int2>(frac));
    if (bits == 4)
      return make_quant<quant::outliers<quant::int4>, quant::outliers<quant::int4>>(
          st.text, c, x, quant::outliers<quant::int4>(frac), quant::outliers<quant::int4>(frac));
    unsupported(st, "bits = " + std::to_string(bits), "2 or 4");
  };
}

/// Only `gear` (bits=2|4): 2 cache types (see register_quant_storages).
template <class Deferred = void>
void register_gear_storage() {
  using namespace detail;  // the builders' helpers
  auto& r = registered_storages();
  r["gear"] = [](const spec_stage& st, const cache_config& c, const storage_options& o) -> std::unique_ptr<any_cache> {
    spec_args a(st, "kvc::runtime::make_cache");
    const int bits = a.integer("bits", 4);
    const int rank = a.integer("rank", 4);
    const float frac = static_cast<float>(a.number("outliers", 0.02));
    const quant_extras x = read_extras(a, o);
    a.finish("bits, rank, outliers, sinks, pre_rope, fast");
    if (bits == 4) return make_quant<quant::gear<4>, quant::gear<4>>(st.text, c, x, quant::gear<4>(rank, frac),
                                                                     quant::gear<4>(rank, frac));
    if (bits == 2) return make_quant<quant::gear<2>, quant::gear<2>>(st.text, c, x, quant::gear<2>(rank, frac),
                                                                     quant::gear<2>(rank, frac));
    unsupported(st, "bits = " + std::to_string(bits), "2 or 4");
  };
}

/// Registers the quantized storages (`int8`, `int4`, `int2`, `fp8`, `kivi`, `nuq`, `rotated`,
/// `outliers`, `gear`) in the storage registry of this TU's ISA configuration (runtime/make_cache.hpp), so
/// make_cache builds them by spec. Including this header registers nothing (no static
/// initialisation): call this before the first make_cache that names one, from a TU built with the
/// -m flags of those calls (docs/isa.md); calling it again sets the same builders. A template only
/// so that a TU that includes the header and does not call it instantiates no cache.
///
/// The call compiles all 25 quantized cache types with their kernels, over a CPU-minute of GCC 12
/// -O2 (docs/design.md, "Register by a call"). A program registers only the storages it offers
/// with the calls above, one per storage name, or spreads them over TUs that build side by side
/// (examples/llama/register_int.cpp and register_kivi.cpp, ~55 s each).
template <class Deferred = void>
void register_quant_storages() {
  register_int8_storage<Deferred>();
  register_int4_storage<Deferred>();
  register_int2_storage<Deferred>();
  register_fp8_storage<Deferred>();
  register_kivi_storage<Deferred>();
  register_nuq_storage<Deferred>();
  register_rotated_storage<Deferred>();
  register_outliers_storage<Deferred>();
  register_gear_storage<Deferred>();
}
KVC_END_ISA_NAMESPACE

}  // namespace runtime
KVC_END_NAMESPACE
