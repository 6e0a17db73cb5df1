"""Progress bars for every long loop (tqdm on stderr), switchable off for tests and JSON output."""
from __future__ import annotations

import sys
from contextlib import contextmanager


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass


@contextmanager
def progress_bar(total: int | None = None, desc: str = "", enabled: bool = True, unit: str = "img", **kwargs):
    if not enabled:
        yield _Silent()
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True, **kwargs)
    try:
        yield bar
    finally:
        bar.close()
