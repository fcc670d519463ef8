// SPDX-License-Identifier: Apache-2.0
/// \file chat.hpp
/// Renders a conversation with the model's chat template. A full Jinja interpreter is out of
/// scope for an example, so the template from the GGUF file is recognised by family: ChatML
/// (`<|im_start|>role\n…<|im_end|>\n`) is rendered, including the default system message the
/// template inserts, which is read from the template text itself rather than hard-coded.
/// An unrecognised template is an error, never a silent guess.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "gguf.hpp"

namespace llama {

struct chat_message {
    std::string role, content;
};

class chat_template {
public:
    explicit chat_template(const gguf_file& f) {
        if (!f.has("tokenizer.chat_template")) throw gguf_error("chat: the file has no tokenizer.chat_template");
        tmpl_ = f.get_string("tokenizer.chat_template");
        if (tmpl_.find("<|im_start|>") == std::string::npos)
            throw gguf_error("chat: only ChatML templates are rendered by this example; the file's template is:\n" + tmpl_);
        // The SmolLM2 template inserts "<|im_start|>system\n…<|im_end|>" when the first
        // message is not a system message; pick that text out of the template.
        const std::string open = "<|im_start|>system\n";
        const std::size_t a = tmpl_.find(open);
        if (a != std::string::npos) {
            const std::size_t b = tmpl_.find("<|im_end|>", a);
            if (b != std::string::npos) default_system_ = tmpl_.substr(a + open.size(), b - a - open.size());
        }
    }

    const std::string& default_system() const { return default_system_; }

    /// Text to tokenize with special-token parsing on; ends with the assistant header when
    /// `add_generation_prompt`.
    std::string render(const std::vector<chat_message>& msgs, bool add_generation_prompt = true) const {
        std::string s;
        if (!default_system_.empty() && (msgs.empty() || msgs.front().role != "system"))
            s += "<|im_start|>system\n" + default_system_ + "<|im_end|>\n";
        for (const chat_message& m : msgs) s += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
        if (add_generation_prompt) s += "<|im_start|>assistant\n";
        return s;
    }

private:
    std::string tmpl_, default_system_;
};

}  // namespace llama
