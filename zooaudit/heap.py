"""Returning freed heap memory to the OS between the batches of a long loop.

glibc keeps the pages of freed blocks in its arenas (and, once a large block was freed, raises its
mmap threshold so that later blocks of that size come from the heap too). A loop that allocates and
frees large NumPy/torch temporaries per batch then holds more resident memory the more batches it
runs, although no buffer outlives a batch. :func:`return_freed_heap` asks glibc to give the free
pages back (``malloc_trim(0)``); elsewhere (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes


def _load_libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # glibc only: musl and macOS have no malloc_trim
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def return_freed_heap() -> None:
    """Hand the free pages of the heap back to the OS (glibc ``malloc_trim(0)``; a no-op without glibc).
    Cheap next to a batch of model forwards or a pass over a block of samples: call it once per batch."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
