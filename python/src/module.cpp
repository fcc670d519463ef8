// SPDX-License-Identifier: Apache-2.0
/// \file
/// The `kvc._kvc` extension: session_cache for Python. Every array is checked (dtype, shape,
/// device, contiguity) before the cache is touched, so a rejected call changes nothing; calls that
/// run kernels or copy K/V release the GIL; kvc::error becomes kvc.Error with kvc's message.

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "session_cache.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using kvc_python::phase;
using kvc_python::session_cache;

/// Any array nanobind can read: numpy, the buffer protocol, DLPack. No constraint here, so that a
/// wrong dtype or shape reaches check() and gets kvc's message rather than an overload mismatch.
using in_array = nb::ndarray<nb::ro>;

std::string dtype_name(nb::dlpack::dtype t) {
  const char* kind = "?";
  switch (static_cast<nb::dlpack::dtype_code>(t.code)) {
    case nb::dlpack::dtype_code::Int: kind = "int"; break;
    case nb::dlpack::dtype_code::UInt: kind = "uint"; break;
    case nb::dlpack::dtype_code::Float: kind = "float"; break;
    case nb::dlpack::dtype_code::Bfloat: kind = "bfloat"; break;
    case nb::dlpack::dtype_code::Complex: kind = "complex"; break;
    case nb::dlpack::dtype_code::Bool: return "bool";
    default: return kvc::detail::concat("dlpack type code ", static_cast<int>(t.code), " of ", static_cast<int>(t.bits), " bits");
  }
  return kvc::detail::concat(kind, static_cast<int>(t.bits));
}

