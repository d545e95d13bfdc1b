"""The process-wide thread pool the video decoders share, and running a batch of tasks on it."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(
                max_workers=os.cpu_count() or 1, thread_name_prefix="plm-video"
            )
        return _POOL


def run_parallel(tasks: list[Callable[[], None]]) -> None:
    """Runs the tasks on the calling thread plus up to torch.get_num_threads() - 1 pool threads.

    Returns (or raises the first error) only when every task has finished.
    """
    extra = min(torch.get_num_threads(), len(tasks), os.cpu_count() or 1) - 1
    if extra <= 0:
        for task in tasks:
            task()
        return
    pending = iter(tasks)
    lock = threading.Lock()

    def drain() -> None:
        while True:
            with lock:
                task = next(pending, None)
            if task is None:
                return
            task()

    futures = [_pool().submit(drain) for _ in range(extra)]
    error: BaseException | None = None
    try:
        drain()
    except BaseException as e:  # re-raised once every pool thread is done with the shared output
        error = e
    for f in futures:
        try:
            f.result()
        except BaseException as e:
            error = error or e
    if error is not None:
        raise error
