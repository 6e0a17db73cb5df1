"""Keep freed memory in the process while a loop allocates the same large tensors every iteration.

glibc's malloc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and hands it
back with ``munmap`` when freed, so a loop that builds a 400 MB Jacobian each iteration pays one page fault per 4
KiB page, every iteration, in kernel time. The faithful NTT/AWT search on ``smallcnn`` spent 40-60% of its CPU time
there (measured: ~2.5 million minor faults and 10-14 s of system time per iteration on a 2-core EPYC; 40% system
time on a 2-core Xeon). Inside `retained_heap` large blocks come from the heap instead and freed ones stay there
for reuse: zero faults once the first two or three iterations have sized the heap. On exit the defaults come back
and the unused top of the heap is returned to the system (``malloc_trim``). The memory held can reach about twice one
iteration's large blocks while the heap sizes itself (torch's posix_memalign asks for a little more than the chunk
the last iteration freed, so two chunks leapfrog until they coalesce); it is held until the block ends.

No-op (with no error) where the C library has no ``mallopt``: musl, macOS, Windows.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from typing import Iterator

# glibc's mallopt parameter numbers (malloc.h) and the defaults restored on exit
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_KEEP_ALL = 2 ** 31 - 1  # trim threshold (bytes, an int): never give the heap's top back inside the block


def _libc():
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        lib.mallopt, lib.malloc_trim  # noqa: B018 - both must exist (glibc)
    except (OSError, AttributeError):
        return None
    return lib


@contextlib.contextmanager
def retained_heap() -> Iterator[bool]:
    """Within the block, large allocations reuse freed heap memory instead of new mmaps; yields whether that
    could be arranged (False: this C library has no mallopt, nothing changed)."""
    lib = _libc()
    if lib is None or not (lib.mallopt(_M_MMAP_MAX, 0) and lib.mallopt(_M_TRIM_THRESHOLD, _KEEP_ALL)):
        yield False
        return
    try:
        yield True
    finally:
        lib.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        lib.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        lib.malloc_trim(0)
