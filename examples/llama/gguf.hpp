// SPDX-License-Identifier: Apache-2.0
/// \file gguf.hpp
/// A reader for GGUF model files (versions 2 and 3): header, metadata, tensor table and
/// alignment. The file is memory-mapped; tensors are returned as views into the mapping and
/// decoded on demand by quants.hpp. Every malformed input throws gguf_error naming the field,
/// its byte offset and what was expected, because a truncated download is the most common
/// failure an engine developer will meet.
///
/// The file is hostile input: every count and length it holds is checked against the bytes that
/// remain before anything is allocated or indexed (an array header claiming 2^60 elements must not
/// reserve them), sizes are computed with overflow checks, and integers reach callers range-checked
/// (get_int_in) rather than truncated. A file can also be parsed from memory (the fuzz target and
/// tests do), where a read past the buffer is an AddressSanitizer report rather than page slack.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace llama {

/// Thrown for any malformed or unexpected GGUF content.
struct gguf_error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

/// ggml tensor element types, numbered as in the GGUF specification.
enum class ggml_type : uint32_t {
    f32 = 0, f16 = 1, q4_0 = 2, q4_1 = 3, q5_0 = 6, q5_1 = 7, q8_0 = 8, q8_1 = 9,
    q2_k = 10, q3_k = 11, q4_k = 12, q5_k = 13, q6_k = 14, q8_k = 15, bf16 = 30,
};

/// Block geometry of a ggml type: how many elements one block holds and its size in bytes.
struct type_traits {
    const char* name;
    std::size_t block_elems;
    std::size_t block_bytes;
};

/// Returns the traits of a type, or nullptr when this reader does not know the type.
inline const type_traits* traits_of(ggml_type t) {
    static const type_traits f32{"F32", 1, 4}, f16{"F16", 1, 2}, bf16{"BF16", 1, 2},
        q4_0{"Q4_0", 32, 18}, q4_1{"Q4_1", 32, 20}, q5_0{"Q5_0", 32, 22}, q5_1{"Q5_1", 32, 24},
        q8_0{"Q8_0", 32, 34}, q8_1{"Q8_1", 32, 36}, q2_k{"Q2_K", 256, 84}, q3_k{"Q3_K", 256, 110},
        q4_k{"Q4_K", 256, 144}, q5_k{"Q5_K", 256, 176}, q6_k{"Q6_K", 256, 210},
        q8_k{"Q8_K", 256, 292};
    switch (t) {
    case ggml_type::f32: return &f32;
    case ggml_type::f16: return &f16;
    case ggml_type::bf16: return &bf16;
    case ggml_type::q4_0: return &q4_0;
    case ggml_type::q4_1: return &q4_1;
    case ggml_type::q5_0: return &q5_0;
    case ggml_type::q5_1: return &q5_1;
    case ggml_type::q8_0: return &q8_0;
    case ggml_type::q8_1: return &q8_1;
    case ggml_type::q2_k: return &q2_k;
    case ggml_type::q3_k: return &q3_k;
    case ggml_type::q4_k: return &q4_k;
    case ggml_type::q5_k: return &q5_k;
    case ggml_type::q6_k: return &q6_k;
    case ggml_type::q8_k: return &q8_k;
    }
    return nullptr;
}

inline std::string type_name(ggml_type t) {
    const type_traits* tr = traits_of(t);
    return tr ? tr->name : "type#" + std::to_string(static_cast<uint32_t>(t));
}

/// One metadata value. Arrays keep their element type so that token lists and score
/// lists can be read without copying through a variant per element.
struct gguf_value;
struct gguf_array {
    uint32_t elem_type = 0;
    std::vector<gguf_value> items;
};
struct gguf_value {
    std::variant<uint64_t, int64_t, double, bool, std::string, gguf_array> v;
    uint32_t type = 0;  ///< GGUF value type code, kept for error messages.
};

/// One entry of the tensor table. `dims[0]` is the fastest-varying (row length).
struct gguf_tensor {
    std::string name;
    std::vector<uint64_t> dims;
    ggml_type type{};
    uint64_t offset = 0;        ///< relative to the start of the data section
    const uint8_t* data = nullptr;
    std::size_t bytes = 0;

