"""glibc's allocator: freed memory handed back once a process is idle, and fewer heaps for TensorFlow.

glibc keeps what a process freed in its heaps, for reuse. After a load (concurrency
8 on both doors, then batches of 16), 3 s later, with and without a trim (one run
each, 2-core Xeon): runner worker 394-420 against 429 MiB, HTTP API worker 124-132
against 149, gRPC API worker 103 against 117. ``trimmed_when_idle`` calls
``malloc_trim`` (0.3 ms) once a process has answered everything it held for
``TRIM_AFTER_IDLE_S``: never in the middle of a burst, where the memory is about to
be used again. A full ``gc.collect()`` before it (50 ms on the event loop) made no
difference that one run could show, and is not done.

For TensorFlow: glibc gives busy threads heaps ("arenas") of their own, up to 8 per core, and each
keeps what its thread freed; TensorFlow's thread pools spread tensors over them.
Capping them at two took about 90 MiB off the serving runner (after a load at batch
sizes 1-16), with no consistent difference in speed, and compiling with XLA leaves
60-85 MiB free in them. Not glibc (macOS, musl): these do nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
from collections.abc import Iterator

M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h
MALLOC_ARENAS = 2
TRIM_AFTER_IDLE_S = 1.0


def glibc() -> ctypes.CDLL | None:
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "malloc_trim") else None


def limit_malloc_arenas() -> None:
    """Cap the arenas of threads started from now on (before TensorFlow starts its pools)."""
    if libc := glibc():
        libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)


def release_freed_memory() -> None:
    """Hand memory that is free in the arenas back to the system."""
    if libc := glibc():
        libc.malloc_trim(0)


class TrimWhenIdle:
    """Counts the requests a process is serving; ``TRIM_AFTER_IDLE_S`` after the last one, trims.

    One per process, used from its event loop only (each BentoML server has one).
    """

    def __init__(self, idle_s: float = TRIM_AFTER_IDLE_S) -> None:
        self.idle_s = idle_s
        self.serving = 0
        self.trim: asyncio.TimerHandle | None = None

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        self.serving += 1
        if self.trim is not None:
            self.trim.cancel()
            self.trim = None
        try:
            yield
        finally:
            self.serving -= 1
            if not self.serving:
                self.trim = asyncio.get_running_loop().call_later(self.idle_s, release_freed_memory)


IDLE_TRIM = TrimWhenIdle()  # the process's
trimmed_when_idle = IDLE_TRIM.request
