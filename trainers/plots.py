"""Plots of a trained dictionary, saved as PNG files (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def firing_frequency_histogram(frequencies: np.ndarray, path: Path, title: str = "latent firing frequencies"
                               ) -> Path:
    """Histogram of log10 firing frequency per latent; latents that never fired are counted apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frequencies = np.asarray(frequencies, dtype=np.float64)
    fired = frequencies[frequencies > 0]
    never = int((frequencies <= 0).sum())
    figure, axes = plt.subplots(figsize=(7, 4))
    if len(fired):
        axes.hist(np.log10(fired), bins=60, color="#3b6ea5")
    axes.axvline(-1, color="#b03a2e", linestyle="--", linewidth=1, label="dense (10% of tokens)")
    axes.set_xlabel("log10 firing frequency (fraction of tokens)")
    axes.set_ylabel("latents")
    axes.set_title(f"{title}\n{len(frequencies)} latents, {never} never fired")
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def dead_fraction_curves(curves: dict[str, tuple[list[int], list[float]]], path: Path, title: str,
                         window_tokens: int | None = None) -> Path:
    """Dead fraction against tokens trained, one line per arm; a dotted line where the dead window is first
    complete (before it no latent can be dead)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for label, (tokens, fractions) in curves.items():
        axes.plot(tokens, [100 * f for f in fractions], label=label, linestyle="--" if "AuxK" in label else "-")
    if window_tokens:
        axes.axvline(window_tokens, color="#777777", linestyle=":", linewidth=1, label="window first complete")
    axes.set_xlabel("tokens trained")
    axes.set_ylabel("dead latents (%)")
    axes.set_title(title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
