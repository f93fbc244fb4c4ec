"""CUDA IPC transport: a source worker exports IPC handles of its KV memory
once (one per distinct storage: one for a worker whose KV is one buffer); a
destination on the same host maps them once per peer and copies block ranges
device to device with one kernel per pull, on a side stream, no host bounce.
Mappings are reference-counted per peer and unmapped when the last
connection to that peer closes (the peer left or the client closed)."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llumigrate.errors import TransferError
from llumigrate.kv.ops import BlockIds, block_geometry, copy_blocks
from llumigrate.transfer.gpu_stream import run_on_side_stream

_exports: dict[tuple[int, ...], dict[str, Any]] = {}
_exports_lock = threading.Lock()


def gpu_uuid(device: torch.device) -> str:
    """Stable name of a GPU across processes (indices depend on CUDA_VISIBLE_DEVICES)."""
    return str(torch.cuda.get_device_properties(device).uuid)


def visible_gpus() -> tuple[str, ...]:
    """UUIDs of every GPU this process can address, in index order."""
    return tuple(gpu_uuid(torch.device("cuda", i)) for i in range(torch.cuda.device_count()))


def export_layers(layers: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Plain-data (msgpack) description of `layers`' memory for a peer's
    `IpcPeers.acquire`: the IPC handle of each distinct storage (torch's
    `_share_cuda_` tuple), each layer's storage index and byte offset, the
    block geometry, this pid and the raw addresses (for a pull from this very
    process, which cannot open its own handles). Exported once per layer set:
    the KV must stay allocated while any peer may map it."""
    key = tuple(int(t.data_ptr()) for t in layers)
    with _exports_lock:
        if key not in _exports:
            storages: list[list[Any]] = []
            index: dict[int, int] = {}
            refs = []
            for t in layers:
                st = t.untyped_storage()
                if st.data_ptr() not in index:
                    index[st.data_ptr()] = len(storages)
                    storages.append(list(st._share_cuda_()))
                refs.append([index[st.data_ptr()], t.data_ptr() - st.data_ptr()])
            _exports[key] = {"pid": os.getpid(), "storages": storages, "layers": refs, "addrs": list(key),
                             "geometry": list(block_geometry(layers))}
        return _exports[key]


@dataclass
class IpcMapping:
    """A peer's layers mapped here: block 0 of layer l at `bases[l]`."""

    bases: list[int]
    geometry: tuple[int, int, int]
    storages: list[torch.UntypedStorage]  # hold the mappings open
    users: int = 0


class IpcPeers:
    """Mappings per peer key (the export's pid and handles); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._maps: dict[tuple, IpcMapping] = {}

    def acquire(self, export: dict[str, Any], device: torch.device) -> tuple[tuple, IpcMapping]:
        """(key, mapping) of `export`, mapped into `device`'s context on first
        use. Raises TransferError when the export is malformed or unmappable."""
        key = peer_key(export)
        with self._lock:
            mapping = self._maps.get(key)
            if mapping is None:
                mapping = self._maps[key] = _map(export, device)
            mapping.users += 1
            return key, mapping

    def release(self, key: tuple) -> None:
        """Drop one user; the last one unmaps (closes the IPC handles)."""
        with self._lock:
            mapping = self._maps.get(key)
            if mapping is not None:
                mapping.users -= 1
                if mapping.users <= 0:
                    del self._maps[key]

    def num_mapped(self) -> int:
        with self._lock:
            return len(self._maps)


PEERS = IpcPeers()  # one per process: every KVClient shares the mappings


def peer_key(export: dict[str, Any]) -> tuple:
    try:
        return (int(export["pid"]), *(bytes(s[1]) for s in export["storages"]))
    except (KeyError, TypeError, IndexError, ValueError) as e:
        raise TransferError(f"malformed IPC export: {e}") from None


def ipc_copy(mapping: IpcMapping, src_ids: BlockIds, dst_ids: BlockIds, layers: Sequence[torch.Tensor]) -> None:
    """Copy the peer's blocks `src_ids` into blocks `dst_ids` of `layers`;
    returns once they have landed. Raises RuntimeError from the op."""
    run_on_side_stream(layers[0].device,
                       lambda: copy_blocks(mapping.bases, mapping.geometry, src_ids, dst_ids, layers))


def _map(export: dict[str, Any], device: torch.device) -> IpcMapping:
    try:
        geometry = tuple(int(x) for x in export["geometry"])
        refs = [(int(i), int(off)) for i, off in export["layers"]]
        if int(export["pid"]) == os.getpid():
            return IpcMapping([int(a) for a in export["addrs"]], geometry, [])  # type: ignore[arg-type]
        storages = [_open(s, device) for s in export["storages"]]
        bases = [storages[i].data_ptr() + off for i, off in refs]
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise TransferError(f"malformed IPC export: {e}") from None
    except RuntimeError as e:
        raise TransferError(f"cannot map the source's KV with CUDA IPC: {str(e).splitlines()[0]}") from e
    if len(geometry) != 3:
        raise TransferError(f"malformed IPC export geometry {geometry}")
    return IpcMapping(bases, geometry, storages)  # type: ignore[arg-type]


def _open(share: list[Any], device: torch.device) -> torch.UntypedStorage:
    """Open one storage handle in `device`'s context (peer access enabled
    lazily when the memory lives on another visible GPU)."""
    _, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync = share
    index = torch.device(device).index or 0
    torch.cuda._lazy_init()
    return torch.UntypedStorage._new_shared_cuda(index, bytes(handle), int(size), int(offset), bytes(ref_handle),
                                                 int(ref_offset), event_handle, bool(event_sync))
