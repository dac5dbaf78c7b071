"""Buffer statistics over time: token rates over a sliding window, and the thread that logs a buffer's stats."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

import ray

RATE_WINDOW_S = 30.0


class Rate:
    """Tokens per second over the last RATE_WINDOW_S seconds."""

    def __init__(self):
        self.samples: collections.deque = collections.deque()
        self.total = 0

    def add(self, tokens: int) -> None:
        self.total += tokens
        now = time.monotonic()
        self.samples.append((now, self.total))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW_S:
            self.samples.popleft()

    def per_s(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, c0), (t1, c1) = self.samples[0], self.samples[-1]
        return (c1 - c0) / max(t1 - t0, 1e-9)


def log_stats_periodically(buffer, log: Callable[[dict, int], None], every_s: float = 10.0,
                           stop: threading.Event | None = None) -> threading.Thread:
    """A daemon thread that logs the buffer's stats (as buffer_<name>, step = batches handed out) until the
    buffer is gone or `stop` is set; it never raises into the job."""
    stop = stop or threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            try:
                stats = ray.get(buffer.stats.remote(), timeout=every_s)
                log({f"buffer_{k}": v for k, v in stats.items()}, int(stats["batches_out"]))
            except Exception:  # noqa: BLE001 - the buffer ended with the job, or tracking is busy: stop quietly
                return

    thread = threading.Thread(target=loop, name="buffer-stats", daemon=True)
    thread.start()
    return thread
