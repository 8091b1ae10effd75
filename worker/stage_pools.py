"""Where the I/O stages run: a pool of workers per stage, processes (the default) or threads.

Processes, because the model runs in the worker's main process and everything else a worker does per
image (HTTP, JPEG decoding, resizing, RLE, JSON) would otherwise hold that process's GIL in between the
model's operations: measured in bench/RESULTS.md ("The model thread and the GIL").

Stage processes are forked from a forkserver (a clean, single-threaded process; never from the worker,
which holds CUDA and threads). Each one ignores SIGINT and SIGTERM (the worker's warm shutdown finishes
the chunk in hand, with them) and exits as soon as the worker process is gone, even after a SIGKILL.
If one dies anyway (out of memory, a crash in a decoder), ``run_isolated`` lets the caller retry the
images that were in flight one at a time in a fresh pool, so that only the image that kills it fails.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import resource
import select
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Literal, TypeVar

from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.worker.io_stages import Preparer, StageFailure, StageResources

log = logging.getLogger(__name__)

IoMode = Literal["processes", "threads"]
R = TypeVar("R")
StageFunction = Callable[..., R]  # fn(resources, *args): a module-level function of worker.io_stages

# Modules every stage process needs, imported once in the forkserver so that each child starts warm.
_PRELOAD = ["sam3_batch.worker.io_stages", "sam3_batch.worker.runtime"]
# Stage processes yield the CPU to the model's process when both want it: the thread that feeds the GPU
# must never wait for a core, while loaders and writers have a chunk of slack (bench/RESULTS.md).
STAGE_NICENESS = 10
ISOLATED_ATTEMPTS = 2  # an image whose process dies this many times running it alone is the one at fault

_process_resources: StageResources | None = None


class StageProcessDied(Exception):
    """The process handling an image died (killed, out of memory, or crashed in native code)."""


class StagePool:
    """The workers of one stage. ``submit(fn, *args)`` runs ``fn(resources, *args)`` on one of them."""

    def __init__(self, name: str, settings: Settings, preparer: Preparer, storage: Storage) -> None:
        self.name = name
        self.mode: IoMode = _usable_mode(settings.io_mode)
        self.workers = settings.io_workers
        self._settings, self._preparer = settings, preparer
        # Threads share the worker's own resources; each process builds its own from the same settings.
        self._thread_resources = StageResources(settings, storage, preparer)
        self._lock = threading.Lock()
        self._executor = self._new_executor()

    def submit(self, fn: StageFunction[R], *args: Any) -> Future[R]:
        """Run ``fn`` on a worker; its future raises BrokenProcessPool if a stage process dies."""
        with self._lock:
            if self.mode == "threads":
                return self._executor.submit(fn, self._thread_resources, *args)
            try:
                return self._executor.submit(_call_in_process, fn, *args)
            except BrokenProcessPool:  # a process died while the pool was idle (between chunks, say)
                self._replace_executor()
                return self._executor.submit(_call_in_process, fn, *args)

    def run_isolated(self, fn: StageFunction[R], *args: Any) -> R | StageFailure:
        """Run ``fn`` on its own in a healthy pool: a result, or a failure if its process dies every time."""
        for _attempt in range(ISOLATED_ATTEMPTS):
            self.restart_if_broken()
            try:
                return self.submit(fn, *args).result()
            except BrokenProcessPool:
                continue
        return StageFailure.of(StageProcessDied(
            f"the {self.name} process died {ISOLATED_ATTEMPTS} times while handling this image alone "
            "(killed, out of memory, or crashed in an image library)"
        ))

    def restart_if_broken(self) -> None:
        """Replace the processes if one of them died; the futures that were in flight have failed."""
        with self._lock:
            if getattr(self._executor, "_broken", False):
                self._replace_executor()

    def worker_pids(self) -> list[int]:
        """The pids of the stage's processes started so far (none in threads mode)."""
        with self._lock:
            processes = getattr(self._executor, "_processes", None) or {}
        return sorted(processes)

    def close(self) -> None:
        with self._lock:
            self._executor.shutdown(wait=True)

    def _replace_executor(self) -> None:
        log.warning("a %s process died: starting a new pool of %d", self.name, self.workers)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._new_executor()

    def _new_executor(self) -> Executor:
        if self.mode == "threads":
            return ThreadPoolExecutor(self.workers, thread_name_prefix=f"sam3-{self.name}")
        _allow_shared_tensors()
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_PRELOAD)
        return ProcessPoolExecutor(
            self.workers, mp_context=context, initializer=_init_process,
            initargs=(self._settings, self._preparer, os.getpid()),
        )


def _usable_mode(wanted: IoMode) -> IoMode:
    """``processes``, unless this process may not have children (a Celery prefork pool's task process)."""
    if wanted == "processes" and multiprocessing.current_process().daemon:
        log.warning("this worker process is daemonic (prefork pool) and cannot start stage processes: "
                    "loaders and writers run as threads; use --pool solo or threads to have them as processes")
        return "threads"
    return wanted


def _call_in_process(fn: StageFunction[R], *args: Any) -> R:
    if _process_resources is None:
        raise RuntimeError("stage process was not initialised")
    return fn(_process_resources, *args)


def _init_process(settings: Settings, preparer: Preparer, worker_pid: int) -> None:
    """Once in each stage process: its own storage clients, quiet signals, one torch thread."""
    global _process_resources
    import torch
    from PIL import Image

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(worker_pid,), name="sam3-watch-worker", daemon=True).start()
    os.nice(STAGE_NICENESS)
    torch.set_num_threads(1)  # many stage processes: each resize on one core, none competing with the model
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
    _process_resources = StageResources(settings, Storage(settings), preparer)


def _exit_with(worker_pid: int) -> None:
    """Exit when the worker process ends. Our parent is the forkserver, which outlives a killed worker
    as long as we run, and our task queue never reaches EOF (we hold both of its ends): nothing else ends us."""
    try:
        handle = os.pidfd_open(worker_pid)
    except ProcessLookupError:
        os._exit(0)
    except (AttributeError, OSError):  # no pidfd (not Linux, or an old kernel): poll instead
        while _alive(worker_pid):
            time.sleep(1.0)
        os._exit(0)
    select.select([handle], [], [])  # readable once the process has exited
    os._exit(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _allow_shared_tensors() -> None:
    """Tensors cross processes as shared-memory file descriptors: lift the soft open-file limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard and hard != resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
