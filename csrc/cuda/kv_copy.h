// C ABI of the block-copy kernel (kv_copy.cu): plain pointers, byte strides
// and a cudaStream_t, so the kernel compiles with nvcc alone (no torch headers)
// and the torch binding (kv_ops_cuda.cpp) stays a thin checker/launcher.
//
// A copy moves n * L * P chunks of `part_bytes` each, for i in [0, n) (ids),
// l in [0, L) (layers) and p in [0, P) (parts of a block: P = 2 for a
// K/V-split layer, else 1). Chunk k = (i * L + l) * P + p lives at
//   layered side:  layer_bases[l] + ids[i] * block_stride + p * part_stride
//   flat side:     flat + k * part_bytes            (block-major buffer)
// Both arrays (layer_bases, ids) are DEVICE memory. Chunks must not overlap
// on the destination side unless they carry equal bytes.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  const uint64_t* layer_bases;  // device [L]; NULL selects the flat form
  const int64_t* ids;           // device [n]; used with layer_bases
  int64_t block_stride;         // bytes between consecutive block ids
  int64_t part_stride;          // bytes between the parts of one block
  uint64_t flat;                // flat form: address of chunk 0
} LlmgSide;

typedef struct {
  LlmgSide src;
  LlmgSide dst;
  int64_t num_ids;     // n
  int64_t num_layers;  // L >= 1
  int64_t num_parts;   // P >= 1
  int64_t part_bytes;  // bytes per chunk, a multiple of vec_bytes
} LlmgCopy;

// Launches one kernel on `stream` that performs `copy`, loading and storing
// `vec_bytes` (16, 8, 4, 2 or 1) at a time; every address and stride involved
// must be a multiple of vec_bytes (llumigrate_vec_bytes picks the widest).
// Returns cudaSuccess or the launch error; never synchronises.
cudaError_t llumigrate_copy_blocks(const LlmgCopy* copy, int vec_bytes, cudaStream_t stream);

// Widest vector width (16..1 bytes) dividing `alignment`, the bitwise OR of
// every address, stride and size of a copy.
int llumigrate_vec_bytes(uint64_t alignment);

#ifdef __cplusplus
}
#endif
