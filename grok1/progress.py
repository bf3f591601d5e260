"""A tiny byte-progress meter for long loads and conversions.

    with Progress(total_bytes, label="loading") as p:
        for chunk in work:
            p.update(len(chunk))     # thread-safe; also callable: p(len(chunk))

On a terminal (the stream's `isatty()`), it redraws one stderr line at most every `interval`
seconds: bytes done / total, percent, GB/s and ETA. Elsewhere (logs, CI, pipes) it prints nothing,
or, with `summary=True`, one final line when closed. GB means 1e9 bytes.
"""

from __future__ import annotations

import sys
import threading
import time


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Counts bytes against a total and shows the rate.

    Attributes:
      total: bytes expected (may be set later, e.g. by `grok1.checkpoint.loader.load_params`).
      done: bytes counted so far.
      label: the line's prefix.
      summary: print one final line on `close()` even when the stream is not a terminal.
    """

    def __init__(
        self,
        total: int | None = None,
        *,
        label: str = "loading",
        stream=None,
        summary: bool = False,
        interval: float = 0.2,
    ):
        self.total, self.done, self.label, self.summary = total, 0, label, summary
        self.stream = sys.stderr if stream is None else stream
        self.interval = interval
        self.start = time.perf_counter()
        self.closed = False
        self._lock = threading.Lock()
        self._last_draw = 0.0
        isatty = getattr(self.stream, "isatty", None)
        self.live = bool(isatty and isatty())

    def __call__(self, n: int) -> None:
        self.update(n)

    def update(self, n: int) -> None:
        """Counts `n` more bytes; redraws the live line if `interval` has passed."""
        with self._lock:
            self.done += int(n)
            now = time.perf_counter()
            if self.live and now - self._last_draw >= self.interval:
                self._last_draw = now
                self._write("\r" + self.line() + "\x1b[K")

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        """Bytes per second so far."""
        return self.done / max(self.elapsed, 1e-9)

    def line(self) -> str:
        """'loading  1.20/4.80 GB  25%  1.35 GB/s  ETA 0:03' (no total: no percent or ETA)."""
        gb, rate = self.done / 1e9, self.rate
        if not self.total:
            return f"{self.label}  {gb:.2f} GB  {rate / 1e9:.2f} GB/s  {_clock(self.elapsed)}"
        left = max(self.total - self.done, 0)
        eta = _clock(left / rate) if rate > 0 else "?"
        if self.closed or left == 0:
            eta = f"in {_clock(self.elapsed)}"
        else:
            eta = f"ETA {eta}"
        pct = 100.0 * self.done / self.total
        return (
            f"{self.label}  {gb:.2f}/{self.total / 1e9:.2f} GB  {pct:3.0f}%  "
            f"{rate / 1e9:.2f} GB/s  {eta}"
        )

    def close(self) -> None:
        """Ends the live line (or prints the summary line, if asked). Idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self.live:
                self._write("\r" + self.line() + "\x1b[K\n")
            elif self.summary:
                self._write(self.line() + "\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
