// SPDX-License-Identifier: Apache-2.0
// Built with -fno-exceptions: every kvc header compiles, and a failed precondition prints
// "kvc: fatal: <message>" and aborts (KVC_EXPECTS -> kvc::detail::fail). With "fail" as argument
// the program breaks a precondition; SIGABRT is turned into exit code 42 so that CTest's
// WILL_FAIL sees an ordinary failure.
#include <kvc/kvc.hpp>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>

static_assert(!KVC_HAS_EXCEPTIONS, "this TU must be compiled with -fno-exceptions");

extern "C" void on_abort(int) { std::_Exit(42); }

int main(int argc, char** argv) {
  std::signal(SIGABRT, on_abort);
  kvc::cache_config c;
  c.num_kv_heads = 1;
  c.head_dim = 4;
  c.page_size = 4;
  c.max_pages = 8;
  kvc::kv_cache<float> cache(c);
  const auto s = cache.add_sequence();
  float k[4] = {1, 2, 3, 4}, v[4] = {4, 3, 2, 1};
  cache.append(s, 0, k, v, 1);
  float q[4] = {1, 0, 0, 0}, out[4];
  kvc::thread_pool pool(2);
  kvc::decode_options o;
  o.pool = &pool;
  kvc::cpu::decode_attention(cache, s, 0, q, 1, out, o);
  if (out[0] != 4.0f) return 1;
  if (argc > 1 && std::strcmp(argv[1], "fail") == 0) cache.append(s, 0, k, v, -1);  // aborts
  std::puts("ok");
  return 0;
}
