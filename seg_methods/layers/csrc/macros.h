// Shared macros for seg_methods ops: per-element math is written once in *_utils.h headers as
// HOST_DEVICE functions and compiled into both the C++ CPU kernels and the CUDA kernels.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define HOST_DEVICE __host__ __device__
#define HOST_DEVICE_INLINE __host__ __device__ __forceinline__
#else
#define HOST_DEVICE
#define HOST_DEVICE_INLINE inline
#endif

#include <torch/types.h>

// Raise a clear error when a CUDA tensor reaches an op whose CUDA kernel was not compiled.
#define SEG_METHODS_CUDA_NOT_BUILT(op_name)                                                        \
  TORCH_CHECK(false, "seg_methods._C was built without CUDA support, so op '" op_name              \
                     "' cannot run on a CUDA tensor. Rebuild with a usable nvcc or FORCE_CUDA=1.")
