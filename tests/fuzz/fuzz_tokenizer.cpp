// SPDX-License-Identifier: Apache-2.0
/// \file fuzz_tokenizer.cpp
/// The tokenizer on arbitrary bytes, over a small synthetic byte-level vocabulary (no model file):
/// the first byte picks the pre-tokenizer (GPT-2 or SmolLM's digit split) and whether control
/// tokens are parsed; the rest is the text. Checked: every id is in the vocabulary, decode(encode(x))
/// returns x exactly (the vocabulary has all 256 byte symbols), and encoding is deterministic
/// (the second encode goes through the tokenizer's piece cache).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "gguf_writer.hpp"
#include "tokenizer.hpp"

namespace {

const llama::tokenizer& tokenizer_for(bool digits) {
  static const llama::gguf_file gpt2(kvc_test::tiny_vocab_gguf("gpt2"), "tiny-gpt2");
  static const llama::gguf_file smollm(kvc_test::tiny_vocab_gguf("smollm"), "tiny-smollm");
  static const llama::tokenizer a(gpt2), b(smollm);
  return digits ? b : a;
}

[[noreturn]] void finding(const char* what, std::string_view text) {
  std::fprintf(stderr, "fuzz_tokenizer: %s (input of %zu bytes)\n", what, text.size());
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const bool digits = data[0] & 1, special = data[0] & 2;
  const std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
  const llama::tokenizer& tok = tokenizer_for(digits);
  if (tok.missing_byte_tokens() != 0) finding("the synthetic vocabulary lacks byte tokens", text);
  const auto ids = tok.encode(text, special);
  for (auto id : ids)
    if (id < 0 || static_cast<std::size_t>(id) >= tok.vocab_size()) finding("token id outside the vocabulary", text);
  if (tok.decode(ids) != text) finding("decode(encode(text)) != text", text);
  if (tok.encode(text, special) != ids) finding("encoding is not deterministic", text);
  if (!text.empty() && ids.empty()) finding("non-empty text encoded to no token", text);
  return 0;
}
