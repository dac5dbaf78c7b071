"""JobMonitor: a small Ray actor where trainer ranks drop metrics and results for the job runner to pick up.

Trainers report with fire-and-forget calls; the runner drains the records to log them to MLflow in batches
and to draw progress, so neither side waits on the other.
"""

from __future__ import annotations


class JobMonitor:
    def __init__(self):
        self.records: list[dict] = []
        self.results: dict[str, dict] = {}
        self.stopped: dict[str, int] | None = None

    def report(self, dictionary: str, step: int, tokens: int, metrics: dict[str, float]) -> None:
        self.records.append({"dictionary": dictionary, "step": step, "tokens": tokens, "metrics": metrics})

    def finish(self, dictionary: str, result: dict) -> None:
        self.results[dictionary] = result

    def stop(self, step: int, tokens: int) -> None:
        """The trainers checkpointed at `step` and stopped early, as asked (a job resumed later)."""
        self.stopped = {"step": step, "tokens": tokens}

    def stopped_at(self) -> dict[str, int] | None:
        return self.stopped

    def drain(self) -> list[dict]:
        records, self.records = self.records, []
        return records

    def final_results(self) -> dict[str, dict]:
        return self.results
