// SPDX-License-Identifier: Apache-2.0
/// \file model_tests.cpp
/// Tests of examples/llama on the real SmolLM2-135M-Instruct model (CTest label `model`).
/// Small on purpose (a few hundred tokens) so that CI runs them on 2 cores. When the model has
/// not been fetched (scripts/fetch-model), the GGUF-parsing tests still run and the program
/// exits 77 (CTest: skipped) after printing why. A plain executable: prints one line per check
/// and "N passed, N failed" at the end.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include <unistd.h>

#include "chat.hpp"
#include "gguf.hpp"
#include "model.hpp"
#include "model_path.hpp"
#include "sampling.hpp"
#include "stores.hpp"
#include "tokenizer.hpp"

namespace {

int passed = 0, failed = 0;

void check(bool ok, const std::string& what) {
    std::printf("%s: %s\n", ok ? "PASS" : "FAIL", what.c_str());
    (ok ? passed : failed)++;
}

template <class Fn>
void expect_error(Fn&& fn, const std::string& needle, const std::string& what) {
    try {
        fn();
        check(false, what + " (no error thrown)");
    } catch (const std::exception& e) {
        const std::string msg = e.what();
        check(msg.find(needle) != std::string::npos, what + " -> \"" + msg + "\"");
    }
}

std::string temp_path(const std::string& name) { return "/tmp/kvc-model-test-" + std::to_string(::getpid()) + "-" + name; }

void write_file(const std::string& p, const std::string& bytes) { std::ofstream(p, std::ios::binary) << bytes; }

/// Synthetic GGUF files: no model needed.
void test_malformed_gguf(const std::string& model) {
    const std::string bad_magic = temp_path("magic.gguf");
    write_file(bad_magic, "GGML\x03\0\0\0junk");
    expect_error([&] { llama::gguf_file f(bad_magic); }, "not a GGUF file", "bad magic is rejected");
    const std::string tiny = temp_path("tiny.gguf");
    write_file(tiny, std::string("GGUF\x03\0\0\0", 8) + std::string("\x01\0\0", 3));
    expect_error([&] { llama::gguf_file f(tiny); }, "truncated while reading tensor count", "truncated header names the field");
    std::remove(bad_magic.c_str());
    std::remove(tiny.c_str());
    if (model.empty()) return;
    // The real file cut short: the tensor table is intact but the data is not.
    std::ifstream in(model, std::ios::binary);
    std::string head(2 * 1024 * 1024, '\0');
    in.read(&head[0], static_cast<std::streamsize>(head.size()));
    const std::string cut = temp_path("cut.gguf");
    write_file(cut, head);
    expect_error([&] { llama::gguf_file f(cut); }, "needs more bytes than the file's", "truncated model names the tensor");
    std::remove(cut.c_str());
}

std::string read_text(const std::string& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

const char* kjv_excerpt =
    "In the beginning God created the heaven and the earth.\n"
    "And the earth was without form, and void; and darkness was upon the face of the deep. And the Spirit of God "
    "moved upon the face of the waters.\n"
    "And God said, Let there be light: and there was light.\n"
    "And God saw the light, that it was good: and God divided the light from the darkness.\n"
    "And God called the light Day, and the darkness he called Night. And the evening and the morning were the first "
    "day.\n";

double max_abs_diff(const llama::matrix& a, const llama::matrix& b) {
    if (a.rows() != b.rows() || a.cols() != b.cols()) return INFINITY;
    return static_cast<double>((a - b).cwiseAbs().maxCoeff());
}

double perplexity(llama::model& m, const std::string& spec, const std::vector<int32_t>& ids, int chunk) {
    llama::store_factory f = llama::parse_store(spec, m.shape());
    llama::session s = m.new_session(f.create());
    const int n = static_cast<int>(ids.size());
    llama::matrix lg = m.forward(s, ids.data(), n, n, chunk);
    double nll = 0;
    for (int i = 0; i + 1 < n; ++i) {
        const float* r = lg.row(i).data();
        double mx = r[0], sum = 0;
        for (int j = 1; j < lg.cols(); ++j) mx = std::max(mx, static_cast<double>(r[j]));
        for (int j = 0; j < lg.cols(); ++j) sum += std::exp(r[j] - mx);
        nll += std::log(sum) + mx - r[ids[static_cast<std::size_t>(i + 1)]];
    }
    return std::exp(nll / (n - 1));
}

}  // namespace

int main() {
    std::string why;
    const std::string model_path = llama::find_model(why);
    test_malformed_gguf(model_path);
    if (model_path.empty()) {
        std::printf("SKIP: %s\n", why.c_str());
        std::printf("%d passed, %d failed\n", passed, failed);
        return failed ? 1 : 77;
    }
    try {
        llama::set_threads(1);
        llama::gguf_file file(model_path);
        llama::tokenizer tok(file);
        llama::model mdl(file);
        const auto& hp = mdl.hp();
        check(hp.n_layer == 30 && hp.n_head == 9 && hp.n_head_kv == 3 && hp.head_dim == 64 && hp.n_vocab == 49152 &&
                  hp.tied_output && std::fabs(hp.rope_theta - 100000.0f) < 1,
              "hyper-parameters read from metadata (30 layers, 9/3 heads, head_dim 64, theta 1e5, tied output)");
        expect_error([&] { file.tensor("blk.0.attn_q.weight", {576, 577}); }, "has shape [576, 576], expected [576, 577]",
                     "a wrongly shaped tensor is named");
        expect_error([&] { file.tensor("blk.99.attn_q.weight", {576, 576}); }, "'blk.99.attn_q.weight' is missing",
                     "a missing tensor is named");

        // ---- tokenizer ----
        const std::string tricky =
            "Hello world! In 1611, the King's translators wrote:\n\n  \"Let there be light.\"\tÉté — naïve café 日本語 😀";
        const std::vector<int32_t> expect = {19556, 905,   17,    533,   216,   33,    38,    33,    33,    28,
                                             260,   3261,  506,   36611, 4150,  42,    8866,  476,   4239,  665,
                                             325,   1420,  1270,  197,   39614, 100,   2756,  1841,  15486, 46494,
                                             37366, 17097, 241,   115,   40993, 179,   120,   248,   40303, 218};
        check(tok.encode(tricky) == expect, "token ids equal Hugging Face tokenizers (Digits+ByteLevel) on a mixed string");
        const std::string gpl = read_text("/usr/share/common-licenses/GPL-3");
        for (const auto& [name, text] : {std::make_pair(std::string("GPL-3"), gpl), std::make_pair(std::string("KJV"), std::string(kjv_excerpt)),
                                         std::make_pair(std::string("mixed"), tricky)}) {
            if (text.empty()) continue;
            const auto ids = tok.encode(text);
            check(tok.decode(ids) == text, "tokenizer round-trips " + name + " exactly (" + std::to_string(text.size()) +
                                               " bytes -> " + std::to_string(ids.size()) + " tokens)");
        }
        llama::chat_template ct(file);
        const auto chat_ids = tok.encode(ct.render({{"user", "Hi"}}), true);
        check(!chat_ids.empty() && chat_ids.front() == tok.find("<|im_start|>") &&
                  std::count(chat_ids.begin(), chat_ids.end(), tok.find("<|im_end|>")) == 2,
              "chat template renders ChatML with special tokens");

        // ---- greedy continuation ----
        {
            auto ids = tok.encode("The capital of France is");
            llama::store_factory f = llama::parse_store("full", mdl.shape());
            llama::session s = mdl.new_session(f.create());
            llama::matrix lg = mdl.forward(s, ids.data(), static_cast<int>(ids.size()));
            std::string out;
            for (int i = 0; i < 8; ++i) {
                int32_t t = llama::sampler::argmax(lg.row(0).data(), hp.n_vocab);
                out += tok.decode_token(t);
                lg = mdl.forward(s, &t, 1);
            }
            std::printf("      greedy: \"The capital of France is%s\"\n", out.c_str());
            check(out.find("Paris") != std::string::npos, "greedy continuation names Paris");
        }

        // ---- incremental decode == re-prefill, dense == kvc ----
        std::vector<int32_t> ids = tok.encode(gpl.substr(0, 1400));
        ids.resize(std::min<std::size_t>(ids.size(), 200));
        const int P = 160, K = static_cast<int>(ids.size()) - P;
        std::map<std::string, llama::matrix> full_logits;
        for (const std::string spec : {"dense", "fp32", "fp16"}) {
            llama::store_factory f = llama::parse_store(spec, mdl.shape());
            llama::session inc = mdl.new_session(f.create());
            mdl.forward(inc, ids.data(), P, 1, 64);  // chunked prefill
            llama::matrix step(K, hp.n_vocab);
            for (int i = 0; i < K; ++i) step.row(i) = mdl.forward(inc, &ids[static_cast<std::size_t>(P + i)], 1).row(0);
            llama::session re = mdl.new_session(f.create());
            llama::matrix all = mdl.forward(re, ids.data(), P + K, K, 256);
            const double d = max_abs_diff(step, all);
            // f32 stores agree to float rounding. An f16 cache rounds K/V after GEMV (decode) or
            // GEMM (prefill) with different summation orders, so a few elements round to the
            // neighbouring half and logits move by ~1e-2 (range ~70).
            const double tol = spec == "fp16" ? 0.05 : 2e-3;
            check(d < tol, spec + ": incremental decode vs full re-prefill, max |logit diff| " + std::to_string(d));
            full_logits[spec] = all;
        }
        const double dk = max_abs_diff(full_logits["dense"], full_logits["fp32"]);
        check(dk < 2e-3, "kvc f32 cache vs dense reference, max |logit diff| " + std::to_string(dk));
        const double dh = max_abs_diff(full_logits["dense"], full_logits["fp16"]);
        check(dh < 0.5, "kvc f16 cache vs dense reference, max |logit diff| " + std::to_string(dh));

        // ---- perplexity ----
        std::vector<int32_t> gp = tok.encode(gpl.substr(0, 1400));
        gp.resize(std::min<std::size_t>(gp.size(), 256));
        const double ppl = perplexity(mdl, "full", gp, 128);
        const auto kj = tok.encode(kjv_excerpt);
        const double ppl_k = perplexity(mdl, "full", kj, 128);
        std::printf("      perplexity: GPL-3 %.9f (%zu tokens), Genesis %.9f (%zu tokens)\n", ppl, gp.size(), ppl_k, kj.size());
        // Pinned to the values measured 2026-12-03 (Release, no -march: the CI build; one thread,
        // so the run is deterministic for a given build). What can move them without a bug is the
        // summation order of float arithmetic (compiler flags, FMA contraction, SIMD width of
        // Eigen's GEMM and of kvc's kernels). This test measures such a spread itself: incremental
        // decode vs one re-prefill (different chunking, so different GEMM shapes and orders) and
        // kvc's f32 cache vs the dense store differ by at most delta = 1.3e-4 in any logit
        // (2026-12-03: 1.30e-4, 0.98e-4, 0.87e-4). Moving every logit by <= delta moves each
        // token's NLL = logsumexp(logits) - logit[target] by <= 2 delta, so the perplexity
        // exp(mean NLL) by a factor <= exp(2 delta) = 1 + 2.6e-4. The tolerance is 2e-3 relative,
        // about 8x that bound; a regression of the size of the f16 cache's rounding (logits
        // moved by 1.8e-2, bound 3.6%) or anything coarser is not hidden by it. (A Release
        // build with -march=native on the AVX-512 dev VM was meant to measure the flag spread
        // directly, but kvc's AVX-512 decode path is wrong there: ppl 2506 and 1939, kvc f32 vs
        // dense 42.8 logits; see the issue-16 report.)
        constexpr double ppl_gpl = 21.662176687, ppl_kjv = 4.452657649, ppl_tol = 2e-3;
        check(std::fabs(ppl - ppl_gpl) <= ppl_tol * ppl_gpl,
              "perplexity of the first " + std::to_string(gp.size()) + " GPL-3 tokens " + std::to_string(ppl) +
                  " is the pinned " + std::to_string(ppl_gpl) + " within " + std::to_string(ppl_tol * 100) + "%");
        check(std::fabs(ppl_k - ppl_kjv) <= ppl_tol * ppl_kjv,
              "perplexity of Genesis 1:1-5 (" + std::to_string(kj.size()) + " tokens) " + std::to_string(ppl_k) +
                  " is the pinned " + std::to_string(ppl_kjv) + " within " + std::to_string(ppl_tol * 100) + "%");

        // ---- memory from kvc's pool ----
        {
            llama::store_factory f = llama::parse_store("fp16", mdl.shape());
            llama::session s = mdl.new_session(f.create());
            mdl.forward(s, gp.data(), 64, 1);
            const std::size_t expect_bytes = std::size_t{30} * 3 * (64 / 16) * (2 * 16 * 64 * 2);
            check(s.kv->bytes_in_use() == expect_bytes, "kvc page pool reports " + std::to_string(s.kv->bytes_in_use()) +
                                                            " bytes for 64 tokens (expected " + std::to_string(expect_bytes) + ")");
        }
        // ---- eviction through kvc's compressor ----
        {
            llama::store_factory f = llama::parse_store("snapkv(ratio=0.5)", mdl.shape());
            llama::session s = mdl.new_session(f.create(), f.query_window);
            mdl.forward(s, gp.data(), 128, 1);
            const std::size_t before = s.kv->bytes_in_use();
            f.after_prefill(s);
            bool halved = true;
            for (int l = 0; l < hp.n_layer; ++l)
                for (int h = 0; h < hp.n_head_kv; ++h) halved = halved && s.kv->length(l, h) == 64;
            check(halved && s.kv->bytes_in_use() * 2 == before,
                  "snapkv(ratio=0.5) keeps 64 of 128 tokens per stream and frees half the pages (" +
                      std::to_string(before) + " -> " + std::to_string(s.kv->bytes_in_use()) + " bytes)");
            // kept_positions: every stream's positions, ascending, each one held by the probe
            bool positions_ok = true;
            std::size_t listed = 0;
            for (int l = 0; l < hp.n_layer; ++l)
                for (int h = 0; h < hp.n_head_kv; ++h) {
                    const auto p = llama::kept_positions(*s.kv, l, h);
                    positions_ok = positions_ok && p && p->size() == 64;
                    if (!p) continue;
                    listed += p->size();
                    std::int32_t prev = -1;
                    for (std::int32_t x : *p) {
                        positions_ok = positions_ok && x > prev && x < 128 && llama::kept_in_range(*s.kv, l, h, x, x + 1) == 1;
                        prev = x;
                    }
                }
            const std::string json = llama::kept_positions_json(*s.kv, "snapkv(ratio=0.5)", mdl.shape());
            const auto brackets = std::count(json.begin(), json.end(), '[');
            const auto commas = std::count(json.begin(), json.end(), ',');
            // 1 + layers + streams lists; per stream 63 commas between 64 positions, plus the separators
            const std::size_t streams = static_cast<std::size_t>(hp.n_layer) * hp.n_head_kv;
            check(positions_ok && listed == streams * 64 &&
                      json.rfind("{\"spec\": \"snapkv(ratio=0.5)\", \"layers\": 30, \"kv_heads\": 3,", 0) == 0 &&
                      static_cast<std::size_t>(brackets) == 1 + hp.n_layer + streams &&
                      static_cast<std::size_t>(commas) == 3 + streams * 63 + (streams - hp.n_layer) + (hp.n_layer - 1),
                  "kept_positions lists each stream's 64 kept positions, ascending, as the probe does; the JSON "
                  "dump holds all " + std::to_string(listed));
            llama::matrix lg = mdl.forward(s, &gp[128], 1);
            check(lg.allFinite() && s.n_past == 129, "decoding continues after eviction (positions keep counting)");
        }
        expect_error([&] { llama::parse_store("nosuch(ratio=0.5)", mdl.shape()); }, "'nosuch' is neither a kvc storage",
                     "an unknown policy in a cache spec is named");
        // ---- every evictor of kvc's registry runs in the engine, fed what it observes ----
        for (const std::string& name : llama::evictor_names()) {
            const std::string spec = name == "vnorm"        ? "vnorm(tova,ratio=0.5)"
                                     : name == "simlayerkv" ? "simlayerkv(ratio=0.5,lazy_threshold=0.5,n_recent=16)"
                                                            : name + "(ratio=0.5)";
            try {
                llama::store_factory f = llama::parse_store(spec, mdl.shape());
                llama::session s = mdl.new_session(f.create(), f.query_window);
                mdl.forward(s, gp.data(), 48, 1);
                f.after_prefill(s);
                // Per layer: the length every head of the layer keeps (-1 when the heads differ).
                std::vector<int> len(static_cast<std::size_t>(hp.n_layer));
                std::string lens;
                long total = 0;
                for (int l = 0; l < hp.n_layer; ++l) {
                    int n = s.kv->length(l, 0);
                    for (int h = 1; h < hp.n_head_kv; ++h)
                        if (s.kv->length(l, h) != n) n = -1;
                    len[static_cast<std::size_t>(l)] = n;
                    total += n;
                    lens += (l ? " " : "") + std::to_string(n);
                }
                std::printf("      %s keeps per layer: %s\n", spec.c_str(), lens.c_str());
                const int L = hp.n_layer;
                bool ok = true;
                std::string why;
                if (name == "pyramidkv" || name == "cake") {
                    // Layer schedules may move the budget between layers but not change its total
                    // (24 of 48 tokens per head, over every layer), and every head of a layer keeps
                    // the layer's budget. At 48 tokens both keep 24 everywhere (2026-12-03):
                    // pyramidkv's window (64) exceeds the prompt, and cake's preferences came out
                    // uniform here.
                    ok = *std::min_element(len.begin(), len.end()) > 0 &&
                         *std::max_element(len.begin(), len.end()) <= 48 && total == 24L * L;
                    why = "every layer's heads equal, each layer in 1..48, 24 x layers in all";
                } else if (name == "simlayerkv") {
                    // A lazy layer keeps the 4 initial and 16 recent tokens, any other layer all 48.
                    int lazy = 0;
                    for (int n : len) {
                        ok = ok && (n == 20 || n == 48);
                        lazy += n == 20;
                    }
                    ok = ok && lazy > 0;
                    why = "each layer 20 (lazy) or 48, at least one lazy";
                } else {
                    for (int n : len) ok = ok && n == 24;
                    why = "24 in every head";
                }
                llama::matrix lg = mdl.forward(s, &gp[48], 1);
                check(ok && lg.allFinite(),
                      spec + " compresses the engine's cache after prefill (" + why + ") and decoding continues");
            } catch (const std::exception& e) {
                check(false, spec + " in the engine: " + e.what());
            }
        }
        // ---- pre-RoPE keys: the engine appends un-rotated keys, kvc rotates them ----
        {
            const std::vector<int32_t> few(gp.begin(), gp.begin() + 96);
            const double p16 = perplexity(mdl, "fp16", few, 96), pre = perplexity(mdl, "int8(pre_rope=1)", few, 96);
            check(std::abs(pre - p16) < 0.05 * p16, "int8(pre_rope=1) perplexity " + std::to_string(pre) +
                                                        " is within 5% of fp16's " + std::to_string(p16));
        }
    } catch (const std::exception& e) {
        check(false, std::string("unexpected exception: ") + e.what());
    }
    std::printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
