// CUDA device discovery. A machine without a driver or GPU is a normal case
// (CI, CPU hosts): the runtime's error is swallowed and the list is empty.
#include "cuda/device.h"

#include <cuda_runtime.h>

namespace kvq {

std::vector<GpuInfo> list_cuda_devices() {
  std::vector<GpuInfo> gpus;
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return gpus;
  }
  for (int d = 0; d < count; ++d) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, d) != cudaSuccess) continue;
    GpuInfo info;
    info.name = prop.name;
    info.compute_major = prop.major;
    info.compute_minor = prop.minor;
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaSetDevice(d) == cudaSuccess && cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess) {
      info.free_bytes = static_cast<int64_t>(free_bytes);
      info.total_bytes = static_cast<int64_t>(total_bytes);
    }
    gpus.push_back(info);
  }
  return gpus;
}

}  // namespace kvq
