// A second stream for launches that do not depend on what the main stream is
// doing at the time: fork_side() lets the side stream continue from the main
// stream's current point, join_side() makes the main stream wait for everything
// enqueued on the side so far. Graph captures record both as edges, so a
// replayed decode step runs the side's kernels beside the main ones. Small
// decode steps gain most: their kernels fill a few multiprocessors each, and
// each one's latency otherwise adds to the step's.
#pragma once

#include <cuda_runtime.h>

#include "cuda/cuda_check.h"

namespace kvq::cuda {

struct SideStream {
  cudaStream_t stream = nullptr;
  cudaEvent_t fork_event = nullptr;  // recorded on the main stream by fork_side()
  cudaEvent_t join_event = nullptr;  // recorded on the side stream by join_side()
};

inline void fork_side(const SideStream& side, cudaStream_t main) {
  CUDA_CHECK(cudaEventRecord(side.fork_event, main));
  CUDA_CHECK(cudaStreamWaitEvent(side.stream, side.fork_event, 0));
}

inline void join_side(const SideStream& side, cudaStream_t main) {
  CUDA_CHECK(cudaEventRecord(side.join_event, side.stream));
  CUDA_CHECK(cudaStreamWaitEvent(main, side.join_event, 0));
}

}  // namespace kvq::cuda