std::string shape_text(const in_array& a) {
  std::string s = "(";
  for (std::size_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

/// One expected extent: a name and a value, or value < 0 for "any" (the token count n).
struct dim {
  const char* name;
  std::int64_t value;
};

/// Rejects an array that is not `want` x the given extents, C-contiguous and on the CPU. `who` is
/// the Python call, `arg` the parameter name: every message names both, the value and what was expected.
void check(const char* who, const char* arg, const in_array& a, nb::dlpack::dtype want, const char* want_name,
           std::initializer_list<dim> dims) {
  std::string expected = "(";
  std::size_t i = 0;
  for (const dim& d : dims) {
    expected += i++ ? ", " : "";
    expected += d.value < 0 ? std::string(d.name) : kvc::detail::concat(d.name, "=", d.value);
  }
  expected += dims.size() == 1 ? ",)" : ")";
  if (a.device_type() != nb::device::cpu::value)
    kvc::detail::fail(kvc::detail::concat(who, ": ", arg, " is on device type ", a.device_type(),
                                          ", expected a CPU array"));
  if (a.dtype() != want)
    kvc::detail::fail(kvc::detail::concat(who, ": ", arg, " has dtype ", dtype_name(a.dtype()), ", expected ", want_name));
  if (a.ndim() != dims.size())
    kvc::detail::fail(kvc::detail::concat(who, ": ", arg, " has ", a.ndim(), " dimensions, shape ", shape_text(a),
                                          ", expected ", dims.size(), ": ", expected));
  i = 0;
  for (const dim& d : dims) {
    if (d.value >= 0 && static_cast<std::int64_t>(a.shape(i)) != d.value)
      kvc::detail::fail(kvc::detail::concat(who, ": ", arg, " has shape ", shape_text(a), ", expected ", expected));
    ++i;
  }
  std::int64_t stride = 1;
  bool empty = false;  // an array of no element has no layout to check (numpy may give it any strides)
  for (std::size_t j = 0; j < a.ndim(); ++j) empty = empty || a.shape(j) == 0;
  for (std::size_t j = a.ndim(); !empty && j-- > 0;) {
    if (a.shape(j) > 1 && a.stride(j) != stride)
      kvc::detail::fail(kvc::detail::concat(who, ": ", arg, " of shape ", shape_text(a),
                                            " is not C-contiguous, expected a C-contiguous array "
                                            "(numpy.ascontiguousarray)"));
    stride *= static_cast<std::int64_t>(a.shape(j));
  }
  if (a.ndim() && a.shape(0) > static_cast<std::size_t>(INT32_MAX))
    kvc::detail::fail(kvc::detail::concat(who, ": ", arg, " has ", a.shape(0), " rows, expected at most ", INT32_MAX));
}

const float* floats(const in_array& a) { return static_cast<const float*>(a.data()); }

/// A numpy array that owns `v`.
template <class T>
nb::ndarray<nb::numpy, T> to_numpy(std::vector<T>&& v, std::initializer_list<std::size_t> shape) {
  auto* p = new std::vector<T>(std::move(v));
  nb::capsule owner(p, [](void* q) noexcept { delete static_cast<std::vector<T>*>(q); });
  return nb::ndarray<nb::numpy, T>(p->data(), shape, owner);
}

/// The query window of a compressor phase, checked; null when `queries` is None.
std::optional<kvc::evict::query_window> window_of(const session_cache& c, const char* who,
                                                  const std::optional<in_array>& queries,
                                                  const std::optional<in_array>& query_positions) {
  if (!queries) {
    if (query_positions)
      kvc::detail::fail(kvc::detail::concat(who, ": query_positions given without queries, expected both or neither"));
    return std::nullopt;
  }
  check(who, "queries", *queries, nb::dtype<float>(), "float32",
        {{"n", -1}, {"num_q_heads", c.num_q_heads()}, {"head_dim", c.config().head_dim}});
  kvc::evict::query_window w;
  w.q = floats(*queries);
  w.n = static_cast<std::int32_t>(queries->shape(0));
  w.num_q_heads = c.num_q_heads();
  w.head_dim = c.config().head_dim;
  if (query_positions) {
    check(who, "query_positions", *query_positions, nb::dtype<std::int32_t>(), "int32", {{"n", w.n}});
    w.positions = static_cast<const std::int32_t*>(query_positions->data());
  }
  return w;
}

kvc::evict::compress_report run_phase(session_cache& c, phase ph, const char* who, kvc::seq_id seq,
                                      std::int32_t layer, const std::optional<in_array>& queries,
                                      const std::optional<in_array>& query_positions) {
  const auto w = window_of(c, who, queries, query_positions);
  nb::gil_scoped_release unlocked;
  return c.compress(ph, seq, layer, w ? &*w : nullptr);
}

}  // namespace

namespace kvc_python {
void register_lowrank_storages();  // lowrank_storages.cpp
}

NB_MODULE(_kvc, m) {
  m.doc() = "kvc: KV-cache compression for decoder LLMs (header-only C++17 library), from Python";
  // The storages the module offers by spec, in its baseline ISA configuration (kvc's storage
  // headers register nothing by being included).
  kvc::runtime::register_quant_storages();
  kvc::runtime::register_mikv_storage();
  kvc::runtime::register_quest_storage();
  kvc::runtime::register_merged_storage();
  kvc::runtime::register_layered_storage();
  kvc::runtime::register_minicache_storage();
  kvc_python::register_lowrank_storages();

  // Named after the module as imported (kvc._kvc, or _kvc under stubgen) so that stubgen lists
  // them; kvc/__init__.py presents them as kvc.Error and kvc.OutOfMemory.
  const std::string module_name = nb::cast<std::string>(m.attr("__name__"));
  static PyObject* error_type = PyErr_NewExceptionWithDoc(
      (module_name + ".Error").c_str(), "A kvc precondition failed; the message names the argument, the value and what was expected. "
                   "The call that raised it left the cache as it was.", PyExc_ValueError, nullptr);
  static PyObject* oom_type = PyErr_NewExceptionWithDoc(
      (module_name + ".OutOfMemory").c_str(), "The cache's page pool is exhausted (max_pages); the cache is as it was.",
      error_type, nullptr);
  // Plain PyObject*: kept for the process (a static nb::object would be released after the
  // interpreter is gone).
  if (!error_type || !oom_type) throw nb::python_error();
  m.attr("Error") = nb::handle(error_type);
  m.attr("OutOfMemory") = nb::handle(oom_type);
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const kvc::out_of_memory& e) {
      PyErr_SetString(oom_type, e.what());
    } catch (const kvc::error& e) {
      PyErr_SetString(error_type, e.what());
    }
  });

  m.def("storages", [] { return kvc::runtime::storage_names(); }, "The storage names a spec may use (fp32, fp16, kivi, int4, ...).");
  m.def("policies", [] {
    std::vector<std::string> v;
    for (const auto& kv : kvc::runtime::evictor_registry()) v.push_back(kv.first);
    return v;
  }, "The eviction policy names a spec may use (snapkv, h2o, ...).");
  m.def("isa", [] { return std::string(kvc::cpu::isa_name()); },
        "The instruction-set namespace the module itself was compiled for (its baseline). Caches run the "
        "best configuration this CPU runs: Cache.isa, isa_variants().");
  m.def("isa_variants", [] {
    std::vector<const kvc::runtime::isa_variant*> v;
    for (const auto& e : kvc::runtime::isa_variants())
      if (e.runs_here()) v.push_back(&e);
    std::stable_sort(v.begin(), v.end(), [](auto* a, auto* b) { return a->rank > b->rank; });
    std::vector<std::string> names;
    for (auto* e : v) names.emplace_back(e->name);
    return names;
  }, "The ISA configurations the module carries that this CPU runs, best first: what a Cache picks "
     "(the first) and what the environment variable KVC_ISA may name.");

  nb::class_<kvc::merge::minicache_report>(m, "LayerMergeReport", "What Cache.cross_layer_merge did (MiniCache).")
      .def_ro("merged", &kvc::merge::minicache_report::merged, "tokens merged, summed over layer pairs and kv heads")
      .def_ro("retained", &kvc::merge::minicache_report::retained,
              "tokens of the merged pairs kept unmerged (directions too far apart), summed likewise")
      .def_ro("key_distance_median", &kvc::merge::minicache_report::key_distance_median,
              "median angular distance (0 same direction, 0.5 orthogonal) between the pairs' keys")
      .def_ro("value_distance_median", &kvc::merge::minicache_report::value_distance_median,
              "the same for the values");
  nb::class_<kvc::evict::compress_report>(m, "CompressReport", "What one compressor call did to one layer.")
      .def_ro("compressed", &kvc::evict::compress_report::compressed)
      .def_ro("tokens_before", &kvc::evict::compress_report::tokens_before, "tokens of the layer's streams, summed")
      .def_ro("tokens_after", &kvc::evict::compress_report::tokens_after)
      .def_ro("bytes_allocated", &kvc::evict::compress_report::bytes_allocated,
              "pool bytes allocated (pages copied because a fork shares them)")
      .def_ro("bytes_released", &kvc::evict::compress_report::bytes_released, "pool bytes freed")
      .def("__repr__", [](const kvc::evict::compress_report& r) {
        return kvc::detail::concat("CompressReport(compressed=", r.compressed ? "True" : "False",
                                   ", tokens_before=", r.tokens_before, ", tokens_after=", r.tokens_after,
                                   ", bytes_allocated=", r.bytes_allocated, ", bytes_released=", r.bytes_released, ")");
      });

  nb::class_<session_cache>(m, "Cache",
                            "A KV cache built from a spec: '[policy+[merging+]]storage', e.g. 'snapkv(ratio=0.5)+kivi(bits=2)' "
                            "or 'h2o(ratio=0.5)+d2o+fp16'. A spec without a storage keeps fp32.")
      .def("__init__",
           [](session_cache* self, const std::string& spec, std::int32_t num_layers, std::int32_t num_kv_heads,
              std::int32_t head_dim, std::int32_t num_q_heads, std::int32_t page_size, std::int32_t max_pages,
              std::optional<float> rope_theta, const std::string& rope_style, std::int32_t rotary_dim,
              const std::optional<std::pair<in_array, in_array>>& weights) {
             kvc_python::shape s;
             kvc::runtime::projection_weights pw;
             if (weights) {  // palu's W_k and W_v: [num_layers, num_kv_heads * head_dim, hidden] each
               const char* who = "kvc.Cache";
               const in_array& wk = weights->first;
               const in_array& wv = weights->second;
               const std::int64_t rows = static_cast<std::int64_t>(num_kv_heads) * head_dim;
               check(who, "weights[0] (W_k)", wk, nb::dtype<float>(), "float32",
                     {{"num_layers", num_layers}, {"num_kv_heads*head_dim", rows}, {"hidden", -1}});
               check(who, "weights[1] (W_v)", wv, nb::dtype<float>(), "float32",
                     {{"num_layers", num_layers}, {"num_kv_heads*head_dim", rows},
                      {"hidden", static_cast<std::int64_t>(wk.shape(2))}});
               KVC_EXPECTS_IN(who, wk.shape(2) >= 1 && wk.shape(2) <= static_cast<std::size_t>(INT32_MAX),
                              "weights[0] (W_k) has ", wk.shape(2), " columns, expected 1..", INT32_MAX);
               pw.in = static_cast<std::int32_t>(wk.shape(2));
               const std::size_t layer_size = static_cast<std::size_t>(rows) * wk.shape(2);
               for (std::int32_t l = 0; l < num_layers; ++l) {
                 pw.wk.push_back(floats(wk) + static_cast<std::size_t>(l) * layer_size);
                 pw.wv.push_back(floats(wv) + static_cast<std::size_t>(l) * layer_size);
               }
               s.weights = &pw;  // read by the constructor only (palu's bases are fitted there)
             }
             if (rope_theta) {
               kvc::rope_config rc;
               rc.head_dim = head_dim;
               rc.rotary_dim = rotary_dim;
               rc.theta = *rope_theta;
               if (rope_style == "rotate_half") rc.style = kvc::rope_style::rotate_half;
               else if (rope_style == "interleaved") rc.style = kvc::rope_style::interleaved;
               else
                 kvc::detail::fail(kvc::detail::concat("kvc.Cache: rope_style = '", rope_style,
                                                       "', expected 'rotate_half' (Llama) or 'interleaved' (GPT-J)"));
               KVC_EXPECTS_IN("kvc.Cache", rc.theta > 0, "rope_theta = ", rc.theta, ", expected > 0");
               s.rope = rc;
             }
             s.num_layers = num_layers;
             s.num_kv_heads = num_kv_heads;
             s.head_dim = head_dim;
             s.num_q_heads = num_q_heads;
             s.page_size = page_size;
             s.max_pages = max_pages;
             new (self) session_cache(spec, s);
           },
           "spec"_a, "num_layers"_a, "num_kv_heads"_a, "head_dim"_a, "num_q_heads"_a = 0, "page_size"_a = 16,
           "max_pages"_a = 1 << 16, "rope_theta"_a = nb::none(), "rope_style"_a = "rotate_half", "rotary_dim"_a = 0,
           "weights"_a = nb::none(),
           "num_q_heads: the model's query heads (0: num_kv_heads); max_pages: the page pool's capacity. "
           "rope_theta, rope_style ('rotate_half' or 'interleaved'), rotary_dim (0: head_dim): the model's RoPE, "
           "needed by expected_attention, palu and pre_rope=1 storages, and used by leverage to un-rotate keys. "
           "weights: (wk, wv) for palu only, float32 [num_layers, num_kv_heads * head_dim, hidden] each (every "
           "layer's k_proj.weight and v_proj.weight, rows head-major); read while the cache is built.")
      .def_prop_ro("spec", &session_cache::spec)
      .def_prop_ro("storage", &session_cache::storage, "the storage as a spec")
      .def_prop_ro("isa", &session_cache::isa,
                   "the ISA configuration whose kernels run the cache: the best this CPU runs of those "
                   "the module carries (the environment variable KVC_ISA, e.g. 'isa_sse2', forces one)")
      .def_prop_ro("policy", &session_cache::policy, "the eviction policy's spec, or None")
      .def_prop_ro("merging", &session_cache::merging,
                   "the merging stage's spec (cam, d2o, kvmerger), or None: it merges what the policy would drop")
      .def_prop_ro("log_weighted", &session_cache::log_weighted,
                   "whether merged tokens carry log-weights (d2o, kvmerger with mass=1): attention over gather()'s "
                   "rows outside kvc must add log_weights() to each logit")
      .def_prop_ro("observes", &session_cache::observes,
                   "what the policy reads: 'nothing', 'query_window' (pass queries to the phases) or 'attention' "
                   "(fed by attention())")
      .def_prop_ro("pre_rope_keys", &session_cache::pre_rope_keys,
                   "whether the storage keeps keys before RoPE: append un-rotated keys (pre_rope=1 storages)")
      .def_prop_ro("can_rewind", &session_cache::can_rewind,
                   "whether rewind() can forget tokens of this storage (False: merging stages, low-rank, mixed "
                   "precision)")
      .def_prop_ro("cake", &session_cache::cake,
                   "whether the policy splits its budget over layers by every layer's query window (cake, also "
                   "inside chunkkv or rkv): cake_allocate(seq, windows) before compressing seq")
      .def_prop_ro("can_share_layers", &session_cache::can_share_layers,
                   "whether share_layer() can give a layer another layer's pages (plain, quantized and merging "
                   "storages, quest; False: mikv, low-rank, MiniCache)")
      .def_prop_ro("window", &session_cache::window, "queries the policy wants in its window (-1: the whole prompt)")
      .def_prop_ro("query_window", &session_cache::query_window,
                   "rotated queries the storage wants through observe_window() once a layer's prompt is in (think: "
                   "its window=, 32 by default; xkv: 1, the end-of-prompt signal); 0: no call needed (every other "
                   "storage, pca and palu included)")
      .def_prop_ro("num_layers", [](const session_cache& c) { return c.config().num_layers; })
      .def_prop_ro("num_kv_heads", [](const session_cache& c) { return c.config().num_kv_heads; })
      .def_prop_ro("num_q_heads", &session_cache::num_q_heads)
      .def_prop_ro("head_dim", [](const session_cache& c) { return c.config().head_dim; })
      .def_prop_ro("page_size", [](const session_cache& c) { return c.config().page_size; })

      .def("add_sequence", &session_cache::add_sequence, "A new empty sequence; returns its id.")
      .def("remove_sequence", &session_cache::remove_sequence, "seq"_a, "Frees the sequence's pages.")
      .def("contains", &session_cache::contains, "seq"_a)
      .def("fork", &session_cache::fork, "seq"_a,
           "A new sequence sharing seq's pages (copy on write); raises kvc.Error for storages that cannot share.")
      .def("cross_layer_merge", &session_cache::cross_layer_merge, "seq"_a,
           "MiniCache: merges every pair of adjacent layers from the storage's start= layer on, once the prompt of seq "
           "is in every layer: each merged token keeps one direction per pair in shared pages and each layer its own "
           "magnitudes; tokens whose directions differ too much stay unmerged. Tokens appended afterwards stay in "
           "their layers. Returns a LayerMergeReport. Raises kvc.Error for other storages and when the cache "
           "refuses (e.g. the pairs' layers hold different tokens); the cache is then unchanged.")
      .def("share_layer", &session_cache::share_layer, "seq"_a, "layer"_a, "source"_a,
           "Makes `layer` of seq hold what layer `source` holds, by reference: its pages gain a reference, the "
           "layer's own pages are freed, and the first write from either layer copies a shared page (as after "
           "fork), so bytes_in_use counts them once. For cross-layer methods (a layer attending with another "
           "layer's keys and values). The policy's per-token attention statistics of `source` come along, and with a "
           "merging stage the merged tokens' log-weights and D2O's threshold. Raises kvc.Error for storages that "
           "cannot share (mikv, low-rank, MiniCache) and bad arguments; the cache is then unchanged.")
      .def(
          "rewind", [](session_cache& c, kvc::seq_id seq, std::int32_t n) { c.rewind({seq}, n); }, "seq"_a, "n"_a,
          "Forgets seq's tokens at positions >= n in every layer (seen becomes n): a rejected draft in "
          "assisted or speculative decoding. Raises kvc.Error for storages that cannot rewind (merging "
          "stages, low-rank, mixed precision) and for n outside 0..seen; the cache is then unchanged. "
          "Tokens evicted or merged meanwhile stay so.")
      .def("rewind", &session_cache::rewind, "seqs"_a, "n"_a,
           "rewind(seq, n) for every sequence of seqs (the rows of a batch), all or none.")

      .def("append",
           [](session_cache& c, kvc::seq_id seq, std::int32_t layer, const in_array& k, const in_array& v,
              const std::optional<in_array>& positions) {
             const char* who = "kvc.Cache.append";
             const std::int64_t H = c.config().num_kv_heads, D = c.config().head_dim;
             check(who, "k", k, nb::dtype<float>(), "float32", {{"n", -1}, {"num_kv_heads", H}, {"head_dim", D}});
             check(who, "v", v, nb::dtype<float>(), "float32",
                   {{"n", static_cast<std::int64_t>(k.shape(0))}, {"num_kv_heads", H}, {"head_dim", D}});
             const auto n = static_cast<std::int32_t>(k.shape(0));
             const std::int32_t* pos = nullptr;
             if (positions) {
               check(who, "positions", *positions, nb::dtype<std::int32_t>(), "int32", {{"n", n}});
               pos = static_cast<const std::int32_t*>(positions->data());
             }
             nb::gil_scoped_release unlocked;
             c.append(seq, layer, floats(k), floats(v), n, pos);
           },
           "seq"_a, "layer"_a, "k"_a, "v"_a, "positions"_a = nb::none(),
           "Appends n tokens of one layer: k, v float32 [n, num_kv_heads, head_dim] (rotated keys), "
           "positions int32 [n] (default: the layer's next positions).")

      .def("attention",
           [](session_cache& c, kvc::seq_id seq, std::int32_t layer, const in_array& q, float scale) {
             check("kvc.Cache.attention", "q", q, nb::dtype<float>(), "float32",
                   {{"num_q_heads", c.num_q_heads()}, {"head_dim", c.config().head_dim}});
             const std::size_t Hq = static_cast<std::size_t>(c.num_q_heads()),
                               D = static_cast<std::size_t>(c.config().head_dim);
             std::vector<float> out(Hq * D);
             {
               nb::gil_scoped_release unlocked;
               c.attention(seq, layer, floats(q), out.data(), scale);
             }
             return to_numpy(std::move(out), {Hq, D});
           },
           "seq"_a, "layer"_a, "q"_a, "scale"_a = 0.0f,
           "Decode attention of one layer over what the cache kept: q float32 [num_q_heads, head_dim] -> "
           "float32 [num_q_heads, head_dim]. scale 0 means 1/sqrt(head_dim). Feeds the policy's attention "
           "observer (h2o, tova, ...).")

      .def("observe_queries",
           [](session_cache& c, std::int32_t layer, const in_array& q) {
             check("kvc.Cache.observe_queries", "q", q, nb::dtype<float>(), "float32",
                   {{"n", -1}, {"num_q_heads", c.num_q_heads()}, {"head_dim", c.config().head_dim}});
             nb::gil_scoped_release unlocked;
             c.observe_queries(layer, floats(q), static_cast<std::int32_t>(q.shape(0)));
           },
           "layer"_a, "q"_a,
           "Expected Attention: adds the layer's queries before RoPE, float32 [n, num_q_heads, head_dim], to the "
           "statistics its phases read.")
      .def("observe_window",
           [](session_cache& c, kvc::seq_id seq, std::int32_t layer, const in_array& q) {
             check("kvc.Cache.observe_window", "q", q, nb::dtype<float>(), "float32",
                   {{"n", -1}, {"num_q_heads", c.num_q_heads()}, {"head_dim", c.config().head_dim}});
             nb::gil_scoped_release unlocked;
             c.observe_window(seq, layer, floats(q), static_cast<std::int32_t>(q.shape(0)));
           },
           "seq"_a, "layer"_a, "q"_a,
           "The storage's end-of-prompt call, for storages with query_window > 0: q float32 [n, num_q_heads, "
           "head_dim], the layer's last n rotated queries (the prompt's last n positions), 1 <= n <= query_window. "
           "Call it per layer once the layer's prompt is appended and after any after_prefill of a policy. "
           "think: the first call for a layer scores its channels (ThinK's ||Q[:,d]||·||K[:,d]|| over every stored "
           "key) on this window and prunes the layer of every sequence; later calls for that layer do nothing. "
           "xkv: the queries are not read; once every layer of a group is observed for seq, the group's prompt "
           "becomes latents (the first sequence fits the group's bases). Raises kvc.Error (the cache unchanged) "
           "for a bad shape, n outside 1..query_window or a storage refusing (e.g. xkv over streams that hold "
           "different tokens).")
      .def("after_prefill",
           [](session_cache& c, kvc::seq_id seq, std::int32_t layer, const std::optional<in_array>& queries,
              const std::optional<in_array>& query_positions) {
             return run_phase(c, phase::prefill, "kvc.Cache.after_prefill", seq, layer, queries, query_positions);
           },
           "seq"_a, "layer"_a, "queries"_a = nb::none(), "query_positions"_a = nb::none(),
           "One-shot compression once the prompt of this layer is in the cache. queries: float32 [n, num_q_heads, "
           "head_dim], the last rotated queries, for policies that observe a query window.")
      .def(
          "cake_allocate",
          [](session_cache& c, kvc::seq_id seq, const std::vector<in_array>& windows) {
            std::vector<kvc::evict::query_window> w;
            for (std::size_t l = 0; l < windows.size(); ++l) {
              const std::string who = "kvc.Cache.cake_allocate: windows[" + std::to_string(l) + "]";
              w.push_back(*window_of(c, who.c_str(), windows[l], std::nullopt));
            }
            nb::gil_scoped_release unlocked;
            c.cake_allocate(seq, w);
          },
          "seq"_a, "windows"_a,
          "CAKE (policy cake(...)): each layer's preference from its query window over seq's keys, and the layer "
          "budgets seq's next after_prefill calls keep (the spec's budget, split over layers by preference); other "
          "sequences keep their own, and a fork takes its source's. windows: one float32 [n, num_q_heads, head_dim] "
          "array per layer, its last rotated queries. Call it once the prompt is in every layer, then after_prefill "
          "each layer; compressing a sequence without it raises kvc.Error.")
      .def("after_chunk",
           [](session_cache& c, kvc::seq_id seq, std::int32_t layer, const std::optional<in_array>& queries,
              const std::optional<in_array>& query_positions) {
             return run_phase(c, phase::chunk, "kvc.Cache.after_chunk", seq, layer, queries, query_positions);
           },
           "seq"_a, "layer"_a, "queries"_a = nb::none(), "query_positions"_a = nb::none(),
           "Chunked prefill: keeps the budget of the tokens seen so far.")
      .def("after_decode_step",
           [](session_cache& c, kvc::seq_id seq, std::int32_t layer, const std::optional<in_array>& queries,
              const std::optional<in_array>& query_positions) {
             return run_phase(c, phase::decode, "kvc.Cache.after_decode_step", seq, layer, queries, query_positions);
           },
           "seq"_a, "layer"_a, "queries"_a = nb::none(), "query_positions"_a = nb::none(),
           "After one decode step of this layer: compresses every `interval` steps or past `slack`.")
      .def("compress",
           [](session_cache& c, kvc::seq_id seq, std::int32_t layer, const std::optional<in_array>& queries,
              const std::optional<in_array>& query_positions) {
             return run_phase(c, phase::compress, "kvc.Cache.compress", seq, layer, queries, query_positions);
           },
           "seq"_a, "layer"_a, "queries"_a = nb::none(), "query_positions"_a = nb::none(),
           "Strict one-shot compression: a token budget above the longest stream raises kvc.Error.")

      .def("length", &session_cache::length, "seq"_a, "layer"_a, "head"_a, "Tokens the stream keeps.")
      .def("positions",
           [](const session_cache& c, kvc::seq_id seq, std::int32_t layer, std::int32_t head) {
             std::vector<std::int32_t> p = c.positions(seq, layer, head);
             const std::size_t n = p.size();
             return to_numpy(std::move(p), {n});
           },
           "seq"_a, "layer"_a, "head"_a, "The original positions the stream keeps, int32 [length], in order.")
      .def("seen", &session_cache::seen, "seq"_a, "layer"_a, "Tokens ever appended to the layer (kept or not).")
      .def("log_weights",
           [](const session_cache& c, kvc::seq_id seq, std::int32_t layer, std::int32_t head) {
             std::vector<float> w = c.log_weights(seq, layer, head);
             const std::size_t n = w.size();
             return to_numpy(std::move(w), {n});
           },
           "seq"_a, "layer"_a, "head"_a,
           "Each kept token's log-weight, float32 [length]: log of the attention mass it stands for (0: itself; "
           "all 0 without a merging stage). kvc's attention adds it to the token's logit.")
      .def("gather",
           [](const session_cache& c, kvc::seq_id seq, std::int32_t layer, std::int32_t head) {
             std::vector<float> k, v;
             {
               nb::gil_scoped_release unlocked;
               c.gather(seq, layer, head, k, v);
             }
             const std::size_t D = static_cast<std::size_t>(c.config().head_dim), n = k.size() / D;
             return std::make_pair(to_numpy(std::move(k), {n, D}), to_numpy(std::move(v), {n, D}));
           },
           "seq"_a, "layer"_a, "head"_a, "The kept K and V of one stream as float32 [length, head_dim] (dequantized).")

      .def("bytes_in_use",
           [](const session_cache& c, std::optional<std::int32_t> layer) {
             return layer ? c.bytes_in_use(*layer) : c.bytes_in_use();
           },
           "layer"_a = nb::none(), "Page-pool bytes in use, of the whole cache or one layer.")
      .def_prop_ro("bytes_allocated", [](const session_cache& c) { return c.traffic().bytes_allocated; },
                   "pool bytes allocated since construction")
      .def_prop_ro("bytes_released", [](const session_cache& c) { return c.traffic().bytes_released; },
                   "pool bytes released since construction")
      .def_prop_ro("metadata_bytes", &session_cache::metadata_bytes, "bytes of page tables and positions")
      .def_prop_ro("tokens_held", &session_cache::tokens_held, "tokens kept, summed over every stream")
      .def("__repr__", [](const session_cache& c) {
        return kvc::detail::concat("kvc.Cache('", c.spec(), "', num_layers=", c.config().num_layers,
                                   ", num_kv_heads=", c.config().num_kv_heads, ", head_dim=", c.config().head_dim,
                                   ", num_q_heads=", c.num_q_heads(), ")");
      })

      .def("_bench_decode",
           [](session_cache& c, kvc::seq_id seq, std::int32_t layer, const in_array& q, std::int64_t n) {
             check("kvc.Cache._bench_decode", "q", q, nb::dtype<float>(), "float32",
                   {{"num_q_heads", c.num_q_heads()}, {"head_dim", c.config().head_dim}});
             std::vector<float> out(static_cast<std::size_t>(c.num_q_heads()) * static_cast<std::size_t>(c.config().head_dim));
             nb::gil_scoped_release unlocked;
             for (std::int64_t i = 0; i < n; ++i) c.attention(seq, layer, floats(q), out.data(), 0.0f);
           },
           "seq"_a, "layer"_a, "q"_a, "n"_a,
           "Benchmark helper: the C++ loop of n attention() calls, what python/bench compares a Python loop against.");
}
