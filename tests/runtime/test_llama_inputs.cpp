// SPDX-License-Identifier: Apache-2.0
// Hostile GGUF files and vocabularies (issue 16) against the llama example's reader, hyper-parameter
// reading and tokenizer. Each case below was accepted silently, truncated a value, divided by zero,
// looped forever or reserved memory the file cannot back before the reader checked it.
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "gguf.hpp"
#include "gguf_writer.hpp"
#include "model.hpp"
#include "tokenizer.hpp"

#include "kvc_catch.hpp"

using kvc_test::gguf_writer;
using llama::gguf_error;
using llama::gguf_file;

namespace {

constexpr uint32_t f32 = 0;

gguf_file parse(const gguf_writer& w) { return gguf_file(w.bytes, "test.gguf"); }

/// The metadata of a tiny Llama (no tensors), with `edit` applied to one key's entry.
gguf_writer llama_meta(const std::string& key, uint32_t type, uint64_t raw, std::size_t raw_size) {
  gguf_writer w(0, 6);
  w.kv_string("general.architecture", "llama");
  const std::pair<const char*, uint32_t> keys[] = {{"llama.embedding_length", 64}, {"llama.feed_forward_length", 128},
                                                   {"llama.block_count", 2}, {"llama.attention.head_count", 4},
                                                   {"llama.attention.head_count_kv", 2}};
  for (const auto& k : keys) {
    if (key == k.first) {
      w.key(k.first, type);
      for (std::size_t i = 0; i < raw_size; ++i) w.put(static_cast<uint8_t>(raw >> (8 * i)));
    } else {
      w.kv_u32(k.first, k.second);
    }
  }
  return w;
}

}  // namespace

TEST_CASE("gguf: a tensor whose element count overflows 64 bits is refused", "[llama][hostile]") {
  gguf_writer w(1, 0);
  w.tensor("t", {uint64_t{1} << 32, uint64_t{1} << 32, 16}, f32, 0).data(64);
  // Before: the product wrapped to 0 and the tensor was accepted with 0 bytes.
  REQUIRE_THROWS_WITH(parse(w), Catch::Contains("tensor 't' of shape [4294967296, 4294967296, 16] has more than 2^64 elements"));
  llama::gguf_tensor t;
  t.name = "h";
  t.dims = {uint64_t{1} << 40, uint64_t{1} << 40};
  REQUIRE_THROWS_AS(t.elements(), gguf_error);
}

TEST_CASE("gguf: a zero dimension is refused and rows() never divides by it", "[llama][hostile]") {
  gguf_writer w(1, 0);
  w.tensor("t", {0, 4}, f32, 0).data(64);
  // Before: accepted; rows() then computed 0 / 0 (SIGFPE).
  REQUIRE_THROWS_WITH(parse(w), Catch::Contains("tensor 't' dimension 0 is 0, expected every dimension >= 1"));
  llama::gguf_tensor t;
  t.dims = {0, 4};
  CHECK(t.rows() == 0);
}

TEST_CASE("gguf: general.alignment must be a power of two in [1, 2^30]", "[llama][hostile]") {
  gguf_writer neg(0, 1);
  neg.kv_i32("general.alignment", -32);
  REQUIRE_THROWS_WITH(parse(neg), Catch::Contains("general.alignment' = -32, expected a value in [1, 1073741824]"));
  // INT64_MIN cast to size_t is 2^63, a power of two: before, the file was accepted with it.
  gguf_writer min(0, 1);
  min.kv_i64("general.alignment", std::numeric_limits<int64_t>::min());
  REQUIRE_THROWS_WITH(parse(min), Catch::Contains("expected a value in [1, 1073741824]"));
  gguf_writer odd(0, 1);
  odd.kv_u32("general.alignment", 48);
  REQUIRE_THROWS_WITH(parse(odd), Catch::Contains("general.alignment = 48, expected a power of two"));
  gguf_writer ok(0, 1);
  ok.kv_u32("general.alignment", 64);
  CHECK(parse(ok).alignment() == 64);
}

TEST_CASE("gguf: counts and lengths are bounded by the bytes left before anything is reserved", "[llama][hostile]") {
  // An array claiming 2^20 elements in a file of a few dozen bytes: before, reserve(2^20 values)
  // ran (any count up to the file size passed), then the read hit the end.
  gguf_writer arr(0, 1);
  arr.key("big", gguf_writer::arr).put(uint32_t{gguf_writer::u8}).put(uint64_t{1} << 20);
  REQUIRE_THROWS_WITH(parse(arr), Catch::Contains("array 'big' claims 1048576 elements") &&
                                      Catch::Contains("expected at most 0"));
  gguf_writer strs(0, 1);
  strs.key("names", gguf_writer::arr).put(uint32_t{gguf_writer::str}).put(uint64_t{3}).put_string("a");
  REQUIRE_THROWS_WITH(parse(strs), Catch::Contains("array 'names' claims 3 elements"));
  gguf_writer str(0, 1);
  str.key("s", gguf_writer::str).put(uint64_t{1000});
  str.bytes.insert(str.bytes.end(), {'s', 'h', 'o', 'r', 't'});
  REQUIRE_THROWS_WITH(parse(str), Catch::Contains("file truncated while reading s at byte"));
  gguf_writer hdr(1000, 1000);
  REQUIRE_THROWS_WITH(parse(hdr), Catch::Contains("header claims 1000 metadata entries and 1000 tensors"));
  gguf_writer dup(0, 2);
  dup.kv_u32("k", 1).kv_u32("k", 2);
  REQUIRE_THROWS_WITH(parse(dup), Catch::Contains("metadata key 'k' appears twice"));
}

