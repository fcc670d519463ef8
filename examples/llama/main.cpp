// SPDX-License-Identifier: Apache-2.0
/// \file main.cpp
/// kvc-llama: generate text from a GGUF Llama model with the KV cache held by kvc.
///   kvc-llama [--model F] [--prompt TEXT | --chat TEXT] [-n N] [--cache SPEC] [--temp T]
///             [--top-k K] [--top-p P] [--seed S] [--threads N] [--chunk N] [--dump-kept FILE]
/// --dump-kept writes, after generating, the original positions every (layer, kv head) stream
/// still holds as one JSON object (stores.hpp, kept_positions_json); `-n 0` dumps them right
/// after the prompt's compression.
/// SPEC selects the KV store: "dense" (plain float arrays), or a kvc cache with an optional
/// compression policy (see stores.hpp; `--list-caches` prints what this build offers).
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <iostream>
#include <string>
#include <vector>

#include "chat.hpp"
#include "model.hpp"
#include "model_path.hpp"
#include "sampling.hpp"
#include "stores.hpp"
#include "tokenizer.hpp"

namespace {

void usage() {
    std::fprintf(stderr,
                 "usage: kvc-llama [--model FILE] [--prompt TEXT | --chat TEXT] [-n N] [--cache SPEC]\n"
                 "                 [--temp T] [--top-k K] [--top-p P] [--seed S] [--threads N] [--chunk N]\n"
                 "                 [--list-caches] [--info] [--tokenize FILE] [--prompt-ids FILE]\n"
                 "                 [--logits-out FILE] [--dump-kept FILE]\n");
}

}  // namespace

