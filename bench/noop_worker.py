"""``python -m bench.noop_worker``: a real ``sam3-batch`` Celery worker whose model is the no-op stand-in.

Everything else is the product's: settings from the environment, ``worker.tasks``, storage, job state.
"""

from __future__ import annotations

import argparse

from bench.noop_runtime import NoopRuntime
from sam3_batch.contracts.settings import load_settings
from sam3_batch.worker.process_context import init_worker_context
from sam3_batch.worker_cmd import start_worker


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    # No prefork: thread pools built before a fork do not survive in the children.
    parser.add_argument("--pool", choices=("solo", "threads"), default="solo")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--hostname", default=None)
    parser.add_argument("--loglevel", default="WARNING")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Install the no-op runtime as this process's worker context, then run the product's worker."""
    args = _arguments(argv)
    settings = load_settings()
    init_worker_context(settings, runtime=NoopRuntime())  # start_worker then finds the context already built
    start_worker(settings, pool=args.pool, concurrency=args.concurrency, loglevel=args.loglevel,
                 hostname=args.hostname)


if __name__ == "__main__":
    main()
