# SPDX-License-Identifier: Apache-2.0
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(DIRECTORY include/kvc DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(TARGETS kvc EXPORT kvcTargets)
# Header-only and architecture independent: the package lives under share/ (as xsimd's does).
set(KVC_CMAKE_DIR ${CMAKE_INSTALL_DATADIR}/cmake/kvc)
install(EXPORT kvcTargets NAMESPACE kvc:: DESTINATION ${KVC_CMAKE_DIR})
if(TARGET kvc_cuda)
  # A separate export set, so CPU-only consumers never see CUDA::cudart.
  install(TARGETS kvc_cuda EXPORT kvcCudaTargets)
  install(EXPORT kvcCudaTargets NAMESPACE kvc:: DESTINATION ${KVC_CMAKE_DIR})
endif()
configure_package_config_file(cmake/kvcConfig.cmake.in ${CMAKE_CURRENT_BINARY_DIR}/kvcConfig.cmake
                              INSTALL_DESTINATION ${KVC_CMAKE_DIR})
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/kvcConfigVersion.cmake
                                 COMPATIBILITY SameMajorVersion ARCH_INDEPENDENT)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/kvcConfig.cmake ${CMAKE_CURRENT_BINARY_DIR}/kvcConfigVersion.cmake
              cmake/kvcDependencies.cmake cmake/kvcDispatch.cmake DESTINATION ${KVC_CMAKE_DIR})
