// GPUs visible to the CUDA runtime (built only when nvcc is present).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kvq {

struct GpuInfo {
  std::string name;
  int compute_major = 0;
  int compute_minor = 0;
  int64_t total_bytes = 0;
  int64_t free_bytes = 0;
};

// Empty when there is no driver or no device; never throws for their absence.
std::vector<GpuInfo> list_cuda_devices();

}  // namespace kvq
