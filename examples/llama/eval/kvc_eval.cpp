// SPDX-License-Identifier: Apache-2.0
/// \file kvc_eval.cpp
/// kvc-eval: quality of a compressed KV cache against memory, on a real model.
///
///   kvc-eval --text FILE --policies "fp16;snapkv(ratio={b});snapkv(ratio={b})+fp32" --budgets 0.5,0.25
///            [--protocols prefill,stream,needle] [--out PREFIX] [options]
///
/// Every policy spec (see stores.hpp) runs under every protocol; a spec containing `{b}` is
/// expanded once per budget. The reference spec (default fp32) runs first and is what
/// "Δ ppl" and "agreement" compare with.
///   prefill  kvpress-style: prefill a context of C tokens, compress once, score the next N
///            tokens (teacher forced); windows spread over the text; then greedy-decode a few
///            tokens one at a time to time decode with the compressed cache.
///   stream   decode-time: score the first L tokens of the text in chunks of S while the
///            cache is compressed after every chunk as it grows.
///   needle   retrieval at depth: numbers hidden in prose (--needle-text, another text than
///            the scored one), the one asked for at each of --needle-depths; the instruct model
///            is asked through the file's chat template; exact match of each number. Tasks
///            (--needle-task): single (one number), multikey (K numbers under K keys, one asked
///            for) and multivalue (K numbers under one key, all asked for), after RULER's
///            needle tasks; the report adds hits by depth.
///   prefill and needle compress once after the prompt (kvpress semantics); stream compresses
///   after every chunk (after_chunk), or every decode step with --stream-chunk 1.
///   Next-token agreement (argmax equal to the reference's argmax) is reported for prefill and
///   stream. Memory is kvc's page pool (bytes_in_use), divided by the tokens seen.
/// Outputs PREFIX.csv, PREFIX.md and PREFIX.png (the plot through eval/plot.py + matplotlib), and
/// PREFIX.journal as rows finish: --resume reruns only the rows an interrupted run did not finish.
/// --dump-kept FILE writes, for every kvc spec and prefill window, the original positions each
/// (layer, kv head) stream keeps after the one-shot compression: one JSON object per line
/// (stores.hpp, kept_positions_json, with "protocol", "window" and "start", the window's first
/// token in the text).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "chat.hpp"
#include "model.hpp"
#include "model_path.hpp"
#include "sampling.hpp"
#include "stores.hpp"
#include "tokenizer.hpp"

