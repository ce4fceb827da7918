"""Progress display for long work: a tqdm bar on a terminal, a plain line every few seconds otherwise.

tqdm redraws its bar with carriage returns; written to a log file that is thousands of frames
(55 kB for one quick demo). When stderr is not a terminal, :class:`PlainProgress` prints one line
``desc: n/total unit (rate, postfix)`` at most every ``interval`` seconds, and one at the end.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator

from tqdm.auto import tqdm

__all__ = ["progress", "PlainProgress"]

PLAIN_INTERVAL_S = 10.0  # seconds between plain progress lines


class PlainProgress:
    """The subset of tqdm's interface qvlm uses (iterate, ``update``, ``set_postfix``, ``close``),
    printed as plain lines to ``file`` at most every ``interval`` seconds."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        interval: float = PLAIN_INTERVAL_S,
        file=None,
    ):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.interval, self.file = interval, file
        self.postfix = ""
        self._start = self._last = time.monotonic()
        self._start_n = initial
        self._closed = False

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.iterable or ():
                yield item
                self.update(1)
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._print()

    def set_postfix(self, values: dict | None = None, **kwargs) -> None:
        items = {**(values or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def _print(self) -> None:
        elapsed = time.monotonic() - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        extra = f", {self.postfix}" if self.postfix else ""
        print(
            f"{self.desc}: {count} {self.unit} ({elapsed:.0f} s, {rate:.2f} {self.unit}/s{extra})",
            file=self.file or sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._print()


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    enabled: bool = True,
    leave: bool = True,
):
    """A progress display over ``iterable`` (or a manual one with ``total``): tqdm on a terminal,
    :class:`PlainProgress` lines when stderr is redirected, nothing when ``enabled`` is False or in a
    process other than rank 0 of a multi-process run (``RANK`` set by the launcher)."""
    if not enabled or int(os.environ.get("RANK", "0") or 0) != 0:
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, initial=initial)
