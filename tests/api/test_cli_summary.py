"""The CLI's job summary says how dead latents were counted: the window, and "not measured" for a job shorter
than its window (no latent can be dead before one whole window), with "never fired" either way."""

from types import SimpleNamespace

from api.cli import summary


def _result(tokens: int, window: int, complete: bool) -> SimpleNamespace:
    dictionary = {"tokens": tokens, "dead_window_tokens": window, "dead_window_complete": complete,
                  "dead_fraction": 0.0125, "never_fired_fraction": 0.004, "train_seconds": 10.0}
    return SimpleNamespace(job_id="j", seconds=12.0, dictionaries={"d": dictionary}, child_runs={"d": "run"},
                           mlflow_run_id="parent", experiment_id="1", mlflow_ui="mlflow ui")


def test_summary_reports_the_window_dead_and_never_fired():
    text = summary(_result(400_000, 100_000, True))
    assert "dead latents      1.25%   (no firing in the last 100,000 of the 400,000 tokens trained)" in text
    assert "never fired: 0.40%" in text


def test_a_job_shorter_than_its_window_says_dead_was_not_measured():
    text = summary(_result(60_000, 100_000, False))
    assert "not measured" in text and "100,000 tokens, is longer than this run's 60,000" in text
    assert "1.25%" not in text and "never fired: 0.40%" in text
