// SPDX-License-Identifier: Apache-2.0
/// \file sampling.hpp
/// Next-token choice from a row of logits: greedy, or temperature + top-k + top-p (nucleus)
/// with a seeded generator so that runs are reproducible.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

namespace llama {

struct sampler_params {
    float temperature = 0.0f;  ///< 0 means greedy
    int top_k = 40;            ///< 0 disables
    float top_p = 0.95f;       ///< 1 disables
    uint64_t seed = 1;
};

class sampler {
public:
    explicit sampler(const sampler_params& p) : p_(p), rng_(p.seed) {}

    int32_t operator()(const float* logits, int n_vocab) {
        if (p_.temperature <= 0.0f) return argmax(logits, n_vocab);
        std::vector<int32_t> idx(static_cast<std::size_t>(n_vocab));
        std::iota(idx.begin(), idx.end(), 0);
        const int k = (p_.top_k > 0 && p_.top_k < n_vocab) ? p_.top_k : n_vocab;
        std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
        idx.resize(static_cast<std::size_t>(k));
        std::vector<double> prob(idx.size());
        const double mx = logits[idx[0]];
        double sum = 0;
        for (std::size_t i = 0; i < idx.size(); ++i) sum += (prob[i] = std::exp((logits[idx[i]] - mx) / p_.temperature));
        // Nucleus: the smallest prefix (by probability) whose mass reaches top_p.
        double cum = 0;
        std::size_t keep = idx.size();
        for (std::size_t i = 0; i < idx.size(); ++i) {
            cum += prob[i] / sum;
            if (cum >= p_.top_p) {
                keep = i + 1;
                break;
            }
        }
        std::discrete_distribution<std::size_t> dist(prob.begin(), prob.begin() + static_cast<std::ptrdiff_t>(keep));
        return idx[dist(rng_)];
    }

    static int32_t argmax(const float* logits, int n) {
        return static_cast<int32_t>(std::max_element(logits, logits + n) - logits);
    }

private:
    sampler_params p_;
    std::mt19937_64 rng_;
};

}  // namespace llama
