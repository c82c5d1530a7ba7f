// Memory measurements for the bench (memory_usage.h); CUDA stubs without CUDA.
#include "bench/memory_usage.h"

#include <fstream>
#include <sstream>

#ifdef KVQ_HAS_CUDA
#include <cuda_runtime.h>
#endif

namespace kvq {

#ifdef KVQ_HAS_CUDA
std::optional<int64_t> device_bytes_in_use() {
  size_t free_bytes = 0, total_bytes = 0;
  if (cudaSetDevice(0) != cudaSuccess || cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) {
    cudaGetLastError();  // no device is a normal case here, not an error for the next call to find
    return std::nullopt;
  }
  return static_cast<int64_t>(total_bytes - free_bytes);
}

std::string cuda_pci_bus_id() {
  char id[64] = {};
  if (cudaDeviceGetPCIBusId(id, sizeof id, 0) != cudaSuccess) {
    cudaGetLastError();
    return {};
  }
  return id;
}

void clear_device_error() { cudaGetLastError(); }
#else
std::optional<int64_t> device_bytes_in_use() { return std::nullopt; }
std::string cuda_pci_bus_id() { return {}; }
void clear_device_error() {}
#endif

bool reset_host_peak_rss() {
  std::ofstream clear_refs("/proc/self/clear_refs");
  clear_refs << "5";
  clear_refs.flush();
  return static_cast<bool>(clear_refs);
}

std::optional<int64_t> host_peak_rss_bytes() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmHWM:", 0) == 0) {
      std::istringstream fields(line.substr(6));
      int64_t kib = 0;
      if (fields >> kib) return kib * 1024;
    }
  }
  return std::nullopt;
}

}  // namespace kvq
