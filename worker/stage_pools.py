"""Where the steps beside the model run: a pool of workers per stage, processes (the default) or threads.

A pool knows nothing of what its steps do. It is built with a picklable ``setup`` that makes the
resources its steps use (once in each process, or once for all threads), and ``start(fn, *args)`` runs
``fn(resources, *args)`` on one of its workers. Arguments and results cross to processes by pickling,
big numpy arrays in shared memory (``worker.shared_arrays``).

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
import select
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.queues import SimpleQueue
from typing import Any, Concatenate, Generic, Literal, ParamSpec, TypeVar, cast

from sam3_batch.processes import pid_alive
from sam3_batch.worker import shared_arrays

log = logging.getLogger(__name__)

IoMode = Literal["processes", "threads"]
C = TypeVar("C")  # what a pool's setup makes: the first argument of every step it runs
P = ParamSpec("P")
R = TypeVar("R")
StageSetup = Callable[[bool], C]  # setup(own_process) -> the steps' resources; picklable for processes

# Stage processes yield the CPU to the model's process when both want it: the thread that feeds the GPU
# must never wait for a core, while loaders and writers have a chunk of slack (bench/RESULTS.md).
STAGE_NICENESS = 10
ISOLATED_ATTEMPTS = 2  # an image whose process dies this many times running it alone is the one at fault

_process_resources: Any = None  # in a stage process: what its pool's setup made


class StageProcessDied(Exception):
    """The process handling an image died (killed, out of memory, or crashed in native code)."""


class StagePool(Generic[C]):
    """The workers of one stage. ``start(fn, *args)`` runs ``fn(resources, *args)`` on one of them."""

    def __init__(
        self, name: str, setup: StageSetup[C], *, mode: IoMode, workers: int, preload: Sequence[str] = ()
    ) -> None:
        """``preload``: modules the forkserver imports once, so that each stage process starts warm."""
        self.name = name
        self.mode: IoMode = _usable_mode(name, mode)
        self.workers = workers
        self._setup, self._preload = setup, list(preload)
        self._thread_resources = setup(False) if self.mode == "threads" else None
        self._lock = threading.Lock()
        self._pids: set[int] = set()
        self._pid_reports: SimpleQueue[int] | None = None
        self._executor = self._new_executor()

    def start(self, fn: Callable[Concatenate[C, P], R], *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """Run ``fn`` on a worker; its future raises BrokenProcessPool if a stage process dies."""
        with self._lock:
            if self.mode == "threads":
                return self._executor.submit(fn, cast(C, self._thread_resources), *args, **kwargs)
            try:
                return self._executor.submit(_call_in_process, fn, args, kwargs)
            except BrokenProcessPool:  # a process died since the last call (in flight, or idle between chunks)
                self._replace_executor()
                return self._executor.submit(_call_in_process, fn, args, kwargs)

    def run_isolated(self, fn: Callable[Concatenate[C, P], R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``fn`` on its own; raises StageProcessDied if its process dies every time it is tried."""
        for _attempt in range(ISOLATED_ATTEMPTS):
            try:
                return self.start(fn, *args, **kwargs).result()
            except BrokenProcessPool:
                continue
        raise StageProcessDied(
            f"the {self.name} process died {ISOLATED_ATTEMPTS} times while handling this image alone "
            "(killed, out of memory, or crashed in an image library)"
        )

    def worker_pids(self) -> list[int]:
        """The pids of the stage's current processes started so far (none in threads mode)."""
        with self._lock:
            while self._pid_reports is not None and not self._pid_reports.empty():
                self._pids.add(self._pid_reports.get())
            return sorted(self._pids)

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
        shared_arrays.install()
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__, *self._preload])
        # Each process reports its pid once started: the executor keeps its own list private.
        self._pids, self._pid_reports = set(), context.SimpleQueue()
        return ProcessPoolExecutor(
            self.workers, mp_context=context, initializer=_init_process,
            initargs=(self._setup, os.getpid(), self._pid_reports, dict(os.environ)),
        )


def _usable_mode(name: str, wanted: IoMode) -> IoMode:
    """``processes``, unless this process may not have children (a Celery prefork pool's task process)."""
    if wanted == "processes" and multiprocessing.current_process().daemon:
        log.warning("this worker process is daemonic (prefork pool) and cannot start stage processes: the %s "
                    "stage runs as threads; use --pool solo or threads to have it in processes", name)
        return "threads"
    return wanted


def _call_in_process(fn: Callable[..., R], args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
    if _process_resources is None:
        raise RuntimeError("stage process was not initialised")
    return fn(_process_resources, *args, **kwargs)


def _init_process(
    setup: StageSetup[Any], worker_pid: int, pid_reports: SimpleQueue[int], environment: dict[str, str]
) -> None:
    """Once in each stage process: quiet signals, a watch on the worker, a lower priority, the steps' resources."""
    global _process_resources
    # The worker's environment as it is now (credentials, endpoints), not the forkserver's from when it started.
    os.environ.clear()
    os.environ.update(environment)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(worker_pid,), name="sam3-watch-worker", daemon=True).start()
    os.nice(STAGE_NICENESS)
    shared_arrays.install()
    _process_resources = setup(True)
    pid_reports.put(os.getpid())


def _exit_with(worker_pid: int) -> None:
    """Exit when the worker process ends. Our parent is the forkserver, which outlives a killed worker
    as long as we run, and our task queue never reaches EOF (we hold both of its ends): nothing else ends us."""
    try:
        handle = os.pidfd_open(worker_pid)
    except ProcessLookupError:
        os._exit(0)
    except (AttributeError, OSError):  # no pidfd (not Linux, or an old kernel): poll instead
        while pid_alive(worker_pid):
            time.sleep(1.0)
        os._exit(0)
    select.select([handle], [], [])  # readable once the process has exited
    os._exit(0)


    return True
