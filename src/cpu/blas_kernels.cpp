#include "cpu/blas_kernels.h"

#include <cblas.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

namespace kvq {

void reexec_with_fast_blas_kernels(char** argv) {
  if (std::getenv("OPENBLAS_CORETYPE") != nullptr) return;
  const std::string core = openblas_get_corename();
  if (core != "Prescott" && core != "prescott") return;
  const char* coretype = nullptr;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) coretype = "SkylakeX";
  else if (__builtin_cpu_supports("avx2")) coretype = "Haswell";
  if (coretype == nullptr) return;
  setenv("OPENBLAS_CORETYPE", coretype, 1);
  execv("/proc/self/exe", argv);  // returns only on failure: run on with the slow kernels
}

}  // namespace kvq
