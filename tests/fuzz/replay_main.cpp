// SPDX-License-Identifier: Apache-2.0
/// \file replay_main.cpp
/// The `main` a fuzz target gets outside libFuzzer builds: runs LLVMFuzzerTestOneInput on every
/// file named on the command line (directories: every regular file inside, sorted), so each CI
/// configuration (gcc, ASan+UBSan Debug, ...) replays the committed corpora as regression tests.
/// Exits non-zero when no input was found, so an emptied or mistyped corpus cannot pass silently.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size);

int main(int argc, char** argv) {
  namespace fs = std::filesystem;
  std::vector<fs::path> inputs;
  for (int i = 1; i < argc; ++i) {
    const fs::path p(argv[i]);
    if (fs::is_directory(p)) {
      for (const auto& e : fs::recursive_directory_iterator(p))
        if (e.is_regular_file()) inputs.push_back(e.path());
    } else if (fs::is_regular_file(p)) {
      inputs.push_back(p);
    } else {
      std::fprintf(stderr, "replay: '%s' is neither a file nor a directory\n", argv[i]);
      return 2;
    }
  }
  std::sort(inputs.begin(), inputs.end());
  if (inputs.empty()) {
    std::fprintf(stderr, "replay: no inputs; expected corpus files or directories as arguments\n");
    return 2;
  }
  for (const auto& p : inputs) {
    std::ifstream f(p, std::ios::binary);
    const std::vector<char> buf((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    // Printed first, so the input that crashes is the last line of the log.
    std::printf("replay: %s (%zu bytes)\n", p.string().c_str(), buf.size());
    std::fflush(stdout);
    LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(buf.data()), buf.size());
  }
  std::printf("replay: %zu inputs, no failure\n", inputs.size());
  return 0;
}
