# SPDX-License-Identifier: Apache-2.0
# cmake -DNM=nm -DOBJDUMP=objdump -DAVX2_OBJ=a.o -DBASE_OBJ=b.o -P check_isa_symbols.cmake
# Fails unless
#  (1) each object's kvc::cpu code is in its own ISA namespace;
#  (2) each object's kvc::runtime adapters and registries (cache_adapter, mikv_cache, the attention
#      functors, storage_registry, make_cache, ...) and kvc::decode_attention are in its own ISA
#      namespace;
#  (3) no object defines a symbol of the other's ISA namespace (so no ISA-namespaced symbol is
#      defined in both: the linker would keep one body);
#  (4) no ISA-neutral function calls into an ISA namespace (docs/isa.md, rule 4): no relocation of
#      an inline function's section whose name carries no ISA namespace refers to a symbol that
#      does. The objects are built with -fno-inline, so every such call is a relocation.
cmake_minimum_required(VERSION 3.16)  # CMP0054: quoted "avx2" is a string, not the list avx2
# The objects hold ~40k symbols and ~200k relocations: whole-text regexes, list(FILTER) and an awk
# pipeline keep this to seconds (a foreach over every line takes minutes).
set(avx2_isa "isa_avx2_fma_f16c")
# The global definitions of `obj` (only those can clash) whose demangled name matches the ERE `re`;
# grep does the filtering, CMake only sees the matches.
function(defined_symbols obj re out)
  execute_process(COMMAND ${NM} -C --defined-only ${obj} COMMAND grep -E "^[0-9a-fA-F]* *[TWVuBDR] .*(${re})"
                  OUTPUT_VARIABLE txt RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0 AND NOT rc EQUAL 1)  # grep: 1 = no match
    message(FATAL_ERROR "nm | grep failed on ${obj}")
  endif()
  string(REPLACE ";" "<semicolon>" txt "${txt}")
  string(REPLACE "[" "<lb>" txt "${txt}")
  string(REPLACE "]" "<rb>" txt "${txt}")
  string(REGEX REPLACE "(^|\n)[0-9a-fA-F]* *[TWVuBDR] " "\\1" txt "${txt}")
  string(STRIP "${txt}" txt)
  string(REPLACE "\n" ";" names "${txt}")
  set(${out} "${names}" PARENT_SCOPE)
endfunction()
# The runtime entities that reach the kernels (or build what does), and kvc::decode_attention.
set(rt_entities "cache_adapter|cpu_attention|quant_attention_with|mikv_cache|storage_registry|make_cache|known_storages|is_storage|unknown_storage|register_quant_storages|register_mikv_storage|make_quant|make_int_quant|make_mikv|quant_storages_registered|mikv_storage_registered")
set(rt_re "kvc::v0::runtime::(detail::)?(isa_[a-z0-9_]+::)?(detail::)?(${rt_entities})[^a-z0-9_]")
set(front_re "kvc::v0::(isa_[a-z0-9_]+::)?decode_attention<")
set(obj_avx2 ${AVX2_OBJ})
set(obj_base ${BASE_OBJ})
foreach(which avx2 base)
  set(obj ${obj_${which}})
  defined_symbols(${obj} "kvc::v0::cpu::" cpu_${which})
  defined_symbols(${obj} "::isa_[a-z0-9_]+::" tagged_${which})
  defined_symbols(${obj} "${rt_re}|${front_re}" rt_${which})
endforeach()
# The baseline object's ISA namespace, from its kvc::cpu symbols.
set(base_isa "")
foreach(s IN LISTS cpu_base)
  if(s MATCHES "kvc::v0::cpu::(isa_[a-z0-9_]+)::" AND NOT CMAKE_MATCH_1 STREQUAL avx2_isa)
    set(base_isa "${CMAKE_MATCH_1}")
    break()
  endif()
endforeach()
set(fail "")
set(nfail 0)
# Failures: every one counted, the first 8 of each kind shown (thousands of long names take minutes).
macro(add_fail kind msg)
  math(EXPR nfail "${nfail} + 1")
  if(NOT DEFINED nfail_${kind})
    set(nfail_${kind} 0)
  endif()
  math(EXPR nfail_${kind} "${nfail_${kind}} + 1")
  if(nfail_${kind} LESS_EQUAL 8)
    list(APPEND fail "${msg}")
  elseif(nfail_${kind} EQUAL 9)
    list(APPEND fail "... (more of this kind)")
  endif()
endmacro()
if(base_isa STREQUAL "")
  add_fail(setup "base: no kvc::cpu symbol in a baseline ISA namespace")
