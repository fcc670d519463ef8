// SPDX-License-Identifier: Apache-2.0
/// \file tokenizer.hpp
/// Byte-level BPE (the GPT-2 scheme) built from a GGUF file's vocabulary, merges and
/// pre-tokenizer name. Text is split into pieces by the pre-tokenizer, each piece's bytes are
/// mapped to printable code points, and adjacent symbols are merged by merge rank until no
/// ranked pair remains. Because every byte has a token, encode→decode returns the input bytes
/// exactly, whatever the text.
#pragma once

#include <algorithm>
#include <array>
#include <stdexcept>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "gguf.hpp"
#include "unicode_ranges.hpp"

namespace llama {

using token_id = int32_t;

namespace unicode {

template <std::size_t N>
inline bool in_ranges(const code_range (&r)[N], uint32_t cp) {
    std::size_t lo = 0, hi = N;
    while (lo < hi) {
        std::size_t mid = (lo + hi) / 2;
        if (cp > r[mid].last) lo = mid + 1;
        else if (cp < r[mid].first) hi = mid;
        else return true;
    }
    return false;
}
inline bool is_letter(uint32_t cp) {
    if (cp < 0x80) return (cp | 0x20) >= 'a' && (cp | 0x20) <= 'z';
    return in_ranges(letter_ranges, cp);
}
inline bool is_number(uint32_t cp) {
    if (cp < 0x80) return cp >= '0' && cp <= '9';
    return in_ranges(number_ranges, cp);
}
/// Unicode White_Space, which is what `\s` means in the regex engines tokenizers use.
inline bool is_space(uint32_t cp) {
    return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
           cp == 0x3000;
}

/// One decoded code point and the byte span it came from. Invalid UTF-8 bytes become
/// single-byte "code points" outside every category, so they still round-trip.
struct cp_span {
    uint32_t cp;
    uint32_t begin, end;
};

inline std::vector<cp_span> decode_utf8(std::string_view s) {
    std::vector<cp_span> out;
    out.reserve(s.size());
    std::size_t i = 0;
    const auto* p = reinterpret_cast<const unsigned char*>(s.data());
    while (i < s.size()) {
        unsigned char c = p[i];
        int len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
        bool ok = len > 0 && i + len <= s.size();
        uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1Fu) : len == 3 ? (c & 0x0Fu) : (c & 0x07u);
        for (int k = 1; ok && k < len; ++k) {
            if ((p[i + k] & 0xC0) != 0x80) ok = false;
            else cp = cp << 6 | (p[i + k] & 0x3Fu);
        }
        if (!ok) {
            out.push_back({0xFFFFFFFFu, static_cast<uint32_t>(i), static_cast<uint32_t>(i + 1)});
            ++i;
            continue;
        }
        out.push_back({cp, static_cast<uint32_t>(i), static_cast<uint32_t>(i + len)});
        i += len;
    }
    return out;
}

inline void append_utf8(std::string& s, uint32_t cp) {
    if (cp < 0x80) s += static_cast<char>(cp);
    else if (cp < 0x800) {
        s += static_cast<char>(0xC0 | (cp >> 6));
        s += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        s += static_cast<char>(0xE0 | (cp >> 12));
        s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        s += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
        s += static_cast<char>(0xF0 | (cp >> 18));
        s += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
        s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        s += static_cast<char>(0x80 | (cp & 0x3F));
    }
}

}  // namespace unicode

