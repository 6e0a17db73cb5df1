"""utils.heap.retained_heap. A page-fault test was removed: mid-suite it saw 16,384 faults inside the block (0 when run
alone), so it measured the suite's heap state, not the block. The speed effect is measured by
scripts/time_faithful_search.py instead."""
import resource
import sys

import pytest
import torch

from robustsparse.utils.heap import _libc, retained_heap

glibc = pytest.mark.skipif(sys.platform != "linux" or _libc() is None, reason="needs glibc's mallopt")


def _faults_of_touching(mb: int) -> int:
    """Minor page faults of allocating and filling an ``mb`` MB tensor (freed again on return)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(mb * 2 ** 18, dtype=torch.float32)
    t.fill_(1.0)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_retained_heap_is_a_no_op_without_mallopt(monkeypatch):
    monkeypatch.setattr("robustsparse.utils.heap._libc", lambda: None)
    with retained_heap() as active:
        assert active is False