    /// Element count; throws when the product of the dimensions does not fit 64 bits (the reader
    /// refuses such tensors, but a gguf_tensor can be built by hand).
    uint64_t elements() const {
        uint64_t n = 1;
        for (uint64_t d : dims) {
            if (d != 0 && n > std::numeric_limits<uint64_t>::max() / d)
                throw gguf_error("gguf: tensor '" + name + "' of shape " + shape() + " has more than 2^64 elements");
            n *= d;
        }
        return n;
    }
    uint64_t rows() const { return dims.empty() || dims[0] == 0 ? 0 : elements() / dims[0]; }
    uint64_t row_length() const { return dims.empty() ? 1 : dims[0]; }
    std::string shape() const {
        std::string s = "[";
        for (std::size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
        return s + "]";
    }
};

/// A memory-mapped GGUF file.
class gguf_file {
public:
    explicit gguf_file(const std::string& path) : path_(path) {
        int fd = ::open(path.c_str(), O_RDONLY);
        if (fd < 0) throw gguf_error("gguf: cannot open '" + path + "': " + std::strerror(errno));
        struct stat st {};
        if (::fstat(fd, &st) != 0) {
            ::close(fd);
            throw gguf_error("gguf: cannot stat '" + path + "'");
        }
        size_ = static_cast<std::size_t>(st.st_size);
        if (size_ == 0) {
            ::close(fd);
            throw gguf_error("gguf: '" + path + "' is empty");
        }
        void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
        ::close(fd);
        if (p == MAP_FAILED) throw gguf_error("gguf: cannot map '" + path + "'");
        base_ = static_cast<const uint8_t*>(p);
        try {
            parse();
        } catch (...) {
            ::munmap(const_cast<uint8_t*>(base_), size_);
            throw;
        }
    }
    /// Parses a GGUF image held in memory (copied); `name` stands for the path in messages.
    explicit gguf_file(std::vector<uint8_t> bytes, std::string name = "<memory>")
        : path_(std::move(name)), owned_(std::move(bytes)) {
        size_ = owned_.size();
        if (size_ == 0) throw gguf_error("gguf: '" + path_ + "' is empty");
        base_ = owned_.data();
        parse();
    }
    gguf_file(const gguf_file&) = delete;
    gguf_file& operator=(const gguf_file&) = delete;
    ~gguf_file() {
        if (base_ && owned_.empty()) ::munmap(const_cast<uint8_t*>(base_), size_);
    }

    const std::string& path() const { return path_; }
    uint32_t version() const { return version_; }
    std::size_t alignment() const { return alignment_; }
    std::size_t file_size() const { return size_; }
    const std::map<std::string, gguf_value>& metadata() const { return kv_; }
    const std::vector<gguf_tensor>& tensors() const { return tensors_; }

    bool has(const std::string& key) const { return kv_.count(key) != 0; }

