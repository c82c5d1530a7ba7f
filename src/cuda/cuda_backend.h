// The CUDA backend's factory. Includable without CUDA; the implementation
// (cuda_backend.cu) is compiled only when KVQ_HAS_CUDA is defined, so callers
// guard their use with `#ifdef KVQ_HAS_CUDA`.
#pragma once

#include <cstdint>
#include <memory>

#include "cpu/cpu_backend.h"
#include "engine/step_batch.h"
#include "model/llama.h"

namespace kvq {

struct CudaBackendOptions {
  int32_t page_size = 64;
  int64_t pool_bytes = 0;          // 0: what the device has free after weights and workspace, minus a margin
  int32_t max_step_tokens = 2048;  // workspace sizing hint (grown on demand if a step carries more)
  uint64_t dummy_seed = 0;         // for weights == nullptr
  bool decode_graphs = true;       // replay decode steps as CUDA graphs (KVQ_CUDA_GRAPHS=0 in the environment: off)
  KvCacheOptions kv;               // --kv format and its options; the calibration must outlive the call only
};

// A Backend on CUDA device 0 with the same semantics as CpuBackend::forward:
// fp16 weights, pages in options.kv's format (the CPU's block bytes), fp32
// residual stream and accumulation.
// weights == nullptr: random weights of config's shapes generated on the GPU
// (the --dummy presets); otherwise the fp32 host weights are rounded to fp16
// and need not outlive the call. Throws kvq::Error when there is no device or
// the model does not fit.
std::unique_ptr<Backend> make_cuda_backend(const LlamaConfig& config, const LlamaWeights* weights,
                                           const CudaBackendOptions& options);

}  // namespace kvq