int main(int argc, char** argv) {
    std::string model_path, prompt = "The capital of France is", chat, cache_spec = "kvc";
    int n_predict = 64, chunk = 256, threads = 1;
    std::string tokenize_file, logits_out, prompt_ids, dump_kept;
    bool info = false, is_chat = false;
    llama::sampler_params sp;
    llama::store_options sopt;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        auto next = [&]() -> std::string {
            if (i + 1 >= argc) {
                std::fprintf(stderr, "kvc-llama: %s needs a value\n", a.c_str());
                std::exit(2);
            }
            return argv[++i];
        };
        if (a == "--model" || a == "-m") model_path = next();
        else if (a == "--prompt" || a == "-p") prompt = next();
        else if (a == "--chat") { chat = next(); is_chat = true; }
        else if (a == "-n") n_predict = std::stoi(next());
        else if (a == "--cache") cache_spec = next();
        else if (a == "--temp") sp.temperature = std::stof(next());
        else if (a == "--top-k") sp.top_k = std::stoi(next());
        else if (a == "--top-p") sp.top_p = std::stof(next());
        else if (a == "--seed") sp.seed = std::stoull(next());
        else if (a == "--threads") threads = std::stoi(next());
        else if (a == "--chunk") chunk = std::stoi(next());
        else if (a == "--page-size") sopt.page_size = std::stoi(next());
        else if (a == "--info") info = true;
        else if (a == "--tokenize") tokenize_file = next();
        else if (a == "--logits-out") logits_out = next();
        else if (a == "--prompt-ids") prompt_ids = next();
        else if (a == "--dump-kept") dump_kept = next();
        else if (a == "--list-caches") {
            for (const auto& s : llama::available_stores()) std::printf("%s\n", s.c_str());
            return 0;
        } else if (a == "-h" || a == "--help") {
            usage();
            return 0;
        } else {
            std::fprintf(stderr, "kvc-llama: unknown argument '%s'\n", a.c_str());
            usage();
            return 2;
        }
    }
    try {
        llama::set_threads(threads);
        if (model_path.empty()) {
            std::string why;
            model_path = llama::find_model(why);
            if (model_path.empty()) {
                std::fprintf(stderr, "kvc-llama: %s\n", why.c_str());
                return 1;
            }
        }
        const auto t0 = std::chrono::steady_clock::now();
        llama::gguf_file file(model_path);
        llama::tokenizer tok(file);
        llama::model mdl(file);
        const auto& hp = mdl.hp();
        const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        std::fprintf(stderr,
                     "model: %s | %d layers, %d q heads, %d kv heads, head_dim %d, ffn %d, vocab %d, rope theta %.0f, "
                     "ctx %d, %s output | weights %s | pre-tokenizer '%s' | loaded in %.1f s\n",
                     model_path.c_str(), hp.n_layer, hp.n_head, hp.n_head_kv, hp.head_dim, hp.n_ff, hp.n_vocab,
                     hp.rope_theta, hp.n_ctx_train, hp.tied_output ? "tied" : "separate", hp.weight_types.c_str(),
                     tok.pre_tokenizer().c_str(), load_s);
        if (info) return 0;
        if (!tokenize_file.empty()) {  // developer aid: token ids of a file, for cross-checks
            std::ifstream in(tokenize_file, std::ios::binary);
            if (!in) throw std::runtime_error("cannot read " + tokenize_file);
            std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
            for (int32_t id : tok.encode(text)) std::printf("%d\n", id);
            return 0;
        }

        std::vector<int32_t> ids;
        if (!prompt_ids.empty()) {  // developer aid: exact token ids, whitespace-separated
            std::ifstream in(prompt_ids);
            if (!in) throw std::runtime_error("cannot read " + prompt_ids);
            for (int32_t id; in >> id;) ids.push_back(id);
        } else if (is_chat) {
            llama::chat_template ct(file);
            ids = tok.encode(ct.render({{"user", chat}}), /*parse_special=*/true);
        } else {
            if (tok.add_bos() && tok.bos() >= 0) ids.push_back(tok.bos());
            auto p = tok.encode(prompt);
            ids.insert(ids.end(), p.begin(), p.end());
        }
        kvc::thread_pool pool(threads);
        sopt.pool = threads > 1 ? &pool : nullptr;
        llama::attach_weights(sopt, mdl);  // palu factors W_k and W_v
        sopt.max_tokens = static_cast<int>(ids.size()) + n_predict + 1;
        llama::store_factory make = llama::parse_store(cache_spec, mdl.shape(), sopt);
        llama::session s = mdl.new_session(make.create(), make.query_window);
        std::fprintf(stderr, "cache: %s | prompt: %zu tokens\n", s.kv->describe().c_str(), ids.size());

        llama::sampler pick(sp);
        if (!logits_out.empty()) {  // developer aid: logits of every prompt position, float32
            llama::matrix all = mdl.forward(s, ids.data(), static_cast<int>(ids.size()), static_cast<int>(ids.size()), chunk);
            std::ofstream out(logits_out, std::ios::binary);
            out.write(reinterpret_cast<const char*>(all.data()), static_cast<std::streamsize>(all.size() * sizeof(float)));
            std::fprintf(stderr, "wrote %lld x %lld logits to %s\n", static_cast<long long>(all.rows()), static_cast<long long>(all.cols()), logits_out.c_str());
            return 0;
        }
        llama::matrix logits = mdl.forward(s, ids.data(), static_cast<int>(ids.size()), 1, chunk);
        make.after_prefill(s);
        if (!is_chat && prompt_ids.empty()) std::cout << prompt << std::flush;
        const int32_t im_end = tok.find("<|im_end|>");
        for (int t = 0; t < n_predict; ++t) {
            int32_t next = pick(logits.row(0).data(), hp.n_vocab);
            if (next == tok.eos() || next == im_end) break;
            std::cout << tok.decode_token(next, true) << std::flush;
            logits = mdl.forward(s, &next, 1, 1);
            make.after_decode(s);
        }
        std::cout << std::endl;  // flushed: the timing line below goes to unbuffered stderr
        if (!dump_kept.empty()) {
            std::ofstream out(dump_kept);
            out << llama::kept_positions_json(*s.kv, cache_spec, mdl.shape(),
                                              "\"prompt_tokens\": " + std::to_string(ids.size()) + ", ")
                << "\n";
            if (!out) throw std::runtime_error("--dump-kept: cannot write " + dump_kept);
            std::fprintf(stderr, "kept positions written to %s\n", dump_kept.c_str());
        }
        const auto& st = mdl.stats();
        std::fprintf(stderr, "prefill: %ld tokens in %.2f s (%.1f tok/s) | decode: %ld tokens in %.2f s (%.1f tok/s) | KV bytes: %zu (%.0f per token)\n",
                     st.prefill_tokens, st.prefill_s, st.prefill_tokens / std::max(st.prefill_s, 1e-9), st.decode_tokens,
                     st.decode_s, st.decode_tokens / std::max(st.decode_s, 1e-9), s.kv->bytes_in_use(),
                     static_cast<double>(s.kv->bytes_in_use()) / std::max(1, s.n_past));
    } catch (const std::exception& e) {
        std::fprintf(stderr, "kvc-llama: error: %s\n", e.what());
        return 1;
    }
    return 0;
}
