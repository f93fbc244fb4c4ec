"""`KVClient`: pulls blocks of a source request straight into local blocks.

Keeps a pool of idle connections per server address (opened lazily, reused
across pulls, dropped after any I/O error), so concurrent pulls to one
server use separate connections and consecutive pulls skip the handshake.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from llumigrate.errors import ConfigError, TransferError, TransferRefused
from llumigrate.kv.layout import KVLayout
from llumigrate.kv.ops import as_block_ids, scatter_blocks
from llumigrate.transfer.api import TRANSPORTS, PullRequest
from llumigrate.transfer.connection import ClientConnection, InjectedFault
from llumigrate.transfer.gpu_connection import GpuConnection
from llumigrate.transfer.select import hello_transport

Address = tuple[str, int]
Connection = ClientConnection | GpuConnection


class KVClient:
    """Pulls into `layers` ([num_blocks, *block_shape] each, CPU or CUDA).

    transport: one of TRANSPORTS (see `api`). CPU layers: "auto" probes pvm,
    then shm, on a same-host server and falls back to tcp. CUDA layers
    (`GpuConnection`): "auto" picks ipc for a same-host server whose GPU is
    visible here, else nccl (`select.choose_transport`). Naming one fails the
    pull when it is unusable; naming another device's one is a ConfigError.
    Thread-safe. `close()` drops idle connections at once and busy ones when
    their pull returns; idempotent.
    """

    def __init__(self, layers: list[torch.Tensor], *, token: str | None = None, transport: str = "auto",
                 num_threads: int = 1, io_timeout_s: float = 10.0) -> None:
        if transport not in TRANSPORTS:
            raise ConfigError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        if num_threads < 0 or not io_timeout_s > 0:
            raise ConfigError("num_threads must be >= 0 and io_timeout_s > 0")
        self.layers = list(layers)
        try:
            self.layout = KVLayout.from_layers(self.layers)
            scatter_blocks(torch.empty(0, dtype=torch.uint8), [], self.layers)  # runs the op's layout checks
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"KV layers unusable for transfer: {e}") from e
        self.num_blocks = int(self.layers[0].shape[0])
        self.device = "cuda" if self.layers[0].is_cuda else "cpu"
        hello_transport(transport, self.device)  # ConfigError for another device's transport
        self.token, self.transport = token, transport
        self.num_threads, self.io_timeout_s = num_threads, io_timeout_s
        self._idle: dict[Address, list[Connection]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._fault: InjectedFault | None = None
        self.faults_fired = 0

    def pull(self, address: tuple[str, int], req: PullRequest, dest_block_ids: Sequence[int]) -> bytes:
        """Copy blocks [start_block, start_block + num_blocks) of source request
        `req.key` into this client's blocks `dest_block_ids` (in order) and
        return the grant's payload.

        Raises ValueError for bad destination ids, TransferRefused when the
        source refuses (the reason comes from its provider or handshake) and
        TransferError for anything else (unreachable, timeout, peer died,
        provider error). After a failure the destination blocks hold
        unspecified bytes.
        """
        addr: Address = (str(address[0]), int(address[1]))
        dest = self._check_dest(req, dest_block_ids)
        conn = self._take(addr)
        fault = self._take_fault() if isinstance(conn, ClientConnection) else None
        try:
            return conn.pull(req, dest, fault) if fault is not None else conn.pull(req, dest)
        except TransferRefused:
            raise
        except TransferError as e:
            raise TransferError(f"pull of {req.key!r} from {addr[0]}:{addr[1]} failed: {e}") from e
        finally:
            self._give_back(addr, conn)

    def arm_fault(self, fault: InjectedFault | None) -> bool:
        """Make the next pull fail as `fault` says (None disarms). Returns True
        when a previously armed fault had not fired yet. Stress testing only:
        reachable through the agent's `inject_fault` verb and nothing else."""
        with self._lock:
            pending, self._fault = self._fault is not None, fault
        return pending

    def _take_fault(self) -> InjectedFault | None:
        with self._lock:
            fault, self._fault = self._fault, None
            if fault is not None:
                self.faults_fired += 1
        return fault

    def transport_to(self, address: tuple[str, int]) -> str | None:
        """Transport of an idle connection to `address`, None when there is none."""
        with self._lock:
            conns = self._idle.get((str(address[0]), int(address[1])))
            return conns[-1].transport if conns else None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = [c for cs in self._idle.values() for c in cs]
            self._idle.clear()
        for conn in conns:
            conn.close()

    def _check_dest(self, req: PullRequest, dest_block_ids: Sequence[int]) -> torch.Tensor:
        ids = dest_block_ids.tolist() if isinstance(dest_block_ids, torch.Tensor) else list(dest_block_ids)
        if len(ids) != req.num_blocks:
            raise ValueError(f"{len(ids)} destination blocks for a pull of {req.num_blocks}")
        if ids and (min(ids) < 0 or max(ids) >= self.num_blocks):
            raise ValueError(f"destination block ids must be in [0, {self.num_blocks})")
        return as_block_ids(ids)

    def _take(self, addr: Address) -> Connection:
        while True:
            with self._lock:
                if self._closed:
                    raise TransferError("KVClient is closed")
                conns = self._idle.get(addr)
                conn = conns.pop() if conns else None
            if conn is None and self.device == "cuda":
                return GpuConnection.open(addr, self.token, self.transport, self.layers, self.layout,
                                          self.io_timeout_s)
            if conn is None:
                return ClientConnection.open(addr, self.token, self.transport, self.layers, self.layout,
                                             self.num_threads, self.io_timeout_s)
            if not conn.chan.is_stale():
                return conn
            conn.healthy = False  # the server went away while it idled
            conn.close()

    def _give_back(self, addr: Address, conn: Connection) -> None:
        if conn.healthy:
            with self._lock:
                if not self._closed:
                    self._idle.setdefault(addr, []).append(conn)
                    return
        conn.close()