/// Splits text into pre-tokens. `split_digits` isolates every numeric code point first
/// (the "smollm"/"starcoder" pre-tokenizers); the rest is the GPT-2 pattern
///   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
/// evaluated by hand, alternative by alternative, as a backtracking regex engine would.
inline std::vector<std::string_view> pretokenize(std::string_view text, bool split_digits) {
    using namespace unicode;
    const std::vector<cp_span> cps = decode_utf8(text);
    std::vector<std::string_view> out;
    auto emit = [&](std::size_t a, std::size_t b) {  // code-point indices [a, b)
        if (a < b) out.push_back(text.substr(cps[a].begin, cps[b - 1].end - cps[a].begin));
    };
    auto gpt2 = [&](std::size_t lo, std::size_t hi) {
        std::size_t i = lo;
        auto cp = [&](std::size_t k) { return k < hi ? cps[k].cp : 0xFFFFFFFFu; };
        auto letter = [&](std::size_t k) { return k < hi && is_letter(cps[k].cp); };
        auto number = [&](std::size_t k) { return k < hi && is_number(cps[k].cp); };
        auto space = [&](std::size_t k) { return k < hi && is_space(cps[k].cp); };
        auto other = [&](std::size_t k) { return k < hi && !is_space(cps[k].cp) && !is_letter(cps[k].cp) && !is_number(cps[k].cp); };
        while (i < hi) {
            // contractions (case-sensitive, as in GPT-2)
            if (cp(i) == '\'') {
                uint32_t a = cp(i + 1), b = cp(i + 2);
                std::size_t n = 0;
                if (a == 's' || a == 't' || a == 'm' || a == 'd') n = 2;
                else if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) n = 3;
                if (n) {
                    emit(i, i + n);
                    i += n;
                    continue;
                }
            }
            const std::size_t s = (cp(i) == ' ') ? i + 1 : i;  // the optional leading space
            std::size_t j = s;
            if (letter(s)) {
                while (letter(j)) ++j;
            } else if (number(s)) {
                while (number(j)) ++j;
            } else if (other(s)) {
                while (other(j)) ++j;
            }
            if (j > s) {
                emit(i, j);
                i = j;
                continue;
            }
            // whitespace: \s+(?!\S) then \s+
            j = i;
            while (space(j)) ++j;
            if (j > i) {
                if (j < hi && j - i > 1) --j;  // leave the last space for the next word
                emit(i, j);
                i = j;
                continue;
            }
            emit(i, i + 1);  // unreachable for valid categories; keeps progress guaranteed
            ++i;
        }
    };
    if (!split_digits) {
        gpt2(0, cps.size());
        return out;
    }
    std::size_t start = 0;
    for (std::size_t k = 0; k < cps.size(); ++k) {
        if (is_number(cps[k].cp)) {
            gpt2(start, k);
            emit(k, k + 1);
            start = k + 1;
        }
    }
    gpt2(start, cps.size());
    return out;
}

/// The GPT-2 byte↔code-point table: printable bytes map to themselves, the others to 256+n.
struct byte_map {
    std::array<uint32_t, 256> to_cp{};
    std::unordered_map<uint32_t, uint8_t> to_byte;
    byte_map() {
        int n = 0;
        for (int b = 0; b < 256; ++b) {
            bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
            to_cp[b] = printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + n++);
            to_byte[to_cp[b]] = static_cast<uint8_t>(b);
        }
    }
};

class tokenizer {
public:
    enum token_kind : int32_t { normal = 1, unknown = 2, control = 3, user_defined = 4, unused = 5, byte = 6 };

