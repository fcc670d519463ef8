// SPDX-License-Identifier: Apache-2.0
/// \file fuzz_gguf.cpp
/// GGUF files as hostile input: the reader (from memory, so a read past the image is an ASan
/// report), every metadata accessor, the hyper-parameter reading of the Llama engine, the
/// tokenizer built from the file's vocabulary, and the dequantisation of small tensors. The only
/// acceptable failure is a std::runtime_error (gguf_error, or the tokenizer's "no unknown token")
/// with a message; every tensor view must lie inside the image.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "gguf.hpp"
#include "model.hpp"
#include "quants.hpp"
#include "tokenizer.hpp"

namespace {

[[noreturn]] void finding(const char* what, const std::string& detail) {
  std::fprintf(stderr, "fuzz_gguf: %s: %s\n", what, detail.c_str());
  std::abort();
}

template <class F>
void expect_clean(F&& f) {
  try {
    f();
  } catch (const std::runtime_error& e) {
    if (std::string(e.what()).empty()) finding("error without a message", "");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  std::vector<uint8_t> bytes(data, data + size);
  try {
    const llama::gguf_file f(std::move(bytes), "fuzz.gguf");
    if (f.alignment() == 0 || (f.alignment() & (f.alignment() - 1)) != 0) finding("alignment", "not a power of two");
    for (const auto& t : f.tensors()) {
      // Touch the first and last byte of every view: ASan reports a view outside the copy.
      volatile uint8_t sink = 0;
      if (t.bytes) sink = static_cast<uint8_t>(t.data[0] ^ t.data[t.bytes - 1]);
      (void)sink;
      if (t.bytes > f.file_size()) finding("tensor larger than the file", t.name);
      if (t.bytes <= (1u << 16)) {
        expect_clean([&] {
          std::vector<float> out(static_cast<std::size_t>(t.elements()));
          llama::dequantize_tensor(t, out.data());
        });
      }
      expect_clean([&] { (void)t.rows(); });
    }
    for (const auto& kv : f.metadata()) {
      expect_clean([&] { (void)f.get_int(kv.first); });
      expect_clean([&] { (void)f.get_int_in(kv.first, -1, 1 << 20); });
      expect_clean([&] { (void)f.get_float(kv.first); });
      expect_clean([&] { (void)f.get_bool(kv.first, false); });
      expect_clean([&] { (void)f.get_string(kv.first); });
      expect_clean([&] { (void)f.get_array(kv.first); });
    }
    expect_clean([&] { (void)llama::read_hparams(f); });
    expect_clean([&] {
      const llama::tokenizer tok(f);
      const auto ids = tok.encode("Hello world 123 <|im_start|>user\n\xff\xfe", true);
      for (auto id : ids)
        if (id < 0 || static_cast<std::size_t>(id) >= tok.vocab_size()) finding("token id outside the vocabulary", "");
      (void)tok.decode(ids);
    });
  } catch (const llama::gguf_error& e) {
    if (std::string(e.what()).empty()) finding("gguf_error without a message", "");
  }
  return 0;
}
