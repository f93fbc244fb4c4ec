"""Keeping the garbage collector off the serving path.

The serving processes (`llumigrate serve`, each agent) import vLLM, torch
and transformers: ~400k objects that live as long as the process. A full
collection scans them all, 0.15 s on an idle core and several times that on
a busy one, and Python starts one every time enough younger objects survived
(per-token messages and stream state do). Each such pause stalls every
stream the process carries. Freezing the heap once startup is done moves
those objects out of the collector's sight, as vLLM's own API server does
(`vllm.utils.gc_utils.freeze_gc_heap`); what is allocated later is
collected as usual.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect once, then exempt every object alive now from later
    collections. Returns how many objects were frozen."""
    gc.collect()  # every generation: what is garbage now is not frozen
    gc.freeze()
    return gc.get_freeze_count()
