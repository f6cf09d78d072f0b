"""glibc's allocator settings for the runner process, where TensorFlow allocates.

glibc gives busy threads heaps ("arenas") of their own, up to 8 per core, and each
keeps what its thread freed; TensorFlow's thread pools spread tensors over them.
Capping them at two took about 90 MiB off the serving runner (after a load at batch
sizes 1-16), with no consistent difference in speed, and compiling with XLA leaves
60-85 MiB free in them. Not glibc (macOS, musl): these do nothing.
"""

from __future__ import annotations

import ctypes

M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h
MALLOC_ARENAS = 2


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
