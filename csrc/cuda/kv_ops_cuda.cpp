// CUDA implementations of the KV copy ops (built only with a CUDA torch).
//
//   gather_blocks / scatter_blocks   (schemas in csrc/kv_ops.cpp) for CUDA layers
//   copy_blocks(src_bases, src_num_blocks, src_block_stride, src_part_stride,
//               src_ids, dst_ids, layers)                 (defined here)
//
// Layers: L >= 1 CUDA tensors on one device, one dtype, one shape and one
// stride set, dim 0 the block id. A block is either contiguous, or made of
// P = size(1) contiguous parts at stride(1) (vLLM's [2, num_blocks, ...] K/V
// caches seen through .transpose(0, 1)); the flat buffer holds, block-major,
// for each id, layer and part, that part's bytes: the same bytes the CPU ops
// produce for a block-contiguous layer. Block ids are int64 CPU tensors
// (range-checked here). Buffers live on the layers' device (asynchronous, on
// the current stream) or on the CPU (synchronous: staged through a device
// buffer). copy_blocks reads blocks src_ids of layers at src_bases (another
// process's cache mapped here through CUDA IPC, same layout, byte strides
// given) into blocks dst_ids of `layers`, on the current stream.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "kv_copy.h"

namespace llumigrate {
namespace {

struct Geometry {
  std::vector<uint64_t> bases;  // per layer, address of block 0
  int64_t num_blocks = 0, block_stride = 0, num_parts = 1, part_stride = 0, part_bytes = 0;
};

// True when dims [from, dim) of (sizes, strides) are packed row-major.
bool packed_from(c10::IntArrayRef sizes, c10::IntArrayRef strides, int64_t from) {
  int64_t expect = 1;
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= from; --d) {
    if (sizes[d] != 1 && strides[d] != expect) return false;
    expect *= sizes[d];
  }
  return true;
}

int64_t numel_from(c10::IntArrayRef sizes, int64_t from) {
  int64_t n = 1;
  for (size_t d = from; d < sizes.size(); ++d) n *= sizes[d];
  return n;
}

Geometry check_layers(const at::TensorList& layers, const char* op) {
  TORCH_CHECK(!layers.empty(), op, ": layers must hold at least one tensor");
  const at::Tensor& first = layers[0];
  TORCH_CHECK(first.dim() >= 1, op, ": layers must be [num_blocks, *block_shape], got a 0-d tensor");
  for (size_t l = 0; l < layers.size(); ++l) {
    const at::Tensor& t = layers[l];
    TORCH_CHECK(t.is_cuda() && t.device() == first.device(), op, ": layers[", l, "] is on ", t.device(),
                " but layers[0] is on ", first.device());
    TORCH_CHECK(t.scalar_type() == first.scalar_type(), op, ": layers[", l, "] has dtype ", t.scalar_type(),
                " but layers[0] has ", first.scalar_type());
    TORCH_CHECK(t.sizes() == first.sizes() && t.strides() == first.strides(), op, ": layers[", l,
                "] has shape ", t.sizes(), " strides ", t.strides(), " but layers[0] has ", first.sizes(), " ",
                first.strides());
  }
  Geometry g;
  const int64_t es = static_cast<int64_t>(first.element_size());
  const auto sizes = first.sizes();
  const auto strides = first.strides();
  g.num_blocks = sizes[0];
  g.block_stride = strides[0] * es;
  if (packed_from(sizes, strides, 1)) {
    g.part_bytes = numel_from(sizes, 1) * es;
    g.part_stride = g.part_bytes;
  } else {
    TORCH_CHECK(first.dim() >= 2 && packed_from(sizes, strides, 2), op,
                ": a block must be contiguous or [parts, *contiguous] (strides ", strides, ")");
    g.num_parts = sizes[1];
    g.part_stride = strides[1] * es;
    g.part_bytes = numel_from(sizes, 2) * es;
  }
  TORCH_CHECK(g.block_stride >= 0 && g.part_stride >= 0, op, ": negative strides are not supported");
  for (const at::Tensor& t : layers) g.bases.push_back(reinterpret_cast<uint64_t>(t.data_ptr()));
  return g;
}

std::vector<int64_t> check_ids(const at::Tensor& ids, int64_t num_blocks, const char* op, const char* name) {
  TORCH_CHECK(ids.device().is_cpu(), op, ": ", name, " must be on CPU, got ", ids.device());
  TORCH_CHECK(ids.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 1, op, ": ", name, " must be 1-D, got shape ", ids.sizes());
  const at::Tensor c = ids.contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  std::vector<int64_t> out(p, p + c.numel());
  for (size_t i = 0; i < out.size(); ++i) {
    TORCH_CHECK(out[i] >= 0 && out[i] < num_blocks, op, ": ", name, "[", i, "] = ", out[i],
                " is out of range [0, ", num_blocks, ")");
  }
  return out;
}

// Uploads `values` (bases and ids) to `device` in one pinned copy on the
// current stream; the result stays valid for kernels on that stream.
at::Tensor upload(const std::vector<int64_t>& values, const at::Device& device) {
  at::Tensor host = at::empty({static_cast<int64_t>(values.size())},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  if (!values.empty()) std::memcpy(host.data_ptr<int64_t>(), values.data(), values.size() * sizeof(int64_t));
  return host.to(device, /*non_blocking=*/true);
}

uint64_t side_alignment(const Geometry& g) {
  uint64_t a = static_cast<uint64_t>(g.block_stride | g.part_stride | g.part_bytes);
  for (uint64_t b : g.bases) a |= b;
  return a;
}

void launch(LlmgCopy c, uint64_t alignment) {
  const int vec = llumigrate_vec_bytes(alignment | static_cast<uint64_t>(c.part_bytes));
  const cudaError_t err = llumigrate_copy_blocks(&c, vec, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "llumigrate copy kernel launch failed: ", cudaGetErrorString(err));
}

// One flat <-> layered copy; to_flat selects gather.
void flat_copy(at::TensorList layers, const at::Tensor& block_ids, const at::Tensor& flat, bool to_flat,
               const char* op, const char* name) {
  const Geometry g = check_layers(layers, op);
  const c10::cuda::CUDAGuard guard(layers[0].device());
  const auto ids = check_ids(block_ids, g.num_blocks, op, "block_ids");
  const int64_t n = static_cast<int64_t>(ids.size()), L = static_cast<int64_t>(g.bases.size());
  TORCH_CHECK(flat.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(flat.device().is_cpu() || flat.device() == layers[0].device(), op, ": ", name, " is on ",
              flat.device(), "; it must be on ", layers[0].device(), " or the CPU");
  const int64_t want = n * L * g.num_parts * g.part_bytes;
  const int64_t bytes = flat.numel() * static_cast<int64_t>(flat.element_size());
  TORCH_CHECK(bytes == want, op, ": ", name, " holds ", bytes, " bytes but n * num_layers * block_bytes = ", want);
  if (want == 0) return;
  at::Tensor dev = flat;
  if (flat.device().is_cpu()) {  // host buffer: stage on the device (synchronous)
    dev = at::empty({want}, layers[0].options().dtype(at::kByte));
    if (!to_flat) dev.copy_(flat.view({-1}).view(at::kByte));
  }
  std::vector<int64_t> meta(g.bases.begin(), g.bases.end());
  meta.insert(meta.end(), ids.begin(), ids.end());
  const at::Tensor d_meta = upload(meta, layers[0].device());
  const auto* d_bases = reinterpret_cast<const uint64_t*>(d_meta.data_ptr<int64_t>());
  const LlmgSide layered{d_bases, d_meta.data_ptr<int64_t>() + L, g.block_stride, g.part_stride, 0};
  const LlmgSide flat_side{nullptr, nullptr, 0, 0, reinterpret_cast<uint64_t>(dev.data_ptr())};
  LlmgCopy c{to_flat ? layered : flat_side, to_flat ? flat_side : layered, n, L, g.num_parts, g.part_bytes};
  launch(c, side_alignment(g) | reinterpret_cast<uint64_t>(dev.data_ptr()));
  if (flat.device().is_cpu() && to_flat) flat.view({-1}).view(at::kByte).copy_(dev);
}

void gather_blocks_cuda(at::TensorList layers, const at::Tensor& block_ids, const at::Tensor& out,
                        int64_t num_threads) {
  flat_copy(layers, block_ids, out, /*to_flat=*/true, "llumigrate::gather_blocks", "out");
}

void scatter_blocks_cuda(const at::Tensor& src, const at::Tensor& block_ids, at::TensorList layers,
                         int64_t num_threads) {
  flat_copy(layers, block_ids, src, /*to_flat=*/false, "llumigrate::scatter_blocks", "src");
}

void copy_blocks_cuda(c10::IntArrayRef src_bases, int64_t src_num_blocks, int64_t src_block_stride,
                      int64_t src_part_stride, const at::Tensor& src_ids, const at::Tensor& dst_ids,
                      at::TensorList layers) {
  constexpr const char* op = "llumigrate::copy_blocks";
  const Geometry g = check_layers(layers, op);
  const c10::cuda::CUDAGuard guard(layers[0].device());
  const int64_t L = static_cast<int64_t>(g.bases.size());
  TORCH_CHECK(static_cast<int64_t>(src_bases.size()) == L, op, ": ", src_bases.size(), " source bases for ", L,
              " layers");
  TORCH_CHECK(src_num_blocks >= 0 && src_block_stride >= 0 && src_part_stride >= 0, op,
              ": source geometry must be non-negative");
  const auto sids = check_ids(src_ids, src_num_blocks, op, "src_ids");
  const auto dids = check_ids(dst_ids, g.num_blocks, op, "dst_ids");
  TORCH_CHECK(sids.size() == dids.size(), op, ": ", sids.size(), " source ids but ", dids.size(),
              " destination ids");
  const int64_t n = static_cast<int64_t>(sids.size());
  if (n == 0 || g.part_bytes == 0) return;
  uint64_t alignment = side_alignment(g) | static_cast<uint64_t>(src_block_stride | src_part_stride);
  std::vector<int64_t> meta(src_bases.begin(), src_bases.end());
  for (int64_t b : src_bases) {
    TORCH_CHECK(b > 0, op, ": source bases must be > 0");
    alignment |= static_cast<uint64_t>(b);
  }
  meta.insert(meta.end(), g.bases.begin(), g.bases.end());
  meta.insert(meta.end(), sids.begin(), sids.end());
  meta.insert(meta.end(), dids.begin(), dids.end());
  const at::Tensor d_meta = upload(meta, layers[0].device());
  const int64_t* p = d_meta.data_ptr<int64_t>();
  const LlmgSide src{reinterpret_cast<const uint64_t*>(p), p + 2 * L, src_block_stride, src_part_stride, 0};
  const LlmgSide dst{reinterpret_cast<const uint64_t*>(p + L), p + 2 * L + n, g.block_stride, g.part_stride, 0};
  launch(LlmgCopy{src, dst, n, L, g.num_parts, g.part_bytes}, alignment);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llumigrate, m) {
  m.def("copy_blocks(int[] src_bases, int src_num_blocks, int src_block_stride, int src_part_stride, "
        "Tensor src_ids, Tensor dst_ids, Tensor(a!)[] layers) -> ()");
}

TORCH_LIBRARY_IMPL(llumigrate, CUDA, m) {
  m.impl("gather_blocks", &gather_blocks_cuda);
  m.impl("scatter_blocks", &scatter_blocks_cuda);
  m.impl("copy_blocks", &copy_blocks_cuda);
}

}  // namespace llumigrate
