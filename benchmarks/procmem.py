"""Memory figures of this process from /proc, shared by the benchmark scripts (no torch import: the parent of
sharded_memory.py reads them too). Run the scripts as files (`python benchmarks/X.py`), so this folder is on
the import path."""

from __future__ import annotations

import resource


def rss_bytes(field: str = "VmRSS") -> int:
    """A memory figure of this process from /proc/self/status (VmHWM: the peak RSS)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> None:
    """Reset VmHWM to the current RSS, so that the next reading is the peak of what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
