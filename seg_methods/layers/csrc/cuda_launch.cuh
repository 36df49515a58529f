// Launch helpers shared by the CUDA kernels of every op: 1-D grids of kThreadsPerBlock threads on
// the current stream, with the launch checked (the CUDA checklist of CONVENTIONS.md §3).
//
// Include from .cu files only. The stream comes from c10/cuda/CUDAStream.h rather than
// ATen/cuda/CUDAContext.h: the latter pulls in cuSPARSE/cuBLAS headers that a bare toolkit (the
// one of our compile check) may lack.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <utility>

namespace seg_methods {
namespace cuda_launch {

constexpr int kThreadsPerBlock = 256;

// Blocks for one thread per element, n > 0 elements.
inline unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>((n + kThreadsPerBlock - 1) / kThreadsPerBlock);
}

// Blocks for a grid-stride loop over n elements: one thread per element, but at least one block
// and at most 65535 (the loop covers the rest).
inline unsigned int grid_stride_blocks(int64_t n) {
  const int64_t blocks = (n + kThreadsPerBlock - 1) / kThreadsPerBlock;
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535));
}

// Global index of the calling thread in a 1-D grid.
__device__ __forceinline__ int64_t thread_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

// Number of threads in the 1-D grid (the step of a grid-stride loop).
__device__ __forceinline__ int64_t grid_size() {
  return static_cast<int64_t>(blockDim.x) * gridDim.x;
}

// kernel<<<blocks, kThreadsPerBlock, 0, current stream>>>(args...), then the launch check.
template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), unsigned int blocks, Args&&... args) {
  kernel<<<blocks, kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
      std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda_launch
}  // namespace seg_methods
