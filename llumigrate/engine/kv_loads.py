"""`LoadRunner`: runs the KV loads the scheduler half plans, on the worker.

A load pulls a range of a source request's blocks straight into the blocks
vLLM allocated here. Small final tails run synchronously inside the step that
computes the request's first token (`run_sync`, before the forward); the rest
run on a background thread while the engine keeps stepping (paced pre-copy
loads on a thread of their own). The engine
thread collects the outcomes once per step (`take_finished`); a failed
synchronous load marks its blocks, which vLLM turns into a failed request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from llumigrate.engine.meta import LoadJob
from llumigrate.errors import TransferError
from llumigrate.transfer import KVClient, PullRequest

logger = logging.getLogger(__name__)


class LoadRunner:
    """`on_finished` (optional) is called on the load thread after each
    background load ends, ok or not."""

    def __init__(self, timeout_s: float, on_finished: Callable[[], None] | None = None) -> None:
        self.client: KVClient | None = None     # set once the KV caches are registered
        self.timeout_s = timeout_s
        self._on_finished = on_finished
        self._in_flight = 0                     # background loads submitted, not ended
        self._lock = threading.Lock()
        self._sync: list[LoadJob] = []
        self._error_blocks: set[int] = set()
        self._done: set[str] = set()
        self._failed: set[str] = set()
        # NOTE: paced pre-copy loads get their own thread, so that a long paced
        # pull never holds up a commit's load (never paced) queued behind it.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llumigrate-load")
        self._paced_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llumigrate-load-paced")
        self._stats = {"loads": 0, "loads_failed": 0, "blocks_loaded": 0}

    def submit(self, job: LoadJob) -> None:
        """A job of this step: synchronous ones wait for `run_sync`."""
        if job.sync:
            self._sync.append(job)
        else:
            with self._lock:
                self._in_flight += 1
            (self._paced_pool if job.spec.rate_mib_s else self._pool).submit(self._run, job)

    @property
    def busy(self) -> bool:
        """Whether a background load is running or queued."""
        with self._lock:
            return self._in_flight > 0

    def run_sync(self) -> None:
        """Run this step's synchronous loads before the forward that needs them."""
        jobs, self._sync = self._sync, []
        for job in jobs:
            if not self._load(job):
                self._error_blocks.update(job.dest_block_ids)

    def take_error_blocks(self) -> set[int]:
        errors, self._error_blocks = self._error_blocks, set()
        return errors

    def take_finished(self) -> tuple[set[str], set[str]]:
        """(request ids whose background load finished, those whose load failed) since the last call."""
        with self._lock:
            done, self._done = self._done, set()
            failed, self._failed = self._failed, set()
        return done, failed

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._paced_pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, job: LoadJob) -> None:
        ok = self._load(job)
        with self._lock:
            (self._done if ok else self._failed).add(job.req_id)
            self._in_flight -= 1
        if self._on_finished is not None:
            self._on_finished()

    def _load(self, job: LoadJob) -> bool:
        """Pull one job's blocks into this engine's blocks; False on failure."""
        ok = False
        t0 = time.monotonic()
        try:
            assert self.client is not None, "KV caches not registered yet"
            spec = job.spec
            pull = PullRequest(spec.src_key, job.start_block, len(job.dest_block_ids),
                               final=spec.final, timeout_s=self.timeout_s,
                               max_bytes_per_s=0.0 if job.sync else spec.rate_mib_s * 2**20)
            self.client.pull((spec.host, spec.port), pull, job.dest_block_ids)
            ok = True
        except (TransferError, OSError) as e:
            logger.warning("KV load for %s from %s failed: %s", job.req_id, job.spec.src_key, e)
        except Exception:  # never let a load thread die silently
            logger.exception("KV load for %s crashed", job.req_id)
        with self._lock:
            self._stats["loads"] += 1
            self._stats["last_load"] = {"blocks": len(job.dest_block_ids), "sync": job.sync,
                                        "seconds": round(time.monotonic() - t0, 6), "ok": ok}
            if ok:
                self._stats["blocks_loaded"] += len(job.dest_block_ids)
            else:
                self._stats["loads_failed"] += 1
        return ok
