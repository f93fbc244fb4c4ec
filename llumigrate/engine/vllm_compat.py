"""Every vLLM import of llumigrate, and the only access to vLLM internals.

Public extension points (KVConnectorBase_V1, worker extensions, AsyncLLM) are
re-exported here. The two private accesses llumigrate needs (a worker
request's sampler generator and output count, for exact seeded migration)
are isolated below and checked against the supported version at import.
"""

from __future__ import annotations

from typing import Any

import vllm
from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group
from vllm.distributed.kv_transfer.kv_connector.utils import yield_req_data
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.sampling_params import SamplingType
from vllm.v1.request import RequestStatus

SUPPORTED_VLLM = ("0.32",)

__all__ = [
    "KVConnectorBase_V1", "KVConnectorMetadata", "KVConnectorRole", "KVConnectorWorkerMetadata",
    "get_kv_transfer_group", "has_kv_transfer_group", "yield_req_data", "check_version",
    "is_aborted", "is_seeded", "request_sampler_state",
]


def check_version() -> None:
    """Fail clearly on a vLLM release whose internals we have not checked."""
    major_minor = ".".join(vllm.__version__.split(".")[:2])
    if major_minor not in SUPPORTED_VLLM:
        raise RuntimeError(
            f"llumigrate supports vLLM {', '.join(SUPPORTED_VLLM)}.x; found {vllm.__version__}"
        )


def is_aborted(request: Any) -> bool:
    return request.status == RequestStatus.FINISHED_ABORTED


def is_seeded(request: Any) -> bool:
    """True if the request samples with its own seeded generator (whose state
    a migration must carry)."""
    sp = getattr(request, "sampling_params", None)
    return sp is not None and sp.sampling_type == SamplingType.RANDOM_SEED


def request_sampler_state(model_runner: Any, req_id: str) -> Any | None:
    """The worker's cached state of a request (`generator`, `output_token_ids`),
    or None. PRIVATE: `GPUModelRunner.requests` of the V1 model runner (the CPU
    runner subclasses it). Model Runner V2 keeps this elsewhere."""
    requests = getattr(model_runner, "requests", None)
    if requests is None:
        raise RuntimeError("this vLLM model runner has no `requests` table (Model Runner V2?)")
    return requests.get(req_id)
