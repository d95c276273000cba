"""Progress of long work on a terminal: one line on stderr, redrawn in place
at most a few times a second, with the rate; nothing at all when stderr is
not a terminal (logs and scripts get the command's result line only)."""

import sys
import threading
import time

REDRAW_S = 0.2


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


class Progress:
    """Thread-safe: worker threads call add()."""

    def __init__(self, what: str, total: int, stream=None, enabled: bool | None = None):
        self.what = what
        self.total = max(total, 0)
        self.done = 0
        self._stream = stream or sys.stderr
        self._on = self._stream.isatty() if enabled is None else enabled
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._drawn_at = 0.0
        self._width = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            self._draw()

    def set(self, done: int, total: int | None = None) -> None:
        with self._lock:
            self.done = done
            if total is not None:
                self.total = total
            self._draw()

    def _draw(self, final: bool = False) -> None:
        if not self._on:
            return
        now = time.monotonic()
        if not final and now - self._drawn_at < REDRAW_S:
            return
        self._drawn_at = now
        elapsed = max(now - self._start, 1e-6)
        pct = f"{100 * self.done / self.total:5.1f}% " if self.total else ""
        line = (f"{self.what}: {pct}{_size(self.done)} of {_size(self.total)}, "
                f"{_size(self.done / elapsed)}/s, {elapsed:.0f} s")
        pad = " " * max(0, self._width - len(line))
        self._width = len(line)
        self._stream.write("\r" + line + pad + ("\n" if final else ""))
        self._stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._on and self._width:
                self._draw(final=True)
                self._on = False
