"""Plots a run's reward and accuracy curves to a PNG: `python scripts/plot_metrics.py RUN_DIR OUT.png`.

Needs matplotlib (`pip install matplotlib`; not a dependency of the package).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def smooth(values, k=5):
  values = np.asarray(values, float)
  if len(values) < k:
    return values
  kernel = np.ones(k) / k
  padded = np.concatenate([np.full(k // 2, values[0]), values, np.full(k - 1 - k // 2, values[-1])])
  return np.convolve(padded, kernel, mode="valid")


def main(run_dir, out):
  rows = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
  steps = [r["step"] for r in rows]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for ax, key, title in zip(axes, ("reward/mean", "accuracy/mean", "response_length/mean"),
                            ("rubric reward (offline judge)", "accuracy (answer checker)",
                             "response length (tokens)")):
    vals = [r.get(key) for r in rows]
    ax.plot(steps, vals, "o", alpha=0.35, ms=3, label="per step")
    ax.plot(steps, smooth(vals), "-", lw=2, label="5-step mean")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].legend(loc="lower right")
  fig.suptitle(f"ropd_jax demo: {run_dir}")
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  print(f"wrote {out}")


if __name__ == "__main__":
  main(*sys.argv[1:3])
