# SPDX-License-Identifier: Apache-2.0
# Finds kvc's required dependencies. Shared by the build and by the installed kvcConfig.cmake.
include(CMakeFindDependencyMacro)
include(GNUInstallDirs)

# Debian's xsimd 8.1 exports a target whose INTERFACE_LINK_LIBRARIES names `xtl`, but xtl is
# only needed by xsimd's xtensor bridge. Provide an empty stand-in so consumers link cleanly.
if(NOT TARGET xtl)
  find_package(xtl QUIET CONFIG)
  if(NOT TARGET xtl)
    add_library(xtl INTERFACE IMPORTED)
  endif()
endif()
find_dependency(xsimd)
find_dependency(Eigen3 3.3 NO_MODULE)
