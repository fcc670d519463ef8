// SPDX-License-Identifier: Apache-2.0
/// \file gguf_writer.hpp
/// Writes small GGUF images in memory, field by field, so tests and fuzz targets can build a
/// vocabulary or a malformed header without a model file. It writes exactly what it is told
/// (including counts that do not match what follows): that is how the hostile cases are made.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace kvc_test {

class gguf_writer {
 public:
  enum type : uint32_t { u8 = 0, i8 = 1, u16 = 2, i16 = 3, u32 = 4, i32 = 5, f32 = 6, boolean = 7, str = 8,
                         arr = 9, u64 = 10, i64 = 11, f64 = 12 };

  /// The header: magic, version, tensor count, metadata count.
  gguf_writer(uint64_t n_tensors, uint64_t n_kv, uint32_t version = 3) {
    bytes.insert(bytes.end(), {'G', 'G', 'U', 'F'});
    put(version);
    put(n_tensors);
    put(n_kv);
  }

  template <class T>
  gguf_writer& put(T x) {
    const auto* p = reinterpret_cast<const uint8_t*>(&x);
    bytes.insert(bytes.end(), p, p + sizeof(T));
    return *this;
  }
  gguf_writer& put_string(const std::string& s) {
    put(static_cast<uint64_t>(s.size()));
    bytes.insert(bytes.end(), s.begin(), s.end());
    return *this;
  }
  /// key, type code, then the caller puts the value.
  gguf_writer& key(const std::string& k, uint32_t t) {
    put_string(k);
    return put(t);
  }
  gguf_writer& kv_string(const std::string& k, const std::string& v) { return key(k, str).put_string(v); }
  gguf_writer& kv_u32(const std::string& k, uint32_t v) { return key(k, u32).put(v); }
  gguf_writer& kv_i64(const std::string& k, int64_t v) { return key(k, i64).put(v); }
  gguf_writer& kv_u64(const std::string& k, uint64_t v) { return key(k, u64).put(v); }
  gguf_writer& kv_i32(const std::string& k, int32_t v) { return key(k, i32).put(v); }
  gguf_writer& kv_f32(const std::string& k, float v) { return key(k, f32).put(v); }
  gguf_writer& kv_strings(const std::string& k, const std::vector<std::string>& v) {
    key(k, arr).put(static_cast<uint32_t>(str)).put(static_cast<uint64_t>(v.size()));
    for (const auto& s : v) put_string(s);
    return *this;
  }
  gguf_writer& kv_i32s(const std::string& k, const std::vector<int32_t>& v) {
    key(k, arr).put(static_cast<uint32_t>(i32)).put(static_cast<uint64_t>(v.size()));
    for (int32_t x : v) put(x);
    return *this;
  }
  /// One tensor-table entry: name, rank, dims, ggml type, offset into the data section.
  gguf_writer& tensor(const std::string& name, const std::vector<uint64_t>& dims, uint32_t ggml_type,
                      uint64_t offset) {
    put_string(name);
    put(static_cast<uint32_t>(dims.size()));
    for (uint64_t d : dims) put(d);
    put(ggml_type);
    return put(offset);
  }
  /// Pads to `alignment` and appends `n` bytes of tensor data (a ramp, so it is not all zeros).
  gguf_writer& data(std::size_t n, std::size_t alignment = 32) {
    while (bytes.size() % alignment) bytes.push_back(0);
    for (std::size_t i = 0; i < n; ++i) bytes.push_back(static_cast<uint8_t>(i * 7 + 1));
    return *this;
  }

  std::vector<uint8_t> bytes;
};

/// The GPT-2 byte-to-code-point table as UTF-8 strings (the symbol of each byte).
inline std::vector<std::string> byte_symbols() {
  std::vector<std::string> out(256);
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    const uint32_t cp = printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + n++);
    std::string s;
    if (cp < 0x80) {
      s += static_cast<char>(cp);
    } else {
      s += static_cast<char>(0xC0 | (cp >> 6));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    }
    out[static_cast<std::size_t>(b)] = s;
  }
  return out;
}

/// A small byte-level BPE vocabulary as a GGUF image: the 256 byte symbols, a few merges (English
/// and digits, with their merged tokens), and three control tokens. `pre` is the pre-tokenizer.
inline std::vector<uint8_t> tiny_vocab_gguf(const std::string& pre) {
  std::vector<std::string> tokens = byte_symbols();
  std::vector<int32_t> kinds(tokens.size(), 1);
  const std::string sp = tokens[' '];  // "Ġ"
  const std::vector<std::pair<std::string, std::string>> merges = {
      {"t", "h"}, {"th", "e"}, {sp, "the"}, {"i", "n"}, {"in", "g"}, {sp, "a"}, {"e", "r"}, {sp, "t"},
      {"o", "n"}, {"1", "2"}, {"l", "l"}, {"h", "e"}, {"he", "ll"}, {"hell", "o"}, {sp, sp}};
  std::vector<std::string> merge_text;
  for (const auto& m : merges) {
    tokens.push_back(m.first + m.second);
    kinds.push_back(1);
    merge_text.push_back(m.first + " " + m.second);
  }
  for (const char* s : {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}) {
    tokens.push_back(s);
    kinds.push_back(3);
  }
  gguf_writer w(0, 7);
  w.kv_string("general.architecture", "llama")
      .kv_string("tokenizer.ggml.model", "gpt2")
      .kv_string("tokenizer.ggml.pre", pre)
      .kv_strings("tokenizer.ggml.tokens", tokens)
      .kv_i32s("tokenizer.ggml.token_type", kinds)
      .kv_strings("tokenizer.ggml.merges", merge_text)
      .kv_u32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(tokens.size() - 3));
  return w.bytes;
}

}  // namespace kvc_test
