"""Engine-core utilities over the cluster's instances (mixed into `Cluster`):
one instance's answer, or every live instance's. LoRA adapters loaded
through here are remembered and loaded on every instance that joins later,
before it takes a request."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from llumigrate.controller.instance import Instance
from llumigrate.engine.vllm_api import decode_any, encode
from llumigrate.errors import InstanceLost

logger = logging.getLogger(__name__)


class EngineUtilities:
    instances: dict[str, Instance]
    # LoRA adapters loaded on the cluster (vLLM's LoRARequest), by adapter id.
    loras: dict[int, Any]

    def _live(self) -> list[Instance]:
        live = [i for i in self.instances.values() if i.up]
        if not live:
            raise InstanceLost("no live instance")
        return live

    async def utility_one(self, method: str, *args: Any) -> Any:
        """`method`'s result on one live instance (all run the same model)."""
        return await call_utility(self._live()[0], method, *args)

    async def utility_all(self, method: str, *args: Any) -> list[Any]:
        """`method`'s result on every live instance."""
        return list(await asyncio.gather(*(call_utility(i, method, *args) for i in self._live())))

    async def add_lora(self, lora_request: Any) -> bool:
        ok = all(await self.utility_all("add_lora", lora_request))
        if ok:
            self.loras[int(lora_request.lora_int_id)] = lora_request
        return ok

    async def remove_lora(self, lora_id: int) -> bool:
        self.loras.pop(int(lora_id), None)
        return all(await self.utility_all("remove_lora", lora_id))

    async def _load_loras(self, inst: Instance) -> None:
        """Load the cluster's adapters on `inst`, which is joining."""
        for lora in list(self.loras.values()):
            if not await call_utility(inst, "add_lora", lora):
                raise InstanceLost(f"instance {inst.instance_id} could not load LoRA adapter "
                                   f"{lora.lora_name!r}")


async def call_utility(inst: Instance, method: str, *args: Any) -> Any:
    return decode_any(await inst.call("utility", name=method, args=encode(args)))
