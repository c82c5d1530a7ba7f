// Warp-level tensor-core helpers (sm_80+: mma.sync, ldmatrix, movmatrix), fp16
// operands, fp32 accumulators, for kernels that keep their tiles per warp (the
// quantized decode kernel, quantized_attention.cu); wgmma.cuh has the
// warpgroup (sm_90a) ones.
//
// Fragment layouts of mma.m16n8k16 (PTX ISA "Matrix Fragments for mma.m16n8k16"),
// with group = lane / 4 and pair = 2 * (lane % 4); each 32-bit register holds two
// halves, the lower column (A, C) or row (B) in the low 16 bits:
//   A (16 x 16, row-major): a[0] (group, pair + {0, 1}), a[1] (group + 8, pair + {0, 1}),
//                           a[2] (group, pair + 8 + {0, 1}), a[3] (group + 8, pair + 8 + {0, 1});
//   B (16 x 8, k x n):      b[0] (pair + {0, 1}, group), b[1] (pair + 8 + {0, 1}, group);
//   C (16 x 8, fp32):       c[0..1] (group, pair + {0, 1}), c[2..3] (group + 8, pair + {0, 1}).
// ldmatrix.x4 loads four 8x8 matrices, lanes 8q .. 8q + 7 giving the addresses of
// matrix q's 8 rows (16 bytes each); matrix q lands in register q in the layout
// "row group, columns pair + {0, 1}" (transposed with .trans).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

namespace kvq::cuda {

// Two floats as the halves of one fragment register (lo in the low 16 bits), rounded to nearest.
__device__ __forceinline__ uint32_t half2_bits(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// The A fragment of a row-major 16x16 fp16 tile: lane i passes the address of row i % 16, columns
// 8 * (i / 16) .. + 7 (16-byte aligned). The memory clobber keeps it after the stores it reads.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&a)[4], const __half* row_chunk) {
  const auto address = static_cast<uint32_t>(__cvta_generic_to_shared(row_chunk));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(address)
               : "memory");
}

// The A fragment of the transpose of a stored 16x16 fp16 tile T (A = T^T): lane i passes the address of
// T's row (i % 8) + 8 * (i / 16), columns 8 * ((i / 8) % 2) .. + 7.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&a)[4], const __half* row_chunk) {
  const auto address = static_cast<uint32_t>(__cvta_generic_to_shared(row_chunk));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(address)
               : "memory");
}

// Transposes an 8x8 fp16 matrix held in fragment layout (lane: row group, columns pair + {0, 1}): the
// result holds M^T the same way, i.e. lane gets M (pair + {0, 1}, group). Turns a C fragment (rows x
// columns) into the B fragment of the same matrix as (k = rows, n = columns).
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t m) {
  uint32_t t;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(t) : "r"(m));
  return t;
}

// c (16 x 8, fp32) += A (16 x 16, fp16) * B (16 x 8, fp16).
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

}  // namespace kvq::cuda
