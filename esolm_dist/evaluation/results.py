"""The files of one evaluation: results.json (a list of rows), results.csv, samples.jsonl, pareto.png."""

from __future__ import annotations

import csv
import json
from pathlib import Path

RESULTS_JSON, RESULTS_CSV, SAMPLES_JSONL, PARETO_PNG = "results.json", "results.csv", "samples.jsonl", "pareto.png"


def write_results(out_dir: Path, rows: list[dict], samples: list[dict], run_settings: dict) -> list[Path]:
    """Write the four files (each sample carries the run's settings next to its own); their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULTS_JSON).write_text(json.dumps(rows, indent=2) + "\n")
    with open(out_dir / RESULTS_CSV, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(out_dir / SAMPLES_JSONL, "w") as handle:
        for record in samples:
            handle.write(json.dumps({**run_settings, **record}) + "\n")
    plot_pareto(rows, out_dir / PARETO_PNG)
    return [out_dir / name for name in (RESULTS_JSON, RESULTS_CSV, SAMPLES_JSONL, PARETO_PNG)]


def plot_pareto(rows: list[dict], path: Path) -> None:
    """Gen PPL against NFE and against seconds per batch, one line per (method, alpha0), points by T."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key in sorted({(row["method"], row["alpha0"]) for row in rows}):
        line = sorted((row for row in rows if (row["method"], row["alpha0"]) == key), key=lambda r: r["steps"])
        for axis, x in zip(axes, ("nfe", "seconds"), strict=True):
            axis.plot([row[x] for row in line], [row["gen_ppl"] for row in line], marker="o",
                      label=f"{key[0]} alpha0={key[1]:g}")
    for axis, label in zip(axes, ("NFE per batch", "seconds per batch"), strict=True):
        axis.set_xlabel(label)
        axis.set_ylabel("gen PPL")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
