// SPDX-License-Identifier: Apache-2.0
/// \file model_path.hpp
/// Where the example programs look for the model when no path is given: $KVC_MODEL, then the
/// cache folder scripts/fetch-model fills (.cache/model/ under the source tree, whose absolute
/// path CMake bakes in, and under the current directory).
#pragma once

#include <cstdlib>
#include <string>
#include <sys/stat.h>

#ifndef KVC_LLAMA_SOURCE_ROOT
#define KVC_LLAMA_SOURCE_ROOT "."
#endif

namespace llama {

inline constexpr const char* default_model_file = "SmolLM2-135M-Instruct.Q4_1.gguf";

inline bool file_exists(const std::string& p) {
    struct stat st {};
    return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

/// Returns the model path to use, or an empty string with `why` filled in when there is none.
inline std::string find_model(std::string& why) {
    if (const char* env = std::getenv("KVC_MODEL"); env && *env) {
        if (file_exists(env)) return env;
        why = std::string("KVC_MODEL=") + env + " does not name a file";
        return {};
    }
    const std::string candidates[] = {std::string(KVC_LLAMA_SOURCE_ROOT) + "/.cache/model/" + default_model_file,
                                      std::string(".cache/model/") + default_model_file};
    for (const std::string& c : candidates)
        if (file_exists(c)) return c;
    why = "model not found at " + candidates[0] + " (run scripts/fetch-model, or set KVC_MODEL)";
    return {};
}

}  // namespace llama
