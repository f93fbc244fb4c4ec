"""llumigrate: live migration of in-flight requests, with their KV cache,
between stock vLLM V1 instances."""

__version__ = "0.1.0"
