"""`LlumigrateConnector`: a vLLM V1 KV connector, loaded from outside vLLM via
`kv_connector_module_path`. vLLM builds it twice: SCHEDULER role in the
EngineCore (delegates to `SchedulerSide`) and WORKER role in each worker
(delegates to `WorkerSide`)."""

from __future__ import annotations

from typing import Any

from llumigrate.engine.meta import SchedulerMeta
from llumigrate.engine.scheduler_side import SchedulerSide
from llumigrate.engine.vllm_compat import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    bound_mq_spin,
    check_version,
    engine_facts,
)
from llumigrate.engine.worker_side import WorkerSide

try:  # vLLM >= 0.32 reports failed receives separately
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults
except ImportError:  # pragma: no cover
    KVConnectorTransferResults = None  # type: ignore[assignment,misc]


class LlumigrateConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        check_version()
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        block_size = vllm_config.cache_config.block_size
        extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
        if extra.get("engine_spin_s") is not None:  # this process's queue readers
            bound_mq_spin(float(extra["engine_spin_s"]))
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(block_size, extra,
                                            int(vllm_config.model_config.max_model_len),
                                            engine_facts(vllm_config))
        else:
            self._worker = WorkerSide(block_size, extra)

    # -- scheduler role ------------------------------------------------------
    def on_new_request(self, request: Any) -> None:
        assert self._scheduler is not None
        self._scheduler.on_new_request(request)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def bind_gpu_block_pool(self, gpu_block_pool: Any) -> None:
        assert self._scheduler is not None
        self._scheduler.bind_block_pool(gpu_block_pool)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        assert self._scheduler is not None
        self._scheduler.update_connector_output(connector_output)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict | None]:
        assert self._scheduler is not None
        return self._scheduler.request_finished(request, block_ids)

    # -- worker role ---------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        # NOTE: the runner calls this with the step's metadata before it
        # updates its request states (`_update_states`); `bind_connector_
        # metadata` comes only after it prepared the step's inputs.
        assert self._worker is not None and isinstance(kv_connector_metadata, SchedulerMeta)
        self._worker.before_update(kv_connector_metadata)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        assert self._worker is not None and isinstance(connector_metadata, SchedulerMeta)
        self._worker.bind(connector_metadata)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        # Async loads were queued by bind() and run on a background thread;
        # sync loads (small final tails) feed this step's forward: run them now.
        assert self._worker is not None
        self._worker.run_sync_loads()

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self._worker is not None
        return self._worker.take_load_error_blocks()

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        return None

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self._worker is not None
        sending, recving, _ = self._worker.get_finished(finished_req_ids)
        return sending or None, recving or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> Any:
        assert self._worker is not None
        sending, recving, failed = self._worker.get_finished(finished_req_ids)
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving,
                                          failed_recving=failed)

    def build_connector_worker_meta(self) -> Any:
        assert self._worker is not None
        return self._worker.build_worker_meta()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
