// SPDX-License-Identifier: Apache-2.0
/// \file quants.hpp
/// Dequantization of the ggml block formats a GGUF file can hold, written from the published
/// block layouts. The engine decodes every weight to float once at load time: a 135M model
/// is ~0.55 GB in float, and Eigen's GEMM on float is the simplest fast path on a CPU. An
/// engine that must keep weights quantized would replace `dequantize_row` with fused dot
/// products; the KV cache (kvc's job) is independent of that choice.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "gguf.hpp"

namespace llama {

/// IEEE binary16 to float, including subnormals, infinities and NaN.
inline float fp16_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t mant = h & 0x3FFu;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal: renormalise
            int e = -1;
            do {
                ++e;
                mant <<= 1;
            } while ((mant & 0x400u) == 0);
            bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (mant & 0x3FFu) << 13;
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | mant << 13;
    } else {
        bits = sign | (exp + 127 - 15) << 23 | mant << 13;
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline float bf16_to_float(uint16_t h) {
    uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

namespace detail {

inline uint16_t rd16(const uint8_t* p) {
    uint16_t x;
    std::memcpy(&x, p, 2);
    return x;
}
inline float rdh(const uint8_t* p) { return fp16_to_float(rd16(p)); }

// ---- 32-element blocks ----

inline void deq_q4_0(const uint8_t* b, float* y) {  // half d; u8 qs[16]
    const float d = rdh(b);
    const uint8_t* qs = b + 2;
    for (int j = 0; j < 16; ++j) {
        y[j] = (static_cast<int>(qs[j] & 0x0F) - 8) * d;
        y[j + 16] = (static_cast<int>(qs[j] >> 4) - 8) * d;
    }
}
inline void deq_q4_1(const uint8_t* b, float* y) {  // half d; half m; u8 qs[16]
    const float d = rdh(b), m = rdh(b + 2);
    const uint8_t* qs = b + 4;
    for (int j = 0; j < 16; ++j) {
        y[j] = (qs[j] & 0x0F) * d + m;
        y[j + 16] = (qs[j] >> 4) * d + m;
    }
}
inline void deq_q5_0(const uint8_t* b, float* y) {  // half d; u32 qh; u8 qs[16]
    const float d = rdh(b);
    uint32_t qh;
    std::memcpy(&qh, b + 2, 4);
    const uint8_t* qs = b + 6;
    for (int j = 0; j < 16; ++j) {
        const int hi0 = ((qh >> j) & 1u) << 4, hi1 = ((qh >> (j + 16)) & 1u) << 4;
        y[j] = (static_cast<int>((qs[j] & 0x0F) | hi0) - 16) * d;
        y[j + 16] = (static_cast<int>((qs[j] >> 4) | hi1) - 16) * d;
    }
}
inline void deq_q5_1(const uint8_t* b, float* y) {  // half d; half m; u32 qh; u8 qs[16]
    const float d = rdh(b), m = rdh(b + 2);
    uint32_t qh;
    std::memcpy(&qh, b + 4, 4);
    const uint8_t* qs = b + 8;
    for (int j = 0; j < 16; ++j) {
        const int hi0 = ((qh >> j) & 1u) << 4, hi1 = ((qh >> (j + 16)) & 1u) << 4;
        y[j] = ((qs[j] & 0x0F) | hi0) * d + m;
        y[j + 16] = ((qs[j] >> 4) | hi1) * d + m;
    }
}
inline void deq_q8_0(const uint8_t* b, float* y) {  // half d; i8 qs[32]
    const float d = rdh(b);
    const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
    for (int j = 0; j < 32; ++j) y[j] = qs[j] * d;
}
inline void deq_q8_1(const uint8_t* b, float* y) {  // half d; half s (sum, unused); i8 qs[32]
    const float d = rdh(b);
    const int8_t* qs = reinterpret_cast<const int8_t*>(b + 4);
    for (int j = 0; j < 32; ++j) y[j] = qs[j] * d;
}

// ---- 256-element "K" super-blocks ----

/// 6-bit scale and min j of the 12-byte packed table used by Q4_K and Q5_K.
inline void scale_min_k4(int j, const uint8_t* q, int& sc, int& mn) {
    if (j < 4) {
        sc = q[j] & 63;
        mn = q[j + 4] & 63;
    } else {
        sc = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
        mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

inline void deq_q2_k(const uint8_t* b, float* y) {  // u8 scales[16]; u8 qs[64]; half d; half dmin
    const uint8_t* scales = b;
    const uint8_t* q = b + 16;
    const float d = rdh(b + 80), dmin = rdh(b + 82);
    int is = 0;
    for (int n = 0; n < 256; n += 128) {
        for (int shift = 0; shift < 8; shift += 2) {
            for (int half = 0; half < 2; ++half) {
                const uint8_t sc = scales[is++];
                const float dl = d * (sc & 0x0F), ml = dmin * (sc >> 4);
                for (int l = 0; l < 16; ++l) *y++ = dl * ((q[l + 16 * half] >> shift) & 3) - ml;
            }
        }
        q += 32;
    }
}

inline void deq_q3_k(const uint8_t* b, float* y) {  // u8 hmask[32]; u8 qs[64]; u8 scales[12]; half d
    const uint8_t* hm = b;
    const uint8_t* q = b + 32;
    const uint8_t* s = b + 96;
    const float d_all = rdh(b + 108);
    // Unpack sixteen 6-bit scales: low 4 bits from s[0..7], high 2 bits from s[8..11].
    int8_t scales[16];
    for (int i = 0; i < 16; ++i) {
        const int lo = i < 8 ? (s[i] & 0x0F) : (s[i - 8] >> 4);
        const int hi = (s[8 + (i % 4)] >> (2 * (i / 4))) & 3;
        scales[i] = static_cast<int8_t>((lo | (hi << 4)) - 32);
    }
    int is = 0;
    uint8_t m = 1;
    for (int n = 0; n < 256; n += 128) {
        for (int shift = 0; shift < 8; shift += 2) {
            for (int half = 0; half < 2; ++half) {
                const float dl = d_all * scales[is++];
                for (int l = 0; l < 16; ++l) {
                    const int idx = l + 16 * half;
                    *y++ = dl * (static_cast<int>((q[idx] >> shift) & 3) - ((hm[idx] & m) ? 0 : 4));
                }
            }
            m = static_cast<uint8_t>(m << 1);
        }
        q += 32;
    }
}

inline void deq_q4_k(const uint8_t* b, float* y) {  // half d; half dmin; u8 scales[12]; u8 qs[128]
    const float d = rdh(b), dmin = rdh(b + 2);
    const uint8_t* scales = b + 4;
    const uint8_t* q = b + 16;
    for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32) {
        int sc, mn;
        scale_min_k4(is, scales, sc, mn);
        const float d1 = d * sc, m1 = dmin * mn;
        scale_min_k4(is + 1, scales, sc, mn);
        const float d2 = d * sc, m2 = dmin * mn;
        for (int l = 0; l < 32; ++l) *y++ = d1 * (q[l] & 0x0F) - m1;
        for (int l = 0; l < 32; ++l) *y++ = d2 * (q[l] >> 4) - m2;
    }
}

inline void deq_q5_k(const uint8_t* b, float* y) {  // half d; half dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]
    const float d = rdh(b), dmin = rdh(b + 2);
    const uint8_t* scales = b + 4;
    const uint8_t* qh = b + 16;
    const uint8_t* ql = b + 48;
    uint8_t u1 = 1, u2 = 2;
    for (int j = 0, is = 0; j < 256; j += 64, is += 2, ql += 32) {
        int sc, mn;
        scale_min_k4(is, scales, sc, mn);
        const float d1 = d * sc, m1 = dmin * mn;
        scale_min_k4(is + 1, scales, sc, mn);
        const float d2 = d * sc, m2 = dmin * mn;
        for (int l = 0; l < 32; ++l) *y++ = d1 * ((ql[l] & 0x0F) + ((qh[l] & u1) ? 16 : 0)) - m1;
        for (int l = 0; l < 32; ++l) *y++ = d2 * ((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - m2;
        u1 = static_cast<uint8_t>(u1 << 2);
        u2 = static_cast<uint8_t>(u2 << 2);
    }
}

inline void deq_q6_k(const uint8_t* b, float* y) {  // u8 ql[128]; u8 qh[64]; i8 scales[16]; half d
    const uint8_t* ql = b;
    const uint8_t* qh = b + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = rdh(b + 208);
    for (int n = 0; n < 256; n += 128) {
        for (int l = 0; l < 32; ++l) {
            const int is = l / 16;
            const int q1 = static_cast<int>((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q2 = static_cast<int>((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q3 = static_cast<int>((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q4 = static_cast<int>((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = d * sc[is] * q1;
            y[l + 32] = d * sc[is + 2] * q2;
            y[l + 64] = d * sc[is + 4] * q3;
            y[l + 96] = d * sc[is + 6] * q4;
        }
        y += 128;
        ql += 64;
        qh += 32;
        sc += 8;
    }
}

inline void deq_q8_k(const uint8_t* b, float* y) {  // float d; i8 qs[256]; i16 bsums[16]
    float d;
    std::memcpy(&d, b, 4);
    const int8_t* qs = reinterpret_cast<const int8_t*>(b + 4);
    for (int j = 0; j < 256; ++j) y[j] = d * qs[j];
}

}  // namespace detail

/// Decodes `n` consecutive elements (a multiple of the type's block size) starting at `src`.
inline void dequantize_row(ggml_type type, const uint8_t* src, float* dst, std::size_t n) {
    const type_traits* tr = traits_of(type);
    if (!tr) throw gguf_error("dequantize: unsupported tensor type " + type_name(type));
    if (n % tr->block_elems != 0)
        throw gguf_error("dequantize: " + std::to_string(n) + " elements is not a multiple of the " + tr->name + " block");
    const std::size_t nb = n / tr->block_elems;
    using fn = void (*)(const uint8_t*, float*);
    fn f = nullptr;
    switch (type) {
    case ggml_type::f32: std::memcpy(dst, src, n * 4); return;
    case ggml_type::f16:
        for (std::size_t i = 0; i < n; ++i) dst[i] = fp16_to_float(detail::rd16(src + 2 * i));
        return;
    case ggml_type::bf16:
        for (std::size_t i = 0; i < n; ++i) dst[i] = bf16_to_float(detail::rd16(src + 2 * i));
        return;
    case ggml_type::q4_0: f = detail::deq_q4_0; break;
    case ggml_type::q4_1: f = detail::deq_q4_1; break;
    case ggml_type::q5_0: f = detail::deq_q5_0; break;
    case ggml_type::q5_1: f = detail::deq_q5_1; break;
    case ggml_type::q8_0: f = detail::deq_q8_0; break;
    case ggml_type::q8_1: f = detail::deq_q8_1; break;
    case ggml_type::q2_k: f = detail::deq_q2_k; break;
    case ggml_type::q3_k: f = detail::deq_q3_k; break;
    case ggml_type::q4_k: f = detail::deq_q4_k; break;
    case ggml_type::q5_k: f = detail::deq_q5_k; break;
    case ggml_type::q6_k: f = detail::deq_q6_k; break;
    case ggml_type::q8_k: f = detail::deq_q8_k; break;
    }
    for (std::size_t i = 0; i < nb; ++i) f(src + i * tr->block_bytes, dst + i * tr->block_elems);
}

/// Decodes a whole tensor into `dst` (elements() floats, row-major with dims[0] fastest).
inline void dequantize_tensor(const gguf_tensor& t, float* dst) {
    dequantize_row(t.type, t.data, dst, static_cast<std::size_t>(t.elements()));
}

}  // namespace llama
