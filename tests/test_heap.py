"""utils.heap.retained_heap: freed large blocks are reused inside the block (no fresh page faults), and the
allocator's defaults come back on exit."""
import resource
import sys

import pytest
import torch

from robustsparse.utils.heap import _libc, retained_heap

glibc = pytest.mark.skipif(sys.platform != "linux" or _libc() is None, reason="needs glibc's mallopt")


def _small_pages() -> bool:
    """Fresh mmaps fault per 4 KiB page unless transparent huge pages are always on."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" not in f.read()
    except OSError:
        return True


def _faults_of_touching(mb: int) -> int:
    """Minor page faults of allocating and filling an ``mb`` MB tensor (freed again on return)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(mb * 2 ** 18, dtype=torch.float32)
    t.fill_(1.0)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@glibc
def test_retained_heap_reuses_freed_pages_and_restores_the_default():
    pages = 64 * 2 ** 20 // 4096
    small_pages = _small_pages()
    _faults_of_touching(64)
    if small_pages:
        assert _faults_of_touching(64) > pages // 2  # by default each large block is a fresh mmap
    with retained_heap() as active:
        assert active
        _faults_of_touching(64)  # the first one grows the heap
        assert _faults_of_touching(64) < pages // 20
    _faults_of_touching(64)
    if small_pages:
        assert _faults_of_touching(64) > pages // 2  # defaults restored: mmap again


def test_retained_heap_is_a_no_op_without_mallopt(monkeypatch):
    monkeypatch.setattr("robustsparse.utils.heap._libc", lambda: None)
    with retained_heap() as active:
        assert active is False