namespace {

using clock_type = std::chrono::steady_clock;
double seconds_since(clock_type::time_point t) { return std::chrono::duration<double>(clock_type::now() - t).count(); }

struct options {
    std::string model, text, out = "kvc-eval", reference = "fp32", needle_text, dump_kept;
    std::vector<std::string> policies, budgets;
    bool do_prefill = true, do_stream = true, do_needle = true;
    int context = 512, score = 128, windows = 4, decode_tokens = 16;   // prefill protocol
    int stream_tokens = 1024, stream_chunk = 16;                        // stream protocol
    int needle_context = 768, needle_seeds = 5, needle_max_new = 24;    // needle protocol
    std::vector<double> needle_depths{0.1, 0.5, 0.9};
    /// single: one number, "What is the secret number?". multikey: `needle_keys` numbers, each
    /// named by its own key, one asked for (RULER's multi-key task). multivalue: `needle_keys`
    /// numbers under one key, all asked for; a trial scores the share it names (RULER's
    /// multi-value task). In every task the needle asked for (multivalue: its first value) sits
    /// at the trial's depth and the others at random depths.
    std::string needle_task = "single";
    int needle_keys = 4;
    std::string dump_needles;  ///< --dump-needles FILE: every trial's prompt and answers (tests/model)
    int threads = 2, page_size = 16;
    int prefill_chunk = 256;  ///< tokens per forward chunk of a prompt (the engine's default)
    /// Tokens per forward chunk of the scored tokens (0: the engine's 256). 1 scores each token as a
    /// decode step, through the storage's decode attention: what a read policy (quest) changes.
    int score_chunk = 0;
    int se_block = 16;  ///< tokens per batch mean in dppl_se (see there; the choice: docs/results.md)
    bool plot = true, quiet = false, resume = false;
};

std::vector<std::string> split(const std::string& s, char sep) {
    std::vector<std::string> out;
    std::string cur;
    int depth = 0;  // do not split inside parentheses: "snapkv(ratio=0.5,window=32)"
    for (char c : s) {
        if (c == '(') ++depth;
        if (c == ')') --depth;
        if (c == sep && depth == 0) {
            if (!cur.empty()) out.push_back(cur);
            cur.clear();
        } else {
            cur += c;
        }
    }
    if (!cur.empty()) out.push_back(cur);
    return out;
}

std::string trim(std::string s) {
    while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
    std::size_t i = 0;
    while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
    return s.substr(i);
}

/// One line of the report: a policy at one budget.
struct row {
    std::string spec, family, budget;
    // prefill protocol
    double a_nll = 0, a_agree = 0, a_bytes_per_tok = 0, prefill_tps = 0, decode_tps = 0, compress_ms = 0;
    long a_n = 0, a_agree_n = 0;
    std::vector<double> a_tok;  ///< each scored token's NLL, in order (paired with the reference's)
    // stream protocol
    double b_nll = 0, b_agree = 0, b_bytes_per_tok = 0, stream_tps = 0;
    long b_n = 0, b_agree_n = 0;
    std::vector<double> b_tok;
    // needle: in total and by depth (index into options::needle_depths)
    int needle_hits = 0, needle_n = 0;
    std::vector<int> depth_hits, depth_n;
    std::string error;         ///< the row failed (bad spec, or the prefill protocol)
    std::string stream_error;  ///< only the stream protocol failed (prefill-only policies)
};

// ---- the journal: finished rows, so an interrupted run resumes (--resume) ----
// <out>.journal holds a header naming every option a row's figures depend on, then one line per
// finished row (the reference's also carries its argmax tokens, which later rows' agreement
// reads). Fields are tab-separated; strings escape '\\', tab and newline; doubles are written
// with 17 digits, so a resumed report equals an uninterrupted one.

/// Every option the figures depend on (not --threads: it moves only the tokens/s columns).
std::string journal_header(const options& o, const std::string& model) {
    std::ostringstream h;
    h << "kvc-eval journal 1\tmodel=" << model << "\ttext=" << o.text << "\treference=" << o.reference
      << "\tprotocols=" << o.do_prefill << o.do_stream << o.do_needle << "\tcontext=" << o.context << "\tscore=" << o.score
      << "\twindows=" << o.windows << "\tdecode=" << o.decode_tokens << "\tstream=" << o.stream_tokens << "/"
      << o.stream_chunk << "\tneedle=" << o.needle_text << "/" << o.needle_context << "/" << o.needle_seeds << "/"
      << o.needle_max_new << "/";
    for (double d : o.needle_depths) h << d << ",";
    h << "\tpage=" << o.page_size;
    if (o.needle_task != "single") h << "\tneedle_task=" << o.needle_task << "/" << o.needle_keys;
    // Only when not the default, so journals written before the option existed still resume.
    if (o.prefill_chunk != 256) h << "\tchunk=" << o.prefill_chunk;
    if (o.score_chunk != 0 && o.score_chunk != 256) h << "\tscore_chunk=" << o.score_chunk;  // 256: the default
    return h.str();
}

std::string escape(const std::string& s) {
    std::string o;
    for (char c : s) {
        if (c == '\\') o += "\\\\";
        else if (c == '\t') o += "\\t";
        else if (c == '\n') o += "\\n";
        else o += c;
    }
    return o;
}
std::string unescape(const std::string& s) {
    std::string o;
    for (std::size_t i = 0; i < s.size(); ++i) {
        if (s[i] != '\\' || i + 1 == s.size()) { o += s[i]; continue; }
        const char c = s[++i];
        o += c == 't' ? '\t' : c == 'n' ? '\n' : c;
    }
    return o;
}

template <class T>
std::string join(const std::vector<T>& v) {
    std::ostringstream o;
    o.precision(17);
    for (std::size_t i = 0; i < v.size(); ++i) o << (i ? " " : "") << v[i];
    return o.str();
}
template <class T>
std::vector<T> parse_list(const std::string& s) {
    std::vector<T> v;
    std::istringstream in(s);
    T x;
    while (in >> x) v.push_back(x);
    return v;
}

/// One journal line: the row, and (for the reference) the argmax tokens of both protocols.
std::string journal_line(const row& r, const std::vector<std::vector<int32_t>>& ref_a, const std::vector<int32_t>& ref_b) {
    std::ostringstream l;
    l.precision(17);
    l << escape(r.spec) << '\t' << escape(r.family) << '\t' << escape(r.budget) << '\t' << r.a_nll << '\t' << r.a_agree
      << '\t' << r.a_bytes_per_tok << '\t' << r.prefill_tps << '\t' << r.decode_tps << '\t' << r.compress_ms << '\t'
      << r.a_n << '\t' << r.a_agree_n << '\t' << join(r.a_tok) << '\t' << r.b_nll << '\t' << r.b_agree << '\t'
      << r.b_bytes_per_tok << '\t' << r.stream_tps << '\t' << r.b_n << '\t' << r.b_agree_n << '\t' << join(r.b_tok)
      << '\t' << r.needle_hits << '\t' << r.needle_n << '\t' << escape(r.error) << '\t' << escape(r.stream_error) << '\t'
      << ref_a.size();
    for (const auto& w : ref_a) l << '\t' << join(w);
    l << '\t' << join(ref_b);
    l << '\t' << join(r.depth_hits) << '\t' << join(r.depth_n);
    return l.str();
}

/// Parses a journal line; false when it is malformed (a line cut short by the interruption).
bool parse_journal_line(const std::string& line, row& r, std::vector<std::vector<int32_t>>& ref_a,
                        std::vector<int32_t>& ref_b) {
    std::vector<std::string> f;
    std::size_t a = 0;
    for (std::size_t b; (b = line.find('\t', a)) != std::string::npos; a = b + 1) f.push_back(line.substr(a, b - a));
    f.push_back(line.substr(a));
    if (f.size() < 25) return false;
    try {
        std::size_t i = 0;
        r.spec = unescape(f[i++]), r.family = unescape(f[i++]), r.budget = unescape(f[i++]);
        r.a_nll = std::stod(f[i++]), r.a_agree = std::stod(f[i++]), r.a_bytes_per_tok = std::stod(f[i++]);
        r.prefill_tps = std::stod(f[i++]), r.decode_tps = std::stod(f[i++]), r.compress_ms = std::stod(f[i++]);
        r.a_n = std::stol(f[i++]), r.a_agree_n = std::stol(f[i++]), r.a_tok = parse_list<double>(f[i++]);
        r.b_nll = std::stod(f[i++]), r.b_agree = std::stod(f[i++]), r.b_bytes_per_tok = std::stod(f[i++]);
        r.stream_tps = std::stod(f[i++]), r.b_n = std::stol(f[i++]), r.b_agree_n = std::stol(f[i++]);
        r.b_tok = parse_list<double>(f[i++]);
        r.needle_hits = std::stoi(f[i++]), r.needle_n = std::stoi(f[i++]);
        r.error = unescape(f[i++]), r.stream_error = unescape(f[i++]);
        const std::size_t nw = static_cast<std::size_t>(std::stoul(f[i++]));
        // Journals written before the needle-by-depth fields end after ref_b; they still resume.
        if (f.size() != i + nw + 1 && f.size() != i + nw + 3) return false;
        ref_a.clear();
        for (std::size_t w = 0; w < nw; ++w) ref_a.push_back(parse_list<int32_t>(f[i++]));
        ref_b = parse_list<int32_t>(f[i++]);
        if (i < f.size()) {
            r.depth_hits = parse_list<int>(f[i++]);
            r.depth_n = parse_list<int>(f[i++]);
            if (r.depth_hits.size() != r.depth_n.size()) return false;
        }
        return r.a_tok.size() == static_cast<std::size_t>(r.a_n) && r.b_tok.size() == static_cast<std::size_t>(r.b_n);
    } catch (const std::exception&) {
        return false;
    }
}

/// The standard error of Δppl = ppl − ppl_ref, from the per-token NLL differences d paired
/// against the reference's (same tokens, same order): ppl = ppl_ref · exp(mean d), so by the delta
/// method SE(Δppl) ≈ ppl · SE(mean d). Neighbouring tokens' differences are correlated (one
/// compressed cache serves a whole window), so SE(mean d) comes from batch means: the spread of the
/// means of `block` consecutive tokens, over √(number of blocks). NaN when the pairing does not
/// hold or fewer than 2 blocks exist. For the reference row itself it is 0.
double dppl_se(const std::vector<double>& x, const std::vector<double>& ref, double ppl, int block) {
    if (x.size() != ref.size() || block < 1) return NAN;
    const std::size_t b = static_cast<std::size_t>(block), k = x.size() / b;
    if (k < 2) return NAN;
    std::vector<double> means(k, 0.0);
    for (std::size_t j = 0; j < k * b; ++j) means[j / b] += (x[j] - ref[j]) / static_cast<double>(b);
    double mu = 0, var = 0;
    for (double m : means) mu += m / static_cast<double>(k);
    for (double m : means) var += (m - mu) * (m - mu) / static_cast<double>(k - 1);
    return ppl * std::sqrt(var / static_cast<double>(k));
}

/// A progress bar on stderr: "[#####.....]  45% stream snapkv(ratio=0.25)  ETA 1m20s".
class progress {
public:
    progress(long total, bool quiet) : total_(std::max(1L, total)), quiet_(quiet), t0_(clock_type::now()) {}
    void step(long n, const std::string& what) {
        done_ += n;
        if (quiet_) return;
        const double f = std::min(1.0, static_cast<double>(done_) / total_);
        const double el = seconds_since(t0_);
        const double eta = f > 0 ? el / f - el : 0;
        const int w = 30, k = static_cast<int>(f * w);
        std::fprintf(stderr, "\r[%s%s] %3d%% %-44.44s ETA %dm%02ds ", std::string(static_cast<std::size_t>(k), '#').c_str(),
                     std::string(static_cast<std::size_t>(w - k), '.').c_str(), static_cast<int>(f * 100), what.c_str(),
                     static_cast<int>(eta) / 60, static_cast<int>(eta) % 60);
        std::fflush(stderr);
    }
    void finish() {
        if (!quiet_) std::fprintf(stderr, "\n");
    }

private:
    long total_, done_ = 0;
    bool quiet_;
    clock_type::time_point t0_;
};

/// -log p(target) from a row of logits, in double.
double nll(const float* logits, int n, int target) {
    double mx = logits[0];
    for (int i = 1; i < n; ++i) mx = std::max(mx, static_cast<double>(logits[i]));
    double s = 0;
    for (int i = 0; i < n; ++i) s += std::exp(logits[i] - mx);
    return std::log(s) + mx - logits[target];
}

struct engine {
    llama::gguf_file& file;
    llama::tokenizer& tok;
    llama::model& mdl;
    llama::store_options sopt;
};

/// Prefill protocol for one spec over all windows. `ref_argmax` is filled by the reference run
/// and read by the others ([window][position]).
void run_prefill(engine& e, const options& o, const std::vector<int32_t>& toks, const std::string& spec, row& r,
                 std::vector<std::vector<int32_t>>& ref_argmax, bool is_ref, progress& bar) {
    const int need = o.context + o.score + 1;
    const int nv = e.mdl.hp().n_vocab;
    const long span = static_cast<long>(toks.size()) - need;
    if (span < 0) throw std::runtime_error("text too short for --context + --score");
    if (is_ref) ref_argmax.assign(static_cast<std::size_t>(o.windows), {});
    double pre_s = 0, dec_s = 0, comp_s = 0, bytes_tok = 0;
    long pre_n = 0, dec_n = 0;
    for (int w = 0; w < o.windows; ++w) {
        const long start = o.windows == 1 ? 0 : span * w / (o.windows - 1);
        const int32_t* base = toks.data() + start;
        auto sopt = e.sopt;
        sopt.max_tokens = need + o.decode_tokens + 1;
        llama::store_factory f = llama::parse_store(spec, e.mdl.shape(), sopt);
        llama::session s = e.mdl.new_session(f.create(), f.query_window);
        auto t = clock_type::now();
        e.mdl.forward(s, base, o.context, 1, o.prefill_chunk);
        pre_s += seconds_since(t);
        pre_n += o.context;
        t = clock_type::now();
        f.after_prefill(s);
        comp_s += seconds_since(t);
        if (!o.dump_kept.empty() && llama::kept_positions(*s.kv, 0, 0)) {
            std::ofstream dump(o.dump_kept, std::ios::app);
            dump << llama::kept_positions_json(*s.kv, spec, e.mdl.shape(),
                                               "\"protocol\": \"prefill\", \"window\": " + std::to_string(w) +
                                                   ", \"start\": " + std::to_string(start) + ", ")
                 << "\n";
            if (!dump) throw std::runtime_error("--dump-kept: cannot write " + o.dump_kept);
        }
        llama::matrix lg = e.mdl.forward(s, base + o.context, o.score, o.score,
                                         o.score_chunk > 0 ? o.score_chunk : 256);
        for (int i = 0; i < o.score; ++i) {
            const float* row_p = lg.row(i).data();
            r.a_tok.push_back(nll(row_p, nv, base[o.context + i + 1]));
            r.a_nll += r.a_tok.back();
            ++r.a_n;
            const int32_t am = llama::sampler::argmax(row_p, nv);
            if (is_ref) ref_argmax[static_cast<std::size_t>(w)].push_back(am);
            else if (!ref_argmax.empty()) {
                r.a_agree += am == ref_argmax[static_cast<std::size_t>(w)][static_cast<std::size_t>(i)];
                ++r.a_agree_n;
            }
        }
        bytes_tok += static_cast<double>(s.kv->bytes_in_use()) / s.n_past;
        // Decode speed with the compressed cache: greedy tokens one at a time.
        int32_t next = llama::sampler::argmax(lg.row(o.score - 1).data(), nv);
        t = clock_type::now();
        for (int i = 0; i < o.decode_tokens; ++i) {  // one-shot protocol: no further compression
            llama::matrix l1 = e.mdl.forward(s, &next, 1, 1);
            next = llama::sampler::argmax(l1.row(0).data(), nv);
        }
        dec_s += seconds_since(t);
        dec_n += o.decode_tokens;
        bar.step(o.context + o.score + o.decode_tokens, "prefill " + spec);
    }
    r.a_bytes_per_tok = bytes_tok / o.windows;
    r.prefill_tps = pre_n / std::max(pre_s, 1e-9);
    r.decode_tps = dec_n / std::max(dec_s, 1e-9);
    r.compress_ms = comp_s * 1000 / o.windows;
    if (is_ref) r.a_agree = 1, r.a_agree_n = 1;
}

/// Stream protocol: score tokens [1, L) in chunks, compressing after each chunk.
void run_stream(engine& e, const options& o, const std::vector<int32_t>& toks, const std::string& spec, row& r,
                std::vector<int32_t>& ref_argmax, bool is_ref, progress& bar) {
    const int L = std::min<int>(o.stream_tokens, static_cast<int>(toks.size()));
    const int nv = e.mdl.hp().n_vocab;
    auto sopt = e.sopt;
    sopt.max_tokens = L + 1;
    llama::store_factory f = llama::parse_store(spec, e.mdl.shape(), sopt);
    llama::session s = e.mdl.new_session(f.create(), f.query_window);
    if (is_ref) ref_argmax.clear();
    double bytes_tok_sum = 0;
    int samples = 0;
    const auto t = clock_type::now();
    for (int start = 0; start < L; start += o.stream_chunk) {
        const int m = std::min(o.stream_chunk, L - start);
        llama::matrix lg = e.mdl.forward(s, toks.data() + start, m, m);
        for (int i = 0; i < m; ++i) {
            const int target = start + i + 1;
            if (target >= L) break;
            const float* row_p = lg.row(i).data();
            r.b_tok.push_back(nll(row_p, nv, toks[static_cast<std::size_t>(target)]));
            r.b_nll += r.b_tok.back();
            ++r.b_n;
            const int32_t am = llama::sampler::argmax(row_p, nv);
            if (is_ref) ref_argmax.push_back(am);
            else if (static_cast<std::size_t>(target - 1) < ref_argmax.size()) {
                r.b_agree += am == ref_argmax[static_cast<std::size_t>(target - 1)];
                ++r.b_agree_n;
            }
        }
        if (o.stream_chunk == 1) f.after_decode(s);
        else f.after_chunk(s);
        bytes_tok_sum += static_cast<double>(s.kv->bytes_in_use()) / s.n_past;
        ++samples;
        bar.step(m, "stream " + spec);
    }
    r.stream_tps = L / std::max(seconds_since(t), 1e-9);
    r.b_bytes_per_tok = bytes_tok_sum / std::max(1, samples);  // mean over the run
    if (is_ref) r.b_agree = 1, r.b_agree_n = 1;
}

/// A needle trial's prompt: prose from `hay` with the needle sentences inserted (each moved to
/// the next line break so that it does not cut a sentence), then the question.
struct needle_case {
    std::vector<int32_t> prompt;
    std::vector<std::string> answers;  ///< the numbers a correct answer names (multivalue: all of them)
    int depth = 0;                     ///< index into options::needle_depths of the needle asked for
    std::string text;                  ///< the user message, for --dump-needles
    int32_t answer_at = -1, answer_len = 0;  ///< prompt positions of answers[0]'s tokens (--show-needles)
};

/// Where the number's tokens sit in the prompt (digits are single tokens in SmolLM2's
/// pre-tokenizer), so --show-needles can say whether compression kept them.
void locate_answer(const llama::tokenizer& tok, needle_case& c) {
    const std::string& answer = c.answers.front();
    for (std::size_t i = 0; i < c.prompt.size() && c.answer_at < 0; ++i) {
        std::string got;
        for (std::size_t j = i; j < c.prompt.size(); ++j) {
            std::string t = tok.decode_token(c.prompt[j], true);
            t.erase(std::remove(t.begin(), t.end(), ' '), t.end());
            got += t;
            if (got.empty() || answer.compare(0, got.size(), got) != 0) break;
            if (got == answer) {
                c.answer_at = static_cast<int32_t>(i);
                c.answer_len = static_cast<int32_t>(j - i + 1);
                break;
            }
        }
    }
}

/// The keys of the multikey and multivalue tasks: ordinary two-word phrases, none of them in the
/// texts the protocols use, so that a key names exactly one needle.
constexpr const char* needle_key_names[] = {
    "amber lantern", "copper kettle",  "silver compass", "violet ribbon", "granite bridge", "crimson kite",
    "marble fountain", "linen satchel", "cobalt anchor", "walnut cabinet", "scarlet canoe", "pewter bell",
    "olive tapestry", "saffron drum",   "indigo rudder", "ivory chessboard"};
constexpr int needle_key_count = static_cast<int>(sizeof(needle_key_names) / sizeof(needle_key_names[0]));

/// Tokens a trial may generate: a multivalue answer names every value (5 digits and a separator
/// each, plus a lead-in), so it gets room for them.
int needle_new_tokens(const options& o) {
    return o.needle_task == "multivalue" ? std::max(o.needle_max_new, 8 * o.needle_keys + 16) : o.needle_max_new;
}

/// `depths` are fractions of the prose (in bytes) where each sentence goes; the sentences are
/// inserted from the last position back, so earlier positions stay valid.
std::string insert_needles(const std::string& hay, const std::vector<std::pair<double, std::string>>& needles) {
    std::vector<std::pair<std::size_t, std::string>> at;
    for (const auto& [depth, sentence] : needles) {
        std::size_t p = static_cast<std::size_t>(depth * static_cast<double>(hay.size()));
        const std::size_t nl = hay.find('\n', std::min(p, hay.size()));
        p = nl == std::string::npos ? hay.size() : nl + 1;
        at.emplace_back(p, sentence);
    }
    // Stable: needles at the same line break keep their given order.
    std::stable_sort(at.begin(), at.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
    std::string text = hay;
    for (std::size_t i = at.size(); i-- > 0;) text.insert(at[i].first, at[i].second);
    return text;
}

std::vector<needle_case> make_needles(engine& e, const options& o, const std::vector<int32_t>& hay_toks) {
    llama::chat_template ct(e.file);
    std::vector<needle_case> cases;
    const int k = o.needle_task == "single" ? 1 : o.needle_keys;
    for (int seed = 0; seed < o.needle_seeds; ++seed) {
        std::mt19937_64 rng(static_cast<uint64_t>(seed) * 7919 + 17);
        const long span = static_cast<long>(hay_toks.size()) - o.needle_context;
        if (span <= 0) throw std::runtime_error("needle text too short for --needle-context");
        const long off = static_cast<long>(rng() % static_cast<uint64_t>(span));
        std::string hay = e.tok.decode({hay_toks.begin() + off, hay_toks.begin() + off + o.needle_context});
        if (std::size_t nl = hay.find('\n'); nl != std::string::npos && nl < hay.size() / 4) hay = hay.substr(nl + 1);
        // The seed's numbers (distinct) and keys (distinct); the first is the one asked for.
        std::vector<std::string> numbers, keys;
        while (static_cast<int>(numbers.size()) < k) {
            const std::string n = std::to_string(10000 + static_cast<int>(rng() % 90000));
            if (std::find(numbers.begin(), numbers.end(), n) == numbers.end()) numbers.push_back(n);
        }
        std::vector<int> order(needle_key_count);
        std::iota(order.begin(), order.end(), 0);
        std::shuffle(order.begin(), order.end(), rng);
        for (int i = 0; i < k; ++i) keys.emplace_back(needle_key_names[order[static_cast<std::size_t>(i)]]);
        for (std::size_t d = 0; d < o.needle_depths.size(); ++d) {
            std::vector<std::pair<double, std::string>> placed;
            std::string question;
            std::uniform_real_distribution<double> anywhere(0.0, 1.0);
            if (o.needle_task == "single") {
                placed.emplace_back(o.needle_depths[d], "The secret number is " + numbers[0] + ". Remember it.\n");
                question = "What is the secret number mentioned in the text above? Answer with the number only.";
            } else {  // multikey: a key per number; multivalue: every number under keys[0]
                const bool mv = o.needle_task == "multivalue";
                for (int i = 0; i < k; ++i)
                    placed.emplace_back(i == 0 ? o.needle_depths[d] : anywhere(rng),
                                        std::string(mv ? "One of the secret numbers of the " : "The secret number of the ") +
                                            keys[mv ? 0 : static_cast<std::size_t>(i)] + " is " +
                                            numbers[static_cast<std::size_t>(i)] + ".\n");
                question = std::string(mv ? "What are all the secret numbers of the " : "What is the secret number of the ") +
                           keys[0] + " mentioned in the text above? Answer with the number" + (mv ? "s" : "") + " only.";
            }
            needle_case c;
            c.text = insert_needles(hay, placed) + "\n\n" + question;
            c.prompt = e.tok.encode(ct.render({{"user", c.text}}), /*parse_special=*/true);
            c.answers = o.needle_task == "multivalue" ? numbers : std::vector<std::string>{numbers[0]};
            c.depth = static_cast<int>(d);
            locate_answer(e.tok, c);
            cases.push_back(std::move(c));
        }
    }
    if (!o.dump_needles.empty()) {  // one JSON object per trial: what tests/model/eval_needles.sh checks
        std::ofstream dump(o.dump_needles, std::ios::trunc);
        auto quote = [](const std::string& x) {
            std::string q = "\"";
            for (char ch : x) {
                if (ch == '"' || ch == '\\') q += '\\', q += ch;
                else if (ch == '\n') q += "\\n";
                else if (static_cast<unsigned char>(ch) < 0x20) q += ' ';
                else q += ch;
            }
            return q + "\"";
        };
        for (const needle_case& c : cases) {
            dump << "{\"depth\": " << o.needle_depths[static_cast<std::size_t>(c.depth)] << ", \"answers\": [";
            for (std::size_t i = 0; i < c.answers.size(); ++i) dump << (i ? ", " : "") << quote(c.answers[i]);
            dump << "], \"prompt_tokens\": " << c.prompt.size() << ", \"text\": " << quote(c.text) << "}\n";
        }
        if (!dump) throw std::runtime_error("--dump-needles: cannot write " + o.dump_needles);
    }
    return cases;
}

std::string fmt(const char* f, double x);

void run_needle(engine& e, const options& o, const std::vector<needle_case>& cases, const std::string& spec, row& r,
                progress& bar, bool show) {
    const int nv = e.mdl.hp().n_vocab;
    const int32_t im_end = e.tok.find("<|im_end|>");
    const int max_new = needle_new_tokens(o);
    r.depth_hits.assign(o.needle_depths.size(), 0);
    r.depth_n.assign(o.needle_depths.size(), 0);
    for (const needle_case& c : cases) {
        auto sopt = e.sopt;
        sopt.max_tokens = static_cast<int>(c.prompt.size()) + 16;
        llama::store_factory f = llama::parse_store(spec, e.mdl.shape(), sopt);
        llama::session s = e.mdl.new_session(f.create(), f.query_window);
        llama::matrix lg = e.mdl.forward(s, c.prompt.data(), static_cast<int>(c.prompt.size()), 1, o.prefill_chunk);
        f.after_prefill(s);
        std::string kept_note;
        if (show && c.answer_at >= 0)
            if (llama::kept_in_range(*s.kv, 0, 0, 0, 1) >= 0) {
                // A policy that keeps the number's start but drops later digits answers with a
                // prefix; this says so directly (docs/results.md, "Needle: why ...").
                const llama::kv_shape sh = e.mdl.shape();
                int all = 0, streams = 0;
                double share = 0;
                for (int l = 0; l < sh.num_layers; ++l)
                    for (int h = 0; h < sh.num_kv_heads; ++h) {
                        const int in = llama::kept_in_range(*s.kv, l, h, c.answer_at, c.answer_at + c.answer_len);
                        all += in == c.answer_len;
                        share += static_cast<double>(in) / c.answer_len;
                        ++streams;
                    }
                kept_note = ", digits kept: all in " + std::to_string(all) + "/" + std::to_string(streams) +
                            " streams, mean " + fmt("%.0f%%", 100.0 * share / streams);
            }
        std::string out;
        for (int i = 0; i < max_new; ++i) {
            int32_t next = llama::sampler::argmax(lg.row(0).data(), nv);
            if (next == e.tok.eos() || next == im_end) break;
            out += e.tok.decode_token(next, true);
            lg = e.mdl.forward(s, &next, 1, 1);
        }
        // Exact match of each number in the answer (multivalue: each value counts once).
        int hit = 0;
        for (const std::string& a : c.answers) hit += out.find(a) != std::string::npos;
        const int n = static_cast<int>(c.answers.size());
        r.needle_hits += hit;
        r.needle_n += n;
        r.depth_hits[static_cast<std::size_t>(c.depth)] += hit;
        r.depth_n[static_cast<std::size_t>(c.depth)] += n;
        if (show)
            std::fprintf(stderr, "\n  needle %s: answer %s at token %d of %zu (depth %g)%s, model said '%s'",
                         hit == n ? "HIT " : hit ? "part" : "miss", c.answers.front().c_str(), c.answer_at, c.prompt.size(),
                         o.needle_depths[static_cast<std::size_t>(c.depth)], kept_note.c_str(), out.c_str());
        bar.step(static_cast<long>(c.prompt.size()) + max_new, "needle " + spec);
    }
}

std::string fmt(const char* f, double x) {
    char buf[64];
    std::snprintf(buf, sizeof buf, f, x);
    return buf;
}

void usage() {
    std::fprintf(stderr,
                 "usage: kvc-eval --text FILE --policies 'SPEC;SPEC;...' [--budgets B1,B2] [--out PREFIX]\n"
                 "  --protocols prefill,stream,needle   which protocols to run (default all)\n"
                 "  --reference SPEC      baseline for deltas and agreement (default fp32)\n"
                 "  --context N --score N --windows N --decode-tokens N      prefill protocol (512, 128, 4, 16)\n"
                 "  --stream-tokens N --stream-chunk N                        stream protocol (1024, 16)\n"
                 "  --prefill-chunk N     tokens per forward chunk of a prompt (256); a storage that fits\n"
                 "                        on its first append (pca) sees that many\n"
                 "  --score-chunk N       tokens per forward chunk of the prefill protocol's scored tokens (256); 1\n"
                 "                        scores each as a decode step (decode attention: quest's reads)\n"
                 "  --se-block N        tokens per batch mean of Δppl's standard error (16)\n"
                 "  --needle-text FILE --needle-context N --needle-seeds N --needle-depths D1,D2  (text, 768, 5, 0.1,0.5,0.9)\n"
                 "  --needle-depth-count N   N evenly spaced depths, (2i+1)/2N (8: 1/16, 3/16, ..., 15/16)\n"
                 "  --needle-task single|multikey|multivalue --needle-keys K   (single; 4): K numbers, each under its\n"
                 "                        own key, one asked for; or K numbers under one key, all asked for\n"
                 "  --needle-max-new N    tokens an answer may take (24; multivalue at least 8K+16)\n"
                 "  --dump-needles FILE   every needle trial's text and answers, JSON lines\n"
                 "  --show-needles        print every needle answer and how many streams kept the number's digits\n"
                 "  --dump-kept FILE      kept positions after each prefill compression, JSON lines\n"
                 "  --resume              reuse the rows PREFIX.journal holds from an interrupted run with the same\n"
                 "                        settings (without it the journal starts afresh)\n"
                 "  --model FILE --threads N --page-size N --no-plot --quiet --list\n"
                 "SPEC: see kvc-llama --list-caches; '{b}' in a SPEC is replaced by each budget.\n");
}

}  // namespace

int main(int argc, char** argv) {
    options o;
    bool show_needles = false;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        auto next = [&]() -> std::string {
            if (i + 1 >= argc) {
                std::fprintf(stderr, "kvc-eval: %s needs a value\n", a.c_str());
                std::exit(2);
            }
            return argv[++i];
        };
        if (a == "--text") o.text = next();
        else if (a == "--model") o.model = next();
        else if (a == "--policies") o.policies = split(next(), ';');
        else if (a == "--budgets") o.budgets = split(next(), ',');
        else if (a == "--reference") o.reference = next();
        else if (a == "--out") o.out = next();
        else if (a == "--protocols") {
            auto p = split(next(), ',');
            auto has = [&](const char* n) { return std::find(p.begin(), p.end(), n) != p.end(); };
            o.do_prefill = has("prefill");
            o.do_stream = has("stream");
            o.do_needle = has("needle");
        } else if (a == "--context") o.context = std::stoi(next());
        else if (a == "--score") o.score = std::stoi(next());
        else if (a == "--windows") o.windows = std::stoi(next());
        else if (a == "--decode-tokens") o.decode_tokens = std::stoi(next());
        else if (a == "--stream-tokens") o.stream_tokens = std::stoi(next());
        else if (a == "--stream-chunk") o.stream_chunk = std::stoi(next());
        else if (a == "--se-block") o.se_block = std::stoi(next());
        else if (a == "--needle-text") o.needle_text = next();
        else if (a == "--needle-context") o.needle_context = std::stoi(next());
        else if (a == "--needle-seeds") o.needle_seeds = std::stoi(next());
        else if (a == "--needle-depths") {
            o.needle_depths.clear();
            for (auto& d : split(next(), ',')) o.needle_depths.push_back(std::stod(d));
        } else if (a == "--needle-depth-count") {
            const int n = std::stoi(next());
            if (n < 1) {
                std::fprintf(stderr, "kvc-eval: --needle-depth-count %d, expected >= 1\n", n);
                return 2;
            }
            o.needle_depths.clear();
            for (int d = 0; d < n; ++d) o.needle_depths.push_back((2.0 * d + 1) / (2.0 * n));
        } else if (a == "--needle-task") o.needle_task = next();
        else if (a == "--needle-keys") o.needle_keys = std::stoi(next());
        else if (a == "--needle-max-new") o.needle_max_new = std::stoi(next());
        else if (a == "--dump-needles") o.dump_needles = next();
        else if (a == "--threads") o.threads = std::stoi(next());
        else if (a == "--page-size") o.page_size = std::stoi(next());
        else if (a == "--prefill-chunk") o.prefill_chunk = std::stoi(next());
        else if (a == "--score-chunk") o.score_chunk = std::stoi(next());
        else if (a == "--no-plot") o.plot = false;
        else if (a == "--dump-kept") o.dump_kept = next();
        else if (a == "--quiet") o.quiet = true;
        else if (a == "--resume") o.resume = true;
        else if (a == "--show-needles") show_needles = true;
        else if (a == "--list") {
            for (const auto& s : llama::available_stores()) std::printf("%s\n", s.c_str());
            return 0;
        } else if (a == "-h" || a == "--help") {
            usage();
            return 0;
        } else {
            std::fprintf(stderr, "kvc-eval: unknown argument '%s'\n", a.c_str());
            usage();
            return 2;
        }
    }
    if (o.text.empty() || o.policies.empty()) {
        usage();
        return 2;
    }
    if (o.se_block < 1) {
        std::fprintf(stderr, "kvc-eval: --se-block %d, expected >= 1 token per batch mean\n", o.se_block);
        return 2;
    }
    if (o.score_chunk < 0) {
        std::fprintf(stderr, "kvc-eval: --score-chunk %d, expected >= 1 token per forward chunk (or 0: 256)\n",
                     o.score_chunk);
        return 2;
    }
    if (o.needle_task != "single" && o.needle_task != "multikey" && o.needle_task != "multivalue") {
        std::fprintf(stderr, "kvc-eval: --needle-task '%s', expected single, multikey or multivalue\n", o.needle_task.c_str());
        return 2;
    }
    if (o.needle_keys < 1 || o.needle_keys > needle_key_count) {
        std::fprintf(stderr, "kvc-eval: --needle-keys %d, expected 1 to %d\n", o.needle_keys, needle_key_count);
        return 2;
    }
    if (o.needle_max_new < 1) {
        std::fprintf(stderr, "kvc-eval: --needle-max-new %d, expected >= 1 token\n", o.needle_max_new);
        return 2;
    }
    for (double d : o.needle_depths)
        if (!(d >= 0 && d <= 1)) {
            std::fprintf(stderr, "kvc-eval: --needle-depths %g, expected depths in [0, 1]\n", d);
            return 2;
        }
    if (o.prefill_chunk < 1) {
        std::fprintf(stderr, "kvc-eval: --prefill-chunk %d, expected >= 1 token per forward chunk\n", o.prefill_chunk);
        return 2;
    }
    try {
        if (!o.dump_kept.empty()) {  // one run's lines only: start the file afresh
            std::ofstream dump(o.dump_kept, std::ios::trunc);
            if (!dump) throw std::runtime_error("--dump-kept: cannot write " + o.dump_kept);
        }
        llama::set_threads(o.threads);
        if (o.model.empty()) {
            std::string why;
            o.model = llama::find_model(why);
            if (o.model.empty()) {
                std::fprintf(stderr, "kvc-eval: %s\n", why.c_str());
                return 1;
            }
        }
        llama::gguf_file file(o.model);
        llama::tokenizer tok(file);
        llama::model mdl(file);
        kvc::thread_pool pool(o.threads);
        engine e{file, tok, mdl, {}};
        e.sopt.page_size = o.page_size;
        e.sopt.pool = o.threads > 1 ? &pool : nullptr;
        llama::attach_weights(e.sopt, mdl);  // palu factors W_k and W_v

        auto read_file = [](const std::string& p) {
            std::ifstream in(p, std::ios::binary);
            if (!in) throw std::runtime_error("cannot read text file '" + p + "'");
            return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        };
        const std::vector<int32_t> toks = tok.encode(read_file(o.text));
        const std::vector<int32_t> hay = o.needle_text.empty() ? toks : tok.encode(read_file(o.needle_text));

        // Expand budgets; the reference goes first.
        std::vector<row> rows;
        auto add = [&](const std::string& spec, const std::string& family, const std::string& budget) {
            for (const row& r : rows)
                if (r.spec == spec) return;
            row r;
            r.spec = spec;
            r.family = family;
            r.budget = budget;
            rows.push_back(r);
        };
        add(o.reference, o.reference, "");
        for (std::string p : o.policies) {
            p = trim(p);
            const std::size_t at = p.find("{b}");
            if (at == std::string::npos) {
                add(p, p, "");
                continue;
            }
            if (o.budgets.empty()) throw std::invalid_argument("policy '" + p + "' has {b} but no --budgets were given");
            for (const std::string& b : o.budgets) add(p.substr(0, at) + b + p.substr(at + 3), p, b);
        }
        std::vector<needle_case> needles;
        if (o.do_needle) needles = make_needles(e, o, hay);
        // Rows an interrupted run finished (--resume), by spec; the reference's argmax comes with it.
        std::map<std::string, row> done;
        std::vector<std::vector<int32_t>> ref_a;
        std::vector<int32_t> ref_b;
        const std::string header = journal_header(o, o.model), jpath = o.out + ".journal";
        if (o.resume) {
            std::ifstream in(jpath);
            std::string line;
            if (in && std::getline(in, line)) {
                if (line != header)
                    throw std::runtime_error("--resume: " + jpath + " was written with other settings:\n  " + line +
                                             "\nexpected:\n  " + header + "\n(run without --resume to start afresh)");
                while (std::getline(in, line)) {
                    row r;
                    std::vector<std::vector<int32_t>> ra;
                    std::vector<int32_t> rb;
                    if (!parse_journal_line(line, r, ra, rb)) break;  // the line the interruption cut
                    if (r.spec == o.reference) ref_a = ra, ref_b = rb;
                    done[r.spec] = r;
                }
            }
            if (!done.count(o.reference)) done.clear();  // later rows' agreement needs the reference's tokens
            std::fprintf(stderr, "kvc-eval: --resume: %zu finished rows in %s\n", done.size(), jpath.c_str());
        }
        {  // rewrite the journal with what is kept, so it stays well-formed
            std::ofstream j(jpath, std::ios::trunc);
            j << header << "\n";
            for (const row& r : rows)
                if (done.count(r.spec))
                    j << journal_line(done[r.spec], r.spec == o.reference ? ref_a : std::vector<std::vector<int32_t>>{},
                                      r.spec == o.reference ? ref_b : std::vector<int32_t>{})
                      << "\n";
            if (!j) throw std::runtime_error("cannot write " + jpath);
        }
        long total = 0;
        for (std::size_t i = 0; i < rows.size(); ++i) {
            if (done.count(rows[i].spec)) continue;
            if (o.do_prefill) total += static_cast<long>(o.windows) * (o.context + o.score + o.decode_tokens);
            if (o.do_stream) total += std::min<long>(o.stream_tokens, static_cast<long>(toks.size()));
            for (const auto& c : needles) total += static_cast<long>(c.prompt.size()) + needle_new_tokens(o);
        }
        std::fprintf(stderr, "kvc-eval: %s (%zu tokens), %zu configurations, protocols:%s%s%s\n", o.text.c_str(), toks.size(),
                     rows.size(), o.do_prefill ? " prefill" : "", o.do_stream ? " stream" : "", o.do_needle ? " needle" : "");
        progress bar(total, o.quiet);
        const auto t_start = clock_type::now();
        for (std::size_t i = 0; i < rows.size(); ++i) {
            row& r = rows[i];
            if (done.count(r.spec)) {
                const std::string family = r.family, budget = r.budget;
                r = done[r.spec];
                r.family = family, r.budget = budget;
                continue;
            }
            try {
                llama::parse_store(r.spec, mdl.shape(), e.sopt);  // reject unknown specs before running
                if (o.do_prefill) run_prefill(e, o, toks, r.spec, r, ref_a, i == 0, bar);
                if (o.do_stream) {
                    // A policy may be defined for one-shot use only (noncausal_attention needs a
                    // query per stored token): its stream cells say so and the row keeps the rest.
                    try {
                        run_stream(e, o, toks, r.spec, r, ref_b, i == 0, bar);
                    } catch (const std::exception& ex) {
                        if (i == 0) throw;
                        r.stream_error = ex.what();
                        r.b_n = 0;
                        std::fprintf(stderr, "\nkvc-eval: %s (stream): %s\n", r.spec.c_str(), ex.what());
                    }
                }
                if (o.do_needle) run_needle(e, o, needles, r.spec, r, bar, show_needles);
            } catch (const std::exception& ex) {
                if (i == 0) throw;
                r.error = ex.what();
                std::fprintf(stderr, "\nkvc-eval: %s: %s\n", r.spec.c_str(), ex.what());
            }
            std::ofstream j(jpath, std::ios::app);
            j << journal_line(r, i == 0 ? ref_a : std::vector<std::vector<int32_t>>{}, i == 0 ? ref_b : std::vector<int32_t>{})
              << "\n";
            if (i == 0 && rows.size() > 1 && !o.quiet)  // a rough total: every row costs about the reference's time
                std::fprintf(stderr, "\nkvc-eval: the reference took %.0f s; about %.0f min for the %zu rows left\n",
                             seconds_since(t_start), seconds_since(t_start) * static_cast<double>(rows.size() - 1) / 60,
                             rows.size() - 1);
        }
        bar.finish();

        // ---- report ----
        const row& ref = rows.front();
        const double ref_a_ppl = ref.a_n ? std::exp(ref.a_nll / ref.a_n) : 0;
        const double ref_b_ppl = ref.b_n ? std::exp(ref.b_nll / ref.b_n) : 0;
        std::ofstream csv(o.out + ".csv");
        csv << "spec,family,budget,kv_bytes_per_token,ppl_prefill,dppl_prefill,dppl_prefill_se,agree_prefill,"
               "kv_bytes_per_token_stream,ppl_stream,dppl_stream,dppl_stream_se,agree_stream,needle_acc,needle_n,"
               "prefill_tok_s,decode_tok_s,stream_tok_s,compress_ms,error,needle_by_depth\n";
        std::ostringstream md;
        md << "| policy | KV bytes/token | ppl (prefill) | Δppl | agree | KV bytes/token (stream) | ppl (stream) | Δppl | agree | needle | prefill tok/s | decode tok/s |\n";
        md << "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
        // "hits/n" per depth, in the order of --needle-depths.
        auto by_depth = [](const row& r, const char* sep) {
            std::string b;
            for (std::size_t d = 0; d < r.depth_n.size(); ++d)
                b += (d ? sep : "") + std::to_string(r.depth_hits[d]) + "/" + std::to_string(r.depth_n[d]);
            return b;
        };
        for (const row& r : rows) {
            const double ap = r.a_n ? std::exp(r.a_nll / r.a_n) : NAN, bp = r.b_n ? std::exp(r.b_nll / r.b_n) : NAN;
            const double aa = r.a_agree_n ? r.a_agree / r.a_agree_n : NAN, ba = r.b_agree_n ? r.b_agree / r.b_agree_n : NAN;
            const double na = r.needle_n ? static_cast<double>(r.needle_hits) / r.needle_n : NAN;
            const double ase = dppl_se(r.a_tok, ref.a_tok, ap, o.se_block), bse = dppl_se(r.b_tok, ref.b_tok, bp, o.se_block);
            csv << '"' << r.spec << "\",\"" << r.family << "\"," << r.budget << ',' << r.a_bytes_per_tok << ',' << ap << ','
                << ap - ref_a_ppl << ',' << ase << ',' << aa << ',' << r.b_bytes_per_tok << ',' << bp << ',' << bp - ref_b_ppl
                << ',' << bse << ',' << ba
                << ',' << na << ',' << r.needle_n << ',' << r.prefill_tps << ',' << r.decode_tps << ',' << r.stream_tps << ','
                << r.compress_ms << ",\"" << (r.error.empty() && !r.stream_error.empty() ? "stream: " + r.stream_error : r.error)
                << "\",\"" << by_depth(r, " ") << "\"\n";
            auto cell = [](bool on, const std::string& s) { return on ? s : std::string("–"); };
            auto pm = [](double d, double se) { return fmt("%+.3f", d) + (std::isfinite(se) ? fmt(" ± %.3f", se) : ""); };
            const bool stream_ok = o.do_stream && r.stream_error.empty();
            if (!r.error.empty()) {
                md << "| `" << r.spec << "` | error: " << r.error << " |||||||||||\n";
                continue;
            }
            md << "| `" << r.spec << "` | " << cell(o.do_prefill, fmt("%.0f", r.a_bytes_per_tok)) << " | "
               << cell(o.do_prefill, fmt("%.3f", ap)) << " | " << cell(o.do_prefill, pm(ap - ref_a_ppl, ase)) << " | "
               << cell(o.do_prefill, fmt("%.1f%%", 100 * aa)) << " | "
               << (o.do_stream && !stream_ok ? std::string("n/a¹ | n/a¹ | n/a¹ | n/a¹")
                                             : cell(o.do_stream, fmt("%.0f", r.b_bytes_per_tok)) + " | " +
                                                   cell(o.do_stream, fmt("%.3f", bp)) + " | " +
                                                   cell(o.do_stream, pm(bp - ref_b_ppl, bse)) + " | " +
                                                   cell(o.do_stream, fmt("%.1f%%", 100 * ba)))
               << " | "
               << cell(o.do_needle, std::to_string(r.needle_hits) + "/" + std::to_string(r.needle_n)) << " | "
               << cell(o.do_prefill, fmt("%.0f", r.prefill_tps)) << " | " << cell(o.do_prefill, fmt("%.1f", r.decode_tps))
               << " |\n";
        }
        if (o.do_needle && o.needle_depths.size() > 1) {  // retrieval at depth
            md << "\nNeedle (" << o.needle_task << (o.needle_task == "single" ? "" : ", " + std::to_string(o.needle_keys) + " keys")
               << ") by depth of the needle asked for:\n\n| policy |";
            for (double d : o.needle_depths) md << ' ' << fmt("%.3g", d) << " |";
            md << " all |\n|---|";
            for (std::size_t d = 0; d <= o.needle_depths.size(); ++d) md << "---:|";
            md << "\n";
            for (const row& r : rows) {
                if (!r.error.empty() || r.depth_n.size() != o.needle_depths.size()) continue;
                md << "| `" << r.spec << "` |";
                for (std::size_t d = 0; d < r.depth_n.size(); ++d)
                    md << ' ' << r.depth_hits[d] << '/' << r.depth_n[d] << " |";
                md << ' ' << r.needle_hits << '/' << r.needle_n << " |\n";
            }
        }
        bool notes = false;
        for (const row& r : rows)
            if (r.error.empty() && !r.stream_error.empty()) {
                if (!notes) md << "\n¹ the stream protocol does not apply:\n";
                notes = true;
                md << "- `" << r.spec << "`: " << r.stream_error << "\n";
            }
        csv.close();
        std::ofstream(o.out + ".md") << md.str();
        std::cout << md.str();
        std::fprintf(stderr, "kvc-eval: wrote %s.csv and %s.md\n", o.out.c_str(), o.out.c_str());
        if (o.plot) {
            const std::string script = std::string(KVC_LLAMA_SOURCE_ROOT) + "/examples/llama/eval/plot.py";
            const std::string cmd = "python3 '" + script + "' '" + o.out + ".csv' '" + o.out + ".png'";
            if (std::system(cmd.c_str()) != 0)
                std::fprintf(stderr, "kvc-eval: the plot %s.png was NOT written (needs python3 with matplotlib: "
                                     "python3 -m pip install matplotlib)\n", o.out.c_str());
        }
    } catch (const std::exception& ex) {
        std::fprintf(stderr, "\nkvc-eval: error: %s\n", ex.what());
        return 1;
    }
    return 0;
}
