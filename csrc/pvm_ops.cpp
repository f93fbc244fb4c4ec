// Reading KV blocks straight out of another process (Linux process_vm_readv).
//
//   pvm_read_blocks(pid, remote_bases, remote_ids, local_ids, layers, num_threads)
//
// copies, for every i and layer l, the block_bytes at
//   remote_bases[l] + remote_ids[i] * block_bytes   in process `pid`
// into block local_ids[i] of layers[l] here: one copy, no staging. The remote
// layers must use the same packed layout as the local ones (the transfer
// handshake checks KVLayout equality). Needs ptrace rights over `pid` (same
// user, and Yama ptrace_scope 0 or CAP_SYS_PTRACE). A short or failed read
// raises with the errno text; it never touches memory outside `layers`.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#ifdef __linux__
#include <sys/uio.h>
#endif

namespace llumigrate {
namespace {

constexpr int64_t kMaxIov = 1024;  // IOV_MAX on Linux

struct Span {
  std::vector<iovec> local, remote;
};

void check_pvm_args(int64_t pid, c10::IntArrayRef remote_bases, const at::Tensor& remote_ids,
                    const at::Tensor& local_ids, const at::TensorList& layers, int64_t num_threads) {
  constexpr const char* op = "llumigrate::pvm_read_blocks";
  TORCH_CHECK(pid > 0, op, ": pid must be > 0, got ", pid);
  TORCH_CHECK(!layers.empty(), op, ": layers must hold at least one tensor");
  TORCH_CHECK(static_cast<size_t>(remote_bases.size()) == layers.size(), op, ": ", remote_bases.size(),
              " remote layer addresses for ", layers.size(), " layers");
  TORCH_CHECK(num_threads >= 0, op, ": num_threads must be >= 0, got ", num_threads);
  for (const auto* ids : {&remote_ids, &local_ids}) {
    TORCH_CHECK(ids->device().is_cpu() && ids->scalar_type() == at::kLong && ids->dim() == 1, op,
                ": block ids must be 1-D int64 CPU tensors");
  }
  TORCH_CHECK(remote_ids.numel() == local_ids.numel(), op, ": ", remote_ids.numel(), " remote ids but ",
              local_ids.numel(), " local ids");
  const at::Tensor& first = layers[0];
  TORCH_CHECK(first.dim() >= 1, op, ": layers must be [num_blocks, *block_shape]");
  for (size_t l = 0; l < layers.size(); ++l) {
    const at::Tensor& t = layers[l];
    TORCH_CHECK(t.device().is_cpu(), op, ": layers[", l, "] is not on CPU");
    TORCH_CHECK(t.scalar_type() == first.scalar_type() && t.sizes() == first.sizes(), op, ": layers[", l,
                "] differs from layers[0] in dtype or shape");
    TORCH_CHECK(t.size(0) == 0 || (t[0].is_contiguous() && (t.size(0) == 1 || t.stride(0) == t[0].numel())),
                op, ": layers[", l, "] blocks are not packed and contiguous");
  }
}

// Copies the iovec pairs [lo, hi) with as few syscalls as IOV_MAX allows.
void read_span(pid_t pid, const Span& s, int64_t lo, int64_t hi) {
#ifdef __linux__
  for (int64_t k = lo; k < hi; k += kMaxIov) {
    const int64_t n = std::min(kMaxIov, hi - k);
    size_t want = 0;
    for (int64_t j = k; j < k + n; ++j) want += s.local[j].iov_len;
    const ssize_t got = process_vm_readv(pid, s.local.data() + k, n, s.remote.data() + k, n, 0);
    TORCH_CHECK(got >= 0, "llumigrate::pvm_read_blocks: process_vm_readv from pid ", pid, " failed: ",
                std::strerror(errno), errno == EPERM ? " (needs ptrace rights over the source process)" : "");
    TORCH_CHECK(static_cast<size_t>(got) == want, "llumigrate::pvm_read_blocks: read ", got, " of ", want,
                " bytes from pid ", pid, " (a remote address is not mapped)");
  }
#else
  TORCH_CHECK(false, "llumigrate::pvm_read_blocks needs Linux");
#endif
}

void pvm_read_blocks(int64_t pid, c10::IntArrayRef remote_bases, const at::Tensor& remote_ids,
                     const at::Tensor& local_ids, at::TensorList layers, int64_t num_threads) {
  check_pvm_args(pid, remote_bases, remote_ids, local_ids, layers, num_threads);
  const int64_t num_layers = static_cast<int64_t>(layers.size());
  const int64_t num_blocks = layers[0].size(0);
  const int64_t bb = num_blocks == 0 ? 0 : layers[0][0].numel() * static_cast<int64_t>(layers[0].element_size());
  const at::Tensor rid = remote_ids.contiguous(), lid = local_ids.contiguous();
  const int64_t* r = rid.data_ptr<int64_t>();
  const int64_t* d = lid.data_ptr<int64_t>();
  const int64_t n = rid.numel();
  if (n == 0 || bb == 0) return;
  Span s;
  s.local.resize(n * num_layers);
  s.remote.resize(n * num_layers);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(d[i] >= 0 && d[i] < num_blocks, "llumigrate::pvm_read_blocks: local_ids[", i, "] = ", d[i],
                " is out of range [0, ", num_blocks, ")");
    TORCH_CHECK(r[i] >= 0, "llumigrate::pvm_read_blocks: remote_ids[", i, "] = ", r[i], " is negative");
    for (int64_t l = 0; l < num_layers; ++l) {
      const int64_t k = i * num_layers + l;
      s.local[k] = {static_cast<char*>(layers[l].data_ptr()) + d[i] * bb, static_cast<size_t>(bb)};
      s.remote[k] = {reinterpret_cast<void*>(remote_bases[l] + r[i] * bb), static_cast<size_t>(bb)};
    }
  }
  const int64_t total = n * num_layers;
  const int threads = num_threads == 0 ? at::get_num_threads() : static_cast<int>(num_threads);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, (total + 63) / 64));
  if (parts == 1) {
    read_span(static_cast<pid_t>(pid), s, 0, total);
    return;
  }
  // Errors inside the parallel region are carried out and rethrown here.
  std::vector<std::string> errors(parts);
#pragma omp parallel for num_threads(static_cast<int>(parts)) schedule(static, 1)
  for (int64_t p = 0; p < parts; ++p) {
    try {
      read_span(static_cast<pid_t>(pid), s, total * p / parts, total * (p + 1) / parts);
    } catch (const c10::Error& e) {
      errors[p] = e.what_without_backtrace();
    }
  }
  for (const auto& e : errors) TORCH_CHECK(e.empty(), e);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llumigrate, m) {
  m.def("pvm_read_blocks(int pid, int[] remote_bases, Tensor remote_ids, Tensor local_ids, "
        "Tensor(a!)[] layers, int num_threads) -> ()");
}

TORCH_LIBRARY_IMPL(llumigrate, CPU, m) {
  m.impl("pvm_read_blocks", &pvm_read_blocks);
}

}  // namespace llumigrate
