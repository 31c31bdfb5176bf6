"""Tables as aligned text (parsed by the smoke test) or markdown, and the line that says where they ran."""

from __future__ import annotations

import math
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from emakit._version import __version__

__all__ = ["Progress", "Table", "cpu_name", "machine"]


@dataclass
class Table:
    """A titled table of rows; rendered as aligned text or markdown."""

    title: str
    headers: tuple[str, ...]
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def render(self, markdown: bool = False) -> str:
        cells = [[_cell(v) for v in row] for row in self.rows]
        if markdown:
            lines = [f"**{self.title}**", "", "| " + " | ".join(self.headers) + " |"]
            lines.append("|" + "|".join(["---"] + ["---:"] * (len(self.headers) - 1)) + "|")
            lines += ["| " + " | ".join(row) + " |" for row in cells]
            lines += [""] + [f"- {note}" for note in self.notes]
            return "\n".join(lines) + "\n"
        widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(self.headers)]
        widths[0] = max(widths[0], 40)
        fmt = "  ".join([f"{{:<{widths[0]}}}"] + [f"{{:>{w}}}" for w in widths[1:]])
        lines = [f"== {self.title}", fmt.format(*self.headers), "-" * (sum(widths) + 2 * (len(widths) - 1))]
        lines += [fmt.format(*row) for row in cells]
        lines += [f"   note: {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value >= 100:
            return f"{value:.1f}"
        return f"{value:.3f}" if value >= 0.01 else f"{value:.4f}"
    return str(value)


class Progress:
    """``[2/6] shape vit ...`` lines on stderr between sections, so that a long run shows where it is."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0

    def __call__(self, what: str) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total}] {what} ...", file=sys.stderr, flush=True)


def cpu_name() -> str:
    """The processor's model name (Linux's /proc/cpuinfo), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """emakit, torch and Python versions, the CPU (and GPU), and the torch thread count."""
    cpu = cpu_name()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (
        f"emakit {__version__}, torch {torch.__version__}, Python {platform.python_version()}, {cpu}{gpu}, "
        f"{torch.get_num_threads()} torch threads"
    )