    const gguf_value& get(const std::string& key) const {
        auto it = kv_.find(key);
        if (it == kv_.end()) throw gguf_error("gguf: metadata key '" + key + "' is missing in " + path_);
        return it->second;
    }
    /// Integer metadata of any signedness/width.
    int64_t get_int(const std::string& key) const {
        const gguf_value& v = get(key);
        if (auto* u = std::get_if<uint64_t>(&v.v)) {
            if (*u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
                throw gguf_error("gguf: metadata key '" + key + "' = " + std::to_string(*u) +
                                 ", expected an integer below 2^63 in " + path_);
            return static_cast<int64_t>(*u);
        }
        if (auto* i = std::get_if<int64_t>(&v.v)) return *i;
        throw gguf_error("gguf: metadata key '" + key + "' is not an integer (type " + std::to_string(v.type) + ")");
    }
    int64_t get_int(const std::string& key, int64_t fallback) const { return has(key) ? get_int(key) : fallback; }
    /// Integer metadata that must lie in [lo, hi] (a count the caller stores in an int, an id):
    /// throws naming the key, the value and the range instead of truncating.
    int64_t get_int_in(const std::string& key, int64_t lo, int64_t hi) const {
        const int64_t x = get_int(key);
        if (x < lo || x > hi)
            throw gguf_error("gguf: metadata key '" + key + "' = " + std::to_string(x) + ", expected a value in [" +
                             std::to_string(lo) + ", " + std::to_string(hi) + "] in " + path_);
        return x;
    }
    int64_t get_int_in(const std::string& key, int64_t lo, int64_t hi, int64_t fallback) const {
        return has(key) ? get_int_in(key, lo, hi) : fallback;
    }
    double get_float(const std::string& key) const {
        const gguf_value& v = get(key);
        if (auto* d = std::get_if<double>(&v.v)) return *d;
        if (auto* u = std::get_if<uint64_t>(&v.v)) return static_cast<double>(*u);
        if (auto* i = std::get_if<int64_t>(&v.v)) return static_cast<double>(*i);
        throw gguf_error("gguf: metadata key '" + key + "' is not a number");
    }
    double get_float(const std::string& key, double fallback) const { return has(key) ? get_float(key) : fallback; }
    bool get_bool(const std::string& key, bool fallback) const {
        if (!has(key)) return fallback;
        const gguf_value& v = get(key);
        if (auto* b = std::get_if<bool>(&v.v)) return *b;
        throw gguf_error("gguf: metadata key '" + key + "' is not a bool");
    }
    const std::string& get_string(const std::string& key) const {
        const gguf_value& v = get(key);
        if (auto* s = std::get_if<std::string>(&v.v)) return *s;
        throw gguf_error("gguf: metadata key '" + key + "' is not a string");
    }
    const gguf_array& get_array(const std::string& key) const {
        const gguf_value& v = get(key);
        if (auto* a = std::get_if<gguf_array>(&v.v)) return *a;
        throw gguf_error("gguf: metadata key '" + key + "' is not an array");
    }

    const gguf_tensor* find_tensor(const std::string& name) const {
        auto it = by_name_.find(name);
        return it == by_name_.end() ? nullptr : &tensors_[it->second];
    }
    /// Looks a tensor up and checks its shape; throws naming the tensor when it is absent or
    /// shaped differently from what the architecture metadata implies.
    const gguf_tensor& tensor(const std::string& name, std::vector<uint64_t> expected_dims) const {
        const gguf_tensor* t = find_tensor(name);
        if (!t) throw gguf_error("gguf: tensor '" + name + "' is missing in " + path_);
        if (t->dims != expected_dims) {
            gguf_tensor e;
            e.dims = std::move(expected_dims);
            throw gguf_error("gguf: tensor '" + name + "' has shape " + t->shape() + ", expected " + e.shape());
        }
        return *t;
    }

private:
    // ---- bounded cursor over the mapping ----
    void need(std::size_t n, const char* what) const {
        if (pos_ > size_ || n > size_ - pos_)
            throw gguf_error("gguf: file truncated while reading " + std::string(what) + " at byte " +
                             std::to_string(pos_) + " (file is " + std::to_string(size_) + " bytes): " + path_);
    }
    template <class T>
    T read(const char* what) {
        need(sizeof(T), what);
        T x;
        std::memcpy(&x, base_ + pos_, sizeof(T));
        pos_ += sizeof(T);
        return x;
    }
    std::string read_string(const char* what) {
        uint64_t n = read<uint64_t>(what);
        if (n > (1ull << 30)) throw gguf_error("gguf: implausible string length " + std::to_string(n) + " for " + what + " at byte " + std::to_string(pos_));
        need(static_cast<std::size_t>(n), what);  // also bounds n by the bytes that remain
        std::string s(reinterpret_cast<const char*>(base_ + pos_), static_cast<std::size_t>(n));
        pos_ += static_cast<std::size_t>(n);
        return s;
    }
    gguf_value read_value(uint32_t type, const std::string& key, int depth) {
        gguf_value out;
        out.type = type;
        const char* w = key.c_str();
        switch (type) {
        case 0: out.v = uint64_t{read<uint8_t>(w)}; break;
        case 1: out.v = int64_t{read<int8_t>(w)}; break;
        case 2: out.v = uint64_t{read<uint16_t>(w)}; break;
        case 3: out.v = int64_t{read<int16_t>(w)}; break;
        case 4: out.v = uint64_t{read<uint32_t>(w)}; break;
        case 5: out.v = int64_t{read<int32_t>(w)}; break;
        case 6: out.v = double{read<float>(w)}; break;
        case 7: {
            uint8_t b = read<uint8_t>(w);
            if (b > 1) throw gguf_error("gguf: bool value " + std::to_string(b) + " for '" + key + "'");
            out.v = b != 0;
            break;
        }
        case 8: out.v = read_string(w); break;
        case 9: {
            if (depth > 4) throw gguf_error("gguf: arrays nested too deeply in '" + key + "'");
            gguf_array a;
            a.elem_type = read<uint32_t>(w);
            uint64_t n = read<uint64_t>(w);
            // Every element takes at least min_bytes of the file, so n is bounded by what remains
            // before reserve(n) allocates anything.
            const std::size_t left = size_ - pos_, min_bytes = min_value_bytes(a.elem_type);
            if (n > left / min_bytes)
                throw gguf_error("gguf: array '" + key + "' claims " + std::to_string(n) + " elements of type " +
                                 std::to_string(a.elem_type) + " at byte " + std::to_string(pos_) +
                                 ", expected at most " + std::to_string(left / min_bytes) + " (the " +
                                 std::to_string(left) + " bytes left in the file): " + path_);
            a.items.reserve(static_cast<std::size_t>(n));
            for (uint64_t i = 0; i < n; ++i) a.items.push_back(read_value(a.elem_type, key, depth + 1));
            out.v = std::move(a);
            break;
        }
        case 10: out.v = read<uint64_t>(w); break;
        case 11: out.v = read<int64_t>(w); break;
        case 12: out.v = read<double>(w); break;
        default:
            throw gguf_error("gguf: unknown value type " + std::to_string(type) + " for metadata key '" + key +
                             "' at byte " + std::to_string(pos_));
        }
        return out;
    }

    /// The fewest bytes one value of `type` occupies in the file (unknown types: 1, and the read
    /// of the first element reports them).
    static std::size_t min_value_bytes(uint32_t type) {
        switch (type) {
        case 0: case 1: case 7: return 1;
        case 2: case 3: return 2;
        case 4: case 5: case 6: return 4;
        case 8: case 10: case 11: case 12: return 8;  // a string: its 8-byte length
        case 9: return 12;                            // an array: element type and count
        default: return 1;
        }
    }

    void parse() {
        need(4, "magic");
        if (std::memcmp(base_, "GGUF", 4) != 0) throw gguf_error("gguf: '" + path_ + "' is not a GGUF file (bad magic)");
        pos_ = 4;
        version_ = read<uint32_t>("version");
        if (version_ != 2 && version_ != 3)
            throw gguf_error("gguf: unsupported version " + std::to_string(version_) + " (this reader handles 2 and 3)");
        uint64_t n_tensors = read<uint64_t>("tensor count");
        uint64_t n_kv = read<uint64_t>("metadata count");
        // A metadata entry takes at least 13 bytes (key length, type, one byte of value), a tensor
        // entry 28 (name length, rank, one dimension, type, offset).
        const std::size_t left = size_ - pos_;
        if (n_kv > left / 13 || n_tensors > left / 28)
            throw gguf_error("gguf: header claims " + std::to_string(n_kv) + " metadata entries and " +
                             std::to_string(n_tensors) + " tensors, expected at most " + std::to_string(left / 13) +
                             " and " + std::to_string(left / 28) + " in the " + std::to_string(left) +
                             " bytes that follow the header: " + path_);
        for (uint64_t i = 0; i < n_kv; ++i) {
            std::string key = read_string("metadata key");
            uint32_t type = read<uint32_t>("metadata value type");
            gguf_value v = read_value(type, key, 0);
            if (!kv_.emplace(key, std::move(v)).second)
                throw gguf_error("gguf: metadata key '" + key + "' appears twice, expected each key once: " + path_);
        }
        // The alignment must be a power of two small enough that padding cannot run off the file.
        const int64_t align = get_int_in("general.alignment", 1, int64_t{1} << 30, 32);
        if ((align & (align - 1)) != 0)
            throw gguf_error("gguf: general.alignment = " + std::to_string(align) + ", expected a power of two: " + path_);
        alignment_ = static_cast<std::size_t>(align);
        tensors_.reserve(static_cast<std::size_t>(n_tensors));
        for (uint64_t i = 0; i < n_tensors; ++i) {
            gguf_tensor t;
            t.name = read_string("tensor name");
            uint32_t nd = read<uint32_t>("tensor rank");
            if (nd == 0 || nd > 4) throw gguf_error("gguf: tensor '" + t.name + "' has rank " + std::to_string(nd));
            for (uint32_t d = 0; d < nd; ++d) {
                t.dims.push_back(read<uint64_t>("tensor dimension"));
                if (t.dims.back() == 0)
                    throw gguf_error("gguf: tensor '" + t.name + "' dimension " + std::to_string(d) +
                                     " is 0, expected every dimension >= 1: " + path_);
            }
            t.type = static_cast<ggml_type>(read<uint32_t>("tensor type"));
            t.offset = read<uint64_t>("tensor offset");
            tensors_.push_back(std::move(t));
        }
        const std::size_t data_start = (pos_ + alignment_ - 1) / alignment_ * alignment_;
        if (!tensors_.empty() && data_start > size_)
            throw gguf_error("gguf: the tensor data would start at byte " + std::to_string(data_start) +
                             ", past the end of the file (" + std::to_string(size_) + " bytes): " + path_);
        for (std::size_t i = 0; i < tensors_.size(); ++i) {
            gguf_tensor& t = tensors_[i];
            const type_traits* tr = traits_of(t.type);
            if (!tr)
                throw gguf_error("gguf: tensor '" + t.name + "' has unsupported type " + type_name(t.type));
            if (t.row_length() % tr->block_elems != 0)
                throw gguf_error("gguf: tensor '" + t.name + "' row length " + std::to_string(t.row_length()) +
                                 " is not a multiple of the " + tr->name + " block size");
            uint64_t elems = 1;
            for (uint64_t d : t.dims) {
                if (elems > std::numeric_limits<uint64_t>::max() / d)
                    throw gguf_error("gguf: tensor '" + t.name + "' of shape " + t.shape() +
                                     " has more than 2^64 elements, expected a tensor that fits the file: " + path_);
                elems *= d;
            }
            const uint64_t blocks = elems / tr->block_elems;
            if (blocks > (size_ - data_start) / tr->block_bytes)
                throw gguf_error("gguf: tensor '" + t.name + "' of shape " + t.shape() + " and type " + tr->name +
                                 " needs more bytes than the file's " + std::to_string(size_ - data_start) +
                                 " bytes of data; the download is probably truncated: " + path_);
            t.bytes = static_cast<std::size_t>(blocks * tr->block_bytes);
            if (t.offset % alignment_ != 0)
                throw gguf_error("gguf: tensor '" + t.name + "' offset " + std::to_string(t.offset) + " is not aligned to " + std::to_string(alignment_));
            if (t.offset > size_ - data_start || t.bytes > size_ - data_start - t.offset)
                throw gguf_error("gguf: tensor '" + t.name + "' (" + std::to_string(t.bytes) + " bytes at data offset " +
                                 std::to_string(t.offset) + ") lies past the end of the file; the download is probably truncated");
            t.data = base_ + data_start + t.offset;
            if (!by_name_.emplace(t.name, i).second) throw gguf_error("gguf: duplicate tensor name '" + t.name + "'");
        }
    }

    std::string path_;
    const uint8_t* base_ = nullptr;
    std::size_t size_ = 0;
    std::size_t pos_ = 0;
    uint32_t version_ = 0;
    std::size_t alignment_ = 32;
    std::map<std::string, gguf_value> kv_;
    std::vector<gguf_tensor> tensors_;
    std::map<std::string, std::size_t> by_name_;
    std::vector<uint8_t> owned_;  ///< the bytes, when parsed from memory (else the file is mapped)
};

}  // namespace llama
