// Implementation of the checks in cuda_check.h.
#include "cuda/cuda_check.h"

#include <cstdlib>
#include <string>

#include "core/error.h"

namespace kvq::cuda {
namespace {

bool sync_requested() {
  // Host-side switch read once; no GPU state.
  static const bool requested = [] {
    const char* value = std::getenv("KVQ_CUDA_SYNC");
    return value != nullptr && value[0] != '\0' && value[0] != '0';
  }();
  return requested;
}

}  // namespace

int current_device() {
  int device = -1;
  if (cudaGetDevice(&device) != cudaSuccess) cudaGetLastError();
  return device;
}

void throw_cuda_error(cudaError_t error, const char* statement, const char* file, int line) {
  throw Error(fmt::format("CUDA error on device {}: {} ({}) in {} at {}:{}", current_device(),
                          cudaGetErrorString(error), cudaGetErrorName(error), statement, file, line));
}

void throw_cublas_error(int status, const char* statement, const char* file, int line) {
  throw Error(fmt::format("cuBLAS error {} on device {} in {} at {}:{}", status, current_device(), statement, file, line));
}

void check_launch(cudaStream_t stream, const char* kernel, const char* file, int line) {
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) throw_cuda_error(error, kernel, file, line);
  if (!sync_requested()) return;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return;
  error = cudaStreamSynchronize(stream);
  if (error != cudaSuccess) throw_cuda_error(error, kernel, file, line);
}

}  // namespace kvq::cuda
