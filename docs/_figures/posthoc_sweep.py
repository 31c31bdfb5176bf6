"""Regenerate docs/posthoc_sweep.png and the numbers docs/posthoc.md quotes from it, docs/posthoc_sweep.json.

Runs `emakit demo --posthoc` (default settings and seed) into a temporary folder, copies its plot, and writes its
summary beside the plot; then, for the wall-time comparison the page makes, runs `emakit demo` (same settings)
and the post-hoc demo again one after the other, each in its own process. tests/posthoc/test_docs.py checks that the
page quotes these numbers, so rerun this script and update the page together:

    python docs/_figures/posthoc_sweep.py
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from emakit.demo.figure import machine

DOCS = Path(__file__).resolve().parents[1]
PNG, NUMBERS = DOCS / "posthoc_sweep.png", DOCS / "posthoc_sweep.json"


def _wall(args: list[str], out: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "emakit", *args, "--out", str(out)], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "posthoc"
        subprocess.run([sys.executable, "-m", "emakit", "demo", "--posthoc", "--out", str(run)], check=True)
        summary = json.loads((run / "posthoc.json").read_text())
        shutil.copyfile(run / "posthoc.png", PNG)
        walls = {
            "demo": _wall(["demo", "--no-plot"], Path(tmp) / "demo"),
            "posthoc_demo": _wall(["demo", "--posthoc", "--no-plot"], Path(tmp) / "posthoc2"),
        }
    summary.pop("files", None)
    summary["wall_seconds"] = {k: round(v, 2) for k, v in walls.items()}
    summary["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), **machine()}
    NUMBERS.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {PNG} and {NUMBERS}")


if __name__ == "__main__":
    main()