endif()
set(own_avx2 "${avx2_isa}")
set(own_base "${base_isa}")
set(other_avx2 "${base_isa}")
set(other_base "${avx2_isa}")
foreach(which avx2 base)
  set(own "${own_${which}}")
  set(other "${other_${which}}")
  # (1) kvc::cpu
  set(cpu ${cpu_${which}})
  set(cpu_own ${cpu})
  list(FILTER cpu_own INCLUDE REGEX "kvc::v0::cpu::${own}::")
  set(cpu_untagged ${cpu})
  list(FILTER cpu_untagged EXCLUDE REGEX "kvc::v0::cpu::isa_[a-z0-9_]+::")
  foreach(s IN LISTS cpu_untagged)
    add_fail(cpu_untagged "${which}: kvc::cpu symbol outside an ISA namespace: ${s}")
  endforeach()
  # (3) nothing of the other object's ISA namespace
  set(foreign ${tagged_${which}})
  list(FILTER foreign INCLUDE REGEX "::${other}::")
  foreach(s IN LISTS foreign)
    add_fail(foreign "${which}: symbol of the other object's ISA namespace: ${s}")
  endforeach()
  # (2) the runtime's adapters and registries, and kvc::decode_attention, wherever they appear in a name
  set(rt ${rt_${which}})
  set(rt_own 0)
  foreach(s IN LISTS rt)
    string(REGEX MATCHALL "${rt_re}|${front_re}" refs "${s}")
    foreach(ref IN LISTS refs)
      if(ref MATCHES "::${own}::")
        math(EXPR rt_own "${rt_own} + 1")
      elseif(NOT ref MATCHES "::isa_[a-z0-9_]+::")
        add_fail(rt_neutral "${which}: ISA-neutral name for code that runs the kernels: ${s}")
      endif()
    endforeach()
  endforeach()
  list(LENGTH cpu_own ncpu)
  list(LENGTH foreign nforeign)
  message(STATUS "${which} (${own}): ${ncpu} kvc::cpu symbols in its own ISA namespace, ${nforeign} of the "
                 "other ISA; ${rt_own} runtime/decode_attention names in its own ISA namespace")
  if(ncpu EQUAL 0)
    add_fail(cpu_none "${which}: no kvc::cpu symbol in its own ISA namespace (expected > 0)")
  endif()
  if(rt_own EQUAL 0)
    add_fail(rt_none "${which}: no kvc::runtime adapter or registry symbol in its own ISA namespace (expected > 0)")
  endif()
endforeach()
# (4) no neutral function calls into an ISA namespace. objdump -r lists each inline function's
# relocations under "[.text.<mangled name>]"; in a mangled name an ISA namespace is <len>isa_...
# (objdump, not readelf -r: readelf takes a minute on an object of 20k sections).
find_program(CXXFILT c++filt)
foreach(which avx2 base)
  set(obj ${obj_${which}})
  set(awk_prog [=[
/^RELOCATION RECORDS FOR / {
  sec = $4; gsub(/^\[|\]:$/, "", sec)
  neutral = (sec ~ /^\.text(\.unlikely|\.hot|\.startup)?\._Z/) && (sec !~ /[0-9]isa_[a-z0-9]/)
  sub(/^\.text(\.unlikely|\.hot|\.startup)?\./, "", sec)
  next
}
neutral && $2 ~ /^R_/ { n++; v = $3; sub(/[-+]0x[0-9a-fA-F]+$/, "", v); if (v ~ /[0-9]isa_[a-z0-9]/) print sec " calls " v }
END { print "relocations-in-neutral-functions " n + 0 }
]=])
  set(filter "")
  if(CXXFILT)
    set(filter COMMAND ${CXXFILT})
  endif()
  execute_process(COMMAND ${OBJDUMP} -r ${obj} COMMAND awk "${awk_prog}" COMMAND sort -u ${filter}
                  OUTPUT_VARIABLE txt RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "objdump | awk failed on ${obj}")
  endif()
  string(REPLACE ";" "<semicolon>" txt "${txt}")
  string(REPLACE "[" "<lb>" txt "${txt}")
  string(REPLACE "]" "<rb>" txt "${txt}")
  string(REPLACE "\n" ";" lines "${txt}")
  set(nbad 0)
  foreach(l IN LISTS lines)
    if(l MATCHES "^relocations-in-neutral-functions ([0-9]+)")
      set(ncalls ${CMAKE_MATCH_1})
    elseif(NOT l STREQUAL "")
      math(EXPR nbad "${nbad} + 1")
      add_fail(reloc "${which}: ISA-neutral ${l}")
    endif()
  endforeach()
  message(STATUS "${which}: ${ncalls} relocations in ISA-neutral functions, ${nbad} into an ISA namespace")
endforeach()
if(nfail GREATER 0)
  string(REPLACE ";" "\n  " msg "${fail}")
  string(REPLACE "<semicolon>" ";" msg "${msg}")
  string(REPLACE "<lb>" "[" msg "${msg}")
  string(REPLACE "<rb>" "]" msg "${msg}")
  message(FATAL_ERROR "ISA symbol check failed (${nfail}):\n  ${msg}")
endif()
message(STATUS "ISA symbol check passed")
