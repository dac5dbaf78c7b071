"""Producer memory does not grow with the corpus: benchmarks/corpus_streaming.py at CI size (100 MB JSONL and
Parquet corpora against 10 MB ones, the tiny random model, producers in their own processes)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_producer_peak_rss_is_the_same_on_a_corpus_ten_times_larger(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "corpus_streaming.py"), "--small",
                          "--producers", "1", "--folder", str(tmp_path)],
                         capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    for fmt in ("jsonl", "parquet"):
        large, small = figures[fmt]["large"], figures[fmt]["small"]
        # reading the 90 MB more that the large corpus holds would show; a bounded reader shows noise only
        assert large["peak_rss_mib"] - small["peak_rss_mib"] < 30, figures[fmt]
        assert figures[fmt]["rss_ratio"] < 1.1, figures[fmt]
        assert large["tokens"] == small["tokens"] == figures["tokens"]
