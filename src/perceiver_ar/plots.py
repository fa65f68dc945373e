"""The loss curve of a training run (loss.png), drawn from its metrics.jsonl.

matplotlib is imported only when a plot is drawn, with the file-only Agg
backend, so training never needs a display.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def plot_losses(metrics_path: Path, out_path: Path) -> Path | None:
    """Train bits/token per step (and its running mean) with the validation points; None if no steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, bits, eval_steps, eval_bits = [], [], [], []
    unigram = None
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if "eval" in rec:
            eval_steps.append(rec["step"])
            eval_bits.append(rec["eval"]["bits_per_token"])
            unigram = rec["eval"].get("unigram_bits_per_token", unigram)
        elif "bits_per_token" in rec:
            steps.append(rec["step"])
            bits.append(rec["bits_per_token"])
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, bits, color="tab:blue", alpha=0.3, lw=1, label="train (per step)")
    window = max(1, len(bits) // 50)
    if window > 1:
        smooth = np.convolve(bits, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, color="tab:blue", lw=2, label=f"train (mean of {window})")
    if eval_steps:
        ax.plot(eval_steps, eval_bits, "o-", color="tab:orange", label="validation")
    if unigram is not None:
        ax.axhline(unigram, color="grey", ls="--", lw=1, label="unigram baseline (validation)")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
