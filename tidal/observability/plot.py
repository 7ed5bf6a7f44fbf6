"""A PNG of a run: reward (train and held-out), throughput and step time per step."""

from __future__ import annotations

from pathlib import Path

from tidal.observability.metrics import read_metrics

# (panel title, metric keys drawn in it)
PANELS = [
    ("reward", ["reward/mean", "val/reward"]),
    ("generated tokens / s", ["perf/gen_tokens_per_s", "perf/tokens_per_s"]),
    ("seconds per step", ["perf/step_s"]),
    ("policy", ["actor/pg_loss", "actor/entropy", "actor/ppo_kl"]),
]


def plot_metrics(jsonl_path: str | Path, png_path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(jsonl_path)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for ax, (title, keys) in zip(axes, PANELS):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
