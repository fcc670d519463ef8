// SPDX-License-Identifier: Apache-2.0
/// \file stores.cpp
/// The engine's one translation unit that includes kvc's runtime (storages and evictors by spec).
#include "stores.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <optional>
#include <stdexcept>

#include "kvc_backend.hpp"

// minicache_adapter (cross-layer shared directions, merged once after the prompt), for its report.
#include <kvc/runtime/minicache_storage.hpp>

#include "registry.hpp"

namespace llama {

/// The model facts kvc's evictor builders read (kvc::runtime::evictor_context), with the
/// engine's RoPE as a kvc::rope: adjacent pairs, the file's theta and rotated channels.
static std::shared_ptr<const kvc::rope> model_rope(const kv_shape& shape) {
    kvc::rope_config rc;
    rc.head_dim = shape.head_dim;
    rc.rotary_dim = shape.rope_dims;
    rc.theta = shape.rope_theta;
    rc.style = kvc::rope_style::interleaved;
    return std::make_shared<const kvc::rope>(rc);
}

std::vector<std::string> available_stores() {
    register_storages();
    std::vector<std::string> v{"dense", "full (= fp16)"};
    for (const std::string& s : kvc::runtime::storage_names()) v.push_back(s + "    (storage)");
    for (const std::string& e : evictor_names())
        v.push_back(e + "(ratio=R|tokens=N,...)[+STORAGE]    (evictor; parameters: kvc/runtime/evictor_registry.hpp)");
    for (const auto& m : kvc::runtime::merge_names())
        v.push_back("EVICTOR+" + m + "(...)    (merging after eviction; parameters: kvc/runtime/merge_registry.hpp)");
    return v;
}

store_factory parse_store(const std::string& spec, const kv_shape& shape, const store_options& opt) {
    register_storages();
    store_factory f;
    f.spec = spec;
    if (spec == "dense") {
        f.create = [shape] { return std::make_unique<dense_kv>(shape); };
        return f;
    }
    std::string storage = "fp16";
    std::optional<kvc::runtime::evictor> ev;
    std::optional<kvc::runtime::merge_policy> merge;
    std::shared_ptr<const kvc::rope> rope = model_rope(shape);
    int window = 0;
    if (spec != "full" && spec != "kvc") {
        bool have_storage = false;
        for (const kvc::runtime::spec_stage& st : kvc::runtime::parse_spec(spec)) {
            if (kvc::runtime::is_storage(st.name)) {
                if (have_storage) throw std::invalid_argument("cache spec '" + spec + "': more than one storage stage");
                storage = st.text;
                have_storage = true;
                continue;
            }
            if (kvc::runtime::is_merger(st.name)) {
                if (merge) throw std::invalid_argument("cache spec '" + spec + "': more than one merging stage");
                merge.emplace(kvc::runtime::make_merge_policy(st));
                continue;
            }
            if (!is_evictor(st.name))
                throw std::invalid_argument("cache spec '" + spec + "': '" + st.name + "' is neither a kvc storage (" +
                                            kvc::runtime::known_storages() + "), a kvc eviction policy (" +
                                            known_evictors() + ") nor a merging policy (" +
                                            kvc::runtime::known_mergers() + ")");
            if (ev) throw std::invalid_argument("cache spec '" + spec + "': more than one evictor");
            kvc::runtime::evictor_context ctx;
            ctx.num_layers = shape.num_layers;
            ctx.num_q_heads = shape.num_q_heads;
            ctx.rotary = rope.get();
            ev.emplace(llama::make_evictor(st, ctx));  // qualified: ADL would also find kvc::runtime::make_evictor
            // Queries the engine remembers per layer: the policy's window, or the whole prompt.
            window = ev->window < 0 ? opt.max_tokens : ev->window;
        }
    }
    std::optional<kvc::evict::compressor<kvc::evict::any_scorer>> comp;
    if (ev) comp.emplace(ev->compressor());
    const bool minicache = kvc::runtime::parse_spec(storage).at(0).name == "minicache";
    if (minicache && (ev || merge))
        throw std::invalid_argument("cache spec '" + spec + "': minicache shares directions across layers and "
                                    "does not compose with eviction or token merging yet; expected minicache(...) alone");
    if (merge) {
        // The evictor chooses what is kept and scores every token; the merge decides the rest.
        if (!comp)
            throw std::invalid_argument("cache spec '" + spec + "': merging stage '" + merge->text +
                                        "' needs an eviction stage before it, e.g. snapkv(ratio=0.5)+" + merge->text +
                                        " (the evictor sets the budget and scores the tokens)");
        // The storage must hold merged tokens (fp16, fp32, int8, int4, kivi: make_merged_cache names
        // what it takes); asked here, before any cache of the run exists.
        kvc::cache_config probe;
        probe.num_layers = 1;
        probe.num_kv_heads = shape.num_kv_heads;
        probe.head_dim = shape.head_dim;
        probe.max_pages = 1;
        try {
            (void)kvc::runtime::make_merged_cache(storage, probe);
        } catch (const kvc::error& e) {
            throw std::invalid_argument("cache spec '" + spec + "': merging stage '" + merge->text + "' over storage '" +
                                        storage + "': " + e.what());
        }
    }
    f.query_window = window;
    f.create = [shape, opt, storage, comp, ev, rope, merge]() -> std::unique_ptr<kv_store> {
        kvc::runtime::projection_weights pw;
        pw.in = opt.weights_in;
        pw.wk = opt.wk;
        pw.wv = opt.wv;
        auto s = std::make_unique<kvc_store>(shape, storage, opt.page_size, opt.max_tokens, opt.pool,
                                             merge ? &*merge : nullptr, opt.wk.empty() ? nullptr : &pw);
        if (comp) s->set_compressor(*comp, ev->observer);  // a fresh copy per sequence: decode counters start at 0
        if (ev && ev->cake) s->set_cake(*ev);
        s->keep_alive(rope);  // scorers point at it (leverage un-rotates keys)
        return s;
    };
    if (minicache)  // the pairs of layers merge once, after the prompt; later tokens stay unmerged
        f.after_prefill = [](session& s) {
            auto* k = static_cast<kvc_store*>(s.kv.get());
            kvc::merge::minicache_report r;
            kvc::runtime::cross_layer_merge(k->cache(), k->seq(), &r);
            if (const char* v = std::getenv("KVC_LLAMA_VERBOSE"); v && *v && std::string(v) != "0")
                std::fprintf(stderr,
                             "minicache: %lld tokens merged, %lld retained (all pairs and kv heads); median angular "
                             "distance of adjacent layers: keys %.3f, values %.3f\n",
                             static_cast<long long>(r.merged), static_cast<long long>(r.retained),
                             r.key_distance_median, r.value_distance_median);
                // Which tokens merged, when few did: (layer pair, kv head) -> positions.
                if (r.merged > 0 && r.merged <= 16)
                    if (auto* m = dynamic_cast<kvc::runtime::minicache_adapter*>(&k->cache())) {
                        const auto& mc = m->get();
                        const auto& cfg = mc.config();
                        for (int p = 0; p < mc.num_pairs(); ++p)
                            for (int h = 0; h < cfg.num_kv_heads; ++h) {
                                const int n = mc.cache().length(k->seq(), cfg.num_layers + p, h);
                                const int32_t* pos = mc.cache().positions(k->seq(), cfg.num_layers + p, h);
                                if (n == 0) continue;
                                // Its key norm in the pair's first layer against the head's other tokens there.
                                const int a = mc.options().start_layer + 2 * p;
                                const int no = mc.cache().length(k->seq(), a, h), D = cfg.head_dim;
                                std::vector<float> kr(static_cast<std::size_t>(no) * D);
                                mc.cache().gather(k->seq(), a, h, kr.data());
                                std::vector<float> nrm(static_cast<std::size_t>(no));
                                for (int t = 0; t < no; ++t) {
                                    double q = 0;
                                    for (int d = 0; d < D; ++d) q += double(kr[std::size_t(t) * D + d]) * kr[std::size_t(t) * D + d];
                                    nrm[std::size_t(t)] = static_cast<float>(std::sqrt(q));
                                }
                                std::sort(nrm.begin(), nrm.end());
                                const auto& ks = mc.key_scale(k->seq(), a, h);
                                const auto& vs = mc.value_scale(k->seq(), a, h);
                                for (int i = 0; i < n; ++i)
                                    std::fprintf(stderr,
                                                 "minicache: layers %d-%d kv head %d merged position %d: |k| %.2f |v| %.2f "
                                                 "(the head's other keys: median |k| %.2f, max %.2f)\n",
                                                 a, a + 1, h, pos[i], ks[std::size_t(i)], vs[std::size_t(i)],
                                                 nrm.empty() ? 0.0f : nrm[nrm.size() / 2], nrm.empty() ? 0.0f : nrm.back());
                            }
                    }
        };
    if (!minicache) {  // eviction, then what the storage fits on the kept prompt (ThinK's channels)
        // The session keeps max(the evictor's window, the storage's) queries; each sees the last
        // rows it asked for (Finch and CAKE use every row they are given).
        auto run = [window](session& s, kvc_store::phase ph) {
            auto* k = static_cast<kvc_store*>(s.kv.get());
            auto last = [&](int layer, int keep) {
                kvc::evict::query_window w;
                const matrix& q = s.recent_q.at(static_cast<std::size_t>(layer));
                const int rows = static_cast<int>(q.rows()), n = keep > 0 ? std::min(rows, keep) : rows;
                w.head_dim = k->cache().config().head_dim;
                w.num_q_heads = static_cast<int32_t>(q.cols()) / w.head_dim;
                w.q = q.data() + static_cast<std::ptrdiff_t>(rows - n) * q.cols();
                w.n = n;
                return w;
            };
            k->compress(ph, [&](int layer) { return last(layer, window); });
            // A storage that fits on queries (ThinK) does so at its first call per layer: after the
            // prompt, or in a stream after the first compression, whichever phase that is.
            k->observe_windows([&](int layer) { return last(layer, 0); });
        };
        f.after_prefill = [run](session& s) { run(s, kvc_store::phase::prefill); };
        f.after_chunk = [run](session& s) { run(s, kvc_store::phase::chunk); };
        f.after_decode = [run](session& s) { run(s, kvc_store::phase::decode); };
    }
    return f;
}

void attach_weights(store_options& opt, const model& m) {
    opt.weights_in = m.hp().n_embd;
    opt.wk.clear();
    opt.wv.clear();
    for (int l = 0; l < m.hp().n_layer; ++l) {
        opt.wk.push_back(m.weights(l).wk.data());
        opt.wv.push_back(m.weights(l).wv.data());
    }
}

std::optional<std::vector<std::int32_t>> kept_positions(const kv_store& store, int layer, int head) {
    const auto* k = dynamic_cast<const kvc_store*>(&store);
    if (!k) return std::nullopt;
    const auto& kc = k->cache();
    const std::int32_t* p = kc.positions(k->seq(), layer, head);
    return std::vector<std::int32_t>(p, p + kc.length(k->seq(), layer, head));
}

std::string kept_positions_json(const kv_store& store, const std::string& spec, const kv_shape& shape,
                                const std::string& extra) {
    std::string out = "{\"spec\": \"";
    for (char ch : spec) {
        if (ch == '"' || ch == '\\') out += '\\';
        if (static_cast<unsigned char>(ch) >= 0x20) out += ch;
    }
    out += "\", " + extra + "\"layers\": " + std::to_string(shape.num_layers) +
           ", \"kv_heads\": " + std::to_string(shape.num_kv_heads) + ", \"positions\": [";
    for (int l = 0; l < shape.num_layers; ++l) {
        out += l ? ", [" : "[";
        for (int h = 0; h < shape.num_kv_heads; ++h) {
            const auto p = kept_positions(store, l, h);
            if (!p)
                throw std::invalid_argument("--dump-kept: cache '" + spec +
                                            "' is not a kvc cache, expected a kvc storage (the dense "
                                            "reference keeps every position)");
            out += h ? ", [" : "[";
            for (std::size_t i = 0; i < p->size(); ++i) out += (i ? ", " : "") + std::to_string((*p)[i]);
            out += "]";
        }
        out += "]";
    }
    return out + "]}";
}

int kept_in_range(const kv_store& store, int layer, int head, std::int32_t lo, std::int32_t hi) {
    const auto* k = dynamic_cast<const kvc_store*>(&store);
    if (!k) return -1;
    const auto& kc = k->cache();
    const std::int32_t* p = kc.positions(k->seq(), layer, head);
    const std::int32_t n = kc.length(k->seq(), layer, head);
    int in = 0;
    for (std::int32_t i = 0; i < n; ++i) in += p[i] >= lo && p[i] < hi;
    return in;
}

}  // namespace llama
