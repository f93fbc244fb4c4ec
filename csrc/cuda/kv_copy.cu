// Batched block copy between paged KV layers and flat buffers (or between two
// sets of layers, e.g. a peer's IPC-mapped cache): one launch per batch.
// Contract and addressing: kv_copy.h.
//
// Work split: every chunk is cut into tiles of kThreads * kUnroll vectors;
// CUDA blocks walk the tiles grid-stride. Each thread issues kUnroll
// independent streaming loads before its stores (memory-level parallelism);
// loads/stores bypass L1 residency (.cs) since nothing is read twice.

#include "kv_copy.h"

namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int kMaxBlocksPerSM = 16;

struct Addressing {
  LlmgSide side;
  __device__ __forceinline__ char* chunk(int64_t k, int64_t i, int64_t l, int64_t p, int64_t part_bytes) const {
    if (side.layer_bases == nullptr) {
      return reinterpret_cast<char*>(side.flat) + k * part_bytes;
    }
    return reinterpret_cast<char*>(side.layer_bases[l]) + side.ids[i] * side.block_stride + p * side.part_stride;
  }
};

template <typename V>
__device__ __forceinline__ V load_cs(const V* p) { return __ldcs(p); }
template <typename V>
__device__ __forceinline__ void store_cs(V* p, V v) { __stcs(p, v); }

template <typename V>
__global__ void __launch_bounds__(kThreads) copy_blocks_kernel(LlmgCopy c, int64_t tiles_per_chunk,
                                                               int64_t num_tiles) {
  const int64_t elems = c.part_bytes / static_cast<int64_t>(sizeof(V));
  const int64_t tile_elems = static_cast<int64_t>(kThreads) * kUnroll;
  const Addressing src{c.src}, dst{c.dst};
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t k = tile / tiles_per_chunk;
    const int64_t p = k % c.num_parts;
    const int64_t l = (k / c.num_parts) % c.num_layers;
    const int64_t i = k / (c.num_parts * c.num_layers);
    const V* s = reinterpret_cast<const V*>(src.chunk(k, i, l, p, c.part_bytes));
    V* d = reinterpret_cast<V*>(dst.chunk(k, i, l, p, c.part_bytes));
    const int64_t lo = (tile % tiles_per_chunk) * tile_elems;
    const int64_t hi = min(elems, lo + tile_elems);
    V r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t e = lo + threadIdx.x + static_cast<int64_t>(u) * kThreads;
      if (e < hi) r[u] = load_cs(s + e);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t e = lo + threadIdx.x + static_cast<int64_t>(u) * kThreads;
      if (e < hi) store_cs(d + e, r[u]);
    }
  }
}

template <typename V>
cudaError_t launch(const LlmgCopy& c, cudaStream_t stream) {
  const int64_t elems = c.part_bytes / static_cast<int64_t>(sizeof(V));
  const int64_t tile_elems = static_cast<int64_t>(kThreads) * kUnroll;
  const int64_t tiles_per_chunk = (elems + tile_elems - 1) / tile_elems;
  const int64_t num_tiles = tiles_per_chunk * c.num_ids * c.num_layers * c.num_parts;
  if (num_tiles == 0) return cudaSuccess;
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t cap = static_cast<int64_t>(sms > 0 ? sms : 1) * kMaxBlocksPerSM;
  const unsigned grid = static_cast<unsigned>(num_tiles < cap ? num_tiles : cap);
  copy_blocks_kernel<V><<<grid, kThreads, 0, stream>>>(c, tiles_per_chunk, num_tiles);
  return cudaGetLastError();
}

}  // namespace

extern "C" int llumigrate_vec_bytes(uint64_t alignment) {
  for (int v = 16; v > 1; v /= 2) {
    if (alignment % static_cast<uint64_t>(v) == 0) return v;
  }
  return 1;
}

extern "C" cudaError_t llumigrate_copy_blocks(const LlmgCopy* copy, int vec_bytes, cudaStream_t stream) {
  if (copy == nullptr || copy->num_layers < 1 || copy->num_parts < 1 || copy->num_ids < 0 ||
      copy->part_bytes < 0 || copy->part_bytes % vec_bytes != 0) {
    return cudaErrorInvalidValue;
  }
  switch (vec_bytes) {
    case 16: return launch<uint4>(*copy, stream);
    case 8: return launch<uint2>(*copy, stream);
    case 4: return launch<unsigned int>(*copy, stream);
    case 2: return launch<unsigned short>(*copy, stream);
    case 1: return launch<unsigned char>(*copy, stream);
    default: return cudaErrorInvalidValue;
  }
}
