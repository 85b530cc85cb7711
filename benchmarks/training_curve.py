"""The embedded drafter's training curve: held-out chain acceptance (tau) against cumulative CPU training
minutes and response tokens trained on (docs/models.md, "Training campaign").

    python benchmarks/training_curve.py docs/results/training-curve/points.json   # writes curve.png next to it

points.json: [{"name", "train_cpu_min", "response_tokens" (all that went into the drafter, warm starts included), "tau", "held_out"}, ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    path = Path((argv or sys.argv[1:])[0])
    pts = json.loads(path.read_text())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, key, label in ((axes[0], "train_cpu_min", "CPU training minutes that went into it (2 cores)"),
                           (axes[1], "response_tokens", "response tokens that went into it")):
        xs, ys = [p[key] for p in pts], [p["tau"] for p in pts]
        ax.plot(xs, ys, marker="o")
        for p in pts:
            ax.annotate(p["name"], (p[key], p["tau"]), fontsize=7, textcoords="offset points", xytext=(4, -10))
        ax.set(xlabel=label)
        ax.grid(alpha=0.3)
    axes[0].set(ylabel="held-out chain tau (block 8)")
    fig.suptitle("Embedded SmolLM2-135M drafter: held-out acceptance vs training compute", fontsize=10)
    fig.tight_layout()
    out = path.with_name("curve.png")
    fig.savefig(out, dpi=120)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
