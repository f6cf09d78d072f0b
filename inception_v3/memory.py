"""glibc's allocator: freed memory handed back once a process is idle, and fewer heaps for TensorFlow;
and a mapped file's pages a process no longer reads, handed back to the page cache.

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

OpenVINO maps its IR's weights file and its compiled model keeps the mapping, but once a
first inference has laid the weights out in its own buffers it reads a few MiB of the file
at most (bf16 on an AMX Xeon, after batches of 1-8: 13 of the fp32 IR's 91 MiB).
``drop_mapped_pages`` unmaps the resident pages of such a file from this process: they
stay in the page cache, and a page read again maps back in. Without Linux's ``/proc`` or
glibc it does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h
MADV_DONTNEED = 4  # madvise's advice number, from Linux's mman-common.h
MAPS = Path("/proc/self/maps")
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


def read_only_mappings(path: Path) -> list[tuple[int, int]]:
    """Start address and length of each read-only mapping of ``path`` in this process."""
    if not MAPS.exists():
        return []
    target = os.path.realpath(path)
    mappings = []
    for line in MAPS.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target and "w" not in fields[1]:
            start, end = (int(address, 16) for address in fields[0].split("-"))
            mappings.append((start, end - start))
    return mappings


def drop_mapped_pages(path: Path) -> None:
    """Unmap the resident pages of this process's read-only mappings of ``path``.

    Read-only: no page of such a mapping differs from the file, so none is lost.
    """
    if not (libc := glibc()):
        return
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for start, length in read_only_mappings(path):
        libc.madvise(start, length, MADV_DONTNEED)


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
