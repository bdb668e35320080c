"""Run records a person reads: metrics.jsonl, one line per step, and loss.png drawn from it."""

import json
from pathlib import Path
from typing import Any

import numpy as np

from esd_jax.files import atomic_file


class MetricsLog:
    """Appends one JSON object per step; a resumed run drops lines past its restored step first."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        rows = self.read_rows(path)
        kept = [r for r in rows if r["step"] <= resume_step]
        lines = path.read_text().splitlines() if path.exists() else []
        if len(kept) != len([line for line in lines if line.strip()]):
            with atomic_file(path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))

    @staticmethod
    def read_rows(path: Path) -> list[dict[str, Any]]:
        """The rows; a line cut short by a kill, or not a row of this log, is left out."""
        if not path.exists():
            return []
        rows = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and isinstance(row.get("loss"), float):
                rows.append(row)
        return rows

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def plot_loss(
    metrics_path: Path, out: Path, title: str, ylabel: str = "ESD loss (MSE to the negatively guided target)"
) -> None:
    """The loss per step and its running mean, on a log scale (the ESD loss spans decades); the retain
    loss beside it where the run has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = MetricsLog.read_rows(metrics_path)
    if not rows:
        return
    window = max(1, len(rows) // 20)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for key, colour in (("loss", "tab:blue"), ("retain_loss", "tab:orange"), ("adversarial_loss", "tab:red")):
        kept = [r for r in rows if isinstance(r.get(key), float)]
        if not kept:
            continue
        step, loss = np.array([r["step"] for r in kept]), np.array([r[key] for r in kept])
        name = key.replace("_", " ")
        ax.plot(step, loss, lw=0.8, alpha=0.35 if window > 1 else 1.0, color=colour, label=name)
        if window > 1 and len(loss) >= window:
            smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
            ax.plot(step[window - 1 :], smooth, lw=2, color=colour, label=f"{name}, mean of {window} steps")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
