// Compiled only when seg_methods._C is built with CUDA (setup.py adds *.cu files then).
#include <cuda_runtime_api.h>

#include <string>

namespace seg_methods {

std::string get_cuda_version() {
  int v = CUDART_VERSION;  // e.g. 13000
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

}  // namespace seg_methods
