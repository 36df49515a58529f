// Python bindings for build information. Each op registers itself in its own folder with
// TORCH_LIBRARY_FRAGMENT(seg_methods, m) and is reached as torch.ops.seg_methods.<op>.
#include <torch/extension.h>

#include <string>

namespace seg_methods {

bool has_cuda() {
#if defined(WITH_CUDA)
  return true;
#else
  return false;
#endif
}

std::string get_cuda_version();  // defined in cuda_version.cu when built with CUDA

std::string get_compiler_version() {
  std::string version;
#if defined(__GNUC__) && !defined(__clang__)
  version = "GCC " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__);
#elif defined(__clang__)
  version = "clang " + std::to_string(__clang_major__) + "." + std::to_string(__clang_minor__);
#elif defined(_MSC_VER)
  version = "MSVC " + std::to_string(_MSC_FULL_VER);
#else
  version = "unknown";
#endif
  return version;
}

#if !defined(WITH_CUDA)
std::string get_cuda_version() { return "not built"; }
#endif

}  // namespace seg_methods

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("has_cuda", &seg_methods::has_cuda, "Whether CUDA kernels were compiled");
  m.def("get_compiler_version", &seg_methods::get_compiler_version, "Host compiler version");
  m.def("get_cuda_version", &seg_methods::get_cuda_version, "CUDA toolkit used at build time");
}
