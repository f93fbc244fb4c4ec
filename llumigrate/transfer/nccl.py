"""NCCL transport: a private two-rank communicator per connection (rank 0 the
source, rank 1 the puller), created lazily from a unique id sent over the
control channel, so no process group is built or rebuilt when instances come
and go. libnccl is loaded with ctypes on first use (no vLLM, no
torch.distributed); without it, `load()` raises NcclError naming what it tried.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading

import torch

from llumigrate.errors import TransferError

UNIQUE_ID_BYTES = 128
_NCCL_UINT8 = 1  # ncclUint8
ENV_LIB = "LLUMIGRATE_NCCL_LIB"  # path of libnccl.so to load instead of searching


class NcclError(TransferError):
    """NCCL is missing or one of its calls failed."""


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * UNIQUE_ID_BYTES)]


class _Lib:
    """The few libnccl entry points llumigrate uses."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        p, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        self._sig(lib.ncclGetErrorString, [i], ctypes.c_char_p)
        self._sig(lib.ncclGetVersion, [ctypes.POINTER(i)])
        self._sig(lib.ncclGetUniqueId, [ctypes.POINTER(_UniqueId)])
        self._sig(lib.ncclCommInitRank, [ctypes.POINTER(p), i, _UniqueId, i])
        self._sig(lib.ncclSend, [p, sz, i, i, p, p])
        self._sig(lib.ncclRecv, [p, sz, i, i, p, p])
        self._sig(lib.ncclCommDestroy, [p])
        self._sig(lib.ncclCommAbort, [p])
        self.lib, self.path = lib, path

    @staticmethod
    def _sig(fn: ctypes._CFuncPtr, argtypes: list, restype: object = ctypes.c_int) -> None:
        fn.argtypes, fn.restype = argtypes, restype

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise NcclError(f"{what} failed: {self.lib.ncclGetErrorString(rc).decode()} (ncclResult {rc})")

    def version(self) -> int:
        v = ctypes.c_int()
        self.check(self.lib.ncclGetVersion(ctypes.byref(v)), "ncclGetVersion")
        return v.value


_lib: _Lib | None = None
_lib_error: str | None = None
_lib_lock = threading.Lock()


def candidates() -> list[str]:
    """Where libnccl is looked for: $LLUMIGRATE_NCCL_LIB, the nvidia-nccl
    wheel that CUDA torch depends on, torch's own lib dir, then the loader."""
    if os.environ.get(ENV_LIB):
        return [os.environ[ENV_LIB]]
    found = []
    for root in sys.path:
        found += sorted(glob.glob(os.path.join(root, "nvidia", "nccl", "lib", "libnccl.so*")))
    found += sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libnccl*.so*")))
    return [*found, "libnccl.so.2", "libnccl.so"]


def load() -> _Lib:
    """libnccl, loaded once; raises NcclError when none can be loaded."""
    global _lib, _lib_error
    with _lib_lock:
        if _lib is None and _lib_error is None:
            tried = []
            for path in candidates():
                try:
                    _lib = _Lib(path)
                    break
                except (OSError, AttributeError) as e:
                    tried.append(f"{path}: {e}")
            else:
                _lib_error = "cannot load libnccl (" + "; ".join(tried) + f"); set {ENV_LIB}"
        if _lib is None:
            raise NcclError(_lib_error or "cannot load libnccl")
        return _lib


def available() -> bool:
    """True when NCCL loads and CUDA is usable."""
    try:
        load()
    except NcclError:
        return False
    return torch.cuda.is_available()


def unique_id() -> bytes:
    """A fresh communicator id (opaque bytes for the control channel)."""
    lib = load()
    uid = _UniqueId()
    lib.check(lib.lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
    return bytes(uid.internal)


class PairComm:
    """Rank `rank` (0 or 1) of a two-rank communicator on `device`.

    Construction blocks until the other rank joins, at most `timeout_s`
    (NcclError then; the abandoned init ends when NCCL gives up). `send` and
    `recv` enqueue on the current stream of `device` and return at once. Not
    thread-safe: the connection owning it issues one operation at a time, in
    the same order as its peer. `close()` is idempotent.
    """

    def __init__(self, uid: bytes, rank: int, device: torch.device, timeout_s: float = 60.0) -> None:
        if len(uid) != UNIQUE_ID_BYTES or rank not in (0, 1):
            raise NcclError(f"bad communicator id ({len(uid)} bytes) or rank {rank}")
        self.lib, self.rank, self.device = load(), rank, torch.device(device)
        self._comm = ctypes.c_void_p()
        box: list[BaseException | None] = [None]

        def init() -> None:
            try:
                with torch.cuda.device(self.device):
                    ident = _UniqueId()
                    ctypes.memmove(ident.internal, uid, UNIQUE_ID_BYTES)
                    self.lib.check(self.lib.lib.ncclCommInitRank(ctypes.byref(self._comm), 2, ident, rank),
                                   "ncclCommInitRank")
            except BaseException as e:  # reported to the constructing thread
                box[0] = e

        thread = threading.Thread(target=init, daemon=True, name="llumigrate-nccl-init")
        thread.start()
        thread.join(timeout_s)
        if thread.is_alive():
            raise NcclError(f"NCCL peer did not join within {timeout_s:.0f}s")
        if box[0] is not None:
            raise box[0]

    def send(self, buf: torch.Tensor) -> None:
        self._op(self.lib.lib.ncclSend, buf, "ncclSend")

    def recv(self, buf: torch.Tensor) -> None:
        self._op(self.lib.lib.ncclRecv, buf, "ncclRecv")

    def _op(self, fn: ctypes._CFuncPtr, buf: torch.Tensor, what: str) -> None:
        if not self._comm:
            raise NcclError(f"{what} on a closed communicator")
        if buf.device != self.device or not buf.is_contiguous():
            raise NcclError(f"{what}: buffer must be contiguous on {self.device}, got {buf.device}")
        stream = torch.cuda.current_stream(self.device).cuda_stream
        self.lib.check(fn(buf.data_ptr(), buf.numel() * buf.element_size(), _NCCL_UINT8, 1 - self.rank,
                          self._comm, stream), what)

    def close(self, abort: bool = False) -> None:
        """Destroy (or, after a failure, abort) the communicator."""
        comm, self._comm = self._comm, ctypes.c_void_p()
        if comm:
            (self.lib.lib.ncclCommAbort if abort else self.lib.lib.ncclCommDestroy)(comm)