    explicit tokenizer(const gguf_file& f) {
        const std::string model = f.get_string("tokenizer.ggml.model");
        if (model != "gpt2")
            throw gguf_error("tokenizer: model '" + model + "' is not supported (only byte-level BPE, 'gpt2')");
        pre_ = f.has("tokenizer.ggml.pre") ? f.get_string("tokenizer.ggml.pre") : "default";
        // Pre-tokenizers that are "split every digit, then the GPT-2 pattern".
        static const char* digit_split[] = {"smollm", "starcoder", "refact", "command-r", "codeshell"};
        static const char* plain[] = {"gpt2", "default", "mpt", "olmo", "jais"};
        if (std::find_if(std::begin(digit_split), std::end(digit_split), [&](const char* s) { return pre_ == s; }) != std::end(digit_split))
            split_digits_ = true;
        else if (std::find_if(std::begin(plain), std::end(plain), [&](const char* s) { return pre_ == s; }) == std::end(plain))
            throw gguf_error("tokenizer: pre-tokenizer '" + pre_ + "' is not implemented by this example");

        const gguf_array& toks = f.get_array("tokenizer.ggml.tokens");
        if (toks.items.size() > static_cast<std::size_t>(std::numeric_limits<token_id>::max()))
            throw gguf_error("tokenizer: tokenizer.ggml.tokens has " + std::to_string(toks.items.size()) +
                             " entries, expected at most 2^31 - 1 (token ids are 32-bit)");
        vocab_.reserve(toks.items.size());
        for (const gguf_value& v : toks.items) {
            auto* s = std::get_if<std::string>(&v.v);
            if (!s) throw gguf_error("tokenizer: tokenizer.ggml.tokens holds a non-string");
            vocab_.push_back(*s);
        }
        kinds_.assign(vocab_.size(), normal);
        if (f.has("tokenizer.ggml.token_type")) {
            const gguf_array& tt = f.get_array("tokenizer.ggml.token_type");
            if (tt.items.size() != vocab_.size())
                throw gguf_error("tokenizer: token_type has " + std::to_string(tt.items.size()) + " entries for " +
                                 std::to_string(vocab_.size()) + " tokens");
            for (std::size_t i = 0; i < tt.items.size(); ++i) {
                const auto& v = tt.items[i].v;
                // Kinds outside 1..6 are kept as "normal" rather than wrapped into a valid kind.
                int64_t k = normal;
                if (auto* x = std::get_if<int64_t>(&v)) k = *x;
                else if (auto* u = std::get_if<uint64_t>(&v)) k = *u <= byte ? static_cast<int64_t>(*u) : int64_t{normal};
                kinds_[i] = k >= normal && k <= byte ? static_cast<int32_t>(k) : int32_t{normal};
            }
        }
        for (std::size_t i = 0; i < vocab_.size(); ++i) {
            id_of_.emplace(vocab_[i], static_cast<token_id>(i));
            // An empty special would match everywhere and never advance encode(): not matchable.
            if ((kinds_[i] == control || kinds_[i] == user_defined) && !vocab_[i].empty())
                specials_.push_back(static_cast<token_id>(i));
        }
        // Longest special first so that a prefix never shadows a longer special token.
        std::sort(specials_.begin(), specials_.end(), [&](token_id a, token_id b) { return vocab_[a].size() > vocab_[b].size(); });

        const gguf_array& merges = f.get_array("tokenizer.ggml.merges");
        ranks_.reserve(merges.items.size());
        for (std::size_t r = 0; r < merges.items.size(); ++r) {
            auto* s = std::get_if<std::string>(&merges.items[r].v);
            if (!s || s->find(' ') == std::string::npos)
                throw gguf_error("tokenizer: merge #" + std::to_string(r) + " is not of the form 'left right'");
            ranks_.emplace(*s, static_cast<int>(r));
        }
        // Ids index the vocabulary: range-checked, never truncated to 32 bits (-1: none).
        const int64_t last = static_cast<int64_t>(vocab_.size()) - 1;
        bos_ = static_cast<token_id>(f.get_int_in("tokenizer.ggml.bos_token_id", -1, last, -1));
        eos_ = static_cast<token_id>(f.get_int_in("tokenizer.ggml.eos_token_id", -1, last, -1));
        add_bos_ = f.get_bool("tokenizer.ggml.add_bos_token", false);
        unk_ = static_cast<token_id>(f.get_int_in("tokenizer.ggml.unknown_token_id", -1, last, -1));
        // Vocabularies trained on UTF-8 text may lack tokens for bytes that never occur in it
        // (SmolLM2 lacks 21: a few C0 controls and bytes that are never valid in UTF-8).
        // Such a byte encodes as the unknown token; every other byte round-trips.
        for (int b = 0; b < 256; ++b) {
            std::string sym;
            unicode::append_utf8(sym, bytes_.to_cp[b]);
            auto it = id_of_.find(sym);
            byte_token_[b] = it == id_of_.end() ? unk_ : it->second;
            if (it == id_of_.end()) ++missing_bytes_;
        }
    }

    std::size_t vocab_size() const { return vocab_.size(); }
    token_id bos() const { return bos_; }
    token_id eos() const { return eos_; }
    bool add_bos() const { return add_bos_; }
    const std::string& pre_tokenizer() const { return pre_; }
    /// How many of the 256 byte symbols have no token (those bytes encode as unknown).
    int missing_byte_tokens() const { return missing_bytes_; }
    const std::string& token_text(token_id id) const { return vocab_.at(static_cast<std::size_t>(id)); }
    bool is_control(token_id id) const { return kinds_.at(static_cast<std::size_t>(id)) == control; }
    /// Id of a token given by its exact vocabulary string (e.g. "<|im_end|>"), or -1.
    token_id find(const std::string& s) const {
        auto it = id_of_.find(s);
        return it == id_of_.end() ? -1 : it->second;
    }

    /// Encodes text. With `parse_special`, control tokens written in the text
    /// (e.g. "<|im_start|>") become their ids; plain text never contains them otherwise.
    std::vector<token_id> encode(std::string_view text, bool parse_special = false) const {
        std::vector<token_id> out;
        if (!parse_special) {
            encode_plain(text, out);
            return out;
        }
        std::size_t pos = 0;
        while (pos < text.size()) {
            std::size_t best = std::string_view::npos;
            token_id best_id = -1;
            for (token_id id : specials_) {
                std::size_t at = text.find(vocab_[id], pos);
                if (at != std::string_view::npos && (at < best || (at == best && vocab_[id].size() > vocab_[best_id].size()))) {
                    best = at;
                    best_id = id;
                }
            }
            if (best_id < 0) break;
            encode_plain(text.substr(pos, best - pos), out);
            out.push_back(best_id);
            pos = best + vocab_[best_id].size();
        }
        if (pos < text.size()) encode_plain(text.substr(pos), out);
        return out;
    }

