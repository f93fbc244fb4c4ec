"""Which transport moves KV between one pair of workers: a pure function of
what each end knows about itself (`Endpoint`), so it is tested without GPUs.

CPU KV: the same host -> "local" (the connection then probes pvm, then shm,
as before), else "tcp". CUDA KV: the same host and the source's GPU visible
here -> "ipc"; else "nccl" when both ends have NCCL. Never mixes devices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llumigrate.errors import ConfigError, TransferError
from llumigrate.transfer.api import CPU_TRANSPORTS, GPU_AUTO, GPU_TRANSPORTS, TRANSPORTS

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Endpoint:
    """One worker as its peer sees it. `gpu_uuid`: the GPU holding its KV
    (CUDA only); `visible_gpus`: UUIDs of every GPU this process can address;
    `nccl`: whether it can load NCCL."""

    host_id: str
    pid: int
    device: str = "cpu"
    gpu_uuid: str = ""
    visible_gpus: tuple[str, ...] = field(default_factory=tuple)
    nccl: bool = False

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {DEVICES}, got {self.device!r}")

    def to_wire(self) -> dict[str, Any]:
        return {"host_id": self.host_id, "pid": self.pid, "device": self.device, "gpu_uuid": self.gpu_uuid,
                "visible_gpus": list(self.visible_gpus), "nccl": self.nccl}

    @classmethod
    def from_wire(cls, d: Any) -> Endpoint:
        """Inverse of `to_wire`; raises TransferError on anything malformed."""
        try:
            ok = (isinstance(d["host_id"], str) and isinstance(d["pid"], int) and isinstance(d["gpu_uuid"], str)
                  and isinstance(d["visible_gpus"], list) and all(isinstance(u, str) for u in d["visible_gpus"])
                  and isinstance(d["nccl"], bool))
            if ok:
                return cls(d["host_id"], d["pid"], d["device"], d["gpu_uuid"], tuple(d["visible_gpus"]), d["nccl"])
        except (KeyError, TypeError, ConfigError):
            pass
        raise TransferError(f"malformed endpoint {d!r}")


def hello_transport(requested: str, device: str) -> str:
    """What a client with KV on `device` announces for `requested`; raises
    ConfigError when that device cannot use it."""
    if requested not in TRANSPORTS:
        raise ConfigError(f"transport must be one of {TRANSPORTS}, got {requested!r}")
    if device == "cuda":
        if requested in CPU_TRANSPORTS:
            raise ConfigError(f"CUDA KV moves over {('auto', *GPU_TRANSPORTS)}, not {requested!r}")
        return GPU_AUTO if requested == "auto" else requested
    if requested in GPU_TRANSPORTS:
        raise ConfigError(f"CPU KV moves over {('auto', *CPU_TRANSPORTS)}, not {requested!r}")
    return requested


def choose_transport(requested: str, local: Endpoint, remote: Endpoint) -> str:
    """The transport between `local` (the puller) and `remote` (the source):
    "ipc", "nccl", "local" (probe pvm/shm) or "tcp". `requested` is a
    KVClient transport (or GPU_AUTO). Raises ConfigError when `requested`
    does not suit the device and TransferError when no transport it allows
    works between the two, with the reasons."""
    if requested == GPU_AUTO:
        requested = "auto"
    hello_transport(requested, local.device)
    if local.device != remote.device:
        raise TransferError(f"KV is on {local.device} here but on {remote.device} at the source")
    same_host = local.host_id == remote.host_id
    if local.device == "cpu":
        if requested == "tcp":
            return "tcp"
        if same_host:
            return "local"
        if requested == "auto":
            return "tcp"
        raise TransferError(f"{requested} needs the source on this host")
    problems = []
    if requested in ("auto", "ipc"):
        reason = _ipc_problem(local, remote, same_host)
        if reason is None:
            return "ipc"
        problems.append(f"ipc: {reason}")
    if requested in ("auto", "nccl"):
        if local.nccl and remote.nccl:
            return "nccl"
        problems.append(f"nccl: not loadable {'here' if not local.nccl else 'at the source'}")
    raise TransferError(f"no usable {requested} transport to pid {remote.pid}: {'; '.join(problems)}")


def _ipc_problem(local: Endpoint, remote: Endpoint, same_host: bool) -> str | None:
    if not same_host:
        return "the source is on another host"
    if not remote.gpu_uuid or remote.gpu_uuid not in local.visible_gpus:
        return f"the source's GPU {remote.gpu_uuid or '?'} is not visible here"
    return None
