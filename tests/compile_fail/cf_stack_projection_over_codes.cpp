// SPDX-License-Identifier: Apache-2.0
// A compose::stack that projects into quantized coefficient pages: not a compile-time store yet,
// so the stack refuses it and names the run-time spec that has it.
#include <kvc/compose/projecting.hpp>
#include <kvc/compose/stack.hpp>
#include <kvc/quant/int8.hpp>

namespace cs = kvc::compose;
#ifdef KVC_SHOULD_FAIL
using S = cs::stack<cs::projecting<cs::pca>, cs::encoding<kvc::quant::int8>>;
#else
using S = cs::stack<cs::projecting<cs::pca>, cs::full_precision<kvc::half>>;
#endif
std::size_t bytes(const S& s) { return s.bytes_in_use(); }
