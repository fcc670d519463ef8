// SPDX-License-Identifier: Apache-2.0
/// \file quant_check.cpp
/// Reads the fixture written by scripts/dev/crosscheck.py (per type: u64 type, u64 elements,
/// u64 bytes, raw blocks, float32 values decoded by the `gguf` Python package) and compares
/// examples/llama/quants.hpp's decoding with it. Prints one line per type; exit 1 on a mismatch.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <vector>

#include "quants.hpp"

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: quant_check FIXTURE\n");
        return 2;
    }
    std::ifstream in(argv[1], std::ios::binary);
    bool ok = true;
    uint64_t hdr[3];
    while (in.read(reinterpret_cast<char*>(hdr), sizeof hdr)) {
        const auto type = static_cast<llama::ggml_type>(hdr[0]);
        std::vector<uint8_t> raw(hdr[2]);
        std::vector<float> ref(hdr[1]), mine(hdr[1]);
        in.read(reinterpret_cast<char*>(raw.data()), static_cast<std::streamsize>(raw.size()));
        in.read(reinterpret_cast<char*>(ref.data()), static_cast<std::streamsize>(ref.size() * 4));
        llama::dequantize_row(type, raw.data(), mine.data(), mine.size());
        double worst = 0;
        std::size_t bad = 0;
        for (std::size_t i = 0; i < ref.size(); ++i) {
            const double d = std::fabs(static_cast<double>(ref[i]) - mine[i]);
            const double tol = 1e-6 * std::max(1.0, std::fabs(static_cast<double>(ref[i])));
            worst = std::max(worst, d);
            if (!(d <= tol)) ++bad;
        }
        std::printf("dequant %-5s %6zu values: max |diff| %.3g, %zu beyond 1e-6 relative -> %s\n",
                    llama::type_name(type).c_str(), ref.size(), worst, bad, bad ? "MISMATCH" : "ok");
        ok = ok && bad == 0;
    }
    return ok ? 0 : 1;
}
