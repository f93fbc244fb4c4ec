"""The OpenAI frontend's backend in `llumigrate serve`: requests go to the
instance the global scheduler chooses and stream across migrations."""

from __future__ import annotations

from llumigrate.controller.cluster import Cluster
from llumigrate.controller.request import RequestHandle
from llumigrate.errors import ConfigError, RequestNotFound
from llumigrate.frontend.backend import BackendRejected, GenerateBackend
from llumigrate.serve.scheduler import GlobalScheduler


class ClusterGenerateBackend(GenerateBackend):
    def __init__(self, cluster: Cluster, scheduler: GlobalScheduler, *, model_name: str,
                 model_path: str, max_model_len: int) -> None:
        self.cluster, self.scheduler = cluster, scheduler
        self.model_name, self.model_path, self.max_model_len = model_name, model_path, max_model_len

    async def submit(self, prompt_token_ids: list[int], sampling: dict, *, priority: int = 0,
                     request_id: str | None = None) -> RequestHandle:
        instance = self.scheduler.choose(priority)
        try:
            return await self.cluster.submit(prompt_token_ids, sampling, instance=instance,
                                             priority=priority, request_id=request_id)
        except ConfigError as e:
            raise BackendRejected(str(e)) from e

    async def abort(self, request_id: str) -> None:
        try:
            await self.cluster.abort(request_id)
        except RequestNotFound:
            pass

    def healthy(self) -> bool:
        return any(i.up for i in self.cluster.instances.values())