    /// Bytes of one token. Control tokens render as their text unless `skip_control`.
    std::string decode_token(token_id id, bool skip_control = false) const {
        const std::string& t = vocab_.at(static_cast<std::size_t>(id));
        const int32_t k = kinds_[static_cast<std::size_t>(id)];
        if (k == control || k == user_defined) return skip_control && k == control ? std::string() : t;
        std::string out;
        for (const auto& c : unicode::decode_utf8(t)) {
            auto it = bytes_.to_byte.find(c.cp);
            if (it != bytes_.to_byte.end()) out += static_cast<char>(it->second);
            else out.append(t, c.begin, c.end - c.begin);  // not byte-level: keep verbatim
        }
        return out;
    }
    std::string decode(const std::vector<token_id>& ids, bool skip_control = false) const {
        std::string s;
        for (token_id id : ids) s += decode_token(id, skip_control);
        return s;
    }

private:
    void encode_plain(std::string_view text, std::vector<token_id>& out) const {
        for (std::string_view piece : pretokenize(text, split_digits_)) {
            auto hit = cache_.find(std::string(piece));
            if (hit != cache_.end()) {
                out.insert(out.end(), hit->second.begin(), hit->second.end());
                continue;
            }
            std::vector<token_id> ids = bpe(piece);
            out.insert(out.end(), ids.begin(), ids.end());
            if (cache_.size() < 200000) cache_.emplace(std::string(piece), std::move(ids));
        }
    }

    /// Merges one piece: start from one symbol per byte and repeatedly merge the adjacent
    /// pair of lowest rank (all its occurrences, left to right), as GPT-2 does.
    std::vector<token_id> bpe(std::string_view piece) const {
        std::vector<std::string> sym;
        sym.reserve(piece.size());
        for (unsigned char c : piece) {
            std::string s;
            unicode::append_utf8(s, bytes_.to_cp[c]);
            sym.push_back(std::move(s));
        }
        std::string key;
        while (sym.size() > 1) {
            int best_rank = -1;
            for (std::size_t i = 0; i + 1 < sym.size(); ++i) {
                key.assign(sym[i]).append(" ").append(sym[i + 1]);
                auto it = ranks_.find(key);
                if (it != ranks_.end() && (best_rank < 0 || it->second < best_rank)) best_rank = it->second;
            }
            if (best_rank < 0) break;
            std::vector<std::string> next;
            next.reserve(sym.size());
            for (std::size_t i = 0; i < sym.size(); ++i) {
                if (i + 1 < sym.size()) {
                    key.assign(sym[i]).append(" ").append(sym[i + 1]);
                    auto it = ranks_.find(key);
                    if (it != ranks_.end() && it->second == best_rank) {
                        next.push_back(sym[i] + sym[i + 1]);
                        ++i;
                        continue;
                    }
                }
                next.push_back(std::move(sym[i]));
            }
            sym.swap(next);
        }
        std::vector<token_id> ids;
        for (const std::string& s : sym) {
            auto it = id_of_.find(s);
            if (it != id_of_.end()) {
                ids.push_back(it->second);
                continue;
            }
            // A merged symbol without a token cannot happen in a consistent file; fall back
            // to its bytes so that the text still round-trips.
            for (const auto& c : unicode::decode_utf8(s)) {
                const token_id b = byte_token_[bytes_.to_byte.at(c.cp)];
                if (b < 0) throw std::runtime_error("tokenizer: byte " + std::to_string(bytes_.to_byte.at(c.cp)) +
                                                    " has no token and the vocabulary has no unknown token");
                ids.push_back(b);
            }
        }
        return ids;
    }

    std::string pre_;
    bool split_digits_ = false;
    std::vector<std::string> vocab_;
    std::vector<int32_t> kinds_;
    std::unordered_map<std::string, token_id> id_of_;
    std::unordered_map<std::string, int> ranks_;
    std::vector<token_id> specials_;
    std::array<token_id, 256> byte_token_{};
    byte_map bytes_;
    token_id bos_ = -1, eos_ = -1, unk_ = -1;
    int missing_bytes_ = 0;
    bool add_bos_ = false;
    mutable std::unordered_map<std::string, std::vector<token_id>> cache_;
};

}  // namespace llama
