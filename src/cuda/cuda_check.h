// Error checks for the CUDA runtime and cuBLAS: every runtime call goes through
// CUDA_CHECK, every launch is followed by check_launch(). KVQ_CUDA_SYNC=1 in the
// environment makes check_launch() synchronize the stream, so an asynchronous
// fault is reported at the launch that caused it.
#pragma once

#include <cuda_runtime.h>

namespace kvq::cuda {

[[noreturn]] void throw_cuda_error(cudaError_t error, const char* statement, const char* file, int line);
[[noreturn]] void throw_cublas_error(int status, const char* statement, const char* file, int line);
// cudaGetLastError after a launch; with KVQ_CUDA_SYNC=1 also synchronizes `stream`
// (skipped while the stream is capturing a graph, where a sync is illegal).
void check_launch(cudaStream_t stream, const char* kernel, const char* file, int line);
// Device ordinal of the current device, for error messages.
int current_device();

}  // namespace kvq::cuda

#define CUDA_CHECK(statement)                                                        \
  do {                                                                               \
    cudaError_t kvq_cuda_error_ = (statement);                                       \
    if (kvq_cuda_error_ != cudaSuccess)                                              \
      ::kvq::cuda::throw_cuda_error(kvq_cuda_error_, #statement, __FILE__, __LINE__); \
  } while (0)

#define CUBLAS_CHECK(statement)                                                        \
  do {                                                                                 \
    int kvq_cublas_status_ = static_cast<int>(statement);                              \
    if (kvq_cublas_status_ != 0)                                                       \
      ::kvq::cuda::throw_cublas_error(kvq_cublas_status_, #statement, __FILE__, __LINE__); \
  } while (0)

#define CUDA_CHECK_LAUNCH(stream, kernel) ::kvq::cuda::check_launch((stream), (kernel), __FILE__, __LINE__)
