// Block gather/scatter between paged KV layers and one contiguous buffer.
//
// Layout contract (checked on every call):
//   * `layers` holds L >= 1 CPU tensors of one dtype and one shape
//     [num_blocks, *block_shape]; dim 0 is the block id and each block's
//     bytes are contiguous (layer[0] is contiguous, stride(0) == block numel).
//   * `block_ids` is a 1-D int64 CPU tensor of n ids, each in [0, num_blocks).
//   * the buffer (`out` of gather, `src` of scatter) is a contiguous CPU
//     tensor of any dtype whose byte size is n * L * block_bytes, in
//     block-major order: for i in [0, n): for l in [0, L): layers[l][ids[i]].
//
// The ops copy (block, layer) chunks with memcpy, in parallel with OpenMP when
// num_threads != 1. They never change global thread settings: they run from
// background transfer threads while the engine's forward runs.

#include <torch/library.h>
#include <ATen/Parallel.h>
#include <Python.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace llumigrate {
namespace {

struct Chunks {
  std::vector<char*> bases;   // per layer, byte address of block 0
  int64_t block_bytes = 0;
  int64_t num_blocks = 0;
};

Chunks check_layers(const at::TensorList& layers, const char* op) {
  TORCH_CHECK(!layers.empty(), op, ": layers must hold at least one tensor");
  const at::Tensor& first = layers[0];
  TORCH_CHECK(first.dim() >= 1, op, ": layers must be [num_blocks, *block_shape], got a 0-d tensor");
  Chunks c;
  c.num_blocks = first.size(0);
  for (size_t l = 0; l < layers.size(); ++l) {
    const at::Tensor& t = layers[l];
    TORCH_CHECK(t.device().is_cpu(), op, ": layers[", l, "] is on ", t.device(), "; only CPU is supported");
    TORCH_CHECK(t.scalar_type() == first.scalar_type(), op, ": layers[", l, "] has dtype ", t.scalar_type(),
                " but layers[0] has ", first.scalar_type());
    TORCH_CHECK(t.sizes() == first.sizes(), op, ": layers[", l, "] has shape ", t.sizes(),
                " but layers[0] has ", first.sizes());
    if (c.num_blocks == 0) continue;
    TORCH_CHECK(t[0].is_contiguous(), op, ": layers[", l, "] blocks are not contiguous (strides ", t.strides(), ")");
    const int64_t block_numel = t[0].numel();
    TORCH_CHECK(c.num_blocks == 1 || t.stride(0) == block_numel, op, ": layers[", l, "] stride(0) is ",
                t.stride(0), " but a block holds ", block_numel, " elements; blocks must be packed");
    c.bases.push_back(static_cast<char*>(t.data_ptr()));
  }
  c.block_bytes = c.num_blocks == 0 ? 0 : first[0].numel() * static_cast<int64_t>(first.element_size());
  return c;
}

std::vector<int64_t> check_ids(const at::Tensor& block_ids, int64_t num_blocks, const char* op) {
  TORCH_CHECK(block_ids.device().is_cpu(), op, ": block_ids must be on CPU, got ", block_ids.device());
  TORCH_CHECK(block_ids.scalar_type() == at::kLong, op, ": block_ids must be int64, got ", block_ids.scalar_type());
  TORCH_CHECK(block_ids.dim() == 1, op, ": block_ids must be 1-D, got shape ", block_ids.sizes());
  at::Tensor ids = block_ids.contiguous();
  const int64_t* p = ids.data_ptr<int64_t>();
  std::vector<int64_t> out(p, p + ids.numel());
  for (size_t i = 0; i < out.size(); ++i) {
    TORCH_CHECK(out[i] >= 0 && out[i] < num_blocks, op, ": block_ids[", i, "] = ", out[i],
                " is out of range [0, ", num_blocks, ")");
  }
  return out;
}

void check_buffer(const at::Tensor& buf, const char* name, int64_t want_bytes, const char* op) {
  TORCH_CHECK(buf.device().is_cpu(), op, ": ", name, " must be on CPU, got ", buf.device());
  TORCH_CHECK(buf.is_contiguous(), op, ": ", name, " must be contiguous");
  const int64_t bytes = buf.numel() * static_cast<int64_t>(buf.element_size());
  TORCH_CHECK(bytes == want_bytes, op, ": ", name, " holds ", bytes, " bytes but n * num_layers * block_bytes = ",
              want_bytes);
}

int resolve_threads(int64_t num_threads, const char* op) {
  TORCH_CHECK(num_threads >= 0, op, ": num_threads must be >= 0 (0 = at::get_num_threads()), got ", num_threads);
  return num_threads == 0 ? at::get_num_threads() : static_cast<int>(num_threads);
}

// Copies chunk k = i * L + l between the buffer and block ids[i] of layer l.
// to_buffer selects gather (layers -> buffer) or scatter (buffer -> layers).
void copy_chunks(const Chunks& c, const std::vector<int64_t>& ids, char* buf, bool to_buffer, int threads) {
  const int64_t num_layers = static_cast<int64_t>(c.bases.size());
  const int64_t total = static_cast<int64_t>(ids.size()) * num_layers;
  const int64_t bb = c.block_bytes;
  if (total == 0 || bb == 0) return;
  // NOTE: no GIL handling here: torch.ops releases the GIL around every
  // operator call (tests/test_kv_ops.py checks that Python threads run).
  auto one = [&](int64_t k) {
    char* block = c.bases[k % num_layers] + ids[k / num_layers] * bb;
    char* flat = buf + k * bb;
    if (to_buffer) {
      std::memcpy(flat, block, bb);
    } else {
      std::memcpy(block, flat, bb);
    }
  };
  if (threads <= 1 || total == 1) {
    for (int64_t k = 0; k < total; ++k) one(k);
  } else {
    const int n = static_cast<int>(std::min<int64_t>(threads, total));
#pragma omp parallel for num_threads(n) schedule(static)
    for (int64_t k = 0; k < total; ++k) one(k);
  }
}

void gather_blocks(at::TensorList layers, const at::Tensor& block_ids, const at::Tensor& out, int64_t num_threads) {
  constexpr const char* op = "llumigrate::gather_blocks";
  const Chunks c = check_layers(layers, op);
  const auto ids = check_ids(block_ids, c.num_blocks, op);
  check_buffer(out, "out", static_cast<int64_t>(ids.size() * c.bases.size()) * c.block_bytes, op);
  const int threads = resolve_threads(num_threads, op);
  copy_chunks(c, ids, static_cast<char*>(out.data_ptr()), /*to_buffer=*/true, threads);
}

void scatter_blocks(const at::Tensor& src, const at::Tensor& block_ids, at::TensorList layers, int64_t num_threads) {
  constexpr const char* op = "llumigrate::scatter_blocks";
  const Chunks c = check_layers(layers, op);
  const auto ids = check_ids(block_ids, c.num_blocks, op);
  check_buffer(src, "src", static_cast<int64_t>(ids.size() * c.bases.size()) * c.block_bytes, op);
  const int threads = resolve_threads(num_threads, op);
  copy_chunks(c, ids, static_cast<char*>(src.data_ptr()), /*to_buffer=*/false, threads);
}

}  // namespace

TORCH_LIBRARY(llumigrate, m) {
  m.def("gather_blocks(Tensor[] layers, Tensor block_ids, Tensor(a!) out, int num_threads) -> ()");
  m.def("scatter_blocks(Tensor src, Tensor block_ids, Tensor(a!)[] layers, int num_threads) -> ()");
}

TORCH_LIBRARY_IMPL(llumigrate, CPU, m) {
  m.impl("gather_blocks", &gather_blocks);
  m.impl("scatter_blocks", &scatter_blocks);
}

}  // namespace llumigrate

// `import llumigrate._C` loads this library, which registers the ops above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
