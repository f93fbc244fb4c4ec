"""The only package that imports vLLM. Everything vLLM-version-specific lives
in `vllm_compat`; the connector and worker extension use public extension
points (KVConnectorBase_V1, worker_extension_cls)."""
