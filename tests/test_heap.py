"""utils.heap.retained_heap: inside the block a freed large tensor's pages are reused, so allocating it again does
not fault them in afresh.

The fault counts are taken in a fresh interpreter. In the middle of the suite the process's heap state (what
earlier tests mapped above it) decides whether glibc can grow the heap at all: there the block saw every page
fault, and outside it 0 were seen, so neither side says anything about `retained_heap` itself.

Inside the block the first two or three allocations may each fault a fresh block in: torch asks for its storage
with posix_memalign, whose request is a few bytes larger than the chunk the previous iteration freed, so while a
small allocation sits between that chunk and the heap's top the next one comes from the top. Within three
iterations the freed chunks coalesce (measured on 40 fresh interpreters: the last faulting allocation was the
1st in 17, the 2nd in 9, the 3rd in 14, never later), so the steady state is measured after three."""
import os
import subprocess
import sys
import textwrap

import pytest

from robustsparse.utils.heap import _libc, retained_heap

_PROBE = textwrap.dedent("""
    import resource, torch
    from robustsparse.utils.heap import retained_heap

    def faults(mb=64):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.empty(mb * 2 ** 18, dtype=torch.float32)
        t.fill_(1.0)
        del t
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults(); outside = faults()
    with retained_heap() as active:
        for _ in range(3):  # the heap sizes itself (module docstring)
            faults()
        inside = sum(faults() for _ in range(4))
    faults(); after = faults()
    print(active, outside, inside, after)
""")


def _transparent_huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(sys.platform != "linux" or _libc() is None, reason="needs glibc's mallopt")
def test_retained_heap_reuses_freed_pages_in_a_fresh_process():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True).stdout.split()
    active, outside, inside, after = out[0] == "True", *map(int, out[1:])
    pages = 64 * 2 ** 20 // 4096
    assert active
    assert inside < pages // 20, (outside, inside, after)  # over 4 steady-state allocations
    if not _transparent_huge_pages_always():  # with 2 MB pages a fresh mmap faults only 32 times
        assert outside > pages // 2, (outside, inside, after)  # the default: a fresh mmap per large block
        assert after > pages // 2, (outside, inside, after)  # and the default again after the block


def test_retained_heap_is_a_no_op_without_mallopt(monkeypatch):
    monkeypatch.setattr("robustsparse.utils.heap._libc", lambda: None)
    with retained_heap() as active:
        assert active is False