TEST_CASE("gguf: a tensor offset that wraps around is refused", "[llama][hostile]") {
  gguf_writer w(1, 0);
  w.tensor("t", {8}, f32, std::numeric_limits<uint64_t>::max() - 31).data(64);
  // Before: data_start + offset wrapped to a pointer into the header and the tensor was accepted.
  REQUIRE_THROWS_WITH(parse(w), Catch::Contains("tensor 't'") && Catch::Contains("lies past the end of the file"));
}

TEST_CASE("gguf: 64-bit values are range-checked, not truncated", "[llama][hostile]") {
  gguf_writer big(0, 1);
  big.kv_u64("n", std::numeric_limits<uint64_t>::max());
  const gguf_file f = parse(big);
  // Before: returned -1.
  REQUIRE_THROWS_WITH(f.get_int("n"), Catch::Contains("'n' = 18446744073709551615, expected an integer below 2^63"));
  REQUIRE_THROWS_WITH(f.get_int_in("missing", 0, 1), Catch::Contains("metadata key 'missing' is missing"));
  CHECK(f.get_int_in("missing", 0, 1, 1) == 1);
}

TEST_CASE("llama hyper-parameters: int64 counts are refused, not truncated to int", "[llama][hostile]") {
  // block_count = 2^32 + 1 read as an int was 1: a 1-layer model out of a corrupt file.
  const gguf_file f = parse(llama_meta("llama.block_count", gguf_writer::u64, (uint64_t{1} << 32) + 1, 8));
  REQUIRE_THROWS_WITH(llama::read_hparams(f),
                      Catch::Contains("'llama.block_count' = 4294967297, expected a value in [1, 2147483647]"));
  const gguf_file neg = parse(llama_meta("llama.attention.head_count", gguf_writer::i32, static_cast<uint32_t>(-4), 4));
  REQUIRE_THROWS_WITH(llama::read_hparams(neg), Catch::Contains("'llama.attention.head_count' = -4"));
  // A plausible header gets as far as the tensors.
  const gguf_file ok = parse(llama_meta("", 0, 0, 0));
  REQUIRE_THROWS_WITH(llama::read_hparams(ok), Catch::Contains("tensor 'token_embd.weight' is missing"));
}

TEST_CASE("llama hyper-parameters: a float outside float's range is refused", "[llama][hostile]") {
  gguf_writer w = llama_meta("", 0, 0, 0);
  gguf_writer x(0, 7);  // the same six keys (after their 24-byte header) and one more
  x.bytes.insert(x.bytes.end(), w.bytes.begin() + 24, w.bytes.end());
  x.key("llama.rope.freq_base", gguf_writer::f64).put(1e300);
  // Before: static_cast<float>(1e300), undefined (UBSan float-cast-overflow).
  REQUIRE_THROWS_WITH(llama::read_hparams(parse(x)),
                      Catch::Contains("'llama.rope.freq_base' = ") && Catch::Contains("expected a finite float > 0"));
}

TEST_CASE("tokenizer: ids are range-checked and empty control tokens cannot stall encode", "[llama][hostile]") {
  const auto syms = kvc_test::byte_symbols();
  auto vocab = [&](std::vector<std::string> extra, std::vector<int32_t> extra_kinds, uint64_t bos) {
    std::vector<std::string> toks = syms;
    std::vector<int32_t> kinds(toks.size(), 1);
    toks.insert(toks.end(), extra.begin(), extra.end());
    kinds.insert(kinds.end(), extra_kinds.begin(), extra_kinds.end());
    gguf_writer w(0, 5);
    w.kv_string("tokenizer.ggml.model", "gpt2")
        .kv_strings("tokenizer.ggml.tokens", toks)
        .kv_i32s("tokenizer.ggml.token_type", kinds)
        .kv_strings("tokenizer.ggml.merges", {})
        .kv_u64("tokenizer.ggml.bos_token_id", bos);
    return w;
  };
  // bos = 2^32 + 1 truncated to 1 before.
  const gguf_file far = parse(vocab({}, {}, (uint64_t{1} << 32) + 1));
  REQUIRE_THROWS_WITH(llama::tokenizer(far), Catch::Contains("'tokenizer.ggml.bos_token_id' = 4294967297, expected a value in [-1, 255]"));
  // An empty control token matched at every position without advancing: encode() never returned.
  const gguf_file empty = parse(vocab({"", "<|x|>"}, {3, 3}, 0));
  const llama::tokenizer tok(empty);
  const auto ids = tok.encode("a<|x|>b", true);
  REQUIRE(ids.size() == 3);
  CHECK(ids[1] == 257);
  CHECK(tok.decode(ids) == "a<|x|>b");
}

TEST_CASE("tokenizer: the synthetic vocabulary round-trips arbitrary bytes", "[llama]") {
  const gguf_file f(kvc_test::tiny_vocab_gguf("smollm"), "tiny");
  const llama::tokenizer tok(f);
  CHECK(tok.missing_byte_tokens() == 0);
  std::string all;
  for (int b = 0; b < 256; ++b) all += static_cast<char>(b);
  for (bool special : {false, true}) {
    const std::string text = "hello the 12 <|im_start|>" + all;
    CHECK(tok.decode(tok.encode(text, special)) == text);
  }
  // The merges apply: "hello" is one token.
  CHECK(tok.encode("hello").size() == 1);
}
