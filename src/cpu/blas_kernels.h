// OpenBLAS picks its kernels from the CPU model at load time. On virtual
// machines that report an unknown model it falls back to SSE3 ("Prescott")
// kernels, 2-3x slower than the AVX2/AVX-512 ones the CPU actually has.
#pragma once

namespace kvq {

// When OpenBLAS chose the fallback kernels although the CPU has AVX2 or
// AVX-512 and OPENBLAS_CORETYPE is unset, re-executes this program with
// OPENBLAS_CORETYPE naming the right kernels (read only at library load).
// Returns normally when nothing needs doing or re-executing fails.
void reexec_with_fast_blas_kernels(char** argv);

}  // namespace kvq
