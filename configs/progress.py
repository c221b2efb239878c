"""Progress of the long jobs (build, rebalance, ingest, train, bench) as a person follows it: done
of total, rate and time left. On a terminal a tqdm bar redraws in place; with output redirected
to a file or a CI log it prints a plain line every few seconds instead, since a redrawn bar would
leave a carriage-return soup there. Either way it ends with one summary line."""
from __future__ import annotations

import sys
import threading
import time
from typing import Callable, Optional, TextIO

from tqdm import tqdm

PLAIN_EVERY_S = 10.0  # how often a redirected job prints a progress line


def duration(seconds: float) -> str:
    """`m:ss`, or `h:mm:ss` from an hour on."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """`with Progress("embedding", total, "images") as p: p.update(n)`. Closing prints
    "embedding: 144/144 images in 0:16, 8.8 images/s", unless `summary=False` (the job prints a
    summary of its own)."""

    def __init__(self, desc: str, total: Optional[int], unit: str = "images", *, file: Optional[TextIO] = None,
                 every_s: float = PLAIN_EVERY_S, summary: bool = True):
        self.desc, self.total, self.unit, self.every_s, self.summary = desc, total, unit, every_s, summary
        self.file = file or sys.stderr
        self.done = 0
        self.t0 = self._last_line = time.monotonic()
        self._lock = threading.Lock()
        self._bar = (tqdm(total=total, desc=desc, unit=f" {unit}", file=self.file, dynamic_ncols=True, leave=False)
                     if _is_terminal(self.file) else None)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.close(failed=kind is not None)

    def update(self, n: int = 1) -> None:
        """Count `n` more items done."""
        self.update_to(self.done + n)

    def update_to(self, done: int) -> None:
        """Set the count of items done (for a count polled from elsewhere)."""
        with self._lock:
            step, self.done = done - self.done, done
            if self._bar is not None:
                if step:
                    self._bar.update(step)
            elif time.monotonic() - self._last_line >= self.every_s:
                self._last_line = time.monotonic()
                print(self.line(), file=self.file, flush=True)

    def line(self) -> str:
        """`desc: done/total unit (pct%), rate unit/s, m:ss left`."""
        elapsed = time.monotonic() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total:
            left = f", {duration((self.total - self.done) / rate)} left" if rate > 0 and self.done < self.total else ""
            head = f"{self.done}/{self.total} {self.unit} ({100.0 * self.done / self.total:.0f}%)"
        else:
            head, left = f"{self.done} {self.unit}", ""
        return f"{self.desc}: {head}, {rate:.1f} {self.unit}/s{left}"

    def close(self, failed: bool = False) -> None:
        """Remove the bar and print the summary line."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if not self.summary:
            return
        elapsed = time.monotonic() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        done = f"{self.done}/{self.total}" if self.total else str(self.done)
        default = f"{self.desc}: {done} {self.unit} in {duration(elapsed)}, {rate:.1f} {self.unit}/s"
        print(default + (" (stopped early)" if failed else ""), file=self.file, flush=True)


def poll(progress: Progress, count: Callable[[], int], every_s: float = 1.0) -> Callable[[], None]:
    """Feed `progress` from `count()` every `every_s` seconds in a thread; returns the stop function
    (a job whose work runs elsewhere, such as a Ray Data pipeline, counts there and is polled)."""
    stop = threading.Event()

    def loop():
        while not stop.wait(every_s):
            try:
                progress.update_to(count())
            except Exception:  # a missed poll only delays the next line
                pass

    thread = threading.Thread(target=loop, name="progress", daemon=True)
    thread.start()

    def finish() -> None:
        stop.set()
        thread.join()

    return finish


def replace_ray_data_bars() -> None:
    """Turn off Ray Data's own progress output for this driver: its bars count blocks per
    operator, not images, and with output redirected it logs a multi-line table every few seconds.
    A job shows a Progress of its own instead."""
    import logging

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # its "bars disabled" notice


def _is_terminal(file: TextIO) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False
