"""The byte-progress meter: its line, when it draws (terminals only, at most every `interval`),
the summary line elsewhere, and counting from many threads. Its use by the loader is
tests/test_loader.py's."""

from __future__ import annotations

import io
import threading
import time

from grok1.progress import Progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def started_ago(meter: Progress, seconds: float) -> Progress:
    meter.start = time.perf_counter() - seconds
    return meter


def test_line_shows_bytes_percent_rate_and_eta():
    meter = started_ago(Progress(8 * 10**9, stream=io.StringIO(), label="reading"), 10)
    meter.update(2 * 10**9)  # 0.2 GB/s: the 6 GB left take 30 s
    assert meter.line() == "reading  2.00/8.00 GB   25%  0.20 GB/s  ETA 0:30"
    meter.update(6 * 10**9)
    assert meter.line().endswith("100%  0.80 GB/s  in 0:10")  # done: the time it took


def test_line_without_a_total_and_long_durations():
    meter = started_ago(Progress(stream=io.StringIO()), 3725)
    meter(10**9)  # callable like update
    assert meter.line() == "loading  1.00 GB  0.00 GB/s  1:02:05"
    meter.total = 4 * 10**9  # set later, as the loader does
    assert meter.line().startswith("loading  1.00/4.00 GB   25%") and "ETA 3:06:15" in meter.line()


def test_terminal_redraws_one_line_at_most_every_interval():
    term = FakeTerminal()
    meter = Progress(10**9, stream=term, interval=0.0)
    meter.update(1)  # draws
    meter.interval = 3600.0
    meter.update(2)  # within the interval: nothing
    assert term.getvalue().count("\r") == 1 and "\n" not in term.getvalue()
    meter.interval = 0.0
    meter.update(3)
    meter.close()
    meter.close()  # idempotent
    text = term.getvalue()
    assert text.count("\r") == 3 and text.count("\x1b[K") == 3
    assert text.endswith("\x1b[K\n") and text.count("\n") == 1
    assert meter.closed and meter.done == 6


def test_elsewhere_nothing_or_one_summary_line():
    quiet, summary = io.StringIO(), io.StringIO()
    for stream, want in ((quiet, False), (summary, True)):
        with Progress(10**9, stream=stream, summary=want, label="x", interval=0.0) as p:
            p.update(5 * 10**8)
    assert quiet.getvalue() == ""
    assert summary.getvalue().startswith("x  0.50/1.00 GB   50%")
    assert summary.getvalue().count("\n") == 1


def test_updates_from_many_threads_all_count():
    meter = Progress(10**6, stream=FakeTerminal(), interval=0.0)
    threads = [
        threading.Thread(target=lambda: [meter.update(7) for _ in range(1000)]) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert meter.done == 8 * 7 * 1000
