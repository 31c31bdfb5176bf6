"""``python -m emakit.demo.figure [FOLDER]``: the docs' demo figure and the numbers the pages quote, from one run.

Runs the demo with its defaults (``emakit demo``: seed 0, CPU, one thread) and writes into FOLDER (default
``docs``), replacing them, ``demo_curves.png`` and ``demo_curves.json``: the settings and, rounded as the pages
quote them, final and best validation accuracy (%) and the noise (percentage points) of the raw and the EMA
curves. The JSON is also stored in the PNG (its ``Description`` text chunk), so that a test can tell that both
come from one run; ``tests/docs/test_demo_figure.py`` checks that README.md and the docs quote the JSON's numbers.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from emakit.atomic import write_bytes

__all__ = ["FIGURE_NAME", "NUMBERS_NAME", "figure_numbers", "machine", "main", "write_figure"]

FIGURE_NAME = "demo_curves.png"
NUMBERS_NAME = "demo_curves.json"


def machine() -> dict[str, Any]:
    """The processor and torch a figure was made on: training at the demo's learning rate amplifies the last-bit
    differences between processors' float kernels, so a rerun reproduces a figure's numbers on the same ones."""
    import torch

    from emakit.bench.report import cpu_name

    return {"cpu": cpu_name(), "torch": torch.__version__}


def figure_numbers(summary: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """What the pages quote from a demo ``summary``: accuracies in % to 0.1, noise in percentage points to 0.01."""
    numbers: dict[str, Any] = {"command": "python -m emakit.demo.figure", "config": config, "machine": machine()}
    for kind in ("raw", "ema"):
        row = summary[kind]
        numbers[kind] = {
            "final_accuracy_pct": round(100 * row["final_accuracy"], 1),
            "best_accuracy_pct": round(100 * row["best_accuracy"], 1),
            "noise_pp": round(row["noise_pp"], 2),
        }
    return numbers


def write_figure(folder: Path) -> dict[str, Any]:
    """Run the demo at its defaults and write the figure and its numbers into ``folder``; return the numbers."""
    from emakit.demo.config import DemoConfig
    from emakit.demo.plot import plot_curves
    from emakit.demo.run import _title, run_demo

    with tempfile.TemporaryDirectory(prefix="emakit-figure-") as run_folder:
        config = DemoConfig(out=Path(run_folder) / "run", plot=False, progress=False)
        result = run_demo(config)
        settings = {k: v for k, v in asdict(config).items() if k not in ("out", "plot", "progress")}
        numbers = figure_numbers(result.summary, settings)
        text = json.dumps(numbers, indent=2) + "\n"
        folder.mkdir(parents=True, exist_ok=True)
        title = _title(config, result.data, result.ema)
        plot_curves(
            result.records, folder / FIGURE_NAME, result.summary, title, overwrite=True, metadata={"Description": text}
        )
        write_bytes(folder / NUMBERS_NAME, text.encode(), overwrite=True)
    return numbers


def main(argv: Sequence[str] | None = None) -> int:
    """Write the figure into the folder given (default ``docs``) and print its numbers."""
    args = list(sys.argv[1:] if argv is None else argv)
    folder = Path(args[0]) if args else Path("docs")
    numbers = write_figure(folder)
    print(f"wrote {folder / FIGURE_NAME} and {folder / NUMBERS_NAME}")
    print(json.dumps({k: numbers[k] for k in ("raw", "ema")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
